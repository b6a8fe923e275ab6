package dma

import (
	"fmt"
	"math"
	"slices"
	"sync"

	"golang.org/x/sys/unix"
)

// IOVARange is a range of device addresses the IOMMU accepts, with an
// inclusive end as in struct vfio_iova_range (so the top of the address
// space is expressible).
type IOVARange struct {
	Start, End uint64
}

// span is a run of pages [first, last], in page numbers.
type span struct{ first, last uint64 }

func (s span) pages() uint64 { return s.last - s.first + 1 }

// IOVAAllocator hands out page-aligned device address ranges from a list of
// allowed ranges (the usable IOVA ranges the kernel VFIO backend reports, or
// one large range for vfio-user), first fit, coalescing on free. It is safe
// for concurrent use.
type IOVAAllocator struct {
	pageShift uint
	ranges    []span // allowed, sorted, merged

	mu     sync.Mutex
	free   []span            // sorted, disjoint, never adjacent
	allocs map[uint64]uint64 // first page -> pages
	used   uint64            // pages allocated
}

// IOVAStats is a snapshot of an IOVAAllocator.
type IOVAStats struct {
	FreeBytes, UsedBytes uint64
	Allocations          int
	FreeSpans            int // fragmentation: runs of free pages
}

// NewIOVAAllocator returns an allocator over ranges, shrunk to whole pages
// of pageSize (0 means the system page size; otherwise a power of two of at
// least 4096).
// Overlapping ranges, inverted ranges, or no whole page at all are errors
// wrapping unix.EINVAL; adjacent ranges merge.
func NewIOVAAllocator(ranges []IOVARange, pageSize uint64) (*IOVAAllocator, error) {
	if pageSize == 0 {
		pageSize = uint64(PageSize())
	}
	if pageSize&(pageSize-1) != 0 || pageSize < 4096 {
		return nil, fmt.Errorf("dma: IOVA page size %#x not a power of two >= 4096: %w", pageSize, unix.EINVAL)
	}
	shift := uint(0)
	for 1<<shift != pageSize {
		shift++
	}
	var spans []span
	for _, r := range ranges {
		if r.Start > r.End {
			return nil, fmt.Errorf("dma: IOVA range [%#x, %#x] inverted: %w", r.Start, r.End, unix.EINVAL)
		}
		first := r.Start >> shift
		if r.Start&(pageSize-1) != 0 {
			first++
		}
		last := r.End >> shift
		if r.End&(pageSize-1) != pageSize-1 {
			if last == 0 {
				continue
			}
			last--
		}
		if first > last {
			continue // no whole page
		}
		spans = append(spans, span{first, last})
	}
	slices.SortFunc(spans, func(a, b span) int {
		switch {
		case a.first < b.first:
			return -1
		case a.first > b.first:
			return 1
		}
		return 0
	})
	var merged []span
	for _, s := range spans {
		if n := len(merged); n > 0 {
			prev := &merged[n-1]
			if s.first <= prev.last {
				return nil, fmt.Errorf("dma: IOVA ranges overlap at page %#x: %w", s.first<<shift, unix.EINVAL)
			}
			if s.first == prev.last+1 {
				prev.last = s.last
				continue
			}
		}
		merged = append(merged, s)
	}
	if len(merged) == 0 {
		return nil, fmt.Errorf("dma: no whole %#x-byte page in the IOVA ranges: %w", pageSize, unix.EINVAL)
	}
	return &IOVAAllocator{
		pageShift: shift,
		ranges:    merged,
		free:      slices.Clone(merged),
		allocs:    map[uint64]uint64{},
	}, nil
}

// PageSize returns the allocation granule.
func (a *IOVAAllocator) PageSize() uint64 { return 1 << a.pageShift }

// Ranges returns the usable ranges, page-aligned and merged.
func (a *IOVAAllocator) Ranges() []IOVARange {
	out := make([]IOVARange, len(a.ranges))
	for i, s := range a.ranges {
		out[i] = a.toRange(s)
	}
	return out
}

func (a *IOVAAllocator) toRange(s span) IOVARange {
	return IOVARange{Start: s.first << a.pageShift, End: s.last<<a.pageShift | (1<<a.pageShift - 1)}
}

// npages converts a byte size to pages, rounding up; 0 for size 0.
func (a *IOVAAllocator) npages(size uint64) uint64 {
	n := size >> a.pageShift
	if size&(1<<a.pageShift-1) != 0 {
		n++
	}
	return n
}

// Alloc returns the lowest IOVA at which size bytes (rounded up to whole
// pages) are free inside one allowed range. size 0 is an error wrapping
// unix.EINVAL; no room is an error wrapping unix.ENOSPC.
func (a *IOVAAllocator) Alloc(size uint64) (uint64, error) {
	n := a.npages(size)
	if n == 0 {
		return 0, fmt.Errorf("dma: IOVA alloc of 0 bytes: %w", unix.EINVAL)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	for i, s := range a.free {
		if s.pages() < n {
			continue
		}
		first := s.first
		if s.pages() == n {
			a.free = slices.Delete(a.free, i, i+1)
		} else {
			a.free[i].first += n
		}
		a.allocs[first] = n
		a.used += n
		return first << a.pageShift, nil
	}
	return 0, fmt.Errorf("dma: IOVA alloc of %#x bytes: no free run of %d pages: %w", size, n, unix.ENOSPC)
}

// Reserve marks [iova, iova+size) used, for mappings at fixed addresses.
// iova must be page-aligned (EINVAL); the range must lie in an allowed range
// (EINVAL) and be entirely free (EBUSY). Free it like an allocation.
func (a *IOVAAllocator) Reserve(iova, size uint64) error {
	n := a.npages(size)
	if n == 0 || iova&(1<<a.pageShift-1) != 0 {
		return fmt.Errorf("dma: IOVA reserve [%#x, +%#x): unaligned or empty: %w", iova, size, unix.EINVAL)
	}
	first := iova >> a.pageShift
	if first+n-1 < first {
		return fmt.Errorf("dma: IOVA reserve [%#x, +%#x): wraps: %w", iova, size, unix.EINVAL)
	}
	want := span{first, first + n - 1}
	a.mu.Lock()
	defer a.mu.Unlock()
	if !slices.ContainsFunc(a.ranges, func(s span) bool { return s.first <= want.first && want.last <= s.last }) {
		return fmt.Errorf("dma: IOVA reserve [%#x, +%#x): outside the usable ranges: %w", iova, size, unix.EINVAL)
	}
	i := slices.IndexFunc(a.free, func(s span) bool { return s.first <= want.first && want.last <= s.last })
	if i < 0 {
		return fmt.Errorf("dma: IOVA reserve [%#x, +%#x): in use: %w", iova, size, unix.EBUSY)
	}
	s := a.free[i]
	var parts []span
	if s.first < want.first {
		parts = append(parts, span{s.first, want.first - 1})
	}
	if want.last < s.last {
		parts = append(parts, span{want.last + 1, s.last})
	}
	a.free = slices.Replace(a.free, i, i+1, parts...)
	a.allocs[first] = n
	a.used += n
	return nil
}

// Free returns the range [iova, iova+size) given out by Alloc or Reserve.
// It must match that call exactly (start and rounded size): anything else,
// including a double free, is an error wrapping unix.EINVAL and changes
// nothing.
func (a *IOVAAllocator) Free(iova, size uint64) error {
	n := a.npages(size)
	first := iova >> a.pageShift
	a.mu.Lock()
	defer a.mu.Unlock()
	got, ok := a.allocs[first]
	if !ok || iova&(1<<a.pageShift-1) != 0 || got != n {
		return fmt.Errorf("dma: IOVA free [%#x, +%#x): not an allocation: %w", iova, size, unix.EINVAL)
	}
	delete(a.allocs, first)
	a.used -= n
	s := span{first, first + n - 1}
	i, _ := slices.BinarySearchFunc(a.free, s.first, func(f span, first uint64) int {
		switch {
		case f.first < first:
			return -1
		case f.first > first:
			return 1
		}
		return 0
	})
	// Coalesce with the neighbours: a.free[i-1] ends before s, a.free[i]
	// starts after it.
	joinPrev := i > 0 && a.free[i-1].last+1 == s.first
	joinNext := i < len(a.free) && s.last+1 == a.free[i].first
	switch {
	case joinPrev && joinNext:
		a.free[i-1].last = a.free[i].last
		a.free = slices.Delete(a.free, i, i+1)
	case joinPrev:
		a.free[i-1].last = s.last
	case joinNext:
		a.free[i].first = s.first
	default:
		a.free = slices.Insert(a.free, i, s)
	}
	return nil
}

// Stats returns the allocator's counters.
func (a *IOVAAllocator) Stats() IOVAStats {
	a.mu.Lock()
	defer a.mu.Unlock()
	var free uint64
	for _, s := range a.free {
		free += s.pages()
	}
	return IOVAStats{
		FreeBytes:   satShift(free, a.pageShift),
		UsedBytes:   satShift(a.used, a.pageShift),
		Allocations: len(a.allocs),
		FreeSpans:   len(a.free),
	}
}

// satShift is n << s, saturating at MaxUint64 (a full 64-bit space has 2^64
// bytes).
func satShift(n uint64, s uint) uint64 {
	if n > math.MaxUint64>>s {
		return math.MaxUint64
	}
	return n << s
}
