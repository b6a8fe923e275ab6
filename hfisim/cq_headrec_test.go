package hfisim

import (
	"encoding/binary"
	"sync/atomic"
	"testing"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
)

// headRecSetup is a 4-entry CQ (it holds 3 CQEs) for the sends of QP 0,
// connected to QP 1, with a consumer-index record programmed before the CQ
// is enabled: at rec, or (rec 0) in host memory, holding 0.
type headRecSetup struct {
	h             *vh
	cq            *tcq
	a             *tqp
	local, remote *mr
	rec           uint64
	next          uint64 // wr_id of the next WRITE
}

func newHeadRec(t *testing.T, rec uint64) *headRecSetup {
	h := newVerbs(t)
	s := &headRecSetup{h: h}
	if s.rec = rec; rec == 0 {
		s.rec = h.alloc(4096)
		s.store(0)
	}
	wr(t, h.d, chip.CQReg(0, chip.CQHeadAddr), s.rec)
	s.cq = h.newCQ(0, 4)
	other := h.newCQ(1, 64)
	s.a = h.newQP(0, 1, remoteAll, s.cq, other)
	b := h.newQP(1, 1, remoteAll, other, other)
	h.connect(s.a, b)
	s.local = h.regMR(1, 1, allAccess, 0x1000, 0x1000)
	s.remote = h.regMR(2, 1, allAccess, 0x9000, 0x1000)
	if got := rd(t, h.d, chip.CQReg(0, chip.CQHeadAddr)); got != s.rec {
		t.Fatalf("CQHeadAddr reads %#x, want %#x", got, s.rec)
	}
	return s
}

// store writes v into the record, as the driver's 8-byte store.
func (s *headRecSetup) store(v uint64) {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	s.h.write(s.rec, b[:])
}

// post posts k signaled WRITEs and waits until the engine is idle.
func (s *headRecSetup) post(k int) {
	for range k {
		w := sendWQE(s.next, uapi.GOHFI_WR_RDMA_WRITE, sge(s.local, 0, 8))
		w.RemoteAddr, w.Rkey = s.remote.va, s.remote.key()
		s.h.postSend(s.a, w)
		s.next++
	}
	s.h.d.waitIdle()
}

// consume takes k CQEs from the ring without telling the device: their
// wr_ids must follow want on.
func (s *headRecSetup) consume(t *testing.T, k int, want uint64) {
	t.Helper()
	for i := range k {
		e, ok := s.h.peekCQ(s.cq)
		if !ok {
			t.Fatalf("CQE %d of %d missing (CQ tail %d, status %#x)", i, k,
				rd(t, s.h.d, chip.CQReg(0, chip.CQTail)), rd(t, s.h.d, chip.CQReg(0, chip.CQStatus)))
		}
		if e.WrID != want+uint64(i) || e.Status != uapi.GOHFI_WC_SUCCESS {
			t.Fatalf("CQE %+v, want wr_id %d, success", e, want+uint64(i))
		}
		s.cq.seq = e.Seq
		s.cq.head = (s.cq.head + 1) % s.cq.entries
	}
}

func (s *headRecSetup) overflowed(t *testing.T) bool {
	return rd(t, s.h.d, chip.CQReg(0, chip.CQStatus))&chip.CQStatusOverflow != 0
}

// TestCQHeadRecNoFalseOverflow: a consumer that publishes its index only
// through the record (never CQHead) fills the 3 usable entries of its ring
// again and again, over many wraps: the device, which finds the ring full
// by its own head each time, reads the record and never overflows.
func TestCQHeadRecNoFalseOverflow(t *testing.T) {
	s := newHeadRec(t, 0)
	h := s.h
	var reads atomic.Int64
	h.dma.mu.Lock()
	h.dma.onRead = func(iova uint64, n int) {
		if iova == s.rec {
			reads.Add(1)
		}
	}
	h.dma.mu.Unlock()
	for round := range 60 {
		k := round%3 + 1
		first := s.next
		s.post(k)
		s.consume(t, k, first)
		s.store(s.cq.head)
		if s.overflowed(t) {
			t.Fatalf("round %d: CQ overflowed", round)
		}
	}
	// 60 rounds of 1-3 CQEs: 120 CQEs, 30 wraps of the ring. The device
	// moves its head only from the record, so it finds the ring full by
	// it before every 3rd CQE, the 4th, 7th, ..., 118th: 39 reads.
	if n := reads.Load(); n != 39 {
		t.Fatalf("device read the record %d times, want 39", n)
	}
	if n := rd(t, h.d, chip.RegErrCntVerbs); n != 0 {
		t.Fatalf("ErrCntVerbs %d", n)
	}
	if st := h.state(s.a); st != uapi.GOHFI_QPS_RTS {
		t.Fatalf("QP state %d, want RTS", st)
	}
}

// TestCQHeadRecOverflowWhenFull: with a record, a ring that is really full
// still overflows, at exactly the CQE that finds no slot: first a consumer
// that consumed nothing (the 4th CQE), then one that consumed 2 of 3 and
// said so in the record (2 more CQEs fit, the 3rd overflows).
func TestCQHeadRecOverflowWhenFull(t *testing.T) {
	t.Run("nothing-consumed", func(t *testing.T) {
		s := newHeadRec(t, 0)
		s.post(3)
		if s.overflowed(t) {
			t.Fatal("3 CQEs overflowed a 4-entry ring")
		}
		s.post(1)
		if !s.overflowed(t) {
			t.Fatal("4th CQE did not overflow")
		}
		if got := rd(t, s.h.d, chip.CQReg(0, chip.CQTail)); got != 3 {
			t.Fatalf("CQ tail %d, want 3", got)
		}
		s.h.expectErr(s.a)
	})
	t.Run("two-consumed", func(t *testing.T) {
		s := newHeadRec(t, 0)
		s.post(3)
		s.consume(t, 2, 0)
		s.store(s.cq.head)
		s.post(2)
		if s.overflowed(t) {
			t.Fatal("CQEs 4 and 5 overflowed after 2 were consumed")
		}
		if errs := rd(t, s.h.d, chip.RegErrCntVerbs); errs != 0 {
			t.Fatalf("ErrCntVerbs %d before the ring was full", errs)
		}
		s.post(1)
		if !s.overflowed(t) {
			t.Fatal("6th CQE did not overflow a full ring")
		}
		if got := rd(t, s.h.d, chip.CQReg(0, chip.CQTail)); got != 1 {
			t.Fatalf("CQ tail %d, want 1", got)
		}
		s.consume(t, 3, 2) // the CQEs that fit are intact
		s.h.expectErr(s.a)
	})
}

// TestCQHeadRecHostile: a record holding an index out of range, or at an
// IOVA that is not mapped, is refused and counted when the device reads it;
// the device keeps the head it had (here from CQHead), so the ring
// overflows exactly where it would without a record, and nothing else
// breaks.
func TestCQHeadRecHostile(t *testing.T) {
	for _, c := range []struct {
		name   string
		rec    uint64 // 0: a mapped record holding val
		val    uint64
		faults uint64
	}{
		{name: "index-4", val: 4},
		{name: "index-huge", val: ^uint64(0)},
		{name: "unmapped", rec: hostIOVA + hostSize + 0x1000, faults: 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := newHeadRec(t, c.rec)
			h := s.h
			if c.rec == 0 {
				s.store(c.val)
			}
			// The consumer takes 2 CQEs and tells the device by register:
			// 2 more fit; the 3rd finds the ring full, the device reads
			// the record, refuses it and overflows.
			s.post(3)
			s.consume(t, 2, 0)
			wr(t, h.d, chip.CQReg(0, chip.CQHead), s.cq.head)
			s.post(2)
			if s.overflowed(t) || rd(t, h.d, chip.RegErrCntVerbs) != 0 {
				t.Fatal("overflow or error before the ring was full")
			}
			s.post(1)
			if !s.overflowed(t) {
				t.Fatal("a refused record made room in a full ring")
			}
			// One count for the record, one for the dropped CQE.
			if n := rd(t, h.d, chip.RegErrCntVerbs); n != 2 {
				t.Fatalf("ErrCntVerbs %d, want 2", n)
			}
			if n := rd(t, h.d, chip.RegErrCntIOMMUFault); n != c.faults {
				t.Fatalf("ErrCntIOMMUFault %d, want %d", n, c.faults)
			}
			if got := rd(t, h.d, chip.CQReg(0, chip.CQHead)); got != 2 {
				t.Fatalf("device head %d, want 2 (from CQHead)", got)
			}
			s.consume(t, 3, 2)
			h.expectErr(s.a)
		})
	}
}

// TestCQHeadAddrWrite: CQHeadAddr is refused while the CQ is enabled and
// for an address that is not 8-byte aligned (counted, the old value
// stays); a disabled CQ takes it; reset clears it.
func TestCQHeadAddrWrite(t *testing.T) {
	h := newVerbs(t)
	rec := h.alloc(4096)
	reg := chip.CQReg(0, chip.CQHeadAddr)
	wr(t, h.d, reg, rec+4)
	if got, n := rd(t, h.d, reg), rd(t, h.d, chip.RegErrCntVerbs); got != 0 || n != 1 {
		t.Fatalf("unaligned CQHeadAddr: reads %#x, ErrCntVerbs %d; want 0, 1", got, n)
	}
	wr(t, h.d, reg, rec)
	h.newCQ(0, 4)
	wr(t, h.d, reg, rec+64)
	if got, n := rd(t, h.d, reg), rd(t, h.d, chip.RegErrCntVerbs); got != rec || n != 2 {
		t.Fatalf("CQHeadAddr written while enabled: reads %#x, ErrCntVerbs %d; want %#x, 2", got, n, rec)
	}
	wr(t, h.d, chip.CQReg(0, chip.CQControl), 0)
	wr(t, h.d, reg, 0)
	if got := rd(t, h.d, reg); got != 0 {
		t.Fatalf("CQHeadAddr of a disabled CQ: reads %#x, want 0", got)
	}
	wr(t, h.d, reg, rec)
	wr(t, h.d, chip.RegControl, chip.CtrlReset)
	if got := rd(t, h.d, reg); got != 0 {
		t.Fatalf("CQHeadAddr %#x after reset, want 0", got)
	}
}
