package rcvarray

import (
	"errors"
	"math/rand/v2"
	"slices"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/chip"
)

func mustNew(t testing.TB, base, count int) *Allocator {
	t.Helper()
	a, err := New(base, count)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func seq(from, n int) []int {
	s := make([]int, n)
	for i := range s {
		s[i] = from + i
	}
	return s
}

func TestNewInvalid(t *testing.T) {
	for _, tc := range [][2]int{{0, 0}, {0, 7}, {0, 12}, {-8, 8}, {0, -8}} {
		if _, err := New(tc[0], tc[1]); !errors.Is(err, unix.EINVAL) {
			t.Errorf("New(%d, %d) = %v, want EINVAL", tc[0], tc[1], err)
		}
	}
}

// TestAllocOrder walks one sequence step by step and checks the exact
// entries and lists after each step against hfi1's rules.
func TestAllocOrder(t *testing.T) {
	const base = 1000
	a := mustNew(t, base, 32) // groups at 1000, 1008, 1016, 1024
	type step struct {
		op    string // "alloc" or "free"
		n     int    // alloc count or entry to free
		want  []int  // entries for alloc
		stats Stats
	}
	steps := []step{
		// 3 < 8: a new group goes to the partial list.
		{"alloc", 3, seq(1000, 3), Stats{Free: 29, Used: 3, EmptyGroups: 3, PartialGroups: 1}},
		// 10: one whole empty group first, then the partial group.
		{"alloc", 10, append(seq(1008, 8), 1003, 1004), Stats{Free: 19, Used: 13, EmptyGroups: 2, PartialGroups: 1, FullGroups: 1}},
		// 4: fills group 0 (3 left) then starts group 2 with 1.
		{"alloc", 4, []int{1005, 1006, 1007, 1016}, Stats{Free: 15, Used: 17, EmptyGroups: 1, PartialGroups: 1, FullGroups: 2}},
		// Freeing from a full group moves it to the tail of the partial list.
		{"free", 1009, nil, Stats{Free: 16, Used: 16, EmptyGroups: 1, PartialGroups: 2, FullGroups: 1}},
		// 8 with one empty group: that group whole, nothing else.
		{"alloc", 8, seq(1024, 8), Stats{Free: 8, Used: 24, EmptyGroups: 0, PartialGroups: 2, FullGroups: 2}},
		// Partial groups in list order: group 2 (7 free) before group 1.
		{"alloc", 8, append(seq(1017, 7), 1009), Stats{Free: 0, Used: 32, FullGroups: 4}},
	}
	for i, s := range steps {
		switch s.op {
		case "alloc":
			got, err := a.Alloc(s.n)
			if err != nil || !slices.Equal(got, s.want) {
				t.Fatalf("step %d: Alloc(%d) = %v, %v; want %v", i, s.n, got, err, s.want)
			}
		case "free":
			if err := a.Free(s.n); err != nil {
				t.Fatalf("step %d: Free(%d): %v", i, s.n, err)
			}
		}
		if st := a.Stats(); st != s.stats {
			t.Fatalf("step %d: Stats = %+v, want %+v", i, st, s.stats)
		}
		if err := a.check(); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
	}
	if _, err := a.Alloc(1); !errors.Is(err, unix.ENOSPC) {
		t.Fatalf("Alloc on a full context = %v, want ENOSPC", err)
	}
}

func TestAllocPartialSuccess(t *testing.T) {
	a := mustNew(t, 0, 16)
	if got, err := a.Alloc(13); err != nil || len(got) != 13 {
		t.Fatalf("Alloc(13) = %v, %v", got, err)
	}
	got, err := a.Alloc(8)
	if err != nil || !slices.Equal(got, []int{13, 14, 15}) {
		t.Fatalf("Alloc(8) with 3 free = %v, %v; want [13 14 15], nil", got, err)
	}
	if _, err := a.Alloc(1); !errors.Is(err, unix.ENOSPC) {
		t.Fatalf("Alloc(1) with 0 free = %v, want ENOSPC", err)
	}
	for _, n := range []int{0, -1, 17} {
		if _, err := a.Alloc(n); !errors.Is(err, unix.EINVAL) {
			t.Errorf("Alloc(%d) = %v, want EINVAL", n, err)
		}
	}
}

func TestFreeInvalid(t *testing.T) {
	a := mustNew(t, 64, 16)
	if _, err := a.Alloc(5); err != nil {
		t.Fatal(err)
	}
	for _, e := range []int{63, 80, -1, 69, 75} {
		if err := a.Free(e); !errors.Is(err, unix.EINVAL) {
			t.Errorf("Free(%d) = %v, want EINVAL", e, err)
		}
	}
	if err := a.Free(66); err != nil {
		t.Fatal(err)
	}
	if err := a.Free(66); !errors.Is(err, unix.EINVAL) {
		t.Errorf("double Free(66) = %v, want EINVAL", err)
	}
	if st := a.Stats(); st != (Stats{Free: 12, Used: 4, EmptyGroups: 1, PartialGroups: 1}) {
		t.Errorf("Stats after double free = %+v", st)
	}
	if err := a.check(); err != nil {
		t.Fatal(err)
	}
	// The freed entry is the first handed out again.
	if got, err := a.Alloc(1); err != nil || !slices.Equal(got, []int{66}) {
		t.Errorf("Alloc(1) = %v, %v; want [66]", got, err)
	}
}

func TestFreeGroupMoves(t *testing.T) {
	a := mustNew(t, 0, 16)
	if _, err := a.Alloc(16); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 8; i++ {
		if err := a.Free(i); err != nil {
			t.Fatal(err)
		}
		want := Stats{Free: i + 1, Used: 15 - i, PartialGroups: 1, FullGroups: 1}
		if i == 7 {
			want = Stats{Free: 8, Used: 8, EmptyGroups: 1, FullGroups: 1}
		}
		if st := a.Stats(); st != want {
			t.Fatalf("after freeing %d: %+v, want %+v", i, st, want)
		}
	}
	a.Reset()
	if st := a.Stats(); st != (Stats{Free: 16, EmptyGroups: 2}) {
		t.Fatalf("after Reset: %+v", st)
	}
	if a.InUse(8) {
		t.Fatal("entry 8 in use after Reset")
	}
	if got, _ := a.Alloc(16); !slices.Equal(got, seq(0, 16)) {
		t.Fatalf("Alloc(16) after Reset = %v", got)
	}
}

func TestTIDEntry(t *testing.T) {
	a := mustNew(t, 256, 64)
	for _, e := range []int{256, 257, 300, 319} {
		tid := a.TID(e, 16)
		got, np, err := a.TIDEntry(tid)
		if err != nil || got != e || np != 16 {
			t.Errorf("TIDEntry(TID(%d)) = %d, %d, %v", e, got, np, err)
		}
	}
	if _, _, err := a.TIDEntry(EncodeTID(64, 1)); !errors.Is(err, unix.EINVAL) {
		t.Errorf("TIDEntry beyond count = %v, want EINVAL", err)
	}
}

// model is a deliberately simple second implementation of hfi1's allocation
// order, with slices for lists and a map for the entries in use.
type model struct {
	base, count int
	used        []int // per group
	inUse       map[int]bool
	lists       [numLists][]int
}

func newModel(base, count int) *model {
	m := &model{base: base, count: count, used: make([]int, count/chip.RcvArrayGroupSize), inUse: map[int]bool{}}
	for g := range m.used {
		m.lists[listEmpty] = append(m.lists[listEmpty], g)
	}
	return m
}

func (m *model) moveTo(g, from, to int) {
	i := slices.Index(m.lists[from], g)
	m.lists[from] = slices.Delete(m.lists[from], i, i+1)
	m.lists[to] = append(m.lists[to], g)
}

func (m *model) takeFrom(g, max int) []int {
	var out []int
	for i := 0; i < chip.RcvArrayGroupSize && len(out) < max; i++ {
		e := m.base + g*chip.RcvArrayGroupSize + i
		if !m.inUse[e] {
			m.inUse[e] = true
			out = append(out, e)
		}
	}
	m.used[g] += len(out)
	return out
}

func (m *model) alloc(n int) []int {
	var out []int
	for n-len(out) >= chip.RcvArrayGroupSize && len(m.lists[listEmpty]) > 0 {
		g := m.lists[listEmpty][0]
		out = append(out, m.takeFrom(g, chip.RcvArrayGroupSize)...)
		m.moveTo(g, listEmpty, listFull)
	}
	for len(out) < n {
		if len(m.lists[listPartial]) == 0 {
			if len(m.lists[listEmpty]) == 0 {
				break
			}
			m.moveTo(m.lists[listEmpty][0], listEmpty, listPartial)
		}
		for _, g := range slices.Clone(m.lists[listPartial]) {
			if len(out) == n {
				break
			}
			out = append(out, m.takeFrom(g, n-len(out))...)
			if m.used[g] == chip.RcvArrayGroupSize {
				m.moveTo(g, listPartial, listFull)
			}
		}
	}
	return out
}

func (m *model) free(e int) bool {
	if !m.inUse[e] {
		return false
	}
	delete(m.inUse, e)
	g := (e - m.base) / chip.RcvArrayGroupSize
	m.used[g]--
	switch m.used[g] {
	case chip.RcvArrayGroupSize - 1:
		m.moveTo(g, listFull, listPartial)
	case 0:
		m.moveTo(g, listPartial, listEmpty)
	}
	return true
}

// checkAgainst compares a with the model: same lists in the same order, same
// entries in use.
func (m *model) checkAgainst(a *Allocator) error {
	if err := a.check(); err != nil {
		return err
	}
	for l := range a.lists {
		var got []int
		for g := a.lists[l].head; g >= 0; g = a.groups[g].next {
			got = append(got, int(g))
		}
		if !slices.Equal(got, m.lists[l]) {
			return errors.New(listNames[l] + " list differs from the model")
		}
	}
	for e := m.base; e < m.base+m.count; e++ {
		if a.InUse(e) != m.inUse[e] {
			return errors.New("in-use entries differ from the model")
		}
	}
	st := a.Stats()
	if st.Used != len(m.inUse) || st.Free != m.count-len(m.inUse) {
		return errors.New("counters differ from the model")
	}
	return nil
}

// runOps drives an allocator and the model with the same operations, given
// as bytes (so the fuzzer can produce them), and fails on any difference.
func runOps(t *testing.T, base, count int, ops []byte) {
	a := mustNew(t, base, count)
	m := newModel(base, count)
	var held []int
	for i := 0; i+1 < len(ops); i += 2 {
		op, arg := ops[i], int(ops[i+1])
		switch op % 4 {
		case 0, 1: // alloc
			n := arg%count + 1
			want := m.alloc(n)
			got, err := a.Alloc(n)
			if len(want) == 0 {
				if !errors.Is(err, unix.ENOSPC) {
					t.Fatalf("op %d: Alloc(%d) = %v, %v; want ENOSPC", i/2, n, got, err)
				}
				break
			}
			if err != nil || !slices.Equal(got, want) {
				t.Fatalf("op %d: Alloc(%d) = %v, %v; model %v", i/2, n, got, err, want)
			}
			held = append(held, got...)
		case 2: // free a held entry
			if len(held) == 0 {
				break
			}
			j := arg % len(held)
			e := held[j]
			held = slices.Delete(held, j, j+1)
			m.free(e)
			if err := a.Free(e); err != nil {
				t.Fatalf("op %d: Free(%d): %v", i/2, e, err)
			}
		case 3: // free anything, valid or not: must agree with the model
			e := base - 2 + arg%(count+4)
			ok := m.free(e)
			err := a.Free(e)
			if ok != (err == nil) {
				t.Fatalf("op %d: Free(%d) = %v, model ok=%v", i/2, e, err, ok)
			}
			if err != nil && !errors.Is(err, unix.EINVAL) {
				t.Fatalf("op %d: Free(%d) = %v, want EINVAL", i/2, e, err)
			}
			if ok {
				held = slices.DeleteFunc(held, func(x int) bool { return x == e })
			}
		}
		if err := m.checkAgainst(a); err != nil {
			t.Fatalf("op %d (%d,%d): %v", i/2, op, arg, err)
		}
	}
	// No entry was ever handed out twice: held has no duplicates.
	s := slices.Clone(held)
	slices.Sort(s)
	if len(slices.Compact(s)) != len(held) {
		t.Fatal("an entry is held twice")
	}
}

func TestAllocatorProperty(t *testing.T) {
	for seed := range uint64(50) {
		r := rand.New(rand.NewPCG(seed, 99))
		count := chip.RcvArrayGroupSize * (1 + r.IntN(12))
		ops := make([]byte, 2*400)
		for i := range ops {
			ops[i] = byte(r.UintN(256))
		}
		// Bias toward small allocations so the lists stay mixed.
		for i := 1; i < len(ops); i += 2 {
			if r.IntN(4) != 0 {
				ops[i] %= 12
			}
		}
		runOps(t, 16*int(seed), count, ops)
	}
}

func FuzzAllocator(f *testing.F) {
	f.Add(uint8(4), []byte{0, 2, 0, 9, 2, 0, 3, 5, 0, 20, 2, 1, 2, 1})
	f.Add(uint8(1), []byte{0, 7, 0, 0, 3, 2, 3, 2, 0, 3})
	f.Add(uint8(8), []byte{1, 63, 2, 5, 2, 5, 0, 1, 3, 0, 3, 70})
	f.Fuzz(func(t *testing.T, groups uint8, ops []byte) {
		count := chip.RcvArrayGroupSize * (1 + int(groups)%16)
		runOps(t, 8, count, ops)
	})
}

func BenchmarkAllocFree(b *testing.B) {
	for _, n := range []int{1, 4, 8, 32} {
		b.Run("n="+strconv.Itoa(n), func(b *testing.B) {
			a := mustNew(b, 0, 2048)
			for b.Loop() {
				es, err := a.Alloc(n)
				if err != nil {
					b.Fatal(err)
				}
				for _, e := range es {
					if err := a.Free(e); err != nil {
						b.Fatal(err)
					}
				}
			}
		})
	}
}

// BenchmarkAllocFreeFragmented measures single-entry churn in a context that
// is half full with every group partially used.
func BenchmarkAllocFreeFragmented(b *testing.B) {
	a := mustNew(b, 0, 2048)
	for g := 0; g < 256; g++ {
		es, _ := a.Alloc(8)
		for _, e := range es[:4] {
			_ = a.Free(e)
		}
	}
	for b.Loop() {
		es, err := a.Alloc(1)
		if err != nil {
			b.Fatal(err)
		}
		_ = a.Free(es[0])
	}
}
