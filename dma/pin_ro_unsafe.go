package dma

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// vmspliceRange vmsplices the n bytes at vaddr, a range of the process's
// memory named by address, into the pipe w (without SPLICE_F_GIFT: the pipe
// takes page references), non-blocking, and returns how many bytes it took.
func vmspliceRange(w int, vaddr uintptr, n int) (int, error) {
	iov := ioIovec{Base: uint64(vaddr), Len: uint64(n)}
	got, _, errno := unix.Syscall6(unix.SYS_VMSPLICE, uintptr(w), uintptr(unsafe.Pointer(&iov)), 1,
		unix.SPLICE_F_NONBLOCK, 0, 0)
	if errno != 0 {
		return 0, errno
	}
	return int(got), nil
}
