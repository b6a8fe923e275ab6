package main

// hfictl bench write|read|reg: perftest-style rows (ib_write_bw,
// ib_read_bw, ib_write_lat, ib_read_lat) over loopback between two files
// of one device, against memcpy of the same size in the same run, and the
// cost of REG_MR + DEREG_MR.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/mem"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

const (
	benchRemoteAccess = uapi.IB_ACCESS_LOCAL_WRITE | uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ
	benchBytesPerRun  = 256 << 20        // default bandwidth run: about this many bytes
	benchWaitLimit    = 10 * time.Second // a completion later than this is an error
)

func cmdBench(s *session, args []string) (obj, error) {
	return subcommand(s, "bench", args, map[string]func(*session, []string) (obj, error){
		"tid":   benchTID,
		"write": func(s *session, a []string) (obj, error) { return benchRDMA(s, "write", a) },
		"read":  func(s *session, a []string) (obj, error) { return benchRDMA(s, "read", a) },
		"reg":   benchReg,
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

func benchRDMA(s *session, opName string, args []string) (_ obj, err error) {
	fs := newFlags("bench")
	lat := fs.Bool("lat", false, "latency (one signaled WR at a time) instead of bandwidth")
	sizeArg := fs.String("size", "", "message sizes (default: powers of two, 4k..4m for bandwidth, 8..64k for latency)")
	iters := fs.Int("iters", 0, "messages per run (default: 1000 for latency; for bandwidth 256 MiB worth, 16..2000)")
	runs := fs.Int("runs", 3, "bandwidth: runs per size, the median reported")
	window := fs.Int("window", 16, "bandwidth: work requests in flight")
	every := fs.Int("signal-every", 8, "bandwidth: every N-th work request is signaled (and the last)")
	if _, err := parseArgs(fs, args, 0, 0); err != nil {
		return nil, err
	}
	sizes := pow2Sizes(4<<10, 4<<20)
	if *lat {
		sizes = pow2Sizes(8, 64<<10)
	}
	if *sizeArg != "" {
		if sizes, err = parseSizeList(*sizeArg); err != nil {
			return nil, err
		}
	}
	if *iters < 0 || *runs < 1 || *window < 1 || *every < 1 || *every > *window {
		return nil, usageErr("want --iters >= 0, --runs >= 1 and 1 <= --signal-every <= --window")
	}
	op := uint32(uapi.GOHFI_WR_RDMA_WRITE)
	if opName == "read" {
		op = uapi.GOHFI_WR_RDMA_READ
	}
	restore, memlock, err := s.benchDevice()
	if err != nil {
		return nil, err
	}
	defer cleanup(&err, "restoring RLIMIT_MEMLOCK", restore)
	b, err := newRDMABench(s, slices.Max(sizes), *window)
	if err != nil {
		return nil, err
	}
	defer cleanup(&err, "", b.close)
	o := obj{{"device", s.spec}, {"op", opName}}
	var rows table
	for _, size := range sizes {
		if err := s.ctx.Err(); err != nil {
			return nil, fmt.Errorf("interrupted: %w", unix.EINTR)
		}
		n := *iters
		switch {
		case n > 0:
		case *lat:
			n = 1000
		default:
			n = min(max(benchBytesPerRun/size, 16), 2000)
		}
		var row obj
		if *lat {
			row, err = b.latRow(op, size, n)
		} else {
			row, err = b.bwRow(op, size, n, *runs, *window, *every)
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", sizeLabel(size), err)
		}
		rows = append(rows, row)
	}
	if *lat {
		o.add("mode", "lat")
	} else {
		o.add("mode", "bw").add("window", *window).add("signal_every", *every).add("runs", *runs)
	}
	o.add("memlock", memlock).add("rows", rows)
	return o, nil
}

// rdmaBench is two files of one device (a requester and a responder
// context, each its own PD) with an RC QP each, connected to each other; a
// local buffer registered on the requester's side, a remote one on the
// responder's.
type rdmaBench struct {
	s             *session
	req, resp     *openFile
	cq, qp        uint32 // the requester's
	local, remote *mem.Buffer
	lmr, rmr      uapi.GohfiRegMR
	wc            []uapi.GohfiWC
}

func newRDMABench(s *session, size, window int) (b *rdmaBench, err error) {
	b = &rdmaBench{s: s, wc: make([]uapi.GohfiWC, window)}
	defer func() {
		if err != nil {
			err = errors.Join(err, b.close())
		}
	}()
	if b.local, err = mem.Alloc(size); err != nil {
		return nil, err
	}
	if b.remote, err = mem.Alloc(size); err != nil {
		return nil, err
	}
	var qpn [2]uint32
	var qps [2]uint32
	for i, name := range []string{"bench-req", "bench-resp"} {
		f, err := s.att.Device.Open()
		if err != nil {
			return nil, err
		}
		of := &openFile{name: name, f: f}
		if i == 0 {
			b.req = of
		} else {
			b.resp = of
		}
		if err := s.assign(of, uapi.Hfi1UserInfo{Userversion: uapi.HFI1_USER_SWVERSION}); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		cq, _, err := hfiuser.CreateCQ(f, uint32(window), 0)
		if err != nil {
			return nil, err
		}
		r, err := hfiuser.CreateQP(f, uapi.GohfiCreateQP{QPType: uapi.GOHFI_QPT_RC, SendCQ: cq, RecvCQ: cq,
			MaxSendWR: uint32(window), MaxRecvWR: 1, MaxSendSge: 1, MaxRecvSge: 1})
		if err != nil {
			return nil, err
		}
		qpn[i], qps[i] = r.QPNum, r.Handle
		if i == 0 {
			b.cq, b.qp = cq, r.Handle
		}
	}
	if b.lmr, err = hfiuser.RegMR(b.req.f, b.local.Addr(), uint64(size), uint64(b.local.Addr()), uapi.IB_ACCESS_LOCAL_WRITE); err != nil {
		return nil, err
	}
	if b.rmr, err = hfiuser.RegMR(b.resp.f, b.remote.Addr(), uint64(size), uint64(b.remote.Addr()), benchRemoteAccess); err != nil {
		return nil, err
	}
	for i, of := range []*openFile{b.req, b.resp} {
		for _, st := range []uint32{uapi.GOHFI_QPS_INIT, uapi.GOHFI_QPS_RTR, uapi.GOHFI_QPS_RTS} {
			m := uapi.GohfiModifyQP{Handle: qps[i], QPState: st, DestQPNum: qpn[1-i],
				AccessFlags: uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ}
			if err := hfiuser.ModifyQP(of.f, m); err != nil {
				return nil, fmt.Errorf("%s: MODIFY_QP to %s: %w", of.name, qpStateNames[st], err)
			}
		}
	}
	return b, nil
}

// close closes the files (the driver destroys their QPs, CQs and MRs),
// then frees the buffers.
func (b *rdmaBench) close() error {
	errs := []error{closeFiles(b.req, b.resp)}
	for _, m := range []*mem.Buffer{b.local, b.remote} {
		if m != nil {
			if err := m.Close(); err != nil {
				errs = append(errs, fmt.Errorf("unmapping a bench buffer: %w", err))
			}
		}
	}
	return errors.Join(errs...)
}

// stream runs iters work requests of op over the first size bytes, at most
// window in flight, every every-th and the last one signaled, and returns
// the time from the first post to the last completion.
func (b *rdmaBench) stream(op uint32, size, iters, window, every int) (time.Duration, error) {
	sgl := []uapi.GohfiSge{{Addr: uint64(b.local.Addr()), Length: uint32(size), Lkey: b.lmr.Lkey}}
	wrs := make([]hfiuser.SendWR, 0, window)
	posted, done := 0, 0
	start := time.Now()
	ctx, cancel := context.WithTimeout(b.s.ctx, benchWaitLimit)
	defer cancel()
	for done < iters {
		wrs = wrs[:0]
		for i := posted; i < iters && i-done < window; i++ {
			w := hfiuser.SendWR{SGL: sgl}
			w.WrID, w.Opcode, w.RemoteAddr, w.Rkey = uint64(i), op, b.rmr.Iova, b.rmr.Rkey
			if (i+1)%every == 0 || i == iters-1 {
				w.SendFlags = uapi.GOHFI_SEND_SIGNALED
			}
			wrs = append(wrs, w)
		}
		if len(wrs) > 0 {
			n, err := hfiuser.PostSend(b.req.f, b.qp, wrs)
			posted += n
			if err != nil {
				return 0, fmt.Errorf("POST_SEND: %w", err)
			}
		}
		n, err := hfiuser.PollCQ(b.req.f, b.cq, b.wc)
		if err != nil {
			return 0, fmt.Errorf("POLL_CQ: %w", err)
		}
		for _, wc := range b.wc[:n] {
			if wc.Status != uapi.GOHFI_WC_SUCCESS {
				return 0, fmt.Errorf("WR %d: %s (vendor error %d): %w", wc.WrID, wcStatusStr(wc.Status), wc.VendorErr, unix.EIO)
			}
			done = int(wc.WrID) + 1
		}
		if n == 0 {
			// Sleep until a completion event (File.Poll arms the file's
			// CQs), as perftest -e does: the device model runs on
			// goroutines of this process, which busy polling starves.
			if _, err := b.req.f.Poll(ctx); err != nil {
				if errors.Is(err, context.DeadlineExceeded) {
					err = unix.ETIMEDOUT
				}
				return 0, fmt.Errorf("%d of %d WRs completed: %w", done, iters, err)
			}
		}
	}
	return time.Since(start), nil
}

// prepare fills the side the operation reads from and clears the other;
// verify compares them afterwards.
func (b *rdmaBench) prepare(op uint32, size int) error {
	src, dst := b.local.Bytes()[:size], b.remote.Bytes()[:size]
	if op == uapi.GOHFI_WR_RDMA_READ {
		src, dst = dst, src
	}
	clear(dst)
	return fillPattern(src, fmt.Sprintf("rand:%d", size))
}

func (b *rdmaBench) verify(size int) bool {
	return bytes.Equal(b.local.Bytes()[:size], b.remote.Bytes()[:size])
}

// memcpy copies size bytes between the two buffers iters times and returns
// each copy's time.
func (b *rdmaBench) memcpy(size, iters int) samples {
	d := make(samples, iters)
	src, dst := b.local.Bytes()[:size], b.remote.Bytes()[:size]
	for i := range d {
		t0 := time.Now()
		copy(dst, src)
		d[i] = time.Since(t0)
	}
	return d
}

func (b *rdmaBench) bwRow(op uint32, size, iters, runs, window, every int) (obj, error) {
	if err := b.prepare(op, size); err != nil {
		return nil, err
	}
	d := make(samples, runs)
	for i := range d {
		var err error
		if d[i], err = b.stream(op, size, iters, window, every); err != nil {
			return nil, err
		}
	}
	ok := b.verify(size)
	cp := make(samples, runs)
	for i := range cp {
		start := time.Now()
		b.memcpy(size, iters)
		cp[i] = time.Since(start)
	}
	med, cpMed := d.quantile(0.5), cp.quantile(0.5)
	return obj{{"size", sizeLabel(size)}, {"bytes", size}, {"iters", iters},
		{"bw", rate(size*iters, med)}, {"msg_rate", msgRate(float64(iters) / med.Seconds())},
		{"memcpy_bw", rate(size*iters, cpMed)}, {"vs_memcpy", ratioOf(cpMed, med)}, {"verified", ok}}, nil
}

func (b *rdmaBench) latRow(op uint32, size, iters int) (obj, error) {
	if err := b.prepare(op, size); err != nil {
		return nil, err
	}
	d := make(samples, iters)
	for i := range d {
		var err error
		if d[i], err = b.stream(op, size, 1, 1, 1); err != nil {
			return nil, err
		}
	}
	ok := b.verify(size)
	cp := b.memcpy(size, iters)
	return obj{{"size", sizeLabel(size)}, {"bytes", size}, {"iters", iters},
		{"p50_ns", ns(d.quantile(0.5))}, {"p99_ns", ns(d.quantile(0.99))},
		{"memcpy_p50_ns", ns(cp.quantile(0.5))}, {"verified", ok}}, nil
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
