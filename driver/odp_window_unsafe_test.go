package driver

import (
	"bytes"
	"errors"
	"sync/atomic"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/dma"
	"github.com/gohfi/gohfi/internal/testenv"
)

// TestODPWindowAccessor: the window's accessor reaches exactly the pages
// whose slots are filled, across chunk boundaries, and fails an access to
// an empty slot (or past the window) with EFAULT, as the device sees an
// access to an unmapped IOVA.
func TestODPWindowAccessor(t *testing.T) {
	testenv.RequireRoot(t, "io_uring pins")
	p, err := dma.NewPinner(dma.NewAccountant(), nil)
	testenv.Require(t, err, "io_uring")
	defer func() { _ = p.Close() }()
	mem, err := unix.Mmap(-1, 0, 4*pageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = unix.Munmap(mem) }()
	for i := range mem {
		mem[i] = byte(i / pageSize)
	}
	base := uintptr(unsafe.Pointer(&mem[0]))
	w := &odpWindow{size: 4 * pageSize, slots: make([]atomic.Pointer[winSlot], 4)}
	chunk := func(first, n int) *odpChunk {
		pin, err := p.Pin(base+uintptr(first)*pageSize, n*pageSize)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = pin.Unpin() })
		return &odpChunk{first: first, n: n, pin: pin}
	}
	buf := make([]byte, 2*pageSize)
	if _, err := w.ReadAt(buf[:8], pageSize); !errors.Is(err, unix.EFAULT) {
		t.Fatalf("read of an empty slot: %v, want EFAULT", err)
	}
	a, b := chunk(0, 1), chunk(1, 2)
	w.fill(a)
	w.fill(b)
	if !w.busy(&odpChunk{first: 2, n: 1}) || w.busy(&odpChunk{first: 3, n: 1}) {
		t.Fatal("busy: wrong slots")
	}
	// Across the boundary of a and b.
	if n, err := w.ReadAt(buf, pageSize/2); err != nil || n != len(buf) || !bytes.Equal(buf, mem[pageSize/2:pageSize/2+len(buf)]) {
		t.Fatalf("read across chunks: %d, %v", n, err)
	}
	if _, err := w.WriteAt([]byte{0xee}, 2*pageSize); err != nil || mem[2*pageSize] != 0xee {
		t.Fatalf("write: %v, byte %#x", err, mem[2*pageSize])
	}
	// Page 3 is empty: a read running into it stops there.
	if n, err := w.ReadAt(buf, 2*pageSize); !errors.Is(err, unix.EFAULT) || n != pageSize {
		t.Fatalf("read into an empty slot: %d, %v; want %d bytes then EFAULT", n, err, pageSize)
	}
	if _, err := w.ReadAt(buf[:1], 4*pageSize); !errors.Is(err, unix.EFAULT) {
		t.Fatalf("read past the window: %v", err)
	}
	w.empty(b)
	if _, err := w.ReadAt(buf[:1], pageSize); !errors.Is(err, unix.EFAULT) {
		t.Fatalf("read after empty: %v", err)
	}
	if _, err := w.ReadAt(buf[:1], 0); err != nil {
		t.Fatalf("read of a, still filled: %v", err)
	}
}
