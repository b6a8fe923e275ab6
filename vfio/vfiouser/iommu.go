package vfiouser

import (
	"errors"
	"fmt"
	"math"
	"runtime/debug"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/dma"
	"github.com/gohfi/gohfi/vfio"
	"github.com/gohfi/gohfi/vfio/abi"
)

// dmaRegion is one DMA mapping of the client, as the server sees it.
type dmaRegion struct {
	iova uint64
	size uint64
	prot uint32 // vfio.DMARead | vfio.DMAWrite
	// mem is the server's own MAP_SHARED mapping of the fd the client sent;
	// ring the device ring the client sent instead (pinned anonymous
	// memory, docs/pinning.md "Device rings"); both nil when the client
	// sent no fd and accesses go over the socket.
	mem  []byte
	ring *dma.DeviceRingBuffer
}

// release drops the server's own access to the client's memory.
func (r *dmaRegion) release() {
	if r.mem != nil {
		_ = unix.Munmap(r.mem) // our own mapping: a failure would be a bug, not the client's
	}
	if r.ring != nil {
		_ = r.ring.Close() // our own side of the ring and our pipe: nothing a close could lose
	}
}

func (r *dmaRegion) end() uint64 { return r.iova + r.size }

// iommu is the server's table of the client's DMA mappings and the DMA the
// model is attached to: it translates IOVAs like an IOMMU and faults on
// anything not mapped with the needed permission.
//
// Device accesses hold mu for reading for their whole duration (including a
// DMA_READ/DMA_WRITE round trip to the client); DMA_UNMAP takes it for
// writing, so it returns only when no access can still touch the memory it
// removes, and the mapping is munmapped only after that.
type iommu struct {
	mu     sync.RWMutex
	maps   []*dmaRegion // sorted by iova, never overlapping
	max    int
	closed bool
	sess   *session
	// n mirrors len(maps) for readers that must not take mu.
	n atomic.Int64
}

// find returns the index of the first mapping that ends after iova.
func (m *iommu) find(iova uint64) int {
	lo, hi := 0, len(m.maps)
	for lo < hi {
		mid := int(uint(lo+hi) >> 1)
		if m.maps[mid].end() <= iova {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	return lo
}

// dmaMap adds a mapping; fd (or -1) is always closed.
// req is vfio-user's DMA_MAP: Vaddr is the offset in the file fd, or with
// ring the address the device ring fd knows the mapping's first byte at
// (sameProcess: the client's ring, of this process: dma.OpenDeviceRing).
func (m *iommu) dmaMap(req abi.VFIOIommuType1DmaMap, fd int, ring, sameProcess bool) (err error) {
	defer func() {
		if fd >= 0 {
			// The client's fd, received with the message: a mapping holds
			// its own reference, and there is nothing to flush.
			_ = unix.Close(fd)
		}
	}()
	if req.Flags&^(abi.VFIO_DMA_MAP_FLAG_READ|abi.VFIO_DMA_MAP_FLAG_WRITE) != 0 || req.Flags == 0 {
		return fmt.Errorf("vfio-user: DMA_MAP: flags %#x: %w", req.Flags, unix.EINVAL)
	}
	if req.Size == 0 || addOverflows(req.IOVA, req.Size) {
		return fmt.Errorf("vfio-user: DMA_MAP: IOVA %#x size %#x: %w", req.IOVA, req.Size, unix.EINVAL)
	}
	// vfio.DMARead and DMAWrite are VFIO_DMA_MAP_FLAG_READ and WRITE.
	r := &dmaRegion{iova: req.IOVA, size: req.Size, prot: req.Flags}
	switch {
	case ring:
		ringFd := fd
		fd = -1 // OpenDeviceRing owns it now, and closes it on failure
		if r.ring, err = dma.OpenDeviceRing(ringFd, req.Vaddr, req.Size, sameProcess); err != nil {
			return fmt.Errorf("vfio-user: DMA_MAP: %w", err)
		}
	case fd >= 0:
		if r.mem, err = mmapDMA(fd, req); err != nil {
			return err
		}
	}
	defer func() {
		if err != nil {
			r.release() // never published
		}
	}()

	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return fmt.Errorf("vfio-user: DMA_MAP: %w", vfio.ErrDisconnected)
	}
	if len(m.maps) >= m.max {
		return fmt.Errorf("vfio-user: DMA_MAP: %d mappings already: %w", len(m.maps), unix.ENOSPC)
	}
	i := m.find(r.iova)
	if i < len(m.maps) && m.maps[i].iova < r.end() {
		return fmt.Errorf("vfio-user: DMA_MAP: IOVA %#x+%#x overlaps %#x+%#x: %w",
			r.iova, r.size, m.maps[i].iova, m.maps[i].size, unix.EEXIST)
	}
	m.maps = append(m.maps, nil)
	copy(m.maps[i+1:], m.maps[i:])
	m.maps[i] = r
	m.n.Store(int64(len(m.maps)))
	return nil
}

// mmapDMA maps the client's fd for a DMA_MAP.
func mmapDMA(fd int, req abi.VFIOIommuType1DmaMap) ([]byte, error) {
	off := req.Vaddr // the offset in the file
	if off%pageSize != 0 || addOverflows(off, req.Size) ||
		off > math.MaxInt64 || req.Size > math.MaxInt {
		return nil, fmt.Errorf("vfio-user: DMA_MAP: fd offset %#x size %#x: %w", off, req.Size, unix.EINVAL)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("vfio-user: DMA_MAP: fstat: %w", err)
	}
	// A mapping past the end of a file faults with SIGBUS on access; refuse
	// it up front (accesses are still protected against a later truncate).
	if st.Mode&unix.S_IFMT == unix.S_IFREG && off+req.Size > uint64(st.Size) {
		return nil, fmt.Errorf("vfio-user: DMA_MAP: fd offset %#x size %#x beyond file size %#x: %w",
			off, req.Size, st.Size, unix.EINVAL)
	}
	prot := 0
	if req.Flags&abi.VFIO_DMA_MAP_FLAG_READ != 0 {
		prot |= unix.PROT_READ
	}
	if req.Flags&abi.VFIO_DMA_MAP_FLAG_WRITE != 0 {
		prot |= unix.PROT_WRITE
	}
	mem, err := unix.Mmap(fd, int64(off), int(req.Size), prot, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("vfio-user: DMA_MAP: mmap: %w", err)
	}
	return mem, nil
}

// dmaUnmap removes the mappings the request names: the exact mapping, or
// every mapping inside the range (QEMU unmaps whole address spaces that may
// hold nothing: success), or all with the ALL flag. A range that cuts a
// mapping is refused.
func (m *iommu) dmaUnmap(req abi.VFIOIommuType1DmaUnmap) error {
	if req.Flags&abi.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0 {
		return fmt.Errorf("vfio-user: DMA_UNMAP: dirty bitmap: %w", unix.ENOTSUP)
	}
	if req.Flags&^abi.VFIO_DMA_UNMAP_FLAG_ALL != 0 {
		return fmt.Errorf("vfio-user: DMA_UNMAP: flags %#x: %w", req.Flags, unix.EINVAL)
	}
	all := req.Flags&abi.VFIO_DMA_UNMAP_FLAG_ALL != 0
	// A range may end exactly at 2^64: QEMU unmaps [0xfef00000, 2^64).
	toTop := req.Size != 0 && req.IOVA+req.Size == 0
	if !all && (req.Size == 0 || addOverflows(req.IOVA, req.Size) && !toTop) {
		return fmt.Errorf("vfio-user: DMA_UNMAP: IOVA %#x size %#x: %w", req.IOVA, req.Size, unix.EINVAL)
	}
	m.mu.Lock()
	var lo, hi int
	if all {
		lo, hi = 0, len(m.maps)
	} else {
		end := req.IOVA + req.Size
		lo = m.find(req.IOVA)
		hi = lo
		for hi < len(m.maps) && (toTop || m.maps[hi].iova < end) {
			hi++
		}
		if lo < hi && (m.maps[lo].iova < req.IOVA || !toTop && m.maps[hi-1].end() > end) {
			m.mu.Unlock()
			return fmt.Errorf("vfio-user: DMA_UNMAP: IOVA %#x size %#x cuts a mapping: %w", req.IOVA, req.Size, unix.EINVAL)
		}
	}
	gone := make([]*dmaRegion, hi-lo)
	copy(gone, m.maps[lo:hi])
	m.maps = append(m.maps[:lo], m.maps[hi:]...)
	clear(m.maps[len(m.maps):cap(m.maps)])
	m.n.Store(int64(len(m.maps)))
	m.mu.Unlock()
	// No access can reach these any more: the write lock waited for those
	// in flight, and new ones no longer find them.
	for _, r := range gone {
		r.release()
	}
	return nil
}

// close drops every mapping and fails all later accesses.
func (m *iommu) close() {
	m.mu.Lock()
	m.closed = true
	gone := m.maps
	m.maps = nil
	m.n.Store(0)
	m.mu.Unlock()
	for _, r := range gone {
		r.release()
	}
}

// count is the number of mappings; it does not wait for the table.
func (m *iommu) count() int { return int(m.n.Load()) }

// Read implements DMA: the device reads client memory.
func (m *iommu) Read(iova uint64, p []byte) error { return m.access(iova, p, false) }

// Write implements DMA: the device writes client memory.
func (m *iommu) Write(iova uint64, p []byte) error { return m.access(iova, p, true) }

func (m *iommu) access(iova uint64, p []byte, write bool) error {
	if len(p) == 0 {
		return nil
	}
	need, what := uint32(vfio.DMARead), "read"
	if write {
		need, what = vfio.DMAWrite, "write"
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.closed || addOverflows(iova, uint64(len(p))) {
		return fmt.Errorf("vfio-user: DMA %s of %d bytes at IOVA %#x: %w", what, len(p), iova, ErrIOMMUFault)
	}
	// Check the whole range first so that a fault copies nothing.
	first, ok := m.covered(iova, uint64(len(p)), need)
	if !ok {
		return fmt.Errorf("vfio-user: DMA %s of %d bytes at IOVA %#x: %w", what, len(p), iova, ErrIOMMUFault)
	}
	cur := iova
	for j := first; len(p) > 0; j++ {
		r := m.maps[j]
		off := cur - r.iova
		n := int(min(uint64(len(p)), r.size-off))
		if err := m.regionIO(r, write, off, p[:n]); err != nil {
			return fmt.Errorf("vfio-user: DMA %s of %d bytes at IOVA %#x: %w", what, n, cur, err)
		}
		cur += uint64(n)
		p = p[n:]
	}
	return nil
}

// regionIO reads or writes p at off of mapping r (checked by the caller),
// however the server reaches it.
func (m *iommu) regionIO(r *dmaRegion, write bool, off uint64, p []byte) error {
	switch {
	case r.mem != nil && write:
		return faultSafeCopy(r.mem[off:off+uint64(len(p))], p)
	case r.mem != nil:
		return faultSafeCopy(p, r.mem[off:off+uint64(len(p))])
	case r.ring != nil && write:
		_, err := r.ring.WriteAt(p, int64(off))
		return err
	case r.ring != nil:
		_, err := r.ring.ReadAt(p, int64(off))
		return err
	}
	return m.sess.socketDMA(write, r.iova+off, p)
}

// faultSafeCopy copies between a client-provided shared mapping and our
// memory (or between two such mappings). The client may truncate the file
// under the mapping; the SIGBUS that follows becomes a *memFault instead of
// killing the server.
func faultSafeCopy(dst, src []byte) (err error) {
	old := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(old)
		if r := recover(); r != nil {
			f := &memFault{what: r}
			if a, ok := r.(interface{ Addr() uintptr }); ok {
				f.addr, f.known = a.Addr(), true
			}
			err = f
		}
	}()
	copy(dst, src)
	return nil
}

// memFault is a memory fault during faultSafeCopy, at addr if known.
type memFault struct {
	what  any
	addr  uintptr
	known bool
}

func (f *memFault) Error() string {
	return fmt.Sprintf("memory fault in shared mapping (%v): %v", f.what, unix.EFAULT)
}

func (f *memFault) Unwrap() error { return unix.EFAULT }

// in reports whether the fault hit b.
func (f *memFault) in(b []byte) bool { return f.known && holds(b, f.addr) }

// Copy implements Copier: n bytes from src to dst, both checked first.
// Between two fd-backed mappings it is one copy (a memmove from the
// client's file to the client's file, no staging); between two device
// rings two kernel copies through the source ring's pipe, between a device ring
// and a mapping the mapping is the buffer of the ring's pipe (no staging
// either); between a mapping and memory the client serves over the socket
// the mapping is the buffer of the DMA_WRITE or DMA_READ; only where the
// socket serves a side and the other is not a mapping does it stage, in
// chunks of the client's max_data_xfer_size.
func (m *iommu) Copy(dst, src uint64, n int) error {
	if n == 0 {
		return nil
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	if n < 0 || m.closed || addOverflows(src, uint64(n)) || addOverflows(dst, uint64(n)) {
		return &CopyError{Err: fmt.Errorf("vfio-user: DMA copy of %d bytes from %#x to %#x: %w", n, src, dst, ErrIOMMUFault)}
	}
	if src < dst+uint64(n) && dst < src+uint64(n) {
		return &CopyError{Dst: true, Err: fmt.Errorf("vfio-user: DMA copy of %d bytes from %#x to overlapping %#x: %w", n, src, dst, unix.EINVAL)}
	}
	si, ok := m.covered(src, uint64(n), vfio.DMARead)
	if !ok {
		return &CopyError{Err: fmt.Errorf("vfio-user: DMA read of %d bytes at IOVA %#x: %w", n, src, ErrIOMMUFault)}
	}
	di, ok := m.covered(dst, uint64(n), vfio.DMAWrite)
	if !ok {
		return &CopyError{Dst: true, Err: fmt.Errorf("vfio-user: DMA write of %d bytes at IOVA %#x: %w", n, dst, ErrIOMMUFault)}
	}
	var stage []byte
	for rem := uint64(n); rem > 0; {
		sr, dr := m.maps[si], m.maps[di]
		soff, doff := src-sr.iova, dst-dr.iova
		k := min(rem, sr.size-soff, dr.size-doff)
		var err error
		var dstSide bool
		switch {
		case sr.mem != nil && dr.mem != nil:
			s, d := sr.mem[soff:soff+k], dr.mem[doff:doff+k]
			if err = faultSafeCopy(d, s); err != nil {
				var f *memFault
				dstSide = errors.As(err, &f) && f.in(d)
			}
		case sr.ring != nil && dr.ring != nil:
			// Pages to the source's pipe to pages: two kernel copies.
			dstSide, err = sr.ring.CopyTo(dr.ring, int64(doff), int64(soff), int(k))
		case sr.ring != nil && dr.mem != nil:
			_, err = sr.ring.ReadAt(dr.mem[doff:doff+k], int64(soff))
			dstSide = errors.Is(err, dma.ErrCallerMemory)
		case sr.mem != nil && dr.ring != nil:
			_, err = dr.ring.WriteAt(sr.mem[soff:soff+k], int64(doff))
			dstSide = err != nil && !errors.Is(err, dma.ErrCallerMemory)
		case sr.mem != nil && dr.ring == nil:
			// The device writes the client's memory from the source
			// mapping; a fault reading the mapping is the source's.
			err = m.sess.socketDMA(true, dst, sr.mem[soff:soff+k])
			var f *memFault
			dstSide = !errors.As(err, &f)
		case dr.mem != nil && sr.ring == nil:
			err = m.sess.socketDMA(false, src, dr.mem[doff:doff+k])
			var f *memFault
			dstSide = errors.As(err, &f)
		default:
			// Through the socket on one side at least, or both: staged.
			if stage == nil {
				stage = make([]byte, min(k, uint64(m.sess.maxDMAChunk())))
			}
			k = min(k, uint64(len(stage)))
			if err = m.regionIO(sr, false, soff, stage[:k]); err == nil {
				err, dstSide = m.regionIO(dr, true, doff, stage[:k]), true
			}
		}
		if err != nil {
			at, what := src, "read"
			if dstSide {
				at, what = dst, "write"
			}
			return &CopyError{Dst: dstSide, Err: fmt.Errorf("vfio-user: DMA copy, %s at IOVA %#x: %w", what, at, err)}
		}
		src, dst, rem = src+k, dst+k, rem-k
		if src == sr.end() {
			si++
		}
		if dst == dr.end() {
			di++
		}
	}
	return nil
}

// covered returns the index of the mapping holding iova if [iova, iova+n)
// lies entirely in mappings with permission need.
func (m *iommu) covered(iova, n uint64, need uint32) (int, bool) {
	first := m.find(iova)
	cur := iova
	for j := first; n > 0; j++ {
		if j >= len(m.maps) || m.maps[j].iova > cur || m.maps[j].prot&need == 0 {
			return 0, false
		}
		k := min(n, m.maps[j].end()-cur)
		cur += k
		n -= k
	}
	return first, true
}
