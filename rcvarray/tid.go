package rcvarray

import (
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/uapi"
)

// TID fields come from uapi (EXP_TID_*): LEN is the number of pages, CTRL
// says which entry of a pair (1 even, 2 odd), IDX is the pair index relative
// to the context's expected base. The other bits are reserved. A TID covers
// at most chip.MaxTIDPages pages (hfi1's MAX_EXPECTED_BUFFER).
const (
	// MaxTIDEntries is the number of entries a TID can name (1024 pairs).
	MaxTIDEntries = (uapi.EXP_TID_TIDIDX_MASK + 1) * 2

	tidReserved = ^uint32(uapi.EXP_TID_TIDLEN_MASK<<uapi.EXP_TID_TIDLEN_SHIFT |
		uapi.EXP_TID_TIDCTRL_MASK<<uapi.EXP_TID_TIDCTRL_SHIFT |
		uapi.EXP_TID_TIDIDX_MASK<<uapi.EXP_TID_TIDIDX_SHIFT)
)

// EncodeTID returns the TID of entry rel (relative to the context's expected
// base) covering npages pages (rcventry2tidinfo | EXP_TID_SET(LEN, npages)).
// It panics when rel or npages do not fit the fields: callers pass entries
// from their Allocator and page counts from SplitPages, so that is a bug.
func EncodeTID(rel, npages int) uint32 {
	if rel < 0 || rel >= MaxTIDEntries || npages < 1 || npages > uapi.EXP_TID_TIDLEN_MASK {
		panic(fmt.Sprintf("rcvarray: EncodeTID(%d, %d): out of range", rel, npages))
	}
	return uapi.CreateTid(uint32(rel), uint32(npages))
}

// DecodeTID returns the relative entry and page count a TID names. It fails
// with EINVAL when CTRL is not 1 or 2, LEN is 0 or reserved bits are set: a
// TID the driver never handed out.
func DecodeTID(tid uint32) (rel, npages int, err error) {
	r, n, ok := uapi.TidRcvEntry(tid)
	switch {
	case !ok:
		return 0, 0, fmt.Errorf("rcvarray: TID %#x: ctrl %d: %w",
			tid, uapi.ExpTidGet(tid, uapi.EXP_TID_CTRL), unix.EINVAL)
	case n == 0:
		return 0, 0, fmt.Errorf("rcvarray: TID %#x: zero length: %w", tid, unix.EINVAL)
	case tid&tidReserved != 0:
		return 0, 0, fmt.Errorf("rcvarray: TID %#x: reserved bits set: %w", tid, unix.EINVAL)
	}
	return int(r), int(n), nil
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
