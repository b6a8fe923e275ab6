package userfault

import (
	"encoding/binary"
	"github.com/gohfi/gohfi/internal/testenv"
	"os"
	"testing"
	"time"

	"github.com/gohfi/gohfi/mem"
	"golang.org/x/sys/unix"
)

// A port of libfabric's fabtests/unit/mr_cache_evict.c idea: a registration
// cache keyed by address must not hit after the buffer was freed and memory
// at the same address was allocated again on other physical pages.

// mrCache is the smallest registration cache: address -> registration with
// the subscription's sequence number taken at registration time.
type mrCache struct {
	n       *Notifier
	entries map[uintptr]*mrEntry
	hits    int
	misses  int
}

type mrEntry struct {
	sub    *Subscription
	seq    uint64
	length uintptr
}

func (c *mrCache) lookup(t *testing.T, addr, length uintptr) bool {
	if e, ok := c.entries[addr]; ok && e.length == length && !e.sub.ReadRetry(e.seq) {
		c.hits++
		return true
	}
	c.misses++
	if e, ok := c.entries[addr]; ok {
		e.sub.Remove()
	}
	sub, err := c.n.Subscribe(addr, length, InvalidateFunc(func(*Subscription, Event) bool { return true }))
	if err != nil {
		t.Fatalf("register: %v", err)
	}
	c.entries[addr] = &mrEntry{sub: sub, seq: sub.ReadBegin(), length: length}
	return false
}

func (c *mrCache) close() {
	for _, e := range c.entries {
		e.sub.Remove()
	}
}

// pfns reads the physical frame numbers of pages from /proc/self/pagemap
// (bits 0-54; zero without CAP_SYS_ADMIN).
func pfns(t *testing.T, addr uintptr, pages int) []uint64 {
	t.Helper()
	f, err := os.Open("/proc/self/pagemap")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 8*pages)
	if _, err := f.ReadAt(buf, int64(addr/pageSize)*8); err != nil {
		t.Fatal(err)
	}
	out := make([]uint64, pages)
	for i := range out {
		e := binary.LittleEndian.Uint64(buf[8*i:])
		if e&(1<<63) == 0 {
			t.Fatalf("page %d not present", i)
		}
		out[i] = e & (1<<55 - 1)
	}
	return out
}

func TestMRCacheEvict(t *testing.T) {
	for _, tc := range []struct {
		name string
		srcs []Source
		sync bool // asynchronous sources need Sync before the lookup
	}{
		{"userfaultfd", []Source{SourceUserfaultfd}, false},
		{"tracepoint", []Source{SourceTracepoint}, true},
		{"both", []Source{SourceUserfaultfd, SourceTracepoint}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newNotifier(t, tc.srcs...)
			c := &mrCache{n: n, entries: map[uintptr]*mrEntry{}}
			defer c.close()
			const pages = 16
			length := uintptr(pages) * pageSize
			// memfd memory: after Unmap the file keeps its pages, so the new
			// mapping at the same address cannot get them back.
			b, err := mem.AllocMemfd(int(length))
			if err != nil {
				t.Fatal(err)
			}
			defer b.Close()
			addr := b.Addr()
			before := pfns(t, addr, pages)
			if before[0] == 0 {
				testenv.Missing(t, "pagemap shows no PFNs (needs CAP_SYS_ADMIN)")
			}
			if c.lookup(t, addr, length) {
				t.Fatal("first lookup hit")
			}
			if !c.lookup(t, addr, length) {
				t.Fatal("second lookup missed")
			}

			if err := b.Unmap(); err != nil {
				t.Fatal(err)
			}
			got := mmapAt(t, addr, pages, -1, unix.MAP_FIXED_NOREPLACE)
			defer munmap(t, got, pages)
			if got != addr {
				t.Fatalf("re-allocated at %#x, want %#x", got, addr)
			}
			after := pfns(t, addr, pages)
			for i := range after {
				if after[i] == before[i] {
					t.Fatalf("page %d on the same physical page %#x", i, after[i])
				}
			}
			if tc.sync {
				syncNotifier(t, n)
			}
			// userfaultfd needs no Sync: munmap returned, so the cache knows.
			if c.lookup(t, addr, length) {
				t.Fatal("lookup hit stale registration after free and re-allocation")
			}
			if !c.lookup(t, addr, length) {
				t.Fatal("lookup of the new registration missed")
			}
			if c.hits != 2 || c.misses != 2 {
				t.Fatalf("hits %d misses %d, want 2 and 2", c.hits, c.misses)
			}

			// The cache is worth having: a hit costs far less than a miss
			// (libfabric asks for at least 80% less).
			const rounds = 200
			start := time.Now()
			for i := 0; i < rounds; i++ {
				c.lookup(t, addr, length)
			}
			hit := time.Since(start)
			start = time.Now()
			for i := 0; i < rounds; i++ {
				c.entries[addr].seq++ // force a miss
				c.lookup(t, addr, length)
			}
			miss := time.Since(start)
			if hit*5 > miss {
				t.Errorf("hit %v not 80%% cheaper than miss %v for %d lookups", hit, miss, rounds)
			}
			t.Logf("per lookup: hit %v, miss (register) %v", hit/rounds, miss/rounds)
		})
	}
}
