package kernel

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/u-root/u-root/pkg/pci"
)

// Driver is the kernel driver the backend binds devices to.
const Driver = "vfio-pci"

// Sysfs is the part of sysfs the backend reads and writes. The zero value
// means the real one; tests point Root at a fake tree.
type Sysfs struct {
	Root string // default "/sys"
}

func (s Sysfs) root() string {
	if s.Root == "" {
		return "/sys"
	}
	return s.Root
}

func (s Sysfs) devicesDir() string { return filepath.Join(s.root(), "bus/pci/devices") }

func (s Sysfs) deviceDir(bdf string) string { return filepath.Join(s.devicesDir(), bdf) }

// Find returns the PCI addresses (BDF, "0000:00:03.0") of the devices with
// the given vendor and device id, in address order. A device id of 0xffff
// matches every device of the vendor.
func (s Sysfs) Find(vendor, device uint16) ([]string, error) {
	dirs, err := filepath.Glob(filepath.Join(s.devicesDir(), "*"))
	if err != nil {
		return nil, err
	}
	var out []string
	for _, d := range dirs {
		p, err := pci.OnePCI(d)
		if err != nil {
			return nil, fmt.Errorf("vfio: reading PCI device %s: %w", filepath.Base(d), err)
		}
		if p.Vendor == vendor && (device == 0xffff || p.Device == device) {
			out = append(out, p.Addr)
		}
	}
	return out, nil
}

// Describe reads the PCI device at bdf (ids, class, BARs) from sysfs.
func (s Sysfs) Describe(bdf string) (*pci.PCI, error) {
	p, err := pci.OnePCI(s.deviceDir(bdf))
	if err != nil {
		return nil, fmt.Errorf("vfio: PCI device %s: %w", bdf, err)
	}
	return p, nil
}

// CurrentDriver returns the name of the driver bound to bdf, or "" if none.
func (s Sysfs) CurrentDriver(bdf string) (string, error) {
	l, err := os.Readlink(filepath.Join(s.deviceDir(bdf), "driver"))
	if errors.Is(err, os.ErrNotExist) {
		if _, serr := os.Stat(s.deviceDir(bdf)); serr != nil {
			return "", fmt.Errorf("vfio: PCI device %s: %w", bdf, serr)
		}
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("vfio: PCI device %s: %w", bdf, err)
	}
	return filepath.Base(l), nil
}

// Bind binds bdf to vfio-pci the way the kernel documents it: set
// driver_override, unbind the current driver if there is one, and ask the
// PCI core to probe the device again. The vfio-pci module must be loaded.
func (s Sysfs) Bind(bdf string) error {
	cur, err := s.CurrentDriver(bdf)
	if err != nil {
		return err
	}
	if cur == Driver {
		return nil
	}
	dir := s.deviceDir(bdf)
	if err := writeSysfs(filepath.Join(dir, "driver_override"), Driver); err != nil {
		return err
	}
	if cur != "" {
		if err := writeSysfs(filepath.Join(dir, "driver", "unbind"), bdf); err != nil {
			return err
		}
	}
	if err := writeSysfs(filepath.Join(s.root(), "bus/pci/drivers_probe"), bdf); err != nil {
		return err
	}
	now, err := s.CurrentDriver(bdf)
	if err != nil {
		return err
	}
	if now != Driver {
		return fmt.Errorf("vfio: binding %s to %s: device is bound to %q (is the vfio-pci module loaded?)", bdf, Driver, now)
	}
	return nil
}

// IOMMUGroup returns the IOMMU group number of bdf. A device without one
// cannot be used through VFIO (no IOMMU, and this kernel has no no-IOMMU
// mode).
func (s Sysfs) IOMMUGroup(bdf string) (int, error) {
	l, err := os.Readlink(filepath.Join(s.deviceDir(bdf), "iommu_group"))
	if err != nil {
		return -1, fmt.Errorf("vfio: IOMMU group of %s (is intel_iommu=on?): %w", bdf, err)
	}
	n, err := strconv.Atoi(filepath.Base(l))
	if err != nil {
		return -1, fmt.Errorf("vfio: IOMMU group of %s: bad link %q", bdf, l)
	}
	return n, nil
}

func writeSysfs(path, value string) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("vfio: %w", err)
	}
	_, err = f.WriteString(value)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("vfio: writing %q to %s: %w", strings.TrimSpace(value), path, err)
	}
	return nil
}
