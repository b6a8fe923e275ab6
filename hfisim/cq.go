package hfisim

import (
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/vfio/vfiouser"
)

// cqState is one completion queue: a ring of chip.CQE in host memory that
// the engine fills and the driver consumes.
type cqState struct {
	base, entries uint64
	head, tail    uint64
	headAddr      uint64 // chip.CQHeadAddr: IOVA of the consumer-index record, 0: none
	control       uint64 // CQCtrl* bits and the interrupt context; CQCtrlArm cleared on interrupt
	status        uint64
	seq           uint32 // sequence number of the last CQE written
	epoch         uint64 // bumped whenever the ring restarts or the CQ is disabled
}

const cqCtrlMask = chip.CQCtrlEnable | chip.CQCtrlArm | 0xff<<chip.CQCtrlCtxtShift

func (c *cqState) enabled() bool { return c.control&chip.CQCtrlEnable != 0 }
func (c *cqState) ctxt() int     { return int(c.control>>chip.CQCtrlCtxtShift) & 0xff }

func (c *cqState) read(r uint64) uint64 {
	switch r {
	case chip.CQRingBase:
		return c.base
	case chip.CQEntries:
		return c.entries
	case chip.CQHead:
		return c.head
	case chip.CQTail:
		return c.tail
	case chip.CQControl:
		return c.control
	case chip.CQStatus:
		return c.status
	case chip.CQHeadAddr:
		return c.headAddr
	}
	return 0
}

// geometryOK checks the ring and interrupt context before the CQ is used.
func (c *cqState) geometryOK(cfg Config, ctrl uint64) bool {
	ctxt := int(ctrl>>chip.CQCtrlCtxtShift) & 0xff
	return isPow2(c.entries) && c.entries >= 2 && c.entries <= uint64(cfg.MaxCQE) &&
		c.base%chip.CQESize == 0 && ctxt < cfg.NumContexts
}

// writeCQLocked is a driver write to a CQ register. Refused writes are
// counted in ErrCntVerbs.
func (d *Device) writeCQLocked(n int, r, v uint64) {
	c := &d.cqs[n]
	switch r {
	case chip.CQRingBase:
		if c.enabled() {
			d.errs.verbs++
			return
		}
		c.base = v
	case chip.CQEntries:
		c.entries = v
		c.head, c.tail, c.seq, c.status = 0, 0, 0, 0
		c.epoch++
		if c.enabled() && !c.geometryOK(d.cfg, c.control) {
			c.control = 0
			d.errs.verbs++
		}
	case chip.CQHead:
		if v >= c.entries {
			d.errs.verbs++
			return
		}
		c.head = v
	case chip.CQHeadAddr:
		if c.enabled() || v%8 != 0 {
			d.errs.verbs++
			return
		}
		c.headAddr = v
	case chip.CQControl:
		v &= cqCtrlMask
		if v&chip.CQCtrlEnable == 0 {
			if c.enabled() {
				c.epoch++
			}
			c.control = v
			return
		}
		if !c.geometryOK(d.cfg, v) {
			d.errs.verbs++
			return
		}
		c.control = v
		if v&chip.CQCtrlArm != 0 {
			d.armed.Store(true) // a consumer sleeps: the engine stops polling records
			d.lastArm.Store(time.Now().UnixNano())
		}
	}
}

// postCQE writes e to CQ n, raises its interrupt if armed, and reports
// whether the CQE was written. A CQ that looks full by the head the device
// holds reads its consumer-index record (chip.CQHeadAddr), if it has one,
// once. A CQ still full sets CQStatusOverflow, drops the CQE, raises the
// error interrupt and moves every QP that completes to it to ERR; a CQ that
// is disabled or in overflow drops it. Drops are counted in ErrCntVerbs.
// The word with seq (chip.CQESeqWordOff) is written last, on its own, so the
// driver never sees a new seq with an old rest of the entry.
func (d *Device) postCQE(dma vfiouser.DMA, gen uint64, n int, e *chip.CQE) bool {
	c := &d.cqs[n]
	d.mu.Lock()
	for recRead := false; ; recRead = true {
		if d.gen != gen {
			d.mu.Unlock()
			return false
		}
		if !c.enabled() || c.status&chip.CQStatusOverflow != 0 {
			d.errs.verbs++
			d.mu.Unlock()
			return false
		}
		if (c.tail+1)%c.entries != c.head {
			break
		}
		if c.headAddr == 0 || recRead {
			c.status |= chip.CQStatusOverflow
			d.errs.verbs++
			d.cqErrorLocked(n)
			d.mu.Unlock()
			return false
		}
		// The record is read outside the lock, as the CQE is written, and
		// taken only if the CQ did not restart meanwhile; the loop then
		// checks everything again.
		addr, epoch := c.headAddr, c.epoch
		d.mu.Unlock()
		v, err := read64(dma, addr)
		d.mu.Lock()
		if d.gen == gen && c.epoch == epoch {
			d.takeHeadRecLocked(&c.head, c.entries, &d.errs.verbs, v, err)
		}
	}
	slot, epoch := c.tail, c.epoch
	addr := c.base + slot*chip.CQESize
	e.Seq = uapi.NextSeq(c.seq)
	d.mu.Unlock()

	var raw [chip.CQESize]byte
	e.Marshal(raw[:])
	// Traced before the write: the consumer may see the entry at once.
	d.trace(TraceCQE, uint64(n), e.WrID, uint64(e.QPNum-chip.QPNBase))
	err := writeSeqLast(dma, addr, raw[:], chip.CQESeqWordOff, 8)

	d.mu.Lock()
	defer d.mu.Unlock()
	if d.gen != gen || c.epoch != epoch {
		return false
	}
	if err != nil {
		d.countDMAErrLocked(err)
		d.cqErrorLocked(n)
		return false
	}
	c.seq = e.Seq
	c.tail = (slot + 1) % c.entries
	if c.control&chip.CQCtrlArm != 0 {
		c.control &^= chip.CQCtrlArm
		d.raiseLocked(chip.IntSrcCtxt(c.ctxt()))
	}
	return true
}

// takeHeadRecLocked takes v, read from a ring's consumer-index record (a
// CQ's or a context's RHQ; err: the read failed), as the ring's head of
// entries slots. A failed read or a value out of range is refused and
// counted in *errCnt; the head stays.
func (d *Device) takeHeadRecLocked(head *uint64, entries uint64, errCnt *uint64, v uint64, err error) {
	switch {
	case err != nil:
		d.countDMAErrLocked(err)
		*errCnt++
	case v >= entries:
		*errCnt++
	default:
		*head = v
	}
}

// writeSeqLast writes the ring entry raw at addr with its seq word,
// raw[seqOff:seqOff+seqLen], last and on its own, so that a reader polling
// seq never sees a new seq with an old rest of the entry.
func writeSeqLast(dma vfiouser.DMA, addr uint64, raw []byte, seqOff, seqLen uint64) error {
	if err := dma.Write(addr, raw[:seqOff]); err != nil {
		return err
	}
	if rest := raw[seqOff+seqLen:]; len(rest) > 0 {
		if err := dma.Write(addr+seqOff+seqLen, rest); err != nil {
			return err
		}
	}
	return dma.Write(addr+seqOff, raw[seqOff:seqOff+seqLen])
}

// cqErrorLocked handles a CQ that lost a CQE: the error interrupt, and every
// QP that completes to it goes to ERR.
func (d *Device) cqErrorLocked(n int) {
	d.raiseLocked(chip.IntSrcError)
	for i := range d.qps {
		q := &d.qps[i]
		if q.state != stateReset && q.state != stateErr && (q.scq == n || q.rcq == n) {
			d.qpErrorLocked(i)
		}
	}
}
