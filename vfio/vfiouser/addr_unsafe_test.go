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
