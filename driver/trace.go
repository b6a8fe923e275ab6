package driver

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// TraceKind names a driver decision, as hfi1 names its tracepoints
// (trace_hfi1_exp_tid_reg, trace_hfi1_mmu_invalidate, ...).
type TraceKind uint8

// The trace points. A, B and C of a TraceEvent mean what each says.
const (
	TraceTIDRegister       TraceKind = iota + 1 // TID_UPDATE programmed a TID: A vaddr, B pages, C TID
	TraceTIDUnregister                          // TID_FREE or close unprogrammed it: A vaddr, B pages, C TID
	TraceTIDInvalidate                          // the notifier invalidated it: A vaddr, B pages, C TID
	TraceTIDBusy                                // TID_UPDATE lost a race with an invalidation (EBUSY): A vaddr, B length
	TraceNotifierEvent                          // an invalidation reached a subscription: A start, B end, C kind<<8 | source
	TraceODPFault                               // the device raised a page fault: A va, B length, C key
	TraceODPResume                              // the fault was resumed: A va, B length, C 1 on error
	TraceInvalBegin                             // an ODP invalidation zapped a chunk: A first page of the MR, B pages
	TraceTLBFlush                               // a TLB flush was issued and completed: A first entry, B count, C nanoseconds waited
	TraceFastRegBind                            // FAST_REG_MR posted: A MPT index, B pages, C new key
	TraceFastRegInvalidate                      // LOCAL_INV or *_WITH_INV posted: C key
	TraceDoorbell                               // a doorbell was rung: A QP or context, B producer index, C 0 send, 1 receive
	TraceCompletion                             // a CQE was polled: A CQ index, B wr_id, C status
	TraceDoorbellRecord                         // a producer index went to the doorbell record of a QP or context only (the device polls it): A QP or context, B index, C 0 send, 1 receive
	TracePostSend                               // POST_SEND began: A QP, B the first WR's wr_id, C WRs asked for
	TraceInterrupt                              // the interrupt handler took sources: A the source bits
	TracePollSleep                              // Poll found nothing, armed the receive interrupt and the CQs, and sleeps: A the RHQ record's arm word (0: no record; every entry raises)
	// The device's own events (Device.TraceDevice; only a device model in
	// this process reports them: attach wires the embedded one).
	TraceDevDoorbell  // the device took a new send queue tail: A QP, B tail, C 0 register, 1 doorbell record
	TraceDevFetch     // the device read a send WQE: A QP, B wr_id, C its slot
	TraceDevExec      // the device finished a WQE's work: A QP, B wr_id, C status
	TraceDevCQE       // the device writes a CQE (traced before its seq word is stored): A CQ, B wr_id, C QP
	TraceDevInterrupt // the device raised an interrupt: A the pending sources
	traceKinds
)

var traceNames = [traceKinds]string{"?", "tid_register", "tid_unregister", "tid_invalidate", "tid_busy",
	"notifier_event", "odp_fault", "odp_resume", "inval_begin", "tlb_flush", "fastreg_bind",
	"fastreg_invalidate", "doorbell", "completion", "doorbell_record", "post_send", "interrupt",
	"poll_sleep", "dev_doorbell", "dev_fetch", "dev_exec", "dev_cqe", "dev_interrupt"}

func (k TraceKind) String() string {
	if k < traceKinds {
		return traceNames[k]
	}
	return fmt.Sprintf("TraceKind(%d)", k)
}

// TraceEvent is one decision: when, where (unit, context or -1) and what.
type TraceEvent struct {
	Time    time.Time
	Kind    TraceKind
	Unit    int
	Ctxt    int
	A, B, C uint64
}

// tracer fans trace events out to subscribers. With none, a trace point
// costs one atomic load (BenchmarkTraceOff).
type tracer struct {
	on      atomic.Bool
	mu      sync.Mutex
	subs    map[*TraceSub]struct{}
	dropped atomic.Uint64
}

// TraceSub is one consumer of trace events.
type TraceSub struct {
	t  *tracer
	ch chan TraceEvent
}

// Events delivers the events; it is closed by Stop.
func (s *TraceSub) Events() <-chan TraceEvent { return s.ch }

// Stop ends the subscription; events not read are dropped.
func (s *TraceSub) Stop() {
	t := s.t
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.subs[s]; !ok {
		return
	}
	delete(t.subs, s)
	close(s.ch)
	t.on.Store(len(t.subs) > 0)
}

// Trace subscribes to the module's trace events, with room for buffer
// events before a slow reader loses some (TraceDropped counts them): a
// trace never slows the driver down.
func (m *Module) Trace(buffer int) *TraceSub {
	t := &m.tracer
	s := &TraceSub{t: t, ch: make(chan TraceEvent, max(buffer, 1))}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.subs == nil {
		t.subs = map[*TraceSub]struct{}{}
	}
	t.subs[s] = struct{}{}
	t.on.Store(true)
	return s
}

// TraceDropped is how many events subscribers were too slow for.
func (m *Module) TraceDropped() uint64 { return m.tracer.dropped.Load() }

// TraceDevice records an event the device itself reported (a TraceDev*
// kind; others are ignored), with context -1.
func (d *Device) TraceDevice(kind TraceKind, a, b, c uint64) {
	if kind >= TraceDevDoorbell && kind <= TraceDevInterrupt {
		d.trace(kind, -1, a, b, c)
	}
}

// trace records a decision of device d (context ctxt, -1 for none).
func (d *Device) trace(kind TraceKind, ctxt int, a, b, c uint64) {
	if d.tracing() {
		d.traceAt(time.Now(), kind, ctxt, a, b, c)
	}
}

// tracing says whether anybody listens: a trace point that must take its
// time before the decision is known (traceAt) asks first.
func (d *Device) tracing() bool { return d.m.tracer.on.Load() }

// traceAt records a decision that happened at when.
func (d *Device) traceAt(when time.Time, kind TraceKind, ctxt int, a, b, c uint64) {
	t := &d.m.tracer
	if !t.on.Load() {
		return
	}
	ev := TraceEvent{Time: when, Kind: kind, Unit: d.info.Unit, Ctxt: ctxt, A: a, B: b, C: c}
	t.mu.Lock()
	for s := range t.subs {
		select {
		case s.ch <- ev:
		default:
			t.dropped.Add(1)
		}
	}
	t.mu.Unlock()
}
