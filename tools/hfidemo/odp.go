package main

import (
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"time"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/mem"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// The demo's ODP part: a buffer larger than RLIMIT_MEMLOCK registered as an
// on-demand paging MR, written in full by RDMA WRITEs from another QP
// (faults pin pages as they are needed, the pin budget evicts the least
// recently faulted ones), verified by CRC; then part of it is unmapped and
// the invalidation and a failing access are shown.

// odpConfig sizes the ODP part.
type odpConfig struct {
	size    int // ODP buffer, a multiple of chunk
	chunk   int // bytes per RDMA WRITE (the source MR, pinned)
	memlock int // RLIMIT_MEMLOCK while the part runs, below size
}

var defaultODPConfig = odpConfig{size: 16 << 20, chunk: 1 << 20, memlock: 4 << 20}

// odpSide is one file of the ODP part with a connected RC QP.
type odpSide struct {
	f      *driver.File
	cq, qp uint32
	qpn    uint32
}

func newODPSide(a *attach.Attached) (*odpSide, error) {
	f, err := a.Device.Open()
	if err != nil {
		return nil, err
	}
	if err := hfiuser.AssignCtxt(f); err != nil {
		return nil, fmt.Errorf("ASSIGN_CTXT: %w", err)
	}
	s := &odpSide{f: f}
	if s.cq, _, err = hfiuser.CreateCQ(f, 16, 0); err != nil {
		return nil, fmt.Errorf("CREATE_CQ: %w", err)
	}
	q, err := hfiuser.CreateQP(f, uapi.GohfiCreateQP{QPType: uapi.GOHFI_QPT_RC, SendCQ: s.cq, RecvCQ: s.cq,
		MaxSendWR: 4, MaxRecvWR: 4, MaxSendSge: 1, MaxRecvSge: 1})
	if err != nil {
		return nil, fmt.Errorf("CREATE_QP: %w", err)
	}
	s.qp, s.qpn = q.Handle, q.QPNum
	return s, nil
}

// connect takes the QP through INIT and RTR to RTS towards dest.
func (s *odpSide) connect(dest uint32) error {
	for _, st := range []uint32{uapi.GOHFI_QPS_INIT, uapi.GOHFI_QPS_RTR, uapi.GOHFI_QPS_RTS} {
		if err := hfiuser.ModifyQP(s.f, uapi.GohfiModifyQP{Handle: s.qp, QPState: st, DestQPNum: dest,
			AccessFlags: uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ}); err != nil {
			return fmt.Errorf("MODIFY_QP to state %d: %w", st, err)
		}
	}
	return nil
}

// write posts one signaled RDMA WRITE of sge to raddr/rkey and waits for
// its completion.
func (s *odpSide) write(ctx context.Context, sge uapi.GohfiSge, raddr uint64, rkey uint32) (uapi.GohfiWC, error) {
	wr := hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: 1, Opcode: uapi.GOHFI_WR_RDMA_WRITE,
		SendFlags: uapi.GOHFI_SEND_SIGNALED, RemoteAddr: raddr, Rkey: rkey}, SGL: []uapi.GohfiSge{sge}}
	if _, err := hfiuser.PostSend(s.f, s.qp, []hfiuser.SendWR{wr}); err != nil {
		return uapi.GohfiWC{}, fmt.Errorf("POST_SEND: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	wc := make([]uapi.GohfiWC, 1)
	for {
		n, err := hfiuser.PollCQ(s.f, s.cq, wc)
		if err != nil {
			return uapi.GohfiWC{}, fmt.Errorf("POLL_CQ: %w", err)
		}
		if n == 1 {
			return wc[0], nil
		}
		if _, err := s.f.Poll(ctx); err != nil { // sleeps until a completion event
			if errors.Is(err, context.DeadlineExceeded) {
				err = unix.ETIMEDOUT
			}
			return uapi.GohfiWC{}, fmt.Errorf("RDMA WRITE did not complete: %w", err)
		}
	}
}

// runODP is the ODP part on a device of its own (spec as for run); it
// prints to w.
func runODP(w io.Writer, spec string, cfg odpConfig) (err error) {
	ctx := context.Background()
	a, err := openDevice(spec)
	if err != nil {
		return err
	}
	defer cleanup(&err, "closing the device", a.Close)
	req, resp := (*odpSide)(nil), (*odpSide)(nil)
	if req, err = newODPSide(a); err != nil {
		return err
	}
	if resp, err = newODPSide(a); err != nil {
		return err
	}
	if err := req.connect(resp.qpn); err != nil {
		return err
	}
	if err := resp.connect(req.qpn); err != nil {
		return err
	}
	src, err := mem.Alloc(cfg.chunk)
	if err != nil {
		return err
	}
	defer cleanup(&err, "unmapping the source buffer", src.Close)
	buf, err := mem.Alloc(cfg.size)
	if err != nil {
		return err
	}
	defer cleanup(&err, "unmapping the ODP buffer", buf.Close)
	ms, err := hfiuser.RegMR(req.f, src.Addr(), uint64(cfg.chunk), uint64(src.Addr()), uapi.IB_ACCESS_LOCAL_WRITE)
	if err != nil {
		return fmt.Errorf("REG_MR source: %w", err)
	}

	// The pin budget: RLIMIT_MEMLOCK below the ODP buffer (the driver
	// enforces it even for root), restored when the part ends: the parts
	// after this one need the limit as it was.
	var old unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_MEMLOCK, &old); err != nil {
		return fmt.Errorf("getrlimit RLIMIT_MEMLOCK: %w", err)
	}
	if err := unix.Setrlimit(unix.RLIMIT_MEMLOCK, &unix.Rlimit{Cur: uint64(cfg.memlock), Max: old.Max}); err != nil {
		return fmt.Errorf("setrlimit RLIMIT_MEMLOCK %d: %w", cfg.memlock, err)
	}
	defer cleanup(&err, "restoring RLIMIT_MEMLOCK", func() error { return unix.Setrlimit(unix.RLIMIT_MEMLOCK, &old) })

	md, err := hfiuser.RegMR(resp.f, buf.Addr(), uint64(cfg.size), uint64(buf.Addr()),
		uapi.IB_ACCESS_LOCAL_WRITE|uapi.IB_ACCESS_REMOTE_WRITE|uapi.IB_ACCESS_ON_DEMAND)
	if err != nil {
		return fmt.Errorf("REG_MR ODP: %w", err)
	}
	st, err := hfiuser.MRStats(resp.f, md.Handle)
	if err != nil {
		return fmt.Errorf("MR_STATS: %w", err)
	}
	// The lines are for people reading the demo: nothing to do if a write
	// fails.
	_, _ = fmt.Fprintf(w, "ODP         %d MiB buffer registered on demand under RLIMIT_MEMLOCK %d MiB: %d pages pinned\n",
		cfg.size>>20, cfg.memlock>>20, st.PagesPinned)

	// Write all of it, one chunk per RDMA WRITE, each chunk a different
	// pattern; the expected CRC follows the writes.
	var want uint32
	maxPinned := uint64(0)
	t0 := time.Now()
	for off := 0; off < cfg.size; off += cfg.chunk {
		b := src.Bytes()
		for i := range b {
			b[i] = byte(off/cfg.chunk + i*7)
		}
		want = crc32.Update(want, crc32.IEEETable, b)
		wc, err := req.write(ctx, uapi.GohfiSge{Addr: uint64(src.Addr()), Length: uint32(cfg.chunk), Lkey: ms.Lkey},
			uint64(buf.Addr())+uint64(off), md.Rkey)
		if err != nil {
			return err
		}
		if wc.Status != uapi.GOHFI_WC_SUCCESS {
			return fmt.Errorf("RDMA WRITE at %d: completion status %d, vendor error %d", off, wc.Status, wc.VendorErr)
		}
		if st, err = hfiuser.MRStats(resp.f, md.Handle); err != nil {
			return fmt.Errorf("MR_STATS: %w", err)
		}
		maxPinned = max(maxPinned, st.PagesPinned)
	}
	elapsed := time.Since(t0)
	if crc32.ChecksumIEEE(buf.Bytes()) != want {
		return fmt.Errorf("ODP buffer corrupted: CRC32 %#x, want %#x", crc32.ChecksumIEEE(buf.Bytes()), want)
	}
	_, _ = fmt.Fprintf(w, "ODP write   %d RDMA WRITEs of %d KiB from another QP filled it in %.1f ms, data verified by CRC32\n", // for people, see above
		cfg.size/cfg.chunk, cfg.chunk>>10, float64(elapsed.Microseconds())/1000)
	_, _ = fmt.Fprintf(w, "ODP stats   %d page faults (%d handled), at most %d pages pinned (%.1f MiB, beside the %d KiB source MR), %d page invalidations (pin budget evictions, %d handled)\n", // for people, see above
		st.PageFaults, st.PageFaultsHandled, maxPinned, float64(maxPinned*4096)/(1<<20), cfg.chunk>>10, st.PageInvalidations, st.PageInvalidationsHandled)
	if maxPinned*4096 > uint64(cfg.memlock) {
		return fmt.Errorf("ODP pinned %d pages, over RLIMIT_MEMLOCK", maxPinned)
	}

	// munmap the last chunk, which the last WRITE left pinned: the
	// invalidation unpins it (POST_SEND waits for it), and the next WRITE
	// there faults on nothing and fails.
	gone := buf.Addr() + uintptr(cfg.size-cfg.chunk)
	if _, _, errno := unix.Syscall(unix.SYS_MUNMAP, gone, uintptr(cfg.chunk), 0); errno != 0 {
		return fmt.Errorf("munmap %#x: %w", gone, errno)
	}
	wc, err := req.write(ctx, uapi.GohfiSge{Addr: uint64(src.Addr()), Length: 4096, Lkey: ms.Lkey}, uint64(gone), md.Rkey)
	if err != nil {
		return err
	}
	after, err := hfiuser.MRStats(resp.f, md.Handle)
	if err != nil {
		return fmt.Errorf("MR_STATS: %w", err)
	}
	_, _ = fmt.Fprintf(w, "ODP munmap  last %d KiB unmapped: %d more page invalidations (%d handled), %d pages pinned now\n", // for people, see above
		cfg.chunk>>10, after.PageInvalidations-st.PageInvalidations, after.PageInvalidationsHandled-st.PageInvalidationsHandled, after.PagesPinned)
	if wc.Status != uapi.GOHFI_WC_REM_ACCESS_ERR {
		return fmt.Errorf("RDMA WRITE into the unmapped range: completion status %d, want REM_ACCESS_ERR", wc.Status)
	}
	_, _ = fmt.Fprintf(w, "ODP access  RDMA WRITE into it afterwards: REM_ACCESS_ERR (vendor error %d, page fault failed), fault counted %d, handled %d\n", // for people, see above
		wc.VendorErr, after.PageFaults, after.PageFaultsHandled)
	return nil
}
