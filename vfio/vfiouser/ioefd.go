package vfiouser

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"slices"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/vfio/abi"
)

// ioEventFD is one ioeventfd sub-region the server offered: a write of
// size bytes at off (of value data, when match) may be made by signalling
// fd instead.
type ioEventFD struct {
	off, size uint64
	match     bool
	data      uint64
	fd        int
}

// covers reports whether writing p at off is what e stands for.
func (e *ioEventFD) covers(off uint64, p []byte) bool {
	if off != e.off || uint64(len(p)) != e.size {
		return false
	}
	if !e.match {
		return true
	}
	var b [8]byte
	copy(b[:], p)
	return binary.LittleEndian.Uint64(b[:]) == e.data
}

// ringIOEventFD signals the eventfd that covers writing p at off of region
// index, if any: ok says whether one did. The server's sub-regions are
// asked once per region; a hostile answer is an error for every later
// posted write to the region.
func (c *Client) ringIOEventFD(index uint32, off uint64, p []byte) (ok bool, err error) {
	if len(p) == 0 || len(p) > 8 {
		return false, nil
	}
	r, err := c.region(index)
	if err != nil {
		return false, err
	}
	c.regMu.Lock()
	defer c.regMu.Unlock()
	if err := c.dead(); err != nil {
		return false, fmt.Errorf("vfio-user: posted REGION_WRITE: %w", err)
	}
	if !r.ioAsked {
		r.ioAsked = true
		r.ioefds, r.ioFDs, r.ioErr = c.getRegionIOFDs(index, r.info.Size)
	}
	if r.ioErr != nil {
		return false, r.ioErr
	}
	i, found := slices.BinarySearchFunc(r.ioefds, off, func(e ioEventFD, off uint64) int { return cmp.Compare(e.off, off) })
	for ; found && i < len(r.ioefds) && r.ioefds[i].off == off; i++ {
		e := &r.ioefds[i]
		if !e.covers(off, p) {
			continue
		}
		// The eventfd adds the count; EAGAIN is a count at its limit,
		// which the server has still to read: the signal is there.
		var one [8]byte
		binary.LittleEndian.PutUint64(one[:], 1)
		if _, err := unix.Write(e.fd, one[:]); err != nil && err != unix.EAGAIN {
			return false, fmt.Errorf("vfio-user: ioeventfd of region %d at %#x: %w", index, off, err)
		}
		return true, nil
	}
	return false, nil
}

// getRegionIOFDs asks the server for the ioeventfds of region index (of
// size bytes). A server that answers with an error offers none. The reply
// is checked as hostile input: every sub-region inside the region, with an
// access size a register write can have, on an fd of the reply that is an
// eventfd. Sub-regions of other kinds (ioregionfd, PIO) are left out.
func (c *Client) getRegionIOFDs(index uint32, size uint64) ([]ioEventFD, []int, error) {
	const cmd = abi.VFIO_USER_DEVICE_GET_REGION_IO_FDS
	const fixed, one = abi.SizeofVFIOUserRegionIOFDsRequest, abi.SizeofVFIOUserSubRegionIOEventFD
	argsz := uint32(fixed + 128*one)
	for try := 0; try < 3; try++ {
		k := newCall(cmd, fixed)
		encode(cmd, false, k.payload(), &abi.VFIOUserRegionIOFDsRequest{Argsz: argsz, Index: index})
		err := c.roundTrip(k, nil)
		if err != nil {
			k.release()
			if c.dead() != nil {
				return nil, nil, err
			}
			// Refused (an older server, or none to give): none.
			return nil, nil, nil
		}
		subs, fds, need, err := parseRegionIOFDs(k.reply, k.fds, index, size, argsz, c.o.maxData)
		if err == nil && need == 0 {
			k.fds = k.fds[:0] // the sub-regions' now
		}
		k.release()
		if err != nil || need == 0 {
			return subs, fds, err
		}
		argsz = need
	}
	return nil, nil, protoErr("GET_REGION_IO_FDS: server keeps asking for a larger argsz")
}

// parseRegionIOFDs checks a GET_REGION_IO_FDS reply (p, with fds) to a
// request of argsz for region index of size bytes. It returns the usable
// sub-regions sorted by offset and the fds they use (the others of fds
// are left to the caller to close), or the argsz the server needs.
func parseRegionIOFDs(p []byte, fds []int, index uint32, size uint64, argsz, maxData uint32) ([]ioEventFD, []int, uint32, error) {
	const cmd = abi.VFIO_USER_DEVICE_GET_REGION_IO_FDS
	const fixed, one = abi.SizeofVFIOUserRegionIOFDsRequest, abi.SizeofVFIOUserSubRegionIOEventFD
	var r abi.VFIOUserRegionIOFDsRequest
	if err := decode(cmd, true, p, &r); err != nil {
		return nil, nil, 0, err
	}
	switch {
	case r.Index != index || r.Flags != 0:
		return nil, nil, 0, protoErr("GET_REGION_IO_FDS reply for region %d flags %#x, asked %d", r.Index, r.Flags, index)
	case uint64(r.Argsz) != fixed+uint64(r.Count)*one:
		return nil, nil, 0, protoErr("GET_REGION_IO_FDS reply: argsz %d for %d sub-regions", r.Argsz, r.Count)
	case r.Argsz > argsz:
		if r.Argsz > maxData || len(p) != fixed || len(fds) != 0 {
			return nil, nil, 0, protoErr("GET_REGION_IO_FDS: argsz %d, %d bytes, %d fds", r.Argsz, len(p), len(fds))
		}
		return nil, nil, r.Argsz, nil
	case len(p) != int(r.Argsz):
		return nil, nil, 0, protoErr("GET_REGION_IO_FDS reply of %d bytes for argsz %d", len(p), r.Argsz)
	case r.Count == 0 && len(fds) != 0:
		return nil, nil, 0, protoErr("GET_REGION_IO_FDS reply with %d fds and no sub-region", len(fds))
	}
	all, _ := abi.DecodeSlice[abi.VFIOUserSubRegionIOEventFD](p[fixed:], int(r.Count))
	used := make([]bool, len(fds))
	var subs []ioEventFD
	for _, s := range all {
		if s.FDIndex >= uint32(len(fds)) {
			return nil, nil, 0, protoErr("GET_REGION_IO_FDS: fd index %d of %d fds", s.FDIndex, len(fds))
		}
		if s.Type != abi.VFIO_USER_IO_FD_TYPE_IOEVENTFD || s.Flags&abi.KVM_IOEVENTFD_FLAG_PIO != 0 {
			continue // for a hypervisor: nothing a process can signal
		}
		if s.Flags&^uint32(abi.KVM_IOEVENTFD_FLAG_DATAMATCH) != 0 || !accessSize(s.Size) ||
			addOverflows(s.Offset, s.Size) || s.Offset+s.Size > size {
			return nil, nil, 0, protoErr("GET_REGION_IO_FDS: sub-region %#x+%d flags %#x in region %d of %#x bytes",
				s.Offset, s.Size, s.Flags, index, size)
		}
		if s.Flags&abi.KVM_IOEVENTFD_FLAG_DATAMATCH != 0 && s.Size < 8 && s.Datamatch>>(8*s.Size) != 0 {
			return nil, nil, 0, protoErr("GET_REGION_IO_FDS: datamatch %#x for %d bytes", s.Datamatch, s.Size)
		}
		if !used[s.FDIndex] {
			if err := checkEventfd(fds[s.FDIndex]); err != nil {
				return nil, nil, 0, err
			}
			used[s.FDIndex] = true
		}
		subs = append(subs, ioEventFD{off: s.Offset, size: s.Size, match: s.Flags&abi.KVM_IOEVENTFD_FLAG_DATAMATCH != 0,
			data: s.Datamatch, fd: fds[s.FDIndex]})
	}
	slices.SortStableFunc(subs, func(a, b ioEventFD) int { return cmp.Compare(a.off, b.off) })
	// The fds the sub-regions use move to the caller's keeping; the
	// others are closed here and dropped from fds.
	var keep []int
	for i, fd := range fds {
		if used[i] {
			keep = append(keep, fd)
		} else {
			_ = unix.Close(fd) // an fd no usable sub-region names: never used
		}
	}
	return subs, keep, 0, nil
}

// accessSize reports whether n is the size of a register write a client
// makes (the specification's size 0, any size, is not: a write then needs
// its size, which the eventfd does not carry).
func accessSize(n uint64) bool { return n == 1 || n == 2 || n == 4 || n == 8 }

// checkEventfd refuses an fd that is not an eventfd (a write to it would
// be something else than a signal), and makes a blocking one non-blocking.
func checkEventfd(fd int) error {
	buf := make([]byte, 64)
	n, err := unix.Readlink("/proc/self/fd/"+strconv.Itoa(fd), buf)
	if err != nil {
		return fmt.Errorf("vfio-user: GET_REGION_IO_FDS: fd: %w", err)
	}
	if kind := string(buf[:n]); kind != "anon_inode:[eventfd]" {
		return protoErr("GET_REGION_IO_FDS: fd is %q, not an eventfd", kind)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		return fmt.Errorf("vfio-user: GET_REGION_IO_FDS: fd: %w", err)
	}
	return nil
}
