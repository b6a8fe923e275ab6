package ibwire

import (
	"encoding/binary"
	"hash/crc32"
	"net/netip"
)

// RoCEv2 framing (IB vol. 1 Annex A17): the IB packet follows a UDP
// header to port 4791 in an IPv4 or IPv6 datagram, with no LRH or GRH.

const (
	// UDPPort is RoCEv2's UDP destination port.
	UDPPort = 4791
	// SourcePortBase is the start of the dynamic port range that RoCEv2
	// source ports come from.
	SourcePortBase = 0xC000

	IPv4HeaderLen = 20
	IPv6HeaderLen = 40
	UDPHeaderLen  = 8

	ipProtoUDP = 17
	defaultTTL = 64
)

// SourcePort is the UDP source port of a QP's packets, as rxe chooses it:
// 0xC000 plus a 14-bit multiplicative hash (the kernel's hash_32) of the
// QP number, so that the flows of different QPs spread over receive queues
// while one QP's packets stay in order.
func SourcePort(qpn uint32) uint16 {
	const goldenRatio32 = 0x61C88647
	return SourcePortBase | uint16((qpn*goldenRatio32)>>(32-14))
}

// IPHeader is the part of an IPv4 or IPv6 header that a RoCEv2 sender
// chooses. Lengths, the protocol and the checksum follow from the packet.
type IPHeader struct {
	Src, Dst  netip.Addr // both IPv4 (or IPv4-mapped) or both IPv6
	TOS       uint8      // IPv4 TOS or IPv6 traffic class: DSCP<<2 | ECN
	TTL       uint8      // IPv4 TTL or IPv6 hop limit; 0 encodes as 64
	FlowLabel uint32     // IPv6 only, 20 bits
	ID        uint16     // IPv4 only: identification
	DF        bool       // IPv4 only: don't fragment (rxe sets it)
}

// Is6 reports an IPv6 header: its source is IPv6 and not IPv4-mapped
// (RoCEv2 writes an IPv4 address as an IPv4-mapped GID; here it means
// IPv4).
func (h *IPHeader) Is6() bool { return h.Src.Is6() && !h.Src.Is4In6() }

// Len is the IP header's length.
func (h *IPHeader) Len() int {
	if h.Is6() {
		return IPv6HeaderLen
	}
	return IPv4HeaderLen
}

// UDPHeader is the UDP header as decoded.
type UDPHeader struct {
	SrcPort, DstPort uint16
	Length           uint16 // header and data
	Checksum         uint16 // 0: none (IPv4)
}

// DatagramLen is the size of the IP datagram that carries p.
func DatagramLen(ip *IPHeader, p *Packet) int { return ip.Len() + UDPHeaderLen + p.Len() }

// EncodeDatagram writes an IP header, a UDP header from sport to
// UDPPort, the packet and its ICRC into b and returns the datagram's
// length. An IPv4 datagram's UDP checksum is 0 (as rxe sends it); an IPv6
// datagram's is computed, as IPv6 requires. p.ICRC is set.
func EncodeDatagram(b []byte, ip *IPHeader, sport uint16, p *Packet) (int, error) {
	six := ip.Is6()
	if err := ip.check(six); err != nil {
		return 0, err
	}
	hl := ip.Len()
	ibLen := p.Len()
	n := hl + UDPHeaderLen + ibLen
	if n > 0xFFFF {
		return 0, fieldErr("IP", ErrLength, "datagram of %d bytes", n)
	}
	if len(b) < n {
		return 0, fieldErr("Datagram", ErrBuffer, "need %d bytes, have %d", n, len(b))
	}
	if _, err := p.Encode(b[hl+UDPHeaderLen : n]); err != nil {
		return 0, err
	}
	ip.put(b, six, n)
	u := b[hl:]
	be.PutUint16(u[0:], sport)
	be.PutUint16(u[2:], UDPPort)
	be.PutUint16(u[4:], uint16(UDPHeaderLen+ibLen))
	be.PutUint16(u[6:], 0)
	p.ICRC = icrc(b[:hl+UDPHeaderLen], b[hl+UDPHeaderLen:n])
	binary.LittleEndian.PutUint32(b[n-ICRCLen:], p.ICRC)
	if six {
		be.PutUint16(u[6:], udp6Checksum(b[:n]))
	}
	return n, nil
}

func (h *IPHeader) check(six bool) error {
	if !h.Src.IsValid() || !h.Dst.IsValid() {
		return fieldErr("IP.Addr", ErrField, "source %v, destination %v", h.Src, h.Dst)
	}
	if six != (h.Dst.Is6() && !h.Dst.Is4In6()) {
		return fieldErr("IP.Addr", ErrField, "source %v and destination %v of different families", h.Src, h.Dst)
	}
	if six && h.FlowLabel > 0xFFFFF {
		return fieldErr("IPv6.FlowLabel", ErrField, "%#x wider than 20 bits", h.FlowLabel)
	}
	return nil
}

// put writes the IP header of a datagram of total bytes.
func (h *IPHeader) put(b []byte, six bool, total int) {
	ttl := h.TTL
	if ttl == 0 {
		ttl = defaultTTL
	}
	if six {
		_ = b[IPv6HeaderLen-1]
		be.PutUint32(b, 6<<28|uint32(h.TOS)<<20|h.FlowLabel)
		be.PutUint16(b[4:], uint16(total-IPv6HeaderLen))
		b[6] = ipProtoUDP
		b[7] = ttl
		s, d := h.Src.As16(), h.Dst.As16()
		copy(b[8:24], s[:])
		copy(b[24:40], d[:])
		return
	}
	_ = b[IPv4HeaderLen-1]
	b[0] = 0x45
	b[1] = h.TOS
	be.PutUint16(b[2:], uint16(total))
	be.PutUint16(b[4:], h.ID)
	var frag uint16
	if h.DF {
		frag = 0x4000
	}
	be.PutUint16(b[6:], frag)
	b[8] = ttl
	b[9] = ipProtoUDP
	be.PutUint16(b[10:], 0)
	s, d := h.Src.Unmap().As4(), h.Dst.Unmap().As4()
	copy(b[12:16], s[:])
	copy(b[16:20], d[:])
	be.PutUint16(b[10:], ipv4Checksum(b[:IPv4HeaderLen]))
}

// DecodeDatagram reads an IPv4 or IPv6 datagram that carries a RoCEv2
// packet: the IP header (version, IPv4 without options or fragments and
// with a good header checksum, IPv6 without extension headers), UDP to
// UDPPort with a length that matches the IP length, then the ICRC (a
// corrupted packet is an ICRC error, whatever else it got wrong), then the
// IB packet (Packet.Decode). Bytes after the IP length (link-layer
// padding) are ignored. The UDP checksum is not checked: the ICRC covers
// the same bytes and more.
func DecodeDatagram(b []byte, p *Packet) (IPHeader, UDPHeader, error) {
	ip, udp, hdr, ib, err := splitDatagram(b, true)
	if err != nil {
		*p = Packet{}
		return ip, udp, err
	}
	want := icrc(hdr, ib)
	if have := binary.LittleEndian.Uint32(ib[len(ib)-ICRCLen:]); have != want {
		*p = Packet{}
		return ip, udp, fieldErr("ICRC", ErrICRC, "packet has %#08x, computed %#08x", have, want)
	}
	return ip, udp, p.Decode(ib)
}

// ICRC computes the invariant CRC of a datagram: the IP header, UDP header
// and IB packet of b through its last four bytes (the ICRC's place, not
// included). The IP and UDP headers must be well formed (DecodeDatagram's
// checks, less the IPv4 header checksum, which the ICRC masks). IB vol. 1 Annex A17.8 and rxe_icrc.c: CRC-32 (the IEEE
// polynomial, as Ethernet's FCS) over eight 0xFF bytes standing for the
// LRH, then the IP header with the variant fields set to ones (IPv4 TOS,
// TTL, header checksum; IPv6 traffic class, flow label, hop limit), the UDP
// header with its checksum set to ones, the BTH with its byte 4 (FECN,
// BECN, Resv6) set to ones, and the rest of the packet as it is. On the
// wire the ICRC is this value's four bytes, least significant first.
func ICRC(b []byte) (uint32, error) {
	_, _, hdr, ib, err := splitDatagram(b, false)
	if err != nil {
		return 0, err
	}
	return icrc(hdr, ib), nil
}

// ValidateICRC checks a packet's ICRC (as Packet.Decode read it) against
// the IP and UDP headers it arrived with, for a receiver that has the
// headers only as values (a UDP socket with the IP header's fields from
// control messages): ip and udp describe the datagram (a zero
// udp.DstPort is UDPPort), ib is the IB packet.
func ValidateICRC(ip *IPHeader, udp UDPHeader, ib []byte) error {
	dport := udp.DstPort
	if dport == 0 {
		dport = UDPPort
	}
	got, err := ComputeICRCPorts(ip, udp.SrcPort, dport, ib)
	if err != nil {
		return err
	}
	if len(ib) < ICRCLen {
		return shortErr("Packet", ICRCLen, len(ib))
	}
	if have := binary.LittleEndian.Uint32(ib[len(ib)-ICRCLen:]); have != got {
		return fieldErr("ICRC", ErrICRC, "packet has %#08x, computed %#08x", have, got)
	}
	return nil
}

// ComputeICRC is the ICRC of the IB packet ib (BTH through the ICRC's
// place) in a datagram with the header ip, from UDP port sport to UDPPort:
// the ICRC for a sender or receiver that does not hold the IP header's
// bytes. Its invariant IPv4 fields are the ones the sender used (ID, DF):
// a kernel that sets them on its own must be told or asked for them.
func ComputeICRC(ip *IPHeader, sport uint16, ib []byte) (uint32, error) {
	return ComputeICRCPorts(ip, sport, UDPPort, ib)
}

// ComputeICRCPorts is ComputeICRC for a datagram to UDP port dport (a
// RoCEv2 port bound elsewhere than 4791, as several devices on one
// address are).
func ComputeICRCPorts(ip *IPHeader, sport, dport uint16, ib []byte) (uint32, error) {
	six := ip.Is6()
	if err := ip.check(six); err != nil {
		return 0, err
	}
	if len(ib) < BTHLen+ICRCLen {
		return 0, shortErr("Packet", BTHLen+ICRCLen, len(ib))
	}
	hl := ip.Len()
	n := hl + UDPHeaderLen + len(ib)
	if n > 0xFFFF {
		return 0, fieldErr("IP", ErrLength, "datagram of %d bytes", n)
	}
	var h [IPv6HeaderLen + UDPHeaderLen]byte
	ip.put(h[:], six, n)
	u := h[hl:]
	be.PutUint16(u[0:], sport)
	be.PutUint16(u[2:], dport)
	be.PutUint16(u[4:], uint16(UDPHeaderLen+len(ib)))
	return icrc(h[:hl+UDPHeaderLen], ib), nil
}

// splitDatagram checks the IP and UDP headers of b (the IPv4 header
// checksum too if csum) and returns them, the IP and UDP headers' bytes,
// and the IB packet (at least a BTH and an ICRC).
func splitDatagram(b []byte, csum bool) (ip IPHeader, udp UDPHeader, hdr, ib []byte, err error) {
	if len(b) < 1 {
		return ip, udp, nil, nil, shortErr("IP", IPv4HeaderLen, len(b))
	}
	var hl, total int
	switch b[0] >> 4 {
	case 4:
		if len(b) < IPv4HeaderLen {
			return ip, udp, nil, nil, shortErr("IPv4", IPv4HeaderLen, len(b))
		}
		if ihl := b[0] & 0x0F; ihl != 5 {
			return ip, udp, nil, nil, fieldErr("IPv4.IHL", ErrField, "%d: options are not allowed", ihl)
		}
		hl = IPv4HeaderLen
		total = int(be.Uint16(b[2:]))
		if total < hl+UDPHeaderLen {
			return ip, udp, nil, nil, fieldErr("IPv4.TotalLength", ErrLength, "%d", total)
		}
		if total > len(b) {
			return ip, udp, nil, nil, fieldErr("IPv4.TotalLength", ErrShort, "%d with %d bytes", total, len(b))
		}
		frag := be.Uint16(b[6:])
		if frag&0x3FFF != 0 {
			return ip, udp, nil, nil, fieldErr("IPv4.Fragment", ErrField, "flags and offset %#04x: a fragment", frag)
		}
		if frag&0x8000 != 0 {
			return ip, udp, nil, nil, fieldErr("IPv4.Flags", ErrReserved, "%#04x", frag)
		}
		if b[9] != ipProtoUDP {
			return ip, udp, nil, nil, fieldErr("IPv4.Protocol", ErrNotRoCE, "%d", b[9])
		}
		if c := ipv4Checksum(b[:IPv4HeaderLen]); csum && c != 0 {
			return ip, udp, nil, nil, fieldErr("IPv4.Checksum", ErrChecksum, "%#04x", be.Uint16(b[10:]))
		}
		ip = IPHeader{Src: netip.AddrFrom4([4]byte(b[12:16])), Dst: netip.AddrFrom4([4]byte(b[16:20])),
			TOS: b[1], TTL: b[8], ID: be.Uint16(b[4:]), DF: frag&0x4000 != 0}
	case 6:
		if len(b) < IPv6HeaderLen {
			return ip, udp, nil, nil, shortErr("IPv6", IPv6HeaderLen, len(b))
		}
		hl = IPv6HeaderLen
		total = hl + int(be.Uint16(b[4:]))
		if total < hl+UDPHeaderLen {
			return ip, udp, nil, nil, fieldErr("IPv6.PayloadLength", ErrLength, "%d", total-hl)
		}
		if total > len(b) {
			return ip, udp, nil, nil, fieldErr("IPv6.PayloadLength", ErrShort, "%d with %d bytes", total-hl, len(b)-hl)
		}
		if b[6] != ipProtoUDP {
			return ip, udp, nil, nil, fieldErr("IPv6.NextHeader", ErrNotRoCE, "%d", b[6])
		}
		w := be.Uint32(b)
		ip = IPHeader{Src: netip.AddrFrom16([16]byte(b[8:24])), Dst: netip.AddrFrom16([16]byte(b[24:40])),
			TOS: uint8(w >> 20), FlowLabel: w & 0xFFFFF, TTL: b[7]}
	default:
		return ip, udp, nil, nil, fieldErr("IP.Version", ErrVersion, "%d", b[0]>>4)
	}
	u := b[hl:total]
	udp = UDPHeader{SrcPort: be.Uint16(u), DstPort: be.Uint16(u[2:]), Length: be.Uint16(u[4:]),
		Checksum: be.Uint16(u[6:])}
	if udp.DstPort != UDPPort {
		return ip, udp, nil, nil, fieldErr("UDP.DstPort", ErrNotRoCE, "%d", udp.DstPort)
	}
	if int(udp.Length) != len(u) {
		return ip, udp, nil, nil, fieldErr("UDP.Length", ErrLength, "%d, IP says %d", udp.Length, len(u))
	}
	ib = u[UDPHeaderLen:]
	if len(ib) < BTHLen+ICRCLen {
		return ip, udp, nil, nil, shortErr("Packet", BTHLen+ICRCLen, len(ib))
	}
	return ip, udp, b[:hl+UDPHeaderLen], ib, nil
}

// crcLRH is the CRC-32 of the eight 0xFF bytes that stand for the LRH
// (rxe keeps the same state as its seed 0xdebb20e3, before inversion).
var crcLRH = crc32.ChecksumIEEE([]byte{0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF})

// icrc computes the ICRC of ib (BTH through the ICRC's place) behind the
// IP and UDP headers hdr (20 + 8 or 40 + 8 bytes).
func icrc(hdr, ib []byte) uint32 {
	var m [IPv6HeaderLen + UDPHeaderLen + BTHLen]byte
	n := copy(m[:], hdr)
	if n == IPv4HeaderLen+UDPHeaderLen {
		m[1] = 0xFF  // TOS
		m[8] = 0xFF  // TTL
		m[10] = 0xFF // header checksum
		m[11] = 0xFF
	} else {
		m[0] |= 0x0F // traffic class, flow label
		m[1] = 0xFF
		m[2] = 0xFF
		m[3] = 0xFF
		m[7] = 0xFF // hop limit
	}
	m[n-2] = 0xFF // UDP checksum
	m[n-1] = 0xFF
	copy(m[n:], ib[:BTHLen])
	m[n+4] = 0xFF // BTH resv8a: FECN, BECN, Resv6
	// The masked headers byte by byte (crc32.Update would move m to the
	// heap), the rest with the library's fast path.
	s := ^crcLRH
	for _, x := range m[:n+BTHLen] {
		s = crc32.IEEETable[byte(s)^x] ^ s>>8
	}
	return crc32.Update(^s, crc32.IEEETable, ib[BTHLen:len(ib)-ICRCLen])
}

// ipv4Checksum is the Internet checksum of h (0 when h holds a correct
// checksum).
func ipv4Checksum(h []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(h); i += 2 {
		s += uint32(h[i])<<8 | uint32(h[i+1])
	}
	return fold(s)
}

func fold(s uint32) uint16 {
	for s>>16 != 0 {
		s = s&0xFFFF + s>>16
	}
	return ^uint16(s)
}

// udp6Checksum is the UDP checksum of the IPv6 datagram d (its checksum
// field zero), with the IPv6 pseudo-header.
func udp6Checksum(d []byte) uint16 {
	var s uint64
	for i := 8; i < 40; i += 2 { // source and destination
		s += uint64(be.Uint16(d[i:]))
	}
	u := d[IPv6HeaderLen:]
	s += uint64(len(u)) + ipProtoUDP
	i := 0
	for ; i+1 < len(u); i += 2 {
		s += uint64(u[i])<<8 | uint64(u[i+1])
	}
	if i < len(u) {
		s += uint64(u[i]) << 8
	}
	for s>>16 != 0 {
		s = s&0xFFFF + s>>16
	}
	c := ^uint16(s)
	if c == 0 {
		c = 0xFFFF
	}
	return c
}
