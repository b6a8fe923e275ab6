package driver_test

import (
	"testing"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// TestFabricModifyQPNetIoctl: the MODIFY_QP ioctl sets a network QP's
// transport attributes (GOHFI_MODIFY_QP_NET), as the device's QPNetAttr
// register and the retry count of a QP whose peer never answers show;
// values outside the IB ranges, unknown flags and attributes outside RTR
// are EINVAL.
func TestFabricModifyQPNetIoctl(t *testing.T) {
	x, y := openNetDev(t), openNetDev(t)
	ay, err := y.a.Device.PortAddr()
	if err != nil {
		t.Fatal(err)
	}
	wantErrno(t, "peer y", x.a.Device.SetPeer(1, ay), 0)
	cq := x.cq.Handle()
	newQP := func() uapi.GohfiCreateQP {
		t.Helper()
		r, err := hfiuser.CreateQP(x.f, uapi.GohfiCreateQP{QPType: uapi.GOHFI_QPT_RC, SendCQ: cq, RecvCQ: cq,
			MaxSendWR: 4, MaxRecvWR: 4, MaxSendSge: 1, MaxRecvSge: 1})
		if err != nil {
			t.Fatalf("CREATE_QP: %v", err)
		}
		wantErrno(t, "INIT with transport attributes", hfiuser.ModifyQP(x.f, uapi.GohfiModifyQP{Handle: r.Handle,
			QPState: uapi.GOHFI_QPS_INIT, Flags: uapi.GOHFI_MODIFY_QP_NET, Timeout: 8}), unix.EINVAL)
		wantErrno(t, "INIT", hfiuser.ModifyQP(x.f, uapi.GohfiModifyQP{Handle: r.Handle, QPState: uapi.GOHFI_QPS_INIT,
			AccessFlags: uapi.IB_ACCESS_REMOTE_WRITE}), 0)
		return r
	}
	attrReg := func(qpn uint32) uint64 {
		t.Helper()
		v, err := x.a.Device.CSR(chip.QPNetReg(int(qpn-chip.QPNBase), chip.QPNetAttr))
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	// No QP 9999 on y: y drops every packet, as a cut link would.
	rtr := func(q uapi.GohfiCreateQP) uapi.GohfiModifyQP {
		return uapi.GohfiModifyQP{Handle: q.Handle, QPState: uapi.GOHFI_QPS_RTR, DestQPNum: 9999, DestPort: 1}
	}

	q := newQP()
	for _, c := range []struct {
		what string
		m    func(*uapi.GohfiModifyQP)
	}{
		{"timeout 32", func(m *uapi.GohfiModifyQP) { m.Timeout = 32 }},
		{"retry_cnt 8", func(m *uapi.GohfiModifyQP) { m.RetryCnt = 8 }},
		{"rnr_retry 8", func(m *uapi.GohfiModifyQP) { m.RnrRetry = 8 }},
		{"min_rnr_timer 32", func(m *uapi.GohfiModifyQP) { m.MinRnrTimer = 32 }},
		{"unknown flag", func(m *uapi.GohfiModifyQP) { m.Flags |= 2 }},
		{"attributes without the flag", func(m *uapi.GohfiModifyQP) { m.Flags, m.RetryCnt = 0, 3 }},
	} {
		m := rtr(q)
		m.Flags = uapi.GOHFI_MODIFY_QP_NET
		c.m(&m)
		wantErrno(t, c.what, hfiuser.ModifyQP(x.f, m), unix.EINVAL)
	}
	if st := attrReg(q.QPNum); st != chip.QPNetAttrValue(14, 7, 7, 12) {
		t.Fatalf("QPNetAttr %#x after refused modifies, want the reset value", st)
	}
	// Without the flag: the defaults.
	wantErrno(t, "RTR without attributes", hfiuser.ModifyQP(x.f, rtr(q)), 0)
	if v, want := attrReg(q.QPNum), chip.QPNetAttrValue(14, 7, 7, 12); v != want {
		t.Fatalf("QPNetAttr %#x, want the defaults %#x", v, want)
	}
	wantErrno(t, "RTS with attributes", hfiuser.ModifyQP(x.f, uapi.GohfiModifyQP{Handle: q.Handle, QPState: uapi.GOHFI_QPS_RTS,
		Flags: uapi.GOHFI_MODIFY_QP_NET, RetryCnt: 1}), unix.EINVAL)
	wantErrno(t, "DESTROY_QP", hfiuser.DestroyQP(x.f, q.Handle), 0)

	// A WRITE to a peer that never answers: retry_cnt retransmissions, then
	// RETRY_EXC_ERR. 0 is a value (no retransmission), not "the default".
	for _, retry := range []uint8{0, 1, 7} {
		q := newQP()
		m := rtr(q)
		m.Flags, m.Timeout, m.RetryCnt, m.RnrRetry, m.MinRnrTimer = uapi.GOHFI_MODIFY_QP_NET, 8, retry, 3, 31
		wantErrno(t, "RTR with attributes", hfiuser.ModifyQP(x.f, m), 0)
		if v, want := attrReg(q.QPNum), chip.QPNetAttrValue(8, retry, 3, 31); v != want {
			t.Fatalf("retry_cnt %d: QPNetAttr %#x, want %#x", retry, v, want)
		}
		wantErrno(t, "RTS", hfiuser.ModifyQP(x.f, uapi.GohfiModifyQP{Handle: q.Handle, QPState: uapi.GOHFI_QPS_RTS}), 0)
		wr := hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: uint64(retry), Opcode: uapi.GOHFI_WR_RDMA_WRITE,
			SendFlags: uapi.GOHFI_SEND_SIGNALED, RemoteAddr: 4096, Rkey: 1},
			SGL: []uapi.GohfiSge{{Addr: uint64(uintptrOf(x.buf)), Length: 64, Lkey: x.mr.Lkey()}}}
		if k, err := hfiuser.PostSend(x.f, q.Handle, []hfiuser.SendWR{wr}); err != nil || k != 1 {
			t.Fatalf("POST_SEND: %d, %v", k, err)
		}
		wc := pollWC(t, x.f, cq, 1)[0]
		if wc.Status != uapi.GOHFI_WC_RETRY_EXC_ERR || wc.WrID != uint64(retry) {
			t.Fatalf("retry_cnt %d: completion %+v, want RETRY_EXC_ERR", retry, wc)
		}
		n, err := x.a.Device.CSR(chip.QPNetReg(int(q.QPNum-chip.QPNBase), chip.QPNetRetrans))
		if err != nil || n != uint64(retry) {
			t.Fatalf("retry_cnt %d: %d retransmissions, %v", retry, n, err)
		}
		wantErrno(t, "DESTROY_QP", hfiuser.DestroyQP(x.f, q.Handle), 0)
	}
}
