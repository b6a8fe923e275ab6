package driver

import (
	"fmt"
	"sort"
	"sync"

	"golang.org/x/sys/unix"
)

// iovaSpace hands out device addresses for DMA mappings: page-aligned,
// first fit, coalescing on free. It starts above the first 1 MiB so that a
// zero or small IOVA in a descriptor is always a fault, never memory, and
// skips the x86 interrupt window [0xfee00000, 0xfef00000), which an IOMMU
// (intel-iommu in the QEMU guest) reserves for MSI.
type iovaSpace struct {
	mu    sync.Mutex
	holes []iovaRange // sorted, disjoint, non-adjacent
}

type iovaRange struct{ start, end uint64 } // [start, end)

const (
	iovaBase      = 1 << 20
	iovaLimit     = 1 << 47
	iovaMSIWindow = 0xfee00000
	iovaMSIEnd    = 0xfef00000
	pageSize      = 4096
)

func newIOVASpace() *iovaSpace {
	return &iovaSpace{holes: []iovaRange{{iovaBase, iovaMSIWindow}, {iovaMSIEnd, iovaLimit}}}
}

func (s *iovaSpace) alloc(size uint64) (uint64, error) {
	size = (size + pageSize - 1) &^ (pageSize - 1)
	if size == 0 {
		return 0, fmt.Errorf("IOVA alloc of 0 bytes: %w", unix.EINVAL)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, r := range s.holes {
		if r.end-r.start >= size {
			s.holes[i].start += size
			if s.holes[i].start == r.end {
				s.holes = append(s.holes[:i], s.holes[i+1:]...)
			}
			return r.start, nil
		}
	}
	return 0, fmt.Errorf("IOVA space exhausted for %d bytes: %w", size, unix.ENOSPC)
}

func (s *iovaSpace) release(iova, size uint64) {
	size = (size + pageSize - 1) &^ (pageSize - 1)
	s.mu.Lock()
	defer s.mu.Unlock()
	i := sort.Search(len(s.holes), func(i int) bool { return s.holes[i].start > iova })
	r := iovaRange{iova, iova + size}
	if i > 0 && s.holes[i-1].end == r.start {
		i--
		r.start = s.holes[i].start
		s.holes = append(s.holes[:i], s.holes[i+1:]...)
	}
	if i < len(s.holes) && s.holes[i].start == r.end {
		r.end = s.holes[i].end
		s.holes = append(s.holes[:i], s.holes[i+1:]...)
	}
	s.holes = append(s.holes, iovaRange{})
	copy(s.holes[i+1:], s.holes[i:])
	s.holes[i] = r
}
