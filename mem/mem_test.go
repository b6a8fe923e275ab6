package mem

import (
	"bytes"
	"encoding/binary"
	"errors"
	"github.com/gohfi/gohfi/internal/testenv"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// present reports whether the page holding addr is present, from
// /proc/self/pagemap (bit 63).
func present(t *testing.T, addr uintptr) bool {
	t.Helper()
	f, err := os.Open("/proc/self/pagemap")
	if err != nil {
		testenv.Require(t, err, "pagemap")
	}
	defer f.Close()
	var e [8]byte
	if _, err := f.ReadAt(e[:], int64(addr/uintptr(PageSize()))*8); err != nil {
		t.Fatalf("pagemap: %v", err)
	}
	return binary.LittleEndian.Uint64(e[:])&(1<<63) != 0
}

func TestAlloc(t *testing.T) {
	b, err := Alloc(3*PageSize() + 1)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if b.Addr()%uintptr(PageSize()) != 0 {
		t.Fatalf("address %#x not page aligned", b.Addr())
	}
	if got := len(b.Bytes()); got != 3*PageSize()+1 {
		t.Fatalf("len %d", got)
	}
	if b.MappedLen() != 4*PageSize() {
		t.Fatalf("mapped len %d", b.MappedLen())
	}
	if b.File() != nil {
		t.Fatal("anonymous buffer has a file")
	}
	for i := 0; i < 4; i++ {
		if !present(t, b.Addr()+uintptr(i*PageSize())) {
			t.Fatalf("page %d not prefaulted", i)
		}
	}
	copy(b.Bytes(), "hello")
	if err := b.Unmap(); err != nil {
		t.Fatal(err)
	}
	if b.Bytes() != nil {
		t.Fatal("Bytes after Unmap")
	}
	if err := b.Unmap(); err != nil {
		t.Fatalf("second Unmap: %v", err)
	}
	if err := b.Close(); err != nil {
		t.Fatalf("Close after Unmap: %v", err)
	}
}

func TestAllocBadSize(t *testing.T) {
	for _, n := range []int{0, -1} {
		if _, err := Alloc(n); !errors.Is(err, unix.EINVAL) {
			t.Errorf("Alloc(%d): %v, want EINVAL", n, err)
		}
		if _, err := AllocMemfd(n); !errors.Is(err, unix.EINVAL) {
			t.Errorf("AllocMemfd(%d): %v, want EINVAL", n, err)
		}
	}
}

func TestAllocMemfd(t *testing.T) {
	b, err := AllocMemfd(2 * PageSize())
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	f := b.File()
	if f == nil {
		t.Fatal("no file")
	}
	copy(b.Bytes()[PageSize():], "through the mapping")
	if err := b.Unmap(); err != nil {
		t.Fatal(err)
	}
	// The memory outlives the mapping while the file is open.
	got := make([]byte, 19)
	if _, err := f.ReadAt(got, int64(PageSize())); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, []byte("through the mapping")) {
		t.Fatalf("read %q", got)
	}
	st, err := f.Stat()
	if err != nil || st.Size() != int64(2*PageSize()) {
		t.Fatalf("stat: %v size %d", err, st.Size())
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if b.File() != nil {
		t.Fatal("file after Close")
	}
	if _, err := f.Stat(); err == nil {
		t.Fatal("file still open after Close")
	}
	if err := b.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}
