package driver

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/vfio"
	"golang.org/x/sys/unix"
)

// Fast registration (chip.CapMemMgtExtensions), in the shape of the
// kernel's ib_alloc_mr / ib_map_mr_sg / IB_WR_REG_MR / IB_WR_LOCAL_INV:
//
//   - PD.AllocMR takes an MPT entry and a run of MTT entries (a power of two
//     at least max_num_sg) and writes the entry FREE, type fast-reg, with
//     variant byte 0. The device binds it (FAST_REG_MR) and invalidates it
//     (LOCAL_INV, SEND_WITH_INV, RDMA_READ_WITH_INV) by itself.
//   - PD.AllocPageList allocates a device page list: host memory the device
//     reads by IOVA when it reaches the FAST_REG_MR WQE. One is needed per
//     binding outstanding in a send queue; PageList.MapSG fills one from a
//     scatter list of DMA-mapped segments with a first byte offset.
//   - QP.PostSend of a SendWR with Opcode GOHFI_WR_REG_MR and Reg posts the
//     binding; the page list stays busy until the device has consumed the
//     WQE.
//
// The driver learns that a WQE was consumed from the device's consumer
// index, which also counts unsignaled and flushed WQEs: the word the device
// writes to host memory each time it advances (QPSQHeadAddr), or the
// QPSQHead register when that word shows no progress. A QP keeps its
// outstanding local operations in send-queue order (QP.frPend) and retires
// those behind the head whenever it looks: when a user REG_MR finds its
// MR's pool of page lists used up (poolBatch), when the send queue looks
// full, at DEREG_MR, at DRIVER_STATS and when a busy page list is mapped or
// freed.
// Forcing FAST_REG_MR WQEs signaled and filtering their completions would
// need the CQ poller to know them; the consumer index needs nothing.
//
// The user ABI (POST_SEND's fr_* fields) names user virtual addresses; the
// driver checks that every page lies in a pinned MR of the same file,
// translates it to its IOVA and writes the page list itself (a page list of
// the fast-reg MR's own pool), so the device is never handed an address the
// file did not register. A pinned MR whose pages a binding may use cannot be
// deregistered (EBUSY) until the fast-reg MR is seen FREE with no
// FAST_REG_MR outstanding.
//
// Lock order: QP.mu, then PD.mu (read: the page check), then FastRegMR.mu,
// then PageList.mu.

// IncRkey returns key with its variant byte advanced (ib_inc_rkey).
func IncRkey(key uint32) uint32 { return key&^0xff | (key+1)&0xff }

// probeFastReg reads RegMaxFastRegPages of a device with fast registration
// and refuses, with EIO, a value that is not a power of two up to
// chip.MaxFastRegPages.
func (d *Device) probeFastReg(v *verbsDev) error {
	if d.info.CapFlags&chip.CapMemMgtExtensions == 0 {
		return nil
	}
	x, err := d.readCSR(chip.RegMaxFastRegPages)
	if err != nil {
		return err
	}
	if x < 1 || x > chip.MaxFastRegPages || !isPow2(x) {
		return fmt.Errorf("verbs register MaxFastRegPages (%#x) reads %d: want a power of two from 1 to %d: %w",
			chip.RegMaxFastRegPages, x, chip.MaxFastRegPages, unix.EIO)
	}
	v.maxFRPages = int(x)
	return nil
}

// FastRegMR is a fast-registration memory region (ib_mr of type
// IB_MR_TYPE_MEM_REG).
type FastRegMR struct {
	pd       *PD
	handle   uint32
	index    uint32
	maxNumSg int
	mttFirst int
	mttN     int // MTT entries: a power of two >= maxNumSg

	mu      sync.Mutex
	key     uint32      // key of the last REG_MR posted (variant 0 at allocation)
	pending int         // FAST_REG_MR WQEs posted and not yet consumed
	refs    map[*MR]int // pinned MRs a user binding may reach
	pool    []*PageList // free page lists for user bindings
	lists   []*PageList // every page list of the pool
	gone    bool
}

// Handle is the MR's handle; Lkey and Rkey its key as last set by a posted
// REG_MR (ib_update_fast_reg_key's result), MaxNumSg its page capacity.
func (m *FastRegMR) Handle() uint32 { return m.handle }
func (m *FastRegMR) MaxNumSg() int  { return m.maxNumSg }
func (m *FastRegMR) Lkey() uint32 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.key
}
func (m *FastRegMR) Rkey() uint32 { return m.Lkey() }

// Valid reports whether the device holds the MR VALID (bound) now.
func (m *FastRegMR) Valid() bool {
	v := m.pd.v
	if v.mpt == nil || m.pd.d.dead.Load() {
		return false
	}
	return load64(v.mpt, int(m.index)*chip.MPTEntrySize+8)&chip.MPTStateMask == chip.MPTStateValid
}

// FastRegMR returns the fast-reg MR of ALLOC_MR handle h of the PD's file
// (the in-module view of a user's MR, for tools in the same process):
// EINVAL when the file holds no such MR.
func (pd *PD) FastRegMR(h uint32) (*FastRegMR, error) {
	return lookup(pd, pd.frmrs, h, "fast-reg MR")
}

func log2Ceil(n int) uint32 {
	l := uint32(0)
	for 1<<l < n {
		l++
	}
	return l
}

// AllocMR allocates a fast-reg MR with room for maxNumSg pages
// (ib_alloc_mr(pd, IB_MR_TYPE_MEM_REG, maxNumSg)): EOPNOTSUPP on a device
// without fast registration, EINVAL for maxNumSg outside
// 1..max_fast_reg_page_list_len, ENOSPC without a free MPT entry or MTT run.
func (pd *PD) AllocMR(maxNumSg int) (*FastRegMR, error) {
	v := pd.v
	if v.maxFRPages == 0 {
		return nil, errnoErr("ALLOC_MR: device has no fast registration", unix.EOPNOTSUPP)
	}
	if maxNumSg < 1 || maxNumSg > v.maxFRPages {
		return nil, errnoErr(fmt.Sprintf("ALLOC_MR: max_num_sg %d, want 1..%d", maxNumSg, v.maxFRPages), unix.EINVAL)
	}
	lg := log2Ceil(maxNumSg)
	m := &FastRegMR{pd: pd, maxNumSg: maxNumSg, mttN: 1 << lg, mttFirst: -1}
	var err error
	if m.index, _, err = v.allocMPT(); err != nil {
		return nil, fmt.Errorf("gohfi: ALLOC_MR: %w", err)
	}
	m.key = m.index << 8
	if m.mttFirst, err = v.allocMTT(m.mttN); err != nil {
		v.freeMPT(m.index)
		return nil, fmt.Errorf("gohfi: ALLOC_MR: %w", err)
	}
	// The MTT run starts not present; the device writes it at each bind.
	for p := m.mttFirst; p < m.mttFirst+m.mttN; p++ {
		store64(v.mtt, p*chip.MTTEntrySize, 0)
	}
	if err := insert(pd, pd.frmrs, m, func(h uint32) { m.handle = h }); err != nil {
		return nil, joinUndo(errnoErr("ALLOC_MR: file closed", err.(unix.Errno)), "undo", m.release())
	}
	e := chip.MPTEntry{Key: m.key, PD: pd.num, MTTFirst: uint32(m.mttFirst),
		Flags: chip.MPTStateFree | chip.MPTTypeFastReg | lg<<chip.MPTLogMTTShift}
	o := int(m.index) * chip.MPTEntrySize
	store64(v.mpt, o, uint64(e.Key)|uint64(e.PD)<<32)
	store64(v.mpt, o+16, 0)
	store64(v.mpt, o+24, 0)
	store64(v.mpt, o+8, e.Word1())
	return m, nil
}

// Dereg deallocates the MR (ib_dereg_mr): EBUSY while the device holds it
// VALID (invalidate it first) or a FAST_REG_MR of it is outstanding.
func (m *FastRegMR) Dereg() error {
	if err := deregTake(m.pd, m.pd.frmrs, m, m.handle, "allocated", m.goneUnlessBusy); err != nil {
		return err
	}
	return m.dereg()
}

// goneUnlessBusy marks the MR gone for Dereg, or says why it cannot go.
func (m *FastRegMR) goneUnlessBusy() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	switch {
	case m.pending > 0:
		return errnoErr(fmt.Sprintf("DEREG_MR: %d FAST_REG_MR work requests of MR %d outstanding", m.pending, m.handle), unix.EBUSY)
	case m.Valid():
		return errnoErr(fmt.Sprintf("DEREG_MR: MR %d is valid (bound): invalidate it first", m.handle), unix.EBUSY)
	}
	m.gone = true
	return nil
}

// dereg frees the MPT entry, zaps the MTT run and flushes the device TLB for
// it, then gives everything back. The MR is out of the table and no
// FAST_REG_MR of it is outstanding (or its QPs were reset).
func (m *FastRegMR) dereg() error {
	v, d := m.pd.v, m.pd.d
	m.mu.Lock()
	m.gone = true
	m.refs = nil
	m.mu.Unlock()
	if !d.dead.Load() && v.mpt != nil {
		o := int(m.index) * chip.MPTEntrySize
		store64(v.mpt, o+8, chip.MPTStateFree)
		for p := m.mttFirst; p < m.mttFirst+m.mttN; p++ {
			store64(v.mtt, p*chip.MTTEntrySize, 0)
		}
		if err := v.flushTLB(m.mttFirst, m.mttN); err != nil && !d.dead.Load() {
			// The device may still translate the run: never hand it out again.
			return joinUndo(fmt.Errorf("gohfi: DEREG_MR: %w", err), "freeing page lists", m.freeLists())
		}
		store64(v.mpt, o, 0)
		store64(v.mpt, o+16, 0)
		store64(v.mpt, o+24, 0)
	}
	return m.release()
}

func (m *FastRegMR) freeLists() error {
	var errs []error
	for _, pl := range m.lists {
		errs = append(errs, pl.free())
	}
	m.lists, m.pool = nil, nil
	return errors.Join(errs...)
}

func (m *FastRegMR) release() error {
	err := m.freeLists()
	if m.mttFirst >= 0 {
		m.pd.v.freeMTT(m.mttFirst, m.mttN)
		m.mttFirst = -1
	}
	m.pd.v.freeMPT(m.index)
	return err
}

// gcLocked forgets the pinned MRs the MR's bindings used once the MR is
// FREE with no FAST_REG_MR outstanding: no binding can reach them then.
func (m *FastRegMR) gcLocked() {
	if m.pending == 0 && len(m.refs) > 0 && !m.Valid() {
		m.refs = nil
	}
}

// PageList is a device page list (the 2008 API's ib_fast_reg_page_list):
// host memory the device reads by IOVA when it executes a FAST_REG_MR. It
// is busy from the post of the REG_MR that uses it until the device has
// consumed that WQE.
type PageList struct {
	pd    *PD
	ring  *ringMem
	max   int
	owner *FastRegMR // set for the page lists of a fast-reg MR's pool

	mu     sync.Mutex
	n      int
	shift  uint
	iova   uint64
	length uint64
	busy   *QP // the QP whose send queue holds the REG_MR using it
	freed  bool
}

// Max is the list's capacity; Len, IOVA and Length what MapSG set.
func (pl *PageList) Max() int { return pl.max }
func (pl *PageList) IOVA() uint64 {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	return pl.iova
}
func (pl *PageList) Length() uint64 {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	return pl.length
}

// AllocPageList allocates a page list of max entries, DMA-mapped for the
// device to read: EINVAL for max outside 1..max_fast_reg_page_list_len.
func (pd *PD) AllocPageList(max int) (*PageList, error) {
	if pd.v.maxFRPages == 0 {
		return nil, errnoErr("page list: device has no fast registration", unix.EOPNOTSUPP)
	}
	if max < 1 || max > pd.v.maxFRPages {
		return nil, errnoErr(fmt.Sprintf("page list of %d entries, want 1..%d", max, pd.v.maxFRPages), unix.EINVAL)
	}
	r, err := newRingMem("pagelist", max*8)
	if err != nil {
		return nil, fmt.Errorf("gohfi: page list: %w", errors.Join(err, unix.ENOMEM))
	}
	if err := pd.d.dmaMap(r, vfio.DMARead); err != nil {
		r.free()
		return nil, fmt.Errorf("gohfi: page list: %w", err)
	}
	return &PageList{pd: pd, ring: r, max: max}, nil
}

// Free frees the page list: EBUSY while a posted REG_MR uses it.
func (pl *PageList) Free() error {
	if err := pl.waitIdle(); err != nil {
		return err
	}
	return pl.free()
}

func (pl *PageList) free() error {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if pl.freed {
		return nil
	}
	pl.freed = true
	var err error
	if !pl.pd.d.dead.Load() {
		err = pl.pd.d.dmaUnmap(pl.ring)
	} else if pl.ring.iova != 0 {
		pl.pd.d.iova.release(pl.ring.iova, uint64(len(pl.ring.mem)))
	}
	pl.ring.free()
	return err
}

// waitIdle retires what the device consumed of the QP that holds the list
// and reports EBUSY if it is still in use.
func (pl *PageList) waitIdle() error {
	pl.mu.Lock()
	qp := pl.busy
	pl.mu.Unlock()
	if qp == nil {
		return nil
	}
	qp.mu.Lock()
	err := qp.reclaimLocked()
	qp.mu.Unlock()
	if err != nil {
		return err
	}
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if pl.busy != nil {
		return errnoErr("page list in use by a REG_MR the device has not consumed yet", unix.EBUSY)
	}
	return nil
}

// DMASeg is one DMA-mapped segment of a scatter list (a struct scatterlist
// entry after ib_dma_map_sg): an IOVA and a length.
type DMASeg struct {
	Addr uint64
	Len  uint64
}

// DMASegs returns the DMA segments of [va, va+n) of a pinned MR: EINVAL if
// the range is not inside the MR's pinned pages.
func (mr *MR) DMASegs(va uintptr, n uint64) ([]DMASeg, error) {
	var segs []DMASeg
	for n > 0 {
		iova, k := mr.iovaOf(va, n)
		if k == 0 {
			return nil, errnoErr(fmt.Sprintf("DMA segments: %#x is not in MR %d", va, mr.handle), unix.EINVAL)
		}
		if l := len(segs); l > 0 && segs[l-1].Addr+segs[l-1].Len == iova {
			segs[l-1].Len += k
		} else {
			segs = append(segs, DMASeg{iova, k})
		}
		va += uintptr(k)
		n -= k
	}
	return segs, nil
}

// iovaOf returns the IOVA of address va of the MR's pinned pages and how
// many of the n bytes from there are mapped contiguously (0: not the MR's).
func (mr *MR) iovaOf(va uintptr, n uint64) (uint64, uint64) {
	for _, c := range mr.chunks {
		if c.iova != 0 && va >= c.vaddr && uint64(va-c.vaddr) < c.size {
			off := uint64(va - c.vaddr)
			return c.iova + off, min(n, c.size-off)
		}
	}
	return 0, 0
}

// MapSG fills the page list from a scatter list of DMA segments
// (ib_map_mr_sg): the binding starts sgOffset bytes into the first segment
// and covers the rest of the list; pages of 1 << pageShift bytes. Every
// segment but the first must start on a page boundary and every one but
// the last end on one. It returns how many segments it mapped (fewer than
// len(sg) when the list is full or a segment breaks the rule), as Linux
// does; EBUSY while a posted REG_MR uses the list, EINVAL when nothing can
// be mapped.
func (pl *PageList) MapSG(sg []DMASeg, sgOffset uint64, pageShift uint) (int, error) {
	if err := pl.waitIdle(); err != nil {
		return 0, fmt.Errorf("gohfi: map SG: %w", err)
	}
	if pageShift < chip.FastRegMinPageShift || pageShift > chip.FastRegMaxPageShift {
		return 0, errnoErr(fmt.Sprintf("map SG: page shift %d, want %d..%d", pageShift, chip.FastRegMinPageShift, chip.FastRegMaxPageShift), unix.EINVAL)
	}
	if len(sg) == 0 || sgOffset >= sg[0].Len {
		return 0, errnoErr("map SG: empty scatter list or offset past the first segment", unix.EINVAL)
	}
	mask := uint64(1)<<pageShift - 1
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if pl.freed || pl.busy != nil {
		return 0, errnoErr("map SG: page list freed or in use", unix.EBUSY)
	}
	n, mapped := 0, 0
	var length, prevEnd uint64
	for i, s := range sg {
		start, l := s.Addr, s.Len
		if i == 0 {
			start, l = start+sgOffset, l-sgOffset
		} else if start&mask != 0 || prevEnd&mask != 0 {
			break
		}
		first, end := start&^mask, (start+l+mask)&^mask
		if n+int((end-first)>>pageShift) > pl.max {
			break
		}
		for p := first; p < end; p += mask + 1 {
			binary.LittleEndian.PutUint64(pl.ring.mem[n*8:], p)
			n++
		}
		length += l
		prevEnd = start + l
		mapped = i + 1
	}
	if mapped == 0 {
		return 0, errnoErr("map SG: the first segment does not fit the page list", unix.EINVAL)
	}
	pl.n, pl.shift, pl.iova, pl.length = n, pageShift, sg[0].Addr+sgOffset, length
	return mapped, nil
}

// RegWR is the REG_MR part of a SendWR (struct ib_reg_wr): bind MR to the
// pages of PageList (as MapSG set them) under Key with Access.
type RegWR struct {
	MR       *FastRegMR
	PageList *PageList
	Key      uint32 // the MR's index with a new variant byte (IncRkey)
	Access   uint32 // IB_ACCESS_LOCAL_WRITE, _REMOTE_*

	user *userBinding // POST_SEND: pages the driver translated
}

// userBinding is a user's fr_* fields after the page check.
type userBinding struct {
	iova, length uint64
	shift        uint
	pages        []uint64 // IOVAs
}

// frPending is a local operation posted on a QP and not yet known to be
// consumed by the device.
type frPending struct {
	slot int
	op   uint32
	mr   *FastRegMR
	pl   *PageList
}

const frAccessKnown = uapi.IB_ACCESS_LOCAL_WRITE | uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ | uapi.IB_ACCESS_REMOTE_ATOMIC

// invalidates reports whether a work request carries invalidate_rkey.
func invalidates(op uint32) bool {
	return op == uapi.GOHFI_WR_LOCAL_INV || op == uapi.GOHFI_WR_SEND_WITH_INV || op == uapi.GOHFI_WR_RDMA_READ_WITH_INV
}

func isFastRegOp(op uint32) bool {
	switch op {
	case uapi.GOHFI_WR_FAST_REG_MR, uapi.GOHFI_WR_LOCAL_INV, uapi.GOHFI_WR_SEND_WITH_INV, uapi.GOHFI_WR_RDMA_READ_WITH_INV:
		return true
	}
	return false
}

// localOpLocked completes the WQE w of a fast-registration work request:
// the invalidate rkey, or the binding of a REG_MR (its page list marked
// busy and its MR's outstanding count raised), and records what reclaim
// must retire. Nothing changes when it fails.
func (qp *QP) localOpLocked(wr *SendWR, w *chip.SendWQE) error {
	switch wr.Opcode {
	case uapi.GOHFI_WR_LOCAL_INV, uapi.GOHFI_WR_SEND_WITH_INV, uapi.GOHFI_WR_RDMA_READ_WITH_INV:
		w.Imm = wr.InvalidateRkey
		if wr.Opcode != uapi.GOHFI_WR_SEND_WITH_INV {
			qp.frPend = append(qp.frPend, frPending{slot: qp.sqTail, op: wr.Opcode})
		}
		return nil
	case uapi.GOHFI_WR_FAST_REG_MR:
	default:
		return nil
	}
	r := wr.Reg
	if r == nil || r.MR == nil || r.MR.pd != qp.pd || (r.PageList == nil) == (r.user == nil) {
		return errnoErr("POST_SEND: REG_MR needs a fast-reg MR of this PD and one page list", unix.EINVAL)
	}
	m := r.MR
	var b userBinding
	if u := r.user; u != nil {
		b = *u
	} else {
		pl := r.PageList
		pl.mu.Lock()
		b = userBinding{iova: pl.iova, length: pl.length, shift: pl.shift}
		n, busy, freed, mine := pl.n, pl.busy != nil, pl.freed, pl.pd == qp.pd
		pl.mu.Unlock()
		switch {
		case !mine || freed || n == 0:
			return errnoErr("POST_SEND: REG_MR page list freed, empty or of another PD", unix.EINVAL)
		case busy:
			return errnoErr("POST_SEND: REG_MR page list in use by a REG_MR not yet consumed", unix.EBUSY)
		}
		b.pages = make([]uint64, n)
	}
	mask := uint64(1)<<b.shift - 1
	switch {
	case len(b.pages) < 1 || len(b.pages) > m.maxNumSg:
		return errnoErr(fmt.Sprintf("POST_SEND: REG_MR of %d pages, MR %d holds %d", len(b.pages), m.handle, m.maxNumSg), unix.EINVAL)
	case b.shift < chip.FastRegMinPageShift || b.shift > chip.FastRegMaxPageShift:
		return errnoErr(fmt.Sprintf("POST_SEND: REG_MR page shift %d", b.shift), unix.EINVAL)
	case r.Access&^frAccessKnown != 0,
		r.Access&(uapi.IB_ACCESS_REMOTE_WRITE|uapi.IB_ACCESS_REMOTE_ATOMIC) != 0 && r.Access&uapi.IB_ACCESS_LOCAL_WRITE == 0:
		return errnoErr(fmt.Sprintf("POST_SEND: REG_MR access %#x", r.Access), unix.EINVAL)
	case b.length == 0 || b.length > uint64(len(b.pages))<<b.shift-b.iova&mask || b.iova+b.length < b.iova:
		return errnoErr(fmt.Sprintf("POST_SEND: REG_MR length %d at iova %#x: %d pages of %d bytes", b.length, b.iova, len(b.pages), mask+1), unix.EINVAL)
	}
	if r.PageList == nil && m.poolEmpty() {
		// Take back what the device consumed before growing the pool.
		if err := qp.reclaimLocked(); err != nil {
			return fmt.Errorf("gohfi: POST_SEND: %w", err)
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.gone {
		return errnoErr("POST_SEND: REG_MR of a deregistered MR", unix.EINVAL)
	}
	pl := r.PageList
	if pl == nil {
		var err error
		if pl, err = m.takeListLocked(); err != nil {
			return fmt.Errorf("gohfi: POST_SEND: %w", err)
		}
		for i, p := range b.pages {
			binary.LittleEndian.PutUint64(pl.ring.mem[i*8:], p)
		}
	}
	pl.mu.Lock()
	if pl.busy != nil {
		pl.mu.Unlock()
		return errnoErr("POST_SEND: REG_MR page list in use by a REG_MR not yet consumed", unix.EBUSY)
	}
	pl.busy = qp
	pl.mu.Unlock()
	m.pending++
	m.key = r.Key
	w.FrIOVA, w.FrLength, w.FrPageList = b.iova, b.length, pl.ring.iova
	w.FrPageListLen, w.FrPageShift = uint32(len(b.pages)), uint32(b.shift)
	w.FrMPTIndex, w.FrKey, w.FrAccess = m.index, r.Key, r.Access
	qp.frPend = append(qp.frPend, frPending{slot: qp.sqTail, op: wr.Opcode, mr: m, pl: pl})
	return nil
}

// poolBatch is how many page lists a fast-reg MR's pool holds before a
// REG_MR that finds none free reads QPSQHead to take consumed ones back:
// one read per poolBatch binds in a steady stream.
const poolBatch = 4

// poolEmpty reports whether the pool has no free page list and is full.
func (m *FastRegMR) poolEmpty() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.pool) == 0 && len(m.lists) >= poolBatch
}

// takeListLocked takes a free page list of the MR's pool, allocating one
// when every one is in use.
func (m *FastRegMR) takeListLocked() (*PageList, error) {
	if k := len(m.pool); k > 0 {
		pl := m.pool[k-1]
		m.pool = m.pool[:k-1]
		return pl, nil
	}
	pl, err := m.pd.AllocPageList(m.maxNumSg)
	if err != nil {
		return nil, err
	}
	pl.owner = m
	m.lists = append(m.lists, pl)
	return pl, nil
}

// memHeadLocked is the SQHead the device last wrote to the QP's
// QPSQHeadAddr word, and whether it is one to believe: this life's tag
// (not a write of the QP's life before its last RESET) and between the
// last head known and the tail.
func (qp *QP) memHeadLocked() (int, bool) {
	w := load64(qp.sqHeadMem.mem, 0)
	h := int(uint32(w))
	if w>>chip.QPSQHeadTagShift != qp.sqHeadTag || h >= qp.sqN {
		return 0, false
	}
	return h, (h-qp.sqHead+qp.sqN)%qp.sqN <= (qp.sqTail-qp.sqHead+qp.sqN)%qp.sqN
}

// reclaimLocked learns how far the device has consumed the send queue and
// retires the local operations it consumed since the last look: their
// page lists become free (a pool's go back to it), their MRs' outstanding
// counts drop, and the counters fast_regs and local_invs count them. It
// looks at the head the device writes to host memory (QPSQHeadAddr) and
// reads the QPSQHead register only when that shows no progress.
func (qp *QP) reclaimLocked() error {
	if qp.sq == nil {
		return nil
	}
	d := qp.pd.d
	head, ok := qp.memHeadLocked()
	if !ok || head == qp.sqHead {
		h, err := d.readCSR(chip.QPReg(qp.idx, chip.QPSQHead))
		if err != nil {
			return err
		}
		head = int(h % uint64(qp.sqN))
	}
	done := (head - qp.sqHead + qp.sqN) % qp.sqN
	for len(qp.frPend) > 0 && (qp.frPend[0].slot-qp.sqHead+qp.sqN)%qp.sqN < done {
		p := qp.frPend[0]
		qp.frPend = qp.frPend[1:]
		if p.op == uapi.GOHFI_WR_FAST_REG_MR {
			d.stats.fastRegs.Add(1)
		} else {
			d.stats.localInvs.Add(1)
		}
		p.retire()
	}
	qp.sqHead = head
	return nil
}

// dropPendingLocked forgets the outstanding local operations of a QP whose
// queues the device emptied (RESET): they never ran.
func (qp *QP) dropPendingLocked() {
	for _, p := range qp.frPend {
		p.retire()
	}
	qp.frPend = nil
}

func (p frPending) retire() {
	if p.mr == nil {
		return
	}
	m := p.mr
	m.mu.Lock()
	m.pending--
	p.pl.mu.Lock()
	p.pl.busy = nil
	p.pl.mu.Unlock()
	if p.pl.owner == m && !m.gone {
		m.pool = append(m.pool, p.pl)
	}
	m.mu.Unlock()
}

// reclaimFastReg retires what the device consumed on every QP of the PD
// with local operations outstanding.
func (pd *PD) reclaimFastReg() error {
	pd.mu.RLock()
	if len(pd.frmrs) == 0 {
		pd.mu.RUnlock()
		return nil
	}
	qps := make([]*QP, 0, len(pd.qps))
	for _, qp := range pd.qps {
		qps = append(qps, qp)
	}
	pd.mu.RUnlock()
	var errs []error
	for _, qp := range qps {
		qp.mu.Lock()
		if len(qp.frPend) > 0 {
			errs = append(errs, qp.reclaimLocked())
		}
		qp.mu.Unlock()
	}
	return errors.Join(errs...)
}

// fastRegUsesLocked reports EBUSY if a fast-reg MR of the PD may reach the
// pages of pinned MR mr. pd.mu is held.
func (pd *PD) fastRegUsesLocked(mr *MR) error {
	for _, m := range pd.frmrs {
		m.mu.Lock()
		m.gcLocked()
		n := m.refs[mr]
		m.mu.Unlock()
		if n > 0 {
			return errnoErr(fmt.Sprintf("DEREG_MR: fast-reg MR %d may reach the pages of MR %d (invalidate it first)", m.handle, mr.handle), unix.EBUSY)
		}
	}
	return nil
}

// userBindingOf checks and translates a user's FAST_REG_MR (POST_SEND's
// fr_* fields): the MR is a fast-reg MR of this file, the list holds 1 to
// max_num_sg page-aligned addresses, each page inside the pinned pages of
// an MR of this file (writable if the binding lets the device write). The
// pinned MRs are recorded as used by the fast-reg MR.
func (pd *PD) userBindingOf(u *uapi.GohfiSendWR, i int) (*RegWR, error) {
	bad := func(format string, a ...any) error {
		return errnoErr(fmt.Sprintf("POST_SEND: WR %d: ", i)+fmt.Sprintf(format, a...), unix.EINVAL)
	}
	m, err := lookup(pd, pd.frmrs, u.FrMRHandle, "POST_SEND fr_mr_handle")
	if err != nil {
		return nil, err
	}
	switch {
	case u.FrPageListLen < 1 || int(u.FrPageListLen) > m.maxNumSg:
		return nil, bad("fr_page_list_len %d, MR %d holds %d pages", u.FrPageListLen, m.handle, m.maxNumSg)
	case u.FrPageShift < chip.FastRegMinPageShift || u.FrPageShift > chip.FastRegMaxPageShift:
		return nil, bad("fr_page_shift %d, want %d..%d", u.FrPageShift, chip.FastRegMinPageShift, chip.FastRegMaxPageShift)
	}
	raw := make([]byte, 8*int(u.FrPageListLen))
	if err := copyFromUser(raw, UserAddr(u.FrPageList)); err != nil {
		return nil, errFault(fmt.Sprintf("gohfi: POST_SEND: WR %d fr_page_list", i))
	}
	pgsz := uint64(1) << u.FrPageShift
	writes := u.FrAccess&(uapi.IB_ACCESS_LOCAL_WRITE|uapi.IB_ACCESS_REMOTE_WRITE|uapi.IB_ACCESS_REMOTE_ATOMIC) != 0
	b := &userBinding{iova: u.FrIova, length: u.FrLength, shift: uint(u.FrPageShift), pages: make([]uint64, u.FrPageListLen)}
	used := map[*MR]int{}
	pd.mu.RLock()
	var last *MR
	for k := range b.pages {
		va := binary.LittleEndian.Uint64(raw[k*8:])
		if va&(pgsz-1) != 0 {
			pd.mu.RUnlock()
			return nil, bad("page %d at %#x is not aligned to %d bytes", k, va, pgsz)
		}
		iova, mr := uint64(0), last
		if mr != nil {
			iova = mr.pageIOVA(va, pgsz)
		}
		if iova == 0 {
			for _, x := range pd.mrs {
				if iova = x.pageIOVA(va, pgsz); iova != 0 {
					mr = x
					break
				}
			}
		}
		if iova == 0 {
			pd.mu.RUnlock()
			return nil, bad("page %d at %#x (%d bytes) is not inside a pinned MR of this file", k, va, pgsz)
		}
		if writes && mr.access&mrAccessDeviceWrites == 0 {
			pd.mu.RUnlock()
			return nil, bad("page %d at %#x: a writable binding of MR %d, registered read-only", k, va, mr.handle)
		}
		b.pages[k], last = iova, mr
		used[mr]++
	}
	m.mu.Lock()
	if m.refs == nil {
		m.refs = map[*MR]int{}
	}
	for mr, n := range used {
		m.refs[mr] += n
	}
	m.mu.Unlock()
	pd.mu.RUnlock()
	return &RegWR{MR: m, Key: u.FrKey, Access: u.FrAccess, user: b}, nil
}

// pageIOVA is the IOVA of the page [va, va+size) if it lies in one mapped
// chunk of the MR's pinned pages, else 0.
func (mr *MR) pageIOVA(va, size uint64) uint64 {
	if va > 1<<63 || mr.odp != nil {
		return 0 // an ODP MR's pages come and go: never bound by a page list
	}
	iova, k := mr.iovaOf(uintptr(va), size)
	if k != size {
		return 0
	}
	return iova
}

func (pd *PD) ioctlAllocMR(arg UserPtr) error {
	var r uapi.GohfiAllocMR
	if err := readArg(arg, &r, "ALLOC_MR"); err != nil {
		return err
	}
	switch {
	case pd.v.maxFRPages == 0:
		return errnoErr("ALLOC_MR: device has no fast registration", unix.EOPNOTSUPP)
	case r.Reserved != 0:
		return errnoErr("ALLOC_MR: reserved field set", unix.EINVAL)
	case r.MRType != uapi.GOHFI_MR_TYPE_MEM_REG:
		return errnoErr(fmt.Sprintf("ALLOC_MR: mr_type %d", r.MRType), unix.EINVAL)
	}
	m, err := pd.AllocMR(int(r.MaxNumSg))
	if err != nil {
		return err
	}
	r.Handle, r.Lkey, r.Rkey = m.handle, m.key, m.key
	if err := writeArg(arg, &r, "ALLOC_MR"); err != nil {
		return joinUndo(err, "undo", m.Dereg())
	}
	return nil
}
