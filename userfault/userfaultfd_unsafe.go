package userfault

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

type uffdioAPIArg struct {
	API      uint64
	Features uint64
	Ioctls   uint64
}

type uffdioRegisterArg struct {
	Start  uint64
	Len    uint64
	Mode   uint64
	Ioctls uint64
}

func uffdioAPICall(fd int, features uint64) (uint64, error) {
	a := uffdioAPIArg{API: uffdAPI, Features: features}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uffdioAPI, uintptr(unsafe.Pointer(&a))); errno != 0 {
		return 0, errno
	}
	return a.Features, nil
}

// uffdioRangeCall issues UFFDIO_REGISTER (with mode) or UFFDIO_UNREGISTER.
// Both take a uffdio_range first; the unregister ignores the rest.
func uffdioRangeCall(fd int, req uintptr, start, end uintptr, mode uint64) error {
	a := uffdioRegisterArg{Start: uint64(start), Len: uint64(end - start), Mode: mode}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(unsafe.Pointer(&a))); errno != 0 {
		return errno
	}
	return nil
}
