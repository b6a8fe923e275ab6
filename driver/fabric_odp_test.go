package driver_test

import (
	"bytes"
	"math/rand"
	"testing"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// TestFabricODP: ODP over the wire. B writes 1 MiB into an ODP MR of A
// that nothing touched yet: A's responder faults (A's driver handles the
// faults, counted in the MR's MR_STATS), answers RNR NAK meanwhile, and the
// data lands; B reads it back; B SENDs into an ODP receive buffer of A;
// with MADV_DONTNEED on A's range before every operation, WRITE, READ and
// SEND keep the data intact; after A unmaps the range, a WRITE fails with
// REM_ACCESS_ERR at B.
func TestFabricODP(t *testing.T) {
	requireRoot(t) // ODP MRs: the userfault notifier
	a, b, qa, qb := fabricPair(t)
	acq := a.cq.Handle()
	const n = 1 << 20
	ob := allocBuf(t, n, false)
	om, err := hfiuser.RegMR(a.f, ob.Addr(), n, uint64(ob.Addr()), odpAccess)
	if err != nil {
		t.Fatalf("REG_MR ODP: %v", err)
	}
	stats := func() uapi.GohfiMRStats {
		t.Helper()
		if err := a.a.Device.ODPFence(); err != nil {
			t.Fatal(err)
		}
		s, err := hfiuser.MRStats(a.f, om.Handle)
		if err != nil {
			t.Fatalf("MR_STATS: %v", err)
		}
		return s
	}
	if s := stats(); s.PagesPinned != 0 || s.PageFaults != 0 {
		t.Fatalf("ODP MR before any access: %+v", s)
	}
	post := func(wr hfiuser.SendWR) uapi.GohfiWC { t.Helper(); return b.postWait(t, qb, wr) }
	dst := allocBuf(t, n, false)
	dmr, err := b.pd.RegMR(dst.Addr(), n, uint64(dst.Addr()), pinAccess)
	if err != nil {
		t.Fatal(err)
	}
	netCnt := func(i int) uint64 { t.Helper(); return a.netCounter(t, i) }
	rnr0, pf0 := netCnt(chip.NetCntRNRNAKs), a.a.Sim.Device.ODPFaultLatencies()
	_ = pf0 // forgets the figures so far

	// First touch: 1 MiB WRITE from B.
	b.writeAll(t, qb, 3, ob.Bytes(), om.Rkey, "first-touch WRITE into A's ODP MR")
	s := stats()
	if s.PageFaults == 0 || s.PageFaultsHandled != s.PageFaults || s.PagesPinned == 0 {
		t.Fatalf("after the first-touch WRITE: %+v, want faults handled and pages pinned", s)
	}
	if netCnt(chip.NetCntRNRNAKs) == rnr0 || len(a.a.Sim.Device.ODPFaultLatencies()) == 0 {
		t.Fatal("A's responder neither faulted nor answered RNR")
	}
	t.Logf("first touch of 1 MiB: %d page faults, %d RNR NAKs", s.PageFaults, netCnt(chip.NetCntRNRNAKs)-rnr0)

	// READ it back.
	wantWC(t, "READ from A's ODP MR", post(hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: 2, Opcode: uapi.GOHFI_WR_RDMA_READ,
		SendFlags: sig, RemoteAddr: uint64(ob.Addr()), Rkey: om.Rkey}, SGL: []uapi.GohfiSge{{Addr: uint64(dst.Addr()), Length: n, Lkey: dmr.Lkey()}}}),
		uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_READ, 0)
	if !bytes.Equal(dst.Bytes(), b.buf) {
		t.Fatal("READ across devices from an ODP MR: data differs")
	}

	// MADV_DONTNEED on A before every operation: WRITE, READ, SEND.
	rng := rand.New(rand.NewSource(7))
	iters := 12
	if testing.Short() {
		iters = 6
	}
	inv0 := stats().PageInvalidations
	for i := range iters {
		if err := madvise(ob.Addr(), n, unix.MADV_DONTNEED); err != nil {
			t.Fatal(err)
		}
		// B's POST_SEND does not wait for A's notifier, as A's own posts
		// do: wait until A's device is off the dropped pages (a kernel
		// driver's invalidation ends before madvise returns).
		if err := a.a.Device.ODPFence(); err != nil {
			t.Fatal(err)
		}
		off, size := rng.Intn(n/2), 1+rng.Intn(n/2)
		as := ob.Bytes()[off : off+size]
		switch i % 3 {
		case 0:
			src := b.buf[:size]
			fill(src, byte(i))
			wantWC(t, "WRITE after DONTNEED", post(writeWR(uint64(10+i), uint64(ob.Addr())+uint64(off), om.Rkey,
				[]uapi.GohfiSge{{Addr: uint64(uintptrOf(src)), Length: uint32(size), Lkey: b.mr.Lkey()}})),
				uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
			if !bytes.Equal(as, src) {
				t.Fatalf("iteration %d: WRITE data differs", i)
			}
		case 1:
			fill(as, byte(i))
			d := dst.Bytes()[:size]
			wantWC(t, "READ after DONTNEED", post(hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: uint64(10 + i), Opcode: uapi.GOHFI_WR_RDMA_READ,
				SendFlags: sig, RemoteAddr: uint64(ob.Addr()) + uint64(off), Rkey: om.Rkey},
				SGL: []uapi.GohfiSge{{Addr: uint64(dst.Addr()), Length: uint32(size), Lkey: dmr.Lkey()}}}),
				uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_READ, 0)
			if !bytes.Equal(d, as) {
				t.Fatalf("iteration %d: READ data differs", i)
			}
		case 2:
			// SEND into an ODP receive buffer of A.
			if k, err := hfiuser.PostRecv(a.f, qa.Handle(), []hfiuser.RecvWR{{GohfiRecvWR: uapi.GohfiRecvWR{WrID: uint64(100 + i)},
				SGL: []uapi.GohfiSge{{Addr: uint64(ob.Addr()) + uint64(off), Length: uint32(size), Lkey: om.Lkey}}}}); err != nil || k != 1 {
				t.Fatalf("POST_RECV: %d, %v", k, err)
			}
			src := b.buf[:size]
			fill(src, byte(i))
			wantWC(t, "SEND into A's ODP receive buffer", post(hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: uint64(10 + i),
				Opcode: uapi.GOHFI_WR_SEND, SendFlags: sig}, SGL: []uapi.GohfiSge{{Addr: uint64(uintptrOf(src)), Length: uint32(size), Lkey: b.mr.Lkey()}}}),
				uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_SEND, 0)
			wantWC(t, "A's receive", pollWC(t, a.f, acq, 1)[0], uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RECV, size)
			if !bytes.Equal(as, src) {
				t.Fatalf("iteration %d: SEND data differs", i)
			}
		}
	}
	if s := stats(); s.PageInvalidations == inv0 || s.PageInvalidationsHandled != s.PageInvalidations || s.PageFaultsHandled != s.PageFaults {
		t.Fatalf("after %d operations behind MADV_DONTNEED: %+v", iters, s)
	}

	// munmap on A: the responder's fault fails, REM_ACCESS_ERR at B.
	if err := ob.Unmap(); err != nil {
		t.Fatal(err)
	}
	if err := a.a.Device.ODPFence(); err != nil {
		t.Fatal(err)
	}
	errNAKs := netCnt(chip.NetCntErrNAKs)
	wc := post(writeWR(50, uint64(ob.Addr()), om.Rkey, []uapi.GohfiSge{{Addr: uint64(uintptrOf(b.buf)), Length: 4096, Lkey: b.mr.Lkey()}}))
	if wc.Status != uapi.GOHFI_WC_REM_ACCESS_ERR || wc.WrID != 50 {
		t.Fatalf("WRITE into A's unmapped ODP range: completion %+v, want REM_ACCESS_ERR", wc)
	}
	if d := netCnt(chip.NetCntErrNAKs) - errNAKs; d != 1 {
		t.Errorf("A sent %d error NAKs for the unmapped range, want 1", d)
	}
	if err := hfiuser.DeregMR(a.f, om.Handle); err != nil {
		t.Fatalf("DEREG_MR: %v", err)
	}
}

// TestFabricODPRNRRetry: A's responder page faults do not use up B's
// rnr_retry. With rnr_retry 0 on B and the shortest RNR timer on A (10 us,
// so a fault is answered with RNR NAK many times), a first-touch WRITE
// and, after MADV_DONTNEED, a READ of 1 MiB through A's ODP MR succeed;
// a SEND that finds no receive posted still fails at once with
// RNR_RETRY_EXC_ERR.
func TestFabricODPRNRRetry(t *testing.T) {
	requireRoot(t)
	a, b, _, qb := fabricPairNet(t, &driver.NetAttr{Timeout: 14, RetryCnt: 7, RnrRetry: 0, MinRnrTimer: 1})
	const n = 1 << 20
	ob := allocBuf(t, n, false)
	om, err := hfiuser.RegMR(a.f, ob.Addr(), n, uint64(ob.Addr()), odpAccess)
	if err != nil {
		t.Fatalf("REG_MR ODP: %v", err)
	}
	post := func(wr hfiuser.SendWR) uapi.GohfiWC { t.Helper(); return b.postWait(t, qb, wr) }
	rnr := func() uint64 { t.Helper(); return a.netCounter(t, chip.NetCntRNRNAKs) }
	r0 := rnr()
	b.writeAll(t, qb, 5, ob.Bytes(), om.Rkey, "first-touch WRITE with rnr_retry 0")
	r1 := rnr()
	if r1 == r0 {
		t.Fatal("the WRITE was not answered RNR while A's fault was handled")
	}
	if err := madvise(ob.Addr(), n, unix.MADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	if err := a.a.Device.ODPFence(); err != nil {
		t.Fatal(err)
	}
	fill(ob.Bytes(), 6)
	dst := allocBuf(t, n, false)
	dmr, err := b.pd.RegMR(dst.Addr(), n, uint64(dst.Addr()), pinAccess)
	if err != nil {
		t.Fatal(err)
	}
	wantWC(t, "READ after DONTNEED with rnr_retry 0", post(hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: 2, Opcode: uapi.GOHFI_WR_RDMA_READ,
		SendFlags: sig, RemoteAddr: uint64(ob.Addr()), Rkey: om.Rkey}, SGL: []uapi.GohfiSge{{Addr: uint64(dst.Addr()), Length: n, Lkey: dmr.Lkey()}}}),
		uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_READ, 0)
	if !bytes.Equal(dst.Bytes(), ob.Bytes()) {
		t.Fatal("READ: data differs")
	}
	if rnr() == r1 {
		t.Fatal("the READ was not answered RNR while A's fault was handled")
	}
	t.Logf("RNR NAKs while A's faults were handled: WRITE %d, READ %d", r1-r0, rnr()-r1)
	wc := post(hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: 3, Opcode: uapi.GOHFI_WR_SEND, SendFlags: sig},
		SGL: []uapi.GohfiSge{{Addr: uint64(uintptrOf(b.buf)), Length: 64, Lkey: b.mr.Lkey()}}})
	if wc.Status != uapi.GOHFI_WC_RNR_RETRY_EXC_ERR || wc.WrID != 3 {
		t.Fatalf("SEND with no receive posted, rnr_retry 0: completion %+v, want RNR_RETRY_EXC_ERR", wc)
	}
}

// postWait posts one signaled work request on q of n and returns its
// completion.
func (n *netDev) postWait(t *testing.T, q *driver.QP, wr hfiuser.SendWR) uapi.GohfiWC {
	t.Helper()
	if k, err := hfiuser.PostSend(n.f, q.Handle(), []hfiuser.SendWR{wr}); err != nil || k != 1 {
		t.Fatalf("POST_SEND: %d, %v", k, err)
	}
	return pollWC(t, n.f, n.cq.Handle(), 1)[0]
}

// writeAll fills n's buffer from seed and WRITEs all of it from q into
// dst (the peer's memory at its own address, through rkey), checking that
// it completes and lands.
func (n *netDev) writeAll(t *testing.T, q *driver.QP, seed byte, dst []byte, rkey uint32, what string) {
	t.Helper()
	fill(n.buf, seed)
	wantWC(t, what, n.postWait(t, q, writeWR(uint64(seed), uint64(uintptrOf(dst)), rkey,
		[]uapi.GohfiSge{{Addr: uint64(uintptrOf(n.buf)), Length: uint32(len(n.buf)), Lkey: n.mr.Lkey()}})), uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
	if !bytes.Equal(dst[:len(n.buf)], n.buf) {
		t.Fatalf("%s: data differs", what)
	}
}

// netCounter reads the port counter i of n.
func (n *netDev) netCounter(t *testing.T, i int) uint64 {
	t.Helper()
	cs, err := n.a.Device.NetCounters()
	if err != nil {
		t.Fatal(err)
	}
	return cs[i].Value
}
