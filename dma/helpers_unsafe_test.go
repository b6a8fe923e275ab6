package dma

import (
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// mmapAnonAt maps n bytes of fresh anonymous memory at exactly addr
// (MAP_FIXED_NOREPLACE: fails rather than replacing a mapping) and returns
// it; the caller unmaps it.
func mmapAnonAt(t testing.TB, addr uintptr, n int) []byte {
	t.Helper()
	got, _, errno := unix.Syscall6(unix.SYS_MMAP, addr, uintptr(n), unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_FIXED_NOREPLACE, ^uintptr(0), 0)
	if errno != 0 {
		t.Fatalf("mmap at %#x: %v", addr, errno)
	}
	// got is a fresh mapping outside the Go heap; convert without vet's
	// uintptr->Pointer pattern.
	b := unsafe.Slice(*(**byte)(unsafe.Pointer(&got)), n)
	if got != addr {
		unix.Munmap(b)
		t.Fatalf("mmap MAP_FIXED_NOREPLACE at %#x returned %#x (old kernel ignores the flag)", addr, got)
	}
	return b
}
