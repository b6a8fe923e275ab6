package hfisim

import (
	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
)

// QP states as QPControl and QPStatus hold them.
const (
	stateReset = uapi.GOHFI_QPS_RESET
	stateInit  = uapi.GOHFI_QPS_INIT
	stateRTR   = uapi.GOHFI_QPS_RTR
	stateRTS   = uapi.GOHFI_QPS_RTS
	stateErr   = uapi.GOHFI_QPS_ERR
)

// transitions is the QP state machine (ib_modify_qp_is_ok without SQD and
// SQE, which the device does not implement): transitions[from][to].
var transitions = map[uint8]map[uint8]bool{
	stateReset: {stateReset: true, stateInit: true},
	stateInit:  {stateReset: true, stateErr: true, stateInit: true, stateRTR: true},
	stateRTR:   {stateReset: true, stateErr: true, stateRTS: true},
	stateRTS:   {stateReset: true, stateErr: true, stateRTS: true},
	stateErr:   {stateReset: true, stateErr: true},
}

// ring is a work queue in host memory as the device latched it.
type ring struct{ base, entries uint64 }

// qpState is one queue pair: its registers, what the device latched at the
// last transition, and the engine's progress on both sides.
type qpState struct {
	regs           [chip.QPStride / 8]uint64 // RW registers as written
	state          uint8
	sq, rq         ring // latched when the QP leaves RESET
	sqHead, sqTail uint64
	rqHead, rqTail uint64
	scq, rcq       int // latched at every transition to INIT, RTR, RTS
	epoch          uint64
	req            *reqProgress // requester: the send WQE in progress (&reqBuf or nil)
	reqBuf         reqProgress  // where req points: saved without an allocation per turn
	claim          *recvClaim   // responder: the receive WQE a message fills
	pfWait         uint32       // page fault the send queue is suspended on (0: none)
	pfErr          *pfault      // a fault resumed with an error, to fail on the next turn
	netPF          uint32       // network responder: page fault its requests wait on (0: none)
	netPFErr       *pfault      // network responder: a fault resumed with an error, to NAK the next retry
	dbAddr         uint64       // QPDBRecAddr as written (kept across RESET)
	recSQ, recRQ   uint64       // the indices last read from the doorbell record
	recAwake       bool         // the engine cleared the record's notify flag
}

func (q *qpState) reg(r uint64) uint64 { return q.regs[r/8] }
func (q *qpState) pd() uint32          { return uint32(q.reg(chip.QPPD)) }
func (q *qpState) destQPN() uint32     { return uint32(q.reg(chip.QPDest)) }
func (q *qpState) destPort() uint32    { return uint32(q.reg(chip.QPDest) >> 32) }
func (q *qpState) access() uint32 {
	return uint32(q.reg(chip.QPAccess)) &
		(uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ | uapi.IB_ACCESS_REMOTE_ATOMIC)
}
func (q *qpState) accepts() bool { return q.state == stateRTR || q.state == stateRTS }

func (q *qpState) read(r uint64) uint64 {
	switch r {
	case chip.QPSQTail:
		return q.sqTail
	case chip.QPSQHead:
		return q.sqHead
	case chip.QPRQTail:
		return q.rqTail
	case chip.QPRQHead:
		return q.rqHead
	case chip.QPStatus:
		return uint64(q.state)
	}
	return q.reg(r)
}

// writeQPLocked is a driver write to a QP register. Refused writes are
// counted in ErrCntVerbs.
func (d *Device) writeQPLocked(n int, r, v uint64) {
	q := &d.qps[n]
	switch r {
	case chip.QPControl:
		q.regs[r/8] = v
		d.modifyQPLocked(n, uint8(v&chip.QPStateMask), v>>chip.QPTypeShift&0xff)
	case chip.QPSQTail:
		if q.state == stateReset || v >= q.sq.entries {
			d.errs.verbs++
			return
		}
		if q.dbAddr == 0 { // with a doorbell record, a wake-up: the index is the record's
			q.sqTail = v
			d.trace(TraceDoorbell, uint64(n), v, 0)
		}
	case chip.QPRQTail:
		if q.state == stateReset || v >= q.rq.entries {
			d.errs.verbs++
			return
		}
		if q.dbAddr == 0 {
			q.rqTail = v
		}
	case chip.QPSQHead, chip.QPRQHead, chip.QPStatus:
		return // read-only
	default:
		q.regs[r/8] = v
		return
	}
	d.kickEngine()
}

// modifyQPLocked moves QP n to state to, or counts the refusal and leaves it.
func (d *Device) modifyQPLocked(n int, to uint8, typ uint64) {
	q := &d.qps[n]
	if !transitions[q.state][to] {
		d.errs.verbs++
		return
	}
	switch to {
	case stateReset:
		*q = qpState{regs: q.regs, epoch: q.epoch + 1, dbAddr: q.dbAddr}
		d.netLatchLocked(n, to)
	case stateErr:
		if q.state != stateErr {
			d.qpErrorLocked(n)
		}
	default:
		if !d.qpConfigOK(q, to, typ) {
			d.errs.verbs++
			return
		}
		if q.state == stateReset {
			q.sq = ring{q.reg(chip.QPSQBase), q.reg(chip.QPSQEntries)}
			q.rq = ring{q.reg(chip.QPRQBase), q.reg(chip.QPRQEntries)}
		}
		cqs := q.reg(chip.QPCQs)
		q.scq, q.rcq = int(uint32(cqs)), int(cqs>>32)
		q.state = to
		d.netLatchLocked(n, to)
	}
}

// qpConfigOK checks a QP's registers for a transition to INIT, RTR or RTS:
// an RC QP, rings of a power of two up to MaxQPWR entries (or none), 64-byte
// aligned, unchanged since the QP left RESET, enabled CQs, a nonzero PD, and
// from RTR on a destination on port 0 (loopback) or, with a network port,
// a valid peer table entry (net.go).
func (d *Device) qpConfigOK(q *qpState, to uint8, typ uint64) bool {
	ringOK := func(base, entries uint64) bool {
		return entries == 0 || (isPow2(entries) && entries <= uint64(d.cfg.MaxQPWR) && base%64 == 0)
	}
	cqOK := func(i uint64) bool { return i < uint64(len(d.cqs)) && d.cqs[i].enabled() }
	sq := ring{q.reg(chip.QPSQBase), q.reg(chip.QPSQEntries)}
	rq := ring{q.reg(chip.QPRQBase), q.reg(chip.QPRQEntries)}
	cqs, pd := q.reg(chip.QPCQs), q.reg(chip.QPPD)
	switch {
	case typ != uapi.GOHFI_QPT_RC:
		return false
	case !ringOK(sq.base, sq.entries) || !ringOK(rq.base, rq.entries):
		return false
	case q.state != stateReset && (sq != q.sq || rq != q.rq):
		return false
	case !cqOK(uint64(uint32(cqs))) || !cqOK(cqs>>32):
		return false
	case pd == 0 || pd > 0xffffffff:
		return false
	case to != stateInit && q.destPort() != 0 && !d.peerOKLocked(q.destPort()):
		return false
	}
	return true
}

// qpErrorLocked moves QP n to ERR: the engine drops its work in progress
// and flushes every outstanding WQE of both queues.
func (d *Device) qpErrorLocked(n int) {
	q := &d.qps[n]
	q.state = stateErr
	q.epoch++
	q.req, q.claim = nil, nil
	d.kickEngine()
}
