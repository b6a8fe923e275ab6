package main

// bench --trace: the latency rows of write, read and send split into the
// stages of a work request, from the driver's trace (driver.Module.Trace):
// POST_SEND, its doorbell, and, from the embedded device model, the device
// taking the tail, fetching the WQE, finishing it, writing the CQE and
// raising the interrupt, then the driver's interrupt handler and the
// completion polled. A stage is the time from the event before it that the
// message had to the event that ends it; each row is the median over the
// messages that had both.

import (
	"sort"
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/driver"
)

// traceStage is one event of a work request's trail, in order.
type traceStage struct {
	name string // of the stage it ends
	kind driver.TraceKind
}

var traceStages = []traceStage{
	{"post", driver.TracePostSend}, // the start
	{"driver: WQE written, doorbell rung", driver.TraceDoorbell},
	{"device: doorbell seen", driver.TraceDevDoorbell},
	{"device: WQE fetched", driver.TraceDevFetch},
	{"device: executed", driver.TraceDevExec},
	{"device: CQE written", driver.TraceDevCQE},
	{"device: interrupt raised", driver.TraceDevInterrupt},
	{"driver: interrupt handled", driver.TraceInterrupt},
	{"driver: completion polled", driver.TraceCompletion},
}

// traceCollect gathers a module's trace events until stop.
type traceCollect struct {
	mod    *driver.Module
	sub    *driver.TraceSub
	events []driver.TraceEvent
	done   chan struct{}
	drop0  uint64
}

func startTraceCollect(m *driver.Module) *traceCollect {
	c := &traceCollect{mod: m, sub: m.Trace(1 << 16), done: make(chan struct{}), drop0: m.TraceDropped()}
	go func() {
		defer close(c.done)
		for ev := range c.sub.Events() {
			c.events = append(c.events, ev)
		}
	}()
	return c
}

// stop ends the collection and returns how many events were lost.
func (c *traceCollect) stop() uint64 {
	c.sub.Stop()
	<-c.done
	return c.mod.TraceDropped() - c.drop0
}

// breakdown splits the messages of requester QP qpn into traceStages: per
// stage the times of the messages that had it, the times from post to
// completion, and how many of those messages rang the doorbell register
// (a socket message on the vfio-user path) instead of the record alone.
func (c *traceCollect) breakdown(qpn uint32) (stages []samples, total samples, regDoorbells int) {
	qp := uint64(qpn - chip.QPNBase)
	ev := c.events
	sort.SliceStable(ev, func(i, j int) bool { return ev[i].Time.Before(ev[j].Time) })
	stages = make([]samples, len(traceStages))
	var (
		at     = make([]time.Time, len(traceStages))
		wr     uint64
		ctxt   int
		active bool
		reg    bool // its doorbell was a register write
	)
	for _, e := range ev {
		k := e.Kind
		if k == driver.TraceDoorbellRecord {
			k = driver.TraceDoorbell
		}
		if k == driver.TracePostSend {
			if e.A == qp {
				clear(at)
				at[0], wr, ctxt, active = e.Time, e.B, e.Ctxt, true
			}
			continue
		}
		if !active {
			continue
		}
		var mine bool
		switch k {
		case driver.TraceDoorbell:
			mine = e.A == qp && e.C == 0
			if mine && at[1].IsZero() {
				reg = e.Kind == driver.TraceDoorbell
			}
		case driver.TraceDevDoorbell:
			mine = e.A == qp
		case driver.TraceDevFetch, driver.TraceDevExec:
			mine = e.A == qp && e.B == wr
		case driver.TraceDevCQE:
			mine = e.C == qp && e.B == wr
		case driver.TraceDevInterrupt, driver.TraceInterrupt:
			mine = !at[stageOf(driver.TraceDevCQE)].IsZero() // the CQE's, not another's before it
		case driver.TraceCompletion:
			mine = e.Ctxt == ctxt && e.B == wr
		}
		s := stageOf(k)
		if !mine || s < 0 || !at[s].IsZero() {
			continue
		}
		at[s] = e.Time
		if k != driver.TraceCompletion {
			continue
		}
		last := 0
		for i := 1; i < len(at); i++ {
			if !at[i].IsZero() {
				stages[i] = append(stages[i], at[i].Sub(at[last]))
				last = i
			}
		}
		total = append(total, at[s].Sub(at[0]))
		if reg {
			regDoorbells++
		}
		active = false
	}
	return stages, total, regDoorbells
}

func stageOf(k driver.TraceKind) int {
	for i, s := range traceStages {
		if s.kind == k {
			return i
		}
	}
	return -1
}
