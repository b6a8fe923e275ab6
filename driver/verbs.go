package driver

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// The verbs engine (chip.CapVerbs): memory regions, completion queues and
// reliable-connected queue pairs, in the shape of the kernel's verbs layer.
// This file holds the device-wide state (limits, the MPT and MTT in BAR4,
// their allocators, the TLB flush) and the per-file protection domain with
// its handle tables; mr.go, cq.go and qp.go hold the objects. The ioctls
// (file_ops.go) call the Go API below: PD.RegMR, PD.CreateCQ, PD.CreateQP,
// MR.Dereg, CQ.Poll, QP.Modify, QP.PostSend, ... (ib_reg_mr, ib_create_cq,
// ib_post_send); there is one implementation.
//
// Lock order: File.mu (held for every ioctl), then PD.mu (the file's verbs
// lock: its handle tables), then an object's own lock (CQ.mu, QP.mu), then
// verbsDev.mu (device-wide allocators) or verbsDev.tlbMu. Pinning, DMA
// mapping and copies to and from user space run without PD.mu.

// verbsAttr are the device's verbs limits as probe read them.
type verbsAttr struct {
	MPTEntries int
	NumQPs     int
	NumCQs     int
	MaxQPWR    int // ring entries, power of two
	MaxCQE     int // ring entries, power of two
	MaxSGE     int
	MaxMsgSize uint64
}

// verbsDev is a device's verbs engine as the driver sees it.
type verbsDev struct {
	d    *Device
	attr verbsAttr

	bar4 []byte // BAR4 mapped: MTT, then the MPT at chip.MPTOffset
	mtt  []byte
	mpt  []byte

	mu      sync.Mutex
	mptUsed []bool  // by MPT index; index 0 is never handed out
	variant []uint8 // last key variant per MPT index, rotated per registration
	mttFree *rangeAlloc
	qps     []*QP // by QP index, device-wide (RTR looks up destinations)
	cqs     []*CQ // by CQ index

	maxFRPages int  // RegMaxFastRegPages; 0: no fast registration (fastreg.go)
	dbRec      bool // QPs get doorbell records (chip.CapDBRec and Params.DBRec)
	cqHeadRec  bool // CQs get consumer-index records (chip.CapCQHeadRec)

	tlbMu  sync.Mutex
	tlbSeq uint64 // sequence of the last flush started
	// How the waits for a flush ended: woken by IntSrcTLB, or by the
	// 10 ms timer (an interrupt that did not come or came late).
	tlbIntrWakes, tlbTimerWakes atomic.Uint64

	odp *odpDev // nil without chip.CapODP

	handles atomic.Uint32 // handles are device-wide unique and never reused soon
}

// verbsRegs are the verbs capability registers, checked against the
// driver's encodings like capRegs.
var verbsRegs = []struct {
	name     string
	off      uint64
	min, max uint64
	pow2     bool
	set      func(a *verbsAttr, v uint64)
}{
	{"MPTEntries", chip.RegMPTEntries, 1, chip.MaxMPTEntries, false, func(a *verbsAttr, v uint64) { a.MPTEntries = int(v) }},
	{"NumQPs", chip.RegNumQPs, 1, chip.MaxQPs, false, func(a *verbsAttr, v uint64) { a.NumQPs = int(v) }},
	{"NumCQs", chip.RegNumCQs, 1, chip.MaxCQs, false, func(a *verbsAttr, v uint64) { a.NumCQs = int(v) }},
	// A ring holds one WQE less than its entries (producer and consumer
	// indices modulo the size): at least 2.
	{"MaxQPWR", chip.RegMaxQPWR, 2, chip.MaxQPWR, true, func(a *verbsAttr, v uint64) { a.MaxQPWR = int(v) }},
	{"MaxCQE", chip.RegMaxCQE, 2, chip.MaxCQE, true, func(a *verbsAttr, v uint64) { a.MaxCQE = int(v) }},
	{"MaxSGE", chip.RegMaxSGE, 1, chip.WQEMaxSGE, false, func(a *verbsAttr, v uint64) { a.MaxSGE = int(v) }},
	// byte_len of a completion is 32 bits.
	{"MaxMsgSize", chip.RegMaxMsgSize, 1, 1 << 31, false, func(a *verbsAttr, v uint64) { a.MaxMsgSize = v }},
}

// probeVerbs reads the verbs registers of a device with chip.CapVerbs,
// refuses values outside the driver's limits with EIO, and maps BAR4 (MTT
// and MPT) once.
func (d *Device) probeVerbs() error {
	if d.info.CapFlags&chip.CapVerbs == 0 {
		return nil
	}
	v := &verbsDev{d: d}
	for _, r := range verbsRegs {
		x, err := d.readCSR(r.off)
		if err != nil {
			return err
		}
		if x < r.min || x > r.max || r.pow2 && !isPow2(x) {
			p := ""
			if r.pow2 {
				p = "a power of two "
			}
			return fmt.Errorf("verbs register %s (%#x) reads %d (%#x): want %sfrom %d to %d: %w", r.name, r.off, x, x, p, r.min, r.max, unix.EIO)
		}
		r.set(&v.attr, x)
	}
	if err := d.probeFastReg(v); err != nil {
		return err
	}
	if d.info.MTTEntries == 0 {
		// Nothing could be registered: the engine is not offered (every
		// verbs call is EOPNOTSUPP), the rest of the device is.
		return nil
	}
	mptOff := chip.MPTOffset(d.info.MTTEntries)
	need := mptOff + uint64(v.attr.MPTEntries)*chip.MPTEntrySize
	ri, err := d.vdev.RegionInfo(chip.MTTBar)
	if err != nil {
		return fmt.Errorf("MTT region: %w", err)
	}
	if ri.Size < need || !ri.Mappable(0, need) {
		return fmt.Errorf("MTT/MPT region (BAR%d) %d bytes, mappable %v; MTTEntries %d and MPTEntries %d need %d: %w",
			chip.MTTBar, ri.Size, ri.Mappable(0, need), d.info.MTTEntries, v.attr.MPTEntries, need, unix.EIO)
	}
	if v.bar4, err = d.vdev.MmapRegion(chip.MTTBar, 0, need, unix.PROT_READ|unix.PROT_WRITE); err != nil {
		return fmt.Errorf("mmap MTT/MPT: %w", err)
	}
	v.mtt = v.bar4[:uint64(d.info.MTTEntries)*chip.MTTEntrySize]
	v.mpt = v.bar4[mptOff:need]
	// Whatever a previous owner left is not ours: every MPT entry starts
	// free. (MTT entries are reached only through a valid MPT entry, and
	// writing all of a large MTT would populate its pages.)
	for off := 0; off < len(v.mpt); off += 8 {
		if load64(v.mpt, off) != 0 {
			store64(v.mpt, off, 0)
		}
	}
	if v.tlbSeq, err = d.readCSR(chip.RegTLBInvDone); err != nil {
		return errors.Join(err, unix.Munmap(v.bar4))
	}
	v.mptUsed = make([]bool, v.attr.MPTEntries)
	v.variant = make([]uint8, v.attr.MPTEntries)
	if v.attr.MPTEntries > 0 {
		v.mptUsed[0] = true // key 0 names no region
	}
	v.mttFree = newRangeAlloc(d.info.MTTEntries)
	v.qps = make([]*QP, v.attr.NumQPs)
	v.cqs = make([]*CQ, v.attr.NumCQs)
	if d.info.CapFlags&chip.CapODP != 0 {
		v.odp = newODPDev(d, v)
	}
	v.dbRec = d.info.CapFlags&chip.CapDBRec != 0 && !d.m.params.NoDBRec
	v.cqHeadRec = d.info.CapFlags&chip.CapCQHeadRec != 0
	d.verbs = v
	return nil
}

// unmapVerbs releases BAR4's mapping (remove, failed probe).
func (v *verbsDev) unmap() error {
	if v == nil || v.bar4 == nil {
		return nil
	}
	err := unix.Munmap(v.bar4)
	v.bar4, v.mtt, v.mpt = nil, nil, nil
	return err
}

// Usable limits as QUERY_DEVICE reports them.
func (v *verbsDev) maxQPWR() int { return v.attr.MaxQPWR - 1 }
func (v *verbsDev) maxCQE() int  { return cqUsable(v.attr.MaxCQE) }
func (v *verbsDev) maxMR() int   { return v.attr.MPTEntries - 1 }

func (v *verbsDev) newHandle() uint32 {
	for {
		if h := v.handles.Add(1); h != 0 {
			return h
		}
	}
}

// allocMPT takes a free MPT index and gives it the next key variant.
func (v *verbsDev) allocMPT() (uint32, uint32, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	for i, used := range v.mptUsed {
		if !used {
			v.mptUsed[i] = true
			v.variant[i]++
			return uint32(i), uint32(i)<<8 | uint32(v.variant[i]), nil
		}
	}
	return 0, 0, fmt.Errorf("all %d MPT entries in use: %w", len(v.mptUsed)-1, unix.ENOSPC)
}

func (v *verbsDev) freeMPT(idx uint32) {
	v.mu.Lock()
	v.mptUsed[idx] = false
	v.mu.Unlock()
}

func (v *verbsDev) allocMTT(n int) (int, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	first, ok := v.mttFree.alloc(n)
	if !ok {
		return 0, fmt.Errorf("no run of %d free MTT entries (of %d): %w", n, v.d.info.MTTEntries, unix.ENOSPC)
	}
	return first, nil
}

func (v *verbsDev) freeMTT(first, n int) {
	v.mu.Lock()
	v.mttFree.free(first, n)
	v.mu.Unlock()
}

// tlbFlushTimeout bounds the wait for RegTLBInvDone.
const tlbFlushTimeout = 2 * time.Second

// flushTLB drops the device's cached translations of MTT entries
// [first, first+count) and returns once the device reports the flush done
// (RegTLBInvDone reaches the flush's sequence number): from then on the
// device cannot use the old translations, so their IOVAs may be unmapped
// and reused. Flushes are serialised; each one bumps the sequence.
func (v *verbsDev) flushTLB(first, count int) error {
	d := v.d
	v.tlbMu.Lock()
	defer v.tlbMu.Unlock()
	if err := d.writeCSR(chip.RegTLBInvStart, uint64(first)); err != nil {
		return err
	}
	if err := d.writeCSR(chip.RegTLBInvCount, uint64(count)); err != nil {
		return err
	}
	v.tlbSeq++
	d.stats.tlbFlushes.Add(1)
	start := time.Now()
	deadline := start.Add(tlbFlushTimeout)
	wake := v.tlbWake()
	for spin := 0; ; spin++ {
		done, err := d.readCSR(chip.RegTLBInvDone)
		if err != nil {
			return err
		}
		if int64(done-v.tlbSeq) >= 0 {
			d.trace(TraceTLBFlush, -1, uint64(first), uint64(count), uint64(time.Since(start)))
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("TLB flush %d of MTT %d+%d: device reports %d after %v: %w", v.tlbSeq, first, count, done, tlbFlushTimeout, unix.EIO)
		}
		if spin > 16 {
			v.waitTLBInterrupt(wake, 50*time.Microsecond)
		}
		wake = v.tlbWake()
	}
}

// rangeAlloc hands out runs of MTT entries, first fit over a sorted list of
// free runs that coalesces on free.
type rangeAlloc struct{ runs []run }

type run struct{ start, n int }

func newRangeAlloc(n int) *rangeAlloc { return &rangeAlloc{runs: []run{{0, n}}} }

func (a *rangeAlloc) alloc(n int) (int, bool) {
	for i, r := range a.runs {
		if r.n >= n {
			a.runs[i].start += n
			a.runs[i].n -= n
			if a.runs[i].n == 0 {
				a.runs = append(a.runs[:i], a.runs[i+1:]...)
			}
			return r.start, true
		}
	}
	return 0, false
}

func (a *rangeAlloc) free(start, n int) {
	i := 0
	for i < len(a.runs) && a.runs[i].start < start {
		i++
	}
	a.runs = append(a.runs, run{})
	copy(a.runs[i+1:], a.runs[i:])
	a.runs[i] = run{start, n}
	if i+1 < len(a.runs) && a.runs[i].start+a.runs[i].n == a.runs[i+1].start {
		a.runs[i].n += a.runs[i+1].n
		a.runs = append(a.runs[:i+1], a.runs[i+2:]...)
	}
	if i > 0 && a.runs[i-1].start+a.runs[i-1].n == a.runs[i].start {
		a.runs[i-1].n += a.runs[i].n
		a.runs = append(a.runs[:i], a.runs[i+1:]...)
	}
}

// PD is a protection domain (ib_pd): one per open file with a context,
// numbered context + 1 so that 0 is never a PD. It owns the file's MRs,
// CQs and QPs, found by handle; a handle of another file is not found.
type PD struct {
	f   *File
	d   *Device
	v   *verbsDev
	num uint32

	// mu is the file's verbs lock: it guards the tables and closed. Poll
	// takes it shared to look at the CQs without the file's lock.
	mu     sync.RWMutex
	mrs    map[uint32]*MR
	frmrs  map[uint32]*FastRegMR
	cqs    map[uint32]*CQ
	qps    map[uint32]*QP
	closed unix.Errno // set by release: EBADF or ENXIO
}

// Num is the PD's number as the device knows it.
func (pd *PD) Num() uint32 { return pd.num }

// errNoVerbs is the error of a verbs call on a device without the engine.
func errNoVerbs(what string) error {
	return errnoErr(what+": device has no verbs engine", unix.EOPNOTSUPP)
}

// PD returns the file's protection domain: EINVAL without a context,
// EOPNOTSUPP on a device without the verbs engine.
func (f *File) PD() (*PD, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil, errnoErr("PD of a closed file", f.closedErr)
	}
	return f.pdLocked("PD")
}

func (f *File) pdLocked(what string) (*PD, error) {
	if f.uctxt == nil {
		return nil, errnoErr(what+" without a context", unix.EINVAL)
	}
	if f.d.verbs == nil {
		return nil, errNoVerbs(what)
	}
	if f.pd == nil {
		f.pd = &PD{f: f, d: f.d, v: f.d.verbs, num: uint32(f.uctxt.ctxt) + 1,
			mrs: map[uint32]*MR{}, frmrs: map[uint32]*FastRegMR{}, cqs: map[uint32]*CQ{}, qps: map[uint32]*QP{}}
	}
	return f.pd, nil
}

// insert adds an object to one of the PD's tables under a fresh handle; it
// fails with the close reason once the file is closing.
func insert[T any](pd *PD, m map[uint32]T, obj T, setHandle func(uint32)) error {
	pd.mu.Lock()
	defer pd.mu.Unlock()
	if pd.closed != 0 {
		return pd.closed
	}
	h := pd.v.newHandle()
	setHandle(h)
	m[h] = obj
	return nil
}

// lookup finds handle h in a table of the PD: EINVAL for a handle this
// file does not hold (never created, destroyed, or another file's).
// destroyByHandle is DESTROY_CQ and DESTROY_QP: the gohfi_handle argument
// names an object of this file's table, which is destroyed.
func destroyByHandle[T interface{ Destroy() error }](pd *PD, arg UserPtr, m map[uint32]T, what string) error {
	h, err := pd.readHandle(arg, what)
	if err != nil {
		return err
	}
	obj, err := lookup(pd, m, h, what)
	if err != nil {
		return err
	}
	return obj.Destroy()
}

func lookup[T any](pd *PD, m map[uint32]T, h uint32, what string) (T, error) {
	pd.mu.RLock()
	defer pd.mu.RUnlock()
	obj, ok := m[h]
	if !ok {
		var zero T
		return zero, errnoErr(fmt.Sprintf("%s: no handle %d in this file", what, h), unix.EINVAL)
	}
	return obj, nil
}

// close tears the PD down (file close, device removal): QPs to RESET and
// freed, fast-reg MRs (valid or not) then pinned MRs deregistered with
// their TLB entries flushed, CQs freed;
// nothing stays pinned or mapped. With the device dead, nothing is written
// to it and memory is released all the same.
func (pd *PD) close(why unix.Errno) error {
	pd.mu.Lock()
	pd.closed = why
	qps, cqs, mrs, frmrs := pd.qps, pd.cqs, pd.mrs, pd.frmrs
	pd.qps, pd.cqs, pd.mrs, pd.frmrs = map[uint32]*QP{}, map[uint32]*CQ{}, map[uint32]*MR{}, map[uint32]*FastRegMR{}
	pd.mu.Unlock()
	var errs []error
	for _, qp := range qps {
		errs = append(errs, qp.destroy())
	}
	for _, m := range frmrs {
		errs = append(errs, m.dereg())
	}
	for _, mr := range mrs {
		errs = append(errs, mr.dereg())
	}
	for _, cq := range cqs {
		errs = append(errs, cq.destroy())
	}
	return errors.Join(errs...)
}

// verbsIoctl runs the verbs commands; false when cmd is not one.
func (f *File) verbsIoctl(cmd uint32, arg UserPtr) (bool, error) {
	var h func(*PD, UserPtr) error
	name := ""
	switch cmd {
	case uapi.GOHFI_IOCTL_REG_MR:
		h, name = (*PD).ioctlRegMR, "REG_MR"
	case uapi.GOHFI_IOCTL_DEREG_MR:
		h, name = (*PD).ioctlDeregMR, "DEREG_MR"
	case uapi.GOHFI_IOCTL_MR_STATS:
		h, name = (*PD).ioctlMRStats, "MR_STATS"
	case uapi.GOHFI_IOCTL_CREATE_CQ:
		h, name = (*PD).ioctlCreateCQ, "CREATE_CQ"
	case uapi.GOHFI_IOCTL_DESTROY_CQ:
		h, name = (*PD).ioctlDestroyCQ, "DESTROY_CQ"
	case uapi.GOHFI_IOCTL_POLL_CQ:
		h, name = (*PD).ioctlPollCQ, "POLL_CQ"
	case uapi.GOHFI_IOCTL_CREATE_QP:
		h, name = (*PD).ioctlCreateQP, "CREATE_QP"
	case uapi.GOHFI_IOCTL_MODIFY_QP:
		h, name = (*PD).ioctlModifyQP, "MODIFY_QP"
	case uapi.GOHFI_IOCTL_DESTROY_QP:
		h, name = (*PD).ioctlDestroyQP, "DESTROY_QP"
	case uapi.GOHFI_IOCTL_POST_SEND:
		h, name = (*PD).ioctlPostSend, "POST_SEND"
	case uapi.GOHFI_IOCTL_POST_RECV:
		h, name = (*PD).ioctlPostRecv, "POST_RECV"
	case uapi.GOHFI_IOCTL_ADVISE_MR:
		h, name = (*PD).ioctlAdviseMR, "ADVISE_MR"
	case uapi.GOHFI_IOCTL_ALLOC_MR:
		h, name = (*PD).ioctlAllocMR, "ALLOC_MR"
	default:
		return false, nil
	}
	pd, err := f.pdLocked(name)
	if err != nil {
		return true, err
	}
	return true, h(pd, arg)
}

// readArg copies an ioctl argument struct in; EFAULT if it cannot be read.
// The struct's Go layout is the C one (argBytes), so the copy lands in it
// directly.
func readArg[T any, P abiStruct[T]](arg UserPtr, v P, what string) error {
	if err := copyFromUser(argBytes[T](v), arg); err != nil {
		return errFault("gohfi: " + what)
	}
	return nil
}

// writeArg copies an argument struct back out.
func writeArg[T any, P abiStruct[T]](arg UserPtr, v P, what string) error {
	return wrapFault(what, copyToUser(arg, argBytes[T](v)))
}

// writeBack is writeArg deferred by an ioctl that returns results in its
// argument on every return: a failure to write becomes *ferr unless the
// ioctl failed already.
func writeBack[T any, P abiStruct[T]](arg UserPtr, v P, what string, ferr *error) {
	if err := writeArg(arg, v, what); err != nil && *ferr == nil {
		*ferr = err
	}
}

// takeSlot puts x in the first free slot of a device table (QPs, CQs) and
// returns its index, or -1 when every slot is taken.
func takeSlot[T any](mu *sync.Mutex, table []*T, x *T) int {
	mu.Lock()
	defer mu.Unlock()
	for i, y := range table {
		if y == nil {
			table[i] = x
			return i
		}
	}
	return -1
}
