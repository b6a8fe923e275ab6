package chip

import "structs"

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
	// DescFlagIntrIdle asks for the sender context's interrupt once the
	// send queue is empty (by the tail the device last took) after this
	// descriptor or a later one is consumed, or with the next DescFlagIntr:
	// completions that nobody waits for are reported together, in one
	// interrupt, when the device runs out of work.
	DescFlagIntrIdle = 1 << 2
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

// Receive header queue: the entry is uapi.GohfiRHQEntry (user space maps
// the queue and reads it; docs/abi.md). Queue lengths (CtxtRHQEntries) are powers of two from
// MinRHQEntries to the device's RegRHQMaxEntries. The driver accepts a
// RegRHQMaxEntries from MinRHQEntries to MaxRHQEntries: a queue's length
// reaches user space in CTXT_INFO's 16-bit rcvhdrq_cnt and egrtids (one
// eager buffer per entry), and 1<<15 is the largest power of two that fits.
const (
	MinRHQEntries = 2
	MaxRHQEntries = 1 << 15
)
