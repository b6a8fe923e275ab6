package hfisim

import (
	"encoding/binary"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/vfio/vfiouser"
)

// The requester side of the verbs engine: it takes the send WQE at a QP's
// SQHead, checks it, moves its message packet by packet through the
// responder (resp.go) and completes it.

const (
	maxMsgSize = 1 << 30 // RegMaxMsgSize
	verbsBurst = 64      // packets one QP moves before the next QP's turn

	knownSendFlags = uapi.GOHFI_SEND_FENCE | uapi.GOHFI_SEND_SIGNALED | uapi.GOHFI_SEND_SOLICITED | uapi.GOHFI_SEND_INLINE
)

// reqProgress is the requester's state of the send WQE at SQHead.
type reqProgress struct {
	wqe      chip.SendWQE
	total    uint64 // message length: the sum of the SGE lengths
	off      uint64 // bytes moved
	pkts     uint64 // packets moved
	dstEpoch uint64 // the responder QP's epoch when it accepted the first packet
}

// requester is one turn of the engine on QP n's send queue.
type requester struct {
	dma   vfiouser.DMA
	gen   uint64
	n     int
	qpn   uint32
	epoch uint64
	p     reqProgress
	mv    *mover // the engine's, for this turn (mover.go)
}

// result is the outcome of a packet or message for the requester.
type result struct {
	status, vendor uint32 // requester completion status: GOHFI_WC_SUCCESS to go on
	stall          bool   // no receive WQE at the responder (RNR): try again later
	respErr        bool   // the responder QP goes to ERR once the requester has completed
	respIdx        int
	respEpoch      uint64
}

func fail(status, vendor uint32) result { return result{status: status, vendor: vendor} }

var lost = fail(uapi.GOHFI_WC_RETRY_EXC_ERR, chip.VendorErrRemoteQP)

func (r result) ok() bool { return !r.stall && r.status == uapi.GOHFI_WC_SUCCESS }

// pollVerbs gives every QP with work one turn and reports whether any had
// work it could do. Which QPs have work is read under one lock: a pass over
// idle QPs is what the engine does most while it polls doorbell records.
func (d *Device) pollVerbs(mv *mover) bool {
	busy := false
	d.runTLBCommands()
	if d.net != nil && d.pollNet() { // first: what arrived may give QPs work
		busy = true
	}
	d.mu.Lock()
	backlog := len(d.odp.backlog) > 0
	dma, gen := d.dma, d.gen
	d.stepList = d.stepList[:0]
	for n := range d.qps {
		if flush, send := d.qps[n].work(); flush || send {
			d.stepList = append(d.stepList, n)
		}
	}
	d.mu.Unlock()
	if backlog && dma != nil && d.flushEQ(dma, gen) {
		busy = true
	}
	for _, n := range d.stepList {
		if d.stepQP(n, mv) {
			busy = true
			d.runTLBCommands() // between one QP's packets and the next's
		}
	}
	if d.net != nil {
		d.net.flushTx() // the network QPs' packets of this pass
	}
	return busy
}

// work says whether QP q has WQEs to flush (in ERR) or to send (in RTS,
// not waiting for a page fault). The caller holds d.mu.
func (q *qpState) work() (flush, send bool) {
	flush = q.state == stateErr && (q.sqHead != q.sqTail || q.rqHead != q.rqTail)
	send = q.state == stateRTS && q.sqHead != q.sqTail && q.pfWait == 0
	return flush, send
}

// stepQP flushes a QP in ERR or moves packets of a QP in RTS.
func (d *Device) stepQP(n int, mv *mover) bool {
	d.mu.Lock()
	q := &d.qps[n]
	dma, gen := d.dma, d.gen
	flush, send := q.work()
	netQP := d.isNetQPLocked(q)
	d.mu.Unlock()
	switch {
	case dma == nil:
		return false
	case flush:
		d.flushQP(dma, gen, n)
		return true
	case send && netQP:
		return d.rcStep(n)
	case send:
		return d.sendBurst(dma, gen, n, mv)
	}
	return false
}

// sendBurst moves up to verbsBurst packets of the WQE at QP n's SQHead and
// reports whether it made progress (false: stalled on RNR). The packets'
// bytes move when the burst ends, or earlier when something completes
// (mover.go).
func (d *Device) sendBurst(dma vfiouser.DMA, gen uint64, n int, mv *mover) bool {
	r, ok := d.startRequest(dma, gen, n, mv)
	if !ok {
		return true
	}
	mv.dma, mv.gen, r.mv = dma, gen, mv
	if f := d.failedFault(n); f != nil {
		d.completeReq(r, d.faultError(dma, gen, f))
		return true
	}
	if isLocalOp(r.p.wqe.Opcode) {
		d.completeReq(r, d.execLocal(r))
		return true
	}
	for budget := verbsBurst; budget > 0; {
		var res result
		if k := d.sendRun(r, budget); k > 0 {
			budget -= k
		} else {
			res = d.sendPacket(r)
			budget--
		}
		// Whatever happens next, the packets moved so far are written
		// first; a failed move is the failure of its (earlier) packet.
		if !res.ok() || r.p.off >= r.p.total {
			if fres, ok := d.flushMoves(mv); !ok {
				d.completeReq(r, fres)
				return true
			}
		}
		switch {
		case res.stall:
			d.saveProgress(r)
			return false
		case !res.ok():
			d.completeReq(r, res)
			return true
		case r.p.off >= r.p.total:
			if r.p.wqe.Opcode == uapi.GOHFI_WR_RDMA_READ_WITH_INV {
				res = d.readInvalidate(r)
			}
			d.completeReq(r, res)
			return true
		}
	}
	// The progress is the QP's once the turn's bytes have moved (a reset
	// meanwhile loses the rest of the turn's packets at respond, and the
	// save then does nothing).
	if fres, ok := d.flushMoves(mv); !ok {
		d.completeReq(r, fres)
		return true
	}
	d.saveProgress(r)
	return true
}

// startRequest fills r, the engine's requester (in its mover, reused turn
// after turn), with the state of QP n's head WQE, reading and checking the
// WQE into mv.wqe if it is new. A WQE that cannot be read or is malformed
// completes in error here (false).
func (d *Device) startRequest(dma vfiouser.DMA, gen uint64, n int, mv *mover) (*requester, bool) {
	d.mu.Lock()
	q := &d.qps[n]
	if d.gen != gen || q.state != stateRTS || q.sqHead == q.sqTail {
		d.mu.Unlock()
		return nil, false
	}
	r := &mv.req
	*r = requester{dma: dma, gen: gen, n: n, qpn: chip.QPNBase + uint32(n), epoch: q.epoch}
	if q.req != nil {
		r.p = *q.req
		d.mu.Unlock()
		return r, true
	}
	slot := q.sqHead
	addr := q.sq.base + slot*chip.SendWQESize
	d.mu.Unlock()

	raw := mv.wqe[:]
	if err := dma.Read(addr, raw); err != nil {
		d.countDMAErr(err)
		d.completeReq(r, fail(uapi.GOHFI_WC_LOC_QP_OP_ERR, chip.VendorErrDMA))
		return nil, false
	}
	r.p.wqe.Unmarshal(raw)
	d.trace(TraceFetch, uint64(n), r.p.wqe.WrID, slot)
	total, res := d.checkSendWQE(raw, &r.p.wqe)
	r.p.total = total
	if !res.ok() {
		d.completeReq(r, res)
		return nil, false
	}
	return r, d.saveProgress(r)
}

// saveProgress stores r's progress in its QP unless the QP was reset or
// moved to ERR meanwhile.
func (d *Device) saveProgress(r *requester) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	q := &d.qps[r.n]
	if d.gen != r.gen || q.epoch != r.epoch {
		return false
	}
	q.reqBuf = r.p
	q.req = &q.reqBuf
	return true
}

// checkSendWQE checks a send WQE's fields and returns its message length.
func (d *Device) checkSendWQE(raw []byte, w *chip.SendWQE) (uint64, result) {
	if w.Flags&^knownSendFlags != 0 || !allZero(raw[28:32]) || !allZero(raw[48:64]) || int(w.NumSGE) > d.cfg.MaxSGE {
		d.countVerbsErr()
		return 0, fail(uapi.GOHFI_WC_LOC_QP_OP_ERR, chip.VendorErrBadWQE)
	}
	switch w.Opcode {
	case uapi.GOHFI_WR_SEND, uapi.GOHFI_WR_SEND_WITH_IMM, uapi.GOHFI_WR_RDMA_WRITE, uapi.GOHFI_WR_RDMA_WRITE_WITH_IMM,
		uapi.GOHFI_WR_RDMA_READ, uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP, uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD,
		uapi.GOHFI_WR_SEND_WITH_INV, uapi.GOHFI_WR_RDMA_READ_WITH_INV:
	case uapi.GOHFI_WR_FAST_REG_MR, uapi.GOHFI_WR_LOCAL_INV:
		return 0, d.checkLocalWQE(raw, w)
	default:
		return 0, fail(uapi.GOHFI_WC_LOC_QP_OP_ERR, chip.VendorErrOpcode)
	}
	var total uint64
	for _, g := range w.SGE[:w.NumSGE] {
		total += uint64(g.Length)
	}
	if total > maxMsgSize {
		return total, fail(uapi.GOHFI_WC_LOC_LEN_ERR, chip.VendorErrLength)
	}
	if isAtomic(w.Opcode) && total != 8 {
		d.countVerbsErr()
		return total, fail(uapi.GOHFI_WC_LOC_QP_OP_ERR, chip.VendorErrBadWQE)
	}
	return total, result{}
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

func isAtomic(op uint8) bool {
	return op == uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP || op == uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD
}

func needsRecv(op uint8) bool {
	return op == uapi.GOHFI_WR_SEND || op == uapi.GOHFI_WR_SEND_WITH_IMM || op == uapi.GOHFI_WR_RDMA_WRITE_WITH_IMM ||
		op == uapi.GOHFI_WR_SEND_WITH_INV
}

// wcOpcode is the completion opcode of a send WQE opcode.
func wcOpcode(op uint8) uint32 {
	switch op {
	case uapi.GOHFI_WR_RDMA_WRITE, uapi.GOHFI_WR_RDMA_WRITE_WITH_IMM:
		return uapi.GOHFI_WC_RDMA_WRITE
	case uapi.GOHFI_WR_RDMA_READ, uapi.GOHFI_WR_RDMA_READ_WITH_INV:
		return uapi.GOHFI_WC_RDMA_READ
	case uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP:
		return uapi.GOHFI_WC_COMP_SWAP
	case uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD:
		return uapi.GOHFI_WC_FETCH_ADD
	case uapi.GOHFI_WR_LOCAL_INV:
		return uapi.GOHFI_WC_LOCAL_INV
	case uapi.GOHFI_WR_BIND_MW:
		return uapi.GOHFI_WC_BIND_MW
	case uapi.GOHFI_WR_FAST_REG_MR:
		return uapi.GOHFI_WC_FAST_REG_MR
	}
	return uapi.GOHFI_WC_SEND
}

// sendPacket checks the next packet of r's message and queues its bytes
// on r's mover (an atomic moves at once).
func (d *Device) sendPacket(r *requester) result {
	p := &r.p
	n := min(uint64(chip.VerbsMTU), p.total-p.off)
	d.mu.Lock()
	q := &d.qps[r.n]
	pk := &packet{
		src: r.qpn, dst: q.destQPN(), op: p.wqe.Opcode, off: p.off, n: n, total: p.total,
		first: p.pkts == 0, last: p.off+n == p.total,
		raddr: p.wqe.RemoteAddr, rkey: p.wqe.Rkey, imm: p.wqe.Imm, cmp: p.wqe.CompareAdd, swap: p.wqe.Swap,
		srcEpoch: r.epoch, dstEpoch: p.dstEpoch, mv: r.mv,
	}
	if isAtomic(pk.op) {
		pk.data = r.mv.buf[:n]
	}
	pd := q.pd()
	d.mu.Unlock()

	var res result
	switch {
	case pk.op == uapi.GOHFI_WR_RDMA_READ || pk.op == uapi.GOHFI_WR_RDMA_READ_WITH_INV || isAtomic(pk.op):
		res = d.fetchPacket(r, pd, pk)
	default:
		if res = d.gatherLocal(r, pd, pk); res.ok() {
			res = d.respond(r.dma, r.gen, pk)
		} else if !pk.first && needsRecv(pk.op) && !res.stall {
			d.releaseClaim(pk.dst, pk.src)
		}
	}
	if res.ok() {
		d.mu.Lock()
		d.errs.verbsPkts++
		d.mu.Unlock()
		p.off += n
		p.pkts++
		p.dstEpoch = pk.dstEpoch
	}
	return res
}

// sendRun moves up to budget packets of an RDMA WRITE or READ past its
// first packet with one check of the run: the responder's state, the local
// SGEs and the rkey checked and translated for the run's bytes at once,
// under one hold of the device lock, which is what checking each packet in
// turn would have found (nothing the checks read changes meanwhile but the
// MPT and MTT in BAR4, which the driver may write at any time: a change is
// seen at the next packet checked, here the next run, still before the TLB
// flush that follows it completes). A failed move is cut into its packets
// again (flushMoves), so it fails its packet with the ones before it
// written. A run that
// any check refuses moves nothing and returns 0: the packets go one by one
// (sendPacket), which finds the refusal at its packet and reports it as
// always. Returns how many packets it moved.
func (d *Device) sendRun(r *requester, budget int) int {
	p := &r.p
	op := p.wqe.Opcode
	read := op == uapi.GOHFI_WR_RDMA_READ
	if budget < 2 || p.pkts == 0 || !read && op != uapi.GOHFI_WR_RDMA_WRITE {
		return 0
	}
	n := min(uint64(budget)*chip.VerbsMTU, p.total-p.off)
	if n <= chip.VerbsMTU {
		return 0
	}
	d.mu.Lock()
	q := &d.qps[r.n]
	dst := q.destQPN()
	idx := int(dst) - chip.QPNBase
	if d.gen != r.gen || dst < chip.QPNBase || idx >= len(d.qps) || q.epoch != r.epoch || q.state != stateRTS {
		d.mu.Unlock()
		return 0
	}
	rq := &d.qps[idx]
	if !rq.accepts() || rq.destQPN() != r.qpn || rq.destPort() != 0 || rq.epoch != p.dstEpoch {
		d.mu.Unlock()
		return 0
	}
	local, verr := d.resolveSGEsLocked(p.wqe.SGE[:p.wqe.NumSGE], q.pd(), p.off, n, read, r.mv.local[:0])
	r.mv.local = local[:0]
	if verr != chip.VendorErrNone {
		d.mu.Unlock()
		return 0
	}
	need, perm := uint32(uapi.IB_ACCESS_REMOTE_WRITE), uint64(chip.MTTWrite)
	if read {
		need, perm = uapi.IB_ACCESS_REMOTE_READ, chip.MTTRead
	}
	rs := &responder{idx: idx, epoch: rq.epoch, pd: rq.pd(), access: rq.access(), dma: r.dma, gen: r.gen}
	remote, verr := d.resolveLocked(p.wqe.Rkey, rs.pd, p.wqe.RemoteAddr+p.off, n, need, rs.access, perm, r.mv.remote[:0])
	r.mv.remote = remote[:0]
	if verr != chip.VendorErrNone {
		d.mu.Unlock()
		return 0
	}
	pkts := int((n + chip.VerbsMTU - 1) / chip.VerbsMTU)
	d.errs.verbsPkts += uint64(pkts)
	d.mu.Unlock()

	// The run's moves: its packets differ only in their bytes, so they
	// share one packet (a failed move is cut into its packets again,
	// flushMoves), and the spans of the whole run move at once.
	pk := &packet{
		src: r.qpn, dst: dst, op: op, off: p.off, n: n, total: p.total,
		last: p.off+n == p.total, raddr: p.wqe.RemoteAddr, rkey: p.wqe.Rkey,
		srcEpoch: r.epoch, dstEpoch: p.dstEpoch, mv: r.mv, rs: rs,
	}
	if read {
		r.mv.add(local, remote, pk, rs, p.off)
	} else {
		r.mv.add(remote, local, pk, rs, p.off)
	}
	p.off += n
	p.pkts += uint64(pkts)
	return pkts
}

// localSpans translates the part of the requester's SGEs packet pk
// covers (write: the device writes there, LOCAL_WRITE needed): a page
// fault suspends the WQE, any other refusal is LOC_PROT_ERR.
func (d *Device) localSpans(r *requester, pd uint32, pk *packet, write bool) ([]span, result) {
	sges := r.p.wqe.SGE[:r.p.wqe.NumSGE]
	d.mu.Lock()
	spans, verr := d.resolveSGEsLocked(sges, pd, pk.off, pk.n, write, r.mv.local[:0])
	r.mv.local = spans[:0] // the backing array for the next packet
	d.mu.Unlock()
	switch verr {
	case chip.VendorErrNone:
		return spans, result{}
	case chip.VendorErrPageFault:
		return nil, d.pageFault(r.dma, r.gen, pk, nil, sges)
	}
	return nil, fail(uapi.GOHFI_WC_LOC_PROT_ERR, verr)
}

// gatherLocal translates the packet's payload in the requester's SGEs
// (pk.from): the responder moves it from there.
func (d *Device) gatherLocal(r *requester, pd uint32, pk *packet) result {
	spans, res := d.localSpans(r, pd, pk, false)
	if !res.ok() {
		return res
	}
	pk.from = spans
	return result{}
}

// fetchPacket is a packet of an RDMA READ or an atomic: the local SGEs
// (LOCAL_WRITE) are checked first, then the responder answers, then the
// answer is written locally.
func (d *Device) fetchPacket(r *requester, pd uint32, pk *packet) result {
	spans, res := d.localSpans(r, pd, pk, true)
	if !res.ok() {
		return res
	}
	res = d.respond(r.dma, r.gen, pk)
	if !res.ok() {
		return res
	}
	if !d.requesterCurrent(r) {
		return lost // the requester was reset or moved to ERR: the answer is dropped
	}
	if !isAtomic(pk.op) {
		// The READ answer moves from the responder's memory (pk.from) to
		// the local SGEs with the burst's other moves, which check both
		// QPs again.
		r.mv.add(spans, pk.from, pk, pk.rs, pk.off)
		return res
	}
	binary.LittleEndian.PutUint64(pk.data[:8], pk.orig)
	if err := dmaSpans(r.dma, spans, pk.data, true); err != nil {
		d.countDMAErr(err)
		return fail(uapi.GOHFI_WC_LOC_PROT_ERR, chip.VendorErrDMA)
	}
	return res
}

// requesterCurrent reports whether r's QP is still the incarnation that
// started r (same device generation and QP epoch).
func (d *Device) requesterCurrent(r *requester) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.gen == r.gen && d.qps[r.n].epoch == r.epoch
}

// dmaSpans moves buf to (write) or from the spans, in order.
func dmaSpans(dma vfiouser.DMA, spans []span, buf []byte, write bool) error {
	off := 0
	for _, s := range spans {
		var err error
		if write {
			err = dma.Write(s.iova, buf[off:off+s.n])
		} else {
			err = dma.Read(s.iova, buf[off:off+s.n])
		}
		if err != nil {
			return err
		}
		off += s.n
	}
	return nil
}

// completeReq ends r's WQE: SQHead advanced and, on failure, the QP (and
// the responder if the responder failed too) moved to ERR, then a CQE if it
// failed or was signaled: whoever sees the error completion finds the QP in
// ERR already, as the verbs promise. The flush of the later WQEs runs on
// this engine goroutine after it returns, so completions stay in order.
// Nothing happens if the QP was reset or moved to ERR meanwhile: the flush
// completes the WQE then.
func (d *Device) completeReq(r *requester, res result) {
	d.trace(TraceExec, uint64(r.n), r.p.wqe.WrID, uint64(res.status))
	d.mu.Lock()
	if d.gen != r.gen {
		d.mu.Unlock()
		return
	}
	q := &d.qps[r.n]
	mine := q.epoch == r.epoch
	scq := q.scq
	var headAddr, head uint64
	if mine {
		q.sqHead = next(q.sqHead, q.sq.entries)
		q.req = nil
		headAddr, head = q.reg(chip.QPSQHeadAddr), q.sqHead
		if !res.ok() {
			d.qpErrorLocked(r.n)
		}
	}
	if res.respErr && d.qps[res.respIdx].epoch == res.respEpoch {
		d.qpErrorLocked(res.respIdx)
	}
	d.mu.Unlock()
	d.writeSQHead(r.dma, headAddr, head)
	if mine && (!res.ok() || r.p.wqe.Flags&uapi.GOHFI_SEND_SIGNALED != 0) {
		e := chip.CQE{WrID: r.p.wqe.WrID, Status: res.status, Opcode: wcOpcode(r.p.wqe.Opcode),
			VendorErr: res.vendor, QPNum: r.qpn}
		if res.ok() {
			e.ByteLen = uint32(r.p.total)
		}
		d.postCQE(r.dma, r.gen, scq, &e)
	}
}

// flushQP completes one outstanding WQE of each queue of QP n (in ERR) with
// GOHFI_WC_WR_FLUSH_ERR. A WQE that cannot be read is flushed with wr_id 0.
func (d *Device) flushQP(dma vfiouser.DMA, gen uint64, n int) {
	d.flushOne(dma, gen, n, true)
	d.flushOne(dma, gen, n, false)
}

func (d *Device) flushOne(dma vfiouser.DMA, gen uint64, n int, send bool) {
	d.mu.Lock()
	q := &d.qps[n]
	head, tail, rg, cq := q.rqHead, q.rqTail, q.rq, q.rcq
	size := uint64(chip.RecvWQESize)
	if send {
		head, tail, rg, cq, size = q.sqHead, q.sqTail, q.sq, q.scq, chip.SendWQESize
	}
	epoch := q.epoch
	if d.gen != gen || q.state != stateErr || head == tail {
		d.mu.Unlock()
		return
	}
	d.mu.Unlock()

	e := chip.CQE{Status: uapi.GOHFI_WC_WR_FLUSH_ERR, Opcode: uapi.GOHFI_WC_RECV, QPNum: chip.QPNBase + uint32(n)}
	var raw [chip.SendWQESize]byte
	if err := dma.Read(rg.base+head*size, raw[:size]); err != nil {
		d.countDMAErr(err)
	} else {
		e.WrID = binary.LittleEndian.Uint64(raw[:])
		if send {
			e.Opcode = wcOpcode(raw[8])
		}
	}
	// Consumed first, completed after, as for a WQE that ran: whoever
	// sees the flush completion finds the head past the WQE.
	d.mu.Lock()
	if d.gen != gen || q.epoch != epoch {
		d.mu.Unlock()
		return
	}
	var haddr, h uint64
	if send && q.sqHead == head {
		q.sqHead = next(head, rg.entries)
		haddr, h = q.reg(chip.QPSQHeadAddr), q.sqHead
	} else if !send && q.rqHead == head {
		q.rqHead = next(head, rg.entries)
	}
	d.mu.Unlock()
	d.writeSQHead(dma, haddr, h)
	d.postCQE(dma, gen, cq, &e)
}

// writeSQHead writes a QP's SQHead to its QPSQHeadAddr (nothing if 0),
// with the register's tag; a write the IOMMU refuses is counted.
func (d *Device) writeSQHead(dma vfiouser.DMA, reg, head uint64) {
	addr := reg &^ chip.QPSQHeadTagMask
	if addr == 0 {
		return
	}
	var b [8]byte
	put64(b[:], head|(reg&chip.QPSQHeadTagMask)<<chip.QPSQHeadTagShift)
	if err := dma.Write(addr, b[:]); err != nil {
		d.countDMAErr(err)
	}
}

func (d *Device) countDMAErr(err error) {
	d.mu.Lock()
	d.countDMAErrLocked(err)
	d.mu.Unlock()
}

// countVerbsErr counts a refusal of the verbs engine (ErrCntVerbs).
func (d *Device) countVerbsErr() {
	d.mu.Lock()
	d.errs.verbs++
	d.mu.Unlock()
}
