package vfiouser

import "unsafe"

// addrOf is the address of b's first byte, for DMA mappings by Vaddr. The
// tests keep b (mmapped memory, never moved) alive while it is mapped.
func addrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(b))) }
