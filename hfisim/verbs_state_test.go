package hfisim

import (
	"bytes"
	"fmt"
	"sync"
	"testing"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
)

// TestVerbsTLB: the device caches MTT translations; only a TLB-invalidate
// of the entry's range makes it read the MTT again.
func TestVerbsTLB(t *testing.T) {
	p := newPair(t, 0x1000)
	h := p.h
	m := h.regMR(6, 1, allAccess, 0x5000_0000_0000, 0x1000)
	oldPage, newPage := m.iova, h.alloc(0x1000)
	write := func(id uint64, b byte) {
		h.write(p.local.host(p.local.va), bytes.Repeat([]byte{b}, 8))
		w := sendWQE(id, uapi.GOHFI_WR_RDMA_WRITE, sge(p.local, 0, 8))
		w.RemoteAddr, w.Rkey = m.va, m.key()
		h.postSend(p.a, w)
	}
	mttOff := uint64(m.entry.MTTFirst) * chip.MTTEntrySize
	flush := func(start, count uint64) {
		done := rd(t, h.d, chip.RegTLBInvDone)
		wr(t, h.d, chip.RegTLBInvStart, start)
		wr(t, h.d, chip.RegTLBInvCount, count)
		h.d.waitIdle() // the engine completes the flush between packets
		if rd(t, h.d, chip.RegTLBInvDone) != done+1 {
			t.Fatal("TLB flush did not complete")
		}
	}
	at := func(page uint64) []byte { return h.read(page, 8) }

	write(1, 'A')
	h.expectCQE(p.acq, 1, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
	if string(at(oldPage)) != "AAAAAAAA" {
		t.Fatal("first write missing")
	}
	miss := rd(t, h.d, chip.RegCntTLBMiss)

	// Remap the page without a flush: the device keeps the old one.
	h.bar4(mttOff, newPage|chip.MTTPresent|chip.MTTRead|chip.MTTWrite)
	flush(uint64(m.entry.MTTFirst)+1, 100) // another range
	write(2, 'B')
	h.expectCQE(p.acq, 2, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
	if string(at(oldPage)) != "BBBBBBBB" || string(at(newPage)) != "\x00\x00\x00\x00\x00\x00\x00\x00" {
		t.Fatal("a remapped MTT entry took effect without a flush")
	}
	if rd(t, h.d, chip.RegCntTLBHits) < 2 || rd(t, h.d, chip.RegCntTLBMiss) != miss {
		t.Fatal("second write: both pages should be TLB hits")
	}

	// With the flush the new page is used.
	flush(uint64(m.entry.MTTFirst), 1)
	write(3, 'C')
	h.expectCQE(p.acq, 3, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
	if string(at(newPage)) != "CCCCCCCC" || string(at(oldPage)) != "BBBBBBBB" {
		t.Fatal("flushed MTT entry not re-read")
	}

	// Zap without a flush: still translated. Zap with one: refused.
	h.bar4(mttOff, 0)
	write(4, 'D')
	h.expectCQE(p.acq, 4, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
	if string(at(newPage)) != "DDDDDDDD" {
		t.Fatal("zapped entry without flush: the cached translation was not used")
	}
	flush(0, 1<<40)
	write(5, 'E')
	h.expectCQE(p.acq, 5, uapi.GOHFI_WC_REM_ACCESS_ERR, 0, chip.VendorErrDMA)
	if string(at(newPage)) != "DDDDDDDD" {
		t.Fatal("write through a zapped, flushed entry")
	}
}

// TestVerbsCQOverflowAndInterrupt: a full CQ sets CQStatusOverflow, drops
// the CQE, counts it and moves its QPs to ERR; an armed CQ raises its
// context's interrupt once and disarms.
func TestVerbsCQOverflowAndInterrupt(t *testing.T) {
	h := newVerbs(t)
	small, other := h.newCQ(0, 4), h.newCQ(1, 16)
	wr(t, h.d, chip.CQReg(1, chip.CQControl), chip.CQCtrlEnable|chip.CQCtrlArm|1<<chip.CQCtrlCtxtShift)
	a := h.newQP(0, 1, remoteAll, small, other)
	b := h.newQP(1, 1, remoteAll, other, other)
	h.connect(a, b)
	local := h.regMR(1, 1, allAccess, 0x1000, 0x1000)
	remote := h.regMR(2, 1, allAccess, 0x9000, 0x1000)
	for i := range 4 {
		w := sendWQE(uint64(i), uapi.GOHFI_WR_RDMA_WRITE, sge(local, 0, 8))
		w.RemoteAddr, w.Rkey = remote.va, remote.key()
		h.postSend(a, w)
	}
	h.d.waitIdle()
	if got := rd(t, h.d, chip.CQReg(0, chip.CQTail)); got != 3 {
		t.Fatalf("CQ tail %d, want 3 (4 entries hold 3)", got)
	}
	if rd(t, h.d, chip.CQReg(0, chip.CQStatus))&chip.CQStatusOverflow == 0 {
		t.Fatal("no overflow status")
	}
	if rd(t, h.d, chip.RegErrCntVerbs) == 0 || rd(t, h.d, chip.RegIntStatus)&chip.IntSrcError == 0 {
		t.Fatal("overflow not counted or no error interrupt")
	}
	if n := rd(t, h.d, chip.RegErrCntBadDesc); n != 0 {
		t.Fatalf("ErrCntBadDesc %d: verbs errors belong in ErrCntVerbs", n)
	}
	h.expectErr(a)

	// CQ 1 was armed for context 1; a receive posted to a (in ERR) is
	// flushed to it.
	h.postRecv(a, recvWQE(77))
	h.d.waitIdle()
	if rd(t, h.d, chip.RegIntStatus)&chip.IntSrcCtxt(1) == 0 {
		t.Fatal("armed CQ did not raise its context's interrupt")
	}
	if rd(t, h.d, chip.CQReg(1, chip.CQControl))&chip.CQCtrlArm != 0 {
		t.Fatal("CQ still armed after its interrupt")
	}
	e, ok := h.peekCQ(other)
	if !ok || e.WrID != 77 || e.Status != uapi.GOHFI_WC_WR_FLUSH_ERR {
		t.Fatalf("flush CQE %+v", e)
	}

	// Restarting the CQ clears the overflow.
	wr(t, h.d, chip.CQReg(0, chip.CQEntries), 4)
	if rd(t, h.d, chip.CQReg(0, chip.CQStatus)) != 0 || rd(t, h.d, chip.CQReg(0, chip.CQTail)) != 0 {
		t.Fatal("CQ restart kept state")
	}
}

// TestVerbsQPStateMachine: refused transitions leave QPStatus and count an
// error; ERR flushes both queues; RESET empties them.
func TestVerbsQPStateMachine(t *testing.T) {
	h := newVerbs(t)
	cq := h.newCQ(0, 64)
	n := 3
	ctl := func(state uint64) {
		wr(t, h.d, chip.QPReg(n, chip.QPControl), state|uapi.GOHFI_QPT_RC<<chip.QPTypeShift)
	}
	status := func() uint64 { return rd(t, h.d, chip.QPReg(n, chip.QPStatus)) }
	refused := func(what string, want uint64) {
		t.Helper()
		if s := status(); s != want {
			t.Fatalf("%s: state %d, want %d", what, s, want)
		}
	}
	errs := rd(t, h.d, chip.RegErrCntVerbs)
	ctl(uapi.GOHFI_QPS_RTS)
	refused("RESET->RTS", uapi.GOHFI_QPS_RESET)
	wr(t, h.d, chip.QPReg(n, chip.QPSQTail), 1)
	if rd(t, h.d, chip.QPReg(n, chip.QPSQTail)) != 0 {
		t.Fatal("doorbell accepted in RESET")
	}
	for _, r := range []struct{ reg, v uint64 }{
		{chip.QPSQBase, h.alloc(8 * chip.SendWQESize)}, {chip.QPSQEntries, 3}, {chip.QPRQBase, h.alloc(8 * chip.RecvWQESize)},
		{chip.QPRQEntries, 8}, {chip.QPCQs, 0}, {chip.QPPD, 1},
	} {
		wr(t, h.d, chip.QPReg(n, r.reg), r.v)
	}
	ctl(uapi.GOHFI_QPS_INIT)
	refused("3-entry SQ", uapi.GOHFI_QPS_RESET)
	wr(t, h.d, chip.QPReg(n, chip.QPSQEntries), 8)
	wr(t, h.d, chip.QPReg(n, chip.QPCQs), 5) // CQ 5 is not enabled
	ctl(uapi.GOHFI_QPS_INIT)
	refused("disabled CQ", uapi.GOHFI_QPS_RESET)
	wr(t, h.d, chip.QPReg(n, chip.QPCQs), 0)
	wr(t, h.d, chip.QPReg(n, chip.QPControl), uapi.GOHFI_QPS_INIT|uapi.GOHFI_QPT_UD<<chip.QPTypeShift)
	refused("UD QP", uapi.GOHFI_QPS_RESET)
	ctl(uapi.GOHFI_QPS_INIT)
	refused("good INIT", uapi.GOHFI_QPS_INIT)
	ctl(uapi.GOHFI_QPS_RTS)
	refused("INIT->RTS", uapi.GOHFI_QPS_INIT)
	wr(t, h.d, chip.QPReg(n, chip.QPDest), 1<<32|chip.QPNBase)
	ctl(uapi.GOHFI_QPS_RTR)
	refused("RTR to port 1", uapi.GOHFI_QPS_INIT)
	wr(t, h.d, chip.QPReg(n, chip.QPSQEntries), 16)
	wr(t, h.d, chip.QPReg(n, chip.QPDest), chip.QPNBase)
	ctl(uapi.GOHFI_QPS_RTR)
	refused("ring changed after RESET", uapi.GOHFI_QPS_INIT)
	wr(t, h.d, chip.QPReg(n, chip.QPSQEntries), 8)
	if got := rd(t, h.d, chip.RegErrCntVerbs); got != errs+8 || rd(t, h.d, chip.RegErrCntBadDesc) != 0 {
		t.Fatalf("ErrCntVerbs +%d, want +8 (ErrCntBadDesc %d, want 0)", got-errs, rd(t, h.d, chip.RegErrCntBadDesc))
	}

	// Post in INIT, then ERR flushes everything.
	q := &tqp{n: n, entries: 8, sq: rd(t, h.d, chip.QPReg(n, chip.QPSQBase)), rq: rd(t, h.d, chip.QPReg(n, chip.QPRQBase))}
	h.postSend(q, sendWQE(1, uapi.GOHFI_WR_RDMA_READ))
	h.postRecv(q, recvWQE(2))
	h.postRecv(q, recvWQE(3))
	wr(t, h.d, chip.QPReg(n, chip.QPSQTail), 9) // out of range: refused
	h.modify(q, uapi.GOHFI_QPS_ERR)
	got := map[uint64]chip.CQE{}
	for range 3 {
		e := h.pollCQ(cq)
		got[e.WrID] = e
	}
	if got[1].Status != uapi.GOHFI_WC_WR_FLUSH_ERR || got[1].Opcode != uapi.GOHFI_WC_RDMA_READ ||
		got[2].Opcode != uapi.GOHFI_WC_RECV || got[3].Status != uapi.GOHFI_WC_WR_FLUSH_ERR {
		t.Fatalf("flush CQEs %+v", got)
	}
	h.postSend(q, sendWQE(4, uapi.GOHFI_WR_SEND)) // posted in ERR: flushed
	h.expectCQE(cq, 4, uapi.GOHFI_WC_WR_FLUSH_ERR, 0, 0)
	ctl(uapi.GOHFI_QPS_RTS)
	refused("ERR->RTS", uapi.GOHFI_QPS_ERR)
	h.modify(q, uapi.GOHFI_QPS_RESET)
	for _, r := range []uint64{chip.QPSQHead, chip.QPSQTail, chip.QPRQHead, chip.QPRQTail} {
		if rd(t, h.d, chip.QPReg(n, r)) != 0 {
			t.Fatalf("register %#x not 0 after RESET", r)
		}
	}
}

// TestVerbsDeviceReset: reset clears the MPT, the TLB, QPs and CQs.
func TestVerbsDeviceReset(t *testing.T) {
	p := newPair(t, 0x1000)
	h := p.h
	w := sendWQE(1, uapi.GOHFI_WR_RDMA_WRITE, sge(p.local, 0, 8))
	w.RemoteAddr, w.Rkey = p.remote.va, p.remote.key()
	h.postSend(p.a, w)
	h.expectCQE(p.acq, 1, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
	if err := h.d.Reset(); err != nil {
		t.Fatal(err)
	}
	var b [8]byte
	h.d.RegionRead(chip.MTTBar, chip.MPTOffset(h.d.cfg.MTTEntries)+uint64(p.remote.idx)*chip.MPTEntrySize+8, b[:])
	if b != [8]byte{} {
		t.Fatal("MPT entry survived reset")
	}
	h.d.mu.Lock()
	tlb := h.d.tlb.len()
	h.d.mu.Unlock()
	if tlb != 0 || h.state(p.a) != uapi.GOHFI_QPS_RESET || rd(t, h.d, chip.CQReg(0, chip.CQControl)) != 0 ||
		rd(t, h.d, chip.RegCntVerbsPkts) != 0 {
		t.Fatal("reset left verbs state")
	}
}

// TestVerbsCQESeqLastAndWrap: the device writes a CQE as bytes 0-39, then
// 48-63, then the word with wc_flags and seq (40-47) on its own, so seq
// becomes visible last; seq runs 0xffffffff, 1 (0 is skipped).
func TestVerbsCQESeqLastAndWrap(t *testing.T) {
	p := newPair(t, 0x1000)
	h := p.h
	h.d.mu.Lock()
	h.d.cqs[p.acq.n].seq = 0xfffffffe
	h.d.mu.Unlock()
	p.acq.seq = 0xfffffffe
	lo, hi := p.acq.iova, p.acq.iova+p.acq.entries*chip.CQESize
	var mu sync.Mutex
	var writes [][2]uint64
	h.dma.mu.Lock()
	h.dma.onWrite = func(iova uint64, n int) {
		if iova >= lo && iova < hi {
			mu.Lock()
			writes = append(writes, [2]uint64{iova - lo, uint64(n)})
			mu.Unlock()
		}
	}
	h.dma.mu.Unlock()
	for id := uint64(1); id <= 2; id++ {
		w := sendWQE(id, uapi.GOHFI_WR_RDMA_WRITE, sge(p.local, 0, 8))
		w.RemoteAddr, w.Rkey = p.remote.va, p.remote.key()
		h.postSend(p.a, w)
		e := h.expectCQE(p.acq, id, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
		if want := [...]uint32{1: 0xffffffff, 2: 1}[id]; e.Seq != want {
			t.Fatalf("CQE %d: seq %#x, want %#x", id, e.Seq, want)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	want := [][2]uint64{{0, 40}, {48, 16}, {40, 8}, {64, 40}, {64 + 48, 16}, {64 + 40, 8}}
	if fmt.Sprint(writes) != fmt.Sprint(want) {
		t.Fatalf("CQ ring writes (offset, bytes) %v, want %v", writes, want)
	}
}
