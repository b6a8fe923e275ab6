package hfisim

import (
	"bytes"
	"net/netip"
	"testing"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/ibwire"
	"github.com/gohfi/gohfi/uapi"
)

// FuzzNetReceive feeds device B of a connected pair (newNetPair, PSNs
// from 0xfffff0) datagrams of arbitrary bytes, as its peer would send them
// or from elsewhere, and checks that the device never panics, always
// returns to idle, and writes nothing outside the regions the packets'
// keys allow (a canary page around them stays as it was).
//
// Input: byte 0 flags (bit 0: set the ICRC right, so the fuzzer gets past
// it; bit 1: from an address that is not the peer's; bit 2: B's QP has a
// READ of 3000 bytes and a WRITE of 2000 in flight, PSNs 0xfffff0 to
// 0xfffff4, for responses to meet), then the IB packet
// (BTH through the ICRC's place). Several packets: the rest of the input
// after a 16-bit big-endian length of each.
func FuzzNetReceive(f *testing.F) {
	qpn := uint32(chip.QPNBase)
	seed := func(flags byte, pks ...*ibwire.Packet) {
		var in []byte
		in = append(in, flags)
		for _, pk := range pks {
			b := make([]byte, 8192)
			n, err := pk.Encode(b)
			if err != nil {
				f.Fatal(err)
			}
			in = append(in, byte(n>>8), byte(n))
			in = append(in, b[:n]...)
		}
		f.Add(in)
	}
	bth := func(op ibwire.Opcode, psn ibwire.PSN) ibwire.BTH {
		return ibwire.BTH{Opcode: op, PKey: ibwire.DefaultPKey, DestQP: qpn, PSN: psn, AckReq: true}
	}
	va, key := uint64(0x7e00_0000_0ffd), uint32(1<<8|0x5a)
	seed(1, &ibwire.Packet{BTH: bth(ibwire.RCWriteOnly, 0xfffff0), RETH: ibwire.RETH{VA: va, RKey: key, DMALen: 8}, Payload: make([]byte, 8)})
	seed(1, &ibwire.Packet{BTH: bth(ibwire.RCWriteFirst, 0xfffff0), RETH: ibwire.RETH{VA: va, RKey: key, DMALen: 1500}, Payload: make([]byte, netPMTU)},
		&ibwire.Packet{BTH: bth(ibwire.RCWriteLast, 0xfffff1), Payload: make([]byte, 1500-netPMTU)})
	seed(1, &ibwire.Packet{BTH: bth(ibwire.RCReadRequest, 0xfffff0), RETH: ibwire.RETH{VA: va, RKey: key, DMALen: 3000}})
	seed(1, &ibwire.Packet{BTH: bth(ibwire.RCSendOnlyImm, 0xfffff0), ImmDt: 7, Payload: []byte("hello")})
	seed(1, &ibwire.Packet{BTH: bth(ibwire.RCSendOnlyInvalidate, 0xfffff0), IETH: ibwire.IETH{RKey: key}, Payload: []byte("x")})
	seed(1, &ibwire.Packet{BTH: bth(ibwire.RCAcknowledge, 0xfffff0), AETH: ibwire.NAK(ibwire.NAKPSNSeqError, 0)})
	seed(1, &ibwire.Packet{BTH: bth(ibwire.RCReadResponseOnly, 0xfffff0), AETH: ibwire.ACK(0, 0), Payload: []byte{1}})
	seed(1, &ibwire.Packet{BTH: bth(ibwire.RCFetchAdd, 0xfffff0), AtomicETH: ibwire.AtomicETH{VA: va, RKey: key}})
	seed(3, &ibwire.Packet{BTH: bth(ibwire.RCWriteOnly, 0xfffff0), RETH: ibwire.RETH{VA: va, RKey: key, DMALen: 8}, Payload: make([]byte, 8)})
	seed(0, &ibwire.Packet{BTH: bth(ibwire.RCSendOnly, 0xfffff0), Payload: []byte{1, 2, 3}})
	// Responses for B's requester.
	seed(5, &ibwire.Packet{BTH: bth(ibwire.RCReadResponseFirst, 0xfffff0), AETH: ibwire.ACK(0, 0), Payload: make([]byte, netPMTU)},
		&ibwire.Packet{BTH: bth(ibwire.RCReadResponseMiddle, 0xfffff1), Payload: make([]byte, netPMTU)},
		&ibwire.Packet{BTH: bth(ibwire.RCReadResponseLast, 0xfffff2), AETH: ibwire.ACK(0, 1), Payload: make([]byte, 3000-2*netPMTU)},
		&ibwire.Packet{BTH: bth(ibwire.RCAcknowledge, 0xfffff4), AETH: ibwire.ACK(0, 2)})
	seed(5, &ibwire.Packet{BTH: bth(ibwire.RCAcknowledge, 0xfffff2), AETH: ibwire.NAK(ibwire.NAKRemoteAccessErr, 0)})
	seed(5, &ibwire.Packet{BTH: bth(ibwire.RCAcknowledge, 0xfffff3), AETH: ibwire.RNRNAK(1, 1)},
		&ibwire.Packet{BTH: bth(ibwire.RCAcknowledge, 0xfffff1), AETH: ibwire.NAK(ibwire.NAKPSNSeqError, 0)})
	f.Fuzz(fuzzNetReceive)
}

func fuzzNetReceive(t *testing.T, data []byte) {
	if len(data) == 0 {
		return
	}
	p := newNetPair(t, 1, 0x2000)
	h := p.b
	// The canary: host memory right after B's region, and a receive WQE
	// for SENDs into the region's first half.
	canary := h.alloc(0x2000)
	h.write(canary, bytes.Repeat([]byte{0xa5}, 0x2000))
	h.postRecv(p.qb, recvWQE(1, sge(p.mb, 0, 0x1000)))
	if data[0]&4 != 0 {
		p.w.setCut(true) // they stay in flight until the fuzzer's responses (or the retries) end them
		w := sendWQE(2, uapi.GOHFI_WR_RDMA_READ, sge(p.mb, 0x1000, 3000))
		w.RemoteAddr, w.Rkey = p.ma.va, p.ma.key()
		h.postSend(p.qb, w)
		w = sendWQE(3, uapi.GOHFI_WR_RDMA_WRITE, sge(p.mb, 0, 2000))
		w.RemoteAddr, w.Rkey = p.ma.va, p.ma.key()
		h.postSend(p.qb, w)
		h.d.waitIdle()
	}
	before := h.contents(p.mb)
	from := addrA
	if data[0]&2 != 0 {
		from = netip.MustParseAddrPort("192.0.2.99:4791")
	}
	rest := data[1:]
	for len(rest) >= 2 {
		n := int(rest[0])<<8 | int(rest[1])
		rest = rest[2:]
		if n > len(rest) {
			n = len(rest)
		}
		pk := bytes.Clone(rest[:n])
		rest = rest[n:]
		if data[0]&1 != 0 && len(pk) >= ibwire.BTHLen+ibwire.ICRCLen {
			pk = withICRC(t, from, addrB, pk)
		}
		h.d.netInput(from, pk)
	}
	h.d.waitIdle()
	if !bytes.Equal(h.read(canary, 0x2000), bytes.Repeat([]byte{0xa5}, 0x2000)) {
		t.Fatal("a packet wrote outside the regions")
	}
	if data[0]&2 != 0 && !bytes.Equal(h.contents(p.mb), before) {
		t.Fatal("a packet from an address that is not the peer's changed memory")
	}
}
