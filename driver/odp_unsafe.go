package driver

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// mincore reports which pages of [addr, addr+length) are resident in the
// process (bit 0 of each byte), for PREFETCH_NO_FAULT.
func mincore(addr uintptr, length int) ([]byte, error) {
	vec := make([]byte, (length+pageSize-1)/pageSize)
	if len(vec) == 0 {
		return vec, nil
	}
	_, _, e := unix.Syscall(unix.SYS_MINCORE, addr, uintptr(length), uintptr(unsafe.Pointer(&vec[0])))
	if e != 0 {
		return nil, e
	}
	return vec, nil
}
