// Package qemu is the QEMU end-to-end harness: it boots a TCG guest with
// the fetched QEMU (>= 10.1) and the trixie kernel, optionally with a
// vfio-user-pci device connected to a vfio-user server on a unix socket,
// runs test binaries inside the guest (where the driver uses the kernel
// VFIO backend) and turns their results into test results on the host.
//
// The pieces live in tools/vmimage; this package adds the testing policy:
// skip when the machine cannot run the guest, but fail under CI=true, bound
// every wait, and attach the guest's console log to failures.
package qemu

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/gohfi/gohfi/tools/vmimage/vmimage"
)

// EnvVFIOUserDevice is set to 1 in the guest tests' environment when the
// guest has a vfio-user-pci device.
const EnvVFIOUserDevice = "GOHFI_VFIO_USER_DEVICE"

// Bounds for the stages of a guest run.
const (
	FetchTimeout = 3 * time.Minute
	BuildTimeout = 4 * time.Minute
	BootTimeout  = 3 * time.Minute
)

// RequireOrSkip skips t with the reason unless ok; under CI=true it fails
// instead, so that CI never silently loses the QEMU tests.
func RequireOrSkip(t testing.TB, ok bool, format string, args ...any) {
	t.Helper()
	if ok {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("CI=true and the QEMU guest cannot run: "+format, args...)
	}
	t.Skipf(format, args...)
}

// Setup checks the machine and fetches QEMU and the guest kernel into the
// cache (vmimage.CacheDir), reusing an earlier fetch.
func Setup(t testing.TB) *vmimage.Artifacts {
	t.Helper()
	RequireOrSkip(t, os.Geteuid() == 0, "needs root (vfio-pci in the guest is fine, but the cache and QEMU setup assume root)")
	_, err := vmimage.GoTool()
	RequireOrSkip(t, err == nil, "no go command to build the guest binaries: %v", err)
	ctx, cancel := context.WithTimeout(context.Background(), FetchTimeout)
	defer cancel()
	var log strings.Builder
	a, err := vmimage.Fetch(ctx, vmimage.FetchOptions{Log: &log})
	if err != nil {
		t.Logf("fetch log:\n%s", log.String())
	}
	RequireOrSkip(t, err == nil, "cannot fetch QEMU >= 10.1 and the guest kernel: %v", err)
	return a
}

// GuestConfig is one guest boot.
type GuestConfig struct {
	// VFIOUserSocket connects a vfio-user-pci device to the vfio-user
	// server listening there; empty boots without one.
	VFIOUserSocket string
	// VFIOUserDevices are more vfio-user-pci devices, at fixed guest PCI
	// addresses (vmimage.GuestBDF of their slots).
	VFIOUserDevices []vmimage.VFIOUserDevice
	// Tests are the packages whose tests run in the guest, in order.
	Tests []vmimage.TestPackage
	// QEMUArgs are added to QEMU's command line (extra devices).
	QEMUArgs []string
	// Env is added to the guest tests' environment.
	Env []string
	// Timeout bounds the boot and the tests; default BootTimeout.
	Timeout time.Duration
	// Modules for the init to load (default vmimage.VFIOModules), Files
	// and Links added to the image (vmimage.ImageOptions).
	Modules      []string
	Files, Links map[string]string
}

// RunGuest builds the image for cfg, boots it and returns what the guest
// reported. It fails t if the guest does not finish (QEMU is then killed)
// or any guest test fails, with the console log attached.
func RunGuest(t testing.TB, a *vmimage.Artifacts, cfg GuestConfig) *vmimage.RunResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), BuildTimeout)
	defer cancel()
	start := time.Now()
	initrd, err := vmimage.BuildImage(ctx, a, vmimage.ImageOptions{
		WorkDir: t.TempDir(), Tests: cfg.Tests, Env: cfg.Env, Modules: cfg.Modules, Files: cfg.Files, Links: cfg.Links,
	})
	if err != nil {
		t.Fatalf("building the guest image: %v", err)
	}
	t.Logf("guest image built in %v", time.Since(start).Round(time.Millisecond))

	timeout := cfg.Timeout
	if timeout == 0 {
		timeout = BootTimeout
	}
	ctx, cancel = context.WithTimeout(context.Background(), timeout)
	defer cancel()
	vm := &vmimage.VM{Artifacts: a, Initramfs: initrd, VFIOUserSocket: cfg.VFIOUserSocket,
		VFIOUserDevices: cfg.VFIOUserDevices, ExtraArgs: cfg.QEMUArgs}
	res, err := vm.Run(ctx, nil)
	if err != nil {
		if res != nil {
			attachLog(t, res)
		}
		t.Fatalf("guest run: %v", err)
	}
	t.Logf("guest: boot to init %v (guest uptime %.2f s), total %v",
		res.BootToInit.Round(time.Millisecond), res.Report.Init.Uptime, res.Total.Round(time.Millisecond))
	for name, e := range res.Report.Init.Modules {
		if e != "" {
			t.Errorf("guest: module %s: %s", name, e)
		}
	}
	failed := false
	for _, r := range res.Report.Results {
		if !r.Passed() {
			failed = true
			t.Errorf("guest test %s failed (exit %d %s) after %v:\n%s", r.Name, r.ExitCode, r.Error,
				r.Duration.Round(time.Millisecond), r.Output)
		}
	}
	if failed {
		attachLog(t, res)
	}
	return res
}

// RunDeviceScenarios is the seam for the device scenarios: given the unix
// socket of an already running vfio-user server (hfisim), it boots the guest
// with a vfio-user-pci device on that socket and runs tests (test binaries
// of the given packages, each with its -test.run pattern) inside the
// guest, where they reach the device through the kernel VFIO backend
// (vfio/kernel). The guest tests find the device by its vendor/device id
// and bind it to vfio-pci themselves (kernel.Options.Bind).
func RunDeviceScenarios(t testing.TB, a *vmimage.Artifacts, socketPath string, tests []vmimage.TestPackage) *vmimage.RunResult {
	t.Helper()
	if socketPath == "" {
		t.Fatal("RunDeviceScenarios: no vfio-user socket")
	}
	return RunGuest(t, a, GuestConfig{
		VFIOUserSocket: socketPath,
		Tests:          tests,
		Env:            []string{EnvVFIOUserDevice + "=1"},
	})
}

// attachLog logs the guest console (its tail if long) and QEMU's stderr.
func attachLog(t testing.TB, res *vmimage.RunResult) {
	t.Helper()
	console := string(res.Console)
	const max = 64 << 10
	if len(console) > max {
		console = "...\n" + console[len(console)-max:]
	}
	t.Logf("guest console:\n%s", console)
	if res.Report.Kmsg != "" {
		t.Logf("guest kernel log:\n%s", res.Report.Kmsg)
	}
	if len(res.Stderr) > 0 {
		t.Logf("QEMU stderr:\n%s", res.Stderr)
	}
}

// Facts collects the GOHFI-FACT lines of all guest tests.
func Facts(res *vmimage.RunResult) map[string]string {
	all := map[string]string{}
	for _, r := range res.Report.Results {
		for k, v := range r.Facts() {
			all[k] = v
		}
	}
	return all
}

// FormatFacts renders facts one per line, sorted.
func FormatFacts(facts map[string]string) string {
	keys := make([]string, 0, len(facts))
	for k := range facts {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "  %s = %s\n", k, facts[k])
	}
	return b.String()
}
