package hfisim

import (
	"encoding/binary"
	"testing"
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
)

// The doorbell-record tests play a driver that stores producer indices in a
// record (chip.QPDBRecAddr) and rings the register only when the record's
// notify flag says the engine sleeps.

// dbRec gives q a doorbell record in the state a driver sets up: indices
// 0, notify set.
func (h *vh) dbRec(q *tqp) uint64 {
	rec := h.alloc(chip.DBRecSize)
	var b [chip.DBRecSize]byte
	binary.LittleEndian.PutUint32(b[chip.DBRecFlags:], chip.DBRecNotify)
	h.write(rec, b[:])
	wr(h.t, h.d, chip.QPDBReg(q.n, chip.QPDBRecAddr), rec)
	return rec
}

func (h *vh) recFlags(rec uint64) uint32 {
	return binary.LittleEndian.Uint32(h.read(rec+chip.DBRecFlags, 4))
}

// storeSend writes w at q's send tail and stores the new tail in the
// record, without a register doorbell; it returns the notify flag as the
// driver reads it after the store.
func (h *vh) storeSend(q *tqp, rec uint64, w chip.SendWQE) bool {
	var b [chip.SendWQESize]byte
	w.Marshal(b[:])
	h.write(q.sq+q.sqTail*chip.SendWQESize, b[:])
	q.sqTail = (q.sqTail + 1) % q.entries
	var t [4]byte
	binary.LittleEndian.PutUint32(t[:], uint32(q.sqTail))
	h.write(rec+chip.DBRecSQTail, t[:])
	return h.recFlags(rec)&chip.DBRecNotify != 0
}

// postSendRec is the driver's POST_SEND with a record: store, then the
// register only when the engine asked for it.
func (h *vh) postSendRec(q *tqp, rec uint64, w chip.SendWQE) {
	if h.storeSend(q, rec, w) {
		wr(h.t, h.d, chip.QPReg(q.n, chip.QPSQTail), q.sqTail)
	}
}

func newDBRecPair(t *testing.T, idle time.Duration) *pair {
	p := newPair(t, 1<<16)
	p.h.d.cfg.DBPollIdle = idle // no record yet: the engine does not read it
	return p
}

// asleep gives p.a a record, completes one WR through it and returns once
// the engine went to sleep.
func (p *pair) asleep() uint64 {
	h := p.h
	rec := h.dbRec(p.a)
	h.postSendRec(p.a, rec, p.write(1))
	h.expectCQE(p.acq, 1, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
	h.d.SleepNow()
	return rec
}

func (p *pair) write(id uint64) chip.SendWQE {
	w := sendWQE(id, uapi.GOHFI_WR_RDMA_WRITE, sge(p.local, 0, 64))
	w.RemoteAddr, w.Rkey = p.remote.va, p.remote.key()
	return w
}

// spinCQE waits for the next CQE of c by polling the ring, as a consumer
// that never arms the CQ (an armed CQ stops the engine's polling).
func (h *vh) spinCQE(c *tcq, wrID uint64) {
	h.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if e, ok := h.peekCQ(c); ok {
			c.seq, c.head = e.Seq, (c.head+1)%c.entries
			wr(h.t, h.d, chip.CQReg(c.n, chip.CQHead), c.head)
			if e.WrID != wrID || e.Status != uapi.GOHFI_WC_SUCCESS {
				h.t.Fatalf("CQE %+v, want wr_id %d", e, wrID)
			}
			return
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("no CQE for wr_id %d", wrID)
		}
		time.Sleep(10 * time.Microsecond)
	}
}

// TestDBRecPolledWhileAwake: after a register doorbell wakes it, the engine
// clears the notify flag and takes the next indices from the record alone,
// as long as no consumer armed a CQ; an arm makes it sleep after its work.
func TestDBRecPolledWhileAwake(t *testing.T) {
	p := newDBRecPair(t, time.Hour) // never sleeps on its own
	h := p.h
	rec := h.dbRec(p.a)
	h.postSendRec(p.a, rec, p.write(1)) // notify set at setup: rings
	h.spinCQE(p.acq, 1)
	for i := uint64(2); i < 40; i++ {
		if h.storeSend(p.a, rec, p.write(i)) {
			t.Fatalf("WR %d: notify flag set while the engine polls", i)
		}
		h.spinCQE(p.acq, i)
	}
	wr(t, h.d, chip.CQReg(p.acq.n, chip.CQControl), chip.CQCtrlEnable|chip.CQCtrlArm)
	deadline := time.Now().Add(10 * time.Second)
	for h.recFlags(rec) != chip.DBRecNotify {
		if time.Now().After(deadline) {
			t.Fatal("the engine kept polling after a CQ was armed")
		}
		time.Sleep(10 * time.Microsecond)
	}
	h.postSendRec(p.a, rec, p.write(40))
	h.expectCQE(p.acq, 40, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
}

// TestDBRecSleepsAndNotifies: an engine that went to sleep set the flag and
// does not see a bare store; the register doorbell the flag asks for wakes it.
func TestDBRecSleepsAndNotifies(t *testing.T) {
	p := newDBRecPair(t, -1)
	h := p.h
	rec := p.asleep()
	if h.recFlags(rec) != chip.DBRecNotify {
		t.Fatalf("flags %#x after the engine slept, want notify", h.recFlags(rec))
	}
	if !h.storeSend(p.a, rec, p.write(2)) {
		t.Fatal("the driver did not see the notify flag")
	}
	time.Sleep(5 * time.Millisecond)
	if e, ok := h.peekCQ(p.acq); ok { // not h.noCQE: waitIdle wakes the engine
		t.Fatalf("asleep, the engine saw a bare store: %+v", e)
	}
	wr(t, h.d, chip.QPReg(p.a.n, chip.QPSQTail), p.a.sqTail)
	h.expectCQE(p.acq, 2, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
}

// TestDBRecNotifyRecheck is the race of notification suppression: the
// driver stores its index and reads the flag still clear just before the
// engine, about to sleep, sets it. The engine's second read of the records
// after setting the flags must find the index: the WR completes with no
// register doorbell.
func TestDBRecNotifyRecheck(t *testing.T) {
	p := newDBRecPair(t, -1)
	h := p.h
	rec := p.asleep()
	for i := uint64(2); i < 12; i++ {
		fired := make(chan bool, 1)
		h.dma.mu.Lock()
		h.dma.onWrite = func(iova uint64, _ int) {
			if iova != rec+chip.DBRecFlags || h.recFlags(rec) != chip.DBRecNotify {
				return // not the engine's way to sleep (it clears the flag on waking)
			}
			h.dma.onWrite = nil // the engine's goroutine; h.dma.mu is not held here
			// Between the engine's flag store and its second read: the
			// driver's store, whose flag load came before the flag store.
			h.storeSend(p.a, rec, p.write(i))
			fired <- true
		}
		h.dma.mu.Unlock()
		// Wake the engine (a register doorbell with the current index);
		// it finds nothing, and goes back to sleep through the hook.
		wr(t, h.d, chip.QPReg(p.a.n, chip.QPSQTail), p.a.sqTail)
		<-fired
		h.expectCQE(p.acq, i, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
		h.d.SleepNow()
	}
}

// TestDBRecMixedAndStaleRegister: a QP with a record and one rung through
// registers work side by side; a late register write of an older index to
// the QP with a record only wakes the engine and moves nothing back.
func TestDBRecMixedAndStaleRegister(t *testing.T) {
	p := newDBRecPair(t, 0)
	h := p.h
	rec := h.dbRec(p.a)
	for i := uint64(1); i < 30; i++ {
		h.postSendRec(p.a, rec, p.write(i))
		w := sendWQE(100+i, uapi.GOHFI_WR_RDMA_READ, sge(p.remote, 0, 32))
		w.RemoteAddr, w.Rkey = p.local.va, p.local.key()
		h.postSend(p.b, w) // register doorbell
		h.expectCQE(p.acq, i, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
		h.expectCQE(p.bcq, 100+i, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_READ, 0)
		if i%5 == 0 {
			stale := (p.a.sqTail + p.a.entries - 1) % p.a.entries
			wr(t, h.d, chip.QPReg(p.a.n, chip.QPSQTail), stale)
			h.noCQE(p.acq)
			if got := rd(t, h.d, chip.QPReg(p.a.n, chip.QPSQTail)); got != p.a.sqTail {
				t.Fatalf("SQTail %d after a stale register write, want %d", got, p.a.sqTail)
			}
		}
	}
	if v := rd(t, h.d, chip.RegErrCntVerbs); v != 0 {
		t.Fatalf("ErrCntVerbs %d", v)
	}
}

// TestDBRecReset: RESET forgets the indices read from the record; the driver
// zeroes the record (notify set) and the QP starts again at index 0, the old
// record contents never taken.
func TestDBRecReset(t *testing.T) {
	p := newDBRecPair(t, 0)
	h := p.h
	rec := h.dbRec(p.a)
	for round := range 3 {
		for i := range uint64(5) {
			id := uint64(round*10) + i
			h.postSendRec(p.a, rec, p.write(id))
			h.expectCQE(p.acq, id, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
		}
		h.modify(p.a, uapi.GOHFI_QPS_RESET)
		if got := rd(t, h.d, chip.QPDBReg(p.a.n, chip.QPDBRecAddr)); got != rec {
			t.Fatalf("QPDBRecAddr %#x after RESET, want %#x (kept)", got, rec)
		}
		p.a.sqTail, p.a.rqTail = 0, 0
		var b [12]byte
		binary.LittleEndian.PutUint32(b[chip.DBRecFlags:], chip.DBRecNotify)
		h.write(rec, b[:])
		h.modify(p.a, uapi.GOHFI_QPS_INIT)
		h.modify(p.a, uapi.GOHFI_QPS_RTR)
		h.modify(p.a, uapi.GOHFI_QPS_RTS)
		h.noCQE(p.acq)
	}
	if v := rd(t, h.d, chip.RegErrCntVerbs); v != 0 {
		t.Fatalf("ErrCntVerbs %d", v)
	}
}

// TestDBRecBadAddress: a misaligned record is refused; one the device
// cannot reach is dropped (read back 0), counted once, and the QP goes to
// ERR, flushing what was posted.
func TestDBRecBadAddress(t *testing.T) {
	p := newDBRecPair(t, 0)
	h := p.h
	wr(t, h.d, chip.QPDBReg(p.a.n, chip.QPDBRecAddr), hostIOVA+8)
	if got := rd(t, h.d, chip.QPDBReg(p.a.n, chip.QPDBRecAddr)); got != 0 {
		t.Fatalf("misaligned record taken: %#x", got)
	}
	wr(t, h.d, chip.QPDBReg(p.a.n, chip.QPDBRecAddr), 0x40)
	h.postSend(p.a, p.write(1)) // with the record, a wake-up: the index is lost
	p.a.sqTail = 0
	h.d.waitIdle()
	if st := h.state(p.a); st != uapi.GOHFI_QPS_ERR {
		t.Fatalf("QP state %d after an unreachable record, want ERR", st)
	}
	if got := rd(t, h.d, chip.QPDBReg(p.a.n, chip.QPDBRecAddr)); got != 0 {
		t.Fatalf("unreachable record kept: %#x", got)
	}
	if v := rd(t, h.d, chip.RegErrCntVerbs); v != 2 {
		t.Fatalf("ErrCntVerbs %d, want 2 (misaligned, unreachable)", v)
	}
}
