package driver_test

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfisim"
	"github.com/gohfi/gohfi/vfio"
	"github.com/gohfi/gohfi/vfio/vfiouser"
)

// The driver tests normally run against an embedded hfisim. With
// GOHFI_TEST_DEVICE set they run against real devices instead, e.g. in
// the QEMU guest through kernel VFIO:
//
//	GOHFI_TEST_DEVICE=pci:0000:00:04.0,pci:0000:00:05.0
//
// A test asks openDev for n contexts; of the listed devices it gets the
// one with exactly n contexts, else the smallest one with more, whose
// surplus contexts (the highest numbered) are then held by files of the
// helper, so the test sees exactly n free contexts, numbered from 0.
// (hfisim cannot have 3 contexts behind QEMU: its RcvArray BAR would not
// be a power of two.) Tests that reach into the embedded model (a.Sim)
// cannot run this way.
//
// GOHFI_TEST_BREAK=skip-dma-map deliberately breaks the driver (on pci:
// devices) for the harness's own test: DMA mappings are acknowledged but
// never made, so the device faults on every IOVA the driver hands it.
const (
	envTestDevice = "GOHFI_TEST_DEVICE"
	envTestBreak  = "GOHFI_TEST_BREAK"
)

// openEnvDevice opens the test device named by GOHFI_TEST_DEVICE and
// closes it when t ends; nil when the variable is not set.
func openEnvDevice(t testing.TB, ctxts int) *attach.Attached {
	t.Helper()
	list := os.Getenv(envTestDevice)
	if list == "" {
		return nil
	}
	o := attach.DefaultOptions()
	switch b := os.Getenv(envTestBreak); b {
	case "":
	case "skip-dma-map":
		t.Logf("%s=%s: the driver's DMA mappings are not made", envTestBreak, b)
		o.Openers = map[string]attach.Opener{"pci": func(ctx context.Context, bdf string) (vfio.Device, error) {
			d, err := attach.OpenPCI(ctx, bdf)
			if err != nil {
				return nil, err
			}
			return noDMAMap{d}, nil
		}}
	default:
		t.Fatalf("%s=%q: unknown (want skip-dma-map)", envTestBreak, b)
	}
	var (
		best     *attach.Attached
		bestSpec string
		seen     []string
	)
	for _, spec := range strings.Split(list, ",") {
		a, err := attach.Open(context.Background(), spec, o)
		if err != nil {
			if best != nil {
				best.Close()
			}
			t.Fatalf("%s: %v", envTestDevice, err)
		}
		n := a.Device.Info().NumContexts
		seen = append(seen, fmt.Sprintf("%s: %d contexts", spec, n))
		if n < ctxts || best != nil && best.Device.Info().NumContexts <= n {
			a.Close()
			continue
		}
		if best != nil {
			best.Close()
		}
		best, bestSpec = a, spec
		if n == ctxts {
			break
		}
	}
	if best == nil {
		t.Fatalf("%s: no device with %d contexts (%s)", envTestDevice, ctxts, strings.Join(seen, "; "))
	}
	t.Cleanup(func() {
		// For the QEMU harness: proof that MSI-X reached the driver.
		fmt.Printf("GOHFI-FACT driver_irqs.%s=%d\n", t.Name(), best.Device.Interrupts())
		// And how the TLB-flush waits ended (IntSrcTLB or the timer).
		if intr, timer := best.Device.TLBWaits(); intr+timer > 0 {
			fmt.Printf("GOHFI-FACT tlb_waits.%s=%d/%d\n", t.Name(), intr, timer)
		}
		if err := best.Close(); err != nil {
			t.Errorf("close %s: %v", bestSpec, err)
		}
	})
	t.Logf("%s: using %s", envTestDevice, bestSpec)
	reserveSurplus(t, best, ctxts)
	return best
}

// noDMAMap is a device whose DMA mappings silently do nothing.
type noDMAMap struct{ vfio.Device }

func (noDMAMap) DMAMap(vfio.DMAMapping) error     { return nil }
func (noDMAMap) DMAUnmap(iova, size uint64) error { return nil }

// reserveSurplus assigns every context of a, then closes the files holding
// the first n (contexts are handed out lowest first): the others stay
// assigned until t ends.
func reserveSurplus(t testing.TB, a *attach.Attached, n int) {
	t.Helper()
	total := a.Device.Info().NumContexts
	if total == n {
		return
	}
	files := make([]*driver.File, total)
	for i := range files {
		files[i] = openFile(t, a)
		assign(t, files[i])
	}
	for _, f := range files[:n] {
		if err := f.Close(); err != nil {
			t.Fatalf("%s: releasing a context: %v", envTestDevice, err)
		}
	}
	t.Logf("%s: %d of %d contexts held back", envTestDevice, total-n, total)
}

// openBehind probes an embedded hfisim of configuration cfg through the
// vfio.Device that wrap makes of its vfio-user client: for tests that put a
// fault or a fake between the driver and the device. The device and the
// module are closed when t ends.
func openBehind(t testing.TB, o attach.Options, cfg hfisim.Config, wrap func(vfio.Device) vfio.Device) (*attach.Attached, error) {
	t.Helper()
	o.Openers = map[string]attach.Opener{"behind": func(context.Context, string) (vfio.Device, error) {
		sim, err := hfisim.StartEmbedded(cfg)
		if err != nil {
			return nil, err
		}
		t.Cleanup(func() { _ = sim.Stop() })
		c, err := vfiouser.NewClient(sim.Conn)
		if err != nil {
			return nil, err
		}
		return wrap(c), nil
	}}
	a, err := attach.Open(context.Background(), "behind:", o)
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { _ = a.Close() })
	return a, nil
}

// smallSim is the device of the tests behind a wrapper: n contexts of 256
// RcvArray entries.
func smallSim(n int) hfisim.Config {
	cfg := hfisim.DefaultConfig()
	cfg.NumContexts = n
	cfg.RcvArrayPerCtxt = 256
	return cfg
}
