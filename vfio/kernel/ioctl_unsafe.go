package kernel

import (
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The only place the backend hands memory to the kernel. Each wrapper
// names the ioctl in its error and keeps the errno, so that
// errors.Is(err, unix.EINVAL) works for callers.

// ioctlValue calls an ioctl whose argument is a plain integer and returns
// the ioctl's return value.
func ioctlValue(fd int, req uintptr, arg uintptr) (int, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
	if errno != 0 {
		return int(r), fmt.Errorf("vfio: %s: %w", ioctlName(req), errno)
	}
	return int(r), nil
}

// ioctlBuf calls an ioctl whose argument points to buf (an encoded VFIO
// structure starting with argsz) and returns the ioctl's return value. The
// kernel may write into buf.
func ioctlBuf(fd int, req uintptr, buf []byte) (int, error) {
	if len(buf) == 0 {
		return 0, fmt.Errorf("vfio: %s: empty argument", ioctlName(req))
	}
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(unsafe.Pointer(&buf[0])))
	runtime.KeepAlive(buf)
	if errno != 0 {
		return int(r), fmt.Errorf("vfio: %s: %w", ioctlName(req), errno)
	}
	return int(r), nil
}

// ioctlIntPtr calls an ioctl whose argument points to an int32 (the
// container fd of VFIO_GROUP_SET_CONTAINER).
func ioctlIntPtr(fd int, req uintptr, v int32) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(unsafe.Pointer(&v)))
	if errno != 0 {
		return fmt.Errorf("vfio: %s: %w", ioctlName(req), errno)
	}
	return nil
}

// ioctlString calls an ioctl whose argument is a NUL-terminated string (the
// device name of VFIO_GROUP_GET_DEVICE_FD) and returns the new fd.
func ioctlString(fd int, req uintptr, s string) (int, error) {
	p, err := unix.BytePtrFromString(s)
	if err != nil {
		return -1, fmt.Errorf("vfio: %s: %w", ioctlName(req), err)
	}
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(unsafe.Pointer(p)))
	runtime.KeepAlive(p)
	if errno != 0 {
		return -1, fmt.Errorf("vfio: %s(%q): %w", ioctlName(req), s, errno)
	}
	return int(r), nil
}
