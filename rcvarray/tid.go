package rcvarray

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// TID fields (hfi1_user.h EXP_TID_*): LEN is the number of pages, CTRL says
// which entry of a pair (1 even, 2 odd), IDX is the pair index relative to the
// context's expected base. Bits 11-19 are reserved.
//
// TODO(uapi): these mirror the uapi package's TID encoding; switch to it once
// uapi exports the fields.
const (
	TIDLenShift  = 0
	TIDLenMask   = 0x7ff
	TIDCtrlShift = 20
	TIDCtrlMask  = 0x3
	TIDIdxShift  = 22
	TIDIdxMask   = 0x3ff

	// MaxTIDEntries is the number of entries a TID can name (1024 pairs).
	MaxTIDEntries = (TIDIdxMask + 1) * 2

	tidReserved = ^uint32(TIDLenMask<<TIDLenShift | TIDCtrlMask<<TIDCtrlShift | TIDIdxMask<<TIDIdxShift)
)

// EncodeTID returns the TID of entry rel (relative to the context's expected
// base) covering npages pages (rcventry2tidinfo | EXP_TID_SET(LEN, npages)).
// It panics when rel or npages do not fit the fields: callers pass entries
// from their Allocator and page counts from SplitPages, so that is a bug.
func EncodeTID(rel, npages int) uint32 {
	if rel < 0 || rel >= MaxTIDEntries || npages < 1 || npages > TIDLenMask {
		panic(fmt.Sprintf("rcvarray: EncodeTID(%d, %d): out of range", rel, npages))
	}
	pair := uint32(rel) >> 1
	ctrl := uint32(1) << (uint32(rel) & 1)
	return pair<<TIDIdxShift | ctrl<<TIDCtrlShift | uint32(npages)<<TIDLenShift
}

// DecodeTID returns the relative entry and page count a TID names. It fails
// with EINVAL when CTRL is not 1 or 2, LEN is 0 or reserved bits are set: a
// TID the driver never handed out.
func DecodeTID(tid uint32) (rel, npages int, err error) {
	ctrl := tid >> TIDCtrlShift & TIDCtrlMask
	npages = int(tid >> TIDLenShift & TIDLenMask)
	switch {
	case ctrl != 1 && ctrl != 2:
		return 0, 0, fmt.Errorf("rcvarray: TID %#x: ctrl %d: %w", tid, ctrl, unix.EINVAL)
	case npages == 0:
		return 0, 0, fmt.Errorf("rcvarray: TID %#x: zero length: %w", tid, unix.EINVAL)
	case tid&tidReserved != 0:
		return 0, 0, fmt.Errorf("rcvarray: TID %#x: reserved bits set: %w", tid, unix.EINVAL)
	}
	rel = int(tid>>TIDIdxShift&TIDIdxMask)*2 + int(ctrl) - 1
	return rel, npages, nil
}

// CheckTID decodes tid and checks that it names one of count entries of a
// context (the test unprogram_rcvarray makes before touching anything).
func CheckTID(tid uint32, count int) (rel, npages int, err error) {
	rel, npages, err = DecodeTID(tid)
	if err != nil {
		return 0, 0, err
	}
	if rel >= count {
		return 0, 0, fmt.Errorf("rcvarray: TID %#x: entry %d beyond the context's %d: %w",
			tid, rel, count, unix.EINVAL)
	}
	return rel, npages, nil
}
