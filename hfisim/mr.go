package hfisim

import (
	"math"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
)

// Memory regions: the memory protection table (MPT) in BAR4 after the MTT,
// and the device TLB that caches MTT translations. MPT entries are read for
// every packet and never cached; MTT entries are cached on first use and
// leave the TLB through a TLB-invalidate command, a reset, or another entry
// taking their slot (tlb.go), so a driver that changes an MTT entry without
// flushing may keep the old translation.

// span is a piece of a transfer in IOVA space.
type span struct {
	iova uint64
	n    int
}

// mptEntry reads MPT entry idx from BAR4. Word 1 (state, access, MTT range)
// is read before and after the others; if it changed, the driver is
// rewriting the entry and the device sees it as not valid.
func (d *Device) mptEntry(idx uint32) chip.MPTEntry {
	off := d.mptOff + uint64(idx)*chip.MPTEntrySize
	w1 := d.mtt.load64(off + 8)
	w0 := d.mtt.load64(off)
	iova := d.mtt.load64(off + 16)
	length := d.mtt.load64(off + 24)
	if d.mtt.load64(off+8) != w1 {
		return chip.MPTEntry{}
	}
	return chip.MPTEntry{
		Key: uint32(w0), PD: uint32(w0 >> 32),
		Flags: uint32(w1), MTTFirst: uint32(w1 >> 32),
		IOVA: iova, Length: length,
	}
}

// checkKey is the protection check of one access: n > 0 bytes at address va
// through key, by a QP of protection domain pd, needing the IB_ACCESS_* bits
// in need (0 for a local read, which every region allows) from both the
// region and allow (the responder QP's QPAccess; all ones for local
// accesses). It returns the entry, or the chip.VendorErr* of the first check
// that failed, in this order: key index, state, key (variant byte), PD,
// access, bounds.
func (d *Device) checkKey(key, pd uint32, va, n uint64, need, allow uint32) (chip.MPTEntry, uint32) {
	idx := chip.MPTIndex(key)
	if idx >= uint32(d.cfg.MPTEntries) {
		return chip.MPTEntry{}, chip.VendorErrKey
	}
	e := d.mptEntry(idx)
	switch {
	case e.Flags&chip.MPTStateMask != chip.MPTStateValid:
		return e, chip.VendorErrState
	case e.Key != key:
		return e, chip.VendorErrKey
	case e.PD != pd:
		return e, chip.VendorErrPD
	case (e.Flags>>chip.MPTAccessShift)&allow&need != need:
		return e, chip.VendorErrAccess
	case va < e.IOVA || n > e.Length || va-e.IOVA > e.Length-n:
		return e, chip.VendorErrBounds
	}
	return e, chip.VendorErrNone
}

// translateLocked turns n bytes at va of region e into IOVA spans through
// the TLB and the MTT (one entry per page of the entry's page shift; an
// implicit ODP region through its child directory, odp_implicit.go),
// appending to out. Every page must be present and
// have the perm bits (chip.MTTRead, chip.MTTWrite or both); a page the
// device cannot translate is chip.VendorErrDMA.
func (d *Device) translateLocked(e *chip.MPTEntry, va, n, perm uint64, out []span) ([]span, uint32) {
	if e.Flags&chip.MPTTypeMask == chip.MPTTypeImplicit {
		return d.translateImplicitLocked(e, va, n, perm, out)
	}
	perm |= chip.MTTPresent
	shift := e.PageShift()
	pageMask := uint64(1)<<shift - 1
	base := e.IOVA &^ pageMask
	for n > 0 {
		idx := uint64(e.MTTFirst) + (va-base)>>shift
		if idx >= uint64(d.cfg.MTTEntries) {
			return out, chip.VendorErrDMA
		}
		ent := d.tlbLookupLocked(uint32(idx))
		if ent&perm != perm {
			if e.Flags&chip.MPTTypeMask == chip.MPTTypeODP {
				// Not present, or read-only for a write: a page
				// fault for the engine to raise (odp.go).
				d.odp.last = faultAddr{key: e.Key, va: va, write: perm&chip.MTTWrite != 0}
				return out, chip.VendorErrPageFault
			}
			return out, chip.VendorErrDMA
		}
		pageOff := va & pageMask
		k := min(n, pageMask+1-pageOff)
		iova := ent&chip.MTTAddrMask + pageOff
		if l := len(out); l > 0 && out[l-1].iova+uint64(out[l-1].n) == iova {
			out[l-1].n += int(k)
		} else {
			out = append(out, span{iova, int(k)})
		}
		va += k
		n -= k
	}
	return out, chip.VendorErrNone
}

// tlbLookupLocked returns the translation of MTT entry idx, from the TLB if
// cached, else from the MTT (caching it if present).
func (d *Device) tlbLookupLocked(idx uint32) uint64 {
	if ent, ok := d.tlb.get(idx); ok {
		d.errs.tlbHits++
		return ent
	}
	d.errs.tlbMiss++
	ent := d.mtt.load64(uint64(idx) * chip.MTTEntrySize)
	if ent&chip.MTTPresent == 0 {
		return ent // absent pages are not cached
	}
	d.tlb.put(idx, ent)
	return ent
}

// tlbFlushLocked completes an MTT translation-cache invalidation of count
// entries from start: the next use of each reads the MTT again.
func (d *Device) tlbFlushLocked(start, count uint64) {
	d.tlbDropLocked(start, count)
	d.tlbDone++
}

// tlbDropLocked forgets the cached translations of count MTT entries from
// start (a flush command, or the device's own MTT writes by FAST_REG_MR).
func (d *Device) tlbDropLocked(start, count uint64) {
	end := start + count
	if end < start {
		end = ^uint64(0)
	}
	d.tlb.drop(start, min(end, math.MaxUint32+1))
}

// resolveLocked checks and translates n bytes at va through key for a QP
// of protection domain pd (checkKey, then translateLocked). Zero bytes need
// no key.
func (d *Device) resolveLocked(key, pd uint32, va, n uint64, need, allow uint32, perm uint64, out []span) ([]span, uint32) {
	if n == 0 {
		return out, chip.VendorErrNone
	}
	e, verr := d.checkKey(key, pd, va, n, need, allow)
	if verr != chip.VendorErrNone {
		return out, verr
	}
	return d.translateLocked(&e, va, n, perm, out)
}

// resolveSGEsLocked resolves bytes [off, off+n) of the message an SGE list
// describes. write: the device writes the local memory (LOCAL_WRITE needed).
// It returns chip.VendorErrLength if the list is shorter than off+n.
func (d *Device) resolveSGEsLocked(sges []chip.SGE, pd uint32, off, n uint64, write bool, out []span) ([]span, uint32) {
	var need uint32
	perm := uint64(chip.MTTRead)
	if write {
		need, perm = uapi.IB_ACCESS_LOCAL_WRITE, chip.MTTWrite
	}
	for _, g := range sges {
		if n == 0 {
			break
		}
		l := uint64(g.Length)
		if off >= l {
			off -= l
			continue
		}
		k := min(n, l-off)
		var verr uint32
		if out, verr = d.resolveLocked(g.Lkey, pd, g.Addr+off, k, need, ^uint32(0), perm, out); verr != chip.VendorErrNone {
			return out, verr
		}
		off, n = 0, n-k
	}
	if n != 0 {
		return out, chip.VendorErrLength
	}
	return out, chip.VendorErrNone
}
