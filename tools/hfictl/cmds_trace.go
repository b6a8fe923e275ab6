package main

import (
	"strings"
	"time"

	"github.com/gohfi/gohfi/driver"
)

// trace: the driver's decisions as a live stream (driver.Module.Trace), in
// the spirit of hfi1's tracepoints. `trace on` starts printing events as
// they happen, interleaved with the commands' results; `trace off` prints
// the rest and how many a slow reader lost.

// traceFields names A, B and C of each kind (driver/trace.go).
var traceFields = map[driver.TraceKind][3]string{
	driver.TraceTIDRegister:       {"vaddr", "pages", "tid"},
	driver.TraceTIDUnregister:     {"vaddr", "pages", "tid"},
	driver.TraceTIDInvalidate:     {"vaddr", "pages", "tid"},
	driver.TraceTIDBusy:           {"vaddr", "length", ""},
	driver.TraceNotifierEvent:     {"start", "end", "kind_source"},
	driver.TraceODPFault:          {"va", "length", "key"},
	driver.TraceODPResume:         {"va", "length", "error"},
	driver.TraceInvalBegin:        {"first_page", "pages", ""},
	driver.TraceTLBFlush:          {"mtt_first", "count", "wait_ns"},
	driver.TraceFastRegBind:       {"mpt_index", "pages", "key"},
	driver.TraceFastRegInvalidate: {"", "", "key"},
	driver.TraceDoorbell:          {"queue", "index", "receive"},
	driver.TraceDoorbellRecord:    {"queue", "index", "receive"},
	driver.TraceCompletion:        {"cq", "wr_id", "status"},
	driver.TracePostSend:          {"queue", "wr_id", "count"},
	driver.TraceInterrupt:         {"sources", "", ""},
	driver.TracePollSleep:         {"arm", "", ""},
	driver.TraceDevDoorbell:       {"queue", "index", "record"},
	driver.TraceDevFetch:          {"queue", "wr_id", "slot"},
	driver.TraceDevExec:           {"queue", "wr_id", "status"},
	driver.TraceDevCQE:            {"cq", "wr_id", "queue"},
	driver.TraceDevInterrupt:      {"sources", "", ""},
}

// tracing is a running `trace on`.
type tracing struct {
	sub   *driver.TraceSub
	start time.Time
	done  chan struct{}
	kinds map[driver.TraceKind]bool // nil: all
}

func cmdTrace(s *session, args []string) (obj, error) {
	fs := newFlags("trace")
	kindsArg := fs.String("kinds", "", "on: only these kinds (comma-separated names, e.g. tid_register,completion)")
	rest, err := parseArgs(fs, args, 1, 1)
	if err != nil {
		return nil, err
	}
	switch rest[0] {
	case "on":
		return s.traceOn(*kindsArg)
	case "off":
		return s.traceOff(), nil
	}
	return nil, usageErr("trace %q: want on or off", rest[0])
}

func (s *session) traceOn(kinds string) (obj, error) {
	if s.trace != nil {
		return nil, usageErr("trace is on already")
	}
	a, err := s.device()
	if err != nil {
		return nil, err
	}
	t := &tracing{sub: a.Module.Trace(4096), start: time.Now(), done: make(chan struct{})}
	if kinds != "" {
		t.kinds = map[driver.TraceKind]bool{}
		for _, name := range strings.Split(kinds, ",") {
			k, ok := traceKind(name)
			if !ok {
				t.sub.Stop()
				return nil, usageErr("trace kind %q", name)
			}
			t.kinds[k] = true
		}
	}
	s.trace = t
	go func() {
		defer close(t.done)
		for ev := range t.sub.Events() {
			if t.kinds == nil || t.kinds[ev.Kind] {
				s.p.result("trace", traceObj(t.start, ev))
			}
		}
	}()
	return obj{{"trace", "on"}}, nil
}

// traceOff stops the stream after printing what it holds.
func (s *session) traceOff() obj {
	t := s.trace
	if t == nil {
		return obj{{"trace", "off"}}
	}
	s.trace = nil
	t.sub.Stop()
	<-t.done
	return obj{{"trace", "off"}, {"dropped", s.att.Module.TraceDropped()}}
}

func traceKind(name string) (driver.TraceKind, bool) {
	for k := range traceFields {
		if k.String() == name {
			return k, true
		}
	}
	return 0, false
}

func traceObj(start time.Time, ev driver.TraceEvent) obj {
	o := obj{{"t_us", float64(ev.Time.Sub(start).Nanoseconds()) / 1e3}, {"kind", ev.Kind.String()},
		{"unit", ev.Unit}, {"ctxt", ev.Ctxt}}
	names := traceFields[ev.Kind]
	for i, v := range [3]uint64{ev.A, ev.B, ev.C} {
		if names[i] != "" {
			o.add(names[i], hex(v))
		}
	}
	return o
}
