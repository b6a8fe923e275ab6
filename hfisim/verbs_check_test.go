package hfisim

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"testing"
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
)

// expectErrState checks that both QPs are in ERR.
func (h *vh) expectErr(qs ...*tqp) {
	h.t.Helper()
	for _, q := range qs {
		if s := h.state(q); s != uapi.GOHFI_QPS_ERR {
			h.t.Fatalf("QP %d in state %d, want ERR", q.n, s)
		}
	}
}

// TestVerbsResponderChecks: each responder check refuses the packet with a
// NAK: the requester's CQE has GOHFI_WC_REM_ACCESS_ERR and the check's
// vendor_err, both QPs go to ERR, the requester's next WQE and the
// responder's receive WQE are flushed, and the target is untouched.
func TestVerbsResponderChecks(t *testing.T) {
	type setup struct {
		rkey   uint32
		raddr  uint64
		op     uint8 // 0: GOHFI_WR_RDMA_WRITE
		vendor uint32
	}
	cases := map[string]func(p *pair) setup{
		"bad key": func(p *pair) setup {
			return setup{rkey: 70<<8 | 0x5a, vendor: chip.VendorErrKey}
		},
		"wrong variant": func(p *pair) setup {
			return setup{rkey: p.remote.key() ^ 1, vendor: chip.VendorErrKey}
		},
		"free": func(p *pair) setup {
			e := p.remote.entry
			e.Flags = e.Flags&^chip.MPTStateMask | chip.MPTStateFree
			p.h.writeMPT(p.remote.idx, e)
			return setup{vendor: chip.VendorErrState}
		},
		"other PD": func(p *pair) setup {
			e := p.remote.entry
			e.PD = 2
			p.h.writeMPT(p.remote.idx, e)
			return setup{vendor: chip.VendorErrPD}
		},
		"no remote write": func(p *pair) setup {
			e := p.remote.entry
			e.Flags &^= uapi.IB_ACCESS_REMOTE_WRITE << chip.MPTAccessShift
			p.h.writeMPT(p.remote.idx, e)
			return setup{vendor: chip.VendorErrAccess}
		},
		"QP without remote write": func(p *pair) setup {
			wr(t, p.h.d, chip.QPReg(p.b.n, chip.QPAccess), uapi.IB_ACCESS_REMOTE_READ)
			return setup{vendor: chip.VendorErrAccess}
		},
		"no remote read": func(p *pair) setup {
			e := p.remote.entry
			e.Flags &^= uapi.IB_ACCESS_REMOTE_READ << chip.MPTAccessShift
			p.h.writeMPT(p.remote.idx, e)
			return setup{op: uapi.GOHFI_WR_RDMA_READ, vendor: chip.VendorErrAccess}
		},
		"no remote atomic": func(p *pair) setup {
			e := p.remote.entry
			e.Flags &^= uapi.IB_ACCESS_REMOTE_ATOMIC << chip.MPTAccessShift
			p.h.writeMPT(p.remote.idx, e)
			return setup{op: uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD, raddr: (p.remote.va + 8) &^ 7, vendor: chip.VendorErrAccess}
		},
		"one byte past the end": func(p *pair) setup {
			return setup{raddr: p.remote.va + p.remote.length - 100 + 1, vendor: chip.VendorErrBounds}
		},
		"before the start": func(p *pair) setup {
			return setup{raddr: p.remote.va - 1, vendor: chip.VendorErrBounds}
		},
	}
	for name, mk := range cases {
		t.Run(name, func(t *testing.T) {
			p := newPair(t, 0x3000)
			h := p.h
			h.fill(p.remote, 4)
			h.fill(p.local, 5)
			s := mk(p)
			if s.rkey == 0 {
				s.rkey = p.remote.key()
			}
			if s.raddr == 0 {
				s.raddr = p.remote.va + 10
			}
			n := uint32(100)
			if isAtomic(s.op) {
				n = 8
			}
			remoteBefore, localBefore := h.contents(p.remote), h.contents(p.local)
			h.postRecv(p.b, recvWQE(9, sge(p.remote, 0, 64)))
			w := sendWQE(1, s.op, sge(p.local, 0, n))
			w.RemoteAddr, w.Rkey = s.raddr, s.rkey
			h.postSend(p.a, w)
			h.postSend(p.a, sendWQE(2, uapi.GOHFI_WR_SEND, sge(p.local, 0, 10)))
			h.expectCQE(p.acq, 1, uapi.GOHFI_WC_REM_ACCESS_ERR, 0, s.vendor)
			h.expectCQE(p.acq, 2, uapi.GOHFI_WC_WR_FLUSH_ERR, 0, 0)
			h.expectCQE(p.bcq, 9, uapi.GOHFI_WC_WR_FLUSH_ERR, 0, 0)
			h.expectErr(p.a, p.b)
			if !bytes.Equal(h.contents(p.remote), remoteBefore) || !bytes.Equal(h.contents(p.local), localBefore) {
				t.Fatal("memory changed by a refused request")
			}
			if got := rd(t, h.d, chip.RegCntNAKAccess); got != 1 {
				t.Fatalf("NAKAccess %d, want 1", got)
			}
			if rd(t, h.d, chip.QPReg(p.a.n, chip.QPSQHead)) != 2 || rd(t, h.d, chip.QPReg(p.b.n, chip.QPRQHead)) != 1 {
				t.Fatal("heads did not advance past the flushed WQEs")
			}
		})
	}
}

// TestVerbsKeyFreedMidMessage: the responder reads the MPT for every
// packet, so a key made FREE while a message moves stops it at the next
// packet checked; the packets before stay written. A burst's packets are
// all checked before its bytes move (mover.go), so the key is freed once
// the first burst's bytes are written and the next burst stops.
func TestVerbsKeyFreedMidMessage(t *testing.T) {
	const k = verbsBurst // packets before the key is freed
	p := newPair(t, (k+4)*chip.VerbsMTU)
	h := p.h
	src := h.fill(p.local, 1)
	before := h.fill(p.remote, 2)
	lo, hi := p.remote.iova, p.remote.iova+(k+5)*chip.VerbsMTU
	written := 0
	h.dma.mu.Lock()
	h.dma.onWrite = func(iova uint64, n int) {
		if iova < lo || iova >= hi {
			return
		}
		if written += n; written == k*chip.VerbsMTU {
			e := p.remote.entry
			h.bar4(chip.MPTOffset(h.d.cfg.MTTEntries)+uint64(p.remote.idx)*chip.MPTEntrySize+8,
				uint64(e.Flags&^chip.MPTStateMask)|uint64(e.MTTFirst)<<32)
		}
	}
	h.dma.mu.Unlock()
	w := sendWQE(1, uapi.GOHFI_WR_RDMA_WRITE, sge(p.local, 0, (k+3)*chip.VerbsMTU))
	w.RemoteAddr, w.Rkey = p.remote.va, p.remote.key()
	h.postSend(p.a, w)
	h.expectCQE(p.acq, 1, uapi.GOHFI_WC_REM_ACCESS_ERR, 0, chip.VendorErrState)
	got := h.contents(p.remote)
	if !bytes.Equal(got[:k*chip.VerbsMTU], src[:k*chip.VerbsMTU]) {
		t.Fatal("the packets before the key was freed are missing")
	}
	if !bytes.Equal(got[k*chip.VerbsMTU:], before[k*chip.VerbsMTU:]) {
		t.Fatal("packets after the key was freed were written")
	}
	h.expectErr(p.a, p.b)
}

// TestVerbsRequesterErrors: checks of the requester's own WQE and SGEs.
func TestVerbsRequesterErrors(t *testing.T) {
	type tc struct {
		wqe            func(p *pair) chip.SendWQE
		status, vendor uint32
	}
	write := func(p *pair, sges ...chip.SGE) chip.SendWQE {
		w := sendWQE(1, uapi.GOHFI_WR_RDMA_WRITE, sges...)
		w.RemoteAddr, w.Rkey = p.remote.va, p.remote.key()
		return w
	}
	cases := map[string]tc{
		"bad lkey": {func(p *pair) chip.SendWQE {
			g := sge(p.local, 0, 10)
			g.Lkey ^= 3
			return write(p, g)
		}, uapi.GOHFI_WC_LOC_PROT_ERR, chip.VendorErrKey},
		"lkey past the end": {func(p *pair) chip.SendWQE {
			return write(p, sge(p.local, p.local.length-5, 10))
		}, uapi.GOHFI_WC_LOC_PROT_ERR, chip.VendorErrBounds},
		"lkey of another PD": {func(p *pair) chip.SendWQE {
			m := p.h.regMR(5, 2, allAccess, 0x1000, 4096)
			return write(p, sge(m, 0, 10))
		}, uapi.GOHFI_WC_LOC_PROT_ERR, chip.VendorErrPD},
		"READ into a region without LOCAL_WRITE": {func(p *pair) chip.SendWQE {
			m := p.h.regMR(5, 1, uapi.IB_ACCESS_REMOTE_READ, 0x1000, 4096)
			w := write(p, sge(m, 0, 10))
			w.Opcode = uapi.GOHFI_WR_RDMA_READ
			return w
		}, uapi.GOHFI_WC_LOC_PROT_ERR, chip.VendorErrAccess},
		"atomic result without LOCAL_WRITE": {func(p *pair) chip.SendWQE {
			m := p.h.regMR(5, 1, 0, 0x1000, 4096)
			w := write(p, sge(m, 0, 8))
			w.Opcode = uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP
			return w
		}, uapi.GOHFI_WC_LOC_PROT_ERR, chip.VendorErrAccess},
		"too many SGEs": {func(p *pair) chip.SendWQE {
			w := write(p, sge(p.local, 0, 1))
			w.NumSGE = 9
			return w
		}, uapi.GOHFI_WC_LOC_QP_OP_ERR, chip.VendorErrBadWQE},
		"reserved flag": {func(p *pair) chip.SendWQE {
			w := write(p, sge(p.local, 0, 1))
			w.Flags |= 0x80
			return w
		}, uapi.GOHFI_WC_LOC_QP_OP_ERR, chip.VendorErrBadWQE},
		"atomic of 4 bytes": {func(p *pair) chip.SendWQE {
			w := write(p, sge(p.local, 0, 4))
			w.Opcode = uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD
			return w
		}, uapi.GOHFI_WC_LOC_QP_OP_ERR, chip.VendorErrBadWQE},
		"longer than MaxMsgSize": {func(p *pair) chip.SendWQE {
			return write(p, sge(p.local, 0, 1<<29), sge(p.local, 0, 1<<29), sge(p.local, 0, 1))
		}, uapi.GOHFI_WC_LOC_LEN_ERR, chip.VendorErrLength},
	}
	// Fast registration's opcodes are tested in fastreg_test.go.
	for _, op := range []uint8{uapi.GOHFI_WR_BIND_MW, 0x7f} {
		cases[fmt.Sprintf("opcode %#x", op)] = tc{func(p *pair) chip.SendWQE {
			w := write(p)
			w.Opcode = op
			return w
		}, uapi.GOHFI_WC_LOC_QP_OP_ERR, chip.VendorErrOpcode}
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			p := newPair(t, 0x3000)
			h := p.h
			before := h.fill(p.remote, 3)
			h.postSend(p.a, c.wqe(p))
			h.postSend(p.a, sendWQE(2, uapi.GOHFI_WR_SEND, sge(p.local, 0, 10)))
			h.expectCQE(p.acq, 1, c.status, 0, c.vendor)
			h.expectCQE(p.acq, 2, uapi.GOHFI_WC_WR_FLUSH_ERR, 0, 0)
			h.expectErr(p.a)
			if c.vendor == chip.VendorErrBadWQE && (rd(t, h.d, chip.RegErrCntVerbs) != 1 || rd(t, h.d, chip.RegErrCntBadDesc) != 0) {
				t.Fatalf("malformed WQE: ErrCntVerbs %d, ErrCntBadDesc %d, want 1 and 0",
					rd(t, h.d, chip.RegErrCntVerbs), rd(t, h.d, chip.RegErrCntBadDesc))
			}
			if s := h.state(p.b); s != uapi.GOHFI_QPS_RTS {
				t.Fatalf("responder state %d: a requester's local error must not reach it", s)
			}
			if !bytes.Equal(h.contents(p.remote), before) {
				t.Fatal("remote memory changed")
			}
		})
	}
}

// TestVerbsReceiveErrors: the responder's own receive WQE fails.
func TestVerbsReceiveErrors(t *testing.T) {
	cases := map[string]struct {
		recv               func(p *pair) chip.RecvWQE
		respStatus, status uint32
		vendor             uint32
	}{
		"bad receive lkey": {func(p *pair) chip.RecvWQE {
			g := sge(p.remote, 0, 100)
			g.Lkey = 70<<8 | 0x5a // past the 64 MPT entries
			return recvWQE(9, g)
		}, uapi.GOHFI_WC_LOC_PROT_ERR, uapi.GOHFI_WC_REM_OP_ERR, chip.VendorErrKey},
		"receive region without LOCAL_WRITE": {func(p *pair) chip.RecvWQE {
			m := p.h.regMR(5, 1, uapi.IB_ACCESS_REMOTE_READ, 0x1000, 4096)
			return recvWQE(9, sge(m, 0, 100))
		}, uapi.GOHFI_WC_LOC_PROT_ERR, uapi.GOHFI_WC_REM_OP_ERR, chip.VendorErrAccess},
		"SEND longer than the receive buffers": {func(p *pair) chip.RecvWQE {
			return recvWQE(9, sge(p.remote, 0, 20), sge(p.remote, 100, 29))
		}, uapi.GOHFI_WC_LOC_LEN_ERR, uapi.GOHFI_WC_REM_INV_REQ_ERR, chip.VendorErrLength},
		"malformed receive WQE": {func(p *pair) chip.RecvWQE {
			w := recvWQE(9, sge(p.remote, 0, 100))
			w.NumSGE = 200
			return w
		}, uapi.GOHFI_WC_LOC_QP_OP_ERR, uapi.GOHFI_WC_REM_OP_ERR, chip.VendorErrBadWQE},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			p := newPair(t, 0x3000)
			h := p.h
			before := h.fill(p.remote, 3)
			h.fill(p.local, 4)
			h.postRecv(p.b, c.recv(p))
			h.postRecv(p.b, recvWQE(10, sge(p.remote, 0, 100)))
			h.postSend(p.a, sendWQE(1, uapi.GOHFI_WR_SEND, sge(p.local, 0, 50)))
			h.expectCQE(p.acq, 1, c.status, 0, c.vendor)
			h.expectCQE(p.bcq, 9, c.respStatus, 0, c.vendor)
			h.expectCQE(p.bcq, 10, uapi.GOHFI_WC_WR_FLUSH_ERR, 0, 0)
			h.expectErr(p.a, p.b)
			if !bytes.Equal(h.contents(p.remote), before) {
				t.Fatal("a refused receive wrote memory")
			}
		})
	}
}

// TestVerbsRNRAndRemoteQP: a SEND with no receive WQE waits until one is
// posted; one whose destination leaves RTR/RTS, or does not exist, fails
// with GOHFI_WC_RETRY_EXC_ERR. Unsignaled WQEs complete silently.
func TestVerbsRNRAndRemoteQP(t *testing.T) {
	p := newPair(t, 0x3000)
	h := p.h
	src := h.fill(p.local, 1)
	w := sendWQE(1, uapi.GOHFI_WR_SEND, sge(p.local, 0, 30))
	w.Flags = 0
	h.postSend(p.a, w)
	h.noCQE(p.acq)
	if rd(t, h.d, chip.QPReg(p.a.n, chip.QPSQHead)) != 0 {
		t.Fatal("SEND completed without a receive WQE")
	}
	h.postRecv(p.b, recvWQE(5, sge(p.remote, 0, 30)))
	h.expectCQE(p.bcq, 5, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RECV, 0)
	if !bytes.Equal(h.read(p.remote.host(p.remote.va), 30), src[:30]) {
		t.Fatal("SEND data wrong after RNR")
	}
	h.d.waitIdle()
	if rd(t, h.d, chip.QPReg(p.a.n, chip.QPSQHead)) != 1 {
		t.Fatal("unsignaled SEND did not advance SQHead")
	}
	h.noCQE(p.acq) // unsignaled: no CQE

	h.postSend(p.a, sendWQE(2, uapi.GOHFI_WR_SEND, sge(p.local, 0, 30)))
	h.noCQE(p.acq)
	h.modify(p.b, uapi.GOHFI_QPS_ERR)
	h.expectCQE(p.acq, 2, uapi.GOHFI_WC_RETRY_EXC_ERR, 0, chip.VendorErrRemoteQP)

	// A destination that does not exist.
	h2 := newVerbs(t)
	cq := h2.newCQ(0, 16)
	a := h2.newQP(0, 1, 0, cq, cq)
	wr(t, h2.d, chip.QPReg(0, chip.QPDest), chip.QPNBase+7) // QP 7: RESET
	h2.modify(a, uapi.GOHFI_QPS_RTR)
	h2.modify(a, uapi.GOHFI_QPS_RTS)
	w = sendWQE(3, uapi.GOHFI_WR_RDMA_WRITE)
	h2.postSend(a, w)
	h2.expectCQE(cq, 3, uapi.GOHFI_WC_RETRY_EXC_ERR, 0, chip.VendorErrRemoteQP)
}

// TestVerbsSQHeadAddr: with QPSQHeadAddr set, the device writes SQHead with
// the register's tag to host memory before the CQE of a completed WQE and
// after the flush CQE of a flushed one.
func TestVerbsSQHeadAddr(t *testing.T) {
	p := newPair(t, 0x2000)
	h := p.h
	slot := h.alloc(4096) + 64
	word := func() uint64 { return binary.LittleEndian.Uint64(h.read(slot, 8)) }
	h.write(slot, make([]byte, 8))
	wr(t, h.d, chip.QPReg(p.a.n, chip.QPSQHeadAddr), slot|5)
	h.postRecv(p.b, recvWQE(9, sge(p.remote, 0, 64)))
	h.postSend(p.a, sendWQE(1, uapi.GOHFI_WR_SEND, sge(p.local, 0, 10)))
	h.expectCQE(p.acq, 1, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_SEND, 0)
	if got := word(); got != 1|5<<chip.QPSQHeadTagShift {
		t.Fatalf("head word %#x after one WQE, want head 1 tag 5", got)
	}
	// A bad WQE completes in error; the one after it is flushed.
	h.postSend(p.a, sendWQE(2, 0xee))
	h.postSend(p.a, sendWQE(3, uapi.GOHFI_WR_SEND, sge(p.local, 0, 10)))
	h.expectCQE(p.acq, 2, uapi.GOHFI_WC_LOC_QP_OP_ERR, 0, chip.VendorErrOpcode)
	h.expectCQE(p.acq, 3, uapi.GOHFI_WC_WR_FLUSH_ERR, 0, 0)
	for deadline := time.Now().Add(5 * time.Second); word() != 3|5<<chip.QPSQHeadTagShift; {
		if time.Now().After(deadline) {
			t.Fatalf("head word %#x after the flush, want head 3 tag 5", word())
		}
		time.Sleep(time.Millisecond)
	}
}
