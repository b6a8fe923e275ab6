// Package attach loads the driver module and binds it to a device named by
// a spec, the way a user chooses a device on the command line:
//
//	embedded          hfisim in this process, over a vfio-user socketpair (default)
//	vfio-user:PATH    an hfisim (or other vfio-user device) process listening at PATH
//	pci:BDF           the PCI device at BDF through kernel VFIO (OpenPCI), as in the QEMU guest
package attach

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfisim"
	"github.com/gohfi/gohfi/vfio"
	"github.com/gohfi/gohfi/vfio/vfiouser"
)

// Attached is a loaded module with one probed device.
type Attached struct {
	Module *driver.Module
	Device *driver.Device
	// Sim is the embedded device model, nil for an external device.
	Sim *hfisim.Embedded
}

// Opener opens a vfio.Device for a spec prefix other than the built-in
// ones. "pci" defaults to OpenPCI; an entry in Options.Openers replaces it
// (tests wrap the device that way).
type Opener func(ctx context.Context, arg string) (vfio.Device, error)

// Options configure Open.
type Options struct {
	Params  driver.Params
	Sim     hfisim.Config
	Openers map[string]Opener
}

// DefaultOptions are the module defaults and the default embedded device.
func DefaultOptions() Options {
	return Options{Params: driver.DefaultParams(), Sim: hfisim.DefaultConfig()}
}

// Open attaches to the device named by spec.
func Open(ctx context.Context, spec string, o Options) (*Attached, error) {
	m, err := driver.Init(o.Params)
	if err != nil {
		return nil, err
	}
	a := &Attached{Module: m}
	var vdev vfio.Device
	kind, arg, _ := strings.Cut(spec, ":")
	switch kind {
	case "", "embedded":
		a.Sim, err = hfisim.StartEmbedded(o.Sim)
		if err != nil {
			return nil, err
		}
		vdev, err = vfiouser.NewClient(a.Sim.Conn)
	case "vfio-user":
		if arg == "" {
			return nil, fmt.Errorf("attach: %q: vfio-user needs a socket path", spec)
		}
		vdev, err = vfiouser.Dial(ctx, arg)
	default:
		op, ok := o.Openers[kind]
		if !ok && kind == "pci" {
			op, ok = OpenPCI, true
		}
		if !ok {
			err := fmt.Errorf("attach: unknown device %q (want embedded, vfio-user:PATH or pci:BDF)", spec)
			return nil, errors.Join(err, a.Close())
		}
		vdev, err = op(ctx, arg)
	}
	if err != nil {
		return nil, errors.Join(fmt.Errorf("attach %s: %w", spec, err), a.Close())
	}
	if a.Device, err = m.Probe(ctx, vdev, spec); err != nil {
		return nil, errors.Join(err, a.Close())
	}
	if a.Sim != nil {
		dev := a.Device
		a.Sim.Device.SetTrace(func(k hfisim.TraceKind, x, y, z uint64) { dev.TraceDevice(devTraceKinds[k], x, y, z) })
	}
	return a, nil
}

// devTraceKinds are the driver's names of the device model's trace events.
var devTraceKinds = [...]driver.TraceKind{
	hfisim.TraceDoorbell:  driver.TraceDevDoorbell,
	hfisim.TraceFetch:     driver.TraceDevFetch,
	hfisim.TraceExec:      driver.TraceDevExec,
	hfisim.TraceCQE:       driver.TraceDevCQE,
	hfisim.TraceInterrupt: driver.TraceDevInterrupt,
}

// Close unloads the module (closing the device) and stops an embedded model.
func (a *Attached) Close() error {
	errs := []error{a.Module.Exit()}
	if a.Sim != nil {
		errs = append(errs, a.Sim.Stop())
	}
	return errors.Join(errs...)
}
