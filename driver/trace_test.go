package driver_test

import (
	"testing"

	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
)

// TestTraceTIDLifecycle: a subscriber sees TID_UPDATE's registration, the
// munmap's notifier event and invalidation, and TID_FREE's unregistration,
// in that order, with the TID and address; without a subscriber nothing is
// recorded.
func TestTraceTIDLifecycle(t *testing.T) {
	requireRoot(t)
	a := openDev(t, 1)
	f := openFile(t, a)
	assign(t, f)
	buf := allocBuf(t, 16<<10, false)
	sub := a.Module.Trace(64)
	defer sub.Stop()
	var list [4]uint32
	tids, _, err := hfiuser.TIDUpdate(f, buf.Addr(), 16<<10, list[:])
	if err != nil || len(tids) != 1 {
		t.Fatalf("TID_UPDATE: %v %v", tids, err)
	}
	if err := buf.Unmap(); err != nil {
		t.Fatal(err)
	}
	if _, err := hfiuser.TIDInvalRead(f, list[:]); err != nil { // waits for the invalidation's delivery
		t.Fatal(err)
	}
	if _, err := hfiuser.TIDFree(f, tids); err != nil {
		t.Fatal(err)
	}
	want := []driver.TraceKind{driver.TraceTIDRegister, driver.TraceNotifierEvent, driver.TraceTIDInvalidate, driver.TraceTIDUnregister}
	for i, k := range want {
		ev := <-sub.Events()
		if ev.Kind != k {
			t.Fatalf("event %d: %v, want %v", i, ev.Kind, k)
		}
		if k != driver.TraceNotifierEvent && (ev.A != uint64(buf.Addr()) || ev.B != 4 || ev.C != uint64(tids[0])) {
			t.Fatalf("event %v: A %#x B %d C %#x, want %#x 4 %#x", k, ev.A, ev.B, ev.C, buf.Addr(), tids[0])
		}
	}
	sub.Stop()
	if _, ok := <-sub.Events(); ok {
		t.Fatal("events after Stop")
	}
}

// BenchmarkTraceOff is the cost of a trace point nobody listens to: one
// atomic load in TID_UPDATE's and TID_FREE's paths, measured through them
// against BenchmarkTraceOn.
func BenchmarkTraceOff(b *testing.B) { benchTrace(b, false) }

// BenchmarkTraceOn is the same with a subscriber draining the events.
func BenchmarkTraceOn(b *testing.B) { benchTrace(b, true) }

func benchTrace(b *testing.B, on bool) {
	requireRoot(b)
	a := openDev(b, 1)
	f := openFile(b, a)
	assign(b, f)
	buf := allocBuf(b, 4096, false)
	if on {
		sub := a.Module.Trace(1024)
		go func() {
			for range sub.Events() {
			}
		}()
		defer sub.Stop()
	}
	var list [1]uint32
	b.ResetTimer()
	for range b.N {
		tids, _, err := hfiuser.TIDUpdate(f, buf.Addr(), 4096, list[:])
		if err != nil {
			b.Fatal(err)
		}
		if _, err := hfiuser.TIDFree(f, tids); err != nil {
			b.Fatal(err)
		}
	}
}
