package driver_test

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/mem"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/userfault"
	"golang.org/x/sys/unix"
)

// Device access to memory the process maps PROT_READ: the pinner cannot pin
// it for writing (io_uring), so the driver holds it with read-only pins
// (docs/pinning.md, "Read-only memory"). Reads by the device work, writes
// fail with the IB status of a protection error.

// readOnlyBuf allocates n bytes filled with fill(seed) and mapped PROT_READ
// (made writable again at cleanup, before the buffer is freed).
func readOnlyBuf(t *testing.T, n int, seed byte) *mem.Buffer {
	t.Helper()
	b := allocBuf(t, n, false)
	fill(b.Bytes(), seed)
	if err := unix.Mprotect(b.Bytes(), unix.PROT_READ); err != nil {
		t.Fatal(err)
	}
	return b
}

// warmReadOnly has the device read n bytes of PROT_READ memory through an
// ODP MR once and deregisters it, so that what stays for the life of the
// device is set up (the notifier's descriptors, the pinner's /dev/null)
// before a test counts descriptors.
func warmReadOnly(t *testing.T, l *odpLoop, dst uapi.GohfiRegMR, dstAddr uintptr, n int) {
	t.Helper()
	b := readOnlyBuf(t, n, 0)
	mr := l.reg(l.qb.f, b.Addr(), n, uapi.IB_ACCESS_REMOTE_READ|uapi.IB_ACCESS_ON_DEMAND)
	wantOK(t, "warm-up READ", l.op(uapi.GOHFI_WR_RDMA_READ, sg(dstAddr, n, dst), b.Addr(), mr.Rkey))
	if err := hfiuser.DeregMR(l.qb.f, mr.Handle); err != nil {
		t.Fatal(err)
	}
}

// readOnlySetup is what the read-only tests start from: pinned, writable
// buffers on both sides (dst, the READ destination on side a; rb, the
// receive buffer on side b) and two PROT_READ buffers (ro for side b, roA
// for side a), the read-only path warmed up.
type readOnlySetup struct {
	dst, rb, ro, roA *mem.Buffer
	md, mrb          uapi.GohfiRegMR
}

// startReadOnly starts an ODP loop and the buffers of readOnlySetup, n
// bytes each, ro and roA filled with seeds seed and seed+1.
func startReadOnly(t *testing.T, n int, seed byte) (*attach.Attached, *odpLoop, readOnlySetup) {
	t.Helper()
	a, l := startODP(t)
	var r readOnlySetup
	r.dst, r.rb = allocBuf(t, n, false), allocBuf(t, n, false)
	r.md = l.reg(l.qa.f, r.dst.Addr(), n, pinAccess)
	r.mrb = l.reg(l.qb.f, r.rb.Addr(), n, pinAccess)
	r.ro, r.roA = readOnlyBuf(t, n, seed), readOnlyBuf(t, n, seed+1)
	warmReadOnly(t, l, r.md, r.dst.Addr(), 4096)
	return a, l, r
}

// TestODPReadOnlyMemory: an ODP MR (with write access) over PROT_READ
// memory serves every device read, through read-only MTT entries: an RDMA
// READ by the peer, a SEND from it and an RDMA WRITE from it (requester
// SGEs); an RDMA WRITE into it fails with REM_ACCESS_ERR, and so does it
// again after a READ mapped the page read-only; once the process makes the
// memory writable, the same WRITE lands in its pages. Nothing stays pinned
// and no descriptor is left once the MRs are deregistered.
func TestODPReadOnlyMemory(t *testing.T) {
	const n = 256 << 10
	a, l, r := startReadOnly(t, n, 7)
	dst, rb, md, mrb, ro, roA := r.dst, r.rb, r.md, r.mrb, r.ro, r.roA
	fds, pins, st0 := countFDs(t), a.Device.PinnedNow(), a.Device.Stats()

	mo := l.reg(l.qb.f, ro.Addr(), n, odpAccess)
	moA := l.reg(l.qa.f, roA.Addr(), n, odpAccess)

	// RDMA READ responder.
	wantOK(t, "READ of PROT_READ memory", l.op(uapi.GOHFI_WR_RDMA_READ, sg(dst.Addr(), n, md), ro.Addr(), mo.Rkey))
	if !bytes.Equal(dst.Bytes(), ro.Bytes()) {
		t.Fatal("READ of PROT_READ memory: data differs")
	}
	if a.Sim != nil {
		e := simMPT(t, a, mo.Lkey)
		for i := 0; i < n/4096; i++ {
			if v := simMTT(t, a, int(e.MTTFirst)+i); v&chip.MTTPresent == 0 || v&chip.MTTWrite != 0 {
				t.Fatalf("MTT entry %d of PROT_READ memory after a READ: %#x, want present and not writable", i, v)
			}
		}
	}
	if s := l.stats(l.qb.f, mo); s.PageFaults == 0 || s.PageFaultsHandled != s.PageFaults || s.PagesPinned != n/4096 {
		t.Fatalf("after the READ: %+v", s)
	}

	// RDMA WRITE into it: the page is mapped, read-only; the write fault
	// cannot pin it for writing.
	want := bytes.Clone(ro.Bytes())
	fill(dst.Bytes(), 9)
	wc := l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(dst.Addr(), 4096, md), ro.Addr()+8192, mo.Rkey)
	if wc.Status != uapi.GOHFI_WC_REM_ACCESS_ERR || wc.VendorErr != chip.VendorErrPageFault {
		t.Fatalf("WRITE into PROT_READ memory: %+v, want REM_ACCESS_ERR/%d", wc, chip.VendorErrPageFault)
	}
	if !bytes.Equal(ro.Bytes(), want) {
		t.Fatal("a refused WRITE changed PROT_READ memory")
	}
	l.reconnect()
	wantOK(t, "READ after the refused WRITE", l.op(uapi.GOHFI_WR_RDMA_READ, sg(dst.Addr(), n, md), ro.Addr(), mo.Rkey))
	if !bytes.Equal(dst.Bytes(), want) {
		t.Fatal("READ after the refused WRITE: data differs")
	}
	wc = l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(dst.Addr(), 4096, md), ro.Addr(), mo.Rkey)
	if wc.Status != uapi.GOHFI_WC_REM_ACCESS_ERR {
		t.Fatalf("second WRITE into PROT_READ memory: %+v, want REM_ACCESS_ERR", wc)
	}
	l.reconnect()

	// Requester SGEs: SEND from it, RDMA WRITE from it.
	l.recv(sg(rb.Addr(), n, mrb))
	wantOK(t, "SEND from PROT_READ memory", l.op(uapi.GOHFI_WR_SEND, sg(roA.Addr(), n, moA), 0, 0))
	wantOK(t, "RECV", pollWC(t, l.qb.f, l.qb.cq, 1)[0])
	if !bytes.Equal(rb.Bytes(), roA.Bytes()) {
		t.Fatal("SEND from PROT_READ memory: data differs")
	}
	clear(rb.Bytes())
	wantOK(t, "WRITE from PROT_READ memory", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(roA.Addr(), n, moA), rb.Addr(), mrb.Rkey))
	if !bytes.Equal(rb.Bytes(), roA.Bytes()) {
		t.Fatal("WRITE from PROT_READ memory: data differs")
	}
	if s := l.stats(l.qa.f, moA); s.PageFaults == 0 || s.PageFaultsHandled != s.PageFaults {
		t.Fatalf("requester-side ODP MR over PROT_READ memory: %+v", s)
	}

	// Writable again: the write fault drops the read-only mapping and
	// pins the page for writing; the WRITE lands in the process's page.
	if err := unix.Mprotect(ro.Bytes(), unix.PROT_READ|unix.PROT_WRITE); err != nil {
		t.Fatal(err)
	}
	wantOK(t, "WRITE after mprotect(PROT_WRITE)", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(dst.Addr(), 4096, md), ro.Addr()+8192, mo.Rkey))
	if !bytes.Equal(ro.Bytes()[8192:8192+4096], dst.Bytes()[:4096]) {
		t.Fatal("WRITE after mprotect(PROT_WRITE) did not land in the process's memory")
	}
	if a.Sim != nil {
		e := simMPT(t, a, mo.Lkey)
		if v := simMTT(t, a, int(e.MTTFirst)+2); v&chip.MTTWrite == 0 {
			t.Fatalf("MTT entry after the WRITE: %#x, want writable", v)
		}
	}

	for _, m := range []struct {
		f  *driver.File
		mr uapi.GohfiRegMR
	}{{l.qb.f, mo}, {l.qa.f, moA}} {
		if err := hfiuser.DeregMR(m.f, m.mr.Handle); err != nil {
			t.Fatal(err)
		}
	}
	st := a.Device.Stats()
	if got := (st.PagesPinned - st0.PagesPinned) - (st.PagesUnpinned - st0.PagesUnpinned); got != 0 || a.Device.PinnedNow() != pins {
		t.Errorf("after DEREG_MR: %d pages pinned more than unpinned, %d pins held (%d before)", got, a.Device.PinnedNow(), pins)
	}
	if got := countFDs(t); got != fds {
		t.Errorf("after DEREG_MR: %d descriptors open, %d before", got, fds)
	}
}

// TestRegMRReadOnlyMemory: a pinned REG_MR of PROT_READ memory works when
// its access flags ask for no device write (as ib_umem_get pins without
// FOLL_WRITE then), and is EFAULT when they do. Like any pinned MR it
// keeps the pages it pinned: after munmap and a new mapping at the same
// address the device still reads the old ones.
func TestRegMRReadOnlyMemory(t *testing.T) {
	const n = 128 << 10
	a, l, r := startReadOnly(t, n, 3)
	dst, rb, md, mrb, ro, roA := r.dst, r.rb, r.md, r.mrb, r.ro, r.roA
	fds, pins := countFDs(t), a.Device.PinnedNow()

	_, err := hfiuser.RegMR(l.qb.f, ro.Addr(), n, uint64(ro.Addr()), uapi.IB_ACCESS_LOCAL_WRITE|uapi.IB_ACCESS_REMOTE_READ)
	wantErrno(t, "REG_MR with LOCAL_WRITE of PROT_READ memory", err, unix.EFAULT)
	if a.Device.PinnedNow() != pins || countFDs(t) != fds {
		t.Fatalf("a refused REG_MR holds %d pins, %d descriptors", a.Device.PinnedNow()-pins, countFDs(t)-fds)
	}

	mr := l.reg(l.qb.f, ro.Addr(), n, uapi.IB_ACCESS_REMOTE_READ)
	mrA := l.reg(l.qa.f, roA.Addr(), n, 0)
	if a.Sim != nil {
		e := simMPT(t, a, mr.Lkey)
		if v := simMTT(t, a, int(e.MTTFirst)); v&chip.MTTPresent == 0 || v&chip.MTTWrite != 0 {
			t.Fatalf("MTT entry of a read-only MR: %#x, want present and not writable", v)
		}
	}
	wantOK(t, "READ of a pinned MR of PROT_READ memory", l.op(uapi.GOHFI_WR_RDMA_READ, sg(dst.Addr(), n, md), ro.Addr(), mr.Rkey))
	if !bytes.Equal(dst.Bytes(), ro.Bytes()) {
		t.Fatal("READ of a pinned MR of PROT_READ memory: data differs")
	}
	l.recv(sg(rb.Addr(), n, mrb))
	wantOK(t, "SEND from a pinned MR of PROT_READ memory", l.op(uapi.GOHFI_WR_SEND, sg(roA.Addr(), n, mrA), 0, 0))
	wantOK(t, "RECV", pollWC(t, l.qb.f, l.qb.cq, 1)[0])
	if !bytes.Equal(rb.Bytes(), roA.Bytes()) {
		t.Fatal("SEND from a pinned MR of PROT_READ memory: data differs")
	}

	old := bytes.Clone(ro.Bytes())
	if err := munmapRaw(ro.Addr(), n); err != nil {
		t.Fatal(err)
	}
	if err := mmapFixed(ro.Addr(), n, unix.PROT_READ|unix.PROT_WRITE); err != nil {
		t.Fatal(err)
	}
	fill(unsafeSlice(ro.Addr(), n), 5)
	wantOK(t, "READ after munmap and mmap", l.op(uapi.GOHFI_WR_RDMA_READ, sg(dst.Addr(), n, md), ro.Addr(), mr.Rkey))
	if !bytes.Equal(dst.Bytes(), old) {
		t.Fatal("READ after munmap and mmap: the pinned MR did not read the pages it pinned")
	}

	for _, m := range []struct {
		f  *driver.File
		mr uapi.GohfiRegMR
	}{{l.qb.f, mr}, {l.qa.f, mrA}} {
		if err := hfiuser.DeregMR(m.f, m.mr.Handle); err != nil {
			t.Fatal(err)
		}
	}
	if a.Device.PinnedNow() != pins || countFDs(t) != fds {
		t.Errorf("after DEREG_MR: %d pins, %d descriptors more than before", a.Device.PinnedNow()-pins, countFDs(t)-fds)
	}
}

// TestODPReadOnlyRemap: an ODP MR over PROT_READ memory follows the
// address, and its read-only pins hold the pages they pinned until the
// invalidation is through: after munmap and a new mapping (other bytes) at
// the same address, the device (whose TLB still holds the translation
// while the flush runs, 500 ms here) reads the old pages; once the flush
// is done, the next READ faults in the new ones. A trial counts when the
// device's view was taken before the flush completed (a loaded machine
// may miss the window); at least one must.
func TestODPReadOnlyRemap(t *testing.T) {
	requireRoot(t)
	o := attach.DefaultOptions()
	o.Sim.NumContexts = 2
	o.Sim.TLBInvLatency = 500 * time.Millisecond
	a, err := attach.Open(context.Background(), "embedded", o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := a.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	l := newODPLoop(t, a)
	const n = 64 << 10
	dst := allocBuf(t, n, false)
	md := l.reg(l.qa.f, dst.Addr(), n, pinAccess)
	ro := readOnlyBuf(t, n, 1)
	addr := ro.Addr()
	mo := l.reg(l.qb.f, addr, n, uapi.IB_ACCESS_REMOTE_READ|uapi.IB_ACCESS_ON_DEMAND)
	wantOK(t, "first READ", l.op(uapi.GOHFI_WR_RDMA_READ, sg(dst.Addr(), n, md), addr, mo.Rkey))
	old := bytes.Clone(unsafeSlice(addr, n))
	if !bytes.Equal(dst.Bytes(), old) {
		t.Fatal("first READ: data differs")
	}
	unmapped := make(chan struct{}, 1)
	driver.SetODPInvalidateHook(a.Module, func(ev userfault.Event) {
		if ev.Kind == userfault.EventUnmap {
			select {
			case unmapped <- struct{}{}:
			default:
			}
		}
	})
	defer driver.SetODPInvalidateHook(a.Module, nil)
	inWindow := 0
	for trial := 0; trial < 5 && inWindow == 0; trial++ {
		faults := l.stats(l.qb.f, mo).PageFaults
		if err := munmapRaw(addr, n); err != nil {
			t.Fatal(err)
		}
		if err := mmapFixed(addr, n, unix.PROT_READ|unix.PROT_WRITE); err != nil {
			t.Fatal(err)
		}
		nw := unsafeSlice(addr, n)
		fill(nw, byte(10+trial))
		if err := unix.Mprotect(nw, unix.PROT_READ); err != nil {
			t.Fatal(err)
		}
		select {
		case <-unmapped:
		case <-time.After(10 * time.Second):
			t.Fatal("the munmap did not reach the ODP MR")
		}
		// The MTT entries are zapped; the device's TLB holds the old
		// translation until the flush completes.
		view := make([]byte, n)
		ok, err := a.Sim.Device.PeekMR(mo.Rkey, uint64(addr), view)
		if err != nil {
			t.Fatal(err)
		}
		if ok {
			inWindow++
			if !bytes.Equal(view, old) {
				t.Fatalf("trial %d: before the flush the device read other bytes than the pages it had pinned", trial)
			}
		}
		if err := a.Device.ODPFence(); err != nil {
			t.Fatal(err)
		}
		if ok, _ := a.Sim.Device.PeekMR(mo.Rkey, uint64(addr), view); ok {
			t.Fatalf("trial %d: the device still translates the MR after the invalidation", trial)
		}
		wantOK(t, "READ after the remap", l.op(uapi.GOHFI_WR_RDMA_READ, sg(dst.Addr(), n, md), addr, mo.Rkey))
		if !bytes.Equal(dst.Bytes(), nw) {
			t.Fatalf("trial %d: READ after the remap did not read the new mapping", trial)
		}
		if s := l.stats(l.qb.f, mo); s.PageFaults == faults {
			t.Fatalf("trial %d: READ after the remap did not fault: %+v", trial, s)
		}
		old = bytes.Clone(nw)
	}
	if inWindow == 0 {
		t.Fatal("no trial saw the device's view before the flush completed")
	}
}
