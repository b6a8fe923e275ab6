package main

// hfictl bench write|read|send: the verbs paths of the perftest-style bench
// (bench_perf.go), over loopback between two files of one device; and
// bench reg, the cost of REG_MR + DEREG_MR.

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"time"

	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/mem"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

const (
	benchRemoteAccess = uapi.IB_ACCESS_LOCAL_WRITE | uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ
	benchWaitLimit    = 10 * time.Second // no completion for this long is an error
)

func cmdBench(s *session, args []string) (obj, error) {
	perf := func(ops ...string) func(*session, []string) (obj, error) {
		return func(s *session, a []string) (obj, error) { return benchPerf(s, ops, a) }
	}
	return subcommand(s, "bench", args, map[string]func(*session, []string) (obj, error){
		"tid":      benchTID,
		"write":    perf("write"),
		"read":     perf("read"),
		"send":     perf("send"),
		"expected": perf("expected"),
		"all":      perf(perfOps...),
		"reg":      benchReg,
	})
}

// pow2Sizes lists the powers of two from lo to hi.
func pow2Sizes(lo, hi int) []int {
	var sizes []int
	for n := lo; n <= hi; n *= 2 {
		sizes = append(sizes, n)
	}
	return sizes
}

// msgRate is messages per second.
type msgRate float64

func (r msgRate) String() string {
	if r >= 1e3 {
		return fmt.Sprintf("%.1fk/s", float64(r)/1e3)
	}
	return fmt.Sprintf("%.0f/s", float64(r))
}

// verbsEngine is two files of one device (a requester and a responder
// context, each its own PD) with qps RC QPs each, connected pairwise, the
// requester's on one CQ and the responder's on another.
type verbsEngine struct {
	ctx           context.Context
	op            uint32
	req, resp     *driver.File
	reqCQ, respCQ uint32
	qps           [][2]uint32 // requester's and responder's QP handles
	reqQPN        uint32      // the QP number of the requester's first QP (the latency rows')
	wc            []uapi.GohfiWC
	sgl           []uapi.GohfiSge // one per WR of a PostSend or PostRecv call, reused

	r            *perfRegion
	srcMR, dstMR uapi.GohfiRegMR
	mrs          []mrOn // to deregister

	events bool // wait for completions armed and asleep (perftest -e), else busy poll
}

type mrOn struct {
	f      *driver.File
	handle uint32
}

var verbsOps = map[string]uint32{"write": uapi.GOHFI_WR_RDMA_WRITE, "read": uapi.GOHFI_WR_RDMA_READ, "send": uapi.GOHFI_WR_SEND}

func newVerbsEngine(ctx context.Context, dev *driver.Device, op string, qps, depth int) (e *verbsEngine, err error) {
	e = &verbsEngine{ctx: ctx, op: verbsOps[op], wc: make([]uapi.GohfiWC, 64), sgl: make([]uapi.GohfiSge, depth)}
	defer func() {
		if err != nil {
			err = errors.Join(err, e.close())
		}
	}()
	files := [2]*driver.File{}
	cqs := [2]uint32{}
	for i := range files {
		f, err := dev.Open()
		if err != nil {
			return nil, err
		}
		files[i] = f
		if i == 0 {
			e.req = f
		} else {
			e.resp = f
		}
		if err := hfiuser.AssignCtxt(f); err != nil {
			return nil, fmt.Errorf("ASSIGN_CTXT: %w", err)
		}
		if cqs[i], _, err = hfiuser.CreateCQ(f, uint32(qps*depth), 0); err != nil {
			return nil, fmt.Errorf("CREATE_CQ: %w", err)
		}
	}
	e.reqCQ, e.respCQ = cqs[0], cqs[1]
	for range qps {
		var h, qpn [2]uint32
		for i, f := range files {
			r, err := hfiuser.CreateQP(f, uapi.GohfiCreateQP{QPType: uapi.GOHFI_QPT_RC, SendCQ: cqs[i], RecvCQ: cqs[i],
				MaxSendWR: uint32(depth), MaxRecvWR: uint32(depth), MaxSendSge: 1, MaxRecvSge: 1})
			if err != nil {
				return nil, fmt.Errorf("CREATE_QP: %w", err)
			}
			h[i], qpn[i] = r.Handle, r.QPNum
		}
		for i, f := range files {
			for _, st := range []uint32{uapi.GOHFI_QPS_INIT, uapi.GOHFI_QPS_RTR, uapi.GOHFI_QPS_RTS} {
				m := uapi.GohfiModifyQP{Handle: h[i], QPState: st, DestQPNum: qpn[1-i],
					AccessFlags: uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ}
				if err := hfiuser.ModifyQP(f, m); err != nil {
					return nil, fmt.Errorf("MODIFY_QP to %s: %w", qpStateNames[st], err)
				}
			}
		}
		if len(e.qps) == 0 {
			e.reqQPN = qpn[0]
		}
		e.qps = append(e.qps, h)
	}
	return e, nil
}

// close closes the files: the driver destroys their QPs, CQs and MRs.
func (e *verbsEngine) close() error { return closeBenchFiles(e.req, e.resp) }

// closeBenchFiles closes the bench's files that were opened (nil: not).
func closeBenchFiles(fs ...*driver.File) error {
	var errs []error
	for _, f := range fs {
		if f != nil {
			if err := f.Close(); err != nil {
				errs = append(errs, fmt.Errorf("closing a bench file: %w", err))
			}
		}
	}
	return errors.Join(errs...)
}

func (e *verbsEngine) stride(size int) int {
	return (size + perfSlotAlign - 1) / perfSlotAlign * perfSlotAlign
}

func (e *verbsEngine) maxSlots(int) int { return perfMaxIters }

// prepare registers the source on the side that reads it and the
// destination on the side written: WRITE and SEND from the requester into
// the responder, READ from the responder into the requester.
func (e *verbsEngine) prepare(r *perfRegion) (err error) {
	e.r = r
	srcF, dstF := e.req, e.resp
	srcAcc, dstAcc := uint32(uapi.IB_ACCESS_LOCAL_WRITE), uint32(benchRemoteAccess)
	if e.op == uapi.GOHFI_WR_RDMA_READ {
		srcF, dstF = e.resp, e.req
		srcAcc, dstAcc = benchRemoteAccess, uapi.IB_ACCESS_LOCAL_WRITE
	}
	reg := func(f *driver.File, b *mem.Buffer, acc uint32) (uapi.GohfiRegMR, error) {
		m, err := hfiuser.RegMR(f, b.Addr(), uint64(b.Len()), uint64(b.Addr()), acc)
		if err != nil {
			return m, fmt.Errorf("REG_MR of %d bytes: %w", b.Len(), err)
		}
		e.mrs = append(e.mrs, mrOn{f, m.Handle})
		return m, nil
	}
	if e.srcMR, err = reg(srcF, r.src, srcAcc); err != nil {
		return err
	}
	if e.dstMR, err = reg(dstF, r.dst, dstAcc); err != nil {
		return errors.Join(err, e.release())
	}
	return nil
}

func (e *verbsEngine) release() error {
	var errs []error
	for _, m := range e.mrs {
		if err := hfiuser.DeregMR(m.f, m.handle); err != nil {
			errs = append(errs, fmt.Errorf("DEREG_MR: %w", err))
		}
	}
	e.mrs, e.r = nil, nil
	return errors.Join(errs...)
}

// qpRound is one QP's share of a round: m messages (i = j*nq + q for its
// j-th), how many were posted and completed, and for SEND how many
// receives were posted and completed.
type qpRound struct {
	m, posted, done, rposted, rdone int
}

// sendWR is message i, the j-th of its QP's m, signaled when it is an
// every-th or the QP's last; its SGE is e.sgl[k] (PostSend copies it).
func (e *verbsEngine) sendWR(k, i, j, m, every int) hfiuser.SendWR {
	r := e.r
	e.sgl[k] = uapi.GohfiSge{Addr: uint64(r.srcAddr(i)), Length: uint32(r.size), Lkey: e.srcMR.Lkey}
	w := hfiuser.SendWR{SGL: e.sgl[k : k+1]}
	w.WrID, w.Opcode = uint64(i), e.op
	switch e.op {
	case uapi.GOHFI_WR_RDMA_WRITE:
		w.RemoteAddr, w.Rkey = uint64(r.dstAddr(i)), e.dstMR.Rkey
	case uapi.GOHFI_WR_RDMA_READ:
		w.SGL[0] = uapi.GohfiSge{Addr: uint64(r.dstAddr(i)), Length: uint32(r.size), Lkey: e.dstMR.Lkey}
		w.RemoteAddr, w.Rkey = uint64(r.srcAddr(i)), e.srcMR.Rkey
	}
	if (j+1)%every == 0 || j == m-1 {
		w.SendFlags = uapi.GOHFI_SEND_SIGNALED
	}
	return w
}

func (e *verbsEngine) recvWR(k, i int) hfiuser.RecvWR {
	r := e.r
	e.sgl[k] = uapi.GohfiSge{Addr: uint64(r.dstAddr(i)), Length: uint32(r.size), Lkey: e.dstMR.Lkey}
	w := hfiuser.RecvWR{SGL: e.sgl[k : k+1]}
	w.WrID = uint64(i)
	return w
}

// postRecvs keeps up to depth receives posted on each QP for SEND.
func (e *verbsEngine) postRecvs(st []qpRound, depth int) error {
	nq := len(st)
	for q := range st {
		var wrs []hfiuser.RecvWR
		for st[q].rposted < st[q].m && st[q].rposted-st[q].rdone < depth {
			wrs = append(wrs, e.recvWR(len(wrs), st[q].rposted*nq+q))
			st[q].rposted++
		}
		if len(wrs) > 0 {
			if n, err := hfiuser.PostRecv(e.resp, e.qps[q][1], wrs); err != nil {
				return fmt.Errorf("POST_RECV (%d of %d posted): %w", n, len(wrs), err)
			}
		}
	}
	return nil
}

func (e *verbsEngine) setEvents(on bool) { e.events = on }

func (e *verbsEngine) round(n, depth, every int, lat samples) (time.Duration, error) {
	nq := min(len(e.qps), n)
	if lat != nil {
		nq = 1
	}
	st := make([]qpRound, nq)
	for q := range st {
		st[q].m = (n - q + nq - 1) / nq
	}
	send := e.op == uapi.GOHFI_WR_SEND
	if send { // posted before the clock starts, as perftest does
		if err := e.postRecvs(st, depth); err != nil {
			return 0, err
		}
	}
	var posted []time.Time
	if lat != nil {
		posted = make([]time.Time, n)
	}
	done := 0
	wrs := make([]hfiuser.SendWR, 0, depth)
	var spin spinner
	start := time.Now()
	for done < n {
		progress := false
		for q := range st {
			limit := st[q].m
			if send {
				limit = min(limit, st[q].rposted)
			}
			wrs = wrs[:0]
			for j := st[q].posted; j < limit && j-st[q].done < depth; j++ {
				wrs = append(wrs, e.sendWR(len(wrs), j*nq+q, j, st[q].m, every))
			}
			if len(wrs) == 0 {
				continue
			}
			if lat != nil {
				now := time.Now()
				for _, w := range wrs {
					posted[w.WrID] = now
				}
			}
			k, err := hfiuser.PostSend(e.req, e.qps[q][0], wrs)
			if err != nil {
				return 0, fmt.Errorf("POST_SEND (%d of %d posted): %w", k, len(wrs), err)
			}
			st[q].posted += len(wrs)
			progress = true
		}
		k, err := hfiuser.PollCQ(e.req, e.reqCQ, e.wc)
		if err != nil {
			return 0, fmt.Errorf("POLL_CQ: %w", err)
		}
		now := time.Now()
		for _, wc := range e.wc[:k] {
			if err := wcErr(wc, "WR"); err != nil {
				return 0, err
			}
			i := int(wc.WrID)
			q, j := i%nq, i/nq
			if i >= n || j < st[q].done {
				return 0, fmt.Errorf("completion of WR %d out of order (%d of QP %d done): %w", i, st[q].done, q, unix.EIO)
			}
			done += j + 1 - st[q].done
			st[q].done = j + 1
			if lat != nil {
				lat[i] = now.Sub(posted[i])
			}
		}
		progress = progress || k > 0
		if send {
			k, err := e.pollRecvs(st, n)
			if err != nil {
				return 0, err
			}
			if k > 0 {
				progress = true
				if err := e.postRecvs(st, depth); err != nil {
					return 0, err
				}
			}
		}
		switch {
		case progress:
			spin.progress()
		case e.events:
			if err := e.wait(st, done, n); err != nil {
				return 0, err
			}
		default:
			if err := spin.idle(e.ctx); err != nil {
				return 0, fmt.Errorf("polling for completions, %d of %d done: %w", done, n, err)
			}
		}
	}
	d := time.Since(start)
	if send {
		// Every receive completes before its send's ACK; take the
		// stragglers' completions so that none is left for the next round.
		for q := range st {
			for st[q].rdone < st[q].m {
				k, err := e.pollRecvs(st, n)
				if err != nil {
					return 0, err
				}
				switch {
				case k > 0:
					spin.progress()
				case e.events:
					if err := e.waitFile(e.resp, "receives", done, n); err != nil {
						return 0, err
					}
				default:
					if err := spin.idle(e.ctx); err != nil {
						return 0, fmt.Errorf("polling for receives, %d of %d done: %w", done, n, err)
					}
				}
			}
		}
	}
	return d, nil
}

// pollRecvs takes the responder's receive completions: each must be the
// next receive of its QP, with the message's length.
func (e *verbsEngine) pollRecvs(st []qpRound, n int) (int, error) {
	nq := len(st)
	k, err := hfiuser.PollCQ(e.resp, e.respCQ, e.wc)
	if err != nil {
		return 0, fmt.Errorf("POLL_CQ (receives): %w", err)
	}
	for _, wc := range e.wc[:k] {
		if err := wcErr(wc, "receive"); err != nil {
			return 0, err
		}
		i := int(wc.WrID)
		q := i % nq
		if i >= n || i/nq != st[q].rdone || int(wc.ByteLen) != e.r.size {
			return 0, fmt.Errorf("receive %d: %d bytes, after %d receives of QP %d: %w", i, wc.ByteLen, st[q].rdone, q, unix.EIO)
		}
		st[q].rdone++
	}
	return k, nil
}

// spinner is the bench's busy poll, perftest's default: the CQs are polled
// again and again, never armed, so the device raises no interrupt and
// nobody sleeps. runtime.Gosched between two polls gives the device model
// (goroutines of this process on the embedded device) and the driver's
// other goroutines their turn. No progress for benchWaitLimit is an error.
type spinner struct {
	polls int       // polls since the last progress
	since time.Time // the first of them
}

func (s *spinner) progress() { s.polls = 0 }

// idle is one poll that found nothing: EINTR when ctx is done, ETIMEDOUT
// after benchWaitLimit of them.
func (s *spinner) idle(ctx context.Context) error {
	if s.polls == 0 {
		s.since = time.Now()
	}
	s.polls++
	if s.polls%1024 == 0 {
		if ctx.Err() != nil {
			return unix.EINTR
		}
		if time.Since(s.since) > benchWaitLimit {
			return unix.ETIMEDOUT
		}
	}
	runtime.Gosched()
	if s.polls%spinYield == 0 {
		// Give the core up, not only the P: on few shared cores the
		// device model's thread (or another process's) may be waiting
		// for this one's. sched_yield cannot fail on Linux.
		_, _, _ = unix.RawSyscall(unix.SYS_SCHED_YIELD, 0, 0, 0)
	}
	return nil
}

// spinYield is how many idle polls the bench makes between two yields of
// its thread.
const spinYield = 8

// wait sleeps until a completion event (File.Poll arms the file's CQs), as
// perftest -e does. It waits on the requester while a
// send is outstanding, else on the responder (SEND waiting for receives).
func (e *verbsEngine) wait(st []qpRound, done, n int) error {
	for _, q := range st {
		if q.posted > q.done {
			return e.waitFile(e.req, "WRs", done, n)
		}
	}
	return e.waitFile(e.resp, "receives", done, n)
}

func (e *verbsEngine) waitFile(f *driver.File, what string, done, n int) error {
	ctx, cancel := waitCtx(e.ctx)
	defer cancel()
	if _, err := f.Poll(ctx); err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			err = unix.ETIMEDOUT
		}
		return fmt.Errorf("waiting for %s, %d of %d done: %w", what, done, n, err)
	}
	return nil
}

func wcErr(wc uapi.GohfiWC, what string) error {
	if wc.Status == uapi.GOHFI_WC_SUCCESS {
		return nil
	}
	return fmt.Errorf("%s %d: %s (vendor error %d): %w", what, wc.WrID, wcStatusStr(wc.Status), wc.VendorErr, unix.EIO)
}

// benchReg times REG_MR and DEREG_MR of a buffer whose pages are present,
// with remote write and read rights.
func benchReg(s *session, args []string) (_ obj, err error) {
	fs := newFlags("bench")
	sizeArg := fs.String("size", "4k,64k,1m", "buffer sizes")
	iters := fs.Int("iters", 200, "registrations per size")
	if _, err := parseArgs(fs, args, 0, 0); err != nil {
		return nil, err
	}
	sizes, err := parseSizeList(*sizeArg)
	if err != nil {
		return nil, err
	}
	if *iters < 1 {
		return nil, usageErr("--iters must be at least 1")
	}
	restore, memlock, err := s.benchDevice()
	if err != nil {
		return nil, err
	}
	defer cleanup(&err, "restoring RLIMIT_MEMLOCK", restore)
	f, err := s.att.Device.Open()
	if err != nil {
		return nil, err
	}
	of := &openFile{name: "bench-reg", f: f}
	defer cleanup(&err, "closing bench-reg", of.close)
	if err := s.assign(of, uapi.Hfi1UserInfo{Userversion: uapi.HFI1_USER_SWVERSION}); err != nil {
		return nil, err
	}
	var rows table
	for _, size := range sizes {
		row, err := regRow(s, of, size, *iters)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", sizeLabel(size), err)
		}
		rows = append(rows, row)
	}
	return obj{{"device", s.spec}, {"access", bitNames(benchRemoteAccess, accessNames)},
		{"memlock", memlock}, {"rows", rows}}, nil
}

func regRow(s *session, of *openFile, size, iters int) (_ obj, err error) {
	buf, err := mem.Alloc(size)
	if err != nil {
		return nil, err
	}
	defer cleanup(&err, "unmapping the buffer", buf.Close)
	fillSeq(buf.Bytes()) // fault the pages in: pinning is timed, not faulting
	reg, dereg, both := make(samples, iters), make(samples, iters), make(samples, iters)
	for i := range reg {
		if err := s.ctx.Err(); err != nil {
			return nil, fmt.Errorf("interrupted: %w", unix.EINTR)
		}
		t0 := time.Now()
		r, err := hfiuser.RegMR(of.f, buf.Addr(), uint64(size), uint64(buf.Addr()), benchRemoteAccess)
		t1 := time.Now()
		if err != nil {
			return nil, fmt.Errorf("REG_MR: %w", err)
		}
		if err := hfiuser.DeregMR(of.f, r.Handle); err != nil {
			return nil, fmt.Errorf("DEREG_MR: %w", err)
		}
		reg[i], dereg[i], both[i] = t1.Sub(t0), time.Since(t1), time.Since(t0)
	}
	return obj{{"size", sizeLabel(size)}, {"bytes", size}, {"n", iters},
		{"reg_ns", ns(reg.quantile(0.5))}, {"dereg_ns", ns(dereg.quantile(0.5))},
		{"reg_dereg_ns", ns(both.quantile(0.5))}, {"reg_dereg_p90_ns", ns(both.quantile(0.9))}}, nil
}
