package hfisim

import (
	"encoding/binary"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/vfio/vfiouser"
)

// The responder side of the verbs engine. Every packet is checked on its
// own, against the responder QP's state and the MPT as they are when the
// packet arrives.

// packet is one MTU-sized piece of a message on the loopback wire.
type packet struct {
	src, dst    uint32 // QP numbers
	op          uint8  // GOHFI_WR_*
	off, n      uint64 // the piece: message bytes [off, off+n)
	total       uint64
	first, last bool
	raddr       uint64 // remote_addr of the message
	rkey, imm   uint32
	cmp, swap   uint64
	data        []byte // atomic: the answer
	orig        uint64 // atomic: the value the target held
	// from is where the bytes come from: the requester's SGEs (SEND,
	// WRITE), the responder's memory (READ, set by respondRead, with rs the
	// responder that checked it); mv collects the moves (mover.go).
	from []span
	rs   *responder
	mv   *mover
	// The incarnations the packet belongs to: the requester QP's epoch when
	// it read the WQE, and the responder QP's epoch when it accepted the
	// message's first packet (set by respond for a first packet). A packet
	// of another incarnation of either end is lost (see respond).
	srcEpoch, dstEpoch uint64
}

// responder is the responder QP as one packet found it.
type responder struct {
	idx    int
	epoch  uint64
	pd     uint32
	access uint32
	dma    vfiouser.DMA // the engine's turn that delivers the packet
	gen    uint64
}

// recvClaim is the receive WQE at a responder's RQHead that a SEND or RDMA
// WRITE with immediate from requester src is filling.
type recvClaim struct {
	wqe chip.RecvWQE
	src uint32
}

// respond delivers pk to its destination QP and returns the requester's
// result. A destination that does not exist, is not in RTR or RTS, or is
// not connected to the requester (its QPDest) drops the packet: the
// requester's retries run out (GOHFI_WC_RETRY_EXC_ERR). So does a packet
// of a past incarnation of either end (as PSNs do on a real wire): its
// requester QP was reset or moved to ERR since it read the WQE (a QP
// cycled RESET->INIT->RTR while the engine was between reading a WQE and
// delivering its packet would otherwise take the old message, complete a
// new receive WQE with it or go to ERR over it, before its own RTS), or,
// after the first packet, the responder QP was.
func (d *Device) respond(dma vfiouser.DMA, gen uint64, pk *packet) result {
	d.mu.Lock()
	idx, src := int(pk.dst)-chip.QPNBase, int(pk.src)-chip.QPNBase
	if pk.dst < chip.QPNBase || idx >= len(d.qps) || d.gen != gen {
		d.mu.Unlock()
		return lost
	}
	q := &d.qps[idx]
	switch {
	case !q.accepts() || q.destQPN() != pk.src || q.destPort() != 0,
		d.qps[src].epoch != pk.srcEpoch || d.qps[src].state != stateRTS,
		!pk.first && q.epoch != pk.dstEpoch:
		d.mu.Unlock()
		return lost
	}
	rs := &responder{idx: idx, epoch: q.epoch, pd: q.pd(), access: q.access(), dma: dma, gen: gen}
	pk.dstEpoch = q.epoch
	d.mu.Unlock()

	if needsRecv(pk.op) && pk.first {
		if res := d.claimRecv(dma, gen, rs, pk); !res.ok() {
			return res
		}
	}
	switch pk.op {
	case uapi.GOHFI_WR_SEND, uapi.GOHFI_WR_SEND_WITH_IMM, uapi.GOHFI_WR_SEND_WITH_INV:
		return d.respondSend(dma, gen, rs, pk)
	case uapi.GOHFI_WR_RDMA_WRITE, uapi.GOHFI_WR_RDMA_WRITE_WITH_IMM:
		return d.respondWrite(dma, gen, rs, pk)
	case uapi.GOHFI_WR_RDMA_READ, uapi.GOHFI_WR_RDMA_READ_WITH_INV:
		return d.respondRead(rs, pk)
	default:
		return d.respondAtomic(dma, rs, pk)
	}
}

// claimRecv takes the receive WQE at the responder's RQHead for a message
// that needs one, before its first packet moves. No receive WQE: the
// requester stalls (RNR, retried without limit).
func (d *Device) claimRecv(dma vfiouser.DMA, gen uint64, rs *responder, pk *packet) result {
	d.mu.Lock()
	q := &d.qps[rs.idx]
	if q.epoch != rs.epoch {
		d.mu.Unlock()
		return lost
	}
	if q.rqHead == q.rqTail {
		d.mu.Unlock()
		return result{stall: true}
	}
	c := &recvClaim{src: pk.src}
	q.claim = c
	addr := q.rq.base + q.rqHead*chip.RecvWQESize
	d.mu.Unlock()

	var raw [chip.RecvWQESize]byte
	if err := dma.Read(addr, raw[:]); err != nil {
		d.countDMAErr(err)
		return d.respFail(dma, gen, rs, pk, uapi.GOHFI_WC_LOC_QP_OP_ERR, fail(uapi.GOHFI_WC_REM_OP_ERR, chip.VendorErrDMA))
	}
	c.wqe.Unmarshal(raw[:])
	if !allZero(raw[10:128]) || int(c.wqe.NumSGE) > d.cfg.MaxSGE {
		d.countVerbsErr()
		c.wqe.NumSGE = 0
		return d.respFail(dma, gen, rs, pk, uapi.GOHFI_WC_LOC_QP_OP_ERR, fail(uapi.GOHFI_WC_REM_OP_ERR, chip.VendorErrBadWQE))
	}
	return result{}
}

// currentClaim returns the responder's claimed receive WQE for pk's
// requester, or nil if the responder was reset or moved on.
func (d *Device) currentClaim(rs *responder, pk *packet) *recvClaim {
	d.mu.Lock()
	defer d.mu.Unlock()
	q := &d.qps[rs.idx]
	if q.epoch != rs.epoch || q.claim == nil || q.claim.src != pk.src {
		return nil
	}
	return q.claim
}

// releaseClaim forgets the receive WQE a message from src was filling (the
// requester failed locally): the WQE stays at RQHead for the next message.
func (d *Device) releaseClaim(dst, src uint32) {
	d.mu.Lock()
	defer d.mu.Unlock()
	idx := int(dst) - chip.QPNBase
	if dst >= chip.QPNBase && idx < len(d.qps) {
		if c := d.qps[idx].claim; c != nil && c.src == src {
			d.qps[idx].claim = nil
		}
	}
}

// respondSend scatters a SEND packet into the claimed receive WQE (its
// lkeys, the responder's PD, LOCAL_WRITE) and completes the receive after
// the last packet.
func (d *Device) respondSend(dma vfiouser.DMA, gen uint64, rs *responder, pk *packet) result {
	c := d.currentClaim(rs, pk)
	if c == nil {
		return lost
	}
	d.mu.Lock()
	spans, verr := d.resolveSGEsLocked(c.wqe.SGE[:c.wqe.NumSGE], rs.pd, pk.off, pk.n, true, pk.mv.remote[:0])
	pk.mv.remote = spans[:0]
	d.mu.Unlock()
	switch verr {
	case chip.VendorErrNone:
	case chip.VendorErrPageFault:
		return d.pageFault(dma, gen, pk, rs, c.wqe.SGE[:c.wqe.NumSGE])
	case chip.VendorErrLength:
		d.count(&d.errs.nakInvReq)
		return d.respFail(dma, gen, rs, pk, uapi.GOHFI_WC_LOC_LEN_ERR, fail(uapi.GOHFI_WC_REM_INV_REQ_ERR, verr))
	default:
		return d.respFail(dma, gen, rs, pk, uapi.GOHFI_WC_LOC_PROT_ERR, fail(uapi.GOHFI_WC_REM_OP_ERR, verr))
	}
	pk.mv.add(spans, pk.from, pk, rs, pk.off)
	if pk.last {
		// Placed before the invalidation and the receive completion.
		if res, ok := d.flushMoves(pk.mv); !ok {
			return res
		}
	}
	if pk.last && pk.op == uapi.GOHFI_WR_SEND_WITH_INV {
		if res := d.sendInvalidate(rs, pk); !res.ok() {
			return d.respFail(dma, gen, rs, pk, uapi.GOHFI_WC_REM_INV_REQ_ERR, res)
		}
	}
	if pk.last {
		d.completeRecv(dma, gen, rs, pk, uapi.GOHFI_WC_SUCCESS, chip.VendorErrNone)
	}
	return result{}
}

// respondWrite writes an RDMA WRITE packet through the rkey (REMOTE_WRITE)
// and, for RDMA WRITE with immediate, completes the claimed receive WQE
// after the last packet.
func (d *Device) respondWrite(dma vfiouser.DMA, gen uint64, rs *responder, pk *packet) result {
	if pk.op == uapi.GOHFI_WR_RDMA_WRITE_WITH_IMM && d.currentClaim(rs, pk) == nil {
		return lost
	}
	spans, res := d.remoteSpans(rs, pk, pk.raddr+pk.off, pk.n, uapi.IB_ACCESS_REMOTE_WRITE, chip.MTTWrite)
	if !res.ok() {
		return res
	}
	pk.mv.add(spans, pk.from, pk, rs, pk.off)
	if pk.last && pk.op == uapi.GOHFI_WR_RDMA_WRITE_WITH_IMM {
		if res, ok := d.flushMoves(pk.mv); !ok {
			return res
		}
		d.completeRecv(dma, gen, rs, pk, uapi.GOHFI_WC_SUCCESS, chip.VendorErrNone)
	}
	return result{}
}

// respondRead checks an RDMA READ response packet through the rkey
// (REMOTE_READ): the answer's bytes are pk.from, moved by the requester.
func (d *Device) respondRead(rs *responder, pk *packet) result {
	spans, res := d.remoteSpans(rs, pk, pk.raddr+pk.off, pk.n, uapi.IB_ACCESS_REMOTE_READ, chip.MTTRead)
	if !res.ok() {
		return res
	}
	pk.from, pk.rs = spans, rs
	return result{}
}

// respondAtomic executes a compare-and-swap or fetch-and-add on the 8-byte
// aligned target (REMOTE_ATOMIC) and returns the value it held in pk.orig.
// The engine is one goroutine, so atomics of the device never interleave.
func (d *Device) respondAtomic(dma vfiouser.DMA, rs *responder, pk *packet) result {
	if pk.raddr%8 != 0 {
		d.count(&d.errs.nakInvReq)
		res := fail(uapi.GOHFI_WC_REM_INV_REQ_ERR, chip.VendorErrBadWQE)
		res.respErr, res.respIdx, res.respEpoch = true, rs.idx, rs.epoch
		return res
	}
	spans, res := d.remoteSpans(rs, pk, pk.raddr, 8, uapi.IB_ACCESS_REMOTE_ATOMIC, chip.MTTRead|chip.MTTWrite)
	if !res.ok() {
		return res
	}
	var v [8]byte
	if err := dmaSpans(dma, spans, v[:], false); err != nil {
		d.countDMAErr(err)
		return d.nak(rs, chip.VendorErrDMA)
	}
	pk.orig = binary.LittleEndian.Uint64(v[:])
	nv := pk.orig + pk.cmp
	if pk.op == uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP {
		nv = pk.orig
		if pk.orig == pk.cmp {
			nv = pk.swap
		}
	}
	binary.LittleEndian.PutUint64(v[:], nv)
	if err := dmaSpans(dma, spans, v[:], true); err != nil {
		d.countDMAErr(err)
		return d.nak(rs, chip.VendorErrDMA)
	}
	return result{}
}

// remoteSpans checks and translates a remote access of n bytes at va
// through pk's rkey, in the responder QP's PD, with the right need granted
// by both the region and QPAccess. A failed check is a NAK.
func (d *Device) remoteSpans(rs *responder, pk *packet, va, n uint64, need uint32, perm uint64) ([]span, result) {
	d.mu.Lock()
	if d.qps[rs.idx].epoch != rs.epoch {
		d.mu.Unlock()
		return nil, lost // the responder was reset or moved to ERR since it took the packet
	}
	spans, verr := d.resolveLocked(pk.rkey, rs.pd, va, n, need, rs.access, perm, pk.mv.remote[:0])
	pk.mv.remote = spans[:0]
	d.mu.Unlock()
	if verr == chip.VendorErrPageFault {
		return nil, d.pageFault(rs.dma, rs.gen, pk, rs, nil)
	}
	if verr != chip.VendorErrNone {
		return nil, d.nak(rs, verr)
	}
	return spans, result{}
}

// nak is a remote access error: counted; the requester completes with
// GOHFI_WC_REM_ACCESS_ERR and the responder QP goes to ERR after it.
func (d *Device) nak(rs *responder, verr uint32) result {
	d.count(&d.errs.nakAccess)
	res := fail(uapi.GOHFI_WC_REM_ACCESS_ERR, verr)
	res.respErr, res.respIdx, res.respEpoch = true, rs.idx, rs.epoch
	return res
}

// respFail ends a message with an error of the responder's own receive WQE:
// the WQE completes with recvStatus, the responder QP goes to ERR (after
// the requester's completion), and the requester gets req.
func (d *Device) respFail(dma vfiouser.DMA, gen uint64, rs *responder, pk *packet, recvStatus uint32, req result) result {
	d.completeRecv(dma, gen, rs, pk, recvStatus, req.vendor)
	req.respErr, req.respIdx, req.respEpoch = true, rs.idx, rs.epoch
	return req
}

// completeRecv completes the claimed receive WQE and advances RQHead.
func (d *Device) completeRecv(dma vfiouser.DMA, gen uint64, rs *responder, pk *packet, status, verr uint32) {
	c := d.currentClaim(rs, pk)
	if c == nil {
		return
	}
	d.mu.Lock()
	q := &d.qps[rs.idx]
	rcq := q.rcq
	d.mu.Unlock()
	e := chip.CQE{WrID: c.wqe.WrID, Status: status, Opcode: uapi.GOHFI_WC_RECV, VendorErr: verr,
		QPNum: pk.dst, SrcQP: pk.src}
	if status == uapi.GOHFI_WC_SUCCESS {
		e.ByteLen = uint32(pk.total)
	}
	if pk.op == uapi.GOHFI_WR_RDMA_WRITE_WITH_IMM {
		e.Opcode = uapi.GOHFI_WC_RECV_RDMA_WITH_IMM
	}
	switch pk.op {
	case uapi.GOHFI_WR_SEND_WITH_IMM, uapi.GOHFI_WR_RDMA_WRITE_WITH_IMM:
		e.ImmData, e.WcFlags = pk.imm, uapi.GOHFI_WC_WITH_IMM
	case uapi.GOHFI_WR_SEND_WITH_INV:
		if status == uapi.GOHFI_WC_SUCCESS {
			e.InvalidatedRkey, e.WcFlags = pk.imm, uapi.GOHFI_WC_WITH_INVALIDATE
		}
	}
	d.postCQE(dma, gen, rcq, &e)
	d.mu.Lock()
	defer d.mu.Unlock()
	if q.epoch == rs.epoch && q.claim == c {
		q.rqHead = next(q.rqHead, q.rq.entries)
		q.claim = nil
	}
}

func (d *Device) count(c *uint64) {
	d.mu.Lock()
	*c++
	d.mu.Unlock()
}

// next is ring index i advanced by one in a ring of n entries.
func next(i, n uint64) uint64 {
	if n == 0 {
		return 0
	}
	return (i + 1) % n
}
