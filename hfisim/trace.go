package hfisim

import "sync/atomic"

// TraceKind is an event of the device model for a tracer (SetTrace): the
// device's edges of a work request, so that a latency can be split where
// only the device sees it (the driver's trace has the host's side).
type TraceKind uint8

// The device's trace points. A, B and C mean what each says.
const (
	TraceDoorbell  TraceKind = iota + 1 // the engine took a new send queue tail: A QP, B tail, C 0 register, 1 doorbell record
	TraceFetch                          // the engine read a send WQE: A QP, B wr_id, C its slot
	TraceExec                           // the WQE's work is done (its data moved, or it failed): A QP, B wr_id, C status
	TraceCQE                            // a CQE is written (traced before its seq word is: the consumer may see it at once): A CQ, B wr_id, C QP
	TraceInterrupt                      // an interrupt was raised: A the pending sources
)

// TraceFunc receives the device's trace events, on the device's
// goroutines (sometimes under its lock: it must not call into the device).
type TraceFunc func(kind TraceKind, a, b, c uint64)

// SetTrace installs f as the device's tracer (nil removes it). Without one
// a trace point costs an atomic load.
func (d *Device) SetTrace(f TraceFunc) {
	if f == nil {
		d.tracer.Store(nil)
		return
	}
	d.tracer.Store(&f)
}

// trace reports an event to the tracer, if any.
func (d *Device) trace(kind TraceKind, a, b, c uint64) {
	if f := d.tracer.Load(); f != nil {
		(*f)(kind, a, b, c)
	}
}

// traceHook is the device's tracer slot.
type traceHook = atomic.Pointer[TraceFunc]
