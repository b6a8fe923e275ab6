package uapi

import "math/bits"

// TID encoding of expected receive (drivers/infiniband/hw/hfi1/user_exp_rcv.h).
//
// Each __u32 in hfi1_tid_info.tidlist names one programmed RcvArray entry:
//
//	bits  0-10  LEN   pages covered by the entry
//	bits 20-21  CTRL  1 = even entry of a pair, 2 = odd entry
//	bits 22-31  IDX   pair index, relative to the context's expected base
//
// so the entry's index from the expected base is IDX*2 + CTRL - 1.
const (
	EXP_TID_TIDLEN_MASK   = 0x7FF
	EXP_TID_TIDLEN_SHIFT  = 0
	EXP_TID_TIDCTRL_MASK  = 0x3
	EXP_TID_TIDCTRL_SHIFT = 20
	EXP_TID_TIDIDX_MASK   = 0x3FF
	EXP_TID_TIDIDX_SHIFT  = 22
)

// ExpTidField names a TID field for ExpTidSet/ExpTidGet, standing in for the
// token pasting of the C macros EXP_TID_SET(LEN, v) etc.
type ExpTidField uint8

// The three TID fields.
const (
	EXP_TID_LEN ExpTidField = iota
	EXP_TID_CTRL
	EXP_TID_IDX
)

func (f ExpTidField) maskShift() (mask, shift uint32) {
	switch f {
	case EXP_TID_LEN:
		return EXP_TID_TIDLEN_MASK, EXP_TID_TIDLEN_SHIFT
	case EXP_TID_CTRL:
		return EXP_TID_TIDCTRL_MASK, EXP_TID_TIDCTRL_SHIFT
	case EXP_TID_IDX:
		return EXP_TID_TIDIDX_MASK, EXP_TID_TIDIDX_SHIFT
	}
	return 0, 0
}

// ExpTidSet is EXP_TID_SET(field, value): value masked and shifted into place.
func ExpTidSet(field ExpTidField, value uint32) uint32 {
	m, s := field.maskShift()
	return (value & m) << s
}

// ExpTidGet is EXP_TID_GET(tid, field).
func ExpTidGet(tid uint32, field ExpTidField) uint32 {
	m, s := field.maskShift()
	return tid >> s & m
}

// ExpTidReset is EXP_TID_RESET(tid, field, value), returning the new TID.
func ExpTidReset(tid uint32, field ExpTidField, value uint32) uint32 {
	m, s := field.maskShift()
	return tid&^(m<<s) | ExpTidSet(field, value)
}

// CreateTid encodes the TID of RcvArray entry rcventry (relative to the
// context's expected base) covering npages pages, as hfi1's create_tid does.
func CreateTid(rcventry, npages uint32) uint32 {
	pair := rcventry &^ 1
	return ExpTidSet(EXP_TID_IDX, pair>>1) |
		ExpTidSet(EXP_TID_CTRL, 1<<(rcventry-pair)) |
		ExpTidSet(EXP_TID_LEN, npages)
}

// TidRcvEntry decodes a TID into its RcvArray entry (relative to the expected
// base) and page count. ok is false when CTRL is neither 1 nor 2, which the
// driver must reject with EINVAL.
func TidRcvEntry(tid uint32) (rcventry, npages uint32, ok bool) {
	ctrl := ExpTidGet(tid, EXP_TID_CTRL)
	if ctrl != 1 && ctrl != 2 {
		return 0, 0, false
	}
	return ExpTidGet(tid, EXP_TID_IDX)*2 + ctrl - 1, ExpTidGet(tid, EXP_TID_LEN), true
}

// RcvArray geometry and entry format (drivers/infiniband/hw/hfi1/chip_registers.h,
// chip.c hfi1_put_tid, user_exp_rcv.c).
const (
	RCV_ARRAY_RT_ADDR_SHIFT         = 0
	RCV_ARRAY_RT_ADDR_MASK          = 0xFFFFFFFFF // 36 bits of address>>12
	RCV_ARRAY_RT_BUF_SIZE_SHIFT     = 36
	RCV_ARRAY_RT_BUF_SIZE_MASK      = 0xF // bits 36-39 (gohfi's name; hfi1 has no mask macro)
	RCV_ARRAY_RT_WRITE_ENABLE_SMASK = 1 << 63
	RT_ADDR_SHIFT                   = 12 // entries address 4 KiB units

	// RCV_INCREMENT is the RcvArray allocation granule: entries are managed
	// in groups of this many (hfi1's tid_group).
	RCV_INCREMENT = 8
	// MAX_EXPECTED_BUFFER is the most one TID covers (user_exp_rcv.c).
	MAX_EXPECTED_BUFFER = 2048 * 1024
	// MaxTidPages is MAX_EXPECTED_BUFFER in 4 KiB pages.
	MaxTidPages = MAX_EXPECTED_BUFFER >> RT_ADDR_SHIFT
)

// RcvArrayEntry returns the 64-bit RcvArray entry that hfi1_put_tid writes
// for a buffer at DMA address addr of npages 4 KiB pages:
//
//	bits  0-35  addr >> 12
//	bits 36-39  size order = ilog2(npages) + 1 (0 = invalid entry)
//	bit  63     write enable (set on every write, as hfi1_put_tid does)
//
// npages must be a power of two from 1 to MaxTidPages (the driver splits runs
// into such chunks); other values are encoded like ilog2, rounding down.
// npages == 0 gives the invalid entry (PT_INVALID: address and order zero).
// addr must be 4 KiB aligned; its low 12 bits and bits above 47 are dropped.
func RcvArrayEntry(addr uint64, npages uint32) uint64 {
	if npages == 0 {
		return RCV_ARRAY_RT_WRITE_ENABLE_SMASK
	}
	order := uint64(bits.Len32(npages)) // ilog2(npages) + 1
	return RCV_ARRAY_RT_WRITE_ENABLE_SMASK |
		(order&RCV_ARRAY_RT_BUF_SIZE_MASK)<<RCV_ARRAY_RT_BUF_SIZE_SHIFT |
		(addr>>RT_ADDR_SHIFT&RCV_ARRAY_RT_ADDR_MASK)<<RCV_ARRAY_RT_ADDR_SHIFT
}

// RcvArrayEntryDecode is the device's view of an entry: the buffer's DMA
// address and size in pages. valid is false for order 0 (an invalid entry);
// the write-enable bit is ignored.
func RcvArrayEntryDecode(e uint64) (addr uint64, npages uint32, valid bool) {
	order := e >> RCV_ARRAY_RT_BUF_SIZE_SHIFT & RCV_ARRAY_RT_BUF_SIZE_MASK
	if order == 0 {
		return 0, 0, false
	}
	addr = (e >> RCV_ARRAY_RT_ADDR_SHIFT & RCV_ARRAY_RT_ADDR_MASK) << RT_ADDR_SHIFT
	return addr, 1 << (order - 1), true
}
