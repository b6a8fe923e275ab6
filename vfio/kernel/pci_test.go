package kernel

import (
	"errors"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/vfio"
)

// fakeSysfs builds /sys/bus/pci with the given devices (bdf -> "vvvv:dddd")
// and optional drivers (bdf -> driver name) and IOMMU groups.
func fakeSysfs(t *testing.T, devs map[string]string, drivers map[string]string, groups map[string]string) Sysfs {
	t.Helper()
	root := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(root, "bus/pci/drivers"), 0o755))
	must(os.WriteFile(filepath.Join(root, "bus/pci/drivers_probe"), nil, 0o644))
	for bdf, ids := range devs {
		v, d, _ := strings.Cut(ids, ":")
		dir := filepath.Join(root, "devices/pci0000:00", bdf)
		must(os.MkdirAll(dir, 0o755))
		must(os.MkdirAll(filepath.Join(root, "bus/pci/devices"), 0o755))
		must(os.Symlink(dir, filepath.Join(root, "bus/pci/devices", bdf)))
		for name, val := range map[string]string{
			"vendor": "0x" + v, "device": "0x" + d, "class": "0x020000", "irq": "11",
			"resource":        strings.TrimSuffix(strings.Repeat("0x0000000000000000 0x0000000000000000 0x0000000000000000\n", 13), "\n"),
			"driver_override": "(null)",
		} {
			must(os.WriteFile(filepath.Join(dir, name), []byte(val+"\n"), 0o644))
		}
		if drv := drivers[bdf]; drv != "" {
			ddir := filepath.Join(root, "bus/pci/drivers", drv)
			must(os.MkdirAll(ddir, 0o755))
			must(os.WriteFile(filepath.Join(ddir, "unbind"), nil, 0o644))
			must(os.Symlink(ddir, filepath.Join(dir, "driver")))
		}
		if g := groups[bdf]; g != "" {
			gdir := filepath.Join(root, "kernel/iommu_groups", g)
			must(os.MkdirAll(gdir, 0o755))
			must(os.Symlink(gdir, filepath.Join(dir, "iommu_group")))
		}
	}
	return Sysfs{Root: root}
}

func TestFind(t *testing.T) {
	s := fakeSysfs(t, map[string]string{
		"0000:00:01.0": "8086:29c0",
		"0000:00:03.0": "1fc1:0001",
		"0000:00:04.0": "1fc1:0002",
	}, nil, nil)
	got, err := s.Find(0x1fc1, 0x0001)
	if err != nil || len(got) != 1 || got[0] != "0000:00:03.0" {
		t.Fatalf("Find = %v, %v", got, err)
	}
	got, err = s.Find(0x1fc1, 0xffff)
	if err != nil || len(got) != 2 {
		t.Fatalf("Find any device of the vendor = %v, %v", got, err)
	}
	got, err = s.Find(0xdead, 0xbeef)
	if err != nil || len(got) != 0 {
		t.Fatalf("Find absent = %v, %v", got, err)
	}
}

func TestBindWritesOverrideUnbindProbe(t *testing.T) {
	const bdf = "0000:00:03.0"
	s := fakeSysfs(t, map[string]string{bdf: "1fc1:0001"}, map[string]string{bdf: "hfi1"}, nil)
	err := s.Bind(bdf)
	// The fake kernel never rebinds, so Bind must notice and fail.
	if err == nil || !strings.Contains(err.Error(), `bound to "hfi1"`) {
		t.Fatalf("Bind = %v, want an error naming the driver still bound", err)
	}
	read := func(p string) string {
		b, err := os.ReadFile(filepath.Join(s.Root, p))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	if got := read("bus/pci/devices/" + bdf + "/driver_override"); got != "vfio-pci" {
		t.Errorf("driver_override = %q", got)
	}
	if got := read("bus/pci/drivers/hfi1/unbind"); got != bdf {
		t.Errorf("unbind got %q", got)
	}
	if got := read("bus/pci/drivers_probe"); got != bdf {
		t.Errorf("drivers_probe got %q", got)
	}
}

func TestBindAlreadyBound(t *testing.T) {
	const bdf = "0000:00:03.0"
	s := fakeSysfs(t, map[string]string{bdf: "1fc1:0001"}, map[string]string{bdf: Driver}, nil)
	if err := s.Bind(bdf); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(filepath.Join(s.Root, "bus/pci/drivers_probe"))
	if len(b) != 0 {
		t.Errorf("probed a device already bound to vfio-pci: %q", b)
	}
	if err := s.Bind("0000:00:09.0"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Bind of a missing device = %v, want ErrNotExist", err)
	}
}

func TestIOMMUGroup(t *testing.T) {
	s := fakeSysfs(t, map[string]string{"0000:00:03.0": "1fc1:0001", "0000:00:04.0": "1fc1:0002"},
		nil, map[string]string{"0000:00:03.0": "7"})
	if g, err := s.IOMMUGroup("0000:00:03.0"); err != nil || g != 7 {
		t.Fatalf("IOMMUGroup = %d, %v", g, err)
	}
	if _, err := s.IOMMUGroup("0000:00:04.0"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("IOMMUGroup without a group = %v", err)
	}
}

// TestOpenWithoutVFIO runs Open as far as it gets on a machine without
// /dev/vfio: the error must name the device node and keep ENOENT.
func TestOpenWithoutVFIO(t *testing.T) {
	s := fakeSysfs(t, map[string]string{"0000:00:03.0": "1fc1:0001"},
		map[string]string{"0000:00:03.0": Driver}, map[string]string{"0000:00:03.0": "3"})
	_, err := Open(Options{Vendor: 0x1fc1, Device: 0x0001, Bind: true, Sysfs: s, DevDir: t.TempDir()})
	if !errors.Is(err, unix.ENOENT) || !strings.Contains(err.Error(), "vfio") {
		t.Fatalf("Open = %v, want ENOENT on the container", err)
	}
	_, err = Open(Options{Vendor: 0x1fc1, Device: 0x0009, Sysfs: s})
	if !errors.Is(err, unix.ENODEV) {
		t.Fatalf("Open of an absent device = %v, want ENODEV", err)
	}
}

func TestCheckIOVA(t *testing.T) {
	ranges := []vfio.IOVARange{{Start: 0, End: 0xfedfffff}, {Start: 0xfef00000, End: 0xffffffffff}}
	d := &Device{iommu: IOMMUInfo{PageSizes: 0x40201000, IOVARanges: ranges}}
	for _, c := range []struct {
		iova, size uint64
		ok         bool
	}{
		{0x100000, 0x10000, true},
		{0x100800, 0x1000, false},            // unaligned IOVA
		{0x100000, 0x800, false},             // unaligned size
		{0xfee00000, 0x1000, false},          // the MSI window between the ranges
		{0xfedff000, 0x2000, false},          // straddles the hole
		{0xfef00000, 0x1000, true},           // second range
		{0xfffffff000, 0x1000, true},         // last page
		{0xfffffff000, 0x2000, false},        // past the end
		{^uint64(0) &^ 0xfff, 0x2000, false}, // wraps
	} {
		err := d.checkIOVA(c.iova, c.size)
		if (err == nil) != c.ok {
			t.Errorf("checkIOVA(%#x, %#x) = %v, want ok=%v", c.iova, c.size, err, c.ok)
		}
		if err != nil && !errors.Is(err, unix.EINVAL) {
			t.Errorf("checkIOVA error %v does not wrap EINVAL", err)
		}
	}
	if err := d.DMAMap(vfio.DMAMapping{IOVA: 0x1000, Size: 0x1000}); !errors.Is(err, unix.EINVAL) {
		t.Errorf("DMAMap without memory = %v", err)
	}
	// IOVARanges passes the IOMMU's ranges on as they are, as a copy.
	got := d.IOVARanges()
	if !reflect.DeepEqual(got, ranges) {
		t.Errorf("IOVARanges = %x, want %x", got, ranges)
	}
	got[0].End = 0
	if d.iommu.IOVARanges[0].End != 0xfedfffff {
		t.Error("IOVARanges returned the device's own slice")
	}
	// Without the capability: everything DMAMap can check.
	d.iommu.IOVARanges = nil
	if got := d.IOVARanges(); !reflect.DeepEqual(got, []vfio.IOVARange{{Start: 0, End: math.MaxUint64}}) {
		t.Errorf("IOVARanges without the capability = %x", got)
	}
}

func TestClosedDevice(t *testing.T) {
	d := &Device{fd: -1, regions: map[uint32]vfio.RegionInfo{}}
	if err := d.Close(); !errors.Is(err, vfio.ErrClosed) {
		t.Errorf("Close = %v", err)
	}
	select {
	case <-d.Done():
	default:
		t.Errorf("Done not closed after Close")
	}
	if err := d.Reset(); !errors.Is(err, vfio.ErrClosed) {
		t.Errorf("Reset = %v", err)
	}
	if _, err := d.RegionInfo(0); !errors.Is(err, vfio.ErrClosed) {
		t.Errorf("RegionInfo = %v", err)
	}
	if err := d.DMAUnmap(0, 0x1000); !errors.Is(err, vfio.ErrClosed) {
		t.Errorf("DMAUnmap = %v", err)
	}
}
