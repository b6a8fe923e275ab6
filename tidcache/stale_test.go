package tidcache_test

import (
	"bytes"
	"fmt"
	"testing"

	"golang.org/x/sys/unix"
)

// reuse is one way an application frees a buffer and gets new memory at
// the same address.
type reuse struct {
	name string
	// apply replaces the memory at addr (size bytes, mapped) with new,
	// zeroed pages at the same address.
	apply func(t *testing.T, addr uintptr, size int)
}

func mmapAt(t *testing.T, addr uintptr, size int, flags int) {
	t.Helper()
	p, err := unix.MmapPtr(-1, 0, addrPtr(addr), uintptr(size), unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|flags)
	if err != nil || uintptr(p) != addr {
		t.Fatalf("mmap at %#x: %p, %v", addr, p, err)
	}
}

var reuses = []reuse{
	{"munmap+mmap", func(t *testing.T, addr uintptr, size int) {
		if err := unix.MunmapPtr(addrPtr(addr), uintptr(size)); err != nil {
			t.Fatal(err)
		}
		mmapAt(t, addr, size, unix.MAP_FIXED_NOREPLACE)
	}},
	{"mmap-MAP_FIXED", func(t *testing.T, addr uintptr, size int) {
		mmapAt(t, addr, size, unix.MAP_FIXED)
	}},
	{"mremap+mmap", func(t *testing.T, addr uintptr, size int) {
		dst, err := unix.MmapPtr(-1, 0, nil, uintptr(size), unix.PROT_NONE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
		if err != nil {
			t.Fatal(err)
		}
		moved, err := unix.MremapPtr(addrPtr(addr), uintptr(size), dst, uintptr(size), unix.MREMAP_MAYMOVE|unix.MREMAP_FIXED)
		if err != nil || moved != dst {
			t.Fatalf("mremap: %v", err)
		}
		mmapAt(t, addr, size, unix.MAP_FIXED_NOREPLACE)
		if err := unix.MunmapPtr(dst, uintptr(size)); err != nil {
			t.Fatal(err)
		}
	}},
	{"madvise-DONTNEED", func(t *testing.T, addr uintptr, size int) {
		if err := unix.Madvise(bytesAt(addr, size), unix.MADV_DONTNEED); err != nil {
			t.Fatal(err)
		}
	}},
}

// TestNoStaleHitAfterReuse: an application frees a cached buffer and gets
// new memory at the same address, then asks the cache for it at once: every
// lookup must miss, and the receive must land in the new pages. Before the
// invalidation generations, 11 to 26 of 80 lookups hit the old TIDs and the
// data went to the old pages.
func TestNoStaleHitAfterReuse(t *testing.T) {
	const iterations = 80
	for _, r := range reuses {
		t.Run(r.name, func(t *testing.T) {
			e := setup(t, 2048)
			const size = 64 << 10
			p, err := unix.MmapPtr(-1, 0, nil, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
			if err != nil {
				t.Fatal(err)
			}
			addr := uintptr(p)
			defer unix.MunmapPtr(addrPtr(addr), size)
			stale, lost := 0, 0 // of 2*iterations receives
			for i := range iterations {
				ent, err := e.cache.Acquire(addr, size)
				if err != nil {
					t.Fatal(err)
				}
				old := bytes.Repeat([]byte(fmt.Sprintf("old %6d ", i)), size/11+1)[:size]
				e.send(t, ent, old)
				if !bytes.Equal(bytesAt(addr, size), old) {
					lost++ // a stale entry left over from the last round
				}
				if err := e.cache.Release(ent); err != nil {
					t.Fatal(err)
				}

				r.apply(t, addr, size)

				hits := e.cache.Stats().Hits
				ent2, err := e.cache.Acquire(addr, size)
				if err != nil {
					t.Fatal(err)
				}
				if e.cache.Stats().Hits != hits {
					stale++
				}
				data := bytes.Repeat([]byte(fmt.Sprintf("new %6d ", i)), size/11+1)[:size]
				e.send(t, ent2, data)
				if !bytes.Equal(bytesAt(addr, size), data) {
					lost++
				}
				if err := e.cache.Release(ent2); err != nil {
					t.Fatal(err)
				}
			}
			t.Logf("%s: %d stale hits of %d lookups after reuse, %d of %d receives lost", r.name, stale, iterations, lost, 2*iterations)
			if stale != 0 || lost != 0 {
				t.Fatalf("%s: %d stale hits of %d lookups after reuse, %d of %d receives lost", r.name, stale, iterations, lost, 2*iterations)
			}
		})
	}
}
