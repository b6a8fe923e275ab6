package vfiouser

import (
	"errors"
	"fmt"
	"io"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/vfio"
	"github.com/gohfi/gohfi/vfio/abi"
)

// addMap records a DMA mapping; overlapping an existing one is EEXIST.
func (c *Client) addMap(m clientMap) error {
	c.dmaMu.Lock()
	defer c.dmaMu.Unlock()
	i := c.findMap(m.iova)
	if i < len(c.maps) && c.maps[i].iova < m.iova+m.size {
		return fmt.Errorf("vfio-user: DMA_MAP: IOVA %#x+%#x overlaps %#x+%#x: %w",
			m.iova, m.size, c.maps[i].iova, c.maps[i].size, unix.EEXIST)
	}
	c.maps = append(c.maps, clientMap{})
	copy(c.maps[i+1:], c.maps[i:])
	c.maps[i] = m
	return nil
}

func (c *Client) removeMap(iova, size uint64) {
	c.dmaMu.Lock()
	defer c.dmaMu.Unlock()
	i := c.findMap(iova)
	if i < len(c.maps) && c.maps[i].iova == iova && c.maps[i].size == size {
		c.maps = append(c.maps[:i], c.maps[i+1:]...)
		c.maps[len(c.maps) : len(c.maps)+1][0] = clientMap{}
	}
}

// findMap returns the index of the first mapping that ends after iova.
func (c *Client) findMap(iova uint64) int {
	lo, hi := 0, len(c.maps)
	for lo < hi {
		mid := int(uint(lo+hi) >> 1)
		if c.maps[mid].iova+c.maps[mid].size <= iova {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	return lo
}

// serveDMA answers a request from the server: DMA_READ and DMA_WRITE on the
// client's memory, within one mapping with the needed permission.
func (c *Client) serveDMA(h header, p []byte) {
	if h.Cmd != abi.VFIO_USER_DMA_READ && h.Cmd != abi.VFIO_USER_DMA_WRITE {
		c.sendError(h, unix.ENOSYS)
		return
	}
	var a abi.VFIOUserDmaRegionAccess
	if err := decode(h.Cmd, false, p, &a); err != nil {
		c.sendError(h, unix.EINVAL)
		return
	}
	if a.Count > uint64(c.o.maxData) {
		c.sendError(h, unix.E2BIG)
		return
	}
	write := h.Cmd == abi.VFIO_USER_DMA_WRITE
	const dmaAccessSize = abi.SizeofVFIOUserDmaRegionAccess
	if write && uint64(len(p)-dmaAccessSize) != a.Count {
		c.sendError(h, unix.EINVAL)
		return
	}
	replyLen := dmaAccessSize
	if !write {
		replyLen += int(a.Count)
	}
	if cap(c.dmaBuf) < headerSize+replyLen {
		c.dmaBuf = make([]byte, headerSize+replyLen, max(headerSize+replyLen, 64<<10+headerSize+dmaAccessSize))
	}
	b := c.dmaBuf[:headerSize+replyLen]
	if err := c.dmaAccess(write, a.Addr, p[dmaAccessSize:], b[headerSize+dmaAccessSize:], int(a.Count)); err != nil {
		c.o.logf("vfio-user: %s %#x+%d: %v", cmdName(h.Cmd), a.Addr, a.Count, err)
		c.sendError(h, errnoOf(err))
		return
	}
	if h.Flags&abi.VFIO_USER_F_NO_REPLY != 0 {
		return
	}
	rh := header{MsgID: h.MsgID, Cmd: h.Cmd, Size: uint32(len(b)), Flags: abi.VFIO_USER_F_TYPE_REPLY}
	abi.Encode(b, &rh)
	encode(h.Cmd, true, b[headerSize:], &a)
	if err := c.sk.send(b, nil); err != nil {
		c.o.logf("%v", err)
	}
	if cap(c.dmaBuf) > keepReadBuf {
		c.dmaBuf = nil // grown for a request larger than the default max_data_xfer_size
	}
}

// dmaAccess writes src to, or reads n bytes into dst from, client memory at
// iova.
func (c *Client) dmaAccess(write bool, iova uint64, src, dst []byte, n int) error {
	if n == 0 {
		return nil
	}
	need := uint32(vfio.DMARead)
	if write {
		need = vfio.DMAWrite
	}
	c.dmaMu.RLock()
	i := c.findMap(iova)
	if i >= len(c.maps) || c.maps[i].iova > iova || addOverflows(iova, uint64(n)) ||
		iova+uint64(n) > c.maps[i].iova+c.maps[i].size || c.maps[i].flags&need == 0 {
		c.dmaMu.RUnlock()
		return fmt.Errorf("not inside a mapping with permission %#x: %w", need, unix.EFAULT)
	}
	m := c.maps[i]
	c.dmaMu.RUnlock()
	off := iova - m.iova
	if m.access != nil {
		var got int
		var err error
		if write {
			got, err = m.access.WriteAt(src[:n], int64(off))
		} else {
			got, err = m.access.ReadAt(dst[:n], int64(off))
		}
		if got == n && (err == nil || errors.Is(err, io.EOF)) {
			return nil
		}
		if err == nil {
			err = fmt.Errorf("short access, %d of %d bytes: %w", got, n, unix.EFAULT)
		}
		return err
	}
	addr := m.vaddr + uintptr(off)
	if write {
		return c.processMem(true, addr, src[:n])
	}
	return c.processMem(false, addr, dst[:n])
}

// processMem reads or writes this process's memory at addr with
// process_vm_readv/writev: an address that is unmapped, or read-only for a
// write, gives EFAULT instead of a crash.
func (c *Client) processMem(write bool, addr uintptr, b []byte) error {
	for len(b) > 0 {
		local := [1]unix.Iovec{{Base: &b[0]}}
		local[0].SetLen(len(b))
		remote := [1]unix.RemoteIovec{{Base: addr, Len: len(b)}}
		var n int
		var err error
		if write {
			n, err = unix.ProcessVMWritev(c.pid, local[:], remote[:], 0)
		} else {
			n, err = unix.ProcessVMReadv(c.pid, local[:], remote[:], 0)
		}
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("process memory at %#x: %w", addr, err)
		}
		if n <= 0 {
			return fmt.Errorf("process memory at %#x: %w", addr, unix.EFAULT)
		}
		b = b[n:]
		addr += uintptr(n)
	}
	return nil
}
