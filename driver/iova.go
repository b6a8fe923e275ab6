package driver

import (
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/dma"
	"github.com/gohfi/gohfi/vfio"
)

// The device address space the driver hands out (dma.IOVAAllocator: page
// aligned, first fit, coalescing) is the IOVA ranges the device reports
// (vfio.Device.IOVARanges: behind kernel VFIO those of its IOMMU, which
// leave out reserved windows such as x86's MSI range), within the driver's
// own window: above the first 1 MiB, so that a zero or small IOVA in a
// descriptor is always a fault, never memory, and below 2^47, the top of
// the user address space the driver's own checks assume.
const (
	iovaBase  = 1 << 20
	iovaLimit = 1 << 47
	pageSize  = 4096
)

// iovaSpace adapts dma.IOVAAllocator to the driver's calls.
type iovaSpace struct{ a *dma.IOVAAllocator }

// newIOVASpace returns the IOVA space inside the device's ranges; an error
// wrapping ENOSPC when they leave nothing of the driver's window.
func newIOVASpace(device []vfio.IOVARange) (*iovaSpace, error) {
	var ranges []dma.IOVARange
	for _, r := range device {
		start, end := max(r.Start, iovaBase), min(r.End, iovaLimit-1)
		if start <= end {
			ranges = append(ranges, dma.IOVARange{Start: start, End: end})
		}
	}
	a, err := dma.NewIOVAAllocator(ranges, pageSize)
	if err != nil {
		return nil, fmt.Errorf("IOVA ranges %v within [%#x, %#x): %w: %w", device, iovaBase, uint64(iovaLimit), unix.ENOSPC, err)
	}
	return &iovaSpace{a: a}, nil
}

func (s *iovaSpace) alloc(size uint64) (uint64, error) { return s.a.Alloc(size) }

// release returns a range from alloc. Its error can only mean a driver bug
// (a size or address that was never handed out); the range is then lost,
// which is safe: it is never handed out twice. (Linux's free_iova likewise
// ignores a range it does not know.)
func (s *iovaSpace) release(iova, size uint64) {
	_ = s.a.Free(iova, size) // see above
}
