package hfisim

import (
	"bytes"
	"net"
	"net/netip"
	"testing"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/ibwire"
	"github.com/gohfi/gohfi/uapi"
)

// TestNetIPv4Identification: the ICRC covers the IPv4 identification,
// which rdma_rxe sets (a UDP socket's DF datagrams have 0). A WRITE whose
// ICRC was computed with identification 0x1234 is dropped when the
// receiver assumes 0 (what a UDP socket shows) and executed when the
// receiver saw the header (the raw socket's path); splitIPv4UDP reads a
// datagram as rxe sends it, from its own source port.
func TestNetIPv4Identification(t *testing.T) {
	p := newNetPair(t, 1, 64<<10)
	rxeFrom := netip.AddrPortFrom(addrA.Addr(), ibwire.SourcePort(p.qa.qpn()))
	pk := &ibwire.Packet{BTH: ibwire.BTH{Opcode: ibwire.RCWriteOnly, PKey: ibwire.DefaultPKey, DestQP: p.qb.qpn(),
		PSN: 0xfffff0}, RETH: ibwire.RETH{VA: p.mb.va + 8, RKey: p.mb.key(), DMALen: 4}, Payload: []byte{9, 8, 7, 6}}
	ip := ibwire.IPHeader{Src: addrA.Addr(), Dst: addrB.Addr(), DF: true, ID: 0x1234, TTL: 64}
	dg := make([]byte, ibwire.DatagramLen(&ip, pk))
	if _, err := ibwire.EncodeDatagram(dg, &ip, rxeFrom.Port(), pk); err != nil {
		t.Fatal(err)
	}
	from, v, ib, cnt := splitIPv4UDP(dg, addrB)
	if cnt >= 0 || from != rxeFrom || v != (ipv4Var{id: 0x1234, df: true}) {
		t.Fatalf("splitIPv4UDP: from %v, %+v, drop counter %d", from, v, cnt)
	}
	if _, _, _, cnt := splitIPv4UDP(dg, netip.AddrPortFrom(addrB.Addr(), 9)); cnt != chip.NetCntDropHeader {
		t.Fatalf("a datagram to another port: drop counter %d", cnt)
	}
	if _, _, _, cnt := splitIPv4UDP(dg[:30], addrB); cnt != chip.NetCntDropLength {
		t.Fatalf("a cut datagram: drop counter %d", cnt)
	}

	was := p.b.d.NetCounter(chip.NetCntDropICRC)
	p.b.d.netInput(from, bytes.Clone(ib))
	waitFor(t, "the ICRC drop", func() bool { return p.b.d.NetCounter(chip.NetCntDropICRC) == was+1 })

	// The PSN is A's next one: B executes it (and A's QP, which did not
	// send it, ignores B's ACK for a PSN it never sent).
	pk.BTH.PSN = 0xfffff0
	p.b.d.netInputIP(from, v, bytes.Clone(ib))
	waitFor(t, "the WRITE", func() bool {
		return bytes.Equal(p.b.contents(p.mb)[8:12], []byte{9, 8, 7, 6})
	})
}

// FuzzSplitIPv4UDP: the raw socket's datagram parser never panics, and
// what it accepts is UDP to the port, not a fragment, with the payload the
// UDP length says inside the datagram.
func FuzzSplitIPv4UDP(f *testing.F) {
	f.Fuzz(func(t *testing.T, b []byte) {
		from, _, payload, cnt := splitIPv4UDP(b, addrB)
		if cnt >= 0 {
			return
		}
		hl := int(b[0]&0xF) * 4
		if b[9] != 17 || b[6]&0x3F != 0 || b[7] != 0 || netip.AddrFrom4([4]byte(b[16:20])) != addrB.Addr() ||
			from.Addr() != netip.AddrFrom4([4]byte(b[12:16])) || len(payload)+8 != int(b[hl+4])<<8|int(b[hl+5]) {
			t.Fatalf("accepted % x: from %v, %d bytes", b, from, len(payload))
		}
	})
}

// TestNetUDPSockets: two devices on real sockets of 127.0.0.1, the raw
// receive path as root (the UDP socket's otherwise). Messages of many
// packets go in batches (sendmmsg) and come in batches (recvmmsg) and
// arrive intact; hostile datagrams from a plain UDP socket, a burst of
// garbage and one longer than any receive buffer, are each counted and
// dropped.
func TestNetUDPSockets(t *testing.T) {
	lo := netip.MustParseAddrPort("127.0.0.1:0")
	a, b := newVerbsPort(t, lo, nil), newVerbsPort(t, lo, nil)
	p := &netPair{a: a, b: b}
	p.ca, p.cb = a.newCQ(0, 256), b.newCQ(0, 256)
	p.qa = a.newQP(0, 1, remoteAll, p.ca, p.ca)
	p.qb = b.newQP(0, 1, remoteAll, p.cb, p.cb)
	const size = 1 << 20
	p.ma = a.regMR(1, 1, allAccess, 0x7f00_0000_0123, size)
	p.mb = b.regMR(1, 1, allAccess, 0x7e00_0000_0ffd, size)
	netConnect(t, a, p.qa, b.d.PortAddr(), p.qb.qpn(), testNetAttr)
	netConnect(t, b, p.qb, a.d.PortAddr(), p.qa.qpn(), testNetAttr)
	netOps(t, p, 1)
	for i, op := range []uint8{uapi.GOHFI_WR_RDMA_WRITE, uapi.GOHFI_WR_RDMA_READ} {
		src, dst := a.fill(p.ma, byte(i)), b.fill(p.mb, byte(i)+1)
		w := sendWQE(uint64(100+i), op, sge(p.ma, 0, size))
		w.RemoteAddr, w.Rkey = p.mb.va, p.mb.key()
		a.postSend(p.qa, w)
		a.expectCQE(p.ca, uint64(100+i), uapi.GOHFI_WC_SUCCESS, wcOpcode(op), 0)
		if op == uapi.GOHFI_WR_RDMA_WRITE && !bytes.Equal(b.contents(p.mb), src) ||
			op == uapi.GOHFI_WR_RDMA_READ && !bytes.Equal(a.contents(p.ma), dst) {
			t.Fatalf("%s of 1 MiB: data differs", []string{"WRITE", "READ"}[i])
		}
	}

	conn, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(lo))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	d := b.d
	rx0, icrc0, len0 := d.NetCounter(chip.NetCntRxPkts), d.NetCounter(chip.NetCntDropICRC), d.NetCounter(chip.NetCntDropLength)
	const burst = 200
	junk := make([]byte, 100)
	for i := range burst {
		junk[0] = byte(i)
		if _, err := conn.WriteToUDPAddrPort(junk, d.PortAddr()); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := conn.WriteToUDPAddrPort(make([]byte, netRxBufSize+500), d.PortAddr()); err != nil {
		t.Fatal(err)
	}
	// The drops, not RxPkts: the peer's late ACKs or retransmissions of
	// the transfers above may arrive meanwhile and count as received.
	waitFor(t, "the hostile datagrams counted", func() bool {
		return d.NetCounter(chip.NetCntDropICRC)-icrc0 >= burst && d.NetCounter(chip.NetCntDropLength)-len0 >= 1
	})
	if got := d.NetCounter(chip.NetCntRxPkts) - rx0; got < burst+1 {
		t.Errorf("%d datagrams received of %d sent", got, burst+1)
	}
	if got := d.NetCounter(chip.NetCntDropICRC) - icrc0; got != burst {
		t.Errorf("%d ICRC drops of %d garbage datagrams", got, burst)
	}
	if got := d.NetCounter(chip.NetCntDropLength) - len0; got != 1 {
		t.Errorf("%d length drops of one datagram of %d bytes", got, netRxBufSize+500)
	}
	if v := a.d.NetCounter(chip.NetCntRetrans); v != 0 {
		t.Logf("%d retransmissions on loopback", v)
	}
}
