package hfisim

import (
	"encoding/binary"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
)

// Fast registration (chip.CapMemMgtExtensions, chip/fastreg.go): the local
// work requests FAST_REG_MR and LOCAL_INV, and the invalidations that
// SEND_WITH_INV (at the responder, after the data is placed) and
// RDMA_READ_WITH_INV (at the requester, after the read data is placed)
// carry. They run in send-queue order like every other WQE: the engine
// executes one WQE of a QP at a time, so a WQE never starts before the
// earlier ones of its QP completed, which is what the FENCE flag asks for.
//
// FAST_REG_MR reads the page list from host memory when the engine reaches
// the WQE, then, under d.mu (so no packet sees half a binding), writes the
// MR's MTT entries, drops the device TLB's translations of the MR's MTT
// run, and writes the MPT entry with word 1 (state VALID) last.

const fastRegAccess = uapi.IB_ACCESS_LOCAL_WRITE | uapi.IB_ACCESS_REMOTE_WRITE |
	uapi.IB_ACCESS_REMOTE_READ | uapi.IB_ACCESS_REMOTE_ATOMIC

func isLocalOp(op uint8) bool {
	return op == uapi.GOHFI_WR_FAST_REG_MR || op == uapi.GOHFI_WR_LOCAL_INV
}

// checkLocalWQE checks what is particular to the WQE of a local operation:
// no SGEs, and for FAST_REG_MR zero reserved bytes.
func (d *Device) checkLocalWQE(raw []byte, w *chip.SendWQE) result {
	if w.NumSGE != 0 || w.Opcode == uapi.GOHFI_WR_FAST_REG_MR && !allZero(raw[chip.WQEFastRegReservedOff:chip.WQEFastRegReservedEnd]) {
		d.countVerbsErr()
		return fail(uapi.GOHFI_WC_LOC_QP_OP_ERR, chip.VendorErrBadWQE)
	}
	return result{}
}

// execLocal executes r's FAST_REG_MR or LOCAL_INV.
func (d *Device) execLocal(r *requester) result {
	d.mu.Lock()
	pd := d.qps[r.n].pd()
	d.mu.Unlock()
	if r.p.wqe.Opcode == uapi.GOHFI_WR_LOCAL_INV {
		return d.localInvalidate(r, pd)
	}
	return d.fastReg(r, pd)
}

// fastRegMRCheck checks that MPT entry e can be bound by a QP of
// protection domain pd: a fast-reg MR, FREE, of pd.
func fastRegMRCheck(e *chip.MPTEntry, pd uint32) uint32 {
	switch {
	case e.Flags&chip.MPTTypeMask != chip.MPTTypeFastReg:
		return chip.VendorErrMRType
	case e.Flags&chip.MPTStateMask != chip.MPTStateFree:
		return chip.VendorErrState
	case e.PD != pd:
		return chip.VendorErrPD
	}
	return chip.VendorErrNone
}

// fastReg binds the fast-reg MR the WQE names to its page list.
func (d *Device) fastReg(r *requester, pd uint32) result {
	w := &r.p.wqe
	opErr := func(verr uint32) result { return fail(uapi.GOHFI_WC_LOC_QP_OP_ERR, verr) }
	protErr := func(verr uint32) result { return fail(uapi.GOHFI_WC_LOC_PROT_ERR, verr) }
	if w.FrPageShift < chip.FastRegMinPageShift || w.FrPageShift > chip.FastRegMaxPageShift || w.FrAccess&^fastRegAccess != 0 {
		d.countVerbsErr()
		return opErr(chip.VendorErrBadWQE)
	}
	idx := w.FrMPTIndex
	if idx >= uint32(d.cfg.MPTEntries) || chip.MPTIndex(w.FrKey) != idx {
		return opErr(chip.VendorErrKey)
	}
	d.mu.Lock()
	e := d.mptEntry(idx)
	d.mu.Unlock()
	if verr := fastRegMRCheck(&e, pd); verr != chip.VendorErrNone {
		return opErr(verr)
	}
	shift := uint64(w.FrPageShift)
	n := uint64(w.FrPageListLen)
	capacity := uint64(1) << (e.Flags & chip.MPTLogMTTMask >> chip.MPTLogMTTShift)
	first := uint64(e.MTTFirst)
	off := w.FrIOVA & (1<<shift - 1)
	switch {
	case n == 0 || n > capacity || first+capacity > uint64(d.cfg.MTTEntries):
		return protErr(chip.VendorErrBounds)
	case w.FrLength > n<<shift-off || w.FrIOVA+w.FrLength < w.FrIOVA:
		return protErr(chip.VendorErrBounds)
	}
	// The page list, as it is in host memory now.
	pl := make([]byte, n*8)
	if err := r.dma.Read(w.FrPageList, pl); err != nil {
		d.countDMAErr(err)
		return protErr(chip.VendorErrDMA)
	}
	perm := uint64(chip.MTTPresent | chip.MTTRead)
	if w.FrAccess&(uapi.IB_ACCESS_LOCAL_WRITE|uapi.IB_ACCESS_REMOTE_WRITE|uapi.IB_ACCESS_REMOTE_ATOMIC) != 0 {
		perm |= chip.MTTWrite
	}
	for i := range n {
		if binary.LittleEndian.Uint64(pl[i*8:])&^chip.MTTAddrMask != 0 {
			return protErr(chip.VendorErrBadWQE)
		}
	}

	d.mu.Lock()
	defer d.mu.Unlock()
	if d.gen != r.gen || d.qps[r.n].epoch != r.epoch {
		return result{} // reset or flushed meanwhile: completeReq does nothing
	}
	// The driver may have freed the entry meanwhile; check again.
	if e = d.mptEntry(idx); fastRegMRCheck(&e, pd) != chip.VendorErrNone {
		return opErr(fastRegMRCheck(&e, pd))
	}
	for i := range n {
		d.mtt.store64((first+i)*chip.MTTEntrySize, binary.LittleEndian.Uint64(pl[i*8:])|perm)
	}
	d.tlbDropLocked(first, capacity)
	flags := e.Flags&(chip.MPTTypeMask|chip.MPTLogMTTMask) | chip.MPTStateValid |
		w.FrAccess<<chip.MPTAccessShift | uint32(shift-12)<<chip.MPTPageShiftShift
	o := d.mptOff + uint64(idx)*chip.MPTEntrySize
	d.mtt.store64(o, uint64(w.FrKey)|uint64(pd)<<32)
	d.mtt.store64(o+16, w.FrIOVA)
	d.mtt.store64(o+24, w.FrLength)
	d.mtt.store64(o+8, uint64(flags)|first<<32)
	return result{}
}

// invalidateLocked makes the fast-reg MR named by key FREE for a QP of
// protection domain pd: the key must be the MR's current key (its variant
// included). Invalidating an MR that is already FREE succeeds. It returns
// the vendor error of the first check that failed: key index, type, key,
// PD.
func (d *Device) invalidateLocked(key, pd uint32) uint32 {
	idx := chip.MPTIndex(key)
	if idx >= uint32(d.cfg.MPTEntries) {
		return chip.VendorErrKey
	}
	e := d.mptEntry(idx)
	switch {
	case e.Flags&chip.MPTTypeMask != chip.MPTTypeFastReg:
		return chip.VendorErrMRType
	case e.Key != key:
		return chip.VendorErrKey
	case e.PD != pd:
		return chip.VendorErrPD
	}
	e.Flags &^= chip.MPTStateMask
	d.mtt.store64(d.mptOff+uint64(idx)*chip.MPTEntrySize+8, e.Word1())
	return chip.VendorErrNone
}

func (d *Device) invalidate(key, pd uint32) uint32 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.invalidateLocked(key, pd)
}

// localInvalidate executes LOCAL_INV of invalidate_rkey (the WQE's imm
// field).
func (d *Device) localInvalidate(r *requester, pd uint32) result {
	if verr := d.invalidate(r.p.wqe.Imm, pd); verr != chip.VendorErrNone {
		return fail(uapi.GOHFI_WC_LOC_QP_OP_ERR, verr)
	}
	return result{}
}

// readInvalidate ends an RDMA_READ_WITH_INV whose data is placed: the local
// MR named by invalidate_rkey is invalidated, or the WQE completes with
// GOHFI_WC_LOC_QP_OP_ERR and the check that failed.
func (d *Device) readInvalidate(r *requester) result {
	d.mu.Lock()
	pd := d.qps[r.n].pd()
	d.mu.Unlock()
	return d.localInvalidate(r, pd)
}

// sendInvalidate ends a SEND_WITH_INV whose data is placed: the
// responder's MR named by the packet's invalidate rkey is invalidated. A
// failed invalidation is an invalid request (as rxe's class J): the
// requester completes with GOHFI_WC_REM_INV_REQ_ERR, the receive WQE too,
// and the responder QP goes to ERR.
func (d *Device) sendInvalidate(rs *responder, pk *packet) result {
	verr := d.invalidate(pk.imm, rs.pd)
	if verr == chip.VendorErrNone {
		return result{}
	}
	d.count(&d.errs.nakInvReq)
	return fail(uapi.GOHFI_WC_REM_INV_REQ_ERR, verr)
}
