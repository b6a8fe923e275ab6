package chip

import (
	"encoding/binary"
	"structs"
)

// Send descriptor: one SendDescSize-byte entry of a context's send queue, in
// host memory, read by the device after a doorbell (CtxtSQTail write).
//
//	off  size  field
//	0    1     opcode (Op*)
//	1    1     flags (DescFlag*)
//	2    2     destination context
//	4    4     payload length in bytes
//	8    8     source IOVA of the payload
//	16   4     TID (expected receive: uapi TID encoding) or 0
//	20   4     byte offset into the TID's buffer
//	24   8     user tag, copied to the receiver's header queue entry
//	32   32    reserved, 0
const SendDescSize = 64

// Send descriptor flags.
const (
	// DescFlagIntr asks for the sender context's interrupt once the
	// descriptor is consumed (the payload has been read).
	DescFlagIntr = 1 << 0
	// DescFlagUrgent marks an urgent packet: the receiver's CtxtUrgentCnt
	// counts it once it is delivered (hfi1's urgent receive interrupt,
	// which HFI1_POLL_TYPE_URGENT waits for).
	DescFlagUrgent = 1 << 1
)

// Send opcodes.
const (
	OpEager    = 1 // payload lands in the receiver's next eager buffer
	OpExpected = 2 // payload lands in the buffer behind the receiver's TID
)

// SendDesc is a send descriptor, laid out as the table above.
type SendDesc struct {
	_         structs.HostLayout
	Opcode    uint8
	Flags     uint8
	DstCtxt   uint16
	Length    uint32
	SrcIOVA   uint64
	TID       uint32
	TIDOffset uint32
	Tag       uint64
	_         [32]byte // reserved
}

func (d *SendDesc) Marshal(b []byte)   { marshal(b, d) }
func (d *SendDesc) Unmarshal(b []byte) { unmarshal(b, d) }

// Receive header queue entry: RHQEntrySize bytes written by the device for
// every packet delivered to (or dropped at) a context. Seq is the entry's
// 1-based sequence number modulo 2^32 (never 0), so software can poll the
// entry in memory instead of reading CtxtRHQTail.
//
//	off  size  field
//	0    1     type (RHF*)
//	1    1     error flags (RHFErr*)
//	2    2     source context
//	4    4     payload length
//	8    4     eager buffer index (RHFEager)
//	12   4     TID (RHFExpected)
//	16   4     TID offset (RHFExpected)
//	20   4     sequence number
//	24   8     user tag
const RHQEntrySize = 32

// Receive header queue lengths (CtxtRHQEntries) are powers of two from
// MinRHQEntries to the device's RegRHQMaxEntries. The driver accepts a
// RegRHQMaxEntries from MinRHQEntries to MaxRHQEntries: a queue's length
// reaches user space in CTXT_INFO's 16-bit rcvhdrq_cnt and egrtids (one
// eager buffer per entry), and 1<<15 is the largest power of two that fits.
const (
	MinRHQEntries = 2
	MaxRHQEntries = 1 << 15
)

// RHQ entry types.
const (
	RHFEager    = 1
	RHFExpected = 2
	RHFError    = 3 // the packet was dropped; see the error flags
)

// RHQ entry error flags.
const (
	RHFErrTID    = 1 << 0 // TID invalid, out of the context's range or too short
	RHFErrLength = 1 << 1 // payload larger than an eager buffer
	RHFErrDMA    = 1 << 2 // the device could not read the payload (IOMMU fault)
	RHFErrEager  = 1 << 3 // no eager buffer free
)

// RHQEntry is a decoded receive header queue entry.
type RHQEntry struct {
	Type      uint8
	Err       uint8
	SrcCtxt   uint16
	Length    uint32
	EagerIdx  uint32
	TID       uint32
	TIDOffset uint32
	Seq       uint32
	Tag       uint64
}

// Marshal encodes e into b, which must hold RHQEntrySize bytes.
func (e *RHQEntry) Marshal(b []byte) {
	_ = b[RHQEntrySize-1]
	b[0] = e.Type
	b[1] = e.Err
	binary.LittleEndian.PutUint16(b[2:], e.SrcCtxt)
	binary.LittleEndian.PutUint32(b[4:], e.Length)
	binary.LittleEndian.PutUint32(b[8:], e.EagerIdx)
	binary.LittleEndian.PutUint32(b[12:], e.TID)
	binary.LittleEndian.PutUint32(b[16:], e.TIDOffset)
	binary.LittleEndian.PutUint32(b[20:], e.Seq)
	binary.LittleEndian.PutUint64(b[24:], e.Tag)
}

// Unmarshal decodes b, which must hold RHQEntrySize bytes.
func (e *RHQEntry) Unmarshal(b []byte) {
	_ = b[RHQEntrySize-1]
	e.Type = b[0]
	e.Err = b[1]
	e.SrcCtxt = binary.LittleEndian.Uint16(b[2:])
	e.Length = binary.LittleEndian.Uint32(b[4:])
	e.EagerIdx = binary.LittleEndian.Uint32(b[8:])
	e.TID = binary.LittleEndian.Uint32(b[12:])
	e.TIDOffset = binary.LittleEndian.Uint32(b[16:])
	e.Seq = binary.LittleEndian.Uint32(b[20:])
	e.Tag = binary.LittleEndian.Uint64(b[24:])
}
