package hfisim

import (
	"encoding/binary"
	"math/bits"
	"net/netip"
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/ibwire"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/vfio/vfiouser"
)

// The reliable-connection requester of a network QP (IB vol. 1 9.7, in the
// shape of rxe's rxe_req.c and rxe_comp.c): WQEs are read ahead of SQHead
// into a window of messages in flight, each given its PSNs (a READ as many
// as its responses), and sent packet by packet; ACKs, READ responses and
// NAKs confirm them and the WQEs complete in order. Lost packets come back
// by go-back-N: a sequence NAK, a READ response after a gap, or the
// retransmission timer sends again from the first PSN not confirmed, at
// most retry_cnt times without progress (then GOHFI_WC_RETRY_EXC_ERR).

const (
	rcMaxInflight = 64      // WQEs in flight per QP
	rcMaxPSNs     = 1 << 21 // PSNs in flight per QP: well inside the responder's window
	rcAckEvery    = 32      // a long message asks for an ACK every this many packets
	rcReadChunk   = 64      // READ responses one READ request asks for (see rcSendPacket)
	rcSendWindow  = 128     // packets sent past the first one not confirmed: what a go-back sends again at most
	rcUnlimited   = 7       // rnr_retry that retries without limit
)

// rcQP is a network QP's transport state. The engine goroutine owns it; it
// starts afresh whenever the QP's incarnation (device generation, QP
// epoch) changes, and takes its PSNs when the QP reaches RTR and RTS.
type rcQP struct {
	gen, epoch          uint64
	respReady, reqReady bool
	peer                netip.AddrPort
	dest                uint32 // the peer's QP number
	attr                uint64

	// Requester.
	psn                ibwire.PSN // the next PSN a new WQE takes
	sent               ibwire.PSN // the first PSN never sent
	sqNext             uint64     // the SQ index of the next WQE to read
	inflight           []*rcWQE   // read ahead, oldest (at SQHead) first
	cur                int        // go-back-N cursor: the WQE...
	curPkt             uint32     // ...and its packet to send next
	retryLeft, rnrLeft int
	deadline           time.Time // retransmission or RNR timer (zero: none)
	rnrWait            bool      // deadline ends an RNR wait
	ackPSN             ibwire.PSN
	hasAck             bool
	retrying           bool // went back after a NAK or gap: later gaps wait for progress or the timer
	readSkipped        bool // a READ response past the expected one was dropped while retrying
	backoff            uint // timeouts in a row without progress: the timer doubles, up to rcMaxBackoff

	// Responder (rc_resp.go).
	resp rcResp
}

// rcWQE is a send WQE in flight.
type rcWQE struct {
	wqe   chip.SendWQE
	total uint64
	first ibwire.PSN
	npkts uint32 // PSNs it takes
	done  uint32 // packets confirmed (ACKed, or READ responses placed)
}

func (w *rcWQE) isRead() bool {
	return w.wqe.Opcode == uapi.GOHFI_WR_RDMA_READ || w.wqe.Opcode == uapi.GOHFI_WR_RDMA_READ_WITH_INV
}

// answered reports a WQE that only its responses confirm (READ, atomic),
// never an ACK.
func (w *rcWQE) answered() bool   { return w.isRead() || isAtomic(w.wqe.Opcode) }
func (w *rcWQE) complete() bool   { return w.done == w.npkts }
func (w *rcWQE) last() ibwire.PSN { return w.first.Add(int32(w.npkts) - 1) }

// rcSnap is what the engine reads of a network QP under d.mu.
type rcSnap struct {
	dma            vfiouser.DMA
	gen, epoch     uint64
	state          uint8
	pd, access     uint32
	sqTail, sqHead uint64
	sq             ring
	pfWait         uint32
	netFault       bool // a network responder page fault pending or failed (netFaultState)
}

// rcSync returns QP n's transport state brought up to date with the QP,
// or nil if QP n is not a network QP in RTR, RTS (or the device has no
// DMA).
func (d *Device) rcSync(n int) (*rcQP, rcSnap) {
	d.mu.Lock()
	defer d.mu.Unlock()
	q := &d.qps[n]
	s := rcSnap{dma: d.dma, gen: d.gen, epoch: q.epoch, state: q.state, pd: q.pd(), access: q.access(),
		sqTail: q.sqTail, sqHead: q.sqHead, sq: q.sq, pfWait: q.pfWait,
		netFault: q.netPF != 0 || q.netPFErr != nil}
	rc := &d.net.rc[n]
	if rc.gen != s.gen || rc.epoch != s.epoch {
		*rc = rcQP{gen: s.gen, epoch: s.epoch}
	}
	if !q.accepts() || !d.isNetQPLocked(q) || s.dma == nil {
		return nil, s
	}
	l := d.net.latch[n]
	if !rc.respReady {
		rc.respReady, rc.peer, rc.dest, rc.attr = true, l.addr, q.destQPN(), l.attr
		rc.resp.epsn = ibwire.PSN(q.reg(chip.QPPSN)>>32) & ibwire.Mask24
	}
	if q.state == stateRTS && !rc.reqReady {
		rc.reqReady, rc.attr = true, l.attr
		rc.psn = ibwire.PSN(q.reg(chip.QPPSN)) & ibwire.Mask24
		rc.sent, rc.sqNext = rc.psn, q.sqHead
		rc.resetRetries()
	}
	if !rc.peer.IsValid() {
		return nil, s
	}
	return rc, s
}

func (rc *rcQP) retryCnt() int { return int(rc.attr >> chip.QPNetRetryShift & 7) }
func (rc *rcQP) rnrRetry() int { return int(rc.attr >> chip.QPNetRNRRetryShift & 7) }
func (rc *rcQP) minRNR() uint8 { return uint8(rc.attr >> chip.QPNetMinRNRTimeShift & 0x1f) }

// timeout is the retransmission timeout: 4.096 us * 2^timeout (0: none),
// doubled for each timeout in a row without progress up to rcMaxBackoff
// times (as RNICs back off: a peer slower than the timeout would
// otherwise drown in its own retransmissions).
func (rc *rcQP) timeout() time.Duration {
	t := rc.attr & chip.QPNetTimeoutMask
	if t == 0 {
		return 0
	}
	return 4096 * time.Nanosecond << (t + uint64(rc.backoff))
}

const rcMaxBackoff = 3

func (rc *rcQP) resetRetries() { rc.retryLeft, rc.rnrLeft = rc.retryCnt(), rc.rnrRetry() }

// rcStep is the requester's turn on QP n (RTS, send queue not empty): it
// reads WQEs into the window and sends up to verbsBurst packets from the
// cursor. It reports whether it made progress.
func (d *Device) rcStep(n int) bool {
	rc, s := d.rcSync(n)
	if rc == nil || !rc.reqReady || s.state != stateRTS || rc.rnrWait || s.pfWait != 0 {
		return false
	}
	if f := d.failedFault(n); f != nil {
		d.rcComplete(n, s, rc, d.faultError(s.dma, s.gen, f))
		return true
	}
	sent := 0
	for sent < verbsBurst {
		for rc.cur < len(rc.inflight) && rc.inflight[rc.cur].complete() {
			rc.cur, rc.curPkt = rc.cur+1, 0 // confirmed already (by an ACK past a READ)
		}
		if rc.cur == len(rc.inflight) {
			more, progress := d.rcFetch(n, s, rc)
			if progress {
				return true // a WQE completed at once: the QP may have moved
			}
			if !more {
				break
			}
		}
		w := rc.inflight[rc.cur]
		if w.isRead() && rc.curPkt > 0 && w.done+rcReadChunk/2 < rc.curPkt {
			break // the READ's next request waits for the last one's responses
		}
		if w.first.Add(int32(rc.curPkt)).Sub(rc.unconfirmed()) >= rcSendWindow {
			break // the window is full: ACKs open it
		}
		res := d.rcSendPacket(n, s, rc)
		if res.stall {
			break // a page fault of a local SGE: sent again once resumed
		}
		if !res.ok() {
			if rc.cur == 0 {
				d.rcComplete(n, s, rc, res) // at SQHead: it completes in error, the QP goes to ERR
				return true
			}
			break // behind a WQE in flight: it fails when it reaches SQHead
		}
		sent++
	}
	if sent > 0 && rc.deadline.IsZero() {
		d.rcArm(rc)
	}
	return sent > 0
}

// unconfirmed is the first PSN in flight not confirmed yet.
func (rc *rcQP) unconfirmed() ibwire.PSN {
	for _, w := range rc.inflight {
		if !w.complete() {
			return w.first.Add(int32(w.done))
		}
	}
	return rc.psn
}

// rcArm starts the retransmission timer (none with timeout 0).
func (d *Device) rcArm(rc *rcQP) {
	rc.rnrWait = false
	rc.deadline = time.Time{}
	if t := rc.timeout(); t > 0 && len(rc.inflight) > 0 {
		rc.deadline = time.Now().Add(t)
		d.armTimer(rc.deadline)
	}
}

// rcFetch reads the WQE at sqNext into the window (more: the cursor has a
// packet to send). A WQE that does not go on the wire (a local operation,
// a malformed one) is handled when it reaches SQHead with nothing in
// flight (progress: it completed).
func (d *Device) rcFetch(n int, s rcSnap, rc *rcQP) (more, progress bool) {
	if rc.sqNext == s.sqTail || len(rc.inflight) >= rcMaxInflight ||
		len(rc.inflight) > 0 && rc.psn.Sub(rc.inflight[0].first) > rcMaxPSNs {
		return false, false
	}
	var raw [chip.SendWQESize]byte
	if err := s.dma.Read(s.sq.base+rc.sqNext*chip.SendWQESize, raw[:]); err != nil {
		d.countDMAErr(err)
		if len(rc.inflight) == 0 {
			d.rcCompleteHead(n, s, chip.SendWQE{}, 0, fail(uapi.GOHFI_WC_LOC_QP_OP_ERR, chip.VendorErrDMA))
			return false, true
		}
		return false, false
	}
	w := &rcWQE{}
	w.wqe.Unmarshal(raw[:])
	total, res := d.checkSendWQE(raw[:], &w.wqe)
	w.total = total
	if !res.ok() || isLocalOp(w.wqe.Opcode) {
		if len(rc.inflight) > 0 {
			return false, false
		}
		if res.ok() {
			res = d.execLocal(d.rcRequester(n, s, w))
		}
		rc.sqNext = next(rc.sqNext, s.sq.entries)
		d.rcCompleteHead(n, s, w.wqe, w.total, res)
		return false, true
	}
	if w.wqe.Flags&uapi.GOHFI_SEND_FENCE != 0 {
		for _, o := range rc.inflight {
			if o.answered() {
				return false, false // a fence waits for the READs and atomics before it
			}
		}
	}
	w.npkts = uint32(max(1, (w.total+netPMTU-1)/netPMTU))
	w.first = rc.psn
	rc.psn = rc.psn.Add(int32(w.npkts))
	rc.sqNext = next(rc.sqNext, s.sq.entries)
	rc.inflight = append(rc.inflight, w)
	return true, false
}

// rcRequester is the loopback requester's view of w, for the helpers the
// two share (gathering, completions, local operations).
func (d *Device) rcRequester(n int, s rcSnap, w *rcWQE) *requester {
	return &requester{dma: s.dma, gen: s.gen, n: n, qpn: chip.QPNBase + uint32(n), epoch: s.epoch,
		p: reqProgress{wqe: w.wqe, total: w.total}, mv: &d.net.mv}
}

// rcSendPacket sends the packet at the cursor and moves the cursor on.
func (d *Device) rcSendPacket(n int, s rcSnap, rc *rcQP) result {
	w := rc.inflight[rc.cur]
	j := rc.curPkt
	psn := w.first.Add(int32(j))
	off := uint64(j) * netPMTU
	pk := ibwire.Packet{BTH: ibwire.BTH{PKey: ibwire.DefaultPKey, DestQP: rc.dest, PSN: psn}}
	if isAtomic(w.wqe.Opcode) {
		pk.BTH.Opcode, pk.BTH.AckReq = ibwire.RCFetchAdd, true
		pk.AtomicETH = ibwire.AtomicETH{VA: w.wqe.RemoteAddr, RKey: w.wqe.Rkey, SwapAdd: w.wqe.CompareAdd}
		if w.wqe.Opcode == uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP {
			pk.BTH.Opcode = ibwire.RCCompareSwap
			pk.AtomicETH.SwapAdd, pk.AtomicETH.Compare = w.wqe.Swap, w.wqe.CompareAdd
		}
		rc.cur, rc.curPkt = rc.cur+1, 0
		d.rcSent(n, rc, psn, psn)
		d.transmit(rc.peer, &pk)
		return result{}
	}
	if w.isRead() {
		// A long READ is asked for rcReadChunk responses at a time, the
		// next request once half of the last one's responses are in: a
		// responder answers a request in one burst, and one burst per
		// go-back would flood a lossy link. The pieces are fixed
		// (rcReadChunk-aligned): a request again after a loss ends where
		// its piece ends, as the responder saw it asked for, and the
		// pieces after it are asked again whole (go-back-N).
		end := min((j/rcReadChunk+1)*rcReadChunk, w.npkts)
		pk.BTH.Opcode, pk.BTH.AckReq = ibwire.RCReadRequest, true
		pk.RETH = ibwire.RETH{VA: w.wqe.RemoteAddr + off, RKey: w.wqe.Rkey, DMALen: uint32(min(w.total, uint64(end)*netPMTU) - off)}
		rc.curPkt = end
		if end == w.npkts {
			rc.cur, rc.curPkt = rc.cur+1, 0
		}
		d.rcSent(n, rc, psn, w.first.Add(int32(end)-1))
		d.transmit(rc.peer, &pk)
		return result{}
	}
	size := min(netPMTU, w.total-off)
	data := d.net.payload[:size]
	r := d.rcRequester(n, s, w)
	lp := &packet{src: r.qpn, op: w.wqe.Opcode, off: off, n: size, total: w.total, first: j == 0,
		last: j+1 == w.npkts, data: data, srcEpoch: s.epoch}
	spans, res := d.localSpans(r, s.pd, lp, false)
	if !res.ok() {
		return res
	}
	if err := dmaSpans(s.dma, spans, data, false); err != nil {
		d.countDMAErr(err)
		return fail(uapi.GOHFI_WC_LOC_PROT_ERR, chip.VendorErrDMA)
	}
	pk.Payload = data
	pk.BTH.Opcode = requestOpcode(w.wqe.Opcode, lp.first, lp.last)
	pk.BTH.AckReq = lp.last || (j+1)%rcAckEvery == 0
	pk.BTH.SE = lp.last && w.wqe.Flags&uapi.GOHFI_SEND_SOLICITED != 0
	if lp.first && isWrite(w.wqe.Opcode) {
		pk.RETH = ibwire.RETH{VA: w.wqe.RemoteAddr, RKey: w.wqe.Rkey, DMALen: uint32(w.total)}
	}
	pk.ImmDt = ibwire.ImmDt(bits.ReverseBytes32(w.wqe.Imm)) // imm_data is in network order in memory
	pk.IETH = ibwire.IETH{RKey: w.wqe.Imm}
	rc.curPkt++
	if rc.curPkt == w.npkts {
		rc.cur, rc.curPkt = rc.cur+1, 0
	}
	d.rcSent(n, rc, psn, psn)
	d.transmit(rc.peer, &pk)
	return result{}
}

// rcSent counts a retransmission (a PSN sent before) and moves the first
// PSN never sent past last.
func (d *Device) rcSent(n int, rc *rcQP, psn, last ibwire.PSN) {
	if psn.Before(rc.sent) {
		d.net.count(chip.NetCntRetrans)
		d.mu.Lock()
		d.net.retrans[n]++
		d.mu.Unlock()
	}
	if !last.Before(rc.sent) {
		rc.sent = last.Next()
	}
}

func isWrite(op uint8) bool {
	return op == uapi.GOHFI_WR_RDMA_WRITE || op == uapi.GOHFI_WR_RDMA_WRITE_WITH_IMM
}

// requestOpcode is the BTH opcode of a packet of a SEND or WRITE message.
func requestOpcode(op uint8, first, last bool) ibwire.Opcode {
	var f, m, l, o ibwire.Opcode
	switch op {
	case uapi.GOHFI_WR_SEND:
		f, m, l, o = ibwire.RCSendFirst, ibwire.RCSendMiddle, ibwire.RCSendLast, ibwire.RCSendOnly
	case uapi.GOHFI_WR_SEND_WITH_IMM:
		f, m, l, o = ibwire.RCSendFirst, ibwire.RCSendMiddle, ibwire.RCSendLastImm, ibwire.RCSendOnlyImm
	case uapi.GOHFI_WR_SEND_WITH_INV:
		f, m, l, o = ibwire.RCSendFirst, ibwire.RCSendMiddle, ibwire.RCSendLastInvalidate, ibwire.RCSendOnlyInvalidate
	case uapi.GOHFI_WR_RDMA_WRITE:
		f, m, l, o = ibwire.RCWriteFirst, ibwire.RCWriteMiddle, ibwire.RCWriteLast, ibwire.RCWriteOnly
	default: // GOHFI_WR_RDMA_WRITE_WITH_IMM
		f, m, l, o = ibwire.RCWriteFirst, ibwire.RCWriteMiddle, ibwire.RCWriteLastImm, ibwire.RCWriteOnlyImm
	}
	switch {
	case first && last:
		return o
	case first:
		return f
	case last:
		return l
	}
	return m
}

// rcResponse is an ACK, NAK or READ response for QP n's requester.
func (d *Device) rcResponse(n int, pk *ibwire.Packet) {
	rc, s := d.rcSync(n)
	if rc == nil || !rc.reqReady || s.state != stateRTS || len(rc.inflight) == 0 {
		d.net.count(chip.NetCntDropPSN) // nothing outstanding
		return
	}
	psn := pk.BTH.PSN
	head := rc.inflight[0]
	lo := head.first.Add(int32(head.done)).Add(-1) // the last PSN confirmed: a repeated ACK names it
	if psn.Before(lo) || !psn.Before(rc.psn) {
		d.net.count(chip.NetCntDropPSN)
		return
	}
	switch op := pk.BTH.Opcode; {
	case op.IsReadResponse():
		d.rcReadResponse(n, s, rc, pk)
	case op == ibwire.RCAcknowledge:
		d.rcAck(n, s, rc, psn, pk.AETH)
	default: // ATOMIC ACKNOWLEDGE
		d.rcAtomicAck(n, s, rc, pk)
	}
}

// rcAck handles an ACK, RNR NAK or NAK with PSN psn.
func (d *Device) rcAck(n int, s rcSnap, rc *rcQP, psn ibwire.PSN, a ibwire.AETH) {
	switch {
	case a.IsACK():
		if d.rcConfirm(n, s, rc, psn, false) {
			return
		}
	case a.IsRNRNAK():
		d.net.count(chip.NetCntRxNAKs)
		if d.rcConfirm(n, s, rc, psn.Add(-1), false) {
			return
		}
		if rc.rnrRetry() != rcUnlimited && rc.takesRecv(psn) {
			if rc.rnrLeft == 0 {
				d.rcComplete(n, s, rc, fail(uapi.GOHFI_WC_RNR_RETRY_EXC_ERR, chip.VendorErrNoRecv))
				return
			}
			rc.rnrLeft--
		}
		d.rcGoBack(rc, psn)
		rc.rnrWait = true
		rc.deadline = time.Now().Add(ibwire.RNRTimerDuration(a.RNRTimer()))
		d.armTimer(rc.deadline)
	case a.IsNAK():
		d.net.count(chip.NetCntRxNAKs)
		if d.rcConfirm(n, s, rc, psn.Add(-1), false) {
			return
		}
		if a.NAKCode() == ibwire.NAKPSNSeqError {
			d.rcRetry(n, s, rc, psn, false)
			return
		}
		status := uint32(uapi.GOHFI_WC_REM_OP_ERR)
		switch a.NAKCode() {
		case ibwire.NAKInvalidRequest:
			status = uapi.GOHFI_WC_REM_INV_REQ_ERR
		case ibwire.NAKRemoteAccessErr:
			status = uapi.GOHFI_WC_REM_ACCESS_ERR
		}
		d.rcComplete(n, s, rc, fail(status, chip.VendorErrNone))
	}
}

// rcRetry goes back to psn after a sequence NAK, a gap in READ responses
// or a timeout, or completes the head WQE with GOHFI_WC_RETRY_EXC_ERR once
// retry_cnt retries made no progress. After a NAK or a gap it waits for
// progress or the timer before it goes back again (the packets behind the
// gap that are still arriving tell nothing new).
func (d *Device) rcRetry(n int, s rcSnap, rc *rcQP, psn ibwire.PSN, timeout bool) {
	if rc.retrying && !timeout {
		return
	}
	rc.retrying, rc.readSkipped = !timeout, false
	if rc.retryLeft == 0 {
		d.rcComplete(n, s, rc, fail(uapi.GOHFI_WC_RETRY_EXC_ERR, chip.VendorErrRemoteQP))
		return
	}
	rc.retryLeft--
	d.rcGoBack(rc, psn)
	d.rcArm(rc)
}

// takesRecv reports whether the packet at psn is one that takes a receive
// WQE at the responder (the first of a SEND, the last of a WRITE with
// immediate): only an RNR NAK for such a packet can mean "no receive
// posted" and counts against rnr_retry. An RNR NAK for any other packet is
// a responder's page fault (ODP) being handled: it is waited out, as often
// as it comes (docs/fabric.md).
func (rc *rcQP) takesRecv(psn ibwire.PSN) bool {
	for _, w := range rc.inflight {
		if !psn.InRange(w.first, w.npkts) {
			continue
		}
		i := uint32(psn.Sub(w.first))
		switch w.wqe.Opcode {
		case uapi.GOHFI_WR_SEND, uapi.GOHFI_WR_SEND_WITH_IMM, uapi.GOHFI_WR_SEND_WITH_INV:
			return i == 0
		case uapi.GOHFI_WR_RDMA_WRITE_WITH_IMM:
			return i == w.npkts-1
		}
		return false
	}
	return true // nothing in flight at psn: counted, as before
}

// rcGoBack moves the cursor to psn (go-back-N). It does not move it
// forward past a READ or atomic it already went back to and has not asked
// again yet: a NAK of a later WQE, handled before the engine sent the
// request again, would leave the READ waiting for its timer.
func (d *Device) rcGoBack(rc *rcQP, psn ibwire.PSN) {
	for i, w := range rc.inflight {
		if psn.InRange(w.first, w.npkts) {
			pkt := uint32(psn.Sub(w.first))
			if w.isRead() {
				pkt = w.done // READ responses resume where they stopped
			}
			if rc.pendingAsk(i, pkt) {
				return
			}
			rc.cur, rc.curPkt = i, pkt
			d.kickEngine()
			return
		}
	}
	if !rc.pendingAsk(len(rc.inflight), 0) {
		rc.cur, rc.curPkt = len(rc.inflight), 0
	}
}

// pendingAsk reports whether the cursor is before packet pkt of WQE i at
// a READ or atomic not answered yet: a request to send again.
func (rc *rcQP) pendingAsk(i int, pkt uint32) bool {
	if rc.cur >= len(rc.inflight) || rc.cur > i || rc.cur == i && rc.curPkt >= pkt {
		return false
	}
	w := rc.inflight[rc.cur]
	return w.answered() && !w.complete()
}

// rcConfirm applies an acknowledgement of every PSN up to psn: SEND and
// WRITE packets are confirmed (READs only by their responses), complete
// WQEs at SQHead complete. progress says that the caller made some
// already. It reports whether the QP left RTS.
func (d *Device) rcConfirm(n int, s rcSnap, rc *rcQP, psn ibwire.PSN, progress bool) bool {
	if !rc.hasAck || psn.After(rc.ackPSN) {
		rc.ackPSN, rc.hasAck = psn, true
	}
	for _, w := range rc.inflight {
		if w.answered() {
			if psn.Before(w.last()) {
				break
			}
			continue
		}
		if psn.Before(w.first) {
			break
		}
		got := uint32(min(int64(psn.Sub(w.first))+1, int64(w.npkts)))
		if got > w.done {
			w.done, progress = got, true
		}
		if !w.complete() {
			break
		}
	}
	return d.rcCompleteDone(n, s, rc, progress)
}

// rcCompleteDone completes the confirmed WQEs at SQHead and restarts the
// timer after progress. It reports whether the QP left RTS.
func (d *Device) rcCompleteDone(n int, s rcSnap, rc *rcQP, progress bool) bool {
	k := 0
	for k < len(rc.inflight) && rc.inflight[k].complete() {
		w := rc.inflight[k]
		res := result{}
		if w.wqe.Opcode == uapi.GOHFI_WR_RDMA_READ_WITH_INV {
			res = d.readInvalidate(d.rcRequester(n, s, w))
		}
		d.rcCompleteHead(n, s, w.wqe, w.total, res)
		k++
		if !res.ok() {
			return true
		}
	}
	rc.inflight = rc.inflight[k:]
	if rc.cur < k {
		rc.cur, rc.curPkt = 0, 0
	} else {
		rc.cur -= k
	}
	if k > 0 || progress {
		rc.resetRetries()
		rc.retrying, rc.backoff = false, 0
		d.rcArm(rc)
		if k > 0 {
			d.kickEngine() // the window has room
		}
	}
	return false
}

// rcComplete completes the WQE at SQHead with res (an error: the QP goes
// to ERR, the rest is flushed). A NAK that named a PSN of a READ already
// answered in full finds nothing left to fail.
func (d *Device) rcComplete(n int, s rcSnap, rc *rcQP, res result) {
	if len(rc.inflight) == 0 {
		return
	}
	w := rc.inflight[0]
	d.rcCompleteHead(n, s, w.wqe, w.total, res)
	rc.inflight = rc.inflight[1:]
	rc.deadline = time.Time{}
}

// rcCompleteHead completes the WQE at SQHead (completeReq: SQHead, CQE,
// ERR on failure).
func (d *Device) rcCompleteHead(n int, s rcSnap, wqe chip.SendWQE, total uint64, res result) {
	d.completeReq(d.rcRequester(n, s, &rcWQE{wqe: wqe, total: total}), res)
}

// rcReadResponse places a READ response packet: the next one the oldest
// unfinished READ expects, in its place in the message; a later one means
// some were lost (go back), an earlier one is a duplicate.
func (d *Device) rcReadResponse(n int, s rcSnap, rc *rcQP, pk *ibwire.Packet) {
	psn := pk.BTH.PSN
	var w *rcWQE
	for _, o := range rc.inflight {
		if o.isRead() && !o.complete() {
			w = o
			break
		}
	}
	if w == nil || !psn.InRange(w.first, w.npkts) {
		d.net.count(chip.NetCntDropPSN)
		return
	}
	want := w.first.Add(int32(w.done))
	switch {
	case psn.Before(want):
		return // a duplicate
	case psn.After(want):
		rc.readSkipped = rc.readSkipped || rc.retrying
		d.rcRetry(n, s, rc, want, false)
		return
	}
	off := uint64(w.done) * netPMTU
	op := pk.BTH.Opcode
	// A READ is asked for in pieces, and again from the middle after a
	// loss, each answered from FIRST on: so only the message's end is
	// checked, LAST or ONLY there.
	first, last := w.done == 0, w.done+1 == w.npkts
	ends := op == ibwire.RCReadResponseLast || op == ibwire.RCReadResponseOnly
	size := min(netPMTU, w.total-off)
	if last && !ends || uint64(len(pk.Payload)) != size {
		d.net.count(chip.NetCntDropLength)
		return
	}
	if w.first.Sub(rc.inflight[0].first) > 0 && d.rcConfirm(n, s, rc, w.first.Add(-1), false) {
		return // a READ response acknowledges what was sent before the READ
	}
	r := d.rcRequester(n, s, w)
	lp := &packet{src: r.qpn, op: w.wqe.Opcode, off: off, n: size, total: w.total, first: first, last: last,
		data: pk.Payload, srcEpoch: s.epoch}
	if !d.rcPlace(n, s, rc, w, r, lp) { // a page fault: the READ is asked again after it
		return
	}
	d.rcAnswered(n, s, rc, w)
	if rc.readSkipped && !w.complete() && len(rc.inflight) > 0 && !rc.retrying {
		// Responses past this one came while going back and were dropped:
		// what brought them (a request sent again that overtook the one
		// for this gap) will not bring them again. Ask now, not after
		// the timer.
		d.rcRetry(n, s, rc, w.first.Add(int32(w.done)), false)
	}
}

// rcPlace writes a response's bytes (lp.data) into w's local SGEs
// (LOCAL_WRITE); a refusal completes w if it is at SQHead. It reports
// whether they were placed (not: refused, or a page fault raised, after
// which w is sent again).
func (d *Device) rcPlace(n int, s rcSnap, rc *rcQP, w *rcWQE, r *requester, lp *packet) bool {
	spans, res := d.localSpans(r, s.pd, lp, true)
	if res.stall {
		return false
	}
	if res.ok() {
		if err := dmaSpans(s.dma, spans, lp.data, true); err != nil {
			d.countDMAErr(err)
			res = fail(uapi.GOHFI_WC_LOC_PROT_ERR, chip.VendorErrDMA)
		}
	}
	if !res.ok() {
		if rc.inflight[0] == w {
			d.rcComplete(n, s, rc, res)
		}
		return false
	}
	return true
}

// rcAnswered counts a response of w placed and completes what that
// allows, with an ACK that came before it and went past w.
func (d *Device) rcAnswered(n int, s rcSnap, rc *rcQP, w *rcWQE) {
	w.done++
	if w.complete() && rc.hasAck {
		d.rcConfirm(n, s, rc, rc.ackPSN, true)
		return
	}
	d.rcCompleteDone(n, s, rc, true)
}

// rcTimeout is QP n's timer: the end of an RNR wait (send again), or a
// retransmission timeout (go back to the first PSN not confirmed).
func (d *Device) rcTimeout(n int) bool {
	rc, s := d.rcSync(n)
	if rc == nil || !rc.reqReady || s.state != stateRTS {
		return false
	}
	if rc.rnrWait {
		rc.rnrWait = false
		d.rcArm(rc)
		d.kickEngine()
		return true
	}
	if len(rc.inflight) == 0 {
		return false
	}
	if len(d.net.rx) > 0 {
		// Packets wait in the port's queue: what the peer answered may be
		// among them. The timer starts again once they are handled.
		d.rcArm(rc)
		return false
	}
	d.net.count(chip.NetCntTimeouts)
	rc.backoff = min(rc.backoff+1, rcMaxBackoff)
	w := rc.inflight[0]
	d.rcRetry(n, s, rc, w.first.Add(int32(w.done)), true)
	return true
}

// rcAtomicAck places an atomic's result: the value the target held, in
// the WQE's 8-byte SGE (LOCAL_WRITE). It also acknowledges what was sent
// before the atomic.
func (d *Device) rcAtomicAck(n int, s rcSnap, rc *rcQP, pk *ibwire.Packet) {
	psn := pk.BTH.PSN
	var w *rcWQE
	for _, o := range rc.inflight {
		if o.first == psn && isAtomic(o.wqe.Opcode) && !o.complete() {
			w = o
			break
		}
	}
	if w == nil {
		d.net.count(chip.NetCntDropPSN) // a duplicate, or for nothing asked
		return
	}
	if psn.Sub(rc.inflight[0].first) > 0 && d.rcConfirm(n, s, rc, psn.Add(-1), false) {
		return
	}
	r := d.rcRequester(n, s, w)
	var orig [8]byte
	binary.LittleEndian.PutUint64(orig[:], pk.AtomicAckETH.Orig)
	lp := &packet{src: r.qpn, op: w.wqe.Opcode, n: 8, total: 8, first: true, last: true, data: orig[:], srcEpoch: s.epoch}
	// A page fault: the atomic is sent again after it, and answered from
	// the responder's record.
	if d.rcPlace(n, s, rc, w, r, lp) {
		d.rcAnswered(n, s, rc, w)
	}
}
