package main

import (
	"flag"
	"fmt"
	"math"
	"strings"

	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// Verbs objects in the shape of iproute2's rdma tool: memory regions, CQs
// and RC QPs named by the user, each created on the current open file (its
// protection domain) and used through it afterwards, whichever file is
// current then. The calls go through hfiuser, which lays the structs and
// their lists out in C layout. Work requests and completions are in
// cmds_wr.go.

type mrRec struct {
	name string
	of   *openFile
	buf  string
	off  int
	r    uapi.GohfiRegMR // addr, length, iova, access, handle, keys
	fr   *fastReg        // an alloc-mr MR (cmds_fastreg.go); nil for mr reg
}

type cqRec struct {
	name        string
	of          *openFile
	handle, cqe uint32
}

type qpRec struct {
	name           string
	of             *openFile
	attr           uapi.GohfiCreateQP // as created, with handle and qp_num
	sendCQ, recvCQ string
	state          uint32 // as last set, or ERR after an error completion
	dest           uint32 // remote QP number given at RTR
	access         uint32 // remote rights given to MODIFY_QP
}

// verbsObjs are a session's verbs objects by name, one namespace per kind.
type verbsObjs struct {
	mrs  map[string]*mrRec
	cqs  map[string]*cqRec
	qps  map[string]*qpRec
	wrID uint64 // last wr_id given by default
}

func newVerbsObjs() verbsObjs {
	return verbsObjs{mrs: map[string]*mrRec{}, cqs: map[string]*cqRec{}, qps: map[string]*qpRec{}}
}

// drop forgets the objects of a closed file (the driver destroyed them)
// and returns how many there were.
func (v *verbsObjs) drop(of *openFile) int {
	n := dropOf(v.mrs, func(r *mrRec) bool { return r.of == of })
	n += dropOf(v.cqs, func(r *cqRec) bool { return r.of == of })
	return n + dropOf(v.qps, func(r *qpRec) bool { return r.of == of })
}

func dropOf[T any](m map[string]T, gone func(T) bool) int {
	n := 0
	for k, v := range m {
		if gone(v) {
			delete(m, k)
			n++
		}
	}
	return n
}

// named looks an object up: ENOENT when there is none of that name.
func named[T any](m map[string]T, kind, name string) (T, error) {
	v, ok := m[name]
	if !ok {
		var zero T
		return zero, fmt.Errorf("no %s %q: %w", kind, name, unix.ENOENT)
	}
	return v, nil
}

// parseNamed parses a command's flags around one positional argument, the
// name of an object of m.
func parseNamed[T any](fs *flag.FlagSet, args []string, m map[string]T, kind string) (string, T, error) {
	pos, err := parseArgs(fs, args, 1, 1)
	if err != nil {
		var zero T
		return "", zero, err
	}
	v, err := named(m, kind, pos[0])
	return pos[0], v, err
}

// parseNew parses a command that creates an object of a kind: n
// positional arguments, the first the new name, which must not be in m.
func parseNew[T any](fs *flag.FlagSet, args []string, n int, m map[string]T, kind string) ([]string, error) {
	pos, err := parseArgs(fs, args, n, n)
	if err != nil {
		return nil, err
	}
	if err := unused(m, kind, pos[0]); err != nil {
		return nil, err
	}
	return pos, nil
}

func unused[T any](m map[string]T, kind, name string) error {
	if _, ok := m[name]; ok {
		return fmt.Errorf("%s %q exists: %w", kind, name, unix.EEXIST)
	}
	return nil
}

// showCmd is "KIND show [NAME]": one object, or all of a kind in name
// order.
func showCmd[T any](args []string, cmd string, m map[string]T, kind, key string, describe func(T) (obj, error)) (obj, error) {
	pos, err := parseArgs(newFlags(cmd), args, 0, 1)
	if err != nil {
		return nil, err
	}
	if len(pos) == 1 {
		v, err := named(m, kind, pos[0])
		if err != nil {
			return nil, err
		}
		return describe(v)
	}
	list := []obj{}
	for _, n := range sortedKeys(m) {
		o, err := describe(m[n])
		if err != nil {
			return nil, fmt.Errorf("%s: %w", n, err)
		}
		list = append(list, o)
	}
	return obj{{key, list}}, nil
}

// destroyCmd is "KIND destroy NAME": the object is forgotten once destroy
// succeeded.
func destroyCmd[T any](args []string, cmd string, m map[string]T, kind string, destroy func(T) (obj, error)) (obj, error) {
	name, v, err := parseNamed(newFlags(cmd), args, m, kind)
	if err != nil {
		return nil, err
	}
	o, err := destroy(v)
	if err != nil {
		return nil, err
	}
	delete(m, name)
	return o, nil
}

// subCommands are the commands whose results and errors are named with
// their subcommand ("mr reg").
var subCommands = map[string]bool{"mr": true, "cq": true, "qp": true, "peer": true}

// subcommand runs the function subs names by args[0].
func subcommand(s *session, cmd string, args []string, subs map[string]func(*session, []string) (obj, error)) (obj, error) {
	if len(args) > 0 {
		if f, ok := subs[args[0]]; ok {
			return f(s, args[1:])
		}
	}
	return nil, usageErr("usage: %s %s", cmd, commands[cmd].args)
}

// verbsFile is the current file with a context: the driver gives a file
// its protection domain with its context, so a file without one gets one
// here, as assign-ctxt would.
func (s *session) verbsFile() (*openFile, error) {
	of, err := s.file()
	if err != nil {
		return nil, err
	}
	if of.ci == nil {
		if err := s.assign(of, uapi.Hfi1UserInfo{Userversion: uapi.HFI1_USER_SWVERSION}); err != nil {
			return nil, err
		}
	}
	return of, nil
}

var accessNames = map[uint64]string{
	uapi.IB_ACCESS_LOCAL_WRITE: "local_write", uapi.IB_ACCESS_REMOTE_WRITE: "remote_write",
	uapi.IB_ACCESS_REMOTE_READ: "remote_read", uapi.IB_ACCESS_REMOTE_ATOMIC: "remote_atomic",
	uapi.IB_ACCESS_MW_BIND: "mw_bind", uapi.IB_ACCESS_ZERO_BASED: "zero_based",
	uapi.IB_ACCESS_ON_DEMAND: "on_demand", uapi.IB_ACCESS_HUGETLB: "hugetlb",
}

func parseAccess(s string) (uint32, error) {
	v, err := parseBits("access", s, accessNames)
	if v > 1<<32-1 {
		return 0, usageErr("access %q: wider than 32 bits", s)
	}
	return uint32(v), err
}

var qpStateNames = map[uint32]string{
	uapi.GOHFI_QPS_RESET: "reset", uapi.GOHFI_QPS_INIT: "init", uapi.GOHFI_QPS_RTR: "rtr",
	uapi.GOHFI_QPS_RTS: "rts", uapi.GOHFI_QPS_SQD: "sqd", uapi.GOHFI_QPS_SQE: "sqe", uapi.GOHFI_QPS_ERR: "err",
}

func cmdMR(s *session, args []string) (obj, error) {
	return subcommand(s, "mr", args, map[string]func(*session, []string) (obj, error){
		"reg": mrReg,
		"dereg": func(s *session, a []string) (obj, error) {
			return destroyCmd(a, "mr", s.verbs.mrs, "MR", func(m *mrRec) (obj, error) {
				return obj{{"name", m.name}, {"handle", m.r.Handle}, {"rkey", hex(m.r.Rkey)}}, hfiuser.DeregMR(m.of.f, m.r.Handle)
			})
		},
		"show": func(s *session, a []string) (obj, error) {
			return showCmd(a, "mr", s.verbs.mrs, "MR", "mrs", (*mrRec).describe)
		},
	})
}

// bufSpan reads BUF[:OFF[:LEN]]: a named buffer and a range of it, by
// default from OFF to the end.
func (s *session) bufSpan(spec string) (b *buffer, off, n int, err error) {
	name, rng, _ := strings.Cut(spec, ":")
	if b, err = s.buffer(name); err != nil {
		return nil, 0, 0, err
	}
	offArg, lenArg, _ := strings.Cut(rng, ":")
	off, n, err = resolveSpan(offArg, lenArg, b.b.Len())
	return b, off, n, err
}

func mrReg(s *session, args []string) (obj, error) {
	fs := newFlags("mr")
	accessArg := fs.String("access", "local_write", "IB_ACCESS_* names joined by , or a number")
	iovaArg := fs.String("iova", "", "device address of the first byte (default: its virtual address)")
	odp := fs.Bool("odp", false, "on-demand paging: add on_demand to the access (nothing pinned until the device faults)")
	implicit := fs.Bool("implicit", false, "implicit ODP: the whole address space (address 0, length UINT64_MAX, iova 0, on_demand), no BUF")
	pos, err := parseArgs(fs, args, 1, 2)
	if err != nil {
		return nil, err
	}
	switch {
	case *implicit && len(pos) != 1:
		return nil, usageErr("mr reg --implicit takes NAME only: the MR is the whole address space")
	case !*implicit && len(pos) != 2:
		return nil, usageErr("mr reg NAME BUF[:OFF[:LEN]]: want a buffer (or --implicit)")
	}
	if err := unused(s.verbs.mrs, "MR", pos[0]); err != nil {
		return nil, err
	}
	access, err := parseAccess(*accessArg)
	if err != nil {
		return nil, err
	}
	if *odp || *implicit {
		access |= uapi.IB_ACCESS_ON_DEMAND
	}
	m := &mrRec{name: pos[0]}
	var addr uintptr
	var length, iova uint64 = math.MaxUint64, 0
	if !*implicit {
		b, off, n, err := s.bufSpan(pos[1])
		if err != nil {
			return nil, err
		}
		m.buf, m.off = b.name, off
		addr = b.b.Addr() + uintptr(off)
		length, iova = uint64(n), uint64(addr)
	}
	if *iovaArg != "" {
		if iova, err = parseUint("iova", *iovaArg, 64); err != nil {
			return nil, err
		}
	}
	if m.of, err = s.verbsFile(); err != nil {
		return nil, err
	}
	if m.r, err = hfiuser.RegMR(m.of.f, addr, length, iova, access); err != nil {
		return nil, err
	}
	s.verbs.mrs[m.name] = m
	return m.describe()
}

// describe shows the MR with its pinned pages (MR_STATS), for an ODP MR
// its paging counters, with rdma-core's names, and for a fast-reg MR its
// state and binding.
func (m *mrRec) describe() (obj, error) {
	st, err := hfiuser.MRStats(m.of.f, m.r.Handle)
	if err != nil {
		return nil, err
	}
	if m.fr != nil {
		return m.describeFastReg(st), nil
	}
	kind := "pinned"
	switch {
	case m.r.AccessFlags&uapi.IB_ACCESS_ON_DEMAND != 0 && m.r.Addr == 0 && m.r.Length == math.MaxUint64:
		kind = "implicit" // pages_pinned and the counters sum its children
	case m.r.AccessFlags&uapi.IB_ACCESS_ON_DEMAND != 0:
		kind = "odp"
	}
	o := obj{
		{"name", m.name}, {"file", m.of.name}, {"kind", kind}, {"buffer", m.buf}, {"offset", m.off},
		{"addr", hex(m.r.Addr)}, {"length", m.r.Length}, {"iova", hex(m.r.Iova)},
		{"access", bitNames(uint64(m.r.AccessFlags), accessNames)}, {"handle", m.r.Handle},
		{"lkey", hex(m.r.Lkey)}, {"rkey", hex(m.r.Rkey)}, {"pages_pinned", st.PagesPinned},
	}
	if m.r.AccessFlags&uapi.IB_ACCESS_ON_DEMAND != 0 {
		o = append(o, obj{{"page_faults", st.PageFaults}, {"page_faults_handled", st.PageFaultsHandled},
			{"page_invalidations", st.PageInvalidations}, {"page_invalidations_handled", st.PageInvalidationsHandled},
			{"page_prefetch", st.PagePrefetch}}...)
	}
	return o, nil
}

var adviceNames = map[string]uint32{
	"prefetch": uapi.GOHFI_ADVISE_MR_ADVICE_PREFETCH, "prefetch_write": uapi.GOHFI_ADVISE_MR_ADVICE_PREFETCH_WRITE,
	"prefetch_no_fault": uapi.GOHFI_ADVISE_MR_ADVICE_PREFETCH_NO_FAULT,
}

// cmdAdviseMR is ADVISE_MR on [iova+off, +len) of a named MR (the whole
// MR by default); with --flush it returns once the pages are mapped and
// shows the MR's counters, else the driver maps them later.
func cmdAdviseMR(s *session, args []string) (obj, error) {
	fs := newFlags("advise-mr")
	adviceArg := fs.String("advice", "prefetch", "prefetch, prefetch_write or prefetch_no_fault")
	flush := fs.Bool("flush", false, "GOHFI_ADVISE_MR_FLAG_FLUSH: synchronous")
	offArg := fs.String("off", "", "offset in the MR (default 0)")
	lenArg := fs.String("len", "", "length (default: to the end of the MR)")
	bufArg := fs.String("buf", "", "BUF[:OFF[:LEN]]: advise that range of a buffer instead (an implicit MR's only way)")
	pos, err := parseArgs(fs, args, 1, 1)
	if err != nil {
		return nil, err
	}
	m, err := named(s.verbs.mrs, "MR", pos[0])
	if err != nil {
		return nil, err
	}
	advice, ok := adviceNames[*adviceArg]
	if !ok {
		return nil, usageErr("advice %q: want prefetch, prefetch_write or prefetch_no_fault", *adviceArg)
	}
	var off, n int
	switch {
	case *bufArg != "":
		if *offArg != "" || *lenArg != "" {
			return nil, usageErr("advise-mr: --buf or --off/--len, not both")
		}
		b, boff, bn, err := s.bufSpan(*bufArg)
		if err != nil {
			return nil, err
		}
		// The driver judges whether the range lies in the MR.
		off, n = int(uint64(b.b.Addr())+uint64(boff)-m.r.Iova), bn
	case m.r.Length == math.MaxUint64:
		return nil, usageErr("advise-mr %s: an implicit MR needs --buf BUF[:OFF[:LEN]]", m.name)
	default:
		if off, n, err = resolveSpan(*offArg, *lenArg, int(m.r.Length)); err != nil {
			return nil, err
		}
	}
	var flags uint32
	if *flush {
		flags = uapi.GOHFI_ADVISE_MR_FLAG_FLUSH
	}
	if err := hfiuser.AdviseMR(m.of.f, advice, flags, m.r.Lkey, m.r.Iova+uint64(off), uint64(n)); err != nil {
		return nil, err
	}
	o, err := m.describe()
	if err != nil {
		return nil, err
	}
	return append(obj{{"advice", *adviceArg}, {"flush", *flush}, {"advised_offset", off}, {"advised_length", n}}, o...), nil
}

func cmdCQ(s *session, args []string) (obj, error) {
	return subcommand(s, "cq", args, map[string]func(*session, []string) (obj, error){
		"create": cqCreate,
		"destroy": func(s *session, a []string) (obj, error) {
			return destroyCmd(a, "cq", s.verbs.cqs, "CQ", func(c *cqRec) (obj, error) {
				return obj{{"name", c.name}, {"handle", c.handle}}, hfiuser.DestroyCQ(c.of.f, c.handle)
			})
		},
		"show": func(s *session, a []string) (obj, error) {
			return showCmd(a, "cq", s.verbs.cqs, "CQ", "cqs", (*cqRec).describe)
		},
	})
}

func cqCreate(s *session, args []string) (obj, error) {
	fs := newFlags("cq")
	cqe := fs.Uint("cqe", 64, "completions the CQ must hold")
	pos, err := parseNew(fs, args, 1, s.verbs.cqs, "CQ")
	if err != nil {
		return nil, err
	}
	of, err := s.verbsFile()
	if err != nil {
		return nil, err
	}
	h, n, err := hfiuser.CreateCQ(of.f, uint32(*cqe), 0)
	if err != nil {
		return nil, err
	}
	c := &cqRec{name: pos[0], of: of, handle: h, cqe: n}
	s.verbs.cqs[c.name] = c
	return c.describe()
}

func (c *cqRec) describe() (obj, error) {
	return obj{{"name", c.name}, {"file", c.of.name}, {"handle", c.handle}, {"cqe", c.cqe}}, nil
}

func cmdQP(s *session, args []string) (obj, error) {
	return subcommand(s, "qp", args, map[string]func(*session, []string) (obj, error){
		"create": qpCreate,
		"modify": qpModify,
		"destroy": func(s *session, a []string) (obj, error) {
			return destroyCmd(a, "qp", s.verbs.qps, "QP", func(q *qpRec) (obj, error) {
				return obj{{"name", q.name}, {"handle", q.attr.Handle}, {"qpn", q.attr.QPNum}}, hfiuser.DestroyQP(q.of.f, q.attr.Handle)
			})
		},
		"show": func(s *session, a []string) (obj, error) {
			return showCmd(a, "qp", s.verbs.qps, "QP", "qps", (*qpRec).describe)
		},
	})
}

func qpCreate(s *session, args []string) (obj, error) {
	fs := newFlags("qp")
	cq := fs.String("cq", "", "send and receive CQ")
	sendCQ := fs.String("send-cq", "", "send CQ (default --cq)")
	recvCQ := fs.String("recv-cq", "", "receive CQ (default --cq)")
	maxSendWR := fs.Uint("max-send-wr", 16, "send queue depth")
	maxRecvWR := fs.Uint("max-recv-wr", 16, "receive queue depth")
	maxSendSge := fs.Uint("max-send-sge", 4, "SGEs per send WR")
	maxRecvSge := fs.Uint("max-recv-sge", 4, "SGEs per receive WR")
	sigAll := fs.Bool("sig-all", false, "every send WR completes signaled (sq_sig_all)")
	pos, err := parseNew(fs, args, 1, s.verbs.qps, "QP")
	if err != nil {
		return nil, err
	}
	q := &qpRec{name: pos[0], sendCQ: *sendCQ, recvCQ: *recvCQ}
	if q.sendCQ == "" {
		q.sendCQ = *cq
	}
	if q.recvCQ == "" {
		q.recvCQ = *cq
	}
	if q.sendCQ == "" || q.recvCQ == "" {
		return nil, usageErr("want --cq CQ, or --send-cq CQ and --recv-cq CQ")
	}
	sc, err := named(s.verbs.cqs, "CQ", q.sendCQ)
	if err != nil {
		return nil, err
	}
	rc, err := named(s.verbs.cqs, "CQ", q.recvCQ)
	if err != nil {
		return nil, err
	}
	if q.of, err = s.verbsFile(); err != nil {
		return nil, err
	}
	a := uapi.GohfiCreateQP{QPType: uapi.GOHFI_QPT_RC, SendCQ: sc.handle, RecvCQ: rc.handle,
		MaxSendWR: uint32(*maxSendWR), MaxRecvWR: uint32(*maxRecvWR),
		MaxSendSge: uint32(*maxSendSge), MaxRecvSge: uint32(*maxRecvSge)}
	if *sigAll {
		a.SqSigAll = 1
	}
	if q.attr, err = hfiuser.CreateQP(q.of.f, a); err != nil {
		return nil, err
	}
	s.verbs.qps[q.name] = q
	return q.describe()
}

func (q *qpRec) describe() (obj, error) {
	var dest any
	if q.dest != 0 {
		dest = q.dest
	}
	return obj{
		{"name", q.name}, {"file", q.of.name}, {"handle", q.attr.Handle}, {"qpn", q.attr.QPNum},
		{"type", "RC"}, {"state", qpStateNames[q.state]}, {"send_cq", q.sendCQ}, {"recv_cq", q.recvCQ},
		{"max_send_wr", q.attr.MaxSendWR}, {"max_recv_wr", q.attr.MaxRecvWR},
		{"max_send_sge", q.attr.MaxSendSge}, {"max_recv_sge", q.attr.MaxRecvSge},
		{"sig_all", q.attr.SqSigAll != 0}, {"dest_qp", dest}, {"access", bitNames(uint64(q.access), accessNames)},
	}, nil
}

// qpNum reads a QP number or the name of a QP.
func (s *session) qpNum(arg string) (uint32, error) {
	if q, ok := s.verbs.qps[arg]; ok {
		return q.attr.QPNum, nil
	}
	v, err := parseUint("QP", arg, 32)
	if err != nil {
		return 0, usageErr("QP %q: not a QP number or a QP's name", arg)
	}
	return uint32(v), nil
}

func qpModify(s *session, args []string) (obj, error) {
	fs := newFlags("qp")
	stateArg := fs.String("state", "", "reset, init, rtr, rts or err")
	destArg := fs.String("dest-qp", "", "RTR: the remote QP, a number or a QP's name (default: as last given)")
	port := fs.Uint("dest-port", 0, "RTR: the remote device, 0 for this one")
	accessArg := fs.String("access", "", "remote_write,remote_read,remote_atomic granted (default: as last given)")
	sqPsn := fs.Uint("sq-psn", 0, "RTS: first send PSN")
	rqPsn := fs.Uint("rq-psn", 0, "RTR: first expected PSN")
	def := driver.DefaultNetAttr
	timeout := fs.Uint("timeout", uint(def.Timeout), "RTR to a peer: retransmission timeout, 4.096 us << N (0..31)")
	retryCnt := fs.Uint("retry-cnt", uint(def.RetryCnt), "RTR to a peer: retransmissions without progress before RETRY_EXC_ERR (0..7)")
	rnrRetry := fs.Uint("rnr-retry", uint(def.RnrRetry), "RTR to a peer: RNR retries, 7 without limit (0..7)")
	minRnrTimer := fs.Uint("min-rnr-timer", uint(def.MinRnrTimer), "RTR to a peer: the RNR timer code of this QP's RNR NAKs (0..31)")
	_, q, err := parseNamed(fs, args, s.verbs.qps, "QP")
	if err != nil {
		return nil, err
	}
	var m uapi.GohfiModifyQP
	// Any of the four given: all four are passed (the others at their
	// defaults), as GOHFI_MODIFY_QP_NET covers them together.
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "timeout", "retry-cnt", "rnr-retry", "min-rnr-timer":
			m.Flags = uapi.GOHFI_MODIFY_QP_NET
		}
	})
	if m.Flags != 0 {
		for _, a := range []struct {
			name string
			v    uint
			dst  *uint8
		}{{"timeout", *timeout, &m.Timeout}, {"retry-cnt", *retryCnt, &m.RetryCnt}, {"rnr-retry", *rnrRetry, &m.RnrRetry}, {"min-rnr-timer", *minRnrTimer, &m.MinRnrTimer}} {
			if a.v > math.MaxUint8 {
				return nil, usageErr("--%s %d: out of range", a.name, a.v)
			}
			*a.dst = uint8(a.v)
		}
	}
	state, ok := uint32(0), false
	for v, n := range qpStateNames {
		if strings.EqualFold(*stateArg, n) {
			state, ok = v, true
		}
	}
	if !ok {
		return nil, usageErr("--state %q: want reset, init, rtr, rts or err", *stateArg)
	}
	access, dest := q.access, q.dest
	if *accessArg != "" {
		if access, err = parseAccess(*accessArg); err != nil {
			return nil, err
		}
	}
	if *destArg != "" {
		if dest, err = s.qpNum(*destArg); err != nil {
			return nil, err
		}
	}
	m.Handle, m.QPState, m.DestQPNum, m.DestPort = q.attr.Handle, state, dest, uint32(*port)
	m.SqPsn, m.RqPsn, m.AccessFlags = uint32(*sqPsn), uint32(*rqPsn), access
	if err := hfiuser.ModifyQP(q.of.f, m); err != nil {
		return nil, err
	}
	q.state, q.access = state, access
	if state == uapi.GOHFI_QPS_RTR {
		q.dest = dest
	}
	o, _ := q.describe()
	return obj{{"name", q.name}, {"qpn", q.attr.QPNum}, {"state", o.get("state")}, {"dest_qp", o.get("dest_qp")},
		{"access", o.get("access")}}, nil
}
