package ibwire

import (
	"encoding/binary"
	"strconv"
)

var be = binary.BigEndian

// Mask24 keeps the 24 bits of a QP number, PSN, MSN or EE context.
const Mask24 = 1<<24 - 1

// BTH is the base transport header (12 bytes, IB vol. 1 9.2):
//
//	byte 0     opcode
//	byte 1     SE(7) M(6) PadCnt(5:4) TVer(3:0)
//	bytes 2-3  P_Key
//	byte 4     FECN(7) BECN(6) Resv6(5:0)
//	bytes 5-7  DestQP
//	byte 8     AckReq(7) Resv7(6:0)
//	bytes 9-11 PSN
//
// FECN and BECN are the congestion bits of IB vol. 1 17.9 that RoCEv2
// (Annex A17.9) also carries in the IP ECN field. Byte 4 is "resv8a", the
// BTH byte the ICRC masks.
type BTH struct {
	Opcode   Opcode
	SE       bool  // solicited event
	MigReq   bool  // migration state
	PadCount uint8 // 0-3 pad bytes after the payload
	TVer     uint8 // transport header version: 0
	PKey     uint16
	FECN     bool
	BECN     bool
	DestQP   uint32 // 24 bits
	AckReq   bool
	PSN      PSN // 24 bits
}

// DefaultPKey is the full-member default partition key.
const DefaultPKey = 0xFFFF

func (h *BTH) check() error {
	switch {
	case h.PadCount > 3:
		return fieldErr("BTH.PadCount", ErrField, "%d > 3", h.PadCount)
	case h.TVer > 15:
		return fieldErr("BTH.TVer", ErrField, "%d > 15", h.TVer)
	case h.DestQP > Mask24:
		return fieldErr("BTH.DestQP", ErrField, "%#x wider than 24 bits", h.DestQP)
	case h.PSN > Mask24:
		return fieldErr("BTH.PSN", ErrField, "%#x wider than 24 bits", uint32(h.PSN))
	}
	return nil
}

// Encode writes the header into b[:BTHLen].
func (h *BTH) Encode(b []byte) error {
	return encodeHdr("BTH", b, BTHLen, h.check, h.put)
}

func (h *BTH) put(b []byte) {
	_ = b[BTHLen-1]
	b[0] = byte(h.Opcode)
	b[1] = flag(h.SE, 0x80) | flag(h.MigReq, 0x40) | h.PadCount<<4 | h.TVer&0x0F
	be.PutUint16(b[2:], h.PKey)
	be.PutUint32(b[4:], h.DestQP&Mask24|uint32(flag(h.FECN, 0x80)|flag(h.BECN, 0x40))<<24)
	be.PutUint32(b[8:], uint32(h.PSN)&Mask24|uint32(flag(h.AckReq, 0x80))<<24)
}

// Decode reads the header from b. It refuses a short b, a transport
// version other than 0 and set reserved bits; it does not judge the opcode
// (Packet.Decode does).
func (h *BTH) Decode(b []byte) error {
	if err := shortCheck("BTH", b, BTHLen); err != nil {
		return err
	}
	if r := b[4] & 0x3F; r != 0 {
		return fieldErr("BTH.Resv6", ErrReserved, "%#x", r)
	}
	if r := b[8] & 0x7F; r != 0 {
		return fieldErr("BTH.Resv7", ErrReserved, "%#x", r)
	}
	if v := b[1] & 0x0F; v != 0 {
		return fieldErr("BTH.TVer", ErrVersion, "%d", v)
	}
	h.Opcode = Opcode(b[0])
	h.SE = b[1]&0x80 != 0
	h.MigReq = b[1]&0x40 != 0
	h.PadCount = b[1] >> 4 & 3
	h.TVer = 0
	h.PKey = be.Uint16(b[2:])
	h.FECN = b[4]&0x80 != 0
	h.BECN = b[4]&0x40 != 0
	h.DestQP = be.Uint32(b[4:]) & Mask24
	h.AckReq = b[8]&0x80 != 0
	h.PSN = PSN(be.Uint32(b[8:]) & Mask24)
	return nil
}

func flag(b bool, v byte) byte {
	if b {
		return v
	}
	return 0
}

// RETH is the RDMA extended transport header (16 bytes): the remote
// virtual address, its R_Key and the DMA length of the whole message.
type RETH struct {
	VA     uint64
	RKey   uint32
	DMALen uint32
}

func (h *RETH) put(b []byte) {
	_ = b[RETHLen-1]
	be.PutUint64(b, h.VA)
	be.PutUint32(b[8:], h.RKey)
	be.PutUint32(b[12:], h.DMALen)
}

func (h *RETH) get(b []byte) {
	_ = b[RETHLen-1]
	h.VA = be.Uint64(b)
	h.RKey = be.Uint32(b[8:])
	h.DMALen = be.Uint32(b[12:])
}

// Encode writes the header into b[:RETHLen].
func (h *RETH) Encode(b []byte) error {
	return encodeHdr("RETH", b, RETHLen, nil, h.put)
}

// Decode reads the header from b.
func (h *RETH) Decode(b []byte) error {
	return decodeHdr("RETH", b, RETHLen, h.get)
}

// AtomicETH is the atomic extended transport header (28 bytes): VA, R_Key,
// the swap (COMPARE_SWAP) or add (FETCH_ADD) operand, and the compare
// operand.
type AtomicETH struct {
	VA      uint64
	RKey    uint32
	SwapAdd uint64
	Compare uint64
}

func (h *AtomicETH) put(b []byte) {
	_ = b[AtomicETHLen-1]
	be.PutUint64(b, h.VA)
	be.PutUint32(b[8:], h.RKey)
	be.PutUint64(b[12:], h.SwapAdd)
	be.PutUint64(b[20:], h.Compare)
}

func (h *AtomicETH) get(b []byte) {
	_ = b[AtomicETHLen-1]
	h.VA = be.Uint64(b)
	h.RKey = be.Uint32(b[8:])
	h.SwapAdd = be.Uint64(b[12:])
	h.Compare = be.Uint64(b[20:])
}

// Encode writes the header into b[:AtomicETHLen].
func (h *AtomicETH) Encode(b []byte) error {
	return encodeHdr("AtomicETH", b, AtomicETHLen, nil, h.put)
}

// Decode reads the header from b.
func (h *AtomicETH) Decode(b []byte) error {
	return decodeHdr("AtomicETH", b, AtomicETHLen, h.get)
}

// AtomicAckETH is the atomic acknowledge extended transport header
// (8 bytes): the value at the target before the operation.
type AtomicAckETH struct {
	Orig uint64
}

// Encode writes the header into b[:AtomicAckETHLen].
func (h *AtomicAckETH) Encode(b []byte) error {
	return encodeHdr("AtomicAckETH", b, AtomicAckETHLen, nil, func(b []byte) { be.PutUint64(b, h.Orig) })
}

// Decode reads the header from b.
func (h *AtomicAckETH) Decode(b []byte) error {
	return decodeHdr("AtomicAckETH", b, AtomicAckETHLen, func(b []byte) { h.Orig = be.Uint64(b) })
}

// ImmDt is the immediate data (4 bytes). Verbs hand it over in network
// byte order; here it is the big-endian value of the four wire bytes.
type ImmDt uint32

// IETH is the invalidate extended transport header (4 bytes): the R_Key
// the responder invalidates (SEND_WITH_INV).
type IETH struct {
	RKey uint32
}

// DETH is the datagram extended transport header (8 bytes): Q_Key, then a
// reserved byte and the 24-bit source QP.
type DETH struct {
	QKey  uint32
	SrcQP uint32 // 24 bits
}

// Encode writes the header into b[:DETHLen].
func (h *DETH) Encode(b []byte) error {
	if err := bufCheck("DETH", b, DETHLen); err != nil {
		return err
	}
	if h.SrcQP > Mask24 {
		return fieldErr("DETH.SrcQP", ErrField, "%#x wider than 24 bits", h.SrcQP)
	}
	h.put(b)
	return nil
}

func (h *DETH) put(b []byte) {
	be.PutUint32(b, h.QKey)
	be.PutUint32(b[4:], h.SrcQP)
}

// Decode reads the header from b; the reserved byte must be zero.
func (h *DETH) Decode(b []byte) error {
	if err := shortCheck("DETH", b, DETHLen); err != nil {
		return err
	}
	if b[4] != 0 {
		return fieldErr("DETH.Reserved", ErrReserved, "%#x", b[4])
	}
	h.QKey = be.Uint32(b)
	h.SrcQP = be.Uint32(b[4:]) & Mask24
	return nil
}

// GSIQKey is the well-known Q_Key of QP1.
const GSIQKey = 0x80010000

// FETH is the FLUSH extended transport header (4 bytes, IBA 1.5): 26
// reserved bits, the selectivity level (bits 5:4) and the placement type
// (bits 3:0).
type FETH struct {
	SelectivityLevel uint8 // 2 bits
	PlacementType    uint8 // 4 bits
}

// Encode writes the header into b[:FETHLen].
func (h *FETH) Encode(b []byte) error {
	if err := bufCheck("FETH", b, FETHLen); err != nil {
		return err
	}
	if h.SelectivityLevel > 3 || h.PlacementType > 15 {
		return fieldErr("FETH", ErrField, "level %d type %d", h.SelectivityLevel, h.PlacementType)
	}
	h.put(b)
	return nil
}

func (h *FETH) put(b []byte) { be.PutUint32(b, uint32(h.SelectivityLevel)<<4|uint32(h.PlacementType)) }

// Decode reads the header from b; the reserved bits must be zero.
func (h *FETH) Decode(b []byte) error {
	if err := shortCheck("FETH", b, FETHLen); err != nil {
		return err
	}
	v := be.Uint32(b)
	if v>>6 != 0 {
		return fieldErr("FETH.Reserved", ErrReserved, "%#x", v>>6)
	}
	h.SelectivityLevel = uint8(v >> 4 & 3)
	h.PlacementType = uint8(v & 15)
	return nil
}

// decode24 reads a header of a reserved byte and a 24-bit field (RDETH's
// EE context, XRCETH's XRC SRQ).
func decode24(b []byte, name string) (uint32, error) {
	if len(b) < 4 {
		return 0, shortErr(name, 4, len(b))
	}
	if b[0] != 0 {
		return 0, fieldErr(name+".Reserved", ErrReserved, "%#x", b[0])
	}
	return be.Uint32(b) & Mask24, nil
}

func encode24(b []byte, name string, v uint32) error {
	if len(b) < 4 {
		return fieldErr(name, ErrBuffer, "need 4 bytes, have %d", len(b))
	}
	if v > Mask24 {
		return fieldErr(name, ErrField, "%#x wider than 24 bits", v)
	}
	be.PutUint32(b, v)
	return nil
}

// hexString formats v for a message.
func hexString(v uint64) string { return "0x" + strconv.FormatUint(v, 16) }
