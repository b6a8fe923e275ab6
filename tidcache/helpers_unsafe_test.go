package tidcache_test

import "unsafe"

// addrPtr turns a raw address of memory outside the Go heap (mmap) into a
// pointer; going through memory keeps vet's uintptr rule satisfied.
func addrPtr(a uintptr) unsafe.Pointer { return *(*unsafe.Pointer)(unsafe.Pointer(&a)) }

func bytesAt(addr uintptr, n int) []byte { return unsafe.Slice((*byte)(addrPtr(addr)), n) }

func addrOf(b []byte) uint64 { return uint64(uintptr(unsafe.Pointer(&b[0]))) }
