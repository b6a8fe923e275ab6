package qemu

import (
	"testing"
	"time"

	"github.com/gohfi/gohfi/tools/vmimage/vmimage"
)

// TestGuestPipeline proves the QEMU path without the HFI model: it boots
// the guest with QEMU's edu teaching device, reports what the guest kernel
// allows (userfaultfd, BPF, tracefs, VFIO) and runs the kernel VFIO
// backend's in-guest tests against edu (bind to vfio-pci, BAR access,
// mmap, DMA through the emulated IOMMU, MSI and INTx on eventfds).
func TestGuestPipeline(t *testing.T) {
	a := Setup(t)
	res := RunGuest(t, a, GuestConfig{
		QEMUArgs: []string{"-device", "edu"},
		Tests: []vmimage.TestPackage{
			{Package: "./test/qemu/guestprobe", Tags: []string{"gohfiguest"}, Timeout: time.Minute},
			{Package: "./vfio/kernel", Tags: []string{"gohfiguest"}, Run: "^TestGuest", Timeout: time.Minute},
		},
	})
	if !res.Report.Complete || len(res.Report.Results) != 2 {
		t.Fatalf("guest reported %d results, complete=%v", len(res.Report.Results), res.Report.Complete)
	}
	facts := Facts(res)
	t.Logf("guest facts:\n%s", FormatFacts(facts))
	for _, r := range res.Report.Results {
		t.Logf("guest test binary %s: %v", r.Name, r.Duration.Round(time.Millisecond))
	}
	for _, k := range []string{"kernel", "userfaultfd", "bpf_attach_tracepoint", "vfio_container", "edu_irq_index"} {
		if _, ok := facts[k]; !ok {
			t.Errorf("guest did not report %q (a guest test did not run?)", k)
		}
	}
}
