package driver_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfisim"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// netDev is an embedded device with a network port on 127.0.0.1 (an
// ephemeral UDP port), a file with a PD, a CQ and a registered buffer.
type netDev struct {
	a   *attach.Attached
	f   *driver.File
	pd  *driver.PD
	cq  *driver.CQ
	buf []byte
	mr  *driver.MR
}

func openNetDev(t testing.TB) *netDev {
	t.Helper()
	cfg := hfisim.DefaultConfig()
	cfg.NumContexts = 2
	cfg.Port = netip.MustParseAddrPort("127.0.0.1:0")
	a, err := openWithConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	n := &netDev{a: a, f: openFile(t, a)}
	assign(t, n.f)
	if n.pd, err = n.f.PD(); err != nil {
		t.Fatal(err)
	}
	if n.cq, err = n.pd.CreateCQ(64, 0); err != nil {
		t.Fatal(err)
	}
	b := allocBuf(t, 1<<20, true) // memfd: the device maps it, as hfictl bench's buffers
	n.buf = unsafeSlice(b.Addr(), 1<<20)
	if n.mr, err = n.pd.RegMR(b.Addr(), 1<<20, uint64(b.Addr()),
		uapi.IB_ACCESS_LOCAL_WRITE|uapi.IB_ACCESS_REMOTE_WRITE|uapi.IB_ACCESS_REMOTE_READ); err != nil {
		t.Fatal(err)
	}
	return n
}

func (n *netDev) qp(t testing.TB) *driver.QP {
	t.Helper()
	qp, err := n.pd.CreateQP(driver.QPInitAttr{Type: uapi.GOHFI_QPT_RC, SendCQ: n.cq, RecvCQ: n.cq,
		MaxSendWR: 16, MaxRecvWR: 16, MaxSendSge: 1, MaxRecvSge: 1})
	if err != nil {
		t.Fatal(err)
	}
	if err := qp.Modify(driver.QPAttr{State: uapi.GOHFI_QPS_INIT, AccessFlags: uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ}); err != nil {
		t.Fatal(err)
	}
	return qp
}

// TestFabricAPI: the port's address, the peer table and MODIFY_QP towards
// a peer through the driver's Go API, and an RDMA WRITE and READ between
// two embedded devices over UDP on the loopback interface.
func TestFabricAPI(t *testing.T) {
	x, y := openNetDev(t), openNetDev(t)
	ax, err := x.a.Device.PortAddr()
	if err != nil || !ax.Addr().Is4() || ax.Port() == 0 {
		t.Fatalf("PortAddr %v, %v", ax, err)
	}
	ay, err := y.a.Device.PortAddr()
	if err != nil {
		t.Fatal(err)
	}
	if g := driver.GID(ax.Addr()); g[10] != 0xff || g[11] != 0xff || g[12] != 127 {
		t.Fatalf("GID %x of %v", g, ax)
	}
	wantErrno(t, "peer 0", x.a.Device.SetPeer(0, ay), unix.EINVAL)
	wantErrno(t, "peer 33", x.a.Device.SetPeer(33, ay), unix.EINVAL)
	wantErrno(t, "IPv6 peer of an IPv4 port", x.a.Device.SetPeer(1, netip.MustParseAddrPort("[::1]:4791")), unix.EINVAL)
	wantErrno(t, "port 0", x.a.Device.SetPeer(1, netip.AddrPortFrom(ay.Addr(), 0)), unix.EINVAL)
	wantErrno(t, "peer x", x.a.Device.SetPeer(1, ay), 0)
	wantErrno(t, "peer y", y.a.Device.SetPeer(1, ax), 0)
	if ps, err := x.a.Device.Peers(); err != nil || len(ps) != 1 || ps[0].Index != 1 || ps[0].Addr != ay {
		t.Fatalf("Peers %v, %v", ps, err)
	}

	qx, qy := x.qp(t), y.qp(t)
	wantErrno(t, "RTR to an empty peer entry", qx.Modify(driver.QPAttr{State: uapi.GOHFI_QPS_RTR, DestQPNum: qy.Num(), DestPort: 2}), unix.EINVAL)
	wantErrno(t, "RTR with a timeout out of range", qx.Modify(driver.QPAttr{State: uapi.GOHFI_QPS_RTR, DestQPNum: qy.Num(), DestPort: 1,
		Net: &driver.NetAttr{Timeout: 32}}), unix.EINVAL)
	attr := driver.NetAttr{Timeout: 14, RetryCnt: 7, RnrRetry: 7, MinRnrTimer: 1}
	for _, p := range []struct{ q, dest *driver.QP }{{qx, qy}, {qy, qx}} {
		access := uint32(uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ)
		if err := p.q.Modify(driver.QPAttr{State: uapi.GOHFI_QPS_RTR, DestQPNum: p.dest.Num(), DestPort: 1, RqPsn: 77, AccessFlags: access, Net: &attr}); err != nil {
			t.Fatal(err)
		}
		if err := p.q.Modify(driver.QPAttr{State: uapi.GOHFI_QPS_RTS, SqPsn: 77}); err != nil {
			t.Fatal(err)
		}
	}
	fill(x.buf[:300000], 3)
	base := uint64(uintptrOf(y.buf))
	wrs := []driver.SendWR{
		{WrID: 1, Opcode: uapi.GOHFI_WR_RDMA_WRITE, SendFlags: uapi.GOHFI_SEND_SIGNALED,
			SGL: []driver.SGE{{Addr: uint64(uintptrOf(x.buf)), Length: 300000, Lkey: x.mr.Lkey()}}, RemoteAddr: base + 17, Rkey: y.mr.Rkey()},
		{WrID: 2, Opcode: uapi.GOHFI_WR_RDMA_READ, SendFlags: uapi.GOHFI_SEND_SIGNALED,
			SGL: []driver.SGE{{Addr: uint64(uintptrOf(x.buf)) + 500000, Length: 300000, Lkey: x.mr.Lkey()}}, RemoteAddr: base + 17, Rkey: y.mr.Rkey()},
	}
	if k, err := qx.PostSend(wrs); err != nil || k != 2 {
		t.Fatalf("POST_SEND: %d, %v", k, err)
	}
	for i, wc := range pollWC(t, x.f, x.cq.Handle(), 2) {
		if wc.Status != uapi.GOHFI_WC_SUCCESS || wc.WrID != wrs[i].WrID {
			t.Fatalf("completion %d: %+v", i, wc)
		}
	}
	if !bytes.Equal(y.buf[17:17+300000], x.buf[:300000]) || !bytes.Equal(x.buf[500000:800000], x.buf[:300000]) {
		t.Fatal("data differs after WRITE and READ across devices")
	}
	cs, err := x.a.Device.NetCounters()
	if err != nil || cs[1].Name != "tx_packets" || cs[1].Value < 293 { // the WRITE alone is 293 packets
		t.Fatalf("counters %v, %v", cs, err)
	}

	// A device without a port.
	e := openVerbs(t, 2)
	if _, err := e.a.Device.PortAddr(); err == nil {
		t.Fatal("PortAddr without a port")
	}
	wantErrno(t, "SetPeer without a port", e.a.Device.SetPeer(1, ay), unix.EOPNOTSUPP)
}

// BenchmarkFabricWrite: RDMA WRITE bandwidth between two embedded devices
// over UDP on the loopback interface, 16 WRITEs in flight (the driver and
// both devices in this process).
func BenchmarkFabricWrite(b *testing.B) {
	x, y := openNetDev(b), openNetDev(b)
	ax, _ := x.a.Device.PortAddr()
	ay, _ := y.a.Device.PortAddr()
	if err := errors.Join(x.a.Device.SetPeer(1, ay), y.a.Device.SetPeer(1, ax)); err != nil {
		b.Fatal(err)
	}
	qx, qy := x.qp(b), y.qp(b)
	for _, p := range []struct{ q, dest *driver.QP }{{qx, qy}, {qy, qx}} {
		if err := errors.Join(
			p.q.Modify(driver.QPAttr{State: uapi.GOHFI_QPS_RTR, DestQPNum: p.dest.Num(), DestPort: 1, AccessFlags: uapi.IB_ACCESS_REMOTE_WRITE}),
			p.q.Modify(driver.QPAttr{State: uapi.GOHFI_QPS_RTS})); err != nil {
			b.Fatal(err)
		}
	}
	for _, size := range []int{4 << 10, 64 << 10, 1 << 20} {
		b.Run(fmt.Sprintf("%dKiB", size>>10), func(b *testing.B) {
			b.SetBytes(int64(size))
			wr := driver.SendWR{Opcode: uapi.GOHFI_WR_RDMA_WRITE, SendFlags: uapi.GOHFI_SEND_SIGNALED,
				SGL:        []driver.SGE{{Addr: uint64(uintptrOf(x.buf)), Length: uint32(size), Lkey: x.mr.Lkey()}},
				RemoteAddr: uint64(uintptrOf(y.buf)), Rkey: y.mr.Rkey()}
			const window = 16
			posted, done := 0, 0
			wc := make([]uapi.GohfiWC, window)
			for done < b.N {
				for posted < b.N && posted-done < window {
					wr.WrID = uint64(posted)
					if _, err := qx.PostSend([]driver.SendWR{wr}); err != nil {
						b.Fatal(err)
					}
					posted++
				}
				k, err := x.cq.Poll(wc)
				if err != nil {
					b.Fatal(err)
				}
				for _, w := range wc[:k] {
					if w.Status != uapi.GOHFI_WC_SUCCESS {
						b.Fatalf("completion %+v", w)
					}
				}
				done += k
				if k == 0 { // sleep in Poll (it arms the CQ) rather than take a core from the engines
					ctx, cancel := context.WithTimeout(context.Background(), time.Second)
					_, err := x.f.Poll(ctx)
					cancel()
					if err != nil && !errors.Is(err, context.DeadlineExceeded) {
						b.Fatal(err)
					}
				}
			}
		})
	}
	cs, err := x.a.Device.NetCounters()
	if err != nil {
		b.Fatal(err)
	}
	b.Logf("requester: %s %d, %s %d", cs[chip.NetCntRetrans].Name, cs[chip.NetCntRetrans].Value, cs[chip.NetCntTimeouts].Name, cs[chip.NetCntTimeouts].Value)
}
