package dma

import (
	"errors"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"golang.org/x/sys/unix"
)

const pg = 4096

func mustIOVA(t testing.TB, ranges []IOVARange) *IOVAAllocator {
	t.Helper()
	a, err := NewIOVAAllocator(ranges, pg)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestIOVANew(t *testing.T) {
	for _, tc := range []struct {
		name  string
		in    []IOVARange
		page  uint64
		want  []IOVARange
		errno error
	}{
		{"one", []IOVARange{{0x1000, 0x4fff}}, pg, []IOVARange{{0x1000, 0x4fff}}, nil},
		{"shrunk to pages", []IOVARange{{0x1001, 0x5ffe}}, pg, []IOVARange{{0x2000, 0x4fff}}, nil},
		{"whole space", []IOVARange{{0, math.MaxUint64}}, pg, []IOVARange{{0, math.MaxUint64}}, nil},
		{"top page partial", []IOVARange{{0, math.MaxUint64 - 1}}, pg, []IOVARange{{0, math.MaxUint64 - pg}}, nil},
		{"sorted and merged", []IOVARange{{0x8000, 0x8fff}, {0x1000, 0x1fff}, {0x2000, 0x2fff}}, pg,
			[]IOVARange{{0x1000, 0x2fff}, {0x8000, 0x8fff}}, nil},
		{"sub-page dropped", []IOVARange{{0x10, 0x20}, {0x1000, 0x1fff}}, pg, []IOVARange{{0x1000, 0x1fff}}, nil},
		{"overlap", []IOVARange{{0x1000, 0x2fff}, {0x2000, 0x3fff}}, pg, nil, unix.EINVAL},
		{"inverted", []IOVARange{{0x2000, 0x1000}}, pg, nil, unix.EINVAL},
		{"nothing usable", []IOVARange{{0x10, 0x20}}, pg, nil, unix.EINVAL},
		{"empty", nil, pg, nil, unix.EINVAL},
		{"bad page size", []IOVARange{{0, 0xffff}}, 3000, nil, unix.EINVAL},
		{"small page size", []IOVARange{{0, 0xffff}}, 512, nil, unix.EINVAL},
		{"2M pages", []IOVARange{{0x100000, 0x7ffffe}}, 2 << 20, []IOVARange{{0x200000, 0x5fffff}}, nil},
	} {
		a, err := NewIOVAAllocator(tc.in, tc.page)
		if tc.errno != nil {
			if !errors.Is(err, tc.errno) {
				t.Errorf("%s: err = %v, want %v", tc.name, err, tc.errno)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if got := a.Ranges(); !slices.Equal(got, tc.want) {
			t.Errorf("%s: Ranges = %#v, want %#v", tc.name, got, tc.want)
		}
	}
}

func TestIOVAAllocFree(t *testing.T) {
	a := mustIOVA(t, []IOVARange{{0x10000, 0x12fff}, {0x20000, 0x27fff}})
	alloc := func(size, want uint64) {
		t.Helper()
		got, err := a.Alloc(size)
		if err != nil || got != want {
			t.Fatalf("Alloc(%#x) = %#x, %v; want %#x", size, got, err, want)
		}
	}
	alloc(1, 0x10000)      // rounded up to a page
	alloc(0x2000, 0x11000) // fills the first range
	alloc(0x1000, 0x20000) // first fit moves on
	alloc(0x4000, 0x21000) //
	if _, err := a.Alloc(0x4000); !errors.Is(err, unix.ENOSPC) {
		t.Fatalf("Alloc beyond the largest run = %v, want ENOSPC", err)
	}
	if _, err := a.Alloc(0); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("Alloc(0) = %v, want EINVAL", err)
	}
	if err := a.Free(0x11000, 0x2000); err != nil {
		t.Fatal(err)
	}
	alloc(0x1000, 0x11000) // first fit reuses the lowest hole
	for _, tc := range []struct{ iova, size uint64 }{
		{0x11000, 0x2000}, // size differs from the allocation
		{0x12000, 0x1000}, // inside a hole
		{0x10800, 0x1000}, // unaligned
		{0x30000, 0x1000}, // outside
	} {
		if err := a.Free(tc.iova, tc.size); !errors.Is(err, unix.EINVAL) {
			t.Errorf("Free(%#x, %#x) = %v, want EINVAL", tc.iova, tc.size, err)
		}
	}
	if err := a.Free(0x20000, 0x1000); err != nil {
		t.Fatal(err)
	}
	if err := a.Free(0x20000, 0x1000); !errors.Is(err, unix.EINVAL) {
		t.Errorf("double Free = %v, want EINVAL", err)
	}
	st := a.Stats()
	want := IOVAStats{FreeBytes: 0x5000, UsedBytes: 0x6000, Allocations: 3, FreeSpans: 3}
	if st != want {
		t.Errorf("Stats = %+v, want %+v", st, want)
	}
	for _, f := range [][2]uint64{{0x10000, 1}, {0x11000, 0x1000}, {0x21000, 0x4000}} {
		if err := a.Free(f[0], f[1]); err != nil {
			t.Fatal(err)
		}
	}
	if st := a.Stats(); st != (IOVAStats{FreeBytes: 0xb000, FreeSpans: 2}) {
		t.Errorf("Stats after freeing all = %+v: not coalesced", st)
	}
}

func TestIOVAReserve(t *testing.T) {
	a := mustIOVA(t, []IOVARange{{0x10000, 0x1ffff}})
	if err := a.Reserve(0x14000, 0x2000); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		iova, size uint64
		errno      error
	}{
		{0x15000, 0x1000, unix.EBUSY},
		{0x13000, 0x2000, unix.EBUSY},
		{0x1f000, 0x2000, unix.EINVAL}, // runs past the range
		{0x8000, 0x1000, unix.EINVAL},
		{0x14800, 0x1000, unix.EINVAL},
		{0x14000, 0, unix.EINVAL},
		{math.MaxUint64 &^ (pg - 1), 2 * pg, unix.EINVAL},
	} {
		if err := a.Reserve(tc.iova, tc.size); !errors.Is(err, tc.errno) {
			t.Errorf("Reserve(%#x, %#x) = %v, want %v", tc.iova, tc.size, err, tc.errno)
		}
	}
	got, err := a.Alloc(0x5000)
	if err != nil || got != 0x16000 {
		t.Fatalf("Alloc(0x5000) around a reservation = %#x, %v; want 0x16000", got, err)
	}
	if err := a.Free(0x14000, 0x2000); err != nil {
		t.Fatal(err)
	}
	if err := a.Free(0x16000, 0x5000); err != nil {
		t.Fatal(err)
	}
	if st := a.Stats(); st.FreeSpans != 1 || st.FreeBytes != 0x10000 {
		t.Fatalf("Stats = %+v, want one 64 KiB span", st)
	}
}

func TestIOVAWholeSpace(t *testing.T) {
	a := mustIOVA(t, []IOVARange{{0, math.MaxUint64}})
	if st := a.Stats(); st.FreeBytes != math.MaxUint64 {
		t.Fatalf("FreeBytes of the whole space = %#x", st.FreeBytes)
	}
	top := uint64(math.MaxUint64) &^ (pg - 1)
	if err := a.Reserve(top, pg); err != nil {
		t.Fatalf("Reserve of the top page: %v", err)
	}
	if iova, err := a.Alloc(1 << 40); err != nil || iova != 0 {
		t.Fatalf("Alloc = %#x, %v", iova, err)
	}
	if err := a.Free(top, pg); err != nil {
		t.Fatal(err)
	}
}

// iovaModel is a page bitmap over a small space: first fit by brute force.
type iovaModel struct {
	allowed, used []bool
	allocs        map[int]int
}

func (m *iovaModel) alloc(n int) (int, bool) {
	for p := 0; p+n <= len(m.allowed); p++ {
		ok := true
		for q := p; q < p+n; q++ {
			if !m.allowed[q] || m.used[q] {
				ok = false
				break
			}
		}
		if ok {
			for q := p; q < p+n; q++ {
				m.used[q] = true
			}
			m.allocs[p] = n
			return p, true
		}
	}
	return 0, false
}

func (m *iovaModel) free(p, n int) bool {
	if m.allocs[p] != n || n == 0 {
		return false
	}
	delete(m.allocs, p)
	for q := p; q < p+n; q++ {
		m.used[q] = false
	}
	return true
}

// runIOVAOps drives an IOVAAllocator and the model with ops encoded as
// bytes over a space of 64 pages whose allowed pages come from mask.
func runIOVAOps(t *testing.T, mask uint64, ops []byte) {
	const space = 64
	m := &iovaModel{allowed: make([]bool, space), used: make([]bool, space), allocs: map[int]int{}}
	var ranges []IOVARange
	for p := 0; p < space; p++ {
		if mask&(1<<p) != 0 {
			m.allowed[p] = true
			ranges = append(ranges, IOVARange{uint64(p) * pg, uint64(p)*pg + pg - 1})
		}
	}
	a, err := NewIOVAAllocator(ranges, pg)
	if len(ranges) == 0 {
		if !errors.Is(err, unix.EINVAL) {
			t.Fatalf("no ranges: %v", err)
		}
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	var held [][2]int
	for i := 0; i+1 < len(ops); i += 2 {
		op, arg := ops[i]%3, int(ops[i+1])
		switch op {
		case 0: // alloc
			n := 1 + arg%12
			want, ok := m.alloc(n)
			got, err := a.Alloc(uint64(n)*pg - uint64(arg%pg))
			if !ok {
				if !errors.Is(err, unix.ENOSPC) {
					t.Fatalf("op %d: Alloc(%d pages) = %#x, %v; model has no room", i/2, n, got, err)
				}
				break
			}
			if err != nil || got != uint64(want)*pg {
				t.Fatalf("op %d: Alloc(%d pages) = %#x, %v; model %#x", i/2, n, got, err, want*pg)
			}
			held = append(held, [2]int{want, n})
		case 1: // free something held
			if len(held) == 0 {
				break
			}
			j := arg % len(held)
			h := held[j]
			held = slices.Delete(held, j, j+1)
			m.free(h[0], h[1])
			if err := a.Free(uint64(h[0])*pg, uint64(h[1])*pg); err != nil {
				t.Fatalf("op %d: Free: %v", i/2, err)
			}
		case 2: // free anything: must agree with the model
			p, n := arg%space, 1+int(ops[i])%5
			ok := m.free(p, n)
			err := a.Free(uint64(p)*pg, uint64(n)*pg)
			if ok != (err == nil) || (err != nil && !errors.Is(err, unix.EINVAL)) {
				t.Fatalf("op %d: Free(page %d, %d) = %v, model ok=%v", i/2, p, n, err, ok)
			}
			if ok {
				held = slices.DeleteFunc(held, func(h [2]int) bool { return h[0] == p })
			}
		}
		// Free spans sorted, disjoint, not adjacent, and matching the model.
		a.mu.Lock()
		free := slices.Clone(a.free)
		a.mu.Unlock()
		var modelFree uint64
		for p := range space {
			if m.allowed[p] && !m.used[p] {
				modelFree++
			}
		}
		var got uint64
		for k, s := range free {
			if k > 0 && s.first <= free[k-1].last+1 {
				t.Fatalf("op %d: free spans %v overlap or touch", i/2, free)
			}
			for p := s.first; p <= s.last; p++ {
				if !m.allowed[p] || m.used[p] {
					t.Fatalf("op %d: page %d free in the allocator but not in the model", i/2, p)
				}
			}
			got += s.pages()
		}
		if got != modelFree {
			t.Fatalf("op %d: %d free pages, model %d", i/2, got, modelFree)
		}
	}
	for _, h := range held {
		if err := a.Free(uint64(h[0])*pg, uint64(h[1])*pg); err != nil {
			t.Fatal(err)
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if !slices.Equal(a.free, a.ranges) {
		t.Fatalf("after freeing all: free %v, ranges %v", a.free, a.ranges)
	}
}

func TestIOVAProperty(t *testing.T) {
	for seed := range uint64(100) {
		r := rand.New(rand.NewPCG(seed, 7))
		mask := r.Uint64() | r.Uint64() // mostly allowed, with holes
		ops := make([]byte, 600)
		for i := range ops {
			ops[i] = byte(r.UintN(256))
		}
		runIOVAOps(t, mask, ops)
	}
}

func FuzzIOVA(f *testing.F) {
	f.Add(uint64(math.MaxUint64), []byte{0, 3, 0, 5, 1, 0, 0, 1, 2, 0})
	f.Add(uint64(0xf0f0f0f0f0f0f0f0), []byte{0, 4, 0, 4, 0, 4, 1, 1, 0, 9})
	f.Add(uint64(1), []byte{0, 0, 0, 0, 2, 0, 1, 0})
	f.Fuzz(runIOVAOps)
}

func BenchmarkIOVAAllocFree(b *testing.B) {
	a, err := NewIOVAAllocator([]IOVARange{{0, 1<<40 - 1}}, pg)
	if err != nil {
		b.Fatal(err)
	}
	// Some fragmentation in front.
	for i := range 64 {
		iova, _ := a.Alloc(pg)
		if i%2 == 0 {
			_ = a.Free(iova, pg)
		}
	}
	for b.Loop() {
		iova, err := a.Alloc(16 * pg)
		if err != nil {
			b.Fatal(err)
		}
		if err := a.Free(iova, 16*pg); err != nil {
			b.Fatal(err)
		}
	}
}
