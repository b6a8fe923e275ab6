package chip

// Fast registration (RegCapFlags CapMemMgtExtensions): memory regions that
// the driver allocates once (an MPT entry of type MPTTypeFastReg with its own
// run of MTT entries, state FREE) and that FAST_REG_MR work requests bind to
// a page list and LOCAL_INV, SEND_WITH_INV and RDMA_READ_WITH_INV work
// requests invalidate, all executed by the device in send-queue order.
// docs/hfisim.md, "Fast registration", is the datasheet.

// RegMaxFastRegPages (BAR0, RO, with CapMemMgtExtensions): the longest page
// list one FAST_REG_MR may bind (max_fast_reg_page_list_len), a power of two.
const RegMaxFastRegPages = 0x0b8

// MaxFastRegPages is the largest RegMaxFastRegPages a device may report: an
// MR's MTT run is 1 << MPTLogMTT entries, 4 bits of log.
const MaxFastRegPages = 1 << 15

// MPT flags fields beyond state, access and type.
//
//	bits 20-23  log2 of the MR's MTT entries (fast-reg MRs: written by the
//	            driver at allocation; the page-list capacity the device
//	            enforces)
//	bits 24-28  page shift - 12 of the region's MTT entries (0: 4 KiB pages;
//	            fast-reg MRs: written by FAST_REG_MR)
//
// A virtual address va of a region with page shift s translates to MTT
// entry first + (va - iova&^(1<<s-1)) >> s, offset va & (1<<s-1) from the
// entry's address.
const (
	MPTLogMTTShift    = 20
	MPTLogMTTMask     = 0xf << MPTLogMTTShift
	MPTPageShiftShift = 24
	MPTPageShiftMask  = 0x1f << MPTPageShiftShift

	// Page shifts FAST_REG_MR accepts: 4 KiB to 2 MiB pages.
	FastRegMinPageShift = 12
	FastRegMaxPageShift = 21
)

// PageShift is the page shift of an MPT entry's MTT entries.
func (e *MPTEntry) PageShift() uint {
	return 12 + uint(e.Flags&MPTPageShiftMask>>MPTPageShiftShift)
}

// Send WQE bytes 108-127 (after the fast-registration fields) are reserved
// and must be 0 in a FAST_REG_MR WQE.
const WQEFastRegReservedOff, WQEFastRegReservedEnd = 108, 128

// Vendor error of a local operation on a region that is not a fast-reg MR
// (LOCAL_INV, SEND_WITH_INV or READ_WITH_INV of a pinned MR, FAST_REG_MR
// of one).
const VendorErrMRType = 13
