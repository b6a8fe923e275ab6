package vfiouser

import "unsafe"

// holds reports whether addr is the address of a byte of b.
func holds(b []byte, addr uintptr) bool {
	lo := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	return len(b) > 0 && addr >= lo && addr-lo < uintptr(len(b))
}
