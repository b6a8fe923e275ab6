// Package fabric_test runs hfisim devices on a real network: two hfisim
// processes, each in its own network namespace with a port on a veth
// pair, the driver attached to each over vfio-user, and RC traffic
// between them (docs/fabric.md).
package fabric_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/dma"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/ibwire"
	"github.com/gohfi/gohfi/mem"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

var (
	binOnce         sync.Once
	binDir, binPath string
	binErr          error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		_ = os.RemoveAll(binDir) // a temporary directory: nothing to report
	}
	os.Exit(code)
}

// node is one device with the driver attached, and a QP, a CQ and a
// region of its own (newNode).
type node struct {
	ns   ns
	a    *attach.Attached
	addr netip.AddrPort
	verbs
}

const bufSize = 4 << 20

// attachNode starts hfisim in n and attaches the driver to it.
func attachNode(t *testing.T, n ns) *node {
	t.Helper()
	sock := startHfisim(t, n)
	// The socket file is there from bind on, the listener from listen:
	// a dial in between is refused.
	var a *attach.Attached
	var err error
	// The pins of several nodes' regions pass the default RLIMIT_MEMLOCK
	// (8 MiB), which root in a container may not raise: the kernel lets a
	// holder of CAP_IPC_LOCK pin past it, so does the driver when asked.
	opts := attach.DefaultOptions()
	opts.Params.HonorCapIPCLock, _ = dma.HasCapability(unix.CAP_IPC_LOCK) // an error: not honoured, as without the capability
	for try := 0; ; try++ {
		a, err = attach.Open(context.Background(), "vfio-user:"+sock, opts)
		if err == nil || !errors.Is(err, syscall.ECONNREFUSED) || try == 200 {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := a.Close(); err != nil {
			t.Errorf("close %s: %v", n.name, err)
		}
	})
	nd := &node{ns: n, a: a}
	if !a.Device.HardwareHasCap(chip.CapNet) {
		t.Fatalf("%s: the device has no network port", n.name)
	}
	if nd.addr, err = a.Device.PortAddr(); err != nil {
		t.Fatal(err)
	}
	if nd.addr != netip.AddrPortFrom(n.addr, ibwire.UDPPort) {
		t.Fatalf("port address %v, want %v:%d", nd.addr, n.addr, ibwire.UDPPort)
	}
	return nd
}

func newNode(t *testing.T, n ns) *node {
	t.Helper()
	nd := attachNode(t, n)
	e := openEP(t, nd, bufSize, mem.Alloc)
	nd.verbs = e.verbs
	return nd
}

// connect creates a QP on each node and connects them through peer table
// entry 1 of each, with the given transport attributes.
func connect(t *testing.T, x, y *node, attr driver.NetAttr) {
	t.Helper()
	for _, p := range [][2]*node{{x, y}, {y, x}} {
		if err := p[0].a.Device.SetPeer(1, p[1].addr); err != nil {
			t.Fatal(err)
		}
		qp, err := p[0].pd.CreateQP(driver.QPInitAttr{Type: uapi.GOHFI_QPT_RC, SendCQ: p[0].cq, RecvCQ: p[0].cq,
			MaxSendWR: 256, MaxRecvWR: 256, MaxSendSge: 1, MaxRecvSge: 1})
		if err != nil {
			t.Fatal(err)
		}
		p[0].qp = qp
	}
	access := uint32(uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ | uapi.IB_ACCESS_REMOTE_ATOMIC)
	for _, p := range [][2]*node{{x, y}, {y, x}} {
		q := p[0].qp
		for _, a := range []driver.QPAttr{
			{State: uapi.GOHFI_QPS_INIT, AccessFlags: access},
			{State: uapi.GOHFI_QPS_RTR, DestQPNum: p[1].qp.Num(), DestPort: 1, RqPsn: 0xfff000, AccessFlags: access, Net: &attr},
			{State: uapi.GOHFI_QPS_RTS, SqPsn: 0xfff000},
		} {
			if err := q.Modify(a); err != nil {
				t.Fatalf("%s: modify QP to %d: %v", p[0].ns.name, a.State, err)
			}
		}
	}
}

func (nd *node) bytes() []byte { return nd.buf.Bytes()[:bufSize] }

func (nd *node) sge(off, n int) []driver.SGE {
	return []driver.SGE{{Addr: uint64(nd.buf.Addr()) + uint64(off), Length: uint32(n), Lkey: nd.mr.Lkey()}}
}

// wait takes n completions from the node's CQ, failing after 20 s.
func (nd *node) wait(t *testing.T, n int) []uapi.GohfiWC {
	t.Helper()
	var got []uapi.GohfiWC
	buf := make([]uapi.GohfiWC, 64)
	deadline := time.Now().Add(20 * time.Second)
	for len(got) < n {
		k, err := nd.cq.Poll(buf[:min(len(buf), n-len(got))])
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, buf[:k]...)
		if k > 0 {
			continue
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d of %d completions after 20 s: %+v", nd.ns.name, len(got), n, got)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		_, _ = nd.f.Poll(ctx) // a wake-up only: the CQ is read again either way
		cancel()
	}
	return got
}

func fill(b []byte, seed byte) {
	for i := range b {
		b[i] = byte(i*13) ^ seed
	}
}

// trafficSizes are the message sizes of traffic; trafficBytes what it
// moves each way (WRITE, READ and SEND of each size).
var trafficSizes = []int{1, 1000, 1024, 4097, 65536 + 3, 1 << 20}

var trafficBytes = func() (n int) {
	for _, s := range trafficSizes {
		n += 3 * s
	}
	return n
}()

// traffic moves RDMA WRITEs, READs and SENDs of sizes from one byte to
// 1 MiB, and a FETCH_ADD after each, from x to y and back, and checks every
// byte and completion.
func traffic(t *testing.T, x, y *node, seed byte) {
	t.Helper()
	sizes := trafficSizes
	for _, p := range [][2]*node{{x, y}, {y, x}} {
		src, dst := p[0], p[1]
		for i, n := range sizes {
			s := seed + byte(i)
			// WRITE src -> dst.
			fill(src.bytes()[:n+7], s)
			clear(dst.bytes()[1<<21 : 1<<21+n+16])
			wr := driver.SendWR{WrID: 1, Opcode: uapi.GOHFI_WR_RDMA_WRITE, SendFlags: uapi.GOHFI_SEND_SIGNALED,
				SGL: src.sge(7, n), RemoteAddr: uint64(dst.buf.Addr()) + 1<<21 + 5, Rkey: dst.mr.Rkey()}
			post(t, src, wr)
			want(t, src, "WRITE", src.wait(t, 1)[0], uapi.GOHFI_WC_RDMA_WRITE)
			if !bytes.Equal(dst.bytes()[1<<21+5:1<<21+5+n], src.bytes()[7:7+n]) {
				t.Fatalf("%s->%s WRITE of %d bytes: data differs", src.ns.name, dst.ns.name, n)
			}
			// READ from dst into src.
			fill(dst.bytes()[3<<20:3<<20+n], s^0x5a)
			wr = driver.SendWR{WrID: 2, Opcode: uapi.GOHFI_WR_RDMA_READ, SendFlags: uapi.GOHFI_SEND_SIGNALED,
				SGL: src.sge(1<<20+1, n), RemoteAddr: uint64(dst.buf.Addr()) + 3<<20, Rkey: dst.mr.Rkey()}
			post(t, src, wr)
			want(t, src, "READ", src.wait(t, 1)[0], uapi.GOHFI_WC_RDMA_READ)
			if !bytes.Equal(src.bytes()[1<<20+1:1<<20+1+n], dst.bytes()[3<<20:3<<20+n]) {
				t.Fatalf("%s<-%s READ of %d bytes: data differs", src.ns.name, dst.ns.name, n)
			}
			// SEND with immediate src -> dst.
			fill(src.bytes()[:n], s^0xa5)
			if k, err := dst.qp.PostRecv([]driver.RecvWR{{WrID: 3, SGL: dst.sge(0, bufSize/4)}}); err != nil || k != 1 {
				t.Fatalf("POST_RECV: %d, %v", k, err)
			}
			wr = driver.SendWR{WrID: 4, Opcode: uapi.GOHFI_WR_SEND_WITH_IMM, SendFlags: uapi.GOHFI_SEND_SIGNALED,
				SGL: src.sge(0, n), ImmData: 0x11223344}
			post(t, src, wr)
			want(t, src, "SEND", src.wait(t, 1)[0], uapi.GOHFI_WC_SEND)
			wc := dst.wait(t, 1)[0]
			want(t, dst, "RECV", wc, uapi.GOHFI_WC_RECV)
			if int(wc.ByteLen) != n || wc.ImmData != 0x11223344 || wc.SrcQP != src.qp.Num() {
				t.Fatalf("receive completion %+v for a SEND of %d bytes", wc, n)
			}
			if !bytes.Equal(dst.bytes()[:n], src.bytes()[:n]) {
				t.Fatalf("%s->%s SEND of %d bytes: data differs", src.ns.name, dst.ns.name, n)
			}
			// FETCH_ADD src -> dst: applied once, the old value returned.
			word := dst.bytes()[2<<20+4096 : 2<<20+4104]
			old := binary.LittleEndian.Uint64(word)
			wr = driver.SendWR{WrID: 5, Opcode: uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD, SendFlags: uapi.GOHFI_SEND_SIGNALED,
				SGL: src.sge(2<<20, 8), RemoteAddr: uint64(dst.buf.Addr()) + 2<<20 + 4096, Rkey: dst.mr.Rkey(), CompareAdd: uint64(n)}
			post(t, src, wr)
			want(t, src, "FETCH_ADD", src.wait(t, 1)[0], uapi.GOHFI_WC_FETCH_ADD)
			if got := binary.LittleEndian.Uint64(src.bytes()[2<<20:]); got != old || binary.LittleEndian.Uint64(word) != old+uint64(n) {
				t.Fatalf("FETCH_ADD %d returned %#x (held %#x), the word is now %#x", n, got, old, binary.LittleEndian.Uint64(word))
			}
		}
	}
}

func post(t *testing.T, nd *node, wr driver.SendWR) {
	t.Helper()
	if k, err := nd.qp.PostSend([]driver.SendWR{wr}); err != nil || k != 1 {
		t.Fatalf("%s: POST_SEND: %d, %v", nd.ns.name, k, err)
	}
}

func want(t *testing.T, nd *node, what string, wc uapi.GohfiWC, opcode uint32) {
	t.Helper()
	if wc.Status != uapi.GOHFI_WC_SUCCESS || wc.Opcode != opcode {
		t.Fatalf("%s: %s completion %+v, want success", nd.ns.name, what, wc)
	}
}

func counters(t *testing.T, nd *node) map[string]uint64 {
	t.Helper()
	cs, err := nd.a.Device.NetCounters()
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]uint64{}
	for _, c := range cs {
		m[c.Name] = c.Value
	}
	return m
}

// TestFabricNetns: two hfisim processes in their own namespaces on a veth
// pair; RDMA WRITE, READ and SEND both ways with the data checked; a
// capture on the veth checked (tshark_test.go); then over a lossy link (loss, duplication, reordering: lossy_test.go) the
// data still arrives intact and the retransmissions are counted; then a
// cut link ends a WRITE with RETRY_EXC_ERR, and nothing hangs.
func TestFabricNetns(t *testing.T) {
	a, b := twoNamespaces(t)
	x, y := newNode(t, a), newNode(t, b)
	// 4.096 us * 2^12 = 16.8 ms before a retransmission, 7 retries.
	connect(t, x, y, driver.NetAttr{Timeout: 12, RetryCnt: 7, RnrRetry: 7, MinRnrTimer: 1})
	peers, err := x.a.Device.Peers()
	if err != nil || len(peers) != 1 || peers[0].Addr != y.addr {
		t.Fatalf("peers of %s: %v, %v", a.name, peers, err)
	}

	start := time.Now()
	traffic(t, x, y, 1)
	t.Logf("clean link: the traffic (%d MiB each way, one message at a time) took %v", trafficBytes>>20, time.Since(start).Round(time.Millisecond))
	cx, cy := counters(t, x), counters(t, y)
	for _, c := range []map[string]uint64{cx, cy} {
		// A clean link loses nothing, but a socket may overflow in a
		// burst: retransmissions are logged, not forbidden.
		if c["drop_icrc"] != 0 || c["drop_peer"] != 0 || c["drop_header"] != 0 || c["drop_length"] != 0 || c["drop_qp"] != 0 {
			t.Errorf("drops on a clean link: %v", c)
		}
	}
	if cx["tx_packets"] < 1000 || cy["acks_sent"] == 0 {
		t.Errorf("counters: %v / %v", cx, cy)
	}
	t.Logf("clean link: %s sent %d packets (%d again), %s %d (%d again)", a.name, cx["tx_packets"], cx["retransmits"],
		b.name, cy["tx_packets"], cy["retransmits"])

	t.Run("wire", func(t *testing.T) { wireCheck(t, x, y) })

	t.Run("lossy", func(t *testing.T) {
		impair(t, a, b, 10, 5, 10)
		start := time.Now()
		traffic(t, x, y, 2)
		t.Logf("lossy link: the traffic took %v", time.Since(start).Round(time.Millisecond))
		cx, cy := counters(t, x), counters(t, y)
		if cx["retransmits"] == 0 || cy["retransmits"] == 0 {
			t.Errorf("no retransmissions over a lossy link: %v / %v", cx, cy)
		}
		rx, err := x.qp.Retransmits()
		if err != nil || rx == 0 {
			t.Errorf("QP retransmits %d, %v", rx, err)
		}
		t.Logf("lossy link: retransmits %d / %d, timeouts %d / %d, sequence NAKs %d / %d, duplicates %d / %d",
			cx["retransmits"], cy["retransmits"], cx["timeouts"], cy["timeouts"], cx["seq_naks_sent"], cy["seq_naks_sent"],
			cx["duplicate_requests"], cy["duplicate_requests"])
	})

	t.Run("cut", func(t *testing.T) {
		connect(t, x, y, driver.NetAttr{Timeout: 12, RetryCnt: 7, RnrRetry: 7, MinRnrTimer: 1}) // QPs of their own
		a.setLink(t, false)
		fill(x.bytes()[:8192], 9)
		start := time.Now()
		post(t, x, driver.SendWR{WrID: 7, Opcode: uapi.GOHFI_WR_RDMA_WRITE, SendFlags: uapi.GOHFI_SEND_SIGNALED,
			SGL: x.sge(0, 8192), RemoteAddr: uint64(y.buf.Addr()), Rkey: y.mr.Rkey()})
		post(t, x, driver.SendWR{WrID: 8, Opcode: uapi.GOHFI_WR_RDMA_READ, SendFlags: uapi.GOHFI_SEND_SIGNALED,
			SGL: x.sge(0, 8192), RemoteAddr: uint64(y.buf.Addr()), Rkey: y.mr.Rkey()})
		wcs := x.wait(t, 2)
		if wcs[0].WrID != 7 || wcs[0].Status != uapi.GOHFI_WC_RETRY_EXC_ERR || wcs[1].WrID != 8 || wcs[1].Status != uapi.GOHFI_WC_WR_FLUSH_ERR {
			t.Fatalf("completions %+v, want RETRY_EXC_ERR then WR_FLUSH_ERR", wcs)
		}
		if st, err := x.qp.State(); err != nil || st != uapi.GOHFI_QPS_ERR {
			t.Fatalf("QP state %d, %v: want ERR", st, err)
		}
		t.Logf("RETRY_EXC_ERR after %v", time.Since(start).Round(time.Millisecond))
		a.setLink(t, true)
	})
}
