package hfisim

import (
	"encoding/binary"
	"fmt"

	"github.com/gohfi/gohfi/chip"
	"golang.org/x/sys/unix"
)

func le64(b []byte) uint64     { return binary.LittleEndian.Uint64(b) }
func put64(b []byte, v uint64) { binary.LittleEndian.PutUint64(b, v) }

// csrAccess checks a BAR0 access: 8-byte registers, read whole or by 4-byte
// halves (as a 32-bit guest or QEMU may split them). Anything else is counted
// and refused.
func (d *Device) csrAccess(off uint64, n int) (reg uint64, shift uint, err error) {
	if (n != 8 && n != 4) || off%uint64(n) != 0 || off >= chip.CSRBarSize || off+uint64(n) > chip.CSRBarSize {
		d.mu.Lock()
		d.errs.badAccess++
		d.mu.Unlock()
		return 0, 0, fmt.Errorf("hfisim: CSR access %#x+%d: %w", off, n, unix.EINVAL)
	}
	return off &^ 7, uint(off&7) * 8, nil
}

func (d *Device) csrRead(off uint64, p []byte) error {
	reg, shift, err := d.csrAccess(off, len(p))
	if err != nil {
		return err
	}
	d.mu.Lock()
	v := d.readRegLocked(reg)
	d.mu.Unlock()
	if len(p) == 8 {
		put64(p, v)
	} else {
		binary.LittleEndian.PutUint32(p, uint32(v>>shift))
	}
	return nil
}

func (d *Device) csrWrite(off uint64, p []byte) error {
	reg, shift, err := d.csrAccess(off, len(p))
	if err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	var v uint64
	if len(p) == 8 {
		v = le64(p)
	} else {
		// Read-modify-write of one half; write-one-to-clear and
		// command registers see only the half that was written.
		old := d.readRegLocked(reg)
		if reg == chip.RegIntStatus {
			old = 0
		}
		mask := uint64(0xffffffff) << shift
		v = old&^mask | uint64(binary.LittleEndian.Uint32(p))<<shift
	}
	d.writeRegLocked(reg, v)
	return nil
}

func (d *Device) readRegLocked(reg uint64) uint64 {
	c := d.cfg
	if v, ok := c.RegOverride[reg]; ok {
		return v
	}
	switch reg {
	case chip.RegID:
		return chip.IDMagic
	case chip.RegRevision:
		return chip.RevisionMajor<<16 | chip.RevisionMinor
	case chip.RegNumCtxts:
		return uint64(c.NumContexts)
	case chip.RegRcvArrayPerCtxt:
		return uint64(c.RcvArrayPerCtxt)
	case chip.RegMaxTIDPages:
		return uint64(c.MaxTIDPages)
	case chip.RegMTTEntries:
		return uint64(c.MTTEntries)
	case chip.RegCapFlags:
		caps := uint64(chip.CapMSIX | chip.CapLoopback | chip.CapVerbs | chip.CapODP | chip.CapMemMgtExtensions | chip.CapDBRec | chip.CapImplicitODP | chip.CapDBRing | chip.CapCQHeadRec | chip.CapCtxtDBRec | chip.CapRHQHeadRec)
		if d.net != nil {
			caps |= chip.CapNet
		}
		return caps
	case chip.RegRHQMaxEntries:
		return uint64(c.RHQMaxEntries)
	case chip.RegControl:
		return 0 // reset completes synchronously
	case chip.RegStatus:
		return chip.StatusReady
	case chip.RegIntStatus:
		return d.intState
	case chip.RegIntMask:
		return d.intMask
	case chip.RegTLBInvDone:
		return d.tlbDone
	case chip.RegScratch:
		return d.scratch
	case chip.RegErrCntIOMMUFault:
		return d.errs.iommuFault
	case chip.RegErrCntBadAccess:
		return d.errs.badAccess
	case chip.RegErrCntTID:
		return d.errs.tid
	case chip.RegErrCntBadDesc:
		return d.errs.badDesc
	case chip.RegErrCntRHQFull:
		return d.errs.rhqFull
	case chip.RegErrCntEagerFull:
		return d.errs.eagerFull
	case chip.RegCntPackets:
		return d.errs.packets
	case chip.RegCntBytes:
		return d.errs.bytes
	case chip.RegCntNAKAccess:
		return d.errs.nakAccess
	case chip.RegCntNAKInvReq:
		return d.errs.nakInvReq
	case chip.RegCntVerbsPkts:
		return d.errs.verbsPkts
	case chip.RegCntTLBHits:
		return d.errs.tlbHits
	case chip.RegCntTLBMiss:
		return d.errs.tlbMiss
	case chip.RegErrCntVerbs:
		return d.errs.verbs
	}
	if v, ok := c.verbsReg(reg); ok {
		return v
	}
	if v, ok := d.odpRegLocked(reg); ok {
		return v
	}
	if v, ok := d.netRegLocked(reg); ok {
		return v
	}
	if n, r, ok := d.ctxtReg(reg); ok {
		return d.ctxts[n].read(r, n, c)
	}
	if n, r, ok := d.qpReg(reg); ok {
		return d.qps[n].read(r)
	}
	if n, r, ok := d.qpDBReg(reg); ok && r == chip.QPDBRecAddr {
		return d.qps[n].dbAddr
	}
	if n, r, ok := d.cqReg(reg); ok {
		return d.cqs[n].read(r)
	}
	return 0 // unimplemented registers read as zero, like reserved space
}

func (d *Device) writeRegLocked(reg, v uint64) {
	switch reg {
	case chip.RegControl:
		if v&chip.CtrlReset != 0 {
			d.resetLocked()
		}
		return
	case chip.RegIntStatus:
		d.intState &^= v
		if d.intState&d.intMask == 0 {
			d.pci.setIntxStatus(false)
		}
		return
	case chip.RegIntMask:
		d.intMask = v & (1<<uint(d.msixVectors()) - 1 | chip.IntSrcEQ | chip.IntSrcTLB)
		// Unmasking a pending source delivers it, as level-sensitive
		// hardware would.
		if pend := d.intState & d.intMask; pend != 0 {
			d.raiseLocked(pend)
		}
		return
	case chip.RegTLBInvStart:
		d.tlbStart = v
		return
	case chip.RegTLBInvCount:
		d.tlbCommandLocked(d.tlbStart, v)
		return
	case chip.RegScratch:
		d.scratch = v
		return
	}
	if d.odpWriteLocked(reg, v) || d.netWriteLocked(reg, v) {
		return
	}
	if n, r, ok := d.ctxtReg(reg); ok {
		if d.ctxts[n].write(r, v, d.cfg) {
			d.kickEngine()
		}
		return
	}
	if n, r, ok := d.qpReg(reg); ok {
		d.writeQPLocked(n, r, v)
		return
	}
	if n, r, ok := d.qpDBReg(reg); ok {
		d.writeQPDBLocked(n, r, v)
		return
	}
	if n, r, ok := d.cqReg(reg); ok {
		d.writeCQLocked(n, r, v)
		return
	}
	// Writes to read-only or reserved registers are ignored.
}

// ctxtReg maps a BAR0 offset to (context, register) when it is a per-context
// register of an existing context.
func (d *Device) ctxtReg(reg uint64) (int, uint64, bool) {
	if reg < chip.CtxtBase {
		return 0, 0, false
	}
	n := int((reg - chip.CtxtBase) / chip.CtxtStride)
	if n >= d.cfg.NumContexts {
		return 0, 0, false
	}
	return n, (reg - chip.CtxtBase) % chip.CtxtStride, true
}

// verbsReg reads the verbs engine's read-only size registers.
func (c Config) verbsReg(reg uint64) (uint64, bool) {
	switch reg {
	case chip.RegMPTEntries:
		return uint64(c.MPTEntries), true
	case chip.RegNumQPs:
		return uint64(c.NumQPs), true
	case chip.RegNumCQs:
		return uint64(c.NumCQs), true
	case chip.RegMaxQPWR:
		return uint64(c.MaxQPWR), true
	case chip.RegMaxCQE:
		return uint64(c.MaxCQE), true
	case chip.RegMaxSGE:
		return uint64(c.MaxSGE), true
	case chip.RegMaxMsgSize:
		return maxMsgSize, true
	case chip.RegMaxFastRegPages:
		return uint64(c.MaxFastRegPages), true
	}
	return 0, false
}

// qpReg maps a BAR0 offset to (QP, register) when it is a register of an
// existing QP.
func (d *Device) qpReg(reg uint64) (int, uint64, bool) {
	if reg < chip.QPBase || reg >= chip.QPBase+uint64(len(d.qps))*chip.QPStride {
		return 0, 0, false
	}
	return int((reg - chip.QPBase) / chip.QPStride), (reg - chip.QPBase) % chip.QPStride, true
}

// qpDBReg maps a BAR0 offset to (QP, register) when it is a doorbell-block
// register of an existing QP.
func (d *Device) qpDBReg(reg uint64) (int, uint64, bool) {
	if reg < chip.QPDBBase || reg >= chip.QPDBBase+uint64(len(d.qps))*chip.QPDBStride {
		return 0, 0, false
	}
	return int((reg - chip.QPDBBase) / chip.QPDBStride), (reg - chip.QPDBBase) % chip.QPDBStride, true
}

// cqReg maps a BAR0 offset to (CQ, register) when it is a register of an
// existing CQ.
func (d *Device) cqReg(reg uint64) (int, uint64, bool) {
	if reg < chip.CQBase || reg >= chip.CQBase+uint64(len(d.cqs))*chip.CQStride {
		return 0, 0, false
	}
	return int((reg - chip.CQBase) / chip.CQStride), (reg - chip.CQBase) % chip.CQStride, true
}

func (d *Device) kickEngine() {
	select {
	case d.kick <- struct{}{}:
	default:
	}
}
