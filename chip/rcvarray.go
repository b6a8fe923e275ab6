package chip

import (
	"math/bits"

	"github.com/gohfi/gohfi/uapi"
)

// RcvArray: one 64-bit entry per TID, in groups of RcvArrayGroupSize (hfi1's
// tid_group of RCV_INCREMENT entries), written by the driver and read by the
// device, in the format hfi1_put_tid writes (RcvArrayEntry encodes it,
// RcvArrayEntryDecode is the device's view): the IOVA >> 12 and a size
// order (0 = invalid, order k covers 2^(k-1) pages).
const (
	RcvArrayEntrySize = 8
	RcvArrayGroupSize = 8
	RcvArrayPageShift = 12 // hfi1's RT_ADDR_SHIFT: entries address 4 KiB units
	// MaxRcvArrayPerCtxt: a TID names its entry by a 10-bit pair index,
	// so a context can use at most 2048 entries (RegRcvArrayPerCtxt must
	// be a multiple of RcvArrayGroupSize from RcvArrayGroupSize to this).
	MaxRcvArrayPerCtxt = 2 * (uapi.EXP_TID_TIDIDX_MASK + 1)
)

// Entry fields (drivers/infiniband/hw/hfi1/chip_registers.h).
const (
	RCV_ARRAY_RT_ADDR_SHIFT         = 0
	RCV_ARRAY_RT_ADDR_MASK          = 0xFFFFFFFFF // 36 bits of address>>12
	RCV_ARRAY_RT_BUF_SIZE_SHIFT     = 36
	RCV_ARRAY_RT_BUF_SIZE_MASK      = 0xF // bits 36-39 (gohfi's name; hfi1 has no mask macro)
	RCV_ARRAY_RT_WRITE_ENABLE_SMASK = 1 << 63
)

const (
	// MAX_EXPECTED_BUFFER is the most one entry (one TID) covers, as in
	// hfi1's user_exp_rcv.c.
	MAX_EXPECTED_BUFFER = 2048 * 1024

	// MaxTIDPages is MAX_EXPECTED_BUFFER in pages: the most pages one TID
	// may cover, and so the largest page-set size (a power of two) the
	// driver accepts from a device's MaxTIDPages register, the domain of
	// RcvArrayEntry. It fits the 11-bit LEN field of a TID (at most 2047
	// pages; the largest power of two there is 1024) and the 4-bit size
	// order of an entry (2^14 pages).
	MaxTIDPages = MAX_EXPECTED_BUFFER >> RcvArrayPageShift
)

// MaxTIDPages fits a TID's LEN (compile-time check: a negative array length
// does not compile).
var _ [uapi.EXP_TID_TIDLEN_MASK - MaxTIDPages]struct{}

// RcvArrayEntry returns the 64-bit RcvArray entry that hfi1_put_tid writes
// for a buffer at DMA address addr of npages 4 KiB pages:
//
//	bits  0-35  addr >> 12
//	bits 36-39  size order = ilog2(npages) + 1 (0 = invalid entry)
//	bit  63     write enable (set on every write, as hfi1_put_tid does)
//
// npages must be a power of two from 1 to MaxTIDPages (the driver splits runs
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
		(addr>>RcvArrayPageShift&RCV_ARRAY_RT_ADDR_MASK)<<RCV_ARRAY_RT_ADDR_SHIFT
}

// RcvArrayEntryDecode is the device's view of an entry: the buffer's DMA
// address and size in pages. valid is false for order 0 (an invalid entry);
// the write-enable bit is ignored.
func RcvArrayEntryDecode(e uint64) (addr uint64, npages uint32, valid bool) {
	order := e >> RCV_ARRAY_RT_BUF_SIZE_SHIFT & RCV_ARRAY_RT_BUF_SIZE_MASK
	if order == 0 {
		return 0, 0, false
	}
	addr = (e >> RCV_ARRAY_RT_ADDR_SHIFT & RCV_ARRAY_RT_ADDR_MASK) << RcvArrayPageShift
	return addr, 1 << (order - 1), true
}
