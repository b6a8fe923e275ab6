package hfisim

import (
	"encoding/binary"
	"testing"

	"github.com/gohfi/gohfi/chip"
)

// TestImplicitTranslation: an MPTTypeImplicit region translates through its
// child directory: a missing child and a missing page of a child are page
// faults with the region's key and the address (write or not); present
// pages translate through the child's MTT run, an access across two
// children in pieces; at or above 2^47 the access is out of bounds, and a
// directory entry naming a run past the MTT is a DMA error.
func TestImplicitTranslation(t *testing.T) {
	cfg := DefaultConfig()
	cfg.MTTEntries = chip.ImplicitDirEntries + 2*chip.ImplicitChildPages
	cfg.MPTEntries = 16
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	put := func(i uint64, v uint64) {
		var b [8]byte
		binary.LittleEndian.PutUint64(b[:], v)
		if err := d.RegionWrite(chip.MTTBar, i*chip.MTTEntrySize, b[:]); err != nil {
			t.Fatal(err)
		}
	}
	e := chip.MPTEntry{Key: 3<<8 | 7, PD: 1, Flags: chip.MPTStateValid | chip.MPTTypeImplicit, MTTFirst: 0, IOVA: 0, Length: chip.ImplicitLength}
	const c0 = 0x7f12                                                         // a child index of user space
	va := uint64(c0)<<chip.ImplicitChildShift + chip.ImplicitChildSize - 4096 // the last page of child c0
	translate := func(va, n, perm uint64) ([]span, uint32, faultAddr) {
		d.mu.Lock()
		defer d.mu.Unlock()
		d.odp.last = faultAddr{}
		out, verr := d.translateLocked(&e, va, n, perm, nil)
		return out, verr, d.odp.last
	}
	if _, verr, fa := translate(va, 8, chip.MTTWrite); verr != chip.VendorErrPageFault || fa != (faultAddr{e.Key, va, true}) {
		t.Fatalf("no child: verr %d, fault %+v", verr, fa)
	}
	child0 := uint64(chip.ImplicitDirEntries)
	put(c0, chip.ImplicitDirEntry(uint32(child0)))
	if _, verr, fa := translate(va, 8, chip.MTTRead); verr != chip.VendorErrPageFault || fa != (faultAddr{e.Key, va, false}) {
		t.Fatalf("child without the page: verr %d, fault %+v", verr, fa)
	}
	put(child0+chip.ImplicitChildPages-1, 0xabc000|chip.MTTPresent|chip.MTTRead|chip.MTTWrite)
	out, verr, _ := translate(va+16, 64, chip.MTTWrite)
	if verr != chip.VendorErrNone || len(out) != 1 || out[0] != (span{0xabc010, 64}) {
		t.Fatalf("present page: %v, verr %d", out, verr)
	}
	// Across into child c0+1, which has no entry yet.
	next := uint64(c0+1) << chip.ImplicitChildShift
	if _, verr, fa := translate(va, 8192, chip.MTTRead); verr != chip.VendorErrPageFault || fa.va != next {
		t.Fatalf("across into a missing child: verr %d, fault %+v", verr, fa)
	}
	child1 := child0 + chip.ImplicitChildPages
	put(c0+1, chip.ImplicitDirEntry(uint32(child1)))
	put(child1, 0xdef000|chip.MTTPresent|chip.MTTRead)
	out, verr, _ = translate(va, 8192, chip.MTTRead)
	if verr != chip.VendorErrNone || len(out) != 2 || out[0] != (span{0xabc000, 4096}) || out[1] != (span{0xdef000, 4096}) {
		t.Fatalf("across two children: %v, verr %d", out, verr)
	}
	// A write to child c0+1's read-only page faults.
	if _, verr, fa := translate(next, 8, chip.MTTWrite); verr != chip.VendorErrPageFault || fa != (faultAddr{e.Key, next, true}) {
		t.Fatalf("write to a read-only page: verr %d, fault %+v", verr, fa)
	}
	if _, verr, _ := translate(1<<chip.ImplicitVABits, 8, chip.MTTRead); verr != chip.VendorErrBounds {
		t.Fatalf("at 2^47: verr %d, want bounds", verr)
	}
	put(c0, chip.ImplicitDirEntry(uint32(cfg.MTTEntries-8)))
	d.mu.Lock()
	d.tlbDropLocked(0, uint64(cfg.MTTEntries))
	d.mu.Unlock()
	if _, verr, _ := translate(va, 8, chip.MTTRead); verr != chip.VendorErrDMA {
		t.Fatalf("a child run past the MTT: verr %d, want DMA", verr)
	}
}
