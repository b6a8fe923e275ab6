package driver_test

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// mmapFixed maps n bytes of fresh anonymous memory at addr (MAP_FIXED).
func mmapFixed(addr uintptr, n int, prot int) error {
	p, err := unix.MmapPtr(-1, 0, unsafePtr(addr), uintptr(n), prot, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_FIXED)
	if err == nil && uintptr(p) != addr {
		return unix.EINVAL
	}
	return err
}

// munmapRaw unmaps [addr, addr+n).
func munmapRaw(addr uintptr, n int) error { return unix.MunmapPtr(unsafePtr(addr), uintptr(n)) }

// madvise applies advice to [addr, addr+n).
func madvise(addr uintptr, n int, advice int) error {
	return unix.Madvise(unsafe.Slice((*byte)(unsafePtr(addr)), n), advice)
}
