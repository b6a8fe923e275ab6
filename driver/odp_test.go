package driver_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand"
	"os"
	"testing"
	"time"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// The ODP tests, in the spirit of rdma-core's tests/test_odp.py: two files
// on one device, an RC QP each, connected; buffers registered with
// IB_ACCESS_ON_DEMAND on either or both sides. They use openDev, so they
// run on the embedded device or on GOHFI_TEST_DEVICE (the QEMU guest);
// the checks that read the device's own view (a.Sim) are skipped there.

const (
	odpAccess  = uapi.IB_ACCESS_LOCAL_WRITE | uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ | uapi.IB_ACCESS_ON_DEMAND
	pinAccess  = uapi.IB_ACCESS_LOCAL_WRITE | uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ
	odpLoopBuf = 4 << 20
)

type odpLoop struct {
	t      *testing.T
	a      *attach.Attached
	qa, qb rcQP // qa posts, qb responds
}

// startODP opens a device (as root) with a connected loop on it.
func startODP(t *testing.T) (*attach.Attached, *odpLoop) {
	t.Helper()
	requireRoot(t)
	a := openDev(t, 2)
	return a, newODPLoop(t, a)
}

func newODPLoop(t *testing.T, a *attach.Attached) *odpLoop {
	t.Helper()
	fa, fb := openFile(t, a), openFile(t, a)
	assign(t, fa)
	assign(t, fb)
	l := &odpLoop{t: t, a: a, qa: newRCQP(t, fa, 16, 16, false), qb: newRCQP(t, fb, 16, 16, false)}
	l.qa.connect(t, l.qb.qpn)
	l.qb.connect(t, l.qa.qpn)
	return l
}

// reconnect takes both QPs through RESET and connects them again (after
// an error moved them to ERR).
func (l *odpLoop) reconnect() {
	l.t.Helper()
	for _, q := range []rcQP{l.qa, l.qb} {
		if err := q.modify(uapi.GOHFI_QPS_RESET, 0, 0); err != nil {
			l.t.Fatalf("MODIFY_QP to RESET: %v", err)
		}
	}
	l.qa.connect(l.t, l.qb.qpn)
	l.qb.connect(l.t, l.qa.qpn)
}

// reg registers n bytes at addr in file f.
func (l *odpLoop) reg(f *driver.File, addr uintptr, n int, access uint32) uapi.GohfiRegMR {
	l.t.Helper()
	r, err := hfiuser.RegMR(f, addr, uint64(n), uint64(addr), access)
	if err != nil {
		l.t.Fatalf("REG_MR %#x+%d access %#x: %v", addr, n, access, err)
	}
	return r
}

func sg(addr uintptr, n int, mr uapi.GohfiRegMR) []uapi.GohfiSge {
	return []uapi.GohfiSge{{Addr: uint64(addr), Length: uint32(n), Lkey: mr.Lkey}}
}

// op posts one signaled WR on qa and returns its completion.
func (l *odpLoop) op(opcode uint32, sgl []uapi.GohfiSge, raddr uintptr, rkey uint32) uapi.GohfiWC {
	l.t.Helper()
	w := hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: 1, Opcode: opcode, SendFlags: uapi.GOHFI_SEND_SIGNALED,
		RemoteAddr: uint64(raddr), Rkey: rkey}, SGL: sgl}
	if _, err := hfiuser.PostSend(l.qa.f, l.qa.qp, []hfiuser.SendWR{w}); err != nil {
		l.t.Fatalf("POST_SEND: %v", err)
	}
	return pollWC(l.t, l.qa.f, l.qa.cq, 1)[0]
}

// recv posts a receive on qb.
func (l *odpLoop) recv(sgl []uapi.GohfiSge) {
	l.t.Helper()
	if _, err := hfiuser.PostRecv(l.qb.f, l.qb.qp, []hfiuser.RecvWR{{GohfiRecvWR: uapi.GohfiRecvWR{WrID: 2}, SGL: sgl}}); err != nil {
		l.t.Fatalf("POST_RECV: %v", err)
	}
}

func (l *odpLoop) stats(f *driver.File, mr uapi.GohfiRegMR) uapi.GohfiMRStats {
	l.t.Helper()
	s, err := hfiuser.MRStats(f, mr.Handle)
	if err != nil {
		l.t.Fatalf("MR_STATS: %v", err)
	}
	return s
}

func wantOK(t testing.TB, what string, wc uapi.GohfiWC) {
	t.Helper()
	if wc.Status != uapi.GOHFI_WC_SUCCESS {
		t.Fatalf("%s: completion %+v", what, wc)
	}
}

// simMTT reads MTT entry i from the embedded device (0 on a real one).
func simMTT(t testing.TB, a *attach.Attached, i int) uint64 {
	var b [8]byte
	if err := a.Sim.Device.RegionRead(chip.MTTBar, uint64(i)*chip.MTTEntrySize, b[:]); err != nil {
		t.Fatal(err)
	}
	return binary.LittleEndian.Uint64(b[:])
}

func simMPT(t testing.TB, a *attach.Attached, key uint32) chip.MPTEntry {
	base := chip.MPTOffset(a.Device.Info().MTTEntries) + uint64(chip.MPTIndex(key))*chip.MPTEntrySize
	var b [chip.MPTEntrySize]byte
	if err := a.Sim.Device.RegionRead(chip.MTTBar, base, b[:]); err != nil {
		t.Fatal(err)
	}
	var e chip.MPTEntry
	e.Unmarshal(b[:])
	return e
}

func nothingPinned(t testing.TB, a *attach.Attached) {
	t.Helper()
	st := a.Device.Stats()
	if st.PagesPinned != st.PagesUnpinned || a.Device.PinnedNow() != 0 {
		t.Errorf("pinned %d, unpinned %d, pins held %d", st.PagesPinned, st.PagesUnpinned, a.Device.PinnedNow())
	}
}

// TestODPRegister: QUERY_DEVICE advertises ODP for RC; an ODP REG_MR pins
// and maps nothing (pages_pinned 0, MTT entries not present, MPT type ODP)
// and fails with EFAULT on memory that is not mapped.
func TestODPRegister(t *testing.T) {
	requireRoot(t)
	a := openDev(t, 2)
	f := openFile(t, a)
	assign(t, f)
	attr, err := hfiuser.QueryDevice(f)
	if err != nil {
		t.Fatal(err)
	}
	wantRC := uint32(uapi.IBV_ODP_SUPPORT_SEND | uapi.IBV_ODP_SUPPORT_RECV | uapi.IBV_ODP_SUPPORT_WRITE | uapi.IBV_ODP_SUPPORT_READ)
	if attr.OdpGeneralCaps != odpGeneralCaps(a) || attr.OdpRCCaps&wantRC != wantRC || attr.OdpUCCaps != 0 || attr.OdpUDCaps != 0 {
		t.Fatalf("ODP caps general %#x rc %#x uc %#x ud %#x", attr.OdpGeneralCaps, attr.OdpRCCaps, attr.OdpUCCaps, attr.OdpUDCaps)
	}
	before := a.Device.Stats()
	buf := allocBuf(t, 1<<20, false)
	r, err := hfiuser.RegMR(f, buf.Addr(), 1<<20, uint64(buf.Addr()), odpAccess)
	if err != nil {
		t.Fatal(err)
	}
	if s, _ := hfiuser.MRStats(f, r.Handle); s != (uapi.GohfiMRStats{Handle: r.Handle}) {
		t.Fatalf("MR_STATS of a fresh ODP MR: %+v", s)
	}
	if st := a.Device.Stats(); st.PagesPinned != before.PagesPinned {
		t.Fatalf("REG_MR pinned %d pages", st.PagesPinned-before.PagesPinned)
	}
	if a.Sim != nil {
		e := simMPT(t, a, r.Lkey)
		if e.Flags&chip.MPTTypeMask != chip.MPTTypeODP || e.Flags&chip.MPTStateMask != chip.MPTStateValid {
			t.Fatalf("MPT entry %+v", e)
		}
		for i := 0; i < 256; i++ {
			if v := simMTT(t, a, int(e.MTTFirst)+i); v != 0 {
				t.Fatalf("MTT entry %d: %#x, want not present", i, v)
			}
		}
	}
	if err := hfiuser.DeregMR(f, r.Handle); err != nil {
		t.Fatal(err)
	}
	// Not mapped: EFAULT.
	hole := allocBuf(t, 1<<16, false)
	if err := hole.Unmap(); err != nil {
		t.Fatal(err)
	}
	_, err = hfiuser.RegMR(f, hole.Addr(), 1<<16, uint64(hole.Addr()), odpAccess)
	wantErrno(t, "ODP REG_MR of unmapped memory", err, unix.EFAULT)
	nothingPinned(t, a)
}

// TestODPFirstAccess: the first device access to an ODP MR faults and the
// data lands, on the responder (WRITE, READ, a receive buffer) and the
// requester side; the counters say so.
func TestODPFirstAccess(t *testing.T) {
	a, l := startODP(t)
	const n = 1 << 20
	src, dst := allocBuf(t, n, false), allocBuf(t, n, false)
	pinned := l.reg(l.qa.f, src.Addr(), n, pinAccess)
	odp := l.reg(l.qb.f, dst.Addr(), n, odpAccess)
	sb, db := src.Bytes(), dst.Bytes()

	fill(sb, 1)
	wantOK(t, "WRITE", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(src.Addr(), n, pinned), dst.Addr(), odp.Rkey))
	if !bytes.Equal(sb, db) {
		t.Fatal("WRITE into the ODP MR: data differs")
	}
	s := l.stats(l.qb.f, odp)
	if s.PageFaults == 0 || s.PageFaultsHandled != s.PageFaults || s.PagesPinned != n/4096 {
		t.Fatalf("after the WRITE: %+v", s)
	}
	faults := s.PageFaults
	// Warm: no new fault.
	fill(sb, 2)
	wantOK(t, "WRITE warm", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(src.Addr(), n, pinned), dst.Addr(), odp.Rkey))
	if s := l.stats(l.qb.f, odp); s.PageFaults != faults || !bytes.Equal(sb, db) {
		t.Fatalf("warm WRITE faulted or lost data: %+v", s)
	}
	// READ from ODP on the requester side into an ODP buffer of A.
	rd := allocBuf(t, n, false)
	odpA := l.reg(l.qa.f, rd.Addr(), n, odpAccess)
	fill(db, 3)
	wantOK(t, "READ", l.op(uapi.GOHFI_WR_RDMA_READ, sg(rd.Addr(), n, odpA), dst.Addr(), odp.Rkey))
	if !bytes.Equal(rd.Bytes(), db) {
		t.Fatal("READ into an ODP MR: data differs")
	}
	if s := l.stats(l.qa.f, odpA); s.PageFaults == 0 {
		t.Fatalf("requester-side ODP MR did not fault: %+v", s)
	}
	// SEND from ODP A into a receive buffer of a fresh ODP MR of B.
	rb := allocBuf(t, n, false)
	odpR := l.reg(l.qb.f, rb.Addr(), n, odpAccess)
	fill(rd.Bytes(), 4)
	l.recv(sg(rb.Addr(), n, odpR))
	wantOK(t, "SEND", l.op(uapi.GOHFI_WR_SEND, sg(rd.Addr(), n, odpA), 0, 0))
	wantOK(t, "RECV", pollWC(t, l.qb.f, l.qb.cq, 1)[0])
	if !bytes.Equal(rd.Bytes(), rb.Bytes()) {
		t.Fatal("SEND into an ODP receive buffer: data differs")
	}
	if s := l.stats(l.qb.f, odpR); s.PageFaults == 0 || s.PagesPinned == 0 {
		t.Fatalf("receive buffer: %+v", s)
	}
	st := a.Device.Stats()
	if st.OdpPageFaults == 0 || st.OdpFaultsHandled != st.OdpPageFaults {
		t.Fatalf("DRIVER_STATS: %+v", st)
	}
}

// TestODPDontneedEveryOp: MADV_DONTNEED on both sides before every
// operation, for many iterations of RDMA WRITE, READ and SEND/RECV between
// two ODP MRs: the data is always intact (no operation reaches a page the
// process dropped) and the invalidations are counted and handled.
func TestODPDontneedEveryOp(t *testing.T) {
	a, l := startODP(t)
	const n = 256 << 10
	ab, bb := allocBuf(t, n, false), allocBuf(t, n, false)
	ma := l.reg(l.qa.f, ab.Addr(), n, odpAccess)
	mb := l.reg(l.qb.f, bb.Addr(), n, odpAccess)
	rng := rand.New(rand.NewSource(1))
	iters := 60
	if testing.Short() {
		iters = 15
	}
	for i := range iters {
		for _, b := range []uintptr{ab.Addr(), bb.Addr()} {
			if err := madvise(b, n, unix.MADV_DONTNEED); err != nil {
				t.Fatal(err)
			}
		}
		off, size := rng.Intn(n/2), 1+rng.Intn(n/2)
		as, bs := ab.Bytes()[off:off+size], bb.Bytes()[off:off+size]
		switch i % 3 {
		case 0:
			fill(as, byte(i))
			wantOK(t, "WRITE", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(ab.Addr()+uintptr(off), size, ma), bb.Addr()+uintptr(off), mb.Rkey))
			if !bytes.Equal(as, bs) {
				t.Fatalf("iteration %d: WRITE data differs", i)
			}
		case 1:
			fill(bs, byte(i))
			wantOK(t, "READ", l.op(uapi.GOHFI_WR_RDMA_READ, sg(ab.Addr()+uintptr(off), size, ma), bb.Addr()+uintptr(off), mb.Rkey))
			if !bytes.Equal(as, bs) {
				t.Fatalf("iteration %d: READ data differs", i)
			}
		case 2:
			fill(as, byte(i))
			l.recv(sg(bb.Addr()+uintptr(off), size, mb))
			wantOK(t, "SEND", l.op(uapi.GOHFI_WR_SEND, sg(ab.Addr()+uintptr(off), size, ma), 0, 0))
			wantOK(t, "RECV", pollWC(t, l.qb.f, l.qb.cq, 1)[0])
			if !bytes.Equal(as, bs) {
				t.Fatalf("iteration %d: SEND data differs", i)
			}
		}
	}
	if err := a.Device.ODPFence(); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		f  *driver.File
		mr uapi.GohfiRegMR
	}{{l.qa.f, ma}, {l.qb.f, mb}} {
		s := l.stats(c.f, c.mr)
		if s.PageInvalidations == 0 || s.PageInvalidationsHandled != s.PageInvalidations || s.PageFaults < uint64(iters/2) {
			t.Fatalf("after %d iterations: %+v", iters, s)
		}
	}
}

// TestODPFollowsAddress: after munmap and a new mapping at the same
// address, the next device access faults in the new pages (WRITE lands in
// them, READ reads them); after munmap alone the access fails with the
// right status, nothing crashes, and a new mapping works again.
func TestODPFollowsAddress(t *testing.T) {
	_, l := startODP(t)
	const n = 256 << 10
	src, buf := allocBuf(t, n, false), allocBuf(t, n, false)
	ms := l.reg(l.qa.f, src.Addr(), n, pinAccess)
	mo := l.reg(l.qb.f, buf.Addr(), n, odpAccess)
	addr := buf.Addr()
	view := func() []byte { return unsafeSlice(addr, n) }
	fill(src.Bytes(), 1)
	wantOK(t, "WRITE", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(src.Addr(), n, ms), addr, mo.Rkey))
	for i := range 3 {
		if err := munmapRaw(addr, n); err != nil {
			t.Fatal(err)
		}
		if err := mmapFixed(addr, n, unix.PROT_READ|unix.PROT_WRITE); err != nil {
			t.Fatal(err)
		}
		fill(src.Bytes(), byte(10+i))
		wantOK(t, "WRITE after remap", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(src.Addr(), n, ms), addr, mo.Rkey))
		if !bytes.Equal(view(), src.Bytes()) {
			t.Fatalf("round %d: WRITE did not land in the new mapping", i)
		}
		fill(view(), byte(20+i))
		wantOK(t, "READ after remap", l.op(uapi.GOHFI_WR_RDMA_READ, sg(src.Addr(), n, ms), addr, mo.Rkey))
		if !bytes.Equal(view(), src.Bytes()) {
			t.Fatalf("round %d: READ did not read the new mapping", i)
		}
	}
	// munmap alone: the responder's fault fails, REM_ACCESS_ERR.
	if err := munmapRaw(addr, n); err != nil {
		t.Fatal(err)
	}
	wc := l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(src.Addr(), 4096, ms), addr, mo.Rkey)
	if wc.Status != uapi.GOHFI_WC_REM_ACCESS_ERR || wc.VendorErr != chip.VendorErrPageFault {
		t.Fatalf("WRITE into unmapped ODP memory: %+v, want REM_ACCESS_ERR/%d", wc, chip.VendorErrPageFault)
	}
	// Requester side: an SGE of an ODP MR whose memory is gone,
	// LOC_PROT_ERR. The QPs are in ERR: connect them again.
	l.reconnect()
	l2 := l
	gone := allocBuf(t, n, false)
	mg := l2.reg(l2.qa.f, gone.Addr(), n, odpAccess)
	dst := allocBuf(t, n, false)
	md := l2.reg(l2.qb.f, dst.Addr(), n, pinAccess)
	if err := gone.Unmap(); err != nil {
		t.Fatal(err)
	}
	wc = l2.op(uapi.GOHFI_WR_RDMA_WRITE, sg(gone.Addr(), 4096, mg), dst.Addr(), md.Rkey)
	if wc.Status != uapi.GOHFI_WC_LOC_PROT_ERR || wc.VendorErr != chip.VendorErrPageFault {
		t.Fatalf("WRITE from unmapped ODP memory: %+v, want LOC_PROT_ERR/%d", wc, chip.VendorErrPageFault)
	}
	// Mapped again: a new connection works through the same MR.
	if err := mmapFixed(addr, n, unix.PROT_READ|unix.PROT_WRITE); err != nil {
		t.Fatal(err)
	}
	l.reconnect()
	l3 := l
	src3 := allocBuf(t, n, false)
	m3 := l3.reg(l3.qa.f, src3.Addr(), n, pinAccess)
	mo3 := l3.reg(l3.qb.f, addr, n, odpAccess)
	fill(src3.Bytes(), 42)
	wantOK(t, "WRITE after mapping again", l3.op(uapi.GOHFI_WR_RDMA_WRITE, sg(src3.Addr(), n, m3), addr, mo3.Rkey))
	if !bytes.Equal(view(), src3.Bytes()) {
		t.Fatal("data differs after mapping again")
	}
	if err := hfiuser.DeregMR(l.qb.f, mo.Handle); err != nil {
		t.Fatal(err)
	}
}

// TestODPWriteFaultOnReadOnlyMemory: a device write to an ODP MR (with
// write access) over PROT_READ memory faults, the driver cannot map the
// page for writing, and the WRITE fails with REM_ACCESS_ERR.
func TestODPWriteFaultOnReadOnlyMemory(t *testing.T) {
	_, l := startODP(t)
	const n = 64 << 10
	src, ro := allocBuf(t, n, false), allocBuf(t, n, false)
	ms := l.reg(l.qa.f, src.Addr(), n, pinAccess)
	mo := l.reg(l.qb.f, ro.Addr(), n, odpAccess)
	if err := unix.Mprotect(ro.Bytes(), unix.PROT_READ); err != nil {
		t.Fatal(err)
	}
	wc := l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(src.Addr(), 4096, ms), ro.Addr(), mo.Rkey)
	if wc.Status != uapi.GOHFI_WC_REM_ACCESS_ERR {
		t.Fatalf("WRITE into PROT_READ memory: %+v", wc)
	}
	if err := unix.Mprotect(ro.Bytes(), unix.PROT_READ|unix.PROT_WRITE); err != nil {
		t.Fatal(err)
	}
}

// TestODPReadOnlyMR: an ODP MR that allows the device no writes (REMOTE_READ
// only) serves an RDMA READ through read-only translations (no MTTWrite in
// the entries the fault wrote), also over PROT_READ memory, which the
// driver holds with a read-only pin (docs/pinning.md, "Read-only memory").
func TestODPReadOnlyMR(t *testing.T) {
	a, l := startODP(t)
	const n = 64 << 10
	dst, buf := allocBuf(t, n, false), allocBuf(t, n, false)
	md := l.reg(l.qa.f, dst.Addr(), n, pinAccess)
	fill(buf.Bytes(), 5)
	mo := l.reg(l.qb.f, buf.Addr(), n, uapi.IB_ACCESS_REMOTE_READ|uapi.IB_ACCESS_ON_DEMAND)
	wantOK(t, "READ from a read-only ODP MR", l.op(uapi.GOHFI_WR_RDMA_READ, sg(dst.Addr(), n, md), buf.Addr(), mo.Rkey))
	if !bytes.Equal(dst.Bytes(), buf.Bytes()) {
		t.Fatal("READ from a read-only ODP MR: data differs")
	}
	if a.Sim != nil {
		e := simMPT(t, a, mo.Lkey)
		if v := simMTT(t, a, int(e.MTTFirst)); v&chip.MTTPresent == 0 || v&chip.MTTWrite != 0 {
			t.Fatalf("MTT entry of a read-only ODP MR after a READ: %#x, want present and not writable", v)
		}
	}
	if s := l.stats(l.qb.f, mo); s.PageFaults == 0 || s.PageFaultsHandled != s.PageFaults {
		t.Fatalf("read-only ODP MR: %+v", s)
	}

	ro := allocBuf(t, n, false)
	fill(ro.Bytes(), 6)
	if err := unix.Mprotect(ro.Bytes(), unix.PROT_READ); err != nil {
		t.Fatal(err)
	}
	defer unix.Mprotect(ro.Bytes(), unix.PROT_READ|unix.PROT_WRITE)
	mr := l.reg(l.qb.f, ro.Addr(), n, uapi.IB_ACCESS_REMOTE_READ|uapi.IB_ACCESS_ON_DEMAND)
	wantOK(t, "READ of PROT_READ memory", l.op(uapi.GOHFI_WR_RDMA_READ, sg(dst.Addr(), n, md), ro.Addr(), mr.Rkey))
	if !bytes.Equal(dst.Bytes(), ro.Bytes()) {
		t.Fatal("READ of PROT_READ memory through a read-only ODP MR: data differs")
	}
}

// TestODPMixedSGE: a SEND gathering from ODP and pinned SGEs alternately,
// into a receive WQE that scatters into ODP and pinned SGEs.
func TestODPMixedSGE(t *testing.T) {
	_, l := startODP(t)
	const n = 64 << 10
	var sgl, rgl []uapi.GohfiSge
	var want []byte
	var got [][]byte
	for i := range 4 {
		s, r := allocBuf(t, n, false), allocBuf(t, n, false)
		acc := uint32(odpAccess)
		if i%2 == 1 {
			acc = pinAccess
		}
		ms := l.reg(l.qa.f, s.Addr(), n, acc)
		mr := l.reg(l.qb.f, r.Addr(), n, acc^uapi.IB_ACCESS_ON_DEMAND)
		fill(s.Bytes(), byte(i))
		off := 100 * i
		sgl = append(sgl, sg(s.Addr()+uintptr(off), n-off, ms)...)
		rgl = append(rgl, sg(r.Addr(), n, mr)...)
		want = append(want, s.Bytes()[off:]...)
		got = append(got, r.Bytes())
	}
	l.recv(rgl)
	wantOK(t, "SEND", l.op(uapi.GOHFI_WR_SEND, sgl, 0, 0))
	wc := pollWC(t, l.qb.f, l.qb.cq, 1)[0]
	wantOK(t, "RECV", wc)
	if int(wc.ByteLen) != len(want) || !bytes.Equal(bytes.Join(got, nil)[:len(want)], want) {
		t.Fatalf("mixed SEND: %d bytes, data equal %v", wc.ByteLen, bytes.Equal(bytes.Join(got, nil)[:len(want)], want))
	}
}

// TestODPPrefetch: ADVISE_MR PREFETCH and PREFETCH_WRITE map the range
// (synchronously with FLAG_FLUSH, later without), PREFETCH_NO_FAULT maps
// only resident pages; the following access does not fault; the errors of
// ibv_advise_mr(3).
func TestODPPrefetch(t *testing.T) {
	requireRoot(t)
	a := openDev(t, 2)
	f := openFile(t, a)
	assign(t, f)
	const n = 1 << 20
	buf := allocBuf(t, n, false)
	mr, err := hfiuser.RegMR(f, buf.Addr(), n, uint64(buf.Addr()), odpAccess)
	if err != nil {
		t.Fatal(err)
	}
	base := uint64(buf.Addr())
	stats := func() uapi.GohfiMRStats {
		s, err := hfiuser.MRStats(f, mr.Handle)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	if err := hfiuser.AdviseMR(f, uapi.GOHFI_ADVISE_MR_ADVICE_PREFETCH_WRITE, uapi.GOHFI_ADVISE_MR_FLAG_FLUSH, mr.Lkey, base, 256<<10); err != nil {
		t.Fatal(err)
	}
	if s := stats(); s.PagesPinned < 64 || s.PagePrefetch < 64 || s.PageFaults != 0 {
		t.Fatalf("after PREFETCH_WRITE of 256 KiB: %+v", s)
	}
	// Asynchronous: the pages come, later.
	if err := hfiuser.AdviseMR(f, uapi.GOHFI_ADVISE_MR_ADVICE_PREFETCH, 0, mr.Lkey, base+512<<10, 64<<10); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "asynchronous prefetch", func() bool { return stats().PagePrefetch >= 64+16 })
	// NO_FAULT maps only what is resident: drop the second half, prefetch
	// all of it, only resident pages come.
	if err := hfiuser.DeregMR(f, mr.Handle); err != nil {
		t.Fatal(err)
	}
	if err := madvise(buf.Addr()+n/2, n/2, unix.MADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	mr, err = hfiuser.RegMR(f, buf.Addr(), n, base, odpAccess)
	if err != nil {
		t.Fatal(err)
	}
	if err := hfiuser.AdviseMR(f, uapi.GOHFI_ADVISE_MR_ADVICE_PREFETCH_NO_FAULT, uapi.GOHFI_ADVISE_MR_FLAG_FLUSH, mr.Lkey, base, n); err != nil {
		t.Fatal(err)
	}
	if s := stats(); s.PagesPinned != n/2/4096 {
		t.Fatalf("NO_FAULT over a half-resident MR mapped %d pages, want %d", s.PagesPinned, n/2/4096)
	}
	// Errors.
	ro, err := hfiuser.RegMR(f, buf.Addr(), n, base, uapi.IB_ACCESS_REMOTE_READ|uapi.IB_ACCESS_ON_DEMAND)
	if err != nil {
		t.Fatal(err)
	}
	pb := allocBuf(t, 4096, false)
	pinned, err := hfiuser.RegMR(f, pb.Addr(), 4096, uint64(pb.Addr()), pinAccess)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		what          string
		advice, flags uint32
		lkey          uint32
		addr, length  uint64
		want          unix.Errno
	}{
		{"PREFETCH_WRITE without LOCAL_WRITE", uapi.GOHFI_ADVISE_MR_ADVICE_PREFETCH_WRITE, 1, ro.Lkey, base, 4096, unix.EPERM},
		{"outside the MR", uapi.GOHFI_ADVISE_MR_ADVICE_PREFETCH, 1, mr.Lkey, base + n - 4096, 8192, unix.EFAULT},
		{"before the MR", uapi.GOHFI_ADVISE_MR_ADVICE_PREFETCH, 1, mr.Lkey, base - 4096, 4096, unix.EFAULT},
		{"not an ODP MR", uapi.GOHFI_ADVISE_MR_ADVICE_PREFETCH, 1, pinned.Lkey, uint64(pb.Addr()), 4096, unix.EINVAL},
		{"no such lkey", uapi.GOHFI_ADVISE_MR_ADVICE_PREFETCH, 1, mr.Lkey ^ 0xff00, base, 4096, unix.EFAULT},
		{"unknown flag", uapi.GOHFI_ADVISE_MR_ADVICE_PREFETCH, 2, mr.Lkey, base, 4096, unix.EINVAL},
		{"unknown advice", 7, 1, mr.Lkey, base, 4096, unix.EOPNOTSUPP},
		{"zero length", uapi.GOHFI_ADVISE_MR_ADVICE_PREFETCH, 1, mr.Lkey, base, 0, unix.EINVAL},
	} {
		wantErrno(t, c.what, hfiuser.AdviseMR(f, c.advice, c.flags, c.lkey, c.addr, c.length), c.want)
	}
	// A range that cannot be faulted in (unmapped) fails a synchronous
	// PREFETCH with EFAULT.
	if err := munmapRaw(buf.Addr(), 4096); err != nil {
		t.Fatal(err)
	}
	wantErrno(t, "PREFETCH of unmapped memory", hfiuser.AdviseMR(f, uapi.GOHFI_ADVISE_MR_ADVICE_PREFETCH, 1, mr.Lkey, base, 4096), unix.EFAULT)
}

// waitFor polls cond for up to 5 s.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for i := 0; !cond(); i++ {
		if i > 5000 {
			t.Fatalf("%s: not after 5s", what)
		}
		sleepMs(1)
	}
}

func pageFrame(t testing.TB, pm *os.File, addr uintptr) (uint64, bool) {
	var b [8]byte
	if _, err := pm.ReadAt(b[:], int64(addr/4096*8)); err != nil {
		t.Fatal(err)
	}
	v := binary.LittleEndian.Uint64(b[:])
	return v & (1<<55 - 1), v&(1<<63) != 0
}

func sleepMs(n int) { time.Sleep(time.Duration(n) * time.Millisecond) }

// TestODPAtomics: CMP_AND_SWP and FETCH_AND_ADD between ODP MRs: the
// responder's target page and the requester's result SGE are not mapped
// on the device, so each side faults; the operations complete with the
// right values, again after MADV_DONTNEED dropped both sides' pages.
func TestODPAtomics(t *testing.T) {
	requireRoot(t)
	a := openDev(t, 2)
	fa, fb := openFile(t, a), openFile(t, a)
	assign(t, fa)
	assign(t, fb)
	if attr, err := hfiuser.QueryDevice(fa); err != nil || attr.OdpRCCaps&uapi.IBV_ODP_SUPPORT_ATOMIC == 0 {
		t.Fatalf("QUERY_DEVICE: rc caps %#x, %v: want IBV_ODP_SUPPORT_ATOMIC", attr.OdpRCCaps, err)
	}
	qa, qb := newRCQP(t, fa, 16, 16, false), newRCQP(t, fb, 16, 16, false)
	for _, c := range []struct {
		q    rcQP
		dest uint32
	}{{qa, qb.qpn}, {qb, qa.qpn}} {
		for _, s := range []uint32{uapi.GOHFI_QPS_INIT, uapi.GOHFI_QPS_RTR, uapi.GOHFI_QPS_RTS} {
			if err := hfiuser.ModifyQP(c.q.f, uapi.GohfiModifyQP{Handle: c.q.qp, QPState: s, DestQPNum: c.dest, AccessFlags: uapi.IB_ACCESS_REMOTE_ATOMIC}); err != nil {
				t.Fatalf("MODIFY_QP to %d: %v", s, err)
			}
		}
	}
	const n = 64 << 10
	res, tgt := allocBuf(t, n, false), allocBuf(t, n, false)
	mres, err := hfiuser.RegMR(fa, res.Addr(), n, uint64(res.Addr()), uapi.IB_ACCESS_LOCAL_WRITE|uapi.IB_ACCESS_ON_DEMAND)
	if err != nil {
		t.Fatal(err)
	}
	mtgt, err := hfiuser.RegMR(fb, tgt.Addr(), n, uint64(tgt.Addr()), uapi.IB_ACCESS_LOCAL_WRITE|uapi.IB_ACCESS_REMOTE_ATOMIC|uapi.IB_ACCESS_ON_DEMAND)
	if err != nil {
		t.Fatal(err)
	}
	rb, tb := res.Bytes(), tgt.Bytes()
	u64 := func(b []byte, off int) uint64 { return binary.LittleEndian.Uint64(b[off:]) }
	atomic := func(op uint32, roff, loff int, cmpAdd, swap uint64) uint64 {
		t.Helper()
		w := hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: 7, Opcode: op, SendFlags: uapi.GOHFI_SEND_SIGNALED,
			RemoteAddr: uint64(tgt.Addr()) + uint64(roff), Rkey: mtgt.Rkey, CompareAdd: cmpAdd, Swap: swap},
			SGL: []uapi.GohfiSge{{Addr: uint64(res.Addr()) + uint64(loff), Length: 8, Lkey: mres.Lkey}}}
		if _, err := hfiuser.PostSend(fa, qa.qp, []hfiuser.SendWR{w}); err != nil {
			t.Fatalf("POST_SEND: %v", err)
		}
		wantOK(t, fmt.Sprintf("atomic %d", op), pollWC(t, fa, qa.cq, 1)[0])
		return u64(rb, loff)
	}
	for round := range 2 {
		// FETCH_AND_ADD faults both sides in (the fault-around window maps
		// all 64 KiB); CMP_AND_SWP, equal then not, on other pages.
		binary.LittleEndian.PutUint64(tb[8:], 100)
		if got := atomic(uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD, 8, 0, 5, 0); got != 100 || u64(tb, 8) != 105 {
			t.Fatalf("round %d: FETCH_AND_ADD returned %d, target %d; want 100, 105", round, got, u64(tb, 8))
		}
		off := 5 * 4096
		binary.LittleEndian.PutUint64(tb[off:], 7)
		if got := atomic(uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP, off, 9*4096, 7, 42); got != 7 || u64(tb, off) != 42 {
			t.Fatalf("round %d: CMP_AND_SWP (equal) returned %d, target %d; want 7, 42", round, got, u64(tb, off))
		}
		if got := atomic(uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP, off, 9*4096+8, 7, 99); got != 42 || u64(tb, off) != 42 {
			t.Fatalf("round %d: CMP_AND_SWP (not equal) returned %d, target %d; want 42, 42", round, got, u64(tb, off))
		}
		for _, b := range []uintptr{res.Addr(), tgt.Addr()} {
			if err := madvise(b, n, unix.MADV_DONTNEED); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, c := range []struct {
		f  *driver.File
		mr uapi.GohfiRegMR
	}{{fa, mres}, {fb, mtgt}} {
		s, err := hfiuser.MRStats(c.f, c.mr.Handle)
		if err != nil {
			t.Fatal(err)
		}
		if s.PageFaults < 2 || s.PageFaultsHandled != s.PageFaults || s.PageInvalidations == 0 {
			t.Fatalf("MR %#x after two rounds: %+v, want faults in both", c.mr.Lkey, s)
		}
	}
}
