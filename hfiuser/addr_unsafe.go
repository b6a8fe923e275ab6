package hfiuser

import (
	"runtime"
	"unsafe"
)

// pinnedAddr returns the address of *p for a field of an ioctl argument
// (hfi1_tid_info.tidlist, gohfi_send.vaddr) and pins the object until
// pin.Unpin: a field holds a number, so neither the garbage collector nor
// the stack copier knows it points at p. Pinning makes p escape to the heap,
// where a growing goroutine stack cannot move it.
func pinnedAddr[T any](pin *runtime.Pinner, p *T) uint64 {
	pin.Pin(p)
	return uint64(uintptr(unsafe.Pointer(p)))
}
