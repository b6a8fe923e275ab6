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
		VFIOUserRegionIOFDsRequest | VFIOUserSubRegionIOEventFD | VFIOUserRegionAccess |
		VFIOUserDmaRegionAccess | VFIOUserWriteMulti | VFIOUserWriteMultiOne
}

// Compile-time checks that the Sizeof constants are the sizes of the
// structures: each line fails to build if the two differ (a non-empty
// array, or a negative uintptr constant).
var (
	_ [0]struct{} = [unsafe.Sizeof(VFIOGroupStatus{}) - SizeofVFIOGroupStatus]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(VFIODeviceInfo{}) - SizeofVFIODeviceInfo]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(VFIORegionInfo{}) - SizeofVFIORegionInfo]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(VFIOInfoCapHeader{}) - SizeofVFIOInfoCapHeader]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(VFIORegionInfoCapSparseMmap{}) - SizeofVFIORegionInfoCapSparseMmap]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(VFIORegionSparseMmapArea{}) - SizeofVFIORegionSparseMmapArea]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(VFIOIrqInfo{}) - SizeofVFIOIrqInfo]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(VFIOIrqSet{}) - SizeofVFIOIrqSet]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(VFIOIommuType1Info{}) - SizeofVFIOIommuType1Info]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(VFIOIovaRange{}) - SizeofVFIOIovaRange]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(VFIOIommuType1InfoCapIovaRange{}) - SizeofVFIOIommuType1InfoCapIovaRange]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(VFIOIommuType1InfoDmaAvail{}) - SizeofVFIOIommuType1InfoDmaAvail]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(VFIOIommuType1DmaMap{}) - SizeofVFIOIommuType1DmaMap]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(VFIOIommuType1DmaUnmap{}) - SizeofVFIOIommuType1DmaUnmap]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(VFIOUserHeader{}) - SizeofVFIOUserHeader]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(VFIOUserVersion{}) - SizeofVFIOUserVersion]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(VFIOUserDeviceInfo{}) - SizeofVFIOUserDeviceInfo]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(VFIOUserRegionIOFDsRequest{}) - SizeofVFIOUserRegionIOFDsRequest]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(VFIOUserSubRegionIOEventFD{}) - SizeofVFIOUserSubRegionIOEventFD]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(VFIOUserRegionAccess{}) - SizeofVFIOUserRegionAccess]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(VFIOUserDmaRegionAccess{}) - SizeofVFIOUserDmaRegionAccess]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(VFIOUserWriteMulti{}) - SizeofVFIOUserWriteMulti]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(VFIOUserWriteMultiOne{}) - SizeofVFIOUserWriteMultiOne]struct{}{}
)

// sizeOf is sizeof the C structure T.
func sizeOf[T Struct]() int {
	var v T
	return int(unsafe.Sizeof(v))
}

// Bytes is the memory of *v: what the kernel reads and writes through a
// pointer to the structure. It aliases *v.
func Bytes[T Struct](v *T) []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(v)), unsafe.Sizeof(*v))
}

// Encode writes *v at the start of b and returns its size; it panics if
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
	size := sizeOf[T]()
	if n < 0 || size != 0 && n > len(b)/size {
		return nil, false
	}
	s := make([]T, n)
	for i := range s {
		copy(Bytes(&s[i]), b[i*size:])
	}
	return s, true
}
