package hfisim

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/ibwire"
	"github.com/gohfi/gohfi/uapi"
)

// wire is an in-process network between devices: each direction drops,
// duplicates and reorders packets as its own seeded generator decides, so
// a seed replays the same decisions for the same traffic.
type wire struct {
	mu   sync.Mutex
	ends map[netip.AddrPort]*Device
	cut  bool
	seed uint64
	loss struct{ drop, dup, reorder float64 }
	rngs map[netip.AddrPort]*rand.Rand
	held map[netip.AddrPort]heldPkt // a packet each direction holds back to reorder
	sent int
	// hook, when set, sees every packet first (the IB packet, decoded)
	// and may drop it or hold it back until the next one of its direction.
	hook func(from netip.AddrPort, pk *ibwire.Packet) wireAction
}

// wireAction is what a wire's hook does with a packet.
type wireAction int

const (
	wirePass wireAction = iota
	wireDrop
	wireHold // until the next packet of the same direction has passed
)

type heldPkt struct {
	to netip.AddrPort
	b  []byte
}

type wireEnd struct {
	w    *wire
	from netip.AddrPort
}

func newWire(seed uint64) *wire {
	return &wire{ends: map[netip.AddrPort]*Device{}, seed: seed, rngs: map[netip.AddrPort]*rand.Rand{},
		held: map[netip.AddrPort]heldPkt{}}
}

func (w *wire) end(from netip.AddrPort) *wireEnd { return &wireEnd{w: w, from: from} }

func (w *wire) setLoss(drop, dup, reorder float64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.loss.drop, w.loss.dup, w.loss.reorder = drop, dup, reorder
}

func (w *wire) setCut(cut bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.cut = cut
}

func (e *wireEnd) send(b []txDatagram) error {
	for _, dg := range b {
		e.sendOne(dg.to, dg.b)
	}
	return nil
}

func (e *wireEnd) sendOne(to netip.AddrPort, b []byte) {
	w := e.w
	w.mu.Lock()
	defer w.mu.Unlock()
	w.sent++
	if w.cut {
		return
	}
	rng := w.rngs[e.from]
	if rng == nil {
		rng = rand.New(rand.NewPCG(w.seed, uint64(e.from.Port())<<32|uint64(e.from.Addr().As4()[3])))
		w.rngs[e.from] = rng
	}
	dst := w.ends[to]
	if dst == nil {
		return
	}
	act := wirePass
	if w.hook != nil {
		var ib ibwire.Packet
		if ib.Decode(b) == nil {
			act = w.hook(e.from, &ib)
		}
	}
	if act == wireDrop || rng.Float64() < w.loss.drop {
		return
	}
	pk := bytes.Clone(b)
	if act == wireHold || rng.Float64() < w.loss.reorder {
		if h, ok := w.held[e.from]; ok {
			w.ends[h.to].netInput(e.from, h.b)
		}
		w.held[e.from] = heldPkt{to: to, b: pk}
		return
	}
	dst.netInput(e.from, pk)
	if rng.Float64() < w.loss.dup {
		dst.netInput(e.from, pk)
	}
	if h, ok := w.held[e.from]; ok { // the held packet goes after this one
		delete(w.held, e.from)
		w.ends[h.to].netInput(e.from, h.b)
	}
}

func (e *wireEnd) close() error { return nil }

var (
	addrA = netip.MustParseAddrPort("192.0.2.1:4791")
	addrB = netip.MustParseAddrPort("192.0.2.2:4791")
)

// netPair is two devices on a wire, a QP on each connected to the other
// through peer table entry 1, and a region on each.
type netPair struct {
	w      *wire
	a, b   *vh
	qa, qb *tqp
	ca, cb *tcq
	ma, mb *mr
}

// testNetAttr: timeout 12 (16.8 ms: above a round trip under the race
// detector, whose engines run ten times slower), 7 retries, RNR retries without limit,
// the shortest RNR timer.
var testNetAttr = chip.QPNetAttrValue(12, 7, 7, 1)

func newNetPair(t *testing.T, seed uint64, size uint64) *netPair {
	return newNetPairAttr(t, seed, size, testNetAttr)
}

// newNetPairAttr is newNetPair with A's QP's attributes attrA.
func newNetPairAttr(t *testing.T, seed uint64, size uint64, attrA uint64) *netPair {
	t.Helper()
	w := newWire(seed)
	p := &netPair{w: w}
	p.a = newVerbsPort(t, addrA, w.end(addrA))
	p.b = newVerbsPort(t, addrB, w.end(addrB))
	w.ends[addrA], w.ends[addrB] = p.a.d, p.b.d
	p.ca, p.cb = p.a.newCQ(0, 256), p.b.newCQ(0, 256)
	p.qa = p.a.newQP(0, 1, remoteAll, p.ca, p.ca)
	p.qb = p.b.newQP(0, 1, remoteAll, p.cb, p.cb)
	p.ma = p.a.regMR(1, 1, allAccess, 0x7f00_0000_0123, size)
	p.mb = p.b.regMR(1, 1, allAccess, 0x7e00_0000_0ffd, size)
	netConnect(t, p.a, p.qa, addrB, p.qb.qpn(), attrA)
	netConnect(t, p.b, p.qb, addrA, p.qa.qpn(), testNetAttr)
	return p
}

// setPeer writes peer table entry i.
func setPeer(t testing.TB, d *Device, i int, a netip.AddrPort) {
	hi, lo := chip.GIDWords(a.Addr())
	wr(t, d, chip.PeerReg(i, chip.PeerGIDHi), hi)
	wr(t, d, chip.PeerReg(i, chip.PeerGIDLo), lo)
	wr(t, d, chip.PeerReg(i, chip.PeerUDPPort), uint64(a.Port())|chip.PeerValid)
}

// netConnect takes q from INIT to RTS connected to QP dest on peer, with
// both PSNs 0xfffff0 (they wrap during the tests).
func netConnect(t testing.TB, h *vh, q *tqp, peer netip.AddrPort, dest uint32, attr uint64) {
	t.Helper()
	setPeer(t, h.d, 1, peer)
	wr(t, h.d, chip.QPNetReg(q.n, chip.QPNetAttr), attr)
	wr(t, h.d, chip.QPReg(q.n, chip.QPDest), uint64(dest)|1<<32)
	wr(t, h.d, chip.QPReg(q.n, chip.QPPSN), 0xfffff0|0xfffff0<<32)
	h.modify(q, uapi.GOHFI_QPS_RTR)
	h.modify(q, uapi.GOHFI_QPS_RTS)
}

func (p *netPair) counter(d *Device, i int) uint64 { return d.NetCounter(i) }

// TestNetRegisters: the port's address as a GID, the peer table, the
// attributes, and a QP refused RTR towards an entry that is not valid.
func TestNetRegisters(t *testing.T) {
	h := newVerbsPort(t, netip.MustParseAddrPort("192.0.2.7:5000"), newWire(1).end(addrA))
	d := h.d
	if rd(t, d, chip.RegCapFlags)&chip.CapNet == 0 {
		t.Fatal("no CapNet with a port")
	}
	hi, lo := rd(t, d, chip.RegNetGIDHi), rd(t, d, chip.RegNetGIDLo)
	if got := chip.GIDAddr(hi, lo); got != netip.MustParseAddr("192.0.2.7") || hi != 0 || lo>>32 != 0xffff {
		t.Fatalf("GID %#x:%#x = %v, want ::ffff:192.0.2.7", hi, lo, got)
	}
	if rd(t, d, chip.RegNetUDPPort) != 5000 || rd(t, d, chip.RegNetNumPeers) != chip.MaxPeers || rd(t, d, chip.RegNetPMTU) != netPMTU {
		t.Fatal("port, peers or PMTU registers")
	}
	c := h.newCQ(0, 16)
	q := h.newQP(0, 1, 0, c, c)
	wr(t, d, chip.QPReg(q.n, chip.QPDest), uint64(chip.QPNBase)|2<<32)
	wr(t, d, chip.QPReg(q.n, chip.QPControl), uapi.GOHFI_QPS_RTR|uapi.GOHFI_QPT_RC<<chip.QPTypeShift)
	if h.state(q) != uapi.GOHFI_QPS_INIT {
		t.Fatal("RTR towards an empty peer entry accepted")
	}
	setPeer(t, d, 2, netip.MustParseAddrPort("[2001:db8::1]:4791"))
	wr(t, d, chip.QPReg(q.n, chip.QPControl), uapi.GOHFI_QPS_RTR|uapi.GOHFI_QPT_RC<<chip.QPTypeShift)
	if h.state(q) != uapi.GOHFI_QPS_INIT {
		t.Fatal("RTR towards a peer of another address family accepted")
	}
	setPeer(t, d, 2, netip.MustParseAddrPort("192.0.2.8:4791"))
	if rd(t, d, chip.PeerReg(2, chip.PeerUDPPort)) != 4791|chip.PeerValid {
		t.Fatal("peer entry does not read back")
	}
	h.modify(q, uapi.GOHFI_QPS_RTR)
	if rd(t, d, chip.QPNetReg(q.n, chip.QPNetAttr)) != defaultNetAttr {
		t.Fatal("QPNetAttr not at its default")
	}
	// Without a port: no CapNet, the registers read 0, RTR to a peer refused.
	h2 := newVerbs(t)
	if rd(t, h2.d, chip.RegCapFlags)&chip.CapNet != 0 || rd(t, h2.d, chip.RegNetUDPPort) != 0 {
		t.Fatal("CapNet or a port without one")
	}
	setPeer(t, h2.d, 1, addrA)
	c2 := h2.newCQ(0, 16)
	q2 := h2.newQP(0, 1, 0, c2, c2)
	wr(t, h2.d, chip.QPReg(q2.n, chip.QPDest), uint64(chip.QPNBase)|1<<32)
	wr(t, h2.d, chip.QPReg(q2.n, chip.QPControl), uapi.GOHFI_QPS_RTR|uapi.GOHFI_QPT_RC<<chip.QPTypeShift)
	if h2.state(q2) != uapi.GOHFI_QPS_INIT {
		t.Fatal("RTR to a peer accepted by a device without a port")
	}
}

func TestParsePort(t *testing.T) {
	for in, want := range map[string]string{
		"udp:10.0.0.1":      "10.0.0.1:4791",
		"udp:10.0.0.1:5000": "10.0.0.1:5000",
		"udp:[fd00::1]:7":   "[fd00::1]:7",
		"udp:fd00::1":       "[fd00::1]:4791",
	} {
		got, err := ParsePort(in)
		if err != nil || got.String() != want {
			t.Errorf("ParsePort(%q) = %v, %v; want %s", in, got, err, want)
		}
	}
	for _, bad := range []string{"10.0.0.1", "tcp:10.0.0.1", "udp:0.0.0.0", "udp:[::]:4791", "udp:224.0.0.1", "udp:host"} {
		if _, err := ParsePort(bad); err == nil {
			t.Errorf("ParsePort(%q) accepted", bad)
		}
	}
}

// netOps runs a mix of WRITE, READ and SEND (with immediate) messages
// from A to B, sizes around the wire's packet size and past many packets,
// and checks every byte and completion.
func netOps(t *testing.T, p *netPair, rounds int) {
	t.Helper()
	sizes := []uint32{1, netPMTU - 1, netPMTU, netPMTU + 1, 3*netPMTU + 17, 40000}
	for r := range rounds {
		for i, n := range sizes {
			id := uint64(r*100 + i*10)
			seed := byte(r*31 + i)
			// WRITE A -> B.
			src := p.a.fill(p.ma, seed)
			w := sendWQE(id+1, uapi.GOHFI_WR_RDMA_WRITE, sge(p.ma, 5, n))
			w.RemoteAddr, w.Rkey = p.mb.va+9, p.mb.key()
			p.a.postSend(p.qa, w)
			p.a.expectCQE(p.ca, id+1, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
			if got := p.b.contents(p.mb)[9 : 9+n]; !bytes.Equal(got, src[5:5+n]) {
				t.Fatalf("round %d: WRITE of %d bytes: data differs", r, n)
			}
			// READ B -> A.
			remote := p.b.fill(p.mb, seed+1)
			w = sendWQE(id+2, uapi.GOHFI_WR_RDMA_READ, sge(p.ma, 3, n))
			w.RemoteAddr, w.Rkey = p.mb.va+1, p.mb.key()
			p.a.postSend(p.qa, w)
			p.a.expectCQE(p.ca, id+2, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_READ, 0)
			if got := p.a.contents(p.ma)[3 : 3+n]; !bytes.Equal(got, remote[1:1+n]) {
				t.Fatalf("round %d: READ of %d bytes: data differs", r, n)
			}
			// SEND with immediate A -> B.
			src = p.a.fill(p.ma, seed+2)
			p.b.postRecv(p.qb, recvWQE(id+3, sge(p.mb, 0, uint32(p.mb.length))))
			w = sendWQE(id+4, uapi.GOHFI_WR_SEND_WITH_IMM, sge(p.ma, 11, n))
			w.Imm = 0x01020304
			p.a.postSend(p.qa, w)
			p.a.expectCQE(p.ca, id+4, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_SEND, 0)
			e := p.b.expectCQE(p.cb, id+3, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RECV, 0)
			if e.ByteLen != n || e.ImmData != 0x01020304 || e.WcFlags&uapi.GOHFI_WC_WITH_IMM == 0 || e.SrcQP != p.qa.qpn() {
				t.Fatalf("round %d: receive CQE %+v for a SEND of %d bytes", r, e, n)
			}
			if got := p.b.contents(p.mb)[:n]; !bytes.Equal(got, src[11:11+n]) {
				t.Fatalf("round %d: SEND of %d bytes: data differs", r, n)
			}
			netAtomics(t, p, id)
		}
	}
}

// netAtomics runs a FETCH_ADD and a COMPARE_SWAP from A on a word of B's
// region: each applies exactly once (a retransmitted atomic is answered
// from the responder's record, not executed again) and returns the old
// value.
func netAtomics(t *testing.T, p *netPair, id uint64) {
	t.Helper()
	target := (p.mb.va + 0x107) &^ 7
	host := p.mb.host(target)
	old := binary.LittleEndian.Uint64(p.b.read(host, 8))
	w := sendWQE(id+5, uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD, sge(p.ma, 64, 8))
	w.RemoteAddr, w.Rkey, w.CompareAdd = target, p.mb.key(), 5
	p.a.postSend(p.qa, w)
	p.a.expectCQE(p.ca, id+5, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_FETCH_ADD, 0)
	if got := binary.LittleEndian.Uint64(p.a.read(p.ma.host(p.ma.va+64), 8)); got != old {
		t.Fatalf("FETCH_ADD returned %#x, the word held %#x", got, old)
	}
	if got := binary.LittleEndian.Uint64(p.b.read(host, 8)); got != old+5 {
		t.Fatalf("after FETCH_ADD 5 the word is %#x, want %#x", got, old+5)
	}
	w = sendWQE(id+6, uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP, sge(p.ma, 72, 8))
	w.RemoteAddr, w.Rkey, w.CompareAdd, w.Swap = target, p.mb.key(), old+5, id
	p.a.postSend(p.qa, w)
	p.a.expectCQE(p.ca, id+6, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_COMP_SWAP, 0)
	if got := binary.LittleEndian.Uint64(p.b.read(host, 8)); got != id {
		t.Fatalf("after COMPARE_SWAP the word is %#x, want %#x", got, id)
	}
}

func TestNetRC(t *testing.T) {
	p := newNetPair(t, 1, 64<<10)
	netOps(t, p, 1)
	for _, i := range []int{chip.NetCntRetrans, chip.NetCntTimeouts, chip.NetCntDropICRC, chip.NetCntDropPSN,
		chip.NetCntDropHeader, chip.NetCntDropLength, chip.NetCntSeqNAKs} {
		if v := p.a.d.NetCounter(i) + p.b.d.NetCounter(i); v != 0 {
			t.Errorf("%s = %d on a clean wire", chip.NetCounterNames[i], v)
		}
	}
	if p.b.d.NetCounter(chip.NetCntAcksSent) == 0 || p.a.d.NetCounter(chip.NetCntTxPkts) == 0 {
		t.Error("no ACKs or packets counted")
	}
	if p.a.state(p.qa) != uapi.GOHFI_QPS_RTS || p.b.state(p.qb) != uapi.GOHFI_QPS_RTS {
		t.Error("a QP left RTS")
	}
}

// TestNetRCLossy runs the mix over wires that drop, duplicate and reorder:
// the data arrives intact, and the losses were made good by retransmission.
func TestNetRCLossy(t *testing.T) {
	for _, c := range []struct {
		seed               uint64
		drop, dup, reorder float64
	}{
		{1, 0.10, 0, 0}, {2, 0.02, 0.05, 0.10}, {3, 0.10, 0.10, 0.10}, {4, 0, 0.2, 0.3},
	} {
		t.Run(fmt.Sprintf("seed%d", c.seed), func(t *testing.T) {
			p := newNetPair(t, c.seed, 64<<10)
			p.w.setLoss(c.drop, c.dup, c.reorder)
			netOps(t, p, 2)
			retrans := p.a.d.NetCounter(chip.NetCntRetrans)
			if c.drop > 0 && retrans == 0 {
				t.Errorf("no retransmissions with %.0f%% loss", c.drop*100)
			}
			if rd(t, p.a.d, chip.QPNetReg(p.qa.n, chip.QPNetRetrans)) != retrans {
				t.Errorf("QP's QPNetRetrans differs from the port's count %d", retrans)
			}
			if c.dup > 0 && p.b.d.NetCounter(chip.NetCntDupReqs) == 0 {
				t.Error("duplicates were not noticed")
			}
			t.Logf("retransmits %d, timeouts %d, seq NAKs %d, duplicates %d, ACKs %d",
				retrans, p.a.d.NetCounter(chip.NetCntTimeouts), p.b.d.NetCounter(chip.NetCntSeqNAKs),
				p.b.d.NetCounter(chip.NetCntDupReqs), p.b.d.NetCounter(chip.NetCntAcksSent))
		})
	}
}

// TestNetRetryExceeded: a cut link completes the WQE with RETRY_EXC_ERR
// after retry_cnt retransmissions and flushes the next one.
func TestNetRetryExceeded(t *testing.T) {
	p := newNetPair(t, 1, 8192)
	p.w.setCut(true)
	w := sendWQE(1, uapi.GOHFI_WR_RDMA_WRITE, sge(p.ma, 0, 3000))
	w.RemoteAddr, w.Rkey = p.mb.va, p.mb.key()
	p.a.postSend(p.qa, w)
	w.WrID = 2
	p.a.postSend(p.qa, w)
	p.a.expectCQE(p.ca, 1, uapi.GOHFI_WC_RETRY_EXC_ERR, 0, chip.VendorErrRemoteQP)
	p.a.expectCQE(p.ca, 2, uapi.GOHFI_WC_WR_FLUSH_ERR, 0, 0)
	if p.a.state(p.qa) != uapi.GOHFI_QPS_ERR {
		t.Fatal("QP not in ERR")
	}
	if got := p.a.d.NetCounter(chip.NetCntTimeouts); got != 8 {
		t.Errorf("%d timeouts, want 8 (retry_cnt 7, then the last)", got)
	}
}

// TestNetRNR: a SEND with no receive posted is answered RNR until one is;
// with rnr_retry 1 it fails with RNR_RETRY_EXC_ERR.
func TestNetRNR(t *testing.T) {
	p := newNetPair(t, 1, 8192)
	src := p.a.fill(p.ma, 7)
	p.a.postSend(p.qa, sendWQE(1, uapi.GOHFI_WR_SEND, sge(p.ma, 0, 2500)))
	waitFor(t, "an RNR NAK", func() bool { return p.b.d.NetCounter(chip.NetCntRNRNAKs) >= 2 })
	p.b.postRecv(p.qb, recvWQE(9, sge(p.mb, 0, 4000)))
	p.a.expectCQE(p.ca, 1, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_SEND, 0)
	p.b.expectCQE(p.cb, 9, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RECV, 0)
	if !bytes.Equal(p.b.contents(p.mb)[:2500], src[:2500]) {
		t.Fatal("SEND after RNR: data differs")
	}

	q := newNetPairAttr(t, 1, 8192, chip.QPNetAttrValue(10, 7, 1, 1))
	q.a.postSend(q.qa, sendWQE(1, uapi.GOHFI_WR_SEND, sge(q.ma, 0, 10)))
	q.a.expectCQE(q.ca, 1, uapi.GOHFI_WC_RNR_RETRY_EXC_ERR, 0, chip.VendorErrNoRecv)
}

// TestNetRemoteAccessError: a WRITE through a key the responder does not
// know is NAKed: REM_ACCESS_ERR at the requester, the responder in ERR, no
// byte written.
func TestNetRemoteAccessError(t *testing.T) {
	p := newNetPair(t, 1, 8192)
	before := p.b.contents(p.mb)
	w := sendWQE(1, uapi.GOHFI_WR_RDMA_WRITE, sge(p.ma, 0, 3000))
	w.RemoteAddr, w.Rkey = p.mb.va+6000, p.mb.key() // runs past the region
	p.a.postSend(p.qa, w)
	p.a.expectCQE(p.ca, 1, uapi.GOHFI_WC_REM_ACCESS_ERR, 0, 0)
	if p.a.state(p.qa) != uapi.GOHFI_QPS_ERR || p.b.state(p.qb) != uapi.GOHFI_QPS_ERR {
		t.Fatal("QPs not in ERR after a remote access error")
	}
	if !bytes.Equal(p.b.contents(p.mb), before) {
		t.Fatal("a refused WRITE changed memory")
	}
	if rd(t, p.b.d, chip.RegCntNAKAccess) != 1 || p.b.d.NetCounter(chip.NetCntErrNAKs) != 1 {
		t.Fatal("NAK not counted")
	}
}

// waitFor polls cond until it holds (the engine's work is asynchronous to
// the test; a deadline makes a failure, never a hang).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for range 10000 {
		if cond() {
			return
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

// encodeFor encodes pk as it would arrive at to from from, ICRC and all.
func encodeFor(t testing.TB, from, to netip.AddrPort, pk *ibwire.Packet) []byte {
	b := make([]byte, 8192)
	n, err := pk.Encode(b)
	if err != nil {
		t.Fatal(err)
	}
	return withICRC(t, from, to, b[:n])
}

// withICRC sets the ICRC (the last four bytes) of b as it would arrive at
// to from from.
func withICRC(t testing.TB, from, to netip.AddrPort, b []byte) []byte {
	ip := ibwire.IPHeader{Src: from.Addr(), Dst: to.Addr(), DF: true}
	crc, err := ibwire.ComputeICRCPorts(&ip, from.Port(), to.Port(), b)
	if err != nil {
		t.Fatal(err)
	}
	putLE32(b[len(b)-4:], crc)
	return b
}

// TestNetHostile: packets that are not the connected peer's valid traffic
// are dropped and counted per reason; the QP carries on.
func TestNetHostile(t *testing.T) {
	p := newNetPair(t, 1, 64<<10)
	before := p.b.contents(p.mb)
	write := func(qpn uint32, psn ibwire.PSN) *ibwire.Packet {
		return &ibwire.Packet{BTH: ibwire.BTH{Opcode: ibwire.RCWriteOnly, PKey: ibwire.DefaultPKey, DestQP: qpn, PSN: psn},
			RETH: ibwire.RETH{VA: p.mb.va, RKey: p.mb.key(), DMALen: 4}, Payload: []byte{1, 2, 3, 4}}
	}
	good := write(p.qb.qpn(), 0xfffff0)
	evil := netip.MustParseAddrPort("192.0.2.66:4791")
	badICRC := encodeFor(t, addrA, addrB, good)
	badICRC[len(badICRC)-1] ^= 1
	truncated := encodeFor(t, addrA, addrB, good)
	truncated = truncated[:len(truncated)-8] // cut in the middle of the payload
	lying := encodeFor(t, addrA, addrB, good)[:ibwire.BTHLen+8]
	lying = withICRC(t, addrA, addrB, append(lying, 0, 0, 0, 0)) // a RETH cut short, with a good ICRC
	bigPkt := write(p.qb.qpn(), 0xfffff0)
	bigPkt.Payload = make([]byte, 2000)
	bigPkt.RETH.DMALen = 2000
	badPKey := write(p.qb.qpn(), 0xfffff0)
	badPKey.BTH.PKey = 0x1234
	for _, c := range []struct {
		name string
		from netip.AddrPort
		b    []byte
		cnt  int
	}{
		{"bad ICRC", addrA, badICRC, chip.NetCntDropICRC},
		{"short", addrA, []byte{1, 2, 3}, chip.NetCntDropLength},
		{"truncated", addrA, truncated, chip.NetCntDropICRC},
		{"length lies", addrA, lying, chip.NetCntDropLength},
		{"payload over PMTU", addrA, encodeFor(t, addrA, addrB, bigPkt), chip.NetCntDropLength},
		{"wrong P_Key", addrA, encodeFor(t, addrA, addrB, badPKey), chip.NetCntDropHeader},
		{"unknown QP", addrA, encodeFor(t, addrA, addrB, write(p.qb.qpn()+5, 0xfffff0)), chip.NetCntDropQP},
		{"QP 0", addrA, encodeFor(t, addrA, addrB, write(0, 0xfffff0)), chip.NetCntDropQP},
		{"wrong peer", evil, encodeFor(t, evil, addrB, good), chip.NetCntDropPeer},
		// The peer's address from another UDP port is the peer (RoCEv2
		// source ports are entropy): a duplicate, answered, not executed.
		{"peer from another port", netip.AddrPortFrom(addrA.Addr(), 0xC123), encodeFor(t, netip.AddrPortFrom(addrA.Addr(), 0xC123), addrB, write(p.qb.qpn(), 0xffffe0)), chip.NetCntDupReqs},
		{"PSN outside window", addrA, encodeFor(t, addrA, addrB, write(p.qb.qpn(), 0xfffff0^0x800000)), chip.NetCntDropPSN},
		{"ACK for nothing", addrA, encodeFor(t, addrA, addrB, &ibwire.Packet{BTH: ibwire.BTH{Opcode: ibwire.RCAcknowledge,
			PKey: ibwire.DefaultPKey, DestQP: p.qb.qpn(), PSN: 5}, AETH: ibwire.ACK(0, 1)}), chip.NetCntDropPSN},
		{"UD opcode", addrA, encodeFor(t, addrA, addrB, &ibwire.Packet{BTH: ibwire.BTH{Opcode: ibwire.UDSendOnly,
			PKey: ibwire.DefaultPKey, DestQP: p.qb.qpn()}}), chip.NetCntDropHeader},
	} {
		was := p.b.d.NetCounter(c.cnt)
		p.b.d.netInput(c.from, c.b)
		waitFor(t, c.name, func() bool { return p.b.d.NetCounter(c.cnt) == was+1 })
	}
	if !bytes.Equal(p.b.contents(p.mb), before) {
		t.Fatal("a dropped packet changed memory")
	}
	// A flood: the queue's overflow is dropped and counted, and the QP
	// still works afterwards.
	dup := encodeFor(t, addrA, addrB, write(p.qb.qpn(), 0xffffe0))
	dups0 := p.b.d.NetCounter(chip.NetCntDupReqs)
	for range 3 * netRxQueue {
		p.b.d.netInput(addrA, dup)
	}
	waitFor(t, "the flood to drain", func() bool {
		return p.b.d.NetCounter(chip.NetCntDupReqs)-dups0+p.b.d.NetCounter(chip.NetCntDropFlood) == 3*netRxQueue
	})
	if p.b.d.NetCounter(chip.NetCntDropFlood) == 0 {
		t.Log("no flood drop: the engine kept up with the queue")
	}
	netOps(t, p, 1)
}

// TestNetRCLargeLossy: messages of hundreds of packets (a READ asks for
// them in pieces) over a wire that drops and duplicates both ways.
func TestNetRCLargeLossy(t *testing.T) {
	for seed := range uint64(3) {
		p := newNetPair(t, seed+10, 1<<20)
		p.w.setLoss(0.10, 0.05, 0.05)

		for i, op := range []uint8{uapi.GOHFI_WR_RDMA_READ, uapi.GOHFI_WR_RDMA_WRITE} {
			src, dst := p.a.fill(p.ma, byte(seed)), p.b.fill(p.mb, byte(seed)+1)
			w := sendWQE(uint64(i), op, sge(p.ma, 0, 1<<20))
			w.RemoteAddr, w.Rkey = p.mb.va, p.mb.key()
			p.a.postSend(p.qa, w)
			p.a.expectCQE(p.ca, uint64(i), uapi.GOHFI_WC_SUCCESS, wcOpcode(op), 0)
			if op == uapi.GOHFI_WR_RDMA_READ && !bytes.Equal(p.a.contents(p.ma), dst) ||
				op == uapi.GOHFI_WR_RDMA_WRITE && !bytes.Equal(p.b.contents(p.mb), src) {
				t.Fatalf("seed %d: %s of 1 MiB: data differs", seed, []string{"READ", "WRITE"}[i])
			}
		}
		t.Logf("seed %d: retransmits %d, timeouts %d", seed, p.a.d.NetCounter(chip.NetCntRetrans), p.a.d.NetCounter(chip.NetCntTimeouts))
	}
}

// TestNetRCReadReorderedReRequest: a READ request sent again after a gap
// is overtaken on the wire by the request for the next piece, which went
// out right behind it. The responder answers the next piece first: its
// responses come while the requester waits for the gap and are dropped;
// then the gap's responses arrive and the READ makes progress, but what
// the overtaking request brought is gone and will not come again. The
// requester must ask for it again at once (a response past the expected
// one was dropped while it was going back), not sit out its
// retransmission timer.
func TestNetRCReadReorderedReRequest(t *testing.T) {
	// Timeout 18: a second: a wait for the timer is unmistakable.
	p := newNetPairAttr(t, 1, 256<<10, chip.QPNetAttrValue(18, 7, 7, 1))
	var first ibwire.PSN
	lost, held := false, false
	p.w.hook = func(from netip.AddrPort, pk *ibwire.Packet) wireAction {
		switch op := pk.BTH.Opcode; {
		case from == addrA && op == ibwire.RCReadRequest && first == 0 && pk.RETH.VA == p.mb.va:
			first = pk.BTH.PSN
		case from == addrB && op.IsReadResponse() && !lost && pk.BTH.PSN == first.Add(46):
			lost = true // a gap in the first piece: A goes back to 46
			return wireDrop
		case from == addrA && op == ibwire.RCReadRequest && lost && !held && pk.BTH.PSN == first.Add(46):
			held = true // A's request for 46..63 goes after its request for 64..127
			return wireHold
		}
		return wirePass
	}
	const n = 128 * netPMTU // two pieces of 64 responses
	dst := p.b.fill(p.mb, 7)
	w := sendWQE(1, uapi.GOHFI_WR_RDMA_READ, sge(p.ma, 0, n))
	w.RemoteAddr, w.Rkey = p.mb.va, p.mb.key()
	start := time.Now()
	p.a.postSend(p.qa, w)
	p.a.expectCQE(p.ca, 1, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_READ, 0)
	if !bytes.Equal(p.a.contents(p.ma)[:n], dst[:n]) {
		t.Fatal("READ: data differs")
	}
	if !lost || !held {
		t.Fatalf("the wire did not drop (%v) and reorder (%v) as the test means", lost, held)
	}
	if to := p.a.d.NetCounter(chip.NetCntTimeouts); to != 0 {
		t.Errorf("the READ waited for its retransmission timer %d times (%v in all)", to, time.Since(start).Round(time.Millisecond))
	}
}

// TestRCGoBackKeepsPendingRead: the requester went back to a READ (a gap
// in its responses) and, before the engine asked for them again, a
// sequence NAK of the SEND behind it came in the same receive batch (as
// 10% reordering on a veth made it happen). Going back to the SEND must not
// move the cursor past the READ's request: nothing else would ask for the
// responses, and the READ would wait for the retransmission timer.
func TestRCGoBackKeepsPendingRead(t *testing.T) {
	h := newVerbsPort(t, addrA, newWire(1).end(addrA))
	read := &rcWQE{wqe: chip.SendWQE{Opcode: uapi.GOHFI_WR_RDMA_READ}, first: 100, npkts: 5, done: 2}
	send := &rcWQE{wqe: chip.SendWQE{Opcode: uapi.GOHFI_WR_SEND}, first: 105, npkts: 5, done: 3}
	for _, c := range []struct {
		name             string
		cur, curPkt      int
		psn              ibwire.PSN
		wantCur, wantPkt int
	}{
		{"sent all, NAK of the SEND", 2, 0, 108, 1, 3},
		{"sent all, gap in the READ", 2, 0, 102, 0, 2},
		{"READ to ask again, NAK of the SEND", 0, 2, 108, 0, 2},
		{"SEND to send again, NAK of a later packet", 1, 3, 109, 1, 4},
		{"SEND to send again, gap in the READ", 1, 3, 102, 0, 2},
	} {
		rc := &rcQP{inflight: []*rcWQE{read, send}, cur: c.cur, curPkt: uint32(c.curPkt)}
		h.d.rcGoBack(rc, c.psn)
		if rc.cur != c.wantCur || rc.curPkt != uint32(c.wantPkt) {
			t.Errorf("%s: cursor at WQE %d packet %d, want %d, %d", c.name, rc.cur, rc.curPkt, c.wantCur, c.wantPkt)
		}
	}
}
