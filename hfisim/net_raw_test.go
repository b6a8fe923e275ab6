package hfisim

import (
	"bytes"
	"net/netip"
	"testing"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/ibwire"
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
