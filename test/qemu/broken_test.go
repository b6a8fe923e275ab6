package qemu

import (
	"fmt"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// recorder is a testing.TB that records failures instead of failing the
// real test, so a test can check that the harness fails (and why). Logs go
// to the real test; Fatal and Skip stop the calling goroutine, as in testing.
type recorder struct {
	testing.TB
	mu     sync.Mutex
	failed bool
	msgs   []string
}

func (r *recorder) record(fatal bool, msg string) {
	r.mu.Lock()
	r.failed = r.failed || fatal || msg != ""
	if msg != "" {
		r.msgs = append(r.msgs, msg)
	}
	r.mu.Unlock()
}

func (r *recorder) Helper()         {}
func (r *recorder) Log(args ...any) { r.TB.Log(append([]any{"[harness under test]"}, args...)...) }
func (r *recorder) Logf(format string, args ...any) {
	r.TB.Logf("[harness under test] "+format, args...)
}
func (r *recorder) Error(args ...any) { r.record(true, fmt.Sprint(args...)) }
func (r *recorder) Errorf(format string, args ...any) {
	r.record(true, fmt.Sprintf(format, args...))
}
func (r *recorder) Fail()    { r.record(true, "") }
func (r *recorder) FailNow() { r.record(true, ""); runtime.Goexit() }
func (r *recorder) Fatal(args ...any) {
	r.record(true, fmt.Sprint(args...))
	runtime.Goexit()
}
func (r *recorder) Fatalf(format string, args ...any) {
	r.record(true, fmt.Sprintf(format, args...))
	runtime.Goexit()
}
func (r *recorder) Skip(args ...any) {
	r.record(true, "skipped: "+fmt.Sprint(args...))
	runtime.Goexit()
}
func (r *recorder) Skipf(format string, args ...any) {
	r.record(true, "skipped: "+fmt.Sprintf(format, args...))
	runtime.Goexit()
}
func (r *recorder) SkipNow() { r.record(true, "skipped"); runtime.Goexit() }
func (r *recorder) Failed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.failed
}

// TestGuestHarnessReportsBrokenDriver proves the harness can fail: the
// driver tests run in the guest with GOHFI_TEST_BREAK=skip-dma-map, so the
// driver hands hfisim IOVAs that were never mapped in the guest IOMMU. The
// harness must report the guest test as failed, with the guest's reason.
func TestGuestHarnessReportsBrokenDriver(t *testing.T) {
	a := Setup(t)
	devs, specs := driverDevices(t, 4)
	rec := &recorder{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		RunGuest(rec, a, GuestConfig{
			VFIOUserDevices: devs,
			Tests:           driverTests("^TestEagerSendAndPoll$", time.Minute),
			Env:             []string{"GOHFI_TEST_DEVICE=" + specs, "GOHFI_TEST_BREAK=skip-dma-map"},
			Timeout:         2 * time.Minute,
		})
	}()
	select {
	case <-done:
	case <-time.After(BuildTimeout + 3*time.Minute):
		t.Fatal("the harness did not return")
	}
	if !rec.Failed() {
		t.Fatal("the harness passed a driver that never maps DMA")
	}
	all := strings.Join(rec.msgs, "\n")
	t.Logf("the harness reported:\n%s", all)
	for _, want := range []string{
		"guest test 00-driver.test failed", // which binary
		"--- FAIL: TestEagerSendAndPoll",   // which test, from the guest's output
		"GOHFI_TEST_BREAK=skip-dma-map",    // the guest's own log of the breakage
	} {
		if !strings.Contains(all, want) {
			t.Errorf("the harness's report lacks %q", want)
		}
	}
}
