package userfault

import (
	"os"
	"testing"

	"github.com/gohfi/gohfi/internal/testenv"
	"golang.org/x/sys/unix"
)

// TestShmemFile: a shared mapping of a memfd gives the memfd and the
// offset of the address in it; private, anonymous, read-only (for a
// write) and write-sealed memory give nothing, so the caller pins.
func TestShmemFile(t *testing.T) {
	testenv.RequireRoot(t, "/proc/self/map_files needs CAP_SYS_ADMIN")
	ps := int(pageSize)
	fd, err := unix.MemfdCreate("shmem-test", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		t.Fatal(err)
	}
	memfd := os.NewFile(uintptr(fd), "shmem-test")
	defer memfd.Close()
	if err := memfd.Truncate(int64(8 * ps)); err != nil {
		t.Fatal(err)
	}
	mapping := func(prot, flags, fd int, off int64) []byte {
		t.Helper()
		b, err := unix.Mmap(fd, off, 4*ps, prot, flags)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Munmap(b) })
		return b
	}
	rw := unix.PROT_READ | unix.PROT_WRITE
	shared := mapping(rw, unix.MAP_SHARED, fd, int64(2*ps)) // file pages 2..5
	shared[ps+7] = 0x5a
	f, off, err := ShmemFile(sliceAddr(shared)+pageSize, 2*pageSize, true)
	if err != nil || f == nil {
		t.Fatalf("shared memfd mapping: %v, %v", f, err)
	}
	if off != uint64(3*ps) {
		t.Errorf("offset %#x, want %#x", off, 3*ps)
	}
	var b [1]byte
	if _, err := f.ReadAt(b[:], int64(off)+7); err != nil || b[0] != 0x5a {
		t.Errorf("the file read at the offset: %#x, %v", b[0], err)
	}
	f.Close()
	for _, c := range []struct {
		name  string
		mem   []byte
		write bool
	}{
		{"private mapping of the memfd", mapping(rw, unix.MAP_PRIVATE, fd, 0), false},
		{"anonymous", mapping(rw, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS, -1, 0), false},
		{"read-only shared mapping, for a write", mapping(unix.PROT_READ, unix.MAP_SHARED, fd, 0), true},
		{"beyond the mapping", shared[3*ps:], false},
	} {
		n := 2 * pageSize
		if f, _, err := ShmemFile(sliceAddr(c.mem), n, c.write); f != nil || err != nil {
			f.Close()
			t.Errorf("%s: %v, %v, want neither", c.name, f, err)
		}
	}
	if f, _, err := ShmemFile(sliceAddr(mapping(unix.PROT_READ, unix.MAP_SHARED, fd, 0)), pageSize, false); f == nil || err != nil {
		t.Errorf("read-only shared mapping, for a read: %v, %v", f, err)
	} else {
		f.Close()
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_FUTURE_WRITE); err != nil {
		t.Fatal(err)
	}
	if f, _, err := ShmemFile(sliceAddr(shared), pageSize, true); f != nil || err != nil {
		f.Close()
		t.Errorf("write-sealed memfd, for a write: %v, %v, want neither", f, err)
	}
}
