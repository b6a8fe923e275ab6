//go:build gohfiguest

package kernel

import (
	"sync/atomic"
	"unsafe"
)

// MMIO through a mapped BAR must be one access of the register's width:
// edu ignores anything but 32-bit accesses below 0x80.
func load32(bar []byte, off int) uint32 {
	return atomic.LoadUint32((*uint32)(unsafe.Pointer(&bar[off])))
}

func store32(bar []byte, off int, v uint32) {
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&bar[off])), v)
}

func addrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }
