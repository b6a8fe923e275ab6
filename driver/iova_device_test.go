package driver_test

import (
	"errors"
	"os"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/vfio"
)

// narrowIOVA is a device whose IOMMU accepts only the given IOVA ranges: it
// reports them, refuses a mapping outside them as kernel VFIO does, and
// records every mapping made.
type narrowIOVA struct {
	vfio.Device
	ranges []vfio.IOVARange

	mu   sync.Mutex
	maps []vfio.DMAMapping
}

func (n *narrowIOVA) IOVARanges() []vfio.IOVARange { return n.ranges }

func (n *narrowIOVA) inside(iova, size uint64) bool {
	for _, r := range n.ranges {
		if iova >= r.Start && size > 0 && iova+size-1 <= r.End && iova+size-1 >= iova {
			return true
		}
	}
	return false
}

func (n *narrowIOVA) DMAMap(m vfio.DMAMapping) error {
	n.mu.Lock()
	n.maps = append(n.maps, m)
	n.mu.Unlock()
	if !n.inside(m.IOVA, m.Size) {
		return unix.EINVAL
	}
	return n.Device.DMAMap(m)
}

// openNarrow probes an embedded hfisim behind a narrowIOVA device.
func openNarrow(t *testing.T, ranges []vfio.IOVARange) (*narrowIOVA, *attach.Attached, error) {
	t.Helper()
	nd := &narrowIOVA{ranges: ranges}
	o := attach.DefaultOptions()
	o.Params.HonorCapIPCLock = true
	a, err := openBehind(t, o, smallSim(2), func(d vfio.Device) vfio.Device {
		nd.Device = d
		return nd
	})
	return nd, a, err
}

// TestIOVAsInsideDeviceRanges: the driver hands the device only IOVAs
// inside the ranges the device reports (and inside its own window above
// 1 MiB), for the context rings and for TID buffers.
func TestIOVAsInsideDeviceRanges(t *testing.T) {
	low := vfio.IOVARange{Start: 0x1000, End: 0xfffff}                 // below the driver's window: unused
	narrow := vfio.IOVARange{Start: 0x1_2340_0000, End: 0x1_243f_ffff} // 1 MiB
	nd, a, err := openNarrow(t, []vfio.IOVARange{low, narrow})
	if err != nil {
		t.Fatal(err)
	}
	f := openFile(t, a)
	assign(t, f)
	if os.Geteuid() == 0 { // TID_UPDATE pins with io_uring: root only (see requireRoot)
		buf := allocBuf(t, 256<<10, false)
		tids, _, err := tidUpdate(f, buf.Addr(), 256<<10)
		if err != nil {
			t.Fatalf("TID_UPDATE: %v", err)
		}
		if _, err := tidFree(f, tids); err != nil {
			t.Fatalf("TID_FREE: %v", err)
		}
	}
	nd.mu.Lock()
	defer nd.mu.Unlock()
	if len(nd.maps) == 0 {
		t.Fatal("the driver made no DMA mappings")
	}
	for _, m := range nd.maps {
		if m.IOVA < narrow.Start || m.IOVA+m.Size-1 > narrow.End {
			t.Errorf("mapping [%#x, +%#x) outside %v", m.IOVA, m.Size, narrow)
		}
	}
	t.Logf("%d mappings, all inside %v", len(nd.maps), narrow)
}

// TestIOVARangesLeaveNothing: a device whose ranges leave nothing of the
// driver's window fails probe with ENOSPC.
func TestIOVARangesLeaveNothing(t *testing.T) {
	_, _, err := openNarrow(t, []vfio.IOVARange{{Start: 0, End: 0xfffff}})
	if !errors.Is(err, unix.ENOSPC) {
		t.Fatalf("probe = %v, want ENOSPC", err)
	}
}
