package userfault

import "unsafe"

func uintptrOf(b *bpfSource) uintptr { return uintptr(unsafe.Pointer(b)) }
