package vfiouser

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// addrOf is the address of b's first byte, for DMA mappings by Vaddr. The
// tests keep b (mmapped memory, never moved) alive while it is mapped.
func addrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(b))) }

// replaceProtNone puts a PROT_NONE mapping over [addr, addr+n) in one call
// (MAP_FIXED): the old pages go as with munmap, and no other mmap can take
// the range meanwhile.
func replaceProtNone(addr uintptr, n int) error {
	_, err := unix.MmapPtr(-1, 0, *(*unsafe.Pointer)(unsafe.Pointer(&addr)), uintptr(n), unix.PROT_NONE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_FIXED)
	return err
}

// unmapAt unmaps [addr, addr+n).
func unmapAt(addr uintptr, n int) error {
	return unix.MunmapPtr(*(*unsafe.Pointer)(unsafe.Pointer(&addr)), uintptr(n))
}

// emptyRingBuffer empties buffer 0 of the io_uring ring, as a client
// holding its device ring's fd can (IORING_REGISTER_BUFFERS_UPDATE of
// struct io_uring_rsrc_update2 with an iovec of no address).
func emptyRingBuffer(ring int) error {
	var iov [2]uint64 // struct iovec: no base, no length
	upd := struct {
		Offset, Resv uint32
		Data, Tags   uint64
		Nr, Resv2    uint32
	}{Data: uint64(uintptr(unsafe.Pointer(&iov))), Nr: 1}
	const ioringRegisterBuffersUpdate = 16
	_, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(ring), ioringRegisterBuffersUpdate,
		uintptr(unsafe.Pointer(&upd)), unsafe.Sizeof(upd), 0, 0)
	if errno != 0 {
		return errno
	}
	return nil
}
