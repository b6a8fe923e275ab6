package attach

import (
	"context"
	"fmt"
	"regexp"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/vfio"
	"github.com/gohfi/gohfi/vfio/kernel"
)

// bdfPattern is a PCI address as sysfs names devices, with the domain
// optional on input ("00:03.0" means "0000:00:03.0").
var bdfPattern = regexp.MustCompile(`^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-1][0-9a-fA-F])\.([0-7])$`)

// normalizeBDF returns bdf in sysfs form (domain included, lower case).
func normalizeBDF(bdf string) (string, error) {
	m := bdfPattern.FindStringSubmatch(bdf)
	if m == nil {
		return "", fmt.Errorf("attach: %q is not a PCI address (want DDDD:BB:SS.F, e.g. 0000:00:03.0): %w", bdf, unix.EINVAL)
	}
	dom := m[1]
	if dom == "" {
		dom = "0000"
	}
	return strings.ToLower(fmt.Sprintf("%s:%s:%s.%s", dom, m[2], m[3], m[4])), nil
}

// OpenPCI is the default opener of "pci:BDF": the PCI device at BDF through
// kernel VFIO (vfio/kernel), bound to vfio-pci first if another driver or
// none has it. It needs /sys, /dev/vfio and the vfio-pci module, as inside
// the QEMU guest; elsewhere it fails here, at open time, never earlier.
func OpenPCI(ctx context.Context, bdf string) (vfio.Device, error) {
	addr, err := normalizeBDF(bdf)
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	d, err := kernel.Open(kernel.Options{BDF: addr, Bind: true})
	if err != nil {
		return nil, err
	}
	return d, nil
}
