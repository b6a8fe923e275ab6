package driver_test

import (
	"unsafe"

	"github.com/gohfi/gohfi/driver"
)

func uintptrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }

func uintptrOfU32(b []uint32) uintptr { return uintptr(unsafe.Pointer(&b[0])) }

// unsafePtr turns a raw address of memory outside the Go heap (mmap) into a
// pointer; going through memory keeps vet's uintptr rule satisfied.
func unsafePtr(addr uintptr) unsafe.Pointer { return *(*unsafe.Pointer)(unsafe.Pointer(&addr)) }

func unsafeSlice(addr uintptr, n int) []byte { return unsafe.Slice((*byte)(unsafePtr(addr)), n) }

// argOf is b as an ioctl argument.
func argOf(b []byte) driver.UserPtr { return driver.UserPtrOf(&b[0]) }

func u32sAt(addr uintptr, n int) []uint32 { return unsafe.Slice((*uint32)(unsafePtr(addr)), n) }
