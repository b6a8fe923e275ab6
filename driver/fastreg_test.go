package driver_test

import (
	"bytes"
	"errors"
	"testing"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// Fast-registration tests through the user ABI (ALLOC_MR, POST_SEND's
// fr_* fields) and the in-module API. They open their device with openDev,
// so the QEMU guest harness can run them by name on a real VFIO device.

const (
	frAll  = uapi.IB_ACCESS_LOCAL_WRITE | uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ
	frIOVA = 0x1234_5000_0000
	sig    = uapi.GOHFI_SEND_SIGNALED
)

// frLoop is a loop whose B side has a fast-reg MR over its registered
// buffer's pages.
type frLoop struct {
	*loop
	mr uapi.GohfiAllocMR
}

func newFRLoop(t *testing.T, maxNumSg uint32) *frLoop {
	t.Helper()
	requireRoot(t)
	e := &verbsEnv{a: openDev(t, 2)}
	l := &frLoop{loop: newLoop(t, e, frAll)}
	var err error
	if l.mr, err = hfiuser.AllocMR(l.b.f, maxNumSg); err != nil {
		t.Fatalf("ALLOC_MR: %v", err)
	}
	if l.mr.Lkey&0xff != 0 || l.mr.Lkey != l.mr.Rkey {
		t.Fatalf("ALLOC_MR keys %#x/%#x, want variant 0", l.mr.Lkey, l.mr.Rkey)
	}
	return l
}

// pageB is the address of page k of B's buffer.
func (l *frLoop) pageB(k int) uint64 { return uint64(uintptrOf(l.bufB)) + uint64(k)*4096 }

func (l *frLoop) key(variant uint32) uint32 { return l.mr.Lkey&^0xff | variant&0xff }

// post posts wrs on q and fails t unless all are posted.
func post(t testing.TB, q rcQP, wrs ...hfiuser.SendWR) {
	t.Helper()
	if bad, err := hfiuser.PostSend(q.f, q.qp, wrs); err != nil || bad != len(wrs) {
		t.Fatalf("POST_SEND: bad_wr %d of %d: %v", bad, len(wrs), err)
	}
}

// bind binds B's fast-reg MR to pages of B's buffer (in that order) at
// frIOVA+off under variant and waits for the REG_MR completion.
func (l *frLoop) bind(t testing.TB, variant uint32, off uint64, pages ...int) uint32 {
	t.Helper()
	va := make([]uint64, len(pages))
	for i, k := range pages {
		va[i] = l.pageB(k)
	}
	key := l.key(variant)
	post(t, l.b, hfiuser.FastRegWR(1, sig, l.mr.Handle, key, frAll, va, 12, frIOVA+off, uint64(len(pages))*4096-off))
	wantWC(t, "REG_MR", pollWC(t, l.b.f, l.b.cq, 1)[0], uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_REG_MR, 0)
	return key
}

func writeWR(id uint64, raddr uint64, rkey uint32, sgl []uapi.GohfiSge) hfiuser.SendWR {
	return hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: id, Opcode: uapi.GOHFI_WR_RDMA_WRITE, SendFlags: sig,
		RemoteAddr: raddr, Rkey: rkey}, SGL: sgl}
}

// wantRefused expects a completion with status and vendor_err on q's CQ.
func wantRefused(t testing.TB, what string, q rcQP, status, vendor uint32) {
	t.Helper()
	wc := pollWC(t, q.f, q.cq, 1)[0]
	if wc.Status != status || wc.VendorErr != vendor {
		t.Fatalf("%s: completion %+v, want status %d vendor_err %d", what, wc, status, vendor)
	}
}

// TestFastRegPageListOrder: pages bound out of order land in page-list
// order, and an unaligned WRITE across every page boundary of the binding
// (from a first byte offset) reaches the right bytes; READ reads them back.
func TestFastRegPageListOrder(t *testing.T) {
	l := newFRLoop(t, 8)
	order := []int{5, 2, 7, 0}
	const off = 0x321
	key := l.bind(t, 0x11, off, order...)
	clear(l.bufB)
	fill(l.bufA, 4)
	const start, n = off + 4000, 3*4096 - off - 4000 + 700
	post(t, l.a, writeWR(2, frIOVA+start, key, l.sgeA(0, n)))
	wantWC(t, "WRITE", pollWC(t, l.a.f, l.a.cq, 1)[0], uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, n)
	got := make([]byte, 0, n)
	for b := uint64(start); b < start+n; {
		pg, in := b/4096, b%4096
		k := min(start+n-b, 4096-in)
		base := order[pg] * 4096
		got = append(got, l.bufB[base+int(in):base+int(in+k)]...)
		b += k
	}
	if !bytes.Equal(got, l.bufA[:n]) {
		t.Fatal("WRITE through the fast-reg key: bytes not in page-list order")
	}
	clear(l.bufA[:n])
	post(t, l.a, hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: 3, Opcode: uapi.GOHFI_WR_RDMA_READ, SendFlags: sig,
		RemoteAddr: frIOVA + start, Rkey: key}, SGL: l.sgeA(0, n)})
	wantWC(t, "READ", pollWC(t, l.a.f, l.a.cq, 1)[0], uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_READ, n)
	if !bytes.Equal(got, l.bufA[:n]) {
		t.Fatal("READ through the fast-reg key differs")
	}
}

// TestFastRegInvalidateRebind: after LOCAL_INV the key is refused
// (REM_ACCESS_ERR, state); a rebind with a new variant works and the old
// variant is refused (REM_ACCESS_ERR, key).
func TestFastRegInvalidateRebind(t *testing.T) {
	// Each part opens its own device and closes it at its end: behind
	// kernel VFIO a device is opened by one at a time.
	t.Run("rebind", func(t *testing.T) {
		l := newFRLoop(t, 4)
		k1 := l.bind(t, 1, 0, 0)
		post(t, l.b, hfiuser.LocalInvWR(4, sig, k1))
		wantWC(t, "LOCAL_INV", pollWC(t, l.b.f, l.b.cq, 1)[0], uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_LOCAL_INV, 0)
		k2 := l.bind(t, 2, 0, 1)
		fill(l.bufA, 8)
		post(t, l.a, writeWR(5, frIOVA, k2, l.sgeA(0, 4096)))
		wantWC(t, "WRITE new variant", pollWC(t, l.a.f, l.a.cq, 1)[0], uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
		if !bytes.Equal(l.bufB[4096:8192], l.bufA[:4096]) {
			t.Fatal("rebind: data not in the new page")
		}
		post(t, l.a, writeWR(6, frIOVA, k1, l.sgeA(0, 16)))
		wantRefused(t, "old variant", l.a, uapi.GOHFI_WC_REM_ACCESS_ERR, chip.VendorErrKey)
	})
	// LOCAL_INV, then the current key is refused.
	t.Run("invalidated", func(t *testing.T) {
		l := newFRLoop(t, 4)
		k := l.bind(t, 9, 0, 0)
		post(t, l.b, hfiuser.LocalInvWR(4, sig, k))
		wantWC(t, "LOCAL_INV", pollWC(t, l.b.f, l.b.cq, 1)[0], uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_LOCAL_INV, 0)
		post(t, l.a, writeWR(6, frIOVA, k, l.sgeA(0, 16)))
		wantRefused(t, "after LOCAL_INV", l.a, uapi.GOHFI_WC_REM_ACCESS_ERR, chip.VendorErrState)
	})
}

// TestFastRegDeviceRefusals: REG_MR of a VALID MR, LOCAL_INV of an
// ordinary MR and a new key naming another MR complete with
// LOC_QP_OP_ERR and the check's vendor_err.
func TestFastRegDeviceRefusals(t *testing.T) {
	for _, c := range []struct {
		name   string
		wr     func(l *frLoop) hfiuser.SendWR
		vendor uint32
	}{
		{"REG_MR on a VALID MR", func(l *frLoop) hfiuser.SendWR {
			l.bind(t, 1, 0, 0)
			return hfiuser.FastRegWR(9, sig, l.mr.Handle, l.key(2), frAll, []uint64{l.pageB(1)}, 12, frIOVA, 4096)
		}, chip.VendorErrState},
		{"LOCAL_INV of an ordinary MR", func(l *frLoop) hfiuser.SendWR {
			return hfiuser.LocalInvWR(9, sig, l.mrB.Rkey)
		}, chip.VendorErrMRType},
		{"LOCAL_INV of a stale variant", func(l *frLoop) hfiuser.SendWR {
			return hfiuser.LocalInvWR(9, sig, l.bind(t, 3, 0, 0)^0x40)
		}, chip.VendorErrKey},
		{"key naming another MR", func(l *frLoop) hfiuser.SendWR {
			return hfiuser.FastRegWR(9, sig, l.mr.Handle, l.mrB.Rkey, frAll, []uint64{l.pageB(1)}, 12, frIOVA, 4096)
		}, chip.VendorErrKey},
	} {
		t.Run(c.name, func(t *testing.T) {
			l := newFRLoop(t, 4)
			post(t, l.b, c.wr(l))
			wantRefused(t, c.name, l.b, uapi.GOHFI_WC_LOC_QP_OP_ERR, c.vendor)
		})
	}
}

// TestFastRegBadPageLists: the driver refuses, at POST_SEND with EINVAL
// and bad_wr at the REG_MR, a page list longer than max_num_sg, a page
// outside the file's MRs, a page of another file's MR, an unaligned page,
// a writable binding of a read-only MR, a length past the pages and an MR
// handle of another file; the WR before it is posted.
func TestFastRegBadPageLists(t *testing.T) {
	l := newFRLoop(t, 2)
	other := allocBuf(t, 8192, false)
	ro := allocBuf(t, 8192, false)
	roMR, err := hfiuser.RegMR(l.b.f, ro.Addr(), 8192, uint64(ro.Addr()), 0)
	if err != nil {
		t.Fatal(err)
	}
	foreign, err := hfiuser.AllocMR(l.a.f, 2)
	if err != nil {
		t.Fatal(err)
	}
	odp := allocBuf(t, 8192, false)
	if _, err := hfiuser.RegMR(l.b.f, odp.Addr(), 8192, uint64(odp.Addr()), uapi.IB_ACCESS_ON_DEMAND|uapi.IB_ACCESS_LOCAL_WRITE); err != nil {
		t.Fatal(err)
	}
	reg := func(pages []uint64, access uint32, length uint64) hfiuser.SendWR {
		return hfiuser.FastRegWR(2, sig, l.mr.Handle, l.key(1), access, pages, 12, frIOVA, length)
	}
	for _, c := range []struct {
		name string
		wr   hfiuser.SendWR
		want unix.Errno
	}{
		{"too long", reg([]uint64{l.pageB(0), l.pageB(1), l.pageB(2)}, frAll, 4096), unix.EINVAL},
		{"page outside the file's MRs", reg([]uint64{uint64(other.Addr())}, frAll, 4096), unix.EINVAL},
		{"page of another file's MR", reg([]uint64{uint64(uintptrOf(l.bufA))}, frAll, 4096), unix.EINVAL},
		{"unaligned page", reg([]uint64{l.pageB(0) + 8}, frAll, 4096), unix.EINVAL},
		{"writable binding of a read-only MR", reg([]uint64{uint64(ro.Addr())}, frAll, 4096), unix.EINVAL},
		{"page of an ODP MR (its pages come and go)", reg([]uint64{uint64(odp.Addr())}, frAll, 4096), unix.EINVAL},
		{"length past the pages", reg([]uint64{l.pageB(0)}, frAll, 4097), unix.EINVAL},
		{"another file's MR handle", func() hfiuser.SendWR {
			w := reg([]uint64{l.pageB(0)}, frAll, 4096)
			w.FrMRHandle = foreign.Handle
			return w
		}(), unix.EINVAL},
		{"unreadable page list", func() hfiuser.SendWR {
			w := reg(nil, frAll, 4096)
			w.FrPageList, w.FrPageListLen = 8, 1
			return w
		}(), unix.EFAULT},
	} {
		t.Run(c.name, func(t *testing.T) {
			zero := hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{Opcode: uapi.GOHFI_WR_RDMA_WRITE}, SGL: []uapi.GohfiSge{}}
			bad, err := hfiuser.PostSend(l.b.f, l.b.qp, []hfiuser.SendWR{zero, c.wr})
			wantErrno(t, c.name, err, c.want)
			if bad != 1 {
				t.Errorf("bad_wr %d, want 1", bad)
			}
		})
	}
	// A read-only binding of the read-only MR is fine.
	post(t, l.b, hfiuser.FastRegWR(3, sig, l.mr.Handle, l.key(5), uapi.IB_ACCESS_REMOTE_READ, []uint64{uint64(ro.Addr())}, 12, frIOVA, 4096))
	wantWC(t, "read-only REG_MR", pollWC(t, l.b.f, l.b.cq, 1)[0], uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_REG_MR, 0)
	wantErrno(t, "DEREG_MR of the read-only MR under a valid binding", hfiuser.DeregMR(l.b.f, roMR.Handle), unix.EBUSY)
}

// TestFastRegSendWithInv: SEND_WITH_INV from A invalidates B's fast-reg MR
// after the data is placed; B's receive completion says so. A stale key is
// REM_INV_REQ_ERR.
func TestFastRegSendWithInv(t *testing.T) {
	t.Run("invalidates", func(t *testing.T) {
		l := newFRLoop(t, 4)
		key := l.bind(t, 7, 0, 3)
		fill(l.bufA, 2)
		if _, err := hfiuser.PostRecv(l.b.f, l.b.qp, []hfiuser.RecvWR{{GohfiRecvWR: uapi.GohfiRecvWR{WrID: 20}, SGL: l.sgeB(0, 5000)}}); err != nil {
			t.Fatal(err)
		}
		post(t, l.a, hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: 21, Opcode: uapi.GOHFI_WR_SEND_WITH_INV, SendFlags: sig, InvalidateRkey: key}, SGL: l.sgeA(0, 5000)})
		wantWC(t, "SEND_WITH_INV", pollWC(t, l.a.f, l.a.cq, 1)[0], uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_SEND, 0)
		rwc := pollWC(t, l.b.f, l.b.cq, 1)[0]
		wantWC(t, "RECV", rwc, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RECV, 5000)
		if rwc.WcFlags != uapi.GOHFI_WC_WITH_INVALIDATE || rwc.InvalidatedRkey != key {
			t.Fatalf("receive completion %+v, want WITH_INVALIDATE of %#x", rwc, key)
		}
		if !bytes.Equal(l.bufB[:5000], l.bufA[:5000]) {
			t.Fatal("SEND_WITH_INV: data differs")
		}
		// The MR is free: DEREG_MR succeeds, and so does the pinned MR's.
		if err := hfiuser.DeregMR(l.b.f, l.mr.Handle); err != nil {
			t.Fatalf("DEREG_MR after a remote invalidation: %v", err)
		}
	})
	t.Run("stale key", func(t *testing.T) {
		l := newFRLoop(t, 4)
		key := l.bind(t, 7, 0, 3)
		if _, err := hfiuser.PostRecv(l.b.f, l.b.qp, []hfiuser.RecvWR{{GohfiRecvWR: uapi.GohfiRecvWR{WrID: 20}, SGL: l.sgeB(0, 64)}}); err != nil {
			t.Fatal(err)
		}
		post(t, l.a, hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: 21, Opcode: uapi.GOHFI_WR_SEND_WITH_INV, SendFlags: sig, InvalidateRkey: key + 1}, SGL: l.sgeA(0, 64)})
		wantRefused(t, "SEND_WITH_INV of a stale key", l.a, uapi.GOHFI_WC_REM_INV_REQ_ERR, chip.VendorErrKey)
		wantRefused(t, "its receive", l.b, uapi.GOHFI_WC_REM_INV_REQ_ERR, chip.VendorErrKey)
	})
}

// TestFastRegReadWithInv: RDMA_READ_WITH_INV reads into A's fast-reg MR
// and invalidates it once the data is placed.
func TestFastRegReadWithInv(t *testing.T) {
	l := newFRLoop(t, 4)
	mrA, err := hfiuser.AllocMR(l.a.f, 4)
	if err != nil {
		t.Fatal(err)
	}
	pages := []uint64{uint64(uintptrOf(l.bufA)) + 8192, uint64(uintptrOf(l.bufA))}
	key := mrA.Lkey | 0x33
	post(t, l.a, hfiuser.FastRegWR(1, sig, mrA.Handle, key, uapi.IB_ACCESS_LOCAL_WRITE, pages, 12, frIOVA, 8192))
	wantWC(t, "REG_MR", pollWC(t, l.a.f, l.a.cq, 1)[0], uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_REG_MR, 0)
	fill(l.bufB, 5)
	clear(l.bufA[:12288])
	post(t, l.a, hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: 2, Opcode: uapi.GOHFI_WR_RDMA_READ_WITH_INV, SendFlags: sig,
		RemoteAddr: uint64(uintptrOf(l.bufB)), Rkey: l.mrB.Rkey, InvalidateRkey: key},
		SGL: []uapi.GohfiSge{{Addr: frIOVA, Length: 8192, Lkey: key}}})
	wantWC(t, "READ_WITH_INV", pollWC(t, l.a.f, l.a.cq, 1)[0], uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_READ, 0)
	if !bytes.Equal(l.bufA[8192:12288], l.bufB[:4096]) || !bytes.Equal(l.bufA[:4096], l.bufB[4096:8192]) {
		t.Fatal("READ_WITH_INV: data not in page-list order")
	}
	if err := hfiuser.DeregMR(l.a.f, mrA.Handle); err != nil {
		t.Fatalf("DEREG_MR after READ_WITH_INV: %v", err)
	}
}

// TestFastRegDeregBusy: DEREG_MR is EBUSY for a VALID fast-reg MR and for
// the pinned MR whose pages it is bound to; after LOCAL_INV both go.
func TestFastRegDeregBusy(t *testing.T) {
	l := newFRLoop(t, 4)
	key := l.bind(t, 1, 0, 0, 1)
	wantErrno(t, "DEREG_MR of a VALID MR", hfiuser.DeregMR(l.b.f, l.mr.Handle), unix.EBUSY)
	wantErrno(t, "DEREG_MR of the pinned MR under it", hfiuser.DeregMR(l.b.f, l.mrB.Handle), unix.EBUSY)
	// MR_STATS of a fast-reg MR: it pins nothing of its own, even bound.
	if st, err := hfiuser.MRStats(l.b.f, l.mr.Handle); err != nil || st != (uapi.GohfiMRStats{Handle: l.mr.Handle}) {
		t.Fatalf("MR_STATS of a bound fast-reg MR: %+v, %v", st, err)
	}
	if _, err := hfiuser.MRStats(l.a.f, l.mr.Handle); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("MR_STATS of another file's fast-reg MR: %v", err)
	}
	post(t, l.b, hfiuser.LocalInvWR(2, 0, key)) // unsignaled: the driver learns it from the device-written head
	post(t, l.b, hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: 3, Opcode: uapi.GOHFI_WR_RDMA_WRITE, SendFlags: sig}, SGL: []uapi.GohfiSge{}})
	pollWC(t, l.b.f, l.b.cq, 1)
	wantErrno(t, "DEREG_MR of the pinned MR", hfiuser.DeregMR(l.b.f, l.mrB.Handle), 0)
	wantErrno(t, "DEREG_MR after LOCAL_INV", hfiuser.DeregMR(l.b.f, l.mr.Handle), 0)
	wantErrno(t, "DEREG_MR twice", hfiuser.DeregMR(l.b.f, l.mr.Handle), unix.EINVAL)
}

// TestFastRegPipelined: REG_MR, a SEND out of the just-bound MR and a
// fenced LOCAL_INV in one post complete in order; the data is the bound
// pages'; the counters count the bind and the invalidation.
func TestFastRegPipelined(t *testing.T) {
	l := newFRLoop(t, 4)
	before, err := hfiuser.DriverStats(l.b.f)
	if err != nil {
		t.Fatal(err)
	}
	fill(l.bufB, 9)
	clear(l.bufA)
	key := l.key(0x42)
	if _, err := hfiuser.PostRecv(l.a.f, l.a.qp, []hfiuser.RecvWR{{SGL: l.sgeA(0, 8192)}}); err != nil {
		t.Fatal(err)
	}
	post(t, l.b,
		hfiuser.FastRegWR(1, sig, l.mr.Handle, key, frAll, []uint64{l.pageB(6), l.pageB(4)}, 12, frIOVA, 8192),
		hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: 2, Opcode: uapi.GOHFI_WR_SEND, SendFlags: sig},
			SGL: []uapi.GohfiSge{{Addr: frIOVA, Length: 8192, Lkey: key}}},
		hfiuser.LocalInvWR(3, sig|uapi.GOHFI_SEND_FENCE, key))
	wc := pollWC(t, l.b.f, l.b.cq, 3)
	for i, want := range []uint32{uapi.GOHFI_WC_REG_MR, uapi.GOHFI_WC_SEND, uapi.GOHFI_WC_LOCAL_INV} {
		if wc[i].WrID != uint64(i+1) || wc[i].Status != uapi.GOHFI_WC_SUCCESS || wc[i].Opcode != want {
			t.Fatalf("completion %d: %+v, want wr_id %d opcode %#x", i, wc[i], i+1, want)
		}
	}
	if !bytes.Equal(l.bufA[:4096], l.bufB[6*4096:7*4096]) || !bytes.Equal(l.bufA[4096:8192], l.bufB[4*4096:5*4096]) {
		t.Fatal("SEND out of the bound MR: data differs")
	}
	after, err := hfiuser.DriverStats(l.b.f)
	if err != nil {
		t.Fatal(err)
	}
	if after.FastRegs-before.FastRegs != 1 || after.LocalInvs-before.LocalInvs != 1 {
		t.Fatalf("fast_regs +%d, local_invs +%d, want +1 each", after.FastRegs-before.FastRegs, after.LocalInvs-before.LocalInvs)
	}
	wantErrno(t, "DEREG_MR", hfiuser.DeregMR(l.b.f, l.mr.Handle), 0)
}

// TestFastRegPageListsReused: two bindings of one MR outstanding behind a
// SEND stalled on RNR (REG_MR, LOCAL_INV, REG_MR in one post) get two page
// lists: the second binding is the one that holds. In the in-module API a
// page list in use by a REG_MR the device has not consumed cannot be
// mapped again (EBUSY) until it is.
func TestFastRegPageListsReused(t *testing.T) {
	l := newFRLoop(t, 4)
	k1, k2 := l.key(1), l.key(2)
	// Neither side has a receive posted: each one's SEND stalls (RNR), and
	// B's bindings wait behind B's.
	post(t, l.a, hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: 1, Opcode: uapi.GOHFI_WR_SEND, SendFlags: sig}, SGL: l.sgeA(0, 8)})
	post(t, l.b, hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: 10, Opcode: uapi.GOHFI_WR_SEND, SendFlags: sig}, SGL: l.sgeB(0, 8)},
		hfiuser.FastRegWR(11, sig, l.mr.Handle, k1, frAll, []uint64{l.pageB(1)}, 12, frIOVA, 4096),
		hfiuser.LocalInvWR(12, sig, k1),
		hfiuser.FastRegWR(13, sig, l.mr.Handle, k2, frAll, []uint64{l.pageB(2)}, 12, frIOVA, 4096))
	// Release both stalls.
	for _, q := range []struct {
		q   rcQP
		sge []uapi.GohfiSge
	}{{l.a, l.sgeA(100, 8)}, {l.b, l.sgeB(100, 8)}} {
		if _, err := hfiuser.PostRecv(q.q.f, q.q.qp, []hfiuser.RecvWR{{SGL: q.sge}}); err != nil {
			t.Fatal(err)
		}
	}
	wc := pollWC(t, l.b.f, l.b.cq, 5) // B: its RECV and its four send completions
	n := 0
	for _, c := range wc {
		if c.Status != uapi.GOHFI_WC_SUCCESS {
			t.Fatalf("completion %+v", c)
		}
		if c.Opcode != uapi.GOHFI_WC_RECV {
			if c.WrID != uint64(10+n) {
				t.Fatalf("send completion %d: %+v", n, c)
			}
			n++
		}
	}
	fill(l.bufA, 3)
	post(t, l.a, writeWR(2, frIOVA, k2, l.sgeA(0, 4096)))
	for _, c := range pollWC(t, l.a.f, l.a.cq, 3) {
		if c.Status != uapi.GOHFI_WC_SUCCESS {
			t.Fatalf("A completion %+v", c)
		}
	}
	if !bytes.Equal(l.bufB[2*4096:3*4096], l.bufA[:4096]) {
		t.Fatal("the second binding does not hold: page lists shared")
	}

	// In-module: a busy page list cannot be mapped again.
	pd, err := l.b.f.PD()
	if err != nil {
		t.Fatal(err)
	}
	testInModuleBusyList(t, pd)
}

// testInModuleBusyList runs a REG_MR behind an RNR-stalled SEND on a QP
// of pd to itself and maps its page list while it waits and after.
func testInModuleBusyList(t *testing.T, pd *driver.PD) {
	cq, err := pd.CreateCQ(16, 0)
	if err != nil {
		t.Fatal(err)
	}
	qp, err := pd.CreateQP(driver.QPInitAttr{Type: uapi.GOHFI_QPT_RC, SendCQ: cq, RecvCQ: cq, MaxSendWR: 8, MaxRecvWR: 8, MaxSendSge: 1, MaxRecvSge: 1})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []uint32{uapi.GOHFI_QPS_INIT, uapi.GOHFI_QPS_RTR, uapi.GOHFI_QPS_RTS} {
		if err := qp.Modify(driver.QPAttr{State: s, DestQPNum: qp.Num(), AccessFlags: uapi.IB_ACCESS_REMOTE_WRITE}); err != nil {
			t.Fatal(err)
		}
	}
	buf := allocBuf(t, 16384, false)
	mr, err := pd.RegMR(buf.Addr(), 16384, uint64(buf.Addr()), uapi.IB_ACCESS_LOCAL_WRITE|uapi.IB_ACCESS_REMOTE_WRITE)
	if err != nil {
		t.Fatal(err)
	}
	m, err := pd.AllocMR(4)
	if err != nil {
		t.Fatal(err)
	}
	pl, err := pd.AllocPageList(4)
	if err != nil {
		t.Fatal(err)
	}
	segs, err := mr.DMASegs(buf.Addr()+4096, 8192)
	if err != nil {
		t.Fatal(err)
	}
	if n, err := pl.MapSG(segs, 100, 12); err != nil || n != len(segs) || pl.Length() != 8192-100 || pl.IOVA() != segs[0].Addr+100 {
		t.Fatalf("MapSG: %d of %d, %v; iova %#x length %d", n, len(segs), err, pl.IOVA(), pl.Length())
	}
	key := driver.IncRkey(m.Rkey())
	if _, err := qp.PostSend([]driver.SendWR{
		{WrID: 1, Opcode: uapi.GOHFI_WR_SEND, SendFlags: sig, SGL: []driver.SGE{{Addr: uint64(buf.Addr()), Length: 8, Lkey: mr.Lkey()}}},
		{WrID: 2, Opcode: uapi.GOHFI_WR_REG_MR, SendFlags: sig, Reg: &driver.RegWR{MR: m, PageList: pl, Key: key, Access: uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_LOCAL_WRITE}},
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := pl.MapSG(segs, 0, 12); !errorIs(err, unix.EBUSY) {
		t.Fatalf("MapSG of a page list in use: %v, want EBUSY", err)
	}
	wantErrno(t, "Free of a page list in use", pl.Free(), unix.EBUSY)
	if _, err := qp.PostRecv([]driver.RecvWR{{WrID: 3, SGL: []driver.SGE{{Addr: uint64(buf.Addr()) + 12288, Length: 8, Lkey: mr.Lkey()}}}}); err != nil {
		t.Fatal(err)
	}
	wc := make([]uapi.GohfiWC, 4)
	for got := 0; got < 3; {
		n, err := cq.Poll(wc[got:])
		if err != nil {
			t.Fatal(err)
		}
		got += n
	}
	if !m.Valid() || m.Rkey() != key {
		t.Fatalf("in-module REG_MR: valid %v, rkey %#x want %#x", m.Valid(), m.Rkey(), key)
	}
	if _, err := pl.MapSG(segs, 0, 12); err != nil {
		t.Fatalf("MapSG after the REG_MR completed: %v", err)
	}
	wantErrno(t, "Free", pl.Free(), 0)
	wantErrno(t, "Dereg of a VALID MR", m.Dereg(), unix.EBUSY)
	if _, err := qp.PostSend([]driver.SendWR{{WrID: 4, Opcode: uapi.GOHFI_WR_LOCAL_INV, SendFlags: sig, InvalidateRkey: key}}); err != nil {
		t.Fatal(err)
	}
	for n := 0; n == 0; {
		if n, err = cq.Poll(wc); err != nil {
			t.Fatal(err)
		}
		if n > 0 && (wc[0].Opcode != uapi.GOHFI_WC_LOCAL_INV || wc[0].Status != 0) {
			t.Fatalf("LOCAL_INV: %+v", wc[0])
		}
	}
	wantErrno(t, "Dereg", m.Dereg(), 0)
}

func errorIs(err error, e unix.Errno) bool { return errors.Is(err, e) }

// TestAllocMRErrno: ALLOC_MR's refusals.
func TestAllocMRErrno(t *testing.T) {
	requireRoot(t)
	e := &verbsEnv{a: openDev(t, 1)}
	f := verbsFile(t, e)
	attr, err := hfiuser.QueryDevice(f)
	if err != nil {
		t.Fatal(err)
	}
	if attr.DeviceCapFlags&uapi.IB_DEVICE_MEM_MGT_EXTENSIONS == 0 || attr.MaxFastRegPageListLen == 0 {
		t.Fatalf("QUERY_DEVICE: no fast registration: %+v", attr)
	}
	for _, c := range []struct {
		name string
		r    uapi.GohfiAllocMR
		want unix.Errno
	}{
		{"max_num_sg 0", uapi.GohfiAllocMR{MaxNumSg: 0}, unix.EINVAL},
		{"max_num_sg above the limit", uapi.GohfiAllocMR{MaxNumSg: attr.MaxFastRegPageListLen + 1}, unix.EINVAL},
		{"mr_type 1", uapi.GohfiAllocMR{MRType: 1, MaxNumSg: 1}, unix.EINVAL},
		{"reserved", uapi.GohfiAllocMR{MaxNumSg: 1, Reserved: 1}, unix.EINVAL},
		{"the limit", uapi.GohfiAllocMR{MaxNumSg: attr.MaxFastRegPageListLen}, 0},
	} {
		r := c.r
		wantErrno(t, c.name, ioctl(f, uapi.GOHFI_IOCTL_ALLOC_MR, &r), c.want)
	}
}
