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
//		__u64 reserved;
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
