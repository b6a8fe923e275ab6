package hfisim

import (
	"errors"
	"iter"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/vfio/vfiouser"
)

// The verbs engine's data mover. Every packet is checked on its own, as
// before (keys, bounds, rights, ODP faults, TLB), and the checks yield the
// packet's source and destination IOVA spans; the bytes then move straight
// from the one to the other (vfiouser.CopyDMA: one copy where the device
// maps both sides), not through a packet buffer. The moves of a burst's
// packets are collected and made at once, the runs that continue each other
// on both sides as one copy, before anything the packets' completion could
// let someone see: before the message's last packet completes it (its
// receive CQE, its requester CQE), before an error completes it, at the end
// of the burst (before the engine's next TLB flush completes, so a flush
// still means no access through the old translation is in flight), and
// before a page fault suspends the QP. A move that fails is the failure of
// its packet, as if that packet's DMA had failed when it was checked: the
// packets before it are written, nothing from it on.

// move is n bytes from src to dst, message bytes [off, off+n): a piece of
// one packet, or of several packets of one run (sendRun), which share pk.
// Packets start at multiples of chip.VerbsMTU in the message, so where a
// move's packets begin and end follows from off.
type move struct {
	dst, src uint64
	off      uint64
	n        int
	pk       *packet
	rs       *responder
}

// mover holds a burst's moves until they are made.
type mover struct {
	dma   vfiouser.DMA
	gen   uint64
	buf   []byte // staging for a DMA that cannot copy by itself (test fakes), VerbsMTU bytes
	moves []move
	// Backing arrays of a packet's translations (requester's SGEs, the
	// responder's side), reused packet after packet: add copies what it
	// keeps.
	local, remote []span
	// The engine's requester and the bytes of the WQE it reads, reused
	// turn after turn (sendBurst) instead of allocated per message.
	req requester
	wqe [chip.SendWQESize]byte
}

// add queues the bytes of message bytes [off, ...) of pk (and of the
// packets after it that share pk, for a run) from the src spans to the dst
// spans (equal totals).
func (m *mover) add(dst, src []span, pk *packet, rs *responder, off uint64) {
	var di, si, doff, soff int
	for di < len(dst) && si < len(src) {
		k := min(dst[di].n-doff, src[si].n-soff)
		d, s := dst[di].iova+uint64(doff), src[si].iova+uint64(soff)
		if l := len(m.moves); l > 0 && m.moves[l-1].pk == pk &&
			m.moves[l-1].dst+uint64(m.moves[l-1].n) == d && m.moves[l-1].src+uint64(m.moves[l-1].n) == s {
			m.moves[l-1].n += k
		} else {
			m.moves = append(m.moves, move{dst: d, src: s, off: off, n: k, pk: pk, rs: rs})
		}
		off += uint64(k)
		doff += k
		soff += k
		if doff == dst[di].n {
			di, doff = di+1, 0
		}
		if soff == src[si].n {
			si, soff = si+1, 0
		}
	}
}

// flushMoves makes the queued moves. A move whose requester or responder
// QP was reset or moved to ERR since its packet was checked is lost with
// the moves after it (the incarnation check of respond and fetchPacket,
// made again right before the bytes move); a failed move returns its
// packet's result. Either way ok is false and the later moves are dropped.
func (d *Device) flushMoves(m *mover) (result, bool) {
	defer func() { m.moves = m.moves[:0] }()
	for i := 0; i < len(m.moves); {
		run := m.moves[i]
		j := i + 1
		for ; j < len(m.moves); j++ {
			nx := m.moves[j]
			if nx.dst != run.dst+uint64(run.n) || nx.src != run.src+uint64(run.n) ||
				overlaps(run.dst, run.src, uint64(run.n+nx.n)) {
				break
			}
			run.n += nx.n
		}
		gone, err := d.copyRun(m, &run)
		if gone {
			return lost, false
		}
		if err != nil {
			// Which packet failed: again packet by packet, in order.
			for _, mv := range m.moves[i:j] {
				for p := range packetPieces(mv) {
					gone, err := d.copyRun(m, &p)
					if gone {
						return lost, false
					}
					if err != nil {
						d.countDMAErr(err)
						var ce *vfiouser.CopyError
						return d.moveFailed(m, p, errors.As(err, &ce) && ce.Dst), false
					}
				}
			}
		}
		i = j
	}
	return result{}, true
}

// packetPieces yields mv cut where its packets begin (multiples of
// chip.VerbsMTU in the message).
func packetPieces(mv move) iter.Seq[move] {
	return func(yield func(move) bool) {
		for mv.n > 0 {
			p := mv
			p.n = int(min(uint64(mv.n), chip.VerbsMTU-mv.off%chip.VerbsMTU))
			if !yield(p) {
				return
			}
			mv.dst, mv.src, mv.off, mv.n = mv.dst+uint64(p.n), mv.src+uint64(p.n), mv.off+uint64(p.n), mv.n-p.n
		}
	}
}

// copyRun copies run's bytes, after checking that run's packet still
// belongs to the incarnations of both QPs (gone: it does not, and nothing
// more is copied). With a DMA
// that copies by itself that is one copy; else the bytes go through m.buf
// chunk by chunk, checked again before every chunk is written.
func (d *Device) copyRun(m *mover, run *move) (gone bool, err error) {
	if !d.moveCurrent(m, run) {
		return true, nil
	}
	if _, ok := m.dma.(vfiouser.Copier); ok && !overlaps(run.dst, run.src, uint64(run.n)) {
		return false, vfiouser.CopyDMA(m.dma, run.dst, run.src, run.n, m.buf)
	}
	if overlaps(run.dst, run.src, uint64(run.n)) {
		// One piece of one packet (runs never merge overlapping pieces):
		// at most VerbsMTU bytes, copied as memmove copies.
		return false, vfiouser.CopyDMA(m.dma, run.dst, run.src, run.n, m.buf)
	}
	for off := 0; off < run.n; {
		k := min(run.n-off, len(m.buf))
		if err := m.dma.Read(run.src+uint64(off), m.buf[:k]); err != nil {
			return false, &vfiouser.CopyError{Err: err}
		}
		if !d.moveCurrent(m, run) {
			return true, nil
		}
		if err := m.dma.Write(run.dst+uint64(off), m.buf[:k]); err != nil {
			return false, &vfiouser.CopyError{Dst: true, Err: err}
		}
		off += k
	}
	return false, nil
}

// moveCurrent reports whether p's packet still belongs to the incarnations
// of its requester QP (as it read the WQE) and its responder QP (as it
// checked the packet).
func (d *Device) moveCurrent(m *mover, p *move) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	req := int(p.pk.src) - chip.QPNBase
	return d.gen == m.gen && d.qps[req].epoch == p.pk.srcEpoch && (p.rs == nil || d.qps[p.rs.idx].epoch == p.rs.epoch)
}

// overlaps reports whether [dst, dst+n) and [src, src+n) share a byte.
func overlaps(dst, src, n uint64) bool { return dst < src+n && src < dst+n }

// moveFailed is the result of a packet whose move failed on its
// destination (dstSide) or source side, as the packet's own DMA failure
// would have been.
func (d *Device) moveFailed(m *mover, p move, dstSide bool) result {
	pk, rs := p.pk, p.rs
	read := pk.op == uapi.GOHFI_WR_RDMA_READ || pk.op == uapi.GOHFI_WR_RDMA_READ_WITH_INV
	switch {
	case read && dstSide, !read && !dstSide:
		// The requester's own memory.
		if needsRecv(pk.op) {
			d.releaseClaim(pk.dst, pk.src)
		}
		return fail(uapi.GOHFI_WC_LOC_PROT_ERR, chip.VendorErrDMA)
	case needsRecv(pk.op) && pk.op != uapi.GOHFI_WR_RDMA_WRITE_WITH_IMM:
		// The responder's receive buffer.
		return d.respFail(m.dma, m.gen, rs, pk, uapi.GOHFI_WC_LOC_PROT_ERR, fail(uapi.GOHFI_WC_REM_OP_ERR, chip.VendorErrDMA))
	}
	return d.nak(rs, chip.VendorErrDMA) // the memory behind the rkey
}
