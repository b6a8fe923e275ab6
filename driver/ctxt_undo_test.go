package driver_test

import (
	"errors"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/vfio"
)

// failingMaps is a device whose IOMMU refuses, with EINVAL, a mapping of
// failSize bytes, and which counts the mappings the driver holds.
type failingMaps struct {
	vfio.Device
	failSize atomic.Uint64

	mu     sync.Mutex
	mapped map[uint64]uint64 // IOVA -> size
}

func (d *failingMaps) DMAMap(m vfio.DMAMapping) error {
	if m.Size == d.failSize.Load() {
		return unix.EINVAL
	}
	if err := d.Device.DMAMap(m); err != nil {
		return err
	}
	d.mu.Lock()
	d.mapped[m.IOVA] = m.Size
	d.mu.Unlock()
	return nil
}

func (d *failingMaps) DMAUnmap(iova, size uint64) error {
	d.mu.Lock()
	delete(d.mapped, iova)
	d.mu.Unlock()
	return d.Device.DMAUnmap(iova, size)
}

func (d *failingMaps) held() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.mapped)
}

// TestAssignCtxtUndoesFailedSetup: an ASSIGN_CTXT whose ring mapping fails
// returns that error and takes back what it set up (the rings mapped before
// it, their memfds, the context slot): a second ASSIGN_CTXT then succeeds.
func TestAssignCtxtUndoesFailedSetup(t *testing.T) {
	fd := &failingMaps{mapped: map[uint64]uint64{}}
	a, err := openBehind(t, attach.DefaultOptions(), smallSim(1), func(d vfio.Device) vfio.Device {
		fd.Device = d
		return fd
	})
	if err != nil {
		t.Fatal(err)
	}
	f := openFile(t, a)
	before, fds := fd.held(), countFDs(t)
	fd.failSize.Store(4 << 20) // the PIO buffer (its 4 MiB ring), mapped after four other rings
	ui := uapi.Hfi1UserInfo{Userversion: uapi.HFI1_USER_SWMAJOR << uapi.HFI1_SWMAJOR_SHIFT}
	if err := ioctl(f, uapi.HFI1_IOCTL_ASSIGN_CTXT, &ui); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("ASSIGN_CTXT with the PIO buffer's mapping refused: %v, want EINVAL", err)
	}
	if got := fd.held(); got != before {
		t.Errorf("DMA mappings %d -> %d after the failed ASSIGN_CTXT", before, got)
	}
	if got := countFDs(t); got != fds {
		t.Errorf("fds %d -> %d after the failed ASSIGN_CTXT", fds, got)
	}
	fd.failSize.Store(0)
	assign(t, openFile(t, a)) // the only context is free again
}
