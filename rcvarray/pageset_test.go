package rcvarray

import (
	"math/bits"
	"math/rand/v2"
	"slices"
	"testing"
)

func TestSplitPages(t *testing.T) {
	for _, tc := range []struct {
		npages, max int
		want        []int
	}{
		{0, 512, nil},
		{-1, 512, nil},
		{5, 0, nil},
		{1, 512, []int{1}},
		{2, 512, []int{2}},
		{3, 512, []int{2, 1}},
		{7, 512, []int{4, 2, 1}},
		{8, 512, []int{8}},
		{512, 512, []int{512}},
		{513, 512, []int{512, 1}},
		{600, 512, []int{512, 64, 16, 8}},
		{1024, 512, []int{512, 512}},
		{1500, 512, []int{512, 512, 256, 128, 64, 16, 8, 4}},
		{7, 2, []int{2, 2, 2, 1}},
		{7, 3, []int{2, 2, 2, 1}}, // max rounded down to a power of two
		{5, 1, []int{1, 1, 1, 1, 1}},
	} {
		got := SplitPages(tc.npages, tc.max)
		if !slices.Equal(got, tc.want) {
			t.Errorf("SplitPages(%d, %d) = %v, want %v", tc.npages, tc.max, got, tc.want)
		}
	}
}

func TestSplitPagesProperties(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for range 2000 {
		npages := 1 + r.IntN(5000)
		max := 1 + r.IntN(1024)
		pmax := 1 << (bits.Len(uint(max)) - 1)
		sets := SplitPages(npages, max)
		sum := 0
		for i, n := range sets {
			if n <= 0 || n&(n-1) != 0 || n > pmax {
				t.Fatalf("SplitPages(%d, %d): set %d = %d", npages, max, i, n)
			}
			if i > 0 && n > sets[i-1] {
				t.Fatalf("SplitPages(%d, %d) = %v: not largest first", npages, max, sets)
			}
			if i > 0 && n == sets[i-1] && n != pmax {
				t.Fatalf("SplitPages(%d, %d) = %v: repeated size below max", npages, max, sets)
			}
			sum += n
		}
		if sum != npages {
			t.Fatalf("SplitPages(%d, %d) = %v: covers %d", npages, max, sets, sum)
		}
	}
}

func TestFindPhysBlocks(t *testing.T) {
	for _, tc := range []struct {
		name string
		pfns []uint64
		max  int
		want []PageSet
	}{
		{"empty", nil, 512, nil},
		{"one", []uint64{9}, 512, []PageSet{{0, 1}}},
		{"contiguous 3", []uint64{10, 11, 12}, 512, []PageSet{{0, 2}, {2, 1}}},
		{"scattered", []uint64{10, 20, 30}, 512, []PageSet{{0, 1}, {1, 1}, {2, 1}}},
		{"two runs", []uint64{100, 101, 102, 103, 7, 8}, 512, []PageSet{{0, 4}, {4, 2}}},
		{"descending is not contiguous", []uint64{5, 4, 3}, 512, []PageSet{{0, 1}, {1, 1}, {2, 1}}},
		{"capped", []uint64{1, 2, 3, 4, 5}, 2, []PageSet{{0, 2}, {2, 2}, {4, 1}}},
	} {
		got := FindPhysBlocks(tc.pfns, tc.max)
		if !slices.Equal(got, tc.want) {
			t.Errorf("%s: FindPhysBlocks(%v, %d) = %v, want %v", tc.name, tc.pfns, tc.max, got, tc.want)
		}
	}
}

func BenchmarkSplitPages(b *testing.B) {
	for b.Loop() {
		SplitPages(1500, 512)
	}
}
