package driver

import (
	"fmt"

	"github.com/gohfi/gohfi/dma"
)

// The device address space the driver hands out (dma.IOVAAllocator: page
// aligned, first fit, coalescing). It starts above the first 1 MiB so that a
// zero or small IOVA in a descriptor is always a fault, never memory, and
// skips the x86 interrupt window [0xfee00000, 0xfef00000), which an IOMMU
// (intel-iommu in the QEMU guest) reserves for MSI.
const (
	iovaBase      = 1 << 20
	iovaLimit     = 1 << 47
	iovaMSIWindow = 0xfee00000
	iovaMSIEnd    = 0xfef00000
	pageSize      = 4096
)

// iovaSpace adapts dma.IOVAAllocator to the driver's calls.
type iovaSpace struct{ a *dma.IOVAAllocator }

func newIOVASpace() *iovaSpace {
	a, err := dma.NewIOVAAllocator([]dma.IOVARange{
		{Start: iovaBase, End: iovaMSIWindow - 1},
		{Start: iovaMSIEnd, End: iovaLimit - 1},
	}, pageSize)
	if err != nil {
		panic(fmt.Sprintf("gohfi: IOVA ranges: %v", err)) // constant ranges: a programming error
	}
	return &iovaSpace{a: a}
}

func (s *iovaSpace) alloc(size uint64) (uint64, error) { return s.a.Alloc(size) }

// release returns a range from alloc. Its error can only mean a driver bug
// (a size or address that was never handed out); the range is then lost,
// which is safe: it is never handed out twice.
func (s *iovaSpace) release(iova, size uint64) { s.a.Free(iova, size) }
