package fabric_test

import (
	"bytes"
	"math/rand"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/mem"
	"github.com/gohfi/gohfi/uapi"
)

// ODP and fast registration between namespaces: hfisim as separate
// processes, the driver of both devices in the test process over
// vfio-user, A's driver handling its responder's page faults.

const (
	odpAccess = uapi.IB_ACCESS_LOCAL_WRITE | uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ | uapi.IB_ACCESS_ON_DEMAND
	frAccess  = uapi.IB_ACCESS_LOCAL_WRITE | uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ
	frIOVA    = 0x1234_5000_0000
	sig       = uapi.GOHFI_SEND_SIGNALED
)

// one posts wr on e and returns its completion.
func (e *ep) one(t *testing.T, wr driver.SendWR) uapi.GohfiWC {
	t.Helper()
	if err := e.post(wr); err != nil {
		t.Fatal(err)
	}
	wcs, err := e.wait(1, roundWait)
	if err != nil {
		t.Fatal(err)
	}
	return wcs[0]
}

// ok fails t unless wc is a success of opcode for wr id.
func ok(t *testing.T, what string, wc uapi.GohfiWC, id uint64, opcode uint32) {
	t.Helper()
	if wc.Status != uapi.GOHFI_WC_SUCCESS || wc.WrID != id || wc.Opcode != opcode {
		t.Fatalf("%s: completion %+v, want success of WR %d", what, wc, id)
	}
}

// TestFabricNetnsODPFastReg: across two namespaces, B WRITEs 1 MiB into an
// ODP MR of A that nothing touched (A's responder faults, answers RNR NAK
// while A's driver handles the faults, then resumes), READs it back, and
// WRITEs, READs and SENDs into it again after A's MADV_DONTNEED between
// rounds; after A unmaps it, a WRITE fails with REM_ACCESS_ERR. Then A
// binds a fast-reg MR, B WRITEs and READs through its rkey, invalidates it
// with SEND_WITH_INV, and a WRITE with the old rkey ends REM_ACCESS_ERR.
func TestFabricNetnsODPFastReg(t *testing.T) {
	na, nb := twoNamespaces(t)
	x, y := attachNode(t, na), attachNode(t, nb)
	attr := driver.NetAttr{Timeout: 12, RetryCnt: 7, RnrRetry: 7, MinRnrTimer: 1}
	t.Run("odp", func(t *testing.T) {
		a, b := newEP(t, x, 1<<20), newEP(t, y, 1<<20)
		connectEPs(t, a, b, 1, 1, attr)
		testODP(t, a, b)
	})
	t.Run("fastreg", func(t *testing.T) {
		a, b := newEP(t, x, 1<<20), newEP(t, y, 1<<20)
		connectEPs(t, a, b, 1, 1, attr)
		testFastReg(t, a, b)
	})
}

func testODP(t *testing.T, a, b *ep) {
	const n = 1 << 20
	ob, err := mem.Alloc(n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ob.Close() }) // after the module's exit let go of it
	om, err := hfiuser.RegMR(a.f, ob.Addr(), n, uint64(ob.Addr()), odpAccess)
	if err != nil {
		t.Fatalf("REG_MR ODP: %v", err)
	}
	// A POST_RECV on A's file, even of nothing, waits for A's pending
	// invalidations (docs/fabric.md: a peer's requests are not fenced by
	// A's notifier; A orders its madvise and B's next request itself).
	fenceA := func() {
		t.Helper()
		if _, err := a.qp.PostRecv(nil); err != nil {
			t.Fatalf("POST_RECV on A: %v", err)
		}
	}
	stats := func() uapi.GohfiMRStats {
		t.Helper()
		fenceA()
		s, err := hfiuser.MRStats(a.f, om.Handle)
		if err != nil {
			t.Fatalf("MR_STATS: %v", err)
		}
		return s
	}
	if s := stats(); s.PagesPinned != 0 || s.PageFaults != 0 {
		t.Fatalf("ODP MR before any access: %+v", s)
	}
	rnr := func() uint64 { t.Helper(); return counters(t, a.nd)["rnr_naks_sent"] }
	rnr0 := rnr()

	// First touch: B WRITEs 1 MiB.
	src := b.area(areaSrc)[:n]
	fill(src, 3)
	ok(t, "first-touch WRITE into A's ODP MR", b.one(t, driver.SendWR{WrID: 1, Opcode: uapi.GOHFI_WR_RDMA_WRITE, SendFlags: sig,
		SGL: b.sge(areaSrc, 0, n), RemoteAddr: uint64(ob.Addr()), Rkey: om.Rkey}), 1, uapi.GOHFI_WC_RDMA_WRITE)
	if !bytes.Equal(ob.Bytes(), src) {
		t.Fatal("first-touch WRITE across namespaces: data differs")
	}
	s := stats()
	if s.PageFaults == 0 || s.PageFaultsHandled != s.PageFaults || s.PagesPinned == 0 {
		t.Fatalf("after the first-touch WRITE: %+v, want faults handled and pages pinned", s)
	}
	if rnr() == rnr0 {
		t.Fatal("A's responder did not answer RNR NAK while its faults were handled")
	}
	t.Logf("first touch of 1 MiB: %d page faults, %d RNR NAKs from A", s.PageFaults, rnr()-rnr0)

	// READ it back.
	ok(t, "READ from A's ODP MR", b.one(t, driver.SendWR{WrID: 2, Opcode: uapi.GOHFI_WR_RDMA_READ, SendFlags: sig,
		SGL: b.sge(areaReadDst, 0, n), RemoteAddr: uint64(ob.Addr()), Rkey: om.Rkey}), 2, uapi.GOHFI_WC_RDMA_READ)
	if !bytes.Equal(b.area(areaReadDst)[:n], src) {
		t.Fatal("READ across namespaces from an ODP MR: data differs")
	}

	// MADV_DONTNEED on A between the rounds: WRITE, READ, SEND.
	rng := rand.New(rand.NewSource(11))
	inv0, rnr1 := stats().PageInvalidations, rnr()
	for i := range 9 {
		if err := unix.Madvise(ob.Bytes(), unix.MADV_DONTNEED); err != nil {
			t.Fatal(err)
		}
		fenceA()
		off, size := rng.Intn(n/2), 1+rng.Intn(n/2)
		as := ob.Bytes()[off : off+size]
		id := uint64(10 + i)
		switch i % 3 {
		case 0:
			fill(src[:size], byte(i))
			ok(t, "WRITE after DONTNEED", b.one(t, driver.SendWR{WrID: id, Opcode: uapi.GOHFI_WR_RDMA_WRITE, SendFlags: sig,
				SGL: b.sge(areaSrc, 0, size), RemoteAddr: uint64(ob.Addr()) + uint64(off), Rkey: om.Rkey}), id, uapi.GOHFI_WC_RDMA_WRITE)
			if !bytes.Equal(as, src[:size]) {
				t.Fatalf("round %d: WRITE data differs", i)
			}
		case 1:
			fill(as, byte(i))
			ok(t, "READ after DONTNEED", b.one(t, driver.SendWR{WrID: id, Opcode: uapi.GOHFI_WR_RDMA_READ, SendFlags: sig,
				SGL: b.sge(areaReadDst, 0, size), RemoteAddr: uint64(ob.Addr()) + uint64(off), Rkey: om.Rkey}), id, uapi.GOHFI_WC_RDMA_READ)
			if !bytes.Equal(b.area(areaReadDst)[:size], as) {
				t.Fatalf("round %d: READ data differs", i)
			}
		case 2:
			if k, err := a.qp.PostRecv([]driver.RecvWR{{WrID: id,
				SGL: []driver.SGE{{Addr: uint64(ob.Addr()) + uint64(off), Length: uint32(size), Lkey: om.Lkey}}}}); err != nil || k != 1 {
				t.Fatalf("POST_RECV: %d, %v", k, err)
			}
			fill(src[:size], byte(i))
			ok(t, "SEND into A's ODP receive buffer", b.one(t, driver.SendWR{WrID: id, Opcode: uapi.GOHFI_WR_SEND, SendFlags: sig,
				SGL: b.sge(areaSrc, 0, size)}), id, uapi.GOHFI_WC_SEND)
			wcs, err := a.wait(1, roundWait)
			if err != nil {
				t.Fatal(err)
			}
			if ok(t, "A's receive", wcs[0], id, uapi.GOHFI_WC_RECV); int(wcs[0].ByteLen) != size {
				t.Fatalf("A's receive of %d bytes: %+v", size, wcs[0])
			}
			if !bytes.Equal(as, src[:size]) {
				t.Fatalf("round %d: SEND data differs", i)
			}
		}
	}
	s = stats()
	if s.PageInvalidations == inv0 || s.PageInvalidationsHandled != s.PageInvalidations || s.PageFaultsHandled != s.PageFaults {
		t.Fatalf("after the rounds behind MADV_DONTNEED: %+v", s)
	}
	t.Logf("9 rounds behind MADV_DONTNEED: %d invalidations, %d page faults in all, %d RNR NAKs", s.PageInvalidations-inv0,
		s.PageFaults, rnr()-rnr1)

	// A unmaps the range: the responder's fault fails, REM_ACCESS_ERR at B.
	if err := ob.Unmap(); err != nil {
		t.Fatal(err)
	}
	fenceA()
	naks := counters(t, a.nd)["error_naks_sent"]
	if wc := b.one(t, driver.SendWR{WrID: 50, Opcode: uapi.GOHFI_WR_RDMA_WRITE, SendFlags: sig,
		SGL: b.sge(areaSrc, 0, 4096), RemoteAddr: uint64(ob.Addr()), Rkey: om.Rkey}); wc.Status != uapi.GOHFI_WC_REM_ACCESS_ERR || wc.WrID != 50 {
		t.Fatalf("WRITE into A's unmapped ODP range: completion %+v, want REM_ACCESS_ERR", wc)
	}
	if d := counters(t, a.nd)["error_naks_sent"] - naks; d != 1 {
		t.Errorf("A sent %d error NAKs for the unmapped range, want 1", d)
	}
	if err := hfiuser.DeregMR(a.f, om.Handle); err != nil {
		t.Fatalf("DEREG_MR: %v", err)
	}
}

func testFastReg(t *testing.T, a, b *ep) {
	fr, err := hfiuser.AllocMR(a.f, 4)
	if err != nil {
		t.Fatalf("ALLOC_MR: %v", err)
	}
	// A binds pages 5, 2, 9 of its WRITE area, in that order, at frIOVA.
	pages := []int{5, 2, 9}
	var addrs []uint64
	for _, k := range pages {
		addrs = append(addrs, a.addr(areaWrite, k*4096))
	}
	binding := func() []byte {
		var got []byte
		for _, k := range pages {
			got = append(got, a.area(areaWrite)[k*4096:(k+1)*4096]...)
		}
		return got
	}
	key := fr.Rkey&^0xff | 0x3c
	clear(a.area(areaWrite))
	if k, err := hfiuser.PostSend(a.f, a.qp.Handle(), []hfiuser.SendWR{hfiuser.FastRegWR(1, sig, fr.Handle, key, frAccess,
		addrs, 12, frIOVA, 3*4096)}); err != nil || k != 1 {
		t.Fatalf("POST_SEND FAST_REG_MR: %d, %v", k, err)
	}
	wcs, err := a.wait(1, roundWait)
	if err != nil {
		t.Fatal(err)
	}
	ok(t, "FAST_REG_MR", wcs[0], 1, uapi.GOHFI_WC_REG_MR)

	// B WRITEs 10000 bytes at offset 100 of the binding (across both page
	// boundaries) and READs them back.
	const off, n = 100, 10000
	src := b.area(areaSrc)[:n]
	fill(src, 9)
	ok(t, "WRITE through the fast-reg rkey", b.one(t, driver.SendWR{WrID: 2, Opcode: uapi.GOHFI_WR_RDMA_WRITE, SendFlags: sig,
		SGL: b.sge(areaSrc, 0, n), RemoteAddr: frIOVA + off, Rkey: key}), 2, uapi.GOHFI_WC_RDMA_WRITE)
	got := binding()
	if !bytes.Equal(got[off:off+n], src) || bytes.Count(got[:off], []byte{0}) != off || bytes.Count(got[off+n:], []byte{0}) != len(got)-off-n {
		t.Fatal("WRITE across namespaces: A's pages do not hold the data in page-list order")
	}
	ok(t, "READ through the fast-reg rkey", b.one(t, driver.SendWR{WrID: 3, Opcode: uapi.GOHFI_WR_RDMA_READ, SendFlags: sig,
		SGL: b.sge(areaReadDst, 0, n), RemoteAddr: frIOVA + off, Rkey: key}), 3, uapi.GOHFI_WC_RDMA_READ)
	if !bytes.Equal(b.area(areaReadDst)[:n], src) {
		t.Fatal("READ across namespaces through the fast-reg rkey: data differs")
	}

	// B's SEND_WITH_INV invalidates A's MR.
	if k, err := a.qp.PostRecv([]driver.RecvWR{{WrID: 4, SGL: a.sge(areaRecv, 0, 256)}}); err != nil || k != 1 {
		t.Fatalf("POST_RECV: %d, %v", k, err)
	}
	ok(t, "SEND_WITH_INV", b.one(t, driver.SendWR{WrID: 5, Opcode: uapi.GOHFI_WR_SEND_WITH_INV, SendFlags: sig,
		SGL: b.sge(areaSrc, 0, 200), InvalidateRkey: key}), 5, uapi.GOHFI_WC_SEND)
	if wcs, err = a.wait(1, roundWait); err != nil {
		t.Fatal(err)
	}
	if rwc := wcs[0]; rwc.Status != uapi.GOHFI_WC_SUCCESS || rwc.WrID != 4 || rwc.ByteLen != 200 ||
		rwc.WcFlags&uapi.GOHFI_WC_WITH_INVALIDATE == 0 || rwc.InvalidatedRkey != key {
		t.Fatalf("A's receive completion %+v, want WITH_INVALIDATE of %#x", rwc, key)
	}
	if !bytes.Equal(a.area(areaRecv)[:200], src[:200]) {
		t.Fatal("SEND_WITH_INV: data differs")
	}

	// The old rkey: NAK remote access error from A, REM_ACCESS_ERR at B,
	// A's pages unchanged.
	naks := counters(t, a.nd)["error_naks_sent"]
	before := binding()
	fill(src, 77)
	if wc := b.one(t, driver.SendWR{WrID: 6, Opcode: uapi.GOHFI_WR_RDMA_WRITE, SendFlags: sig,
		SGL: b.sge(areaSrc, 0, 64), RemoteAddr: frIOVA + off, Rkey: key}); wc.Status != uapi.GOHFI_WC_REM_ACCESS_ERR || wc.WrID != 6 {
		t.Fatalf("WRITE with the invalidated rkey: completion %+v, want REM_ACCESS_ERR", wc)
	}
	if d := counters(t, a.nd)["error_naks_sent"] - naks; d != 1 {
		t.Errorf("A sent %d error NAKs for the stale rkey, want 1", d)
	}
	if !bytes.Equal(binding(), before) {
		t.Fatal("a WRITE with the invalidated rkey changed A's pages")
	}
	if err := hfiuser.DeregMR(a.f, fr.Handle); err != nil {
		t.Fatalf("DEREG_MR after the remote invalidation: %v", err)
	}
}
