package hfisim

import (
	"encoding/binary"
	"errors"
	"runtime"
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/vfio/vfiouser"
)

// rhqSeqOff is the offset of seq in a receive header queue entry
// (struct gohfi_rhq_entry).
const rhqSeqOff = 20

// maxPacket bounds one send: the largest expected-receive buffer one TID can
// describe, which is also larger than any eager buffer.
const maxPacket = 1 << 21

// engine is the device's send DMA engine: it consumes send queues after
// doorbells and delivers packets to receive contexts. It never holds d.mu
// across a DMA, because on the vfio-user path a DMA to memory without an fd
// is a round trip to the client, which may at that moment be waiting for a
// register write that needs d.mu.
//
// Each pass gives every context's send queue and every QP a turn (the verbs
// engine: req.go, resp.go); the engine sleeps when a pass finds no work it
// can do, until the next doorbell or register write. While QPs or contexts
// have doorbell records (dbrec.go) it keeps polling them for DBPollIdle
// after its last work (or less: pollWindow), then sets their notify flags,
// reads them once more, and sleeps only if that found nothing.
func (d *Device) engine() {
	defer d.wg.Done()
	buf := make([]byte, maxPacket)
	mv := &mover{buf: make([]byte, chip.VerbsMTU)}
	var pw pollWindow
	for {
		var idle chan struct{}
		kicked := false
		select {
		case <-d.done:
			return
		case <-d.kick:
			kicked = true
		case idle = <-d.idleReq:
		case ack := <-d.sleepReq:
			close(ack) // asleep already
			continue
		}
		// last is the end of the last work, verbs or a context's send
		// queue: the engine polls the records only after some (a wake-up
		// for anything else, an MR's TLB flush or a CQ arm, goes back to
		// sleep at once).
		var last time.Time
		d.armed.Store(false)
		for {
			busy := d.pollSendQueues(buf)
			verbs := d.pollRecords(true)
			if d.pollVerbs(mv) {
				verbs = true
			}
			select {
			case <-d.done:
				return
			default:
			}
			if verbs || busy {
				last = time.Now()
				if kicked {
					pw.woken(last, d.dbPollIdle())
					kicked = false
				}
			}
			if busy || verbs {
				continue
			}
			if idle != nil {
				close(idle)
				idle = nil
			}
			if len(d.dbPoll) == 0 {
				break // no doorbell record to poll: sleep until a register doorbell
			}
			// Poll the records for a while (adaptive: only after verbs
			// work, and not once a consumer armed a CQ), then set their
			// notify flags, look once more, and sleep. The polling reads
			// the records alone: a full pass over every QP costs far more
			// CPU, which the driver's own ioctls need on few cores.
			var ack chan struct{}
			spin := d.spinRecords(last, pw.window(d.dbPollIdle()), &idle, &ack)
			if spin == spinCaught {
				pw.caught()
			}
			if spin == spinCaught || spin == spinPass {
				continue // a record moved, or a register write: a full pass
			}
			woke := d.notifyRecords()
			if ack != nil {
				close(ack)
			}
			if !woke {
				pw.sleeps(spin == spinRanOut, time.Now())
				break
			}
			last = time.Now()
		}
		if idle != nil {
			close(idle)
		}
	}
}

// spinResult is how spinRecords ended.
type spinResult int

const (
	spinSleep  spinResult = iota // no polling (no verbs work, a CQ armed lately), or a sleep request
	spinRanOut                   // no record moved for the whole window
	spinPass                     // a register write or an idle request: make a full pass
	spinCaught                   // a record moved while the engine polled
)

// spinRecords polls the doorbell records until one moves or a register
// write, idle or sleep request comes, for at most window after last; a
// zero last (no verbs work since the engine woke), a zero window or a CQ
// armed lately (consumersPoll) does not poll at all.
func (d *Device) spinRecords(last time.Time, window time.Duration, idle *chan struct{}, ack *chan struct{}) spinResult {
	if last.IsZero() || window <= 0 || !d.consumersPoll() {
		return spinSleep
	}
	for spins := 1; !d.armed.Load(); spins++ {
		// The clock and the channels are read every dbSpinCheck polls:
		// time.Now in every one was a fifth of the CPU of a busy cycle,
		// the select (it locks every channel) a tenth. A doorbell
		// register write (kick, which only the engine receives) is
		// looked at in every poll, without a lock.
		if spins%dbSpinCheck == 0 {
			if time.Since(last) >= window {
				return spinRanOut
			}
			select {
			case <-d.done:
				return spinSleep
			case <-d.kick:
				return spinPass
			case *idle = <-d.idleReq:
				return spinPass
			case *ack = <-d.sleepReq:
				return spinSleep
			default:
			}
		} else if len(d.kick) > 0 {
			<-d.kick
			return spinPass
		}
		if d.pollRecords(true) {
			return spinCaught
		}
		runtime.Gosched()
	}
	return spinSleep
}

// pollWindow is how long the engine polls the doorbell records after its
// last work: DBPollIdle, unless its polling keeps the producer off the CPU.
// On few shared cores the kernel often runs the engine's thread on the CPU
// of the thread that rang its doorbell (the waker's), with other work on
// the other cores: then the producer cannot run while the engine polls, its
// next post comes right after the engine gave up and rings the register,
// and every message pays the whole window and a wake-up (an 8 B WRITE's
// p50 was 62 us with the 50 us window, 29 us with 20 us; perf sched: the
// bench's and the engine's threads alternating on one CPU, 6 us and 61 us).
// A poll that ran out with a register doorbell within the window after it
// (dbPollStarved times in a row; an idle producer posts at any time, one
// kept off the CPU at once) makes the window short (dbPollShort): the
// engine sleeps soon after its work, and the producer's next post wakes it.
// A record that moves while the engine polls (the threads run apart again)
// gives the window back; so does every dbPollProbe-th sleep, which polls
// the whole window once more.
type pollWindow struct {
	short   bool      // poll for dbPollShort after the last work
	slept   int       // sleeps since the window became short
	sleptAt time.Time // when the engine slept after a poll that ran out; zero after any other sleep
	starved int       // polls in a row that ran out with a register doorbell within the window behind
}

// dbPollStarved is how many polls in a row must run out with a register
// doorbell within the window behind before the window becomes short.
const dbPollStarved = 3

// dbPollShort is the short window: long enough to catch the next post of a
// producer on another CPU (an 8 B WRITE's completion is polled and the next
// WQE stored within 1-2 us), which gives the window back at once, short
// enough to cost a producer kept off the CPU little. The spin reads the
// clock every dbSpinCheck polls (about 3 us), so it polls that long.
const dbPollShort = 2 * time.Microsecond

// dbPollProbe is how often (in sleeps) an engine with a short window polls
// the whole window once more: often, because a wake-up (each message's,
// with the short window) may put the engine's thread back on the
// producer's CPU, and a probe is how the engine finds that the threads
// run apart again; a probe that finds them together costs that message
// the window (the p50 of 8 B WRITEs stays the short window's: 1 in 8).
const dbPollProbe = 8

func (p *pollWindow) window(full time.Duration) time.Duration {
	if p.short && p.slept%dbPollProbe != 0 {
		return min(dbPollShort, full)
	}
	return full
}

// sleeps notes that the engine sleeps now, after a poll that ran out
// (ranOut) or after none.
func (p *pollWindow) sleeps(ranOut bool, now time.Time) {
	if p.short {
		p.slept++
	}
	p.sleptAt = time.Time{}
	if ranOut {
		p.sleptAt = now
	}
}

// woken notes that a register doorbell woke the engine and it found verbs
// work at now.
func (p *pollWindow) woken(now time.Time, full time.Duration) {
	if p.sleptAt.IsZero() {
		return
	}
	if now.Sub(p.sleptAt) < full {
		p.starved++
		if p.starved >= dbPollStarved && !p.short {
			p.short, p.slept = true, 1
		}
	} else {
		p.starved = 0
	}
	p.sleptAt = time.Time{}
}

// caught notes that a record moved while the engine polled.
func (p *pollWindow) caught() {
	p.short, p.starved = false, 0
}

// sendPending says whether the context's send queue holds descriptors the
// engine should process. The caller holds d.mu.
func (c *ctxtState) sendPending() bool {
	return c.enabled() && c.sqEntries != 0 && c.sqHead != c.sqTail
}

// dbSpinCheck is how many idle passes the engine makes between two looks
// at the clock and at its channels other than kick while it polls doorbell
// records.
const dbSpinCheck = 16

// waitIdle returns once the engine has made a pass that found no work (a
// test hook: a QP stalled on RNR is idle).
func (d *Device) waitIdle() {
	ch := make(chan struct{})
	select {
	case d.idleReq <- ch:
		select {
		case <-ch:
		case <-d.done:
		}
	case <-d.done:
	}
}

// pollSendQueues processes at most one descriptor per context and reports
// whether any context had work. Whether any has is read under one lock
// first: a pass of the engine over verbs work alone finds none.
func (d *Device) pollSendQueues(buf []byte) bool {
	d.mu.Lock()
	pending := false
	for n := 0; n < len(d.ctxts) && !pending; n++ {
		pending = d.ctxts[n].sendPending()
	}
	d.mu.Unlock()
	if !pending {
		return false
	}
	busy := false
	for n := range d.ctxts {
		d.mu.Lock()
		c := &d.ctxts[n]
		dma, gen := d.dma, d.gen
		if !c.sendPending() || dma == nil {
			d.mu.Unlock()
			continue
		}
		descAddr := c.sqBase + c.sqHead*chip.SendDescSize
		d.mu.Unlock()
		busy = true

		var raw [chip.SendDescSize]byte
		if err := dma.Read(descAddr, raw[:]); err != nil {
			d.mu.Lock()
			d.countDMAErrLocked(err)
			if d.gen == gen {
				d.haltCtxtLocked(n)
			}
			d.mu.Unlock()
			continue
		}
		var desc chip.SendDesc
		desc.Unmarshal(raw[:])
		d.deliver(dma, gen, n, &desc, buf)

		d.mu.Lock()
		if d.gen != gen || !d.ctxts[n].enabled() {
			d.mu.Unlock()
			continue
		}
		c = &d.ctxts[n]
		c.sqHead = (c.sqHead + 1) % c.sqEntries
		head, headAddr := c.sqHead, c.sqHeadAddr
		// The interrupt is raised after the head is written, so the
		// handler's reap finds the descriptors it reports.
		raise := desc.Flags&chip.DescFlagIntr != 0
		if desc.Flags&chip.DescFlagIntrIdle != 0 {
			c.intrIdle = true
		}
		if c.intrIdle && (raise || c.sqHead == c.sqTail) {
			c.intrIdle, raise = false, true
		}
		d.mu.Unlock()
		var werr error
		if headAddr != 0 {
			var hb [8]byte
			put64(hb[:], head)
			werr = dma.Write(headAddr, hb[:])
		}
		if werr != nil || raise {
			d.mu.Lock()
			if werr != nil {
				d.countDMAErrLocked(werr)
			}
			if raise && d.gen == gen {
				d.raiseLocked(chip.IntSrcCtxt(n))
			}
			d.mu.Unlock()
		}
	}
	return busy
}

// haltCtxtLocked stops context n after a ring DMA fault (a descriptor, a
// header queue entry or a doorbell record the device cannot reach): halted,
// not enabled, counted, the error interrupt raised.
func (d *Device) haltCtxtLocked(n int) {
	c := &d.ctxts[n]
	c.status |= chip.CtxtStatusHalted
	c.status &^= chip.CtxtStatusEnabled
	c.errCnt++
	d.raiseLocked(chip.IntSrcError)
}

func (d *Device) countDMAErrLocked(err error) {
	if errors.Is(err, vfiouser.ErrIOMMUFault) {
		d.errs.iommuFault++
	}
}

// deliver moves one packet from context src to its destination and writes
// the receiver's header queue entry.
func (d *Device) deliver(dma vfiouser.DMA, gen uint64, src int, desc *chip.SendDesc, buf []byte) {
	d.mu.Lock()
	dst := int(desc.DstCtxt)
	if dst >= len(d.ctxts) || !d.ctxts[dst].enabled() || desc.Length > maxPacket ||
		(desc.Opcode != chip.OpEager && desc.Opcode != chip.OpExpected) {
		d.errs.badDesc++
		d.ctxts[src].errCnt++
		d.mu.Unlock()
		return
	}
	rc := d.ctxts[dst]
	d.mu.Unlock()

	ent := uapi.GohfiRHQEntry{SrcCtxt: uint16(src), Length: desc.Length, Tag: desc.Tag}
	var dstAddr uint64
	switch desc.Opcode {
	case chip.OpEager:
		ent.Type = uapi.GOHFI_RHF_EAGER
		ent.EagerIdx = uint32(rc.rhqTail)
		switch {
		case rc.eagerCnt == 0:
			ent.Err |= uapi.GOHFI_RHF_ERR_EAGER
		case uint64(desc.Length) > rc.eagerSize:
			ent.Err |= uapi.GOHFI_RHF_ERR_LENGTH
		default:
			dstAddr = rc.eagerBase + uint64(ent.EagerIdx)*rc.eagerSize
		}
	case chip.OpExpected:
		ent.Type = uapi.GOHFI_RHF_EXPECTED
		ent.TID, ent.TIDOffset = desc.TID, desc.TIDOffset
		addr, ok := d.tidTarget(dst, desc.TID, desc.TIDOffset, desc.Length)
		if !ok {
			ent.Err |= uapi.GOHFI_RHF_ERR_TID
		}
		dstAddr = addr
	}
	if ent.Err == 0 {
		if err := vfiouser.CopyDMA(dma, dstAddr, desc.SrcIOVA, int(desc.Length), buf); err != nil {
			d.mu.Lock()
			d.countDMAErrLocked(err)
			d.mu.Unlock()
			ent.Err |= uapi.GOHFI_RHF_ERR_DMA
		}
	}
	if ent.Err != 0 {
		ent.Type = uapi.GOHFI_RHF_ERROR
	}
	d.postRHQ(dma, gen, dst, &ent, desc.Flags&chip.DescFlagUrgent != 0)
}

// tidTarget resolves an expected-receive TID of context ctxt to the IOVA the
// payload goes to, checking that the TID is the context's own, programmed,
// and long enough for offset+length.
func (d *Device) tidTarget(ctxt int, tid, off, length uint32) (uint64, bool) {
	rel, npages, ok := uapi.TidRcvEntry(tid)
	if !ok || npages == 0 {
		return d.tidErr(ctxt)
	}
	entry := int(rel)
	if entry >= d.cfg.RcvArrayPerCtxt {
		return d.tidErr(ctxt)
	}
	v := d.rcvArray.load64(uint64(ctxt*d.cfg.RcvArrayPerCtxt+entry) * chip.RcvArrayEntrySize)
	addr, pages, valid := chip.RcvArrayEntryDecode(v)
	if !valid || pages > uint32(d.cfg.MaxTIDPages) {
		return d.tidErr(ctxt)
	}
	size := uint64(pages) << chip.RcvArrayPageShift
	if npages != pages || uint64(off)+uint64(length) > size {
		return d.tidErr(ctxt)
	}
	return addr + uint64(off), true
}

func (d *Device) tidErr(ctxt int) (uint64, bool) {
	d.mu.Lock()
	d.errs.tid++
	d.ctxts[ctxt].errCnt++
	d.mu.Unlock()
	return 0, false
}

// postRHQ writes a header queue entry to context dst and raises its
// interrupt. A queue full by the head the device holds reads the context's
// consumer-index record (chip.CtxtRHQHeadAddr), if it has one, once; a
// queue still full drops the packet and counts it.
func (d *Device) postRHQ(dma vfiouser.DMA, gen uint64, dst int, ent *uapi.GohfiRHQEntry, urgent bool) {
	d.mu.Lock()
	c := &d.ctxts[dst]
	for recRead := false; ; recRead = true {
		if d.gen != gen || !c.enabled() {
			d.mu.Unlock()
			return
		}
		if (c.rhqTail+1)%c.rhqEntries != c.rhqHead {
			break
		}
		if c.rhqHeadAddr == 0 || recRead {
			d.errs.rhqFull++
			c.errCnt++
			d.mu.Unlock()
			return
		}
		// Read outside the lock, as the entry is written; taken only if
		// the context was not disabled or enabled meanwhile.
		addr, epoch := c.rhqHeadAddr, c.epoch
		d.mu.Unlock()
		v, err := read64(dma, addr)
		d.mu.Lock()
		if d.gen == gen && c.epoch == epoch {
			d.takeHeadRecLocked(&c.rhqHead, c.rhqEntries, &c.errCnt, v, err)
		}
	}
	slot := c.rhqTail
	addr := c.rhqBase + slot*uapi.SizeofGohfiRHQEntry
	ent.Seq = uapi.NextSeq(c.seq)
	d.mu.Unlock()

	// The entry first with seq 0 (never a valid seq), then its seq: the
	// consumer polls the seq, and one that matches finds the rest written.
	var raw [uapi.SizeofGohfiRHQEntry]byte
	seq := ent.Seq
	ent.Seq = 0
	ent.MarshalBytes(raw[:])
	ent.Seq = seq
	err := dma.Write(addr, raw[:])
	if err == nil {
		var sb [4]byte
		binary.LittleEndian.PutUint32(sb[:], seq)
		err = dma.Write(addr+rhqSeqOff, sb[:])
	}

	d.mu.Lock()
	if err != nil {
		d.countDMAErrLocked(err)
		if d.gen == gen {
			d.haltCtxtLocked(dst)
		}
		d.mu.Unlock()
		return
	}
	if d.gen != gen || !c.enabled() {
		d.mu.Unlock()
		return
	}
	c.seq = ent.Seq
	c.rhqTail = (slot + 1) % c.rhqEntries
	if ent.Type != uapi.GOHFI_RHF_ERROR {
		d.errs.packets++
		d.errs.bytes += uint64(ent.Length)
		if urgent {
			c.urgent++
		}
	}
	switch {
	case c.control&chip.CtxtCtrlIntEnable == 0:
	case c.control&chip.CtxtCtrlIntArm == 0 || c.rhqHeadAddr == 0:
		d.raiseLocked(chip.IntSrcCtxt(dst))
	default:
		d.raiseIfArmed(dma, gen, dst)
		return
	}
	d.mu.Unlock()
}

// raiseIfArmed raises context dst's receive interrupt if its RHQ record's
// arm word changed since the device last raised for it (chip.RHQArmOff).
// Called with d.mu held, after the new tail is set; returns with it
// released. The word is read outside the lock, after a full barrier, so
// that a driver arming after this read finds the new tail when it looks
// again.
func (d *Device) raiseIfArmed(dma vfiouser.DMA, gen uint64, dst int) {
	c := &d.ctxts[dst]
	addr, epoch := c.rhqHeadAddr+chip.RHQArmOff, c.epoch
	d.mu.Unlock()
	fullFence()
	v, err := read64(dma, addr)
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.gen != gen || c.epoch != epoch {
		return
	}
	if err != nil {
		// Raised anyway: a driver that armed must not sleep through it.
		d.countDMAErrLocked(err)
		c.errCnt++
		d.raiseLocked(chip.IntSrcCtxt(dst))
		return
	}
	if v != c.armSeen {
		c.armSeen = v
		d.raiseLocked(chip.IntSrcCtxt(dst))
	}
}
