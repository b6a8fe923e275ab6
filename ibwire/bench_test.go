package ibwire

import (
	"net/netip"
	"testing"
)

func benchPacket(payload int) (Packet, IPHeader) {
	p := Packet{BTH: BTH{Opcode: RCWriteOnly, PKey: DefaultPKey, DestQP: 0x11, PSN: 42, AckReq: true},
		RETH: RETH{VA: 0x7f0000001000, RKey: 0x1234, DMALen: uint32(payload)}, Payload: make([]byte, payload)}
	ip := IPHeader{Src: netip.AddrFrom4([4]byte{10, 0, 0, 1}), Dst: netip.AddrFrom4([4]byte{10, 0, 0, 2}), DF: true}
	return p, ip
}

var benchSizes = []struct {
	name string
	n    int
}{{"0B", 0}, {"256B", 256}, {"4KiB", 4096}}

func BenchmarkEncode(b *testing.B) {
	for _, s := range benchSizes {
		b.Run(s.name, func(b *testing.B) {
			p, _ := benchPacket(s.n)
			buf := make([]byte, p.Len())
			b.ReportAllocs()
			b.SetBytes(int64(p.Len()))
			for b.Loop() {
				if _, err := p.Encode(buf); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkDecode(b *testing.B) {
	for _, s := range benchSizes {
		b.Run(s.name, func(b *testing.B) {
			p, _ := benchPacket(s.n)
			buf := make([]byte, p.Len())
			p.Encode(buf)
			var q Packet
			b.ReportAllocs()
			b.SetBytes(int64(len(buf)))
			for b.Loop() {
				if err := q.Decode(buf); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkICRC(b *testing.B) {
	for _, six := range []bool{false, true} {
		for _, s := range benchSizes {
			name := "IPv4/" + s.name
			if six {
				name = "IPv6/" + s.name
			}
			b.Run(name, func(b *testing.B) {
				p, ip := benchPacket(s.n)
				if six {
					ip.Src, ip.Dst = netip.MustParseAddr("fd00::1"), netip.MustParseAddr("fd00::2")
				}
				d := make([]byte, DatagramLen(&ip, &p))
				EncodeDatagram(d, &ip, 0xC001, &p)
				b.ReportAllocs()
				b.SetBytes(int64(len(d)))
				for b.Loop() {
					if _, err := ICRC(d); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

func BenchmarkEncodeDatagram(b *testing.B) {
	for _, s := range benchSizes {
		b.Run(s.name, func(b *testing.B) {
			p, ip := benchPacket(s.n)
			d := make([]byte, DatagramLen(&ip, &p))
			b.ReportAllocs()
			b.SetBytes(int64(len(d)))
			for b.Loop() {
				if _, err := EncodeDatagram(d, &ip, 0xC001, &p); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkDecodeDatagram(b *testing.B) {
	for _, s := range benchSizes {
		b.Run(s.name, func(b *testing.B) {
			p, ip := benchPacket(s.n)
			d := make([]byte, DatagramLen(&ip, &p))
			EncodeDatagram(d, &ip, 0xC001, &p)
			var q Packet
			b.ReportAllocs()
			b.SetBytes(int64(len(d)))
			for b.Loop() {
				if _, _, err := DecodeDatagram(d, &q); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestNoAllocs holds the hot paths to zero allocations (the benchmarks
// report them; this fails the build when one creeps in).
func TestNoAllocs(t *testing.T) {
	for _, six := range []bool{false, true} {
		p, ip := benchPacket(1000)
		if six {
			ip.Src, ip.Dst = netip.MustParseAddr("fd00::1"), netip.MustParseAddr("fd00::2")
		}
		d := make([]byte, DatagramLen(&ip, &p))
		ib := d[ip.Len()+UDPHeaderLen:]
		var q Packet
		udp := UDPHeader{SrcPort: 0xC001, DstPort: UDPPort}
		for name, f := range map[string]func(){
			"Encode":         func() { p.Encode(ib) },
			"Decode":         func() { q.Decode(ib) },
			"EncodeDatagram": func() { EncodeDatagram(d, &ip, 0xC001, &p) },
			"DecodeDatagram": func() { DecodeDatagram(d, &q) },
			"ICRC":           func() { ICRC(d) },
			"ComputeICRC":    func() { ComputeICRC(&ip, 0xC001, ib) },
			"ValidateICRC":   func() { ValidateICRC(&ip, udp, ib) },
		} {
			// A good datagram in d before each (Encode leaves a zero ICRC).
			if _, err := EncodeDatagram(d, &ip, 0xC001, &p); err != nil {
				t.Fatal(err)
			}
			if name != "Encode" {
				if err := errOf(name, f, d, &q, &ip, udp, ib); err != nil {
					t.Fatalf("%s: %v", name, err)
				}
			}
			if n := testing.AllocsPerRun(100, f); n != 0 {
				t.Errorf("ipv6=%v %s: %v allocations", six, name, n)
			}
		}
	}
}

// errOf checks that the measured call succeeds (an error path may
// allocate; the hot path must not).
func errOf(name string, _ func(), d []byte, q *Packet, ip *IPHeader, udp UDPHeader, ib []byte) error {
	switch name {
	case "Decode":
		return q.Decode(ib)
	case "DecodeDatagram":
		_, _, err := DecodeDatagram(d, q)
		return err
	case "ICRC":
		_, err := ICRC(d)
		return err
	case "ComputeICRC":
		_, err := ComputeICRC(ip, udp.SrcPort, ib)
		return err
	case "ValidateICRC":
		return ValidateICRC(ip, udp, ib)
	}
	return nil
}
