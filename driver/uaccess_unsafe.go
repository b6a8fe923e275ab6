package driver

import (
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// copyFromUser and copyToUser move ioctl arguments between the caller's
// memory and the driver, as the kernel's copy_from_user/copy_to_user do: a
// bad user pointer is EFAULT, never a crash. process_vm_readv/writev on our
// own process give exactly that check.
func copyFromUser(dst []byte, src uintptr) error {
	if len(dst) == 0 {
		return nil
	}
	if src == 0 {
		return unix.EFAULT
	}
	local := []unix.Iovec{{Base: &dst[0], Len: uint64(len(dst))}}
	remote := []unix.RemoteIovec{{Base: src, Len: len(dst)}}
	n, err := unix.ProcessVMReadv(os.Getpid(), local, remote, 0)
	if err != nil || n != len(dst) {
		return unix.EFAULT
	}
	return nil
}

func copyToUser(dst uintptr, src []byte) error {
	if len(src) == 0 {
		return nil
	}
	if dst == 0 {
		return unix.EFAULT
	}
	local := []unix.Iovec{{Base: &src[0], Len: uint64(len(src))}}
	remote := []unix.RemoteIovec{{Base: dst, Len: len(src)}}
	n, err := unix.ProcessVMWritev(os.Getpid(), local, remote, 0)
	if err != nil || n != len(src) {
		return unix.EFAULT
	}
	return nil
}

// UserPtr returns the user address of p for an ioctl argument. The caller
// keeps p alive (runtime.KeepAlive) until the ioctl returns.
func UserPtr[T any](p *T) uintptr { return uintptr(unsafe.Pointer(p)) }

func errFault(what string) error { return fmt.Errorf("%s: %w", what, unix.EFAULT) }
