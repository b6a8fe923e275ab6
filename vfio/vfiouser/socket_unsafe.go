package vfiouser

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// recvmsg is recvmsg(2) into p and oob with a msghdr and iovec the caller
// keeps (unix.Recvmsg allocates on every call; this is the hot path).
func recvmsg(fd int, p, oob []byte, flags int, msg *unix.Msghdr, iov *unix.Iovec) (n, oobn, recvflags int, err error) {
	*msg = unix.Msghdr{}
	iov.Base = unsafe.SliceData(p)
	iov.SetLen(len(p))
	msg.Iov = iov
	msg.SetIovlen(1)
	if len(oob) > 0 {
		msg.Control = unsafe.SliceData(oob)
		msg.SetControllen(len(oob))
	}
	r, _, e := unix.Syscall(unix.SYS_RECVMSG, uintptr(fd), uintptr(unsafe.Pointer(msg)), uintptr(flags))
	if e != 0 {
		return 0, 0, 0, e
	}
	return int(r), int(msg.Controllen), int(msg.Flags), nil
}
