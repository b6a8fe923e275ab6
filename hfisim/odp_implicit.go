package hfisim

import "github.com/gohfi/gohfi/chip"

// Implicit ODP (chip.CapImplicitODP, chip/odp_implicit.go): an MPT entry of
// type MPTTypeImplicit translates through its child directory, a run of
// MTT entries each naming the MTT run of a 1 GiB child or nothing. A
// missing child is a page fault with the implicit MR's key, as a missing
// page of an MPTTypeODP region.

// translateImplicitLocked is translateLocked for an implicit region: each
// piece of [va, va+n) within one child goes through the child's directory
// entry (cached in the TLB like any MTT entry) and then the child's MTT run,
// as an MPTTypeODP region of 1 GiB at the child's address.
func (d *Device) translateImplicitLocked(e *chip.MPTEntry, va, n, perm uint64, out []span) ([]span, uint32) {
	for n > 0 {
		child, verr := d.implicitChildLocked(e, va, true)
		if verr == chip.VendorErrPageFault {
			d.odp.last = faultAddr{key: e.Key, va: va, write: perm&chip.MTTWrite != 0}
		}
		if verr != chip.VendorErrNone {
			return out, verr
		}
		k := min(n, child.IOVA+chip.ImplicitChildSize-va)
		if out, verr = d.translateLocked(&child, va, k, perm, out); verr != chip.VendorErrNone {
			return out, verr
		}
		va, n = va+k, n-k
	}
	return out, chip.VendorErrNone
}

// implicitChildLocked returns the region of the child of implicit region e
// that holds va: VendorErrBounds at or above 2^ImplicitVABits,
// VendorErrPageFault if the directory has no child there, VendorErrDMA if
// the directory or the child's run lies outside the MTT. With cache the
// directory entry is read through the TLB (and cached), else read from the
// MTT or the TLB without caching (PeekMR).
func (d *Device) implicitChildLocked(e *chip.MPTEntry, va uint64, cache bool) (chip.MPTEntry, uint32) {
	c := va >> chip.ImplicitChildShift
	if c >= chip.ImplicitDirEntries {
		return chip.MPTEntry{}, chip.VendorErrBounds
	}
	idx := uint64(e.MTTFirst) + c
	if idx >= uint64(d.cfg.MTTEntries) {
		return chip.MPTEntry{}, chip.VendorErrDMA
	}
	var de uint64
	if cache {
		de = d.tlbLookupLocked(uint32(idx))
	} else if ent, ok := d.tlb.get(uint32(idx)); ok {
		de = ent
	} else {
		de = d.mtt.load64(idx * chip.MTTEntrySize)
	}
	if de&chip.MTTPresent == 0 {
		return chip.MPTEntry{}, chip.VendorErrPageFault
	}
	first := chip.ImplicitChildMTT(de)
	if uint64(first)+chip.ImplicitChildPages > uint64(d.cfg.MTTEntries) {
		return chip.MPTEntry{}, chip.VendorErrDMA
	}
	return chip.MPTEntry{
		Key: e.Key, PD: e.PD, Flags: chip.MPTStateValid | e.Flags&(0xff<<chip.MPTAccessShift) | chip.MPTTypeODP,
		MTTFirst: first, IOVA: c << chip.ImplicitChildShift, Length: chip.ImplicitChildSize,
	}, chip.VendorErrNone
}
