package fabric_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/mem"
	"github.com/gohfi/gohfi/uapi"
)

// verbs are what a user of the device opens: a file (with its context),
// a PD, a CQ, a QP and a registered region.
type verbs struct {
	f   *driver.File
	pd  *driver.PD
	cq  *driver.CQ
	qp  *driver.QP
	buf *mem.Buffer
	mr  *driver.MR
}

// ep is one end of a connection: verbs of its own on a node's device and
// a region of five areas, so that connections of one device run at once
// without sharing a CQ or memory.
type ep struct {
	nd *node
	verbs
	sz int // the size of each area
}

// The areas of an ep's region, each of the ep's area size: what it WRITEs
// and SENDs from, where the peer WRITEs to, what the peer READs, where its READs
// land, where the peer's SENDs land.
const (
	areaSrc = iota
	areaWrite
	areaReadSrc
	areaReadDst
	areaRecv
	numAreas

	epAccess  = uapi.IB_ACCESS_LOCAL_WRITE | uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ | uapi.IB_ACCESS_REMOTE_ATOMIC
	qpRemote  = uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ | uapi.IB_ACCESS_REMOTE_ATOMIC
	roundWait = 60 * time.Second
)

// newEP opens a file on nd's device with a context, a PD, a CQ and a
// registered region for messages of up to maxMsg bytes; connectEPs gives
// it its QP. The region is memfd: the device process maps it (vfio-user
// DMA regions with an fd), as hfictl bench's buffers, instead of asking
// the driver's process for every access.
func newEP(t *testing.T, nd *node, maxMsg int) *ep {
	t.Helper()
	e := openEP(t, nd, numAreas*(maxMsg+4096), mem.AllocMemfd)
	e.sz = maxMsg + 4096
	return e
}

// openEP opens a file on nd's device with a context, a PD, a CQ and a
// region of size bytes from alloc, registered with epAccess.
func openEP(t *testing.T, nd *node, size int, alloc func(int) (*mem.Buffer, error)) *ep {
	t.Helper()
	e := &ep{nd: nd}
	var err error
	if e.f, err = nd.a.Device.Open(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.f.Close() }) // the module's exit closes it too; its error says nothing new
	if err := hfiuser.AssignCtxt(e.f); err != nil {
		t.Fatal(err)
	}
	if e.pd, err = e.f.PD(); err != nil {
		t.Fatal(err)
	}
	if e.cq, err = e.pd.CreateCQ(1024, 0); err != nil {
		t.Fatal(err)
	}
	if e.buf, err = alloc(size); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.buf.Close() }) // nothing to report: the test is over
	if e.mr, err = e.pd.RegMR(e.buf.Addr(), uint64(size), uint64(e.buf.Addr()), epAccess); err != nil {
		t.Fatal(err)
	}
	return e
}

// connectEPs creates a QP for x and for y and connects them: through
// entry px of x's peer table (set to y's device) and py of y's, or, when
// both are on one device, as loopback QPs (dest_port 0).
func connectEPs(t *testing.T, x, y *ep, px, py int, attr driver.NetAttr) {
	t.Helper()
	loop := x.nd == y.nd
	if !loop {
		for _, p := range []struct {
			e, peer *ep
			i       int
		}{{x, y, px}, {y, x, py}} {
			if err := p.e.nd.a.Device.SetPeer(p.i, p.peer.nd.addr); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, e := range []*ep{x, y} {
		qp, err := e.pd.CreateQP(driver.QPInitAttr{Type: uapi.GOHFI_QPT_RC, SendCQ: e.cq, RecvCQ: e.cq,
			MaxSendWR: 256, MaxRecvWR: 256, MaxSendSge: 1, MaxRecvSge: 1})
		if err != nil {
			t.Fatal(err)
		}
		e.qp = qp
	}
	for _, p := range []struct {
		e, peer *ep
		i       int
	}{{x, y, px}, {y, x, py}} {
		rtr := driver.QPAttr{State: uapi.GOHFI_QPS_RTR, DestQPNum: p.peer.qp.Num(), RqPsn: 0xffff00, AccessFlags: qpRemote}
		if !loop {
			rtr.DestPort, rtr.Net = uint32(p.i), &attr
		}
		for _, a := range []driver.QPAttr{{State: uapi.GOHFI_QPS_INIT, AccessFlags: qpRemote}, rtr,
			{State: uapi.GOHFI_QPS_RTS, SqPsn: 0xffff00}} {
			if err := p.e.qp.Modify(a); err != nil {
				t.Fatalf("%s: modify QP to %d: %v", p.e.nd.ns.name, a.State, err)
			}
		}
	}
}

func (e *ep) area(i int) []byte { return e.buf.Bytes()[i*e.sz : (i+1)*e.sz] }

func (e *ep) addr(i, off int) uint64 { return uint64(e.buf.Addr()) + uint64(i*e.sz+off) }

func (e *ep) sge(i, off, n int) []driver.SGE {
	return []driver.SGE{{Addr: e.addr(i, off), Length: uint32(n), Lkey: e.mr.Lkey()}}
}

func (e *ep) String() string { return fmt.Sprintf("%s/QP%d", e.nd.ns.name, e.qp.Num()) }

// post posts wrs on e's QP.
func (e *ep) post(wrs ...driver.SendWR) error {
	if k, err := e.qp.PostSend(wrs); err != nil || k != len(wrs) {
		return fmt.Errorf("%v: POST_SEND: %d of %d, %v", e, k, len(wrs), err)
	}
	return nil
}

// wait takes n completions from e's CQ, sleeping in the file's poll
// between looks, or fails after d.
func (e *ep) wait(n int, d time.Duration) ([]uapi.GohfiWC, error) {
	got := make([]uapi.GohfiWC, 0, n)
	buf := make([]uapi.GohfiWC, 64)
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	for len(got) < n {
		k, err := e.cq.Poll(buf[:min(len(buf), n-len(got))])
		if err != nil {
			return got, fmt.Errorf("%v: poll CQ: %w", e, err)
		}
		got = append(got, buf[:k]...)
		if k > 0 {
			continue
		}
		if ctx.Err() != nil {
			return got, fmt.Errorf("%v: %d of %d completions after %v: %+v", e, len(got), n, d, got)
		}
		_, err = e.f.Poll(ctx)
		if err != nil && !errors.Is(err, context.DeadlineExceeded) {
			return got, fmt.Errorf("%v: poll: %w", e, err)
		}
	}
	return got, nil
}

// Work request ids of a round.
const (
	idWrite = 1 + iota
	idRead
	idSend
	idRecv
)

// round runs an RDMA WRITE, a READ and a SEND with immediate of n bytes
// from x to y and from y to x at once, and checks every completion and
// byte.
func round(x, y *ep, n int, seed byte) error {
	if m := min(x.sz, y.sz) - 4096; n > m {
		return fmt.Errorf("round of %d bytes: at most %d", n, m)
	}
	pairs := [2][2]*ep{{x, y}, {y, x}}
	for k, p := range pairs {
		e := p[0]
		fill(e.area(areaSrc)[:n+7], seed^byte(k)<<7)
		fill(e.area(areaReadSrc)[:n], seed^0x5a^byte(k)<<7)
		clear(e.area(areaWrite)[:n+16])
		clear(e.area(areaReadDst)[:n+16])
		clear(e.area(areaRecv)[:n+16])
		if k, err := e.qp.PostRecv([]driver.RecvWR{{WrID: idRecv, SGL: e.sge(areaRecv, 0, e.sz)}}); err != nil || k != 1 {
			return fmt.Errorf("%v: POST_RECV: %d, %v", e, k, err)
		}
	}
	imm := uint32(seed)<<24 | uint32(n)
	for _, p := range pairs {
		e, o := p[0], p[1]
		if err := e.post(
			driver.SendWR{WrID: idWrite, Opcode: uapi.GOHFI_WR_RDMA_WRITE, SendFlags: uapi.GOHFI_SEND_SIGNALED,
				SGL: e.sge(areaSrc, 0, n), RemoteAddr: o.addr(areaWrite, 5), Rkey: o.mr.Rkey()},
			driver.SendWR{WrID: idRead, Opcode: uapi.GOHFI_WR_RDMA_READ, SendFlags: uapi.GOHFI_SEND_SIGNALED,
				SGL: e.sge(areaReadDst, 1, n), RemoteAddr: o.addr(areaReadSrc, 0), Rkey: o.mr.Rkey()},
			driver.SendWR{WrID: idSend, Opcode: uapi.GOHFI_WR_SEND_WITH_IMM, SendFlags: uapi.GOHFI_SEND_SIGNALED,
				SGL: e.sge(areaSrc, 7, n), ImmData: imm},
		); err != nil {
			return err
		}
	}
	for _, p := range pairs {
		e, o := p[0], p[1]
		wcs, err := e.wait(4, roundWait)
		if err != nil {
			return err
		}
		var sends []uint64
		for _, wc := range wcs {
			if wc.Status != uapi.GOHFI_WC_SUCCESS {
				return fmt.Errorf("%v: completion %+v for a round of %d bytes", e, wc, n)
			}
			if wc.WrID != idRecv {
				sends = append(sends, wc.WrID)
				continue
			}
			if wc.Opcode != uapi.GOHFI_WC_RECV || int(wc.ByteLen) != n || wc.ImmData != imm || wc.SrcQP != o.qp.Num() {
				return fmt.Errorf("%v: receive completion %+v for a SEND of %d bytes from %v", e, wc, n, o)
			}
		}
		if len(sends) != 3 || sends[0] != idWrite || sends[1] != idRead || sends[2] != idSend {
			return fmt.Errorf("%v: send completions %v, want WRITE, READ, SEND in order", e, sends)
		}
	}
	for _, p := range pairs {
		e, o := p[0], p[1]
		switch {
		case !bytes.Equal(o.area(areaWrite)[5:5+n], e.area(areaSrc)[:n]):
			return fmt.Errorf("%v->%v WRITE of %d bytes: data differs", e, o, n)
		case !bytes.Equal(e.area(areaReadDst)[1:1+n], o.area(areaReadSrc)[:n]):
			return fmt.Errorf("%v<-%v READ of %d bytes: data differs", e, o, n)
		case !bytes.Equal(o.area(areaRecv)[:n], e.area(areaSrc)[7:7+n]):
			return fmt.Errorf("%v->%v SEND of %d bytes: data differs", e, o, n)
		}
	}
	return nil
}

// roundSizes are the message sizes of the multi-node rounds.
var roundSizes = []int{1, 1024, 4097, 65536 + 3, 1 << 20}

// rounds runs round for each size on each connection, the connections at
// once, and returns their errors.
func rounds(conns [][2]*ep, sizes []int, seed byte) error {
	errs := make([]error, len(conns))
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j, n := range sizes {
				if err := round(c[0], c[1], n, seed+byte(i*16+j)); err != nil {
					errs[i] = err
					return
				}
			}
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// TestFabricThreeNodes: three hfisim processes, each in its own namespace
// with a veth pair to a bridge in a fourth; a connection between every two
// (A-B, B-C, A-C), all three running RDMA WRITE, READ and SEND in both
// directions at once, the data checked.
func TestFabricThreeNodes(t *testing.T) {
	names := bridged(t, 3)
	nodes := make([]*node, len(names))
	for i, n := range names {
		nodes[i] = attachNode(t, n)
	}
	attr := driver.NetAttr{Timeout: 12, RetryCnt: 7, RnrRetry: 7, MinRnrTimer: 1}
	var conns [][2]*ep
	for _, p := range [][2]int{{0, 1}, {1, 2}, {0, 2}} {
		x, y := newEP(t, nodes[p[0]], 1<<20), newEP(t, nodes[p[1]], 1<<20)
		// Peer table entry k+1 of every device is node k.
		connectEPs(t, x, y, p[1]+1, p[0]+1, attr)
		conns = append(conns, [2]*ep{x, y})
	}
	for i, nd := range nodes {
		peers, err := nd.a.Device.Peers()
		if err != nil || len(peers) != 2 {
			t.Fatalf("peers of %s: %v, %v", nd.ns.name, peers, err)
		}
		for _, p := range peers {
			if p.Index < 1 || p.Index > 3 || p.Index == i+1 || p.Addr != nodes[p.Index-1].addr {
				t.Fatalf("peers of %s: %+v", nd.ns.name, peers)
			}
		}
	}
	start := time.Now()
	if err := rounds(conns, roundSizes, 1); err != nil {
		t.Fatal(err)
	}
	t.Logf("three connections at once, WRITE/READ/SEND both ways, 1 B to 1 MiB: %v", time.Since(start).Round(time.Millisecond))
	for _, nd := range nodes {
		c := counters(t, nd)
		if c["drop_peer"] != 0 || c["drop_qp"] != 0 || c["drop_icrc"] != 0 || c["drop_header"] != 0 {
			t.Errorf("%s: drops on clean links: %v", nd.ns.name, c)
		}
		t.Logf("%s: %d packets sent (%d again), %d received", nd.ns.name, c["tx_packets"], c["retransmits"], c["rx_packets"])
	}
}
