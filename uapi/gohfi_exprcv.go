package uapi

import "structs"

// gohfi's commands for the receive and send paths that hfi1 reaches through
// mmapped user registers and PIO/SDMA (hfi1's user_regbase, pio_bufbase and
// writev): BAR0 of hfisim is trapped, not mappable, so the head update and
// the send doorbell go through the driver.
const (
	// _IOW(0x1b, 0x50, __u64): the context's receive header queue head
	// (entries consumed by user space), like a store to RcvHdrHead.
	GOHFI_IOCTL_RCVHDR_HEAD = iocW | 8<<_IOC_SIZESHIFT | gohfiType | 0x50
	// _IOWR(0x1b, 0x51, struct gohfi_send): send one packet from the
	// context, eager or expected (to a TID of the destination context).
	GOHFI_IOCTL_SEND = iocRW | SizeofGohfiSend<<_IOC_SIZESHIFT | gohfiType | 0x51
)

// Opcodes of gohfi_send.
const (
	GOHFI_SEND_EAGER    = 1
	GOHFI_SEND_EXPECTED = 2
)

// Flags of gohfi_send.
const (
	// GOHFI_SEND_FLAG_URGENT marks an urgent packet: a receiver whose
	// POLL_TYPE is HFI1_POLL_TYPE_URGENT is woken by these only.
	GOHFI_SEND_FLAG_URGENT = 1 << 0
	// GOHFI_SEND_FLAG_WAIT makes SEND return only once the device has
	// consumed this descriptor and every earlier one of the context (the
	// behaviour of SEND before sends were posted): a fence for a sender
	// that must know its packets have left, waiting on the context's
	// interrupt, not spinning.
	GOHFI_SEND_FLAG_WAIT = 1 << 1
	// GOHFI_SEND_FLAG_SDMA sends from the caller's memory (hfi1's user
	// SDMA): the payload is not copied; the driver DMA-maps the buffer
	// (cached by address range, dropped when the memory is unmapped or
	// changed) and the device reads it there. SEND returns, in reserved,
	// the send's completion number n (1, 2, ... per context); the caller
	// must not change or free the buffer until the events page's
	// GOHFI_EVENTS_SDMA_DONE_OFF word is at least n (or a later send with
	// GOHFI_SEND_FLAG_WAIT returned).
	GOHFI_SEND_FLAG_SDMA = 1 << 2
)

// SizeofGohfiSend is sizeof(struct gohfi_send).
const SizeofGohfiSend = 40

// GohfiSend is struct gohfi_send (docs/abi.md):
//
//	struct gohfi_send {
//		__u8  opcode;      /* GOHFI_SEND_* */
//		__u8  flags;       /* GOHFI_SEND_FLAG_* */
//		__u16 dst_ctxt;    /* destination receive context */
//		__u32 length;      /* payload bytes */
//		__u64 vaddr;       /* user pointer to the payload */
//		__u32 tid;         /* expected: TID of the destination */
//		__u32 tid_offset;  /* expected: byte offset in the TID's buffer */
//		__u64 tag;         /* copied to the receiver's header entry */
//		__u64 reserved;    /* in: 0; out, with GOHFI_SEND_FLAG_SDMA: completion number */
//	};
type GohfiSend struct {
	_         structs.HostLayout
	Opcode    uint8
	Flags     uint8
	DstCtxt   uint16
	Length    uint32
	Vaddr     uint64
	TID       uint32
	TIDOffset uint32
	Tag       uint64
	Reserved  uint64
}

func (*GohfiSend) SizeBytes() int                    { return SizeofGohfiSend }
func (g *GohfiSend) MarshalBytes(dst []byte)         { marshal(dst, g) }
func (g *GohfiSend) UnmarshalBytes(src []byte) error { return unmarshal(src, g) }

// The receive header queue: one entry per packet delivered to (or dropped
// at) the context, written by the device into the queue that user space
// maps read-only (hfi1_base_info.rcvhdr_bufbase; rcvhdrq_cnt entries of
// rcvhdrq_entsize = SizeofGohfiRHQEntry bytes, CTXT_INFO). User space
// consumes entries in order and hands them back with RCVHDR_HEAD. In place
// of hfi1's RHF word and packet header, gohfi's entry is one struct.

// Entry types (gohfi_rhq_entry.type).
const (
	GOHFI_RHF_EAGER    = 1 // payload in eager buffer eager_idx
	GOHFI_RHF_EXPECTED = 2 // payload in the buffer behind tid, at tid_offset
	GOHFI_RHF_ERROR    = 3 // the packet was dropped; err says why
)

// Error flags (gohfi_rhq_entry.err).
const (
	GOHFI_RHF_ERR_TID    = 1 << 0 // TID invalid, out of the context's range or too short
	GOHFI_RHF_ERR_LENGTH = 1 << 1 // payload larger than an eager buffer
	GOHFI_RHF_ERR_DMA    = 1 << 2 // the device could not read the payload (IOMMU fault)
	GOHFI_RHF_ERR_EAGER  = 1 << 3 // no eager buffer free
)

// SizeofGohfiRHQEntry is sizeof(struct gohfi_rhq_entry).
const SizeofGohfiRHQEntry = 32

// GohfiRHQEntry is struct gohfi_rhq_entry (docs/abi.md). seq is the entry's
// 1-based sequence number modulo 2^32, never 0, so user space polls the
// entry at its head in memory: it is new when its seq is the last one
// seen plus one (0 skipped).
//
//	struct gohfi_rhq_entry {
//		__u8  type;        /* GOHFI_RHF_* */
//		__u8  err;         /* GOHFI_RHF_ERR_*, with GOHFI_RHF_ERROR */
//		__u16 src_ctxt;    /* sending context */
//		__u32 length;      /* payload bytes */
//		__u32 eager_idx;   /* GOHFI_RHF_EAGER: eager buffer */
//		__u32 tid;         /* GOHFI_RHF_EXPECTED: TID */
//		__u32 tid_offset;  /* GOHFI_RHF_EXPECTED: offset in the TID's buffer */
//		__u32 seq;
//		__u64 tag;         /* gohfi_send.tag of the sender */
//	};
type GohfiRHQEntry struct {
	_         structs.HostLayout
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

func (*GohfiRHQEntry) SizeBytes() int                    { return SizeofGohfiRHQEntry }
func (g *GohfiRHQEntry) MarshalBytes(dst []byte)         { marshal(dst, g) }
func (g *GohfiRHQEntry) UnmarshalBytes(src []byte) error { return unmarshal(src, g) }

// NextSeq is the sequence number after s of the receive header queue (and
// of the device's CQs and event queue, which number their entries alike):
// 1-based, modulo 2^32, skipping 0.
func NextSeq(s uint32) uint32 {
	if s++; s == 0 {
		s = 1
	}
	return s
}
