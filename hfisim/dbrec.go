package hfisim

import (
	"encoding/binary"
	"sync/atomic"
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/vfio/vfiouser"
)

// Doorbell records (chip.QPDBRecAddr): the driver stores producer indices
// in host memory and the engine polls them while it is awake, so a doorbell
// costs the driver a store and a load instead of a register write. The
// notify flag in each record tells the driver when the engine sleeps and a
// register doorbell is needed; chip/verbs.go has the protocol.

// DefaultDBPollIdle is how long the engine polls doorbell records after its
// last work before it sleeps (Config.DBPollIdle 0). It polls only while no
// CQ was armed since it woke, nor in the armQuiet before: a consumer that
// arms CQs waits for interrupts, and on few cores the polling engine would
// take the CPU its wake-up and its next post need (8 B WRITE latency 63 ->
// 150 us on 2 cores; an interrupt-driven ULP, ulp/frwr, 23-35% fewer
// requests per second). A consumer that polls without arming (perftest,
// a fast-registration loop) keeps it polling.
const DefaultDBPollIdle = 50 * time.Microsecond

// armQuiet is how long after a CQ was armed the engine does not poll
// doorbell records: a consumer working off interrupts arms again for every
// wait, far more often than this.
const armQuiet = 2 * time.Millisecond

// consumersPoll reports whether no CQ was armed lately (armQuiet).
func (d *Device) consumersPoll() bool {
	return time.Now().UnixNano()-d.lastArm.Load() >= int64(armQuiet)
}

// dbRecRef is one doorbell record as the engine found it at the start of a
// pass: which QP or context, where, and its epoch (a QP's RESET and ERR, a
// context's enable and disable change it, and an index read across such a
// change is dropped).
type dbRecRef struct {
	n            int
	ctxt         bool // n is a context (chip.CtxtDBRecAddr), not a QP
	addr         uint64
	epoch        uint64
	awake        bool
	recSQ, recRQ uint64 // the indices last read from the record, as the pass began
}

func (d *Device) dbPollIdle() time.Duration {
	switch {
	case d.cfg.DBPollIdle == 0:
		return DefaultDBPollIdle
	case d.cfg.DBPollIdle < 0:
		return 0
	}
	return d.cfg.DBPollIdle
}

// writeQPDBLocked is a driver write to QP n's doorbell block. A record
// address that is not DBRecAlign-aligned is refused (ErrCntVerbs). The
// indices last read become the QP's current tails, so a record that holds
// them changes nothing; the engine wakes and polls the record.
func (d *Device) writeQPDBLocked(n int, r, v uint64) {
	q := &d.qps[n]
	if r == chip.QPDBRing {
		// What the ioeventfd of the register does too (dbring.go), but
		// that cannot count a ring for a QP without a record.
		if q.dbAddr == 0 || q.state == stateReset {
			d.errs.verbs++
			return
		}
		d.kickEngine()
		return
	}
	if r != chip.QPDBRecAddr {
		return // reserved
	}
	if v%chip.DBRecAlign != 0 {
		d.errs.verbs++
		return
	}
	q.dbAddr = v
	q.recSQ, q.recRQ, q.recAwake = q.sqTail, q.rqTail, false
	d.dbQPsChangedLocked()
	d.kickEngine()
}

// dbQPsChangedLocked lists again the QPs that have a doorbell record
// address, after one was set or cleared: the engine's snapshot of the
// records, taken at every poll, looks at those alone instead of every QP.
func (d *Device) dbQPsChangedLocked() {
	d.dbQPs = d.dbQPs[:0]
	for n := range d.qps {
		if d.qps[n].dbAddr != 0 {
			d.dbQPs = append(d.dbQPs, n)
		}
	}
}

// snapshotRecords lists in d.dbPoll the doorbell records of the QPs not in
// RESET and of the enabled contexts (the engine's own slice: only the
// engine calls this).
func (d *Device) snapshotRecords() (vfiouser.DMA, uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.dbPoll = d.dbPoll[:0]
	for _, n := range d.dbQPs {
		if q := &d.qps[n]; q.state != stateReset && q.dbAddr != 0 {
			d.dbPoll = append(d.dbPoll, dbRecRef{n: n, addr: q.dbAddr, epoch: q.epoch, awake: q.recAwake, recSQ: q.recSQ, recRQ: q.recRQ})
		}
	}
	for n := range d.ctxts {
		if c := &d.ctxts[n]; c.dbAddr != 0 && c.enabled() {
			d.dbPoll = append(d.dbPoll, dbRecRef{n: n, ctxt: true, addr: c.dbAddr, epoch: c.epoch, awake: c.recAwake, recSQ: c.recSQ})
		}
	}
	return d.dma, d.gen
}

// recordLocked reports whether r still names the record of its QP or
// context as the snapshot found it (same device generation, epoch and
// address).
func (d *Device) recordLocked(gen uint64, r dbRecRef) bool {
	if d.gen != gen {
		return false
	}
	if r.ctxt {
		c := &d.ctxts[r.n]
		return c.epoch == r.epoch && c.dbAddr == r.addr && c.enabled()
	}
	q := &d.qps[r.n]
	return q.epoch == r.epoch && q.dbAddr == r.addr
}

// setAwakeLocked notes whether the engine cleared r's notify flag since it
// last set it.
func (d *Device) setAwakeLocked(r dbRecRef, awake bool) {
	if r.ctxt {
		d.ctxts[r.n].recAwake = awake
	} else {
		d.qps[r.n].recAwake = awake
	}
}

// pollRecords reads every doorbell record and takes the indices that
// changed; it reports whether any did. With wake, it first clears the
// notify flag of each record it has not cleared since it last set it (the
// engine is awake: the driver may stop ringing registers).
func (d *Device) pollRecords(wake bool) bool {
	dma, gen := d.snapshotRecords()
	if dma == nil {
		return false
	}
	busy := false
	for _, r := range d.dbPoll {
		if wake && !r.awake {
			if err := write32(dma, r.addr+chip.DBRecFlags, 0); err != nil {
				d.dbRecFault(gen, r, err)
				continue
			}
			d.mu.Lock()
			if d.recordLocked(gen, r) {
				d.setAwakeLocked(r, true)
			}
			d.mu.Unlock()
		}
		b := d.dbBuf[:]
		if r.ctxt {
			b = b[:4] // sq_tail alone: rq_tail is reserved
		}
		if err := dma.Read(r.addr+chip.DBRecSQTail, b); err != nil {
			d.dbRecFault(gen, r, err)
			continue
		}
		sq, rq := uint64(binary.LittleEndian.Uint32(b[0:])), r.recRQ
		if !r.ctxt {
			rq = uint64(binary.LittleEndian.Uint32(b[4:]))
		}
		if sq == r.recSQ && rq == r.recRQ {
			// Nothing new since the pass began: no lock. Only the engine
			// takes records, and a RESET or a new address meanwhile
			// (which the snapshot may miss) is seen on the next pass.
			continue
		}
		if d.takeRecord(gen, r, sq, rq) {
			busy = true
		}
	}
	return busy
}

// takeRecord applies the indices read from a record, as register doorbells
// would, when they differ from the ones last read.
func (d *Device) takeRecord(gen uint64, r dbRecRef, sq, rq uint64) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if r.ctxt {
		c := &d.ctxts[r.n]
		if !d.recordLocked(gen, r) || sq == c.recSQ {
			return false
		}
		c.recSQ = sq
		if sq >= c.sqEntries {
			c.errCnt++ // as a register write out of range
			return false
		}
		moved := sq != c.sqTail
		c.sqTail = sq
		return moved
	}
	q := &d.qps[r.n]
	if d.gen != gen || q.epoch != r.epoch || q.dbAddr != r.addr || q.state == stateReset {
		return false // read across a RESET, ERR or a new address: read again next pass
	}
	sqMoved := d.takeIndexLocked(sq, &q.recSQ, &q.sqTail, q.sq.entries)
	if sqMoved {
		d.trace(TraceDoorbell, uint64(r.n), q.sqTail, 1)
	}
	return d.takeIndexLocked(rq, &q.recRQ, &q.rqTail, q.rq.entries) || sqMoved
}

// takeIndexLocked takes v, read from a record, as the ring's tail when it
// differs from the index last read (last), and reports whether the tail
// moved.
func (d *Device) takeIndexLocked(v uint64, last, tail *uint64, entries uint64) bool {
	if v == *last {
		return false
	}
	*last = v
	if v >= entries {
		d.errs.verbs++
		return false
	}
	moved := v != *tail
	*tail = v
	return moved
}

// dbRecFault drops a record the device cannot reach: the fault is counted
// (ErrCntIOMMUFault and ErrCntVerbs) once, QPDBRecAddr reads back 0 and the
// QP goes to ERR (its producer indices are lost, as with a WQE that cannot
// be read).
func (d *Device) dbRecFault(gen uint64, r dbRecRef, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.countDMAErrLocked(err)
	if r.ctxt {
		// A context's record: the context halts, as with a descriptor
		// it cannot read.
		if d.recordLocked(gen, r) {
			d.haltCtxtLocked(r.n)
		}
		return
	}
	if q := &d.qps[r.n]; d.gen == gen && q.dbAddr == r.addr {
		d.errs.verbs++
		q.dbAddr = 0
		d.dbQPsChangedLocked()
		if q.state != stateReset && q.state != stateErr {
			d.qpErrorLocked(r.n)
		}
	}
}

// notifyRecords is the engine's way to sleep: it sets the notify flag of
// every record, then reads them all once more and reports whether an index
// changed (the driver stored it before it could see the flag: the engine
// goes on instead of sleeping).
func (d *Device) notifyRecords() bool {
	dma, gen := d.snapshotRecords()
	if dma == nil {
		return false
	}
	for _, r := range d.dbPoll {
		d.mu.Lock()
		if d.recordLocked(gen, r) {
			d.setAwakeLocked(r, false)
		}
		d.mu.Unlock()
		if err := write32(dma, r.addr+chip.DBRecFlags, chip.DBRecNotify); err != nil {
			d.dbRecFault(gen, r, err)
		}
	}
	fullFence()
	return d.pollRecords(false)
}

// fenceWord is what fullFence updates.
var fenceWord atomic.Uint64

// fullFence orders the engine's stores of notify flags before its loads of
// the indices, the device's half of the store/load pairing with the
// driver's: a locked read-modify-write (LOCK XADD on x86, LDADDAL on arm64)
// is a full barrier for the plain accesses of the shared-mapping DMA copies
// around it too. DMA over the socket is a round trip per access, ordered
// anyway.
func fullFence() { fenceWord.Add(1) }

// read64 reads the little-endian word of a record in host memory.
func read64(dma vfiouser.DMA, iova uint64) (uint64, error) {
	var b [8]byte
	err := dma.Read(iova, b[:])
	return binary.LittleEndian.Uint64(b[:]), err
}

func write32(dma vfiouser.DMA, iova uint64, v uint32) error {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	return dma.Write(iova, b[:])
}

// SleepNow is a test hook: an engine polling doorbell records sets their
// notify flags and reads them once more now, as it would after
// Config.DBPollIdle without work, and SleepNow returns when it has (at once
// if the engine sleeps already).
func (d *Device) SleepNow() {
	ch := make(chan struct{})
	select {
	case d.sleepReq <- ch:
	case <-d.done:
		return
	}
	select {
	case <-ch:
	case <-d.done:
	}
}
