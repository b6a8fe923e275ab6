package driver_test

import (
	"fmt"
	"sort"
	"testing"
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
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

// TestTraceVerbs: an RDMA WRITE shows its doorbell and its completion, and
// a DEREG_MR its TLB flush, each with the queue, index or range.
func TestTraceVerbs(t *testing.T) {
	_, l, sub := traceLoop(t)
	wr := hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: 42, Opcode: uapi.GOHFI_WR_RDMA_WRITE, SendFlags: uapi.GOHFI_SEND_SIGNALED,
		RemoteAddr: uint64(uintptrOf(l.bufB)), Rkey: l.mrB.Rkey}, SGL: l.sgeA(0, 4096)}
	if _, err := hfiuser.PostSend(l.a.f, l.a.qp, []hfiuser.SendWR{wr}); err != nil {
		t.Fatal(err)
	}
	if wc := pollWC(t, l.a.f, l.a.cq, 1); wc[0].Status != uapi.GOHFI_WC_SUCCESS {
		t.Fatalf("completion %+v", wc[0])
	}
	if err := hfiuser.DeregMR(l.b.f, l.mrB.Handle); err != nil {
		t.Fatal(err)
	}
	want := []driver.TraceKind{driver.TraceDoorbell, driver.TraceCompletion, driver.TraceTLBFlush}
	for i, k := range want {
		ev := <-sub.Events()
		for ev.Kind >= driver.TracePostSend { // the work request's trail: TestTraceWorkRequest
			ev = <-sub.Events()
		}
		if ev.Kind == driver.TraceDoorbellRecord {
			ev.Kind = driver.TraceDoorbell // an engine still awake from the setup polls the record
		}
		switch {
		case ev.Kind != k:
			t.Fatalf("event %d: %v, want %v", i, ev.Kind, k)
		case k == driver.TraceDoorbell && (ev.B != 1 || ev.C != 0):
			t.Fatalf("doorbell %+v: want SQ producer index 1", ev)
		case k == driver.TraceCompletion && (ev.B != 42 || ev.C != uapi.GOHFI_WC_SUCCESS):
			t.Fatalf("completion %+v: want wr_id 42, success", ev)
		case k == driver.TraceTLBFlush && ev.B == 0:
			t.Fatalf("TLB flush of no entries: %+v", ev)
		}
	}
}

// TestTraceODP: an RDMA WRITE into an ODP MR shows the fault and its
// resume; an munmap of the MR's pages shows the invalidation.
func TestTraceODP(t *testing.T) {
	a, l := startODP(t)
	const n = 16 << 10
	src, dst := allocBuf(t, n, false), allocBuf(t, n, false)
	ms := l.reg(l.qa.f, src.Addr(), n, pinAccess)
	md := l.reg(l.qb.f, dst.Addr(), n, odpAccess)
	sub := a.Module.Trace(256)
	defer sub.Stop()
	wantOK(t, "WRITE", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(src.Addr(), n, ms), dst.Addr(), md.Rkey))
	if err := madvise(dst.Addr(), n, unix.MADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	if err := a.Device.SyncNotifier(t.Context()); err != nil {
		t.Fatal(err)
	}
	// Everything traced happened before SyncNotifier returned: the events
	// are in the subscription's buffer.
	seen := map[driver.TraceKind]driver.TraceEvent{}
	for drained := false; !drained; {
		select {
		case ev := <-sub.Events():
			if _, ok := seen[ev.Kind]; !ok {
				seen[ev.Kind] = ev
			}
		default:
			drained = true
		}
	}
	f, r := seen[driver.TraceODPFault], seen[driver.TraceODPResume]
	if f.Kind == 0 || r.Kind == 0 || seen[driver.TraceInvalBegin].Kind == 0 {
		t.Fatalf("trace kinds seen: %v", seen)
	}
	if f.C != uint64(md.Rkey) || r.C != 0 || r.A != f.A {
		t.Fatalf("fault %+v, resume %+v: want the MR's key, the same address, no error", f, r)
	}
}

// TestTraceWorkRequest: an RDMA WRITE leaves its trail, in order: POST_SEND,
// its doorbell (register or record), and, from a device model in this
// process, the device taking the tail, fetching the WQE, finishing it and
// writing the CQE; then the driver's completion, all with the WR's id.
func TestTraceWorkRequest(t *testing.T) {
	e, l, sub := traceLoop(t)
	const wrID = 77
	qpIdx := uint64(l.a.qpn - chip.QPNBase)
	wr := hfiuser.SendWR{SGL: l.sgeA(0, 8)}
	wr.WrID, wr.Opcode, wr.SendFlags = wrID, uapi.GOHFI_WR_RDMA_WRITE, uapi.GOHFI_SEND_SIGNALED
	wr.RemoteAddr, wr.Rkey = uint64(uintptrOf(l.bufB)), l.mrB.Rkey
	if bad, err := hfiuser.PostSend(l.a.f, l.a.qp, []hfiuser.SendWR{wr}); err != nil || bad != 1 {
		t.Fatalf("POST_SEND: bad_wr %d, %v", bad, err)
	}
	wantWC(t, "WRITE", pollWC(t, l.a.f, l.a.cq, 1)[0], uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 8)
	want := []driver.TraceKind{driver.TracePostSend, driver.TraceDoorbell}
	if e.a.Sim != nil {
		want = append(want, driver.TraceDevDoorbell, driver.TraceDevFetch, driver.TraceDevExec, driver.TraceDevCQE)
	}
	want = append(want, driver.TraceCompletion)
	// Events reach the subscriber in the order their points took the
	// tracer's lock; their times are when each happened.
	var evs []driver.TraceEvent
	for len(evs) < len(want) {
		var ev driver.TraceEvent
		select {
		case ev = <-sub.Events():
		case <-time.After(5 * time.Second):
			t.Fatalf("%d events, want %v", len(evs), want)
		}
		k := ev.Kind
		mine := false
		switch k {
		case driver.TracePostSend, driver.TraceDevFetch, driver.TraceDevExec:
			mine = ev.A == qpIdx && ev.B == wrID
		case driver.TraceDoorbell, driver.TraceDoorbellRecord:
			k, mine = driver.TraceDoorbell, ev.A == qpIdx && ev.C == 0
		case driver.TraceDevDoorbell:
			mine = ev.A == qpIdx && ev.B == 1
		case driver.TraceDevCQE:
			mine = ev.C == qpIdx && ev.B == wrID
		case driver.TraceCompletion:
			mine = ev.B == wrID
		}
		if !mine {
			continue
		}
		ev.Kind = k
		evs = append(evs, ev)
	}
	sort.SliceStable(evs, func(i, j int) bool { return evs[i].Time.Before(evs[j].Time) })
	var got []driver.TraceKind
	for _, ev := range evs {
		got = append(got, ev.Kind)
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("events %v, want %v", got, want)
	}
}

// BenchmarkTracePointOff is one trace point with nobody tracing: what the
// embedded device's hook costs per event (a call and an atomic load); the
// driver's own points are the load alone.
func BenchmarkTracePointOff(b *testing.B) {
	a := openDev(b, 1)
	for i := range b.N {
		a.Device.TraceDevice(driver.TraceDevFetch, 1, uint64(i), 3)
	}
}

// traceLoop is a loop (verbs_test.go) with remote write rights on b and a
// trace subscription, stopped at the test's end.
func traceLoop(t *testing.T) (*verbsEnv, *loop, *driver.TraceSub) {
	t.Helper()
	requireRoot(t)
	e := openVerbs(t, 2)
	e.requireEngine(t)
	l := newLoop(t, e, uapi.IB_ACCESS_LOCAL_WRITE|uapi.IB_ACCESS_REMOTE_WRITE)
	sub := e.a.Module.Trace(4096)
	t.Cleanup(sub.Stop)
	return e, l, sub
}
