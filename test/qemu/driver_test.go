package qemu

import (
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/gohfi/gohfi/hfisim"
	"github.com/gohfi/gohfi/tools/vmimage/vmimage"
)

// DriverScenarios are the driver's end-to-end tests (driver/*_test.go) that
// run unchanged in the guest against hfisim through kernel VFIO: probe,
// contexts, BAR mmap of the RcvArray, eager send with MSI-X, the TID
// cache (TID_UPDATE/send/verify, munmap invalidation through
// TID_INVAL_READ, TID offsets and errors), the verbs core and fast
// registration.
var DriverScenarios = []string{
	"TestProbeReadsDevice",
	"TestAssignCtxtInfoAndMmap",
	"TestContextsExhaustedAndReleased",
	"TestEagerSendAndPoll",
	"TestExpectedReceiveIntact",
	"TestMunmapInvalidation",
	"TestTIDOffsetsAndErrors",
	// Verbs: MRs (MTT and MPT through the mapped BAR4, TLB flush on
	// DEREG), CQs, QPs, and the data path with its access errors.
	"TestVerbsQueryDevice",
	"TestRegMRErrno",
	"TestRegMRTables",
	"TestCQCreateDestroy",
	"TestQPStateMachine",
	"TestPostChecks",
	"TestVerbsCloseReleases",
	"TestVerbsDataPath",
	"TestVerbsAccessErrors",
	"TestVerbsAtomics",
	"TestVerbsAtomicConcurrentFAA",
	"TestVerbsAtomicErrors",
	// ODP: faults through the event queue, fault-around pinned and mapped
	// with type1 MAP_DMA, invalidations flushed through IntSrcTLB (MSI-X),
	// the pin budget, ADVISE_MR, a fault racing an invalidation (a driver
	// hook). TestODPStressNoStaleEntry and TestODPFigures read the
	// embedded model (PeekMR, fault latencies) and stay on the host.
	"TestODPRegister",
	"TestODPFirstAccess",
	"TestODPDontneedEveryOp",
	"TestODPFollowsAddress",
	"TestODPWriteFaultOnReadOnlyMemory",
	"TestODPReadOnlyMemory",
	"TestRegMRReadOnlyMemory",
	"TestODPMixedSGE",
	"TestODPPrefetch",
	"TestODPPinBudget",
	"TestODPFaultRacesInvalidation",
	"TestODPAtomics",
	// Implicit ODP: one MR of the whole address space per side, 1 GiB
	// children made on fault (the guest's device has guestMTTEntries).
	// TestImplicitODPDeregCleansUp and TestImplicitODPChildrenReclaimed
	// need an embedded device (a DMA-mapping counter, a small MTT) and
	// stay on the host.
	"TestImplicitODPRegister",
	"TestImplicitODPTraffic",
	"TestImplicitODPFollowsAddress",
	"TestImplicitODPDontneed",
	"TestImplicitODPPrefetch",
	// Fast registration: ALLOC_MR, FAST_REG_MR through the send queue with
	// page lists the driver checks and translates, LOCAL_INV,
	// SEND_WITH_INV, READ_WITH_INV, and the refusals.
	"TestFastRegPageListOrder",
	"TestFastRegInvalidateRebind",
	"TestFastRegDeviceRefusals",
	"TestFastRegBadPageLists",
	"TestFastRegSendWithInv",
	"TestFastRegReadWithInv",
	"TestFastRegDeregBusy",
	"TestFastRegPipelined",
	"TestFastRegPageListsReused",
	"TestAllocMRErrno",
}

// driverDevices serves one hfisim per context count given, at fixed guest
// PCI slots from 4, and returns the devices and the GOHFI_TEST_DEVICE value
// naming them. The driver tests' helper picks the device with the count a
// test asks for, else holds back the surplus contexts of a larger one; 4
// suits them all (TestProbeReadsDevice wants exactly 4). A count whose
// RcvArray BAR is not a power of two (3 contexts) makes QEMU abort.
func driverDevices(t testing.TB, contexts ...int) ([]vmimage.VFIOUserDevice, string) {
	t.Helper()
	var devs []vmimage.VFIOUserDevice
	var specs []string
	for i, n := range contexts {
		cfg := hfisim.DefaultConfig()
		cfg.NumContexts = n
		cfg.RcvArrayPerCtxt = 2048 // what the driver tests' openDev asks of the embedded model
		// TLB flushes take long enough that the driver waits for their
		// IntSrcTLB (MSI-X vector 0 through the guest's vfio-pci) rather
		// than finding them done while polling RegTLBInvDone.
		cfg.TLBInvLatency = guestTLBInvLatency
		// Room for implicit ODP: two directories and six children.
		cfg.MTTEntries = guestMTTEntries
		slot := 4 + i
		devs = append(devs, vmimage.VFIOUserDevice{Socket: serveHFISim(t, cfg), Slot: slot})
		specs = append(specs, "pci:"+vmimage.GuestBDF(slot))
	}
	return devs, strings.Join(specs, ",")
}

// guestTLBInvLatency is the guest device's TLB-invalidate latency.
const guestTLBInvLatency = 5 * time.Millisecond

// guestMTTEntries is the guest device's MTT: what the driver tests'
// implicit ODP device has (driver/odp_implicit_test.go, implicitMTT).
const guestMTTEntries = 1 << 21

func driverTests(run string, timeout time.Duration) []vmimage.TestPackage {
	return []vmimage.TestPackage{{Package: "./driver", Run: run, Timeout: timeout}}
}

var goTestLine = regexp.MustCompile(`(?m)^\s*--- (PASS|FAIL|SKIP): (\S+) \(([0-9.]+)s\)`)

// goTestOutcomes parses "--- PASS: TestX (1.23s)" lines of go test -v.
func goTestOutcomes(out string) map[string]string {
	m := map[string]string{}
	for _, s := range goTestLine.FindAllStringSubmatch(out, -1) {
		m[s[2]] = s[1] + " " + s[3] + "s"
	}
	return m
}

// TestGuestDriverScenarios runs DriverScenarios inside the guest against
// an hfisim device with 4 contexts attached with vfio-user-pci,
// reached through the guest's vfio-pci and the kernel VFIO backend
// (GOHFI_TEST_DEVICE=pci:...). Every scenario must pass, none may skip.
func TestGuestDriverScenarios(t *testing.T) {
	a := Setup(t)
	devs, specs := driverDevices(t, 4)
	res := RunGuest(t, a, GuestConfig{
		VFIOUserDevices: devs,
		Tests: append(driverTests("^("+strings.Join(DriverScenarios, "|")+")$", 5*time.Minute),
			vmimage.TestPackage{Package: "./test/qemu/guestprobe", Tags: []string{"gohfiguest"}, Run: "^TestNotifierSources$", Timeout: time.Minute}),
		Env:     []string{"GOHFI_TEST_DEVICE=" + specs},
		Timeout: 6 * time.Minute,
	})
	if len(res.Report.Results) != 2 {
		t.Fatalf("guest reported %d results, want 2", len(res.Report.Results))
	}
	r := res.Report.Results[0]
	if !strings.Contains(r.Output, "pci:"+vmimage.GuestBDF(4)) {
		t.Errorf("the driver tests do not say they used %s (GOHFI_TEST_DEVICE ignored?):\n%s", specs, r.Output)
	}
	got := goTestOutcomes(r.Output)
	for _, name := range DriverScenarios {
		o, ok := got[name]
		switch {
		case !ok:
			t.Errorf("guest: %s did not run", name)
		case !strings.HasPrefix(o, "PASS"):
			t.Errorf("guest: %s: %s", name, o)
		default:
			t.Logf("guest: %-34s %s", name, o)
		}
	}
	facts := Facts(res)
	t.Logf("guest facts:\n%s", FormatFacts(facts))
	// Poll sleeps until an interrupt wakes it: the eager send must have
	// been signalled by MSI-X through QEMU and the guest's vfio-pci.
	if n := facts["driver_irqs.TestEagerSendAndPoll"]; n == "" || n == "0" {
		t.Errorf("guest: TestEagerSendAndPoll took %q interrupts, want some", n)
	}
	// The ODP invalidations and DEREGs waited for their TLB flushes: the
	// waits must have been ended by IntSrcTLB, not by the driver's 10 ms
	// timer (a lost or missing interrupt).
	var intr, timer int
	for k, v := range facts {
		if !strings.HasPrefix(k, "tlb_waits.") {
			continue
		}
		var i, tm int
		if _, err := fmt.Sscanf(v, "%d/%d", &i, &tm); err != nil {
			t.Errorf("guest fact %s=%q: %v", k, v, err)
		}
		intr, timer = intr+i, timer+tm
	}
	t.Logf("guest: TLB-flush waits woken by IntSrcTLB %d, by the timer %d", intr, timer)
	if intr == 0 || timer > intr/10 {
		t.Errorf("guest: TLB-flush waits: %d woken by IntSrcTLB, %d by the timer", intr, timer)
	}
	t.Logf("guest: driver.test binary %v, boot to init %v, whole run %v",
		r.Duration.Round(time.Millisecond), res.BootToInit.Round(time.Millisecond), res.Total.Round(time.Millisecond))
}
