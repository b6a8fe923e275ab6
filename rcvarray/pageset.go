package rcvarray

import "math/bits"

// PageSet is a run of pages one RcvArray entry covers: Count pages (a power
// of two) starting at page Index of the buffer (struct tid_pageset).
type PageSet struct {
	Index int
	Count int
}

// SplitPages returns the page-set lengths that cover a physically contiguous
// run of npages pages: powers of two, each at most maxPages rounded down to a
// power of two, largest first. This is the inner loop of hfi1's
// find_phys_blocks: 600 pages with maxPages 512 give 512, 64, 16, 8.
// It returns nil when npages < 1 or maxPages < 1.
func SplitPages(npages int, maxPages int) []int {
	if npages < 1 || maxPages < 1 {
		return nil
	}
	maxPages = rounddownPow2(maxPages)
	sets := make([]int, 0, npages/maxPages+bits.Len(uint(maxPages)))
	for npages > 0 {
		n := min(rounddownPow2(npages), maxPages)
		sets = append(sets, n)
		npages -= n
	}
	return sets
}

// FindPhysBlocks splits a buffer whose pages sit at the given page frame
// numbers (or IOVA page numbers) into page sets: runs of consecutive frames,
// each cut by SplitPages. It returns nil for an empty buffer or maxPages < 1.
func FindPhysBlocks(pfns []uint64, maxPages int) []PageSet {
	if len(pfns) == 0 || maxPages < 1 {
		return nil
	}
	var sets []PageSet
	start := 0
	for i := 1; i <= len(pfns); i++ {
		if i < len(pfns) && pfns[i] == pfns[i-1]+1 {
			continue
		}
		idx := start
		for _, n := range SplitPages(i-start, maxPages) {
			sets = append(sets, PageSet{Index: idx, Count: n})
			idx += n
		}
		start = i
	}
	return sets
}

// rounddownPow2 returns the largest power of two <= n, for n >= 1.
func rounddownPow2(n int) int {
	return 1 << (bits.Len(uint(n)) - 1)
}
