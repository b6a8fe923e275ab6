package ibwire

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"
)

// refICRC is the ICRC written straight from IB vol. 1 Annex A17.8, sharing
// nothing with icrc(): copy the whole datagram, set the variant fields to
// ones, put eight 0xFF bytes (the LRH) in front, drop the ICRC's own four
// bytes, and run a bit-at-a-time CRC-32 (reflected polynomial 0xEDB88320,
// initial value and final XOR all ones) over the result.
func refICRC(t testing.TB, d []byte) uint32 {
	t.Helper()
	m := append([]byte{}, d...)
	var udp int
	switch m[0] >> 4 {
	case 4:
		m[1] = 0xFF               // type of service
		m[8] = 0xFF               // time to live
		m[10], m[11] = 0xFF, 0xFF // header checksum
		udp = 20
	case 6:
		m[0] |= 0x0F // traffic class (high nibble)
		m[1] = 0xFF  // traffic class (low nibble), flow label
		m[2], m[3] = 0xFF, 0xFF
		m[7] = 0xFF // hop limit
		udp = 40
	default:
		t.Fatalf("not IP: %x", m[0])
	}
	m[udp+6], m[udp+7] = 0xFF, 0xFF // UDP checksum
	m[udp+8+4] = 0xFF               // BTH byte 4: FECN, BECN, Resv6
	buf := append([]byte{0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF}, m[:len(m)-4]...)
	crc := uint32(0xFFFFFFFF)
	for _, b := range buf {
		crc ^= uint32(b)
		for range 8 {
			if crc&1 != 0 {
				crc = crc>>1 ^ 0xEDB88320
			} else {
				crc >>= 1
			}
		}
	}
	return ^crc
}

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	s = strings.Join(strings.Fields(s), "")
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Two datagrams whose ICRC someone else computed.
var knownICRC = []struct {
	name   string
	source string
	hex    string // the IP datagram
	op     Opcode
	qp     uint32
	psn    PSN
}{
	{
		// A CNP that a Mellanox ConnectX-4 Lx put on the wire (Scapy's
		// test/contrib/roce.uts, "RoCE CNP captured on ConnectX-4 Lx", the
		// Ethernet header dropped): the hardware computed this ICRC. BECN is
		// set, inside the masked BTH byte.
		name:   "cnp-connectx4lx",
		source: "hardware capture",
		hex: `45c2 003c 718c 4000 4011 9161 0a00 1101 0a00 1201
		      0000 12b7 0028 0000
		      8100 ffff 4000 0118 0000 0000
		      0000 0000 0000 0000 0000 0000 0000 0000
		      82fd 002a`,
		op: CNP, qp: 0x118, psn: 0,
	},
	{
		// Scapy's example UC SEND ONLY (roce.uts, "RoCE layer"): MigReq, pad
		// count 2, TOS 1, IP checksum 0xb4d5 and UDP checksum 0xaca2 as Scapy
		// computed them, ICRC 0x78f353f3 as Scapy's compute_icrc reads it
		// big-endian from the wire.
		name:   "uc-send-only-scapy",
		source: "Scapy",
		hex: `4501 0040 0478 4000 4011 b4d5 c0a8 0007 c0a8 0007
		      c000 12b7 002c aca2
		      2460 ffff 0000 00d3 00cf 1710
		      4630 818b e289 35d9 0e9a 9550 5401 be88 5e50 0000
		      78f3 53f3`,
		op: UCSendOnly, qp: 211, psn: 13571856,
	},
}

func TestICRCKnownAnswers(t *testing.T) {
	for _, v := range knownICRC {
		t.Run(v.name, func(t *testing.T) {
			d := unhex(t, v.hex)
			wire := binary.LittleEndian.Uint32(d[len(d)-4:])
			got, err := ICRC(d)
			if err != nil {
				t.Fatal(err)
			}
			if got != wire {
				t.Errorf("ICRC %#08x, the %s says %#08x", got, v.source, wire)
			}
			if ref := refICRC(t, d); ref != wire {
				t.Errorf("reference ICRC %#08x, the %s says %#08x", ref, v.source, wire)
			}
			var p Packet
			if _, _, err := DecodeDatagram(d, &p); err != nil {
				t.Fatal(err)
			}
			if p.BTH.Opcode != v.op || p.BTH.DestQP != v.qp || p.BTH.PSN != v.psn {
				t.Errorf("decoded %v qp %#x psn %d", p.BTH.Opcode, p.BTH.DestQP, p.BTH.PSN)
			}
			// Re-encode from the decoded fields: the same bytes.
			ip, udp, _ := DecodeDatagram(d, &p)
			buf := make([]byte, len(d))
			n, err := EncodeDatagram(buf, &ip, udp.SrcPort, &p)
			if err != nil {
				t.Fatal(err)
			}
			if v.name == "uc-send-only-scapy" {
				// Scapy filled the UDP checksum; EncodeDatagram leaves IPv4's 0.
				binary.BigEndian.PutUint16(buf[26:], udp.Checksum)
			}
			if string(buf[:n]) != string(d) {
				t.Errorf("re-encoded\n%x\nwant\n%x", buf[:n], d)
			}
		})
	}
}

// TestICRCVariantFields: changing a masked field leaves the ICRC alone,
// changing any other byte changes it.
func TestICRCVariantFields(t *testing.T) {
	for _, six := range []bool{false, true} {
		d := sampleDatagram(t, six, RCWriteOnlyImm, 37)
		base, err := ICRC(d)
		if err != nil {
			t.Fatal(err)
		}
		var masked map[int]bool
		if six {
			masked = map[int]bool{0: true, 1: true, 2: true, 3: true, 7: true, 46: true, 47: true, 48 + 4: true}
		} else {
			masked = map[int]bool{1: true, 8: true, 10: true, 11: true, 26: true, 27: true, 28 + 4: true}
		}
		for i := 0; i < len(d)-4; i++ {
			c := append([]byte{}, d...)
			c[i] ^= 0x01 // in byte 0 of IPv6: a traffic class bit
			got, err := ICRC(c)
			if err != nil {
				continue // a header byte that makes it no RoCEv2 datagram
			}
			if masked[i] && got != base {
				t.Errorf("ipv6=%v: byte %d is variant but changed the ICRC", six, i)
			}
			if !masked[i] && got == base {
				t.Errorf("ipv6=%v: byte %d is invariant but left the ICRC alone", six, i)
			}
		}
	}
}

// TestICRCReference compares icrc() with the reference over random
// packets of every opcode, IPv4 and IPv6.
func TestICRCReference(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for i := range 2000 {
		op := validOpcodes()[r.IntN(len(validOpcodes()))]
		p := randomPacket(r, op)
		ip := randomIP(r, i%2 == 1)
		buf := make([]byte, DatagramLen(&ip, &p))
		n, err := EncodeDatagram(buf, &ip, SourcePort(p.BTH.DestQP), &p)
		if err != nil {
			t.Fatalf("%v: %v", op, err)
		}
		d := buf[:n]
		if ref := refICRC(t, d); ref != p.ICRC {
			t.Fatalf("%v ipv6=%v: ICRC %#08x, reference %#08x", op, ip.Is6(), p.ICRC, ref)
		}
		ib := d[ip.Len()+UDPHeaderLen:]
		if c, err := ComputeICRC(&ip, SourcePort(p.BTH.DestQP), ib); err != nil || c != p.ICRC {
			t.Fatalf("ComputeICRC %#08x %v, want %#08x", c, err, p.ICRC)
		}
		udp := UDPHeader{SrcPort: SourcePort(p.BTH.DestQP), DstPort: UDPPort}
		if err := ValidateICRC(&ip, udp, ib); err != nil {
			t.Fatal(err)
		}
	}
}

func TestICRCMismatch(t *testing.T) {
	d := sampleDatagram(t, false, RCSendOnly, 100)
	d[len(d)-10] ^= 0x40 // payload
	var p Packet
	_, _, err := DecodeDatagram(d, &p)
	if !errors.Is(err, ErrICRC) {
		t.Fatalf("got %v, want ErrICRC", err)
	}
	var e *Error
	if !errors.As(err, &e) || e.Field != "ICRC" {
		t.Fatalf("error %v does not name the ICRC", err)
	}
	if p.BTH.Opcode != 0 || p.Payload != nil {
		t.Errorf("a refused packet left fields behind: %+v", p.BTH)
	}
}

func TestSourcePort(t *testing.T) {
	// hash_32(qpn, 14) | 0xc000 by hand for a few QPNs.
	for _, qpn := range []uint32{0, 1, 17, 0x118, 0xFFFFFF} {
		want := uint16(0xC000 + (uint32(uint64(qpn)*0x61C88647%(1<<32))>>18)&0x3FFF)
		if got := SourcePort(qpn); got != want || got < 0xC000 {
			t.Errorf("SourcePort(%#x) = %#x, want %#x", qpn, got, want)
		}
	}
	if SourcePort(1) == SourcePort(2) {
		t.Error("QPs 1 and 2 share a source port")
	}
}

func sampleDatagram(t testing.TB, six bool, op Opcode, payload int) []byte {
	t.Helper()
	r := rand.New(rand.NewPCG(uint64(op), uint64(payload)))
	p := randomPacket(r, op)
	if op.Payload() == PayloadData {
		p.Payload = make([]byte, payload)
		for i := range p.Payload {
			p.Payload[i] = byte(r.Uint32())
		}
	}
	ip := randomIP(r, six)
	buf := make([]byte, DatagramLen(&ip, &p))
	n, err := EncodeDatagram(buf, &ip, SourcePort(p.BTH.DestQP), &p)
	if err != nil {
		t.Fatal(err)
	}
	return buf[:n]
}

func randomIP(r *rand.Rand, six bool) IPHeader {
	if six {
		var s, d [16]byte
		for i := range s {
			s[i], d[i] = byte(r.Uint32()), byte(r.Uint32())
		}
		s[0], d[0] = 0xFD, 0xFD // not IPv4-mapped
		return IPHeader{Src: netip.AddrFrom16(s), Dst: netip.AddrFrom16(d), TOS: byte(r.Uint32()),
			TTL: byte(r.Uint32()), FlowLabel: r.Uint32() & 0xFFFFF}
	}
	var s, d [4]byte
	for i := range s {
		s[i], d[i] = byte(r.Uint32()), byte(r.Uint32())
	}
	return IPHeader{Src: netip.AddrFrom4(s), Dst: netip.AddrFrom4(d), TOS: byte(r.Uint32()),
		TTL: byte(r.Uint32()), ID: uint16(r.Uint32()), DF: r.IntN(2) == 1}
}
