package driver

import (
	"errors"
	"math"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/vfio"
)

// TestIOVASpaceFollowsDevice: the space is the device's ranges within the
// driver's window; a hole the device reports (the x86 MSI window, as the
// kernel's type1 IOMMU leaves it out) is skipped.
func TestIOVASpaceFollowsDevice(t *testing.T) {
	const msi, msiEnd = 0xfee00000, 0xfef00000
	s, err := newIOVASpace([]vfio.IOVARange{{Start: 0, End: msi - 1}, {Start: msiEnd, End: math.MaxUint64}})
	if err != nil {
		t.Fatal(err)
	}
	low, err := s.alloc(msi - iovaBase - pageSize)
	if err != nil || low != iovaBase {
		t.Fatalf("first allocation %#x %v: want the driver's base %#x", low, err, iovaBase)
	}
	a, _ := s.alloc(pageSize) // the last page below the hole
	b, _ := s.alloc(2 * pageSize)
	if a != msi-pageSize || b != msiEnd {
		t.Fatalf("allocations %#x, %#x: want %#x and %#x (hole skipped)", a, b, uint64(msi-pageSize), uint64(msiEnd))
	}
	s.release(a, pageSize)
	s.release(low, msi-iovaBase-pageSize)
	if c, _ := s.alloc(msi - iovaBase); c != iovaBase {
		t.Fatalf("freed ranges did not coalesce: %#x", c)
	}
	// Nothing above the driver's limit, whatever the device allows.
	if _, err := s.alloc(iovaLimit); err == nil {
		t.Fatal("allocated past the driver's window")
	}
}

func TestIOVASpaceNarrowAndEmpty(t *testing.T) {
	r := vfio.IOVARange{Start: 0x40000000, End: 0x40003fff}
	s, err := newIOVASpace([]vfio.IOVARange{r})
	if err != nil {
		t.Fatal(err)
	}
	for range 4 {
		iova, err := s.alloc(pageSize)
		if err != nil || iova < r.Start || iova+pageSize-1 > r.End {
			t.Fatalf("allocation %#x %v outside %v", iova, err, r)
		}
	}
	if _, err := s.alloc(pageSize); err == nil {
		t.Fatal("allocated past the device's range")
	}
	for _, ranges := range [][]vfio.IOVARange{nil, {{Start: 0, End: iovaBase - 1}}, {{Start: iovaLimit, End: math.MaxUint64}}} {
		if _, err := newIOVASpace(ranges); !errors.Is(err, unix.ENOSPC) {
			t.Errorf("newIOVASpace(%v) = %v, want ENOSPC", ranges, err)
		}
	}
}
