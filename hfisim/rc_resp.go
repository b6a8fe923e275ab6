package hfisim

import (
	"encoding/binary"
	"math/bits"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/ibwire"
	"github.com/gohfi/gohfi/uapi"
)

// The reliable-connection responder of a network QP (IB vol. 1 9.7.5, in
// the shape of rxe's rxe_resp.c): a request at the expected PSN is
// executed and the PSN advances; a later one is a gap, answered once with
// a sequence NAK; an earlier one is a duplicate, answered with an ACK
// again, or for a READ with its responses again, never executed twice.
// SENDs fill the receive WQE at RQHead (none: RNR NAK); WRITEs and READs
// go through the rkey, the QP's PD and access; a refused request is an
// error NAK and moves the QP to ERR.

// rcWindow is how far ahead of the expected PSN a request may be, and how
// far behind a duplicate, before it is dropped as outside the window.
const rcWindow = ibwire.PSNWindow / 2

// rcResp is the responder's state of a network QP.
type rcResp struct {
	epsn    ibwire.PSN // expected PSN
	msn     uint32     // messages completed
	nakSent bool       // a sequence NAK answered the current gap
	ackDue  bool       // an ACK was asked for (sent once per receive batch)
	inMsg   bool       // a SEND or WRITE is between its first and last packet
	write   bool       // ...a WRITE
	off     uint64     // its bytes so far
	raddr   uint64     // WRITE: RETH
	rkey    uint32
	dmaLen  uint64
	reads   []rcRead // READs being answered, oldest first
	atomics [rcMaxReads]rcAtomicResult
	nextAt  int // the atomics slot the next result takes
}

// rcAtomicResult is an atomic executed, kept to answer it again, never to
// execute it twice.
type rcAtomicResult struct {
	psn   ibwire.PSN
	orig  uint64
	msn   uint32
	valid bool
}

// rcRequest handles a request packet for QP n.
func (d *Device) rcRequest(n int, pk *ibwire.Packet) {
	rc, s := d.rcSync(n)
	if rc == nil {
		d.net.count(chip.NetCntDropQP)
		return
	}
	r := &rc.resp
	psn := pk.BTH.PSN
	switch diff := psn.Sub(r.epsn); {
	case diff >= rcWindow || diff < -rcWindow:
		d.net.count(chip.NetCntDropPSN)
	case diff > 0:
		if !r.nakSent {
			r.nakSent = true
			d.net.count(chip.NetCntSeqNAKs)
			d.rcSendAck(rc, r.epsn, ibwire.NAK(ibwire.NAKPSNSeqError, r.msn))
		}
	case diff < 0:
		d.net.count(chip.NetCntDupReqs)
		switch pk.BTH.Opcode {
		case ibwire.RCReadRequest:
			if !d.rcFaultWait(n, s, rc, pk) {
				d.rcReadRespond(n, s, rc, pk, false)
			}
		case ibwire.RCCompareSwap, ibwire.RCFetchAdd:
			d.rcAtomicReplay(rc, psn)
		default:
			r.ackDue = true
		}
	default:
		if !d.rcFaultWait(n, s, rc, pk) {
			d.rcExecute(n, s, rc, pk)
		}
	}
}

// rcFaultWait answers a request that comes while QP n's page fault is
// handled (ODP over the wire): RNR NAK while the fault is pending, and the
// requester sends it again after the RNR timer; once the driver resumed
// the fault with an error, the request is NAKed remote access error (a
// receive WQE's fault completes the receive WQE with LOC_PROT_ERR). It
// reports whether it answered.
func (d *Device) rcFaultWait(n int, s rcSnap, rc *rcQP, pk *ibwire.Packet) bool {
	if !s.netFault {
		return false // none when the engine took this request's snapshot: it is the engine that raises them
	}
	pending, f := d.netFaultState(n, s)
	switch {
	case f != nil:
		var lp *packet
		if f.eqe.WQE != chip.EQEWQENone {
			lp = &f.pk
		}
		d.rcFaultFail(n, s, rc, pk, f.rs, lp)
	case pending:
		d.rcFaultRNR(rc, pk)
	default:
		return false
	}
	return true
}

// rcFault raises the page fault (odp.last) that request pk met on QP n,
// through the receive WQE's sges or (nil) its rkey up to end, and answers
// RNR NAK. Without an event queue the request fails at once.
func (d *Device) rcFault(n int, s rcSnap, rc *rcQP, rs *responder, pk *ibwire.Packet, lp *packet, sges []chip.SGE, end uint64) {
	if !d.netPageFault(n, s, rs, lp, sges, end) {
		if sges == nil {
			lp = nil
		}
		d.rcFaultFail(n, s, rc, pk, rs, lp)
		return
	}
	d.rcFaultRNR(rc, pk)
}

// rcFaultRNR answers a request waiting on a page fault with RNR NAK and
// the QP's min_rnr_timer, as mlx5 answers ODP faults of its responder.
func (d *Device) rcFaultRNR(rc *rcQP, pk *ibwire.Packet) {
	d.net.count(chip.NetCntRNRNAKs)
	d.rcSendAck(rc, pk.BTH.PSN, ibwire.RNRNAK(rc.minRNR(), rc.resp.msn))
}

// rcFaultFail fails request pk whose page fault failed: NAK remote access
// error, the QP to ERR; lp, if not nil, is the SEND (or WRITE with
// immediate) whose receive WQE faulted, which completes with LOC_PROT_ERR.
func (d *Device) rcFaultFail(n int, s rcSnap, rc *rcQP, pk *ibwire.Packet, rs *responder, lp *packet) {
	if lp != nil {
		d.completeRecv(s.dma, s.gen, rs, lp, uapi.GOHFI_WC_LOC_PROT_ERR, chip.VendorErrPageFault)
	}
	d.rcAccessError(n, s, rc, pk)
}

// rcResponder is the loopback responder's view of QP n, for the helpers the
// two share (receive WQEs, completions, invalidation).
func rcResponder(n int, s rcSnap) *responder {
	return &responder{idx: n, epoch: s.epoch, pd: s.pd, access: s.access, dma: s.dma, gen: s.gen}
}

// rcExecute executes the request at the expected PSN.
func (d *Device) rcExecute(n int, s rcSnap, rc *rcQP, pk *ibwire.Packet) {
	r := &rc.resp
	op := pk.BTH.Opcode
	pos := op.Position()
	begins := pos == ibwire.PosFirst || pos == ibwire.PosOnly
	switch {
	case op == ibwire.RCReadRequest && !r.inMsg:
		d.rcReadRespond(n, s, rc, pk, true)
		return
	case (op == ibwire.RCCompareSwap || op == ibwire.RCFetchAdd) && !r.inMsg:
		d.rcAtomic(n, s, rc, pk)
		return
	case !op.IsSend() && !op.IsWrite(), r.inMsg == begins, r.inMsg && r.write != op.IsWrite():
		// A packet out of its message's order.
		d.rcFail(n, s, rc, pk, ibwire.NAKInvalidRequest)
		return
	}
	rs := rcResponder(n, s)
	lp := &packet{src: rc.dest, dst: chip.QPNBase + uint32(n), op: wrOpcode(op), first: begins,
		last: pos == ibwire.PosLast || pos == ibwire.PosOnly, n: uint64(len(pk.Payload)), data: pk.Payload,
		imm: bits.ReverseBytes32(uint32(pk.ImmDt)), srcEpoch: s.epoch, dstEpoch: s.epoch}
	if op.HasInvalidate() {
		lp.imm = pk.IETH.RKey
	}
	if begins {
		r.off, r.write = 0, op.IsWrite()
		if r.write {
			r.raddr, r.rkey, r.dmaLen = pk.RETH.VA, pk.RETH.RKey, uint64(pk.RETH.DMALen)
		}
	}
	lp.off = r.off
	lp.total = r.off + lp.n
	var ok bool
	if r.write {
		ok = d.rcWrite(n, s, rc, rs, pk, lp)
	} else {
		ok = d.rcSend(n, s, rc, rs, pk, lp)
	}
	if !ok {
		return
	}
	r.off += lp.n
	r.inMsg = !lp.last
	if lp.last {
		r.msn = (r.msn + 1) & ibwire.Mask24
	}
	r.epsn, r.nakSent = r.epsn.Next(), false
	if pk.BTH.AckReq {
		r.ackDue = true
	}
}

// wrOpcode is the work request opcode whose message op is a packet of
// (SEND or WRITE), as completions name it.
func wrOpcode(op ibwire.Opcode) uint8 {
	switch op {
	case ibwire.RCSendLastImm, ibwire.RCSendOnlyImm:
		return uapi.GOHFI_WR_SEND_WITH_IMM
	case ibwire.RCSendLastInvalidate, ibwire.RCSendOnlyInvalidate:
		return uapi.GOHFI_WR_SEND_WITH_INV
	case ibwire.RCWriteLastImm, ibwire.RCWriteOnlyImm:
		return uapi.GOHFI_WR_RDMA_WRITE_WITH_IMM
	}
	if op.IsWrite() {
		return uapi.GOHFI_WR_RDMA_WRITE
	}
	return uapi.GOHFI_WR_SEND
}

// rcClaim takes the receive WQE a SEND or WRITE with immediate needs (false:
// none, RNR NAK sent, or the WQE was refused, error NAK sent).
func (d *Device) rcClaim(n int, s rcSnap, rc *rcQP, rs *responder, pk *ibwire.Packet, lp *packet) bool {
	res := d.claimRecv(s.dma, s.gen, rs, lp)
	if res.stall && d.pollRecords(false) {
		// The driver may have posted the receive a moment ago: its
		// doorbell record is read before the answer is RNR.
		res = d.claimRecv(s.dma, s.gen, rs, lp)
	}
	switch {
	case res.stall:
		d.net.count(chip.NetCntRNRNAKs)
		d.rcSendAck(rc, pk.BTH.PSN, ibwire.RNRNAK(rc.minRNR(), rc.resp.msn))
		return false
	case !res.ok():
		d.rcFail(n, s, rc, pk, ibwire.NAKRemoteOpErr)
		return false
	}
	return true
}

// rcSend places a SEND packet in the claimed receive WQE.
func (d *Device) rcSend(n int, s rcSnap, rc *rcQP, rs *responder, pk *ibwire.Packet, lp *packet) bool {
	if lp.first && !d.rcClaim(n, s, rc, rs, pk, lp) {
		return false
	}
	c := d.currentClaim(rs, lp)
	if c == nil {
		return false // the QP was reset or moved to ERR meanwhile
	}
	d.mu.Lock()
	spans, verr := d.resolveSGEsLocked(c.wqe.SGE[:c.wqe.NumSGE], rs.pd, lp.off, lp.n, true, nil)
	d.mu.Unlock()
	switch verr {
	case chip.VendorErrNone:
	case chip.VendorErrPageFault:
		// The receive WQE stays claimed: the retry fills it.
		d.rcFault(n, s, rc, rs, pk, lp, c.wqe.SGE[:c.wqe.NumSGE], 0)
		return false
	case chip.VendorErrLength:
		d.count(&d.errs.nakInvReq)
		d.completeRecv(s.dma, s.gen, rs, lp, uapi.GOHFI_WC_LOC_LEN_ERR, verr)
		d.rcFail(n, s, rc, pk, ibwire.NAKInvalidRequest)
		return false
	default:
		d.completeRecv(s.dma, s.gen, rs, lp, uapi.GOHFI_WC_LOC_PROT_ERR, verr)
		d.rcFail(n, s, rc, pk, ibwire.NAKRemoteOpErr)
		return false
	}
	if err := dmaSpans(s.dma, spans, lp.data, true); err != nil {
		d.countDMAErr(err)
		d.completeRecv(s.dma, s.gen, rs, lp, uapi.GOHFI_WC_LOC_PROT_ERR, chip.VendorErrDMA)
		d.rcFail(n, s, rc, pk, ibwire.NAKRemoteOpErr)
		return false
	}
	if lp.last && lp.op == uapi.GOHFI_WR_SEND_WITH_INV {
		if res := d.sendInvalidate(rs, lp); !res.ok() {
			d.completeRecv(s.dma, s.gen, rs, lp, uapi.GOHFI_WC_REM_INV_REQ_ERR, res.vendor)
			d.rcFail(n, s, rc, pk, ibwire.NAKInvalidRequest)
			return false
		}
	}
	if lp.last {
		d.completeRecv(s.dma, s.gen, rs, lp, uapi.GOHFI_WC_SUCCESS, chip.VendorErrNone)
	}
	return true
}

// rcWrite writes a WRITE packet through the message's rkey: the whole
// message is checked at its first packet (rights and bounds of its RETH
// length), every packet's bytes must stay inside that length, and the last
// must end it; WRITE with immediate then completes a receive WQE.
func (d *Device) rcWrite(n int, s rcSnap, rc *rcQP, rs *responder, pk *ibwire.Packet, lp *packet) bool {
	r := &rc.resp
	switch {
	case r.off+lp.n > r.dmaLen, lp.last && r.off+lp.n != r.dmaLen, lp.first && r.dmaLen > maxMsgSize:
		d.count(&d.errs.nakInvReq)
		d.rcFail(n, s, rc, pk, ibwire.NAKInvalidRequest)
		return false
	}
	if lp.first && r.dmaLen > 0 {
		d.mu.Lock()
		_, verr := d.checkKey(r.rkey, s.pd, r.raddr, r.dmaLen, uapi.IB_ACCESS_REMOTE_WRITE, s.access)
		d.mu.Unlock()
		if verr != chip.VendorErrNone {
			d.rcAccessError(n, s, rc, pk)
			return false
		}
	}
	imm := lp.op == uapi.GOHFI_WR_RDMA_WRITE_WITH_IMM
	if imm && lp.last && !d.rcClaim(n, s, rc, rs, pk, lp) {
		return false
	}
	d.mu.Lock()
	spans, verr := d.resolveLocked(r.rkey, s.pd, r.raddr+r.off, lp.n, uapi.IB_ACCESS_REMOTE_WRITE, s.access, chip.MTTWrite, d.net.spans[:0])
	d.mu.Unlock()
	switch verr {
	case chip.VendorErrNone:
	case chip.VendorErrPageFault:
		if imm && lp.last {
			d.releaseClaim(lp.dst, lp.src)
		}
		d.rcFault(n, s, rc, rs, pk, lp, nil, r.raddr+r.dmaLen)
		return false
	default:
		d.rcAccessError(n, s, rc, pk)
		return false
	}
	if err := dmaSpans(s.dma, spans, lp.data, true); err != nil {
		d.countDMAErr(err)
		d.rcAccessError(n, s, rc, pk)
		return false
	}
	if imm && lp.last {
		lp.total = r.dmaLen
		d.completeRecv(s.dma, s.gen, rs, lp, uapi.GOHFI_WC_SUCCESS, chip.VendorErrNone)
	}
	return true
}

// rcReadRespond answers a READ request with its responses: a new one
// (fresh: checked whole, then the expected PSN moves past its responses),
// or a duplicate (its responses again, from its own PSN and RETH, which
// the requester sets to where its responses stopped). Every response is
// read through the rkey when it is sent.
func (d *Device) rcReadRespond(n int, s rcSnap, rc *rcQP, pk *ibwire.Packet, fresh bool) {
	r := &rc.resp
	va, key, length := pk.RETH.VA, pk.RETH.RKey, uint64(pk.RETH.DMALen)
	npkts := max(1, (length+netPMTU-1)/netPMTU)
	if length > maxMsgSize {
		d.count(&d.errs.nakInvReq)
		if fresh {
			d.rcFail(n, s, rc, pk, ibwire.NAKInvalidRequest)
		}
		return
	}
	if length > 0 {
		// Translated whole: a page not present faults here, before the
		// READ is taken (ODP over the wire).
		d.mu.Lock()
		_, verr := d.resolveLocked(key, s.pd, va, length, uapi.IB_ACCESS_REMOTE_READ, s.access, chip.MTTRead, nil)
		d.mu.Unlock()
		switch {
		case verr == chip.VendorErrPageFault:
			d.rcFault(n, s, rc, rcResponder(n, s), pk, nil, nil, va+length)
			return
		case verr != chip.VendorErrNone:
			if fresh {
				d.rcAccessError(n, s, rc, pk)
			}
			return
		}
	}
	psn := pk.BTH.PSN
	if fresh {
		r.epsn, r.nakSent = psn.Add(int32(npkts)), false
		r.msn = (r.msn + 1) & ibwire.Mask24
	} else if psn.Add(int32(npkts)).After(r.epsn) {
		d.net.count(chip.NetCntDropPSN) // a "duplicate" that reaches past what was asked
		return
	}
	if len(r.reads) >= rcMaxReads {
		d.net.count(chip.NetCntDropFlood) // the requester asks again when its timer says so
		return
	}
	r.reads = append(r.reads, rcRead{psn: psn, va: va, key: key, length: length, npkts: npkts, msn: r.msn})
	d.rcPumpReads(n, s, rc)
}

// rcMaxReads is how many READ requests a responder QP answers at once
// (ib_qp_attr's max_dest_rd_atomic); rcReadBurst how many responses it
// sends per engine pass: a READ of a gigabyte does not stall the device.
const (
	rcMaxReads  = 16
	rcReadBurst = 64
)

// rcRead is a READ request being answered.
type rcRead struct {
	psn      ibwire.PSN
	va       uint64
	key      uint32
	length   uint64
	npkts, i uint64 // responses in all, sent so far
	msn      uint32
}

// rcPumpReads sends up to rcReadBurst responses of QP n's READs, in
// order; it reports whether it sent any. Every response is read through
// the rkey as it is sent.
func (d *Device) rcPumpReads(n int, s rcSnap, rc *rcQP) bool {
	r := &rc.resp
	sent := 0
	for len(r.reads) > 0 && sent < rcReadBurst {
		j := &r.reads[0]
		off := j.i * netPMTU
		size := min(netPMTU, j.length-off)
		out := ibwire.Packet{BTH: ibwire.BTH{PKey: ibwire.DefaultPKey, DestQP: rc.dest, PSN: j.psn.Add(int32(j.i))},
			AETH: ibwire.ACK(ibwire.CreditsInvalid, j.msn)}
		switch {
		case j.npkts == 1:
			out.BTH.Opcode = ibwire.RCReadResponseOnly
		case j.i == 0:
			out.BTH.Opcode = ibwire.RCReadResponseFirst
		case j.i == j.npkts-1:
			out.BTH.Opcode = ibwire.RCReadResponseLast
		default:
			out.BTH.Opcode = ibwire.RCReadResponseMiddle
		}
		data := d.net.payload[:size]
		d.mu.Lock()
		spans, verr := d.resolveLocked(j.key, s.pd, j.va+off, size, uapi.IB_ACCESS_REMOTE_READ, s.access, chip.MTTRead, d.net.spans[:0])
		d.mu.Unlock()
		err := error(nil)
		if verr == chip.VendorErrNone {
			if err = dmaSpans(s.dma, spans, data, false); err != nil {
				d.countDMAErr(err)
			}
		}
		if verr != chip.VendorErrNone || err != nil {
			// The key changed under the READ, its pages went since the
			// request was taken (an invalidation), or the IOMMU refused:
			// the READ ends here, the requester's timer asks again (and
			// the request faults then).
			r.reads = r.reads[1:]
			continue
		}
		out.Payload = data
		d.transmit(rc.peer, &out)
		sent++
		if j.i++; j.i == j.npkts {
			r.reads = r.reads[1:]
		}
	}
	return sent > 0
}

// pumpReads gives every network QP with READ responses to send a turn.
func (d *Device) pumpReads() bool {
	busy := false
	for n := range d.net.rc {
		if len(d.net.rc[n].resp.reads) == 0 {
			continue
		}
		rc, s := d.rcSync(n) // a QP reset since starts afresh, owing nothing
		if rc != nil && d.rcPumpReads(n, s, rc) {
			busy = true
		}
	}
	return busy
}

// rcAccessError NAKs a request its rkey does not allow.
func (d *Device) rcAccessError(n int, s rcSnap, rc *rcQP, pk *ibwire.Packet) {
	d.count(&d.errs.nakAccess)
	d.rcFail(n, s, rc, pk, ibwire.NAKRemoteAccessErr)
}

// rcFail sends an error NAK for pk and moves QP n to ERR: a responder
// that refused a request does not take the connection's next one.
func (d *Device) rcFail(n int, s rcSnap, rc *rcQP, pk *ibwire.Packet, code ibwire.NAKCode) {
	d.net.count(chip.NetCntErrNAKs)
	d.rcSendAck(rc, pk.BTH.PSN, ibwire.NAK(code, rc.resp.msn))
	d.mu.Lock()
	if d.gen == s.gen && d.qps[n].epoch == s.epoch {
		d.qpErrorLocked(n)
	}
	d.mu.Unlock()
}

// rcSendAck sends an ACK, RNR NAK or NAK with PSN psn to the peer.
func (d *Device) rcSendAck(rc *rcQP, psn ibwire.PSN, a ibwire.AETH) {
	pk := ibwire.Packet{BTH: ibwire.BTH{Opcode: ibwire.RCAcknowledge, PKey: ibwire.DefaultPKey, DestQP: rc.dest, PSN: psn},
		AETH: a}
	d.transmit(rc.peer, &pk)
}

// flushAcks sends the ACKs the batch of requests just handled asked for:
// one per QP, for the last PSN executed.
func (d *Device) flushAcks() bool {
	sent := false
	for n := range d.net.rc {
		if !d.net.rc[n].resp.ackDue {
			continue
		}
		rc, _ := d.rcSync(n) // a QP reset since starts afresh, owing nothing
		if rc == nil || !rc.resp.ackDue {
			d.net.rc[n].resp.ackDue = false
			continue
		}
		rc.resp.ackDue = false
		d.net.count(chip.NetCntAcksSent)
		d.rcSendAck(rc, rc.resp.epsn.Add(-1), ibwire.ACK(ibwire.CreditsInvalid, rc.resp.msn))
		sent = true
	}
	return sent
}

// rcAtomic executes a COMPARE_SWAP or FETCH_ADD at the expected PSN on the
// 8-byte aligned target its rkey allows (REMOTE_ATOMIC), keeps the result
// and answers with it. The engine is one goroutine, so the device's
// atomics (of the port and of loopback) never interleave.
func (d *Device) rcAtomic(n int, s rcSnap, rc *rcQP, pk *ibwire.Packet) {
	r := &rc.resp
	a := pk.AtomicETH
	if a.VA%8 != 0 {
		d.count(&d.errs.nakInvReq)
		d.rcFail(n, s, rc, pk, ibwire.NAKInvalidRequest)
		return
	}
	d.mu.Lock()
	spans, verr := d.resolveLocked(a.RKey, s.pd, a.VA, 8, uapi.IB_ACCESS_REMOTE_ATOMIC, s.access, chip.MTTRead|chip.MTTWrite, nil)
	d.mu.Unlock()
	switch verr {
	case chip.VendorErrNone:
	case chip.VendorErrPageFault:
		d.rcFault(n, s, rc, rcResponder(n, s), pk, nil, nil, a.VA+8)
		return
	default:
		d.rcAccessError(n, s, rc, pk)
		return
	}
	var v [8]byte
	if err := dmaSpans(s.dma, spans, v[:], false); err != nil {
		d.countDMAErr(err)
		d.rcAccessError(n, s, rc, pk)
		return
	}
	orig := binary.LittleEndian.Uint64(v[:])
	nv := orig + a.SwapAdd
	if pk.BTH.Opcode == ibwire.RCCompareSwap {
		nv = orig
		if orig == a.Compare {
			nv = a.SwapAdd
		}
	}
	binary.LittleEndian.PutUint64(v[:], nv)
	if err := dmaSpans(s.dma, spans, v[:], true); err != nil {
		d.countDMAErr(err)
		d.rcAccessError(n, s, rc, pk)
		return
	}
	r.epsn, r.nakSent = pk.BTH.PSN.Next(), false
	r.msn = (r.msn + 1) & ibwire.Mask24
	r.atomics[r.nextAt] = rcAtomicResult{psn: pk.BTH.PSN, orig: orig, msn: r.msn, valid: true}
	r.nextAt = (r.nextAt + 1) % len(r.atomics)
	d.rcAtomicReplay(rc, pk.BTH.PSN)
}

// rcAtomicReplay answers the atomic at psn with its kept result (an
// ATOMIC ACKNOWLEDGE); one too old to be kept is dropped and counted.
func (d *Device) rcAtomicReplay(rc *rcQP, psn ibwire.PSN) {
	for _, a := range rc.resp.atomics {
		if a.valid && a.psn == psn {
			pk := ibwire.Packet{BTH: ibwire.BTH{Opcode: ibwire.RCAtomicAcknowledge, PKey: ibwire.DefaultPKey, DestQP: rc.dest, PSN: psn},
				AETH: ibwire.ACK(ibwire.CreditsInvalid, a.msn), AtomicAckETH: ibwire.AtomicAckETH{Orig: a.orig}}
			d.transmit(rc.peer, &pk)
			return
		}
	}
	d.net.count(chip.NetCntDropPSN)
}
