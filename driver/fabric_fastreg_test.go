package driver_test

import (
	"bytes"
	"testing"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/uapi"
)

// fabricPair is two devices on 127.0.0.1, each the other's peer 1, with a
// QP on each connected to the other's (remote write and read granted).
func fabricPair(t *testing.T) (a, b *netDev, qa, qb *driver.QP) {
	t.Helper()
	return fabricPairNet(t, nil)
}

// fabricPairNet is fabricPair with the QPs' transport attributes (nil:
// driver.DefaultNetAttr).
func fabricPairNet(t *testing.T, net *driver.NetAttr) (a, b *netDev, qa, qb *driver.QP) {
	t.Helper()
	a, b = openNetDev(t), openNetDev(t)
	aa, err := a.a.Device.PortAddr()
	if err != nil {
		t.Fatal(err)
	}
	ab, err := b.a.Device.PortAddr()
	if err != nil {
		t.Fatal(err)
	}
	wantErrno(t, "peer b", a.a.Device.SetPeer(1, ab), 0)
	wantErrno(t, "peer a", b.a.Device.SetPeer(1, aa), 0)
	qa, qb = a.qp(t), b.qp(t)
	for _, p := range []struct{ q, dest *driver.QP }{{qa, qb}, {qb, qa}} {
		if err := p.q.Modify(driver.QPAttr{State: uapi.GOHFI_QPS_RTR, DestQPNum: p.dest.Num(), DestPort: 1,
			AccessFlags: uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ, Net: net}); err != nil {
			t.Fatal(err)
		}
		if err := p.q.Modify(driver.QPAttr{State: uapi.GOHFI_QPS_RTS}); err != nil {
			t.Fatal(err)
		}
	}
	return a, b, qa, qb
}

// TestFabricFastReg: fast registration across devices. A binds a fast-reg
// MR to pages of its buffer out of order (FAST_REG_MR through its send
// queue); B writes and reads through A's rkey over the wire; B's
// SEND_WITH_INV invalidates A's MR (A's receive completion says so); a
// later WRITE with the old rkey is NAKed remote access error, which B sees
// as REM_ACCESS_ERR, and leaves A's memory alone.
func TestFabricFastReg(t *testing.T) {
	a, b, qa, qb := fabricPair(t)
	acq, bcq := a.cq.Handle(), b.cq.Handle()
	postOn := func(n *netDev, q *driver.QP, wrs ...hfiuser.SendWR) {
		t.Helper()
		if k, err := hfiuser.PostSend(n.f, q.Handle(), wrs); err != nil || k != len(wrs) {
			t.Fatalf("POST_SEND: %d of %d, %v", k, len(wrs), err)
		}
	}

	// A binds pages 5, 2, 9 of its buffer, in that order, at frIOVA.
	fr, err := hfiuser.AllocMR(a.f, 4)
	if err != nil {
		t.Fatalf("ALLOC_MR: %v", err)
	}
	page := func(k int) uint64 { return uint64(uintptrOf(a.buf)) + uint64(k)*4096 }
	pages := []int{5, 2, 9}
	key := fr.Rkey&^0xff | 0x3c
	clear(a.buf)
	postOn(a, qa, hfiuser.FastRegWR(1, sig, fr.Handle, key, frAll, []uint64{page(5), page(2), page(9)}, 12, frIOVA, 3*4096))
	wantWC(t, "FAST_REG_MR", pollWC(t, a.f, acq, 1)[0], uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_REG_MR, 0)

	// B writes 10000 bytes at offset 100 of the binding: across both page
	// boundaries, 11 packets.
	const off, n = 100, 10000
	src := b.buf[:n]
	fill(src, 9)
	postOn(b, qb, writeWR(2, frIOVA+off, key, []uapi.GohfiSge{{Addr: uint64(uintptrOf(src)), Length: n, Lkey: b.mr.Lkey()}}))
	wantWC(t, "WRITE through the fast-reg rkey", pollWC(t, b.f, bcq, 1)[0], uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
	var got []byte // the binding's bytes, in page-list order
	for _, k := range pages {
		got = append(got, a.buf[k*4096:(k+1)*4096]...)
	}
	if !bytes.Equal(got[off:off+n], src) || bytes.Count(got[:off], []byte{0}) != off || bytes.Count(got[off+n:], []byte{0}) != len(got)-off-n {
		t.Fatal("WRITE across devices: A's pages do not hold the data in page-list order")
	}
	// B reads it back into another part of its buffer.
	dst := b.buf[200000 : 200000+n]
	postOn(b, qb, hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: 3, Opcode: uapi.GOHFI_WR_RDMA_READ, SendFlags: sig,
		RemoteAddr: frIOVA + off, Rkey: key}, SGL: []uapi.GohfiSge{{Addr: uint64(uintptrOf(dst)), Length: n, Lkey: b.mr.Lkey()}}})
	wantWC(t, "READ through the fast-reg rkey", pollWC(t, b.f, bcq, 1)[0], uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_READ, 0)
	if !bytes.Equal(dst, src) {
		t.Fatal("READ across devices: data differs")
	}

	// B's SEND_WITH_INV invalidates A's MR.
	recv := a.buf[300000 : 300000+256]
	if k, err := hfiuser.PostRecv(a.f, qa.Handle(), []hfiuser.RecvWR{{GohfiRecvWR: uapi.GohfiRecvWR{WrID: 4},
		SGL: []uapi.GohfiSge{{Addr: uint64(uintptrOf(recv)), Length: 256, Lkey: a.mr.Lkey()}}}}); err != nil || k != 1 {
		t.Fatalf("POST_RECV: %d, %v", k, err)
	}
	postOn(b, qb, hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: 5, Opcode: uapi.GOHFI_WR_SEND_WITH_INV, SendFlags: sig, InvalidateRkey: key},
		SGL: []uapi.GohfiSge{{Addr: uint64(uintptrOf(src)), Length: 200, Lkey: b.mr.Lkey()}}})
	wantWC(t, "SEND_WITH_INV", pollWC(t, b.f, bcq, 1)[0], uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_SEND, 0)
	rwc := pollWC(t, a.f, acq, 1)[0]
	wantWC(t, "its receive", rwc, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RECV, 200)
	if rwc.WcFlags&uapi.GOHFI_WC_WITH_INVALIDATE == 0 || rwc.InvalidatedRkey != key || rwc.WrID != 4 {
		t.Fatalf("receive completion %+v, want WITH_INVALIDATE of %#x", rwc, key)
	}
	if !bytes.Equal(recv[:200], src[:200]) {
		t.Fatal("SEND_WITH_INV: data differs")
	}

	// The old rkey is refused by A: a NAK over the wire, REM_ACCESS_ERR at B.
	cs0, err := a.a.Device.NetCounters()
	if err != nil {
		t.Fatal(err)
	}
	before := bytes.Clone(got)
	fill(src, 77)
	postOn(b, qb, writeWR(6, frIOVA+off, key, []uapi.GohfiSge{{Addr: uint64(uintptrOf(src)), Length: 64, Lkey: b.mr.Lkey()}}))
	wc := pollWC(t, b.f, bcq, 1)[0]
	if wc.Status != uapi.GOHFI_WC_REM_ACCESS_ERR || wc.WrID != 6 {
		t.Fatalf("WRITE with the invalidated rkey: completion %+v, want REM_ACCESS_ERR", wc)
	}
	cs1, err := a.a.Device.NetCounters()
	if err != nil {
		t.Fatal(err)
	}
	if d := cs1[chip.NetCntErrNAKs].Value - cs0[chip.NetCntErrNAKs].Value; d != 1 {
		t.Errorf("A sent %d error NAKs for the stale rkey, want 1", d)
	}
	got = got[:0]
	for _, k := range pages {
		got = append(got, a.buf[k*4096:(k+1)*4096]...)
	}
	if !bytes.Equal(got, before) {
		t.Fatal("a WRITE with the invalidated rkey changed A's pages")
	}
	// Invalidated, the MR can go.
	if err := hfiuser.DeregMR(a.f, fr.Handle); err != nil {
		t.Fatalf("DEREG_MR after the remote invalidation: %v", err)
	}
}

// TestFabricFastRegStaleInv: a SEND_WITH_INV across devices naming a key
// that is not A's MR's current one is NAKed invalid request: B's send and
// A's receive complete with REM_INV_REQ_ERR, and A's MR stays bound.
func TestFabricFastRegStaleInv(t *testing.T) {
	a, b, qa, qb := fabricPair(t)
	fr, err := hfiuser.AllocMR(a.f, 1)
	if err != nil {
		t.Fatalf("ALLOC_MR: %v", err)
	}
	key := fr.Rkey&^0xff | 0x11
	if k, err := hfiuser.PostSend(a.f, qa.Handle(), []hfiuser.SendWR{hfiuser.FastRegWR(1, sig, fr.Handle, key, frAll,
		[]uint64{uint64(uintptrOf(a.buf)) + 4096}, 12, frIOVA, 4096)}); err != nil || k != 1 {
		t.Fatalf("POST_SEND: %d, %v", k, err)
	}
	wantWC(t, "FAST_REG_MR", pollWC(t, a.f, a.cq.Handle(), 1)[0], uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_REG_MR, 0)
	if k, err := hfiuser.PostRecv(a.f, qa.Handle(), []hfiuser.RecvWR{{GohfiRecvWR: uapi.GohfiRecvWR{WrID: 4},
		SGL: []uapi.GohfiSge{{Addr: uint64(uintptrOf(a.buf)) + 300000, Length: 256, Lkey: a.mr.Lkey()}}}}); err != nil || k != 1 {
		t.Fatalf("POST_RECV: %d, %v", k, err)
	}
	if k, err := hfiuser.PostSend(b.f, qb.Handle(), []hfiuser.SendWR{{GohfiSendWR: uapi.GohfiSendWR{WrID: 5,
		Opcode: uapi.GOHFI_WR_SEND_WITH_INV, SendFlags: sig, InvalidateRkey: key + 1},
		SGL: []uapi.GohfiSge{{Addr: uint64(uintptrOf(b.buf)), Length: 64, Lkey: b.mr.Lkey()}}}}); err != nil || k != 1 {
		t.Fatalf("POST_SEND: %d, %v", k, err)
	}
	if wc := pollWC(t, b.f, b.cq.Handle(), 1)[0]; wc.Status != uapi.GOHFI_WC_REM_INV_REQ_ERR || wc.WrID != 5 {
		t.Fatalf("SEND_WITH_INV of a stale key: completion %+v, want REM_INV_REQ_ERR", wc)
	}
	if wc := pollWC(t, a.f, a.cq.Handle(), 1)[0]; wc.Status != uapi.GOHFI_WC_REM_INV_REQ_ERR || wc.WrID != 4 {
		t.Fatalf("its receive: completion %+v, want REM_INV_REQ_ERR", wc)
	}
	m, err := a.pd.FastRegMR(fr.Handle)
	if err != nil {
		t.Fatal(err)
	}
	if !m.Valid() {
		t.Fatal("a SEND_WITH_INV of another key invalidated the MR")
	}
}
