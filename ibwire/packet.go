package ibwire

import "encoding/binary"

// Packet is one IB transport packet: the BTH, the extended headers its
// opcode carries, the payload, the pad and the ICRC. The extended-header
// fields an opcode does not carry are ignored by Encode and zero after
// Decode.
type Packet struct {
	BTH          BTH
	RDETH        uint32 // EE context (RD), 24 bits
	DETH         DETH
	XRCETH       uint32 // XRC SRQ number, 24 bits
	FETH         FETH
	RETH         RETH
	AtomicETH    AtomicETH
	AETH         AETH
	AtomicAckETH AtomicAckETH
	ImmDt        ImmDt
	IETH         IETH

	// Payload is the data after the headers, without the pad. Decode
	// points it into the decoded buffer (no copy); its capacity ends with
	// the payload, so an append cannot overwrite the pad or the ICRC.
	Payload []byte

	// ICRC is the invariant CRC as the packet carries it: Decode reads it
	// (ValidateICRC or DecodeDatagram checks it, which needs the IP and
	// UDP headers); EncodeDatagram computes it. Encode writes zeros in its
	// place.
	ICRC uint32
}

// padFor is the pad count that makes n a multiple of 4.
func padFor(n int) uint8 { return uint8(-n & 3) }

// Len is the packet's size on the wire from the BTH through the ICRC.
func (p *Packet) Len() int {
	return p.BTH.Opcode.HeaderLen() + len(p.Payload) + int(padFor(len(p.Payload))) + ICRCLen
}

// checkPayload checks a payload of n bytes and pad count pad against what
// op carries; it is shared by Encode (pad computed) and Decode (pad read).
func checkPayload(op Opcode, n int, pad uint8) error {
	switch op.Payload() {
	case PayloadNone:
		if n != 0 || pad != 0 {
			return fieldErr("Payload", ErrLength, "%s carries no payload, found %d bytes and pad %d", op, n, pad)
		}
	case PayloadFixed:
		if n != atomicWritePayloadSize || pad != 0 {
			return fieldErr("Payload", ErrLength, "%s carries %d bytes, found %d and pad %d", op,
				atomicWritePayloadSize, n, pad)
		}
	default:
		if n > MaxPayload {
			return fieldErr("Payload", ErrLength, "%d bytes > %d", n, MaxPayload)
		}
	}
	return nil
}

// Encode writes the packet into b and returns its length (Len). It sets
// BTH.PadCount from the payload length and writes zeros for the pad and
// for the ICRC, which needs the IP and UDP headers (EncodeDatagram fills
// it). The opcode must be one the tables define, the payload must fit it,
// and every 24-bit field must fit 24 bits.
func (p *Packet) Encode(b []byte) (int, error) {
	op := p.BTH.Opcode
	if !op.Valid() {
		return 0, fieldErr("BTH.Opcode", ErrOpcode, "%#x", uint8(op))
	}
	if err := checkPayload(op, len(p.Payload), 0); err != nil {
		return 0, err
	}
	n := p.Len()
	if len(b) < n {
		return 0, fieldErr("Packet", ErrBuffer, "need %d bytes, have %d", n, len(b))
	}
	p.BTH.PadCount = padFor(len(p.Payload))
	if err := p.BTH.check(); err != nil {
		return 0, err
	}
	hdrs := op.Headers()
	if err := p.checkHeaders(hdrs); err != nil {
		return 0, err
	}
	p.BTH.put(b)
	off := BTHLen
	for i := range extHeaders {
		if hdrs.Has(Header(1) << i) {
			extHeaders[i].put(p, b[off:])
			off += headerLens[i]
		}
	}
	off += copy(b[off:], p.Payload)
	clear(b[off:n])
	return n, nil
}

// extHeaders puts each extended header of a Packet on the wire and gets it
// back (with the checks of its Decode), in the order of the Header
// constants. put runs after checkHeaders; both have headerLens[i] bytes.
var extHeaders = [numHeaders]struct {
	put func(p *Packet, b []byte)
	get func(p *Packet, b []byte) error
}{
	{ // RDETH
		func(p *Packet, b []byte) { be.PutUint32(b, p.RDETH) },
		func(p *Packet, b []byte) (err error) { p.RDETH, err = decode24(b, "RDETH"); return err },
	},
	{ // DETH
		func(p *Packet, b []byte) { p.DETH.put(b) },
		func(p *Packet, b []byte) error { return p.DETH.Decode(b) },
	},
	{ // XRCETH
		func(p *Packet, b []byte) { be.PutUint32(b, p.XRCETH) },
		func(p *Packet, b []byte) (err error) { p.XRCETH, err = decode24(b, "XRCETH"); return err },
	},
	{ // FETH
		func(p *Packet, b []byte) { p.FETH.put(b) },
		func(p *Packet, b []byte) error { return p.FETH.Decode(b) },
	},
	{ // RETH
		func(p *Packet, b []byte) { p.RETH.put(b) },
		func(p *Packet, b []byte) error { p.RETH.get(b); return nil },
	},
	{ // AtomicETH
		func(p *Packet, b []byte) { p.AtomicETH.put(b) },
		func(p *Packet, b []byte) error { p.AtomicETH.get(b); return nil },
	},
	{ // AETH
		func(p *Packet, b []byte) { p.AETH.put(b) },
		func(p *Packet, b []byte) error { return p.AETH.Decode(b) },
	},
	{ // AtomicAckETH
		func(p *Packet, b []byte) { be.PutUint64(b, p.AtomicAckETH.Orig) },
		func(p *Packet, b []byte) error { p.AtomicAckETH.Orig = be.Uint64(b); return nil },
	},
	{ // ImmDt
		func(p *Packet, b []byte) { be.PutUint32(b, uint32(p.ImmDt)) },
		func(p *Packet, b []byte) error { p.ImmDt = ImmDt(be.Uint32(b)); return nil },
	},
	{ // IETH
		func(p *Packet, b []byte) { be.PutUint32(b, p.IETH.RKey) },
		func(p *Packet, b []byte) error { p.IETH.RKey = be.Uint32(b); return nil },
	},
	{ // CNP pad
		func(_ *Packet, b []byte) { clear(b[:cnpReservedBytes]) },
		func(_ *Packet, b []byte) error {
			for i, c := range b[:cnpReservedBytes] {
				if c != 0 {
					return fieldErr("CNP.Reserved", ErrReserved, "byte %d is %#x", i, c)
				}
			}
			return nil
		},
	},
}

// checkHeaders checks the fields of the extended headers in hdrs that
// have a range narrower than their type.
func (p *Packet) checkHeaders(hdrs HeaderSet) error {
	switch {
	case hdrs.Has(HdrRDETH) && p.RDETH > Mask24:
		return fieldErr("RDETH.EEC", ErrField, "%#x wider than 24 bits", p.RDETH)
	case hdrs.Has(HdrDETH) && p.DETH.SrcQP > Mask24:
		return fieldErr("DETH.SrcQP", ErrField, "%#x wider than 24 bits", p.DETH.SrcQP)
	case hdrs.Has(HdrXRCETH) && p.XRCETH > Mask24:
		return fieldErr("XRCETH.SRQ", ErrField, "%#x wider than 24 bits", p.XRCETH)
	case hdrs.Has(HdrFETH) && (p.FETH.SelectivityLevel > 3 || p.FETH.PlacementType > 15):
		return fieldErr("FETH", ErrField, "level %d type %d", p.FETH.SelectivityLevel, p.FETH.PlacementType)
	case hdrs.Has(HdrAETH):
		return p.AETH.check()
	}
	return nil
}

// Decode reads the packet in b, from the BTH through the ICRC, into p.
// It checks, in this order: that b holds a BTH and an ICRC; the BTH's
// reserved bits and version; that the opcode is defined; that the length
// is a multiple of 4; that b holds the opcode's headers; that the payload
// and pad count fit the opcode (none, exactly 8 bytes, or at most
// MaxPayload, with a pad count no larger than the bytes it pads and no pad
// without payload); and the reserved bits and values of each extended
// header. It does not check the ICRC (that needs the IP and UDP headers:
// DecodeDatagram, ValidateICRC) nor the path MTU (CheckPMTU). Payload
// aliases b.
//
// On an error p is left zero: nothing of a refused packet is used by
// mistake.
func (p *Packet) Decode(b []byte) error {
	if err := p.decode(b); err != nil {
		*p = Packet{}
		return err
	}
	return nil
}

func (p *Packet) decode(b []byte) error {
	*p = Packet{}
	if len(b) < BTHLen+ICRCLen {
		return shortErr("Packet", BTHLen+ICRCLen, len(b))
	}
	if err := p.BTH.Decode(b); err != nil {
		return err
	}
	op := p.BTH.Opcode
	if !op.Valid() {
		return fieldErr("BTH.Opcode", ErrOpcode, "%#x", uint8(op))
	}
	if len(b)%4 != 0 {
		return fieldErr("Packet", ErrLength, "%d bytes, not a multiple of 4", len(b))
	}
	hl := op.HeaderLen()
	if len(b) < hl+ICRCLen {
		return shortErr(op.String(), hl+ICRCLen, len(b))
	}
	region := len(b) - hl - ICRCLen // payload + pad
	pad := p.BTH.PadCount
	if int(pad) > region || (pad != 0 && int(pad) == region) {
		return fieldErr("BTH.PadCount", ErrLength, "pad %d with %d bytes after the headers", pad, region)
	}
	if err := checkPayload(op, region-int(pad), pad); err != nil {
		return err
	}
	hdrs := op.Headers()
	off := BTHLen
	for i := range extHeaders {
		if hdrs.Has(Header(1) << i) {
			if err := extHeaders[i].get(p, b[off:]); err != nil {
				return err
			}
			off += headerLens[i]
		}
	}
	end := off + region - int(pad)
	p.Payload = b[off:end:end]
	p.ICRC = binary.LittleEndian.Uint32(b[len(b)-ICRCLen:])
	return nil
}

// CheckPMTU checks the payload length against the path MTU, as a
// responder does (rxe's check_length): FIRST and MIDDLE packets carry
// exactly pmtu bytes, LAST packets 1 to pmtu, ONLY packets at most pmtu.
// pmtu is 256, 512, 1024, 2048 or 4096.
func (p *Packet) CheckPMTU(pmtu int) error {
	switch pmtu {
	case 256, 512, 1024, 2048, 4096:
	default:
		return fieldErr("PMTU", ErrField, "%d is not an IB MTU", pmtu)
	}
	op := p.BTH.Opcode
	if op.Payload() != PayloadData {
		return nil
	}
	n := len(p.Payload)
	switch op.Position() {
	case PosFirst, PosMiddle:
		if n != pmtu {
			return fieldErr("Payload", ErrLength, "%s carries %d bytes, PMTU is %d", op, n, pmtu)
		}
	case PosLast:
		if n == 0 || n > pmtu {
			return fieldErr("Payload", ErrLength, "%s carries %d bytes, PMTU is %d", op, n, pmtu)
		}
	default:
		if n > pmtu {
			return fieldErr("Payload", ErrLength, "%s carries %d bytes, PMTU is %d", op, n, pmtu)
		}
	}
	return nil
}
