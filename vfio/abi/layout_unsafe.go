package abi

import "unsafe"

// Struct is every ABI structure of this package: the types whose memory
// is their C layout, and so the only ones Bytes, Encode and Decode take.
type Struct interface {
	VFIOGroupStatus | VFIODeviceInfo | VFIORegionInfo | VFIOInfoCapHeader |
		VFIORegionInfoCapSparseMmap | VFIORegionSparseMmapArea | VFIOIrqInfo |
		VFIOIrqSet | VFIOIommuType1Info | VFIOIovaRange |
		VFIOIommuType1InfoCapIovaRange | VFIOIommuType1InfoDmaAvail |
		VFIOIommuType1DmaMap | VFIOIommuType1DmaUnmap |
		VFIOUserHeader | VFIOUserVersion | VFIOUserDeviceInfo |
		VFIOUserRegionIOFDsRequest | VFIOUserRegionAccess |
		VFIOUserDmaRegionAccess | VFIOUserWriteMulti | VFIOUserWriteMultiOne
}

// Size is sizeof the C structure T.
func Size[T Struct]() int {
	var v T
	return int(unsafe.Sizeof(v))
}

// Bytes is the memory of *v: what the kernel reads and writes through a
// pointer to the structure. It aliases *v.
func Bytes[T Struct](v *T) []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(v)), unsafe.Sizeof(*v))
}

// Encode writes *v at the start of b and returns Size[T](); it panics if
// b is shorter, like an index out of range.
func Encode[T Struct](b []byte, v *T) int {
	return copy(b[:unsafe.Sizeof(*v)], Bytes(v))
}

// Decode reads *v from the start of b; false (and *v untouched) when b is
// shorter than the structure.
func Decode[T Struct](b []byte, v *T) bool {
	if uintptr(len(b)) < unsafe.Sizeof(*v) {
		return false
	}
	copy(Bytes(v), b)
	return true
}

// DecodeSlice reads n consecutive structures from the start of b (a
// flexible array member); false when b is too short.
func DecodeSlice[T Struct](b []byte, n int) ([]T, bool) {
	size := Size[T]()
	if n < 0 || size != 0 && n > len(b)/size {
		return nil, false
	}
	s := make([]T, n)
	for i := range s {
		copy(Bytes(&s[i]), b[i*size:])
	}
	return s, true
}
