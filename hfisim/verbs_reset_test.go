package hfisim

import (
	"bytes"
	"testing"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
)

// pauseAt makes the engine stop once, right after its first DMA (a read if
// read, else a write) that starts at iova, and wait there while the test
// runs between (the engine holds no lock during a DMA). The returned
// function runs between on the test goroutine and lets the engine go on.
func (h *vh) pauseAt(iova uint64, read bool) func(between func()) {
	reached, resume := make(chan struct{}), make(chan struct{})
	var hook func(uint64, int)
	hook = func(a uint64, _ int) {
		if a != iova {
			return
		}
		h.dma.mu.Lock()
		h.dma.onRead, h.dma.onWrite = nil, nil
		h.dma.mu.Unlock()
		close(reached)
		<-resume
	}
	h.dma.mu.Lock()
	if read {
		h.dma.onRead = hook
	} else {
		h.dma.onWrite = hook
	}
	h.dma.mu.Unlock()
	return func(between func()) {
		h.t.Helper()
		<-reached
		between()
		close(resume)
	}
}

// reset takes q to RESET (the driver's tails with it) and back to state,
// its registers (rings, CQs, PD, Dest, Access) as they were.
func (h *vh) reset(q *tqp, states ...uint64) {
	h.t.Helper()
	h.modify(q, uapi.GOHFI_QPS_RESET)
	q.sqTail, q.rqTail = 0, 0
	for _, s := range states {
		h.modify(q, s)
	}
}

// TestVerbsResetDropsStalePacket is the reported bug: a QP connected to
// itself, cycled RESET->INIT->RTR->RTS with work posted each time, was now
// and then in ERR before RTS. The engine had read a SEND WQE in RTS and was
// gathering its payload when the driver reset the QP, took it to INIT,
// posted a receive and moved it to RTR; the old message's packet then
// reached the new incarnation (in RTR, it accepts packets), claimed the new
// receive WQE and, being longer, failed it and moved the QP to ERR (a
// shorter one completed the receive with the old data instead). The
// requester's epoch now travels with the packet and the responder drops a
// packet whose requester was reset since it read the WQE (and the mover
// checks it again before the bytes move, mover.go).
func TestVerbsResetDropsStalePacket(t *testing.T) {
	h := newVerbs(t)
	cq := h.newCQ(0, 64)
	q := h.newQP(0, 1, remoteAll, cq, cq)
	m := h.regMR(1, 1, allAccess, 0x7f00_0000_0000, 0x2000)
	h.connect(q, q)
	src := h.fill(m, 1)

	// The old incarnation: a 256-byte SEND, no receive posted for it. The
	// engine reads the WQE, then (without a DMA in between: the payload
	// moves straight from the SGEs to the receive buffer once the packet
	// is accepted) checks and delivers its packet; the reset comes right
	// after the WQE's read.
	wait := h.pauseAt(q.sq, true)
	h.postSend(q, sendWQE(1, uapi.GOHFI_WR_SEND, sge(m, 0x1000, 256)))
	wait(func() {
		h.reset(q, uapi.GOHFI_QPS_INIT)
		h.postRecv(q, recvWQE(2, sge(m, 0, 64)))
		h.modify(q, uapi.GOHFI_QPS_RTR)
	})
	h.d.waitIdle()
	if st := h.state(q); st != uapi.GOHFI_QPS_RTR {
		t.Fatalf("state %d before RTS, want RTR (%d): the old SEND reached the new incarnation", st, uapi.GOHFI_QPS_RTR)
	}
	if head := rd(t, h.d, chip.QPReg(q.n, chip.QPRQHead)); head != 0 {
		t.Fatalf("RQHead %d in RTR: a receive completed before anything was sent", head)
	}
	h.noCQE(cq)
	if got := h.contents(m); !bytes.Equal(got, src) {
		t.Fatal("the old SEND's payload was scattered into the new receive buffer")
	}

	// The new incarnation works: its own SEND fills the receive.
	h.modify(q, uapi.GOHFI_QPS_RTS)
	h.postSend(q, sendWQE(3, uapi.GOHFI_WR_SEND, sge(m, 0x1800, 64)))
	if e := h.expectCQE(cq, 2, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RECV, 0); e.ByteLen != 64 {
		t.Fatalf("receive %+v, want 64 bytes", e)
	}
	h.expectCQE(cq, 3, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_SEND, 0)
	if got := h.read(m.host(m.va), 64); !bytes.Equal(got, src[0x1800:0x1800+64]) {
		t.Fatal("new SEND: data differs")
	}
}

// TestVerbsResetResponderMidMessage: a responder QP reset and brought back
// to RTS between two packets of an RDMA WRITE does not take the rest of the
// message (a middle packet of an old message, as a PSN would tell on a
// wire): the requester completes with RETRY_EXC_ERR and goes to ERR, and
// the bytes after the first packet stay as they were.
func TestVerbsResetResponderMidMessage(t *testing.T) {
	p := newPair(t, 0x3000)
	h := p.h
	h.fill(p.local, 1)
	before := h.fill(p.remote, 2)
	wait := h.pauseAt(p.remote.host(p.remote.va), false) // the first packet's write
	w := sendWQE(1, uapi.GOHFI_WR_RDMA_WRITE, sge(p.local, 0, 2*chip.VerbsMTU))
	w.RemoteAddr, w.Rkey = p.remote.va, p.remote.key()
	h.postSend(p.a, w)
	wait(func() { h.reset(p.b, uapi.GOHFI_QPS_INIT, uapi.GOHFI_QPS_RTR, uapi.GOHFI_QPS_RTS) })
	h.expectCQE(p.acq, 1, uapi.GOHFI_WC_RETRY_EXC_ERR, 0, chip.VendorErrRemoteQP)
	if st := h.state(p.a); st != uapi.GOHFI_QPS_ERR {
		t.Errorf("requester state %d, want ERR", st)
	}
	if st := h.state(p.b); st != uapi.GOHFI_QPS_RTS {
		t.Errorf("responder state %d, want RTS", st)
	}
	got := h.contents(p.remote)
	if !bytes.Equal(got[chip.VerbsMTU:], before[chip.VerbsMTU:]) {
		t.Fatal("the second packet landed in the responder's new incarnation")
	}
}

// TestVerbsResetDropsReadAnswer: a requester reset while its RDMA READ's
// answer is on the way does not write it: the local buffer of the dropped
// WQE stays as it was and nothing completes.
func TestVerbsResetDropsReadAnswer(t *testing.T) {
	p := newPair(t, 0x1000)
	h := p.h
	before := h.fill(p.local, 1)
	h.fill(p.remote, 2)
	wait := h.pauseAt(p.remote.host(p.remote.va), true) // the responder reads the answer
	w := sendWQE(1, uapi.GOHFI_WR_RDMA_READ, sge(p.local, 0, 512))
	w.RemoteAddr, w.Rkey = p.remote.va, p.remote.key()
	h.postSend(p.a, w)
	wait(func() { h.reset(p.a, uapi.GOHFI_QPS_INIT, uapi.GOHFI_QPS_RTR, uapi.GOHFI_QPS_RTS) })
	h.noCQE(p.acq)
	if got := h.contents(p.local); !bytes.Equal(got, before) {
		t.Fatal("the READ answer was written after its requester was reset")
	}
	if st := h.state(p.a); st != uapi.GOHFI_QPS_RTS {
		t.Errorf("requester state %d, want RTS", st)
	}
}
