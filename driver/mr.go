package driver

import (
	"errors"
	"fmt"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/dma"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/userfault"
	"github.com/gohfi/gohfi/vfio"
	"golang.org/x/sys/unix"
)

// MR is a pinned memory region (ib_mr): its pages pinned and DMA-mapped,
// one MTT entry per page, one MPT entry naming them under its key.
type MR struct {
	pd     *PD
	handle uint32
	index  uint32 // MPT index
	key    uint32 // lkey and rkey: index << 8 | variant

	addr   uintptr // start of the user range
	length uint64
	iova   uint64 // address keys name the region by
	access uint32

	mttFirst int
	npages   int
	chunks   []mrChunk
	odp      *odpMR // ODP MR (IB_ACCESS_ON_DEMAND): pages mapped on fault, nothing in chunks
}

// mrChunk is one pin of an MR and the IOVA range it is mapped at. An MR
// larger than dma.MaxPinSize has several.
type mrChunk struct {
	vaddr uintptr
	size  uint64
	pin   *dma.Pin
	iova  uint64 // 0: not mapped
}

// Handle, Lkey and Rkey identify the MR (lkey and rkey are one key).
func (mr *MR) Handle() uint32 { return mr.handle }
func (mr *MR) Lkey() uint32   { return mr.key }
func (mr *MR) Rkey() uint32   { return mr.key }

// PagesPinned is how many pages the MR holds pinned.
func (mr *MR) PagesPinned() int {
	if mr.odp != nil {
		return mr.odp.pagesPinned()
	}
	n := 0
	for _, c := range mr.chunks {
		if c.pin != nil {
			n += c.pin.Pages()
		}
	}
	return n
}

// Access flags REG_MR accepts; IB_ACCESS_ON_DEMAND needs a device with
// chip.CapODP (EOPNOTSUPP otherwise).
const (
	mrAccessKnown = uapi.IB_ACCESS_LOCAL_WRITE | uapi.IB_ACCESS_REMOTE_WRITE |
		uapi.IB_ACCESS_REMOTE_READ | uapi.IB_ACCESS_REMOTE_ATOMIC | uapi.IB_ACCESS_ON_DEMAND
	mrAccessDeviceWrites = uapi.IB_ACCESS_LOCAL_WRITE | uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_ATOMIC
)

// dmaFlags are the DMA mapping flags of an MR with access: the device
// writes its pages only if the access lets it.
func dmaFlags(access uint32) uint32 {
	if access&mrAccessDeviceWrites != 0 {
		return vfio.DMARead | vfio.DMAWrite
	}
	return vfio.DMARead
}

// mttFlags are the flags of the present MTT entries of an MR with access.
func mttFlags(access uint32) uint64 {
	if access&mrAccessDeviceWrites != 0 {
		return chip.MTTPresent | chip.MTTRead | chip.MTTWrite
	}
	return chip.MTTPresent | chip.MTTRead
}

// RegMR registers [addr, addr+length) for the device at address iova with
// IB_ACCESS_* rights (ib_reg_user_mr): every page pinned and DMA-mapped,
// MTT entries written, then the MPT entry made valid. As TID_UPDATE, the
// pinning and mapping run without the file's verbs lock. Errors: EINVAL
// (access, length, iova), EOPNOTSUPP (ODP), EFAULT (not user memory, not
// mapped, not accessible), ENOMEM (RLIMIT_MEMLOCK), ENOSPC (no free MPT
// entry or MTT run). A failure leaves nothing pinned, mapped or written.
// With IB_ACCESS_ON_DEMAND nothing is pinned or mapped: the MTT entries stay
// not present and the range is watched (odp.go); EFAULT then means the
// range is not mapped or cannot be watched. Address 0 with length
// UINT64_MAX is the whole address space, an implicit ODP MR (regImplicit);
// either alone is EINVAL.
func (pd *PD) RegMR(addr uintptr, length, iova uint64, access uint32) (*MR, error) {
	v, d := pd.v, pd.d
	switch {
	case access&^mrAccessKnown != 0:
		return nil, errnoErr(fmt.Sprintf("REG_MR: unknown access bits %#x", access&^mrAccessKnown), unix.EINVAL)
	case access&(uapi.IB_ACCESS_REMOTE_WRITE|uapi.IB_ACCESS_REMOTE_ATOMIC) != 0 && access&uapi.IB_ACCESS_LOCAL_WRITE == 0:
		return nil, errnoErr("REG_MR: remote write or atomic access needs IB_ACCESS_LOCAL_WRITE", unix.EINVAL)
	case addr == 0 || length == chip.ImplicitLength:
		return pd.regImplicit(addr, length, iova, access) // implicit ODP (odp_implicit.go)
	case length == 0:
		return nil, errnoErr("REG_MR: zero length", unix.EINVAL)
	case iova&(pageSize-1) != uint64(addr)&(pageSize-1):
		return nil, errnoErr(fmt.Sprintf("REG_MR: iova %#x and addr %#x differ in their page offset", iova, addr), unix.EINVAL)
	case iova+length < iova:
		return nil, errnoErr(fmt.Sprintf("REG_MR: iova %#x + %d wraps", iova, length), unix.EINVAL)
	case uint64(addr)+length < uint64(addr) || !userRange(addr, uintptr(length)):
		return nil, errnoErr(fmt.Sprintf("REG_MR: %#x+%d is not a user address range", addr, length), unix.EFAULT)
	}
	start := addr &^ (pageSize - 1)
	end := (uint64(addr) + length + pageSize - 1) &^ (pageSize - 1)
	npages := int((end - uint64(start)) / pageSize)
	if npages > d.info.MTTEntries {
		return nil, errnoErr(fmt.Sprintf("REG_MR: %d pages, the MTT has %d entries", npages, d.info.MTTEntries), unix.EINVAL)
	}
	mr := &MR{pd: pd, addr: addr, length: length, iova: iova, access: access, npages: npages, mttFirst: -1}
	var err error
	if mr.index, mr.key, err = v.allocMPT(); err != nil {
		return nil, fmt.Errorf("gohfi: REG_MR: %w", err)
	}
	if mr.mttFirst, err = v.allocMTT(npages); err != nil {
		mr.mttFirst = -1
		return nil, joinUndo(fmt.Errorf("gohfi: REG_MR: %w", err), "undo", mr.release(true))
	}
	if access&uapi.IB_ACCESS_ON_DEMAND != 0 {
		if err := pd.regODP(mr); err != nil {
			return nil, joinUndo(err, "undo", mr.release(true))
		}
		return mr, mr.publish(e0(mr, pd, chip.MPTTypeODP))
	}
	// Pin and map, no lock held; the device cannot reach any of it yet.
	flags := dmaFlags(access)
	// memfd-backed memory is mapped by the device itself (the DMA mapping
	// carries the file): nothing to pin (docs/pinning.md).
	shm, shmOff, err := userfault.ShmemFile(start, uintptr(npages)*pageSize, flags&vfio.DMAWrite != 0)
	if err != nil {
		return nil, joinUndo(fmt.Errorf("gohfi: REG_MR: %w", err), "undo", mr.release(true))
	}
	if shm != nil {
		// The device's mappings hold the pages once made.
		defer func() { _ = shm.Close() }() // never written through: nothing a close could lose
	}
	for off := uint64(0); off < uint64(npages)*pageSize; off += dma.MaxPinSize {
		c := mrChunk{vaddr: start + uintptr(off), size: min(uint64(npages)*pageSize-off, dma.MaxPinSize)}
		if shm == nil {
			if c.pin, err = pinFor(d.pinner, c.vaddr, c.size, access&mrAccessDeviceWrites == 0); err != nil {
				return nil, joinUndo(fmt.Errorf("gohfi: REG_MR: %w", err), "undo", mr.release(true))
			}
			d.stats.pagesPinned.Add(uint64(c.pin.Pages()))
		}
		mr.chunks = append(mr.chunks, c)
		cp := &mr.chunks[len(mr.chunks)-1]
		if cp.iova, err = d.iova.alloc(c.size); err != nil {
			cp.iova = 0
			return nil, joinUndo(fmt.Errorf("gohfi: REG_MR: %w", errors.Join(err, unix.ENOMEM)), "undo", mr.release(true))
		}
		m := vfio.DMAMapping{IOVA: cp.iova, Vaddr: c.vaddr, Size: c.size, Flags: flags}
		if shm != nil {
			m.File, m.FileOffset = shm, shmOff+off
		} else {
			m.Access = c.pin
		}
		if err = d.vdev.DMAMap(m); err != nil {
			d.iova.release(cp.iova, c.size)
			cp.iova = 0
			err = fmt.Errorf("gohfi: REG_MR: %w", d.ioErr(fmt.Errorf("DMA map: %w", err)))
			return nil, joinUndo(err, "undo", mr.release(true))
		}
	}
	// MTT entries first, then the MPT entry, its state word last.
	entryFlags := mttFlags(access)
	p := mr.mttFirst
	for _, c := range mr.chunks {
		for off := uint64(0); off < c.size; off += pageSize {
			store64(v.mtt, p*chip.MTTEntrySize, (c.iova+off)&chip.MTTAddrMask|entryFlags)
			p++
		}
	}
	if err := mr.publish(e0(mr, pd, chip.MPTTypePinned)); err != nil {
		return nil, err
	}
	return mr, nil
}

// pinFor pins [vaddr, vaddr+size) for the device: as an io_uring fixed
// buffer, which the kernel pins for writing, or, if readOnly (the device
// will only read) and that fails with EFAULT (memory mapped without
// PROT_WRITE, or not mapped), with a read-only pin (docs/pinning.md,
// "Read-only memory"), whose error is then the one reported.
func pinFor(p *dma.Pinner, vaddr uintptr, size uint64, readOnly bool) (*dma.Pin, error) {
	pin, err := p.Pin(vaddr, int(size))
	if err == nil || !readOnly || !errors.Is(err, unix.EFAULT) {
		return pin, err
	}
	pin, rerr := p.PinReadOnly(vaddr, int(size))
	if rerr != nil {
		return nil, fmt.Errorf("not pinned for writing (%v), nor read-only: %w", err, rerr)
	}
	return pin, nil
}

// e0 is the MPT entry of a new MR of type typ.
func e0(mr *MR, pd *PD, typ uint32) chip.MPTEntry {
	return chip.MPTEntry{
		Key: mr.key, PD: pd.num, MTTFirst: uint32(mr.mttFirst), IOVA: mr.iova, Length: mr.length,
		Flags: chip.MPTStateValid | mr.access<<chip.MPTAccessShift | typ,
	}
}

// publish puts the MR in the file's table and writes its MPT entry, the
// state word last. On failure (the file is closing) the MR is taken apart.
func (mr *MR) publish(e chip.MPTEntry) error {
	pd, v := mr.pd, mr.pd.v
	if err := insert(pd, pd.mrs, mr, func(h uint32) { mr.handle = h }); err != nil {
		// The MPT entry never became valid, so no translation of these
		// MTT entries can be cached: no flush needed.
		closed := errnoErr("REG_MR: file closed", err.(unix.Errno))
		var undo []error
		if mr.odp != nil {
			undo = append(undo, mr.odp.dereg())
		}
		mr.zapMTT()
		undo = append(undo, mr.release(true))
		return joinUndo(closed, "undo", errors.Join(undo...))
	}
	o := int(mr.index) * chip.MPTEntrySize
	store64(v.mpt, o, uint64(e.Key)|uint64(e.PD)<<32)
	store64(v.mpt, o+16, e.IOVA)
	store64(v.mpt, o+24, e.Length)
	store64(v.mpt, o+8, e.Word1())
	return nil
}

// Dereg deregisters the MR (ib_dereg_mr): the MPT entry is made free
// first, so the device refuses every new access by its key, then its MTT
// entries are zapped and the device's TLB flushed for them; only then are
// the pages unmapped and unpinned and the entries given back.
func (mr *MR) Dereg() error {
	pd := mr.pd
	if err := deregTake(pd, pd.mrs, mr, mr.handle, "registered", func() error { return pd.fastRegUsesLocked(mr) }); err != nil {
		return err
	}
	return mr.dereg()
}

// deregTake is the start of DEREG_MR for both kinds of MR: the PD's
// completed fast registrations are reclaimed, then, under pd.mu, x must
// still be table[handle] (else EINVAL: not what) and busy must let it go;
// x leaves the table.
func deregTake[T comparable](pd *PD, table map[uint32]T, x T, handle uint32, what string, busy func() error) error {
	if err := pd.reclaimFastReg(); err != nil {
		return fmt.Errorf("gohfi: DEREG_MR: %w", err)
	}
	pd.mu.Lock()
	defer pd.mu.Unlock()
	if table[handle] != x {
		return errnoErr(fmt.Sprintf("DEREG_MR: MR %d is not %s", handle, what), unix.EINVAL)
	}
	if err := busy(); err != nil {
		return err
	}
	delete(table, handle)
	return nil
}

func (mr *MR) dereg() error {
	v, d := mr.pd.v, mr.pd.d
	if !d.dead.Load() && v.mpt != nil {
		o := int(mr.index) * chip.MPTEntrySize
		store64(v.mpt, o+8, chip.MPTStateFree)
		if mr.odp != nil {
			// Zaps, flushes and releases its chunks.
			if err := mr.odp.dereg(); err != nil && !d.dead.Load() {
				return joinUndo(fmt.Errorf("gohfi: DEREG_MR: %w", err), "release", mr.release(false))
			}
		}
		mr.zapMTT()
		if err := v.flushTLB(mr.mttFirst, mr.npages); err != nil && !d.dead.Load() {
			// The device may still hold translations: unmap and unpin
			// (it can no longer reach the pages), but never hand the
			// IOVAs, MTT entries or MPT index out again.
			return joinUndo(fmt.Errorf("gohfi: DEREG_MR: %w", err), "release", mr.release(false))
		}
		store64(v.mpt, o, 0)
		store64(v.mpt, o+16, 0)
		store64(v.mpt, o+24, 0)
	} else if mr.odp != nil {
		// Best effort on a dead device (BAR4 is unmapped only at
		// removal): its failures are the wait for flushes that cannot
		// happen (errGone) and unpins, which Pinner.Close at removal
		// does for every pin left.
		_ = mr.odp.dereg()
	}
	return mr.release(true)
}

func (mr *MR) zapMTT() {
	for p := mr.mttFirst; p < mr.mttFirst+mr.npages; p++ {
		store64(mr.pd.v.mtt, p*chip.MTTEntrySize, 0)
	}
}

// release unmaps and unpins what the MR holds and, with reuse, gives its
// IOVAs, MTT run and MPT index back. The MPT entry must be free and the
// TLB flushed (or nothing written to the MTT yet).
func (mr *MR) release(reuse bool) error {
	v, d := mr.pd.v, mr.pd.d
	var errs []error
	for i := range mr.chunks {
		c := &mr.chunks[i]
		if c.iova != 0 {
			if !d.dead.Load() {
				if err := d.vdev.DMAUnmap(c.iova, c.size); err != nil {
					errs = append(errs, d.ioErr(fmt.Errorf("DMA unmap: %w", err)))
				}
			}
			if reuse {
				d.iova.release(c.iova, c.size)
			}
			c.iova = 0
		}
		if c.pin != nil {
			errs = append(errs, c.pin.Unpin())
			d.stats.pagesUnpinned.Add(uint64(c.pin.Pages()))
			c.pin = nil
		}
	}
	if reuse {
		if mr.mttFirst >= 0 {
			v.freeMTT(mr.mttFirst, mr.npages)
		}
		v.freeMPT(mr.index)
	}
	mr.mttFirst = -1
	return errors.Join(errs...)
}

func (pd *PD) ioctlRegMR(arg UserPtr) error {
	var r uapi.GohfiRegMR
	if err := readArg(arg, &r, "REG_MR"); err != nil {
		return err
	}
	mr, err := pd.RegMR(uintptr(r.Addr), r.Length, r.Iova, r.AccessFlags)
	if err != nil {
		return err
	}
	r.Handle, r.Lkey, r.Rkey = mr.handle, mr.Lkey(), mr.Rkey()
	if err := writeArg(arg, &r, "REG_MR"); err != nil {
		return joinUndo(err, "undo", mr.Dereg())
	}
	return nil
}

func (pd *PD) readHandle(arg UserPtr, what string) (uint32, error) {
	var h uapi.GohfiHandle
	if err := readArg(arg, &h, what); err != nil {
		return 0, err
	}
	if h.Reserved != 0 {
		return 0, errnoErr(what+": reserved field set", unix.EINVAL)
	}
	return h.Handle, nil
}

func (pd *PD) ioctlDeregMR(arg UserPtr) error {
	h, err := pd.readHandle(arg, "DEREG_MR")
	if err != nil {
		return err
	}
	if m, err := lookup(pd, pd.frmrs, h, "DEREG_MR"); err == nil {
		return m.Dereg()
	}
	mr, err := lookup(pd, pd.mrs, h, "DEREG_MR")
	if err != nil {
		return err
	}
	return mr.Dereg()
}

func (pd *PD) ioctlMRStats(arg UserPtr) error {
	var s uapi.GohfiMRStats
	if err := readArg(arg, &s, "MR_STATS"); err != nil {
		return err
	}
	if s.Reserved != 0 {
		return errnoErr("MR_STATS: reserved field set", unix.EINVAL)
	}
	if _, err := lookup(pd, pd.frmrs, s.Handle, "MR_STATS"); err == nil {
		// A fast-reg MR pins nothing (its bindings name other MRs' pinned
		// pages) and never faults: every counter is 0.
		return writeArg(arg, &uapi.GohfiMRStats{Handle: s.Handle}, "MR_STATS")
	}
	mr, err := lookup(pd, pd.mrs, s.Handle, "MR_STATS")
	if err != nil {
		return err
	}
	s = uapi.GohfiMRStats{Handle: s.Handle, PagesPinned: uint64(mr.PagesPinned())}
	if mr.odp != nil {
		mr.odp.stats(&s)
	}
	return writeArg(arg, &s, "MR_STATS")
}
