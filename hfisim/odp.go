package hfisim

import (
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/vfio/vfiouser"
)

// On-demand paging (chip.CapODP, chip/odp.go): page faults of MPTTypeODP
// regions go to the event queue in host memory and suspend the requester QP
// at the faulting packet until the driver resumes the fault; the
// TLB-invalidate command takes Config.TLBInvLatency and completes with
// RegTLBInvDone and IntSrcTLB.
//
// Only the engine goroutine translates, raises faults and writes the event
// queue; CSR writes (resume, queue head) only change state under d.mu and
// kick the engine.

// maxEQEntries bounds RegEQEntries.
const maxEQEntries = 1 << 16

// odpState is the device's ODP state, under d.mu.
type odpState struct {
	eqBase, eqEntries uint64
	eqHead, eqTail    uint64
	eqSeq             uint32
	eqEpoch           uint64 // bumped whenever the queue restarts

	nextID  uint32
	faults  map[uint32]*pfault // raised, not resumed
	backlog []*pfault          // raised, not yet written to the event queue

	faultCnt, resumeCnt, eqWaitCnt uint64
	latency                        []time.Duration // fault raised to resumed, for ODPFaultLatencies

	// last is the fault translateLocked met, read by the engine (the only
	// translator) right after the resolve that returned VendorErrPageFault.
	last faultAddr

	tlbQ []tlbCmd // TLB-invalidate commands in flight, oldest first
}

// faultAddr is where a translation faulted.
type faultAddr struct {
	key   uint32
	va    uint64
	write bool
}

// pfault is one page fault: what the EQE says and what the engine needs to
// fail the operation if the driver resumes it with an error.
type pfault struct {
	eqe      chip.EQE
	req      int    // requester QP index
	reqEpoch uint64 // its epoch when it faulted
	rs       *responder
	pk       packet // the packet, without its data
	net      bool   // a network responder's: no requester QP of this device waits on it
	waited   bool   // counted in eqWaitCnt
	raised   time.Time
}

// tlbCmd is a TLB-invalidate command in flight.
type tlbCmd struct {
	start, count uint64
	gen          uint64
	due          time.Time
}

func (o *odpState) reset() { *o = odpState{faults: map[uint32]*pfault{}} }

// tlbCommandLocked starts a TLB-invalidate command of count MTT entries
// from start. With no latency it completes at once; otherwise it completes
// Config.TLBInvLatency later, in order: until then the device may still use
// the translations it cached.
func (d *Device) tlbCommandLocked(start, count uint64) {
	d.odp.tlbQ = append(d.odp.tlbQ, tlbCmd{start: start, count: count, gen: d.gen, due: time.Now().Add(d.cfg.TLBInvLatency)})
	d.tlbQueued.Store(int32(len(d.odp.tlbQ)))
	if d.cfg.TLBInvLatency <= 0 {
		d.kickEngine()
		return
	}
	select {
	case d.tlbSig <- struct{}{}:
	default:
	}
}

// runTLBCommands completes the TLB-invalidate commands that are due. Only
// the engine goroutine calls it, between packets: every translation is
// used by the DMA of its own packet, so none taken before a flush is still
// in flight when the flush completes, as hardware drains its DMA before it
// acknowledges an invalidation.
func (d *Device) runTLBCommands() {
	if d.tlbQueued.Load() == 0 {
		return // the engine calls this between all packets: no lock, no clock
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	defer func() { d.tlbQueued.Store(int32(len(d.odp.tlbQ))) }()
	now := time.Now()
	for len(d.odp.tlbQ) > 0 && !d.odp.tlbQ[0].due.After(now) {
		c := d.odp.tlbQ[0]
		d.odp.tlbQ = d.odp.tlbQ[1:]
		if c.gen != d.gen {
			continue
		}
		d.tlbFlushLocked(c.start, c.count)
		d.raiseLocked(chip.IntSrcTLB)
	}
	if len(d.odp.tlbQ) > 0 && d.cfg.TLBInvLatency > 0 {
		select { // the worker times the next one
		case d.tlbSig <- struct{}{}:
		default:
		}
	}
}

// tlbWorker times delayed TLB-invalidate commands: when the oldest is due
// it kicks the engine, which completes it between packets
// (runTLBCommands), and waits for the next signal (a new command, or the
// engine reporting more queued).
func (d *Device) tlbWorker() {
	defer d.wg.Done()
	for {
		select {
		case <-d.done:
			return
		case <-d.tlbSig:
		}
		d.mu.Lock()
		var due time.Time
		pending := len(d.odp.tlbQ) > 0
		if pending {
			due = d.odp.tlbQ[0].due
		}
		d.mu.Unlock()
		if !pending {
			continue
		}
		if w := time.Until(due); w > 0 {
			t := time.NewTimer(w)
			select {
			case <-d.done:
				t.Stop()
				return
			case <-t.C:
			}
		}
		d.kickEngine()
	}
}

// odpRegLocked reads the ODP registers.
func (d *Device) odpRegLocked(reg uint64) (uint64, bool) {
	o := &d.odp
	switch reg {
	case chip.RegEQBase:
		return o.eqBase, true
	case chip.RegEQEntries:
		return o.eqEntries, true
	case chip.RegEQHead:
		return o.eqHead, true
	case chip.RegEQTail:
		return o.eqTail, true
	case chip.RegPFResume:
		return 0, true
	case chip.RegCntPageFaults:
		return o.faultCnt, true
	case chip.RegCntPFResumes:
		return o.resumeCnt, true
	case chip.RegCntEQWaits:
		return o.eqWaitCnt, true
	}
	return 0, false
}

// odpWriteLocked is a driver write to an ODP register; false if reg is not
// one. Refused writes are counted in ErrCntBadDesc.
func (d *Device) odpWriteLocked(reg, v uint64) bool {
	o := &d.odp
	switch reg {
	case chip.RegEQBase:
		if o.eqEntries != 0 {
			d.errs.badDesc++
			return true
		}
		o.eqBase = v
	case chip.RegEQEntries:
		o.eqHead, o.eqTail, o.eqSeq = 0, 0, 0
		o.eqEpoch++
		o.eqEntries = v
		if v != 0 && (!isPow2(v) || v < 2 || v > maxEQEntries || o.eqBase%64 != 0) {
			o.eqEntries = 0
			d.errs.badDesc++
		}
		if o.eqEntries == 0 {
			// Faults that were never reported cannot be resumed: they fail.
			for _, f := range o.backlog {
				d.failFaultLocked(f)
			}
			o.backlog = nil
		}
		d.kickEngine()
	case chip.RegEQHead:
		if v >= o.eqEntries {
			d.errs.badDesc++
			return true
		}
		o.eqHead = v
		if len(o.backlog) > 0 {
			d.kickEngine()
		}
	case chip.RegPFResume:
		d.resumeLocked(uint32(v), v&chip.PFResumeError != 0)
	default:
		return false
	}
	return true
}

// resumeLocked ends fault id: the requester QP runs again, and on error
// fails the operation on its next turn. A resume of an unknown fault, or of
// one whose QP was reset or moved to ERR meanwhile, does nothing.
func (d *Device) resumeLocked(id uint32, failed bool) {
	f, ok := d.odp.faults[id]
	if !ok {
		return
	}
	delete(d.odp.faults, id)
	d.odp.resumeCnt++
	if len(d.odp.latency) < maxLatencyLog {
		d.odp.latency = append(d.odp.latency, time.Since(f.raised))
	}
	q := &d.qps[f.req]
	if f.net {
		if q.epoch == f.reqEpoch && q.netPF == id {
			q.netPF = 0
			if failed {
				q.netPFErr = f
			}
		}
		return // the requester's RNR retry brings the request again
	}
	if q.epoch != f.reqEpoch || q.pfWait != id {
		return
	}
	q.pfWait = 0
	if failed {
		q.pfErr = f
	}
	d.kickEngine()
}

// failFaultLocked fails a fault the driver will never hear of.
func (d *Device) failFaultLocked(f *pfault) {
	delete(d.odp.faults, f.eqe.FaultID)
	q := &d.qps[f.req]
	if f.net {
		if q.epoch == f.reqEpoch && q.netPF == f.eqe.FaultID {
			q.netPF = 0
			q.netPFErr = f
		}
		return
	}
	if q.epoch == f.reqEpoch && q.pfWait == f.eqe.FaultID {
		q.pfWait = 0
		q.pfErr = f
	}
}

// pageFault turns the translation fault the engine just met (odp.last) on
// packet pk into a suspended operation: rs is nil for a requester SGE,
// sges the SGE list the access went through (nil for an rkey access). The
// requester QP stops at pk until the driver resumes the fault. Without an
// event queue the operation fails at once.
func (d *Device) pageFault(dma vfiouser.DMA, gen uint64, pk *packet, rs *responder, sges []chip.SGE) result {
	d.mu.Lock()
	o := &d.odp
	fa := o.last
	req := int(pk.src) - chip.QPNBase
	q := &d.qps[req]
	f := &pfault{req: req, reqEpoch: q.epoch, rs: rs, pk: *pk, raised: time.Now()}
	f.pk.data = nil
	e := &f.eqe
	e.Type, e.Key, e.VA, e.ReqQP = chip.EQETypePageFault, fa.key, fa.va, uint32(req)
	e.Length = uint32(min(faultLength(fa, pk, sges), 1<<32-1))
	if fa.write {
		e.Flags |= chip.EQEFlagWrite
	}
	if rs == nil {
		e.QP, e.PD, e.WQE = uint32(req), q.pd(), uint32(q.sqHead)
	} else {
		e.Flags |= chip.EQEFlagResponder
		e.QP, e.PD, e.WQE = uint32(rs.idx), rs.pd, chip.EQEWQENone
		if sges != nil {
			e.WQE = uint32(d.qps[rs.idx].rqHead)
		}
	}
	o.faultCnt++
	if o.eqEntries == 0 || d.gen != gen {
		d.mu.Unlock()
		return d.faultError(dma, gen, f)
	}
	q.pfWait = d.queueFaultLocked(f)
	d.mu.Unlock()
	d.flushEQ(dma, gen)
	return result{stall: true}
}

// queueFaultLocked gives fault f its id (1, 2, ... never 0), keeps it
// until resumed and queues its EQE for flushEQ; it returns the id.
func (d *Device) queueFaultLocked(f *pfault) uint32 {
	o := &d.odp
	o.nextID++
	if o.nextID == 0 {
		o.nextID = 1
	}
	f.eqe.FaultID = o.nextID
	o.faults[f.eqe.FaultID] = f
	o.backlog = append(o.backlog, f)
	return f.eqe.FaultID
}

// netPageFault raises the page fault (odp.last) that the network
// responder QP n met on the request lp: through the receive WQE's sges, or
// (sges nil) through the request's rkey up to end (lp nil for a READ). No QP of this device is
// suspended: the responder answers the faulting request, and its
// retries, with RNR NAK until the driver resumes the fault (rcFaultWait).
// It reports false if the fault cannot be reported (no event queue): the
// request then fails as if resumed with an error.
func (d *Device) netPageFault(n int, s rcSnap, rs *responder, lp *packet, sges []chip.SGE, end uint64) bool {
	d.mu.Lock()
	o := &d.odp
	fa := o.last
	q := &d.qps[n]
	f := &pfault{req: n, reqEpoch: s.epoch, rs: rs, net: true, raised: time.Now()}
	if lp != nil {
		f.pk = *lp
		f.pk.data = nil
	}
	e := &f.eqe
	e.Type, e.Key, e.VA, e.QP, e.ReqQP, e.PD = chip.EQETypePageFault, fa.key, fa.va, uint32(n), uint32(n), s.pd
	e.Flags = chip.EQEFlagResponder
	if fa.write {
		e.Flags |= chip.EQEFlagWrite
	}
	e.WQE = chip.EQEWQENone
	l := uint64(1)
	if sges != nil {
		e.WQE = uint32(q.rqHead)
		l = faultLength(fa, lp, sges)
	} else if end > fa.va {
		l = end - fa.va
	}
	e.Length = uint32(min(l, 1<<32-1))
	o.faultCnt++
	if o.eqEntries == 0 || d.gen != s.gen || q.epoch != s.epoch {
		d.mu.Unlock()
		return false
	}
	q.netPF = d.queueFaultLocked(f)
	d.mu.Unlock()
	d.flushEQ(s.dma, s.gen)
	return true
}

// netFaultState reports network responder QP n's page fault: pending (not
// resumed yet), or resumed with an error (taken: the caller fails the
// request).
func (d *Device) netFaultState(n int, s rcSnap) (pending bool, failed *pfault) {
	d.mu.Lock()
	defer d.mu.Unlock()
	q := &d.qps[n]
	if q.epoch != s.epoch || d.gen != s.gen {
		return false, nil
	}
	failed, q.netPFErr = q.netPFErr, nil
	return q.netPF != 0, failed
}

// faultLength is how many bytes from the faulting address the operation
// still accesses through the faulting key: the rest of the SGE that holds
// it, or of the RDMA message (8 bytes for an atomic).
func faultLength(fa faultAddr, pk *packet, sges []chip.SGE) uint64 {
	if sges == nil {
		end := pk.raddr + pk.total
		if isAtomic(pk.op) {
			end = pk.raddr + 8
		}
		if end > fa.va {
			return end - fa.va
		}
		return 1
	}
	for _, g := range sges {
		if g.Lkey == fa.key && fa.va >= g.Addr && fa.va-g.Addr < uint64(g.Length) {
			return g.Addr + uint64(g.Length) - fa.va
		}
	}
	return 1
}

// faultError is the outcome of an operation whose fault failed: a requester
// SGE fails the WQE with LOC_PROT_ERR (and gives back the receive WQE a
// SEND was filling); a responder access NAKs (REM_ACCESS_ERR, both QPs to
// ERR), a SEND's receive WQE completing with LOC_PROT_ERR.
func (d *Device) faultError(dma vfiouser.DMA, gen uint64, f *pfault) result {
	pk := &f.pk
	switch {
	case f.rs == nil:
		if needsRecv(pk.op) {
			d.releaseClaim(pk.dst, pk.src)
		}
		return fail(uapi.GOHFI_WC_LOC_PROT_ERR, chip.VendorErrPageFault)
	case f.eqe.WQE != chip.EQEWQENone:
		return d.respFail(dma, gen, f.rs, pk, uapi.GOHFI_WC_LOC_PROT_ERR, fail(uapi.GOHFI_WC_REM_ACCESS_ERR, chip.VendorErrPageFault))
	}
	return d.nak(f.rs, chip.VendorErrPageFault)
}

// failedFault takes the fault of QP n that the driver resumed with an
// error, if any.
func (d *Device) failedFault(n int) *pfault {
	d.mu.Lock()
	defer d.mu.Unlock()
	f := d.qps[n].pfErr
	d.qps[n].pfErr = nil
	return f
}

// flushEQ writes the faults waiting for room to the event queue, seq word
// last, raising IntSrcEQ for each, and reports whether it wrote any.
func (d *Device) flushEQ(dma vfiouser.DMA, gen uint64) bool {
	wrote := false
	for {
		d.mu.Lock()
		o := &d.odp
		if len(o.backlog) == 0 || d.gen != gen || o.eqEntries == 0 {
			d.mu.Unlock()
			return wrote
		}
		f := o.backlog[0]
		if (o.eqTail+1)%o.eqEntries == o.eqHead {
			if !f.waited {
				f.waited = true
				o.eqWaitCnt++
			}
			d.mu.Unlock()
			return wrote
		}
		slot, epoch := o.eqTail, o.eqEpoch
		addr := o.eqBase + slot*chip.EQESize
		e := f.eqe
		e.Seq = uapi.NextSeq(o.eqSeq)
		d.mu.Unlock()

		var raw [chip.EQESize]byte
		e.Marshal(raw[:])
		err := writeSeqLast(dma, addr, raw[:], chip.EQESeqOff, chip.EQESize-chip.EQESeqOff)

		d.mu.Lock()
		if d.gen != gen {
			d.mu.Unlock()
			return wrote
		}
		if len(o.backlog) > 0 && o.backlog[0] == f {
			o.backlog = o.backlog[1:]
		}
		switch {
		case err != nil:
			d.countDMAErrLocked(err)
			d.failFaultLocked(f)
			d.raiseLocked(chip.IntSrcError)
		case o.eqEpoch != epoch:
			d.failFaultLocked(f) // the queue restarted under us
		default:
			o.eqSeq = e.Seq
			o.eqTail = (slot + 1) % o.eqEntries
			d.raiseLocked(chip.IntSrcEQ)
			wrote = true
		}
		d.mu.Unlock()
	}
}

// PeekMR reads len(p) bytes at va of the region key names as the device
// sees them now: through its TLB, else the MTT, without caching anything.
// It reports false, reading nothing, if a page (or an implicit region's
// child) is not present. A
// diagnostic for tests (the device's view of an ODP region against the
// process's).
func (d *Device) PeekMR(key uint32, va uint64, p []byte) (bool, error) {
	d.mu.Lock()
	idx := chip.MPTIndex(key)
	if idx >= uint32(d.cfg.MPTEntries) || d.dma == nil {
		d.mu.Unlock()
		return false, nil
	}
	e := d.mptEntry(idx)
	if e.Key != key || e.Flags&chip.MPTStateMask != chip.MPTStateValid || va < e.IOVA || uint64(len(p)) > e.Length || va-e.IOVA > e.Length-uint64(len(p)) {
		d.mu.Unlock()
		return false, nil
	}
	var spans []span
	for a, n := va, uint64(len(p)); n > 0; {
		r := e
		if e.Flags&chip.MPTTypeMask == chip.MPTTypeImplicit {
			var verr uint32
			if r, verr = d.implicitChildLocked(&e, a, false); verr != chip.VendorErrNone {
				d.mu.Unlock()
				return false, nil
			}
		}
		i := uint32(uint64(r.MTTFirst) + (a-r.IOVA&^0xfff)>>12)
		ent, ok := d.tlb.get(i)
		if !ok {
			ent = d.mtt.load64(uint64(i) * chip.MTTEntrySize)
		}
		if ent&chip.MTTPresent == 0 {
			d.mu.Unlock()
			return false, nil
		}
		k := min(n, 4096-a&0xfff)
		spans = append(spans, span{ent&chip.MTTAddrMask + a&0xfff, int(k)})
		a, n = a+k, n-k
	}
	dma := d.dma
	d.mu.Unlock()
	return true, dmaSpans(dma, spans, p, false)
}

// MaxTLBInvLatency bounds Config.TLBInvLatency.
const MaxTLBInvLatency = time.Second

// maxLatencyLog bounds the fault latencies kept for ODPFaultLatencies.
const maxLatencyLog = 1 << 16

// ODPFaultLatencies returns, and forgets, how long each page fault took
// from the device raising it to the driver's resume (the first 65536 since
// the last call or reset): a measurement hook, like a logic analyser.
func (d *Device) ODPFaultLatencies() []time.Duration {
	d.mu.Lock()
	defer d.mu.Unlock()
	l := d.odp.latency
	d.odp.latency = nil
	return l
}
