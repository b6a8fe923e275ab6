package hfisim

import (
	"encoding/binary"
	"testing"
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
)

// The context doorbell-record tests play a driver that stores its send
// queue's producer index in a record (chip.CtxtDBRecAddr) and writes
// CtxtSQTail only when the record's notify flag says the engine sleeps.

const recIOVA = 0x600000

// setupCtxtRec is setupCtxt with a doorbell record, set up as a driver
// does: written while the context is disabled, index 0, notify set.
func setupCtxtRec(t *testing.T, d *Device, dma *fakeDMA, n int) (*testCtxt, []byte) {
	t.Helper()
	c := setupCtxt(t, d, dma, n)
	rec := make([]byte, chip.DBRecSize)
	binary.LittleEndian.PutUint32(rec[chip.DBRecFlags:], chip.DBRecNotify)
	addr := uint64(n+1)*ctxtSpan + recIOVA
	dma.mu.Lock()
	dma.wins[addr] = rec
	dma.mu.Unlock()
	wr(t, d, chip.CtxtReg(n, chip.CtxtControl), 0)
	wr(t, d, chip.CtxtReg(n, chip.CtxtDBRecAddr), addr)
	wr(t, d, chip.CtxtReg(n, chip.CtxtControl), chip.CtxtCtrlEnable)
	if rd(t, d, chip.CtxtReg(n, chip.CtxtStatus))&chip.CtxtStatusEnabled == 0 {
		t.Fatal("context with a record did not enable")
	}
	return c, rec
}

// storeDesc writes desc at slot tail of c's queue and stores tail+1 in the
// record, without a register write; it returns the new tail and whether
// the notify flag was set when read after the store.
func storeDesc(dma *fakeDMA, c *testCtxt, rec []byte, tail uint64, desc chip.SendDesc) (uint64, bool) {
	next := (tail + 1) % 16
	dma.mu.Lock()
	defer dma.mu.Unlock()
	desc.Marshal(c.sq[tail*chip.SendDescSize:])
	binary.LittleEndian.PutUint32(rec[chip.DBRecSQTail:], uint32(next))
	return next, binary.LittleEndian.Uint32(rec[chip.DBRecFlags:])&chip.DBRecNotify != 0
}

func recFlags(dma *fakeDMA, rec []byte) uint32 {
	dma.mu.Lock()
	defer dma.mu.Unlock()
	return binary.LittleEndian.Uint32(rec[chip.DBRecFlags:])
}

// waitHead polls context n's SQ head until it is head (a bounded wait).
func waitHead(t *testing.T, d *Device, n int, head uint64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for rd(t, d, chip.CtxtReg(n, chip.CtxtSQHead)) != head {
		if time.Now().After(deadline) {
			t.Fatalf("context %d: SQ head %d, want %d", n, rd(t, d, chip.CtxtReg(n, chip.CtxtSQHead)), head)
		}
		time.Sleep(10 * time.Microsecond)
	}
}

func eagerDesc(tag uint64) chip.SendDesc {
	return chip.SendDesc{Opcode: chip.OpEager, DstCtxt: 1, Length: 64, SrcIOVA: 0x7000000, Tag: tag}
}

// TestCtxtDBRecPolledWhileAwake: the first doorbell of a context with a
// record goes to the register (notify set at setup); once awake the engine
// clears the flag and takes the next tails from the record alone; a
// register write's value is checked but never taken.
func TestCtxtDBRecPolledWhileAwake(t *testing.T) {
	d, dma := newTestDevice(t)
	d.cfg.DBPollIdle = time.Hour // never sleeps on its own
	dma.wins[0x7000000] = make([]byte, 4096)
	if rd(t, d, chip.RegCapFlags)&chip.CapCtxtDBRec == 0 {
		t.Fatal("no CapCtxtDBRec")
	}
	sender, rec := setupCtxtRec(t, d, dma, 0)
	recv := setupCtxt(t, d, dma, 1)
	tail, notify := storeDesc(dma, sender, rec, 0, eagerDesc(100))
	if !notify {
		t.Fatal("notify flag clear before the engine ever polled")
	}
	wr(t, d, chip.CtxtReg(0, chip.CtxtSQTail), tail)
	waitHead(t, d, 0, tail)
	for i := uint64(1); i < 12; i++ {
		if tail, notify = storeDesc(dma, sender, rec, tail, eagerDesc(100+i)); notify {
			t.Fatalf("descriptor %d: notify flag set while the engine polls", i)
		}
		waitHead(t, d, 0, tail)
	}
	for i := range 12 {
		if e := rhqEntry(recv, i); e.Type != uapi.GOHFI_RHF_EAGER || e.Tag != 100+uint64(i) {
			t.Fatalf("entry %d: %+v, want eager tag %d", i, e, 100+i)
		}
	}
	// A register write of another tail: not taken (the record's is).
	wr(t, d, chip.CtxtReg(0, chip.CtxtSQTail), (tail+3)%16)
	d.waitIdle()
	if got := rd(t, d, chip.CtxtReg(0, chip.CtxtSQTail)); got != tail {
		t.Fatalf("SQ tail %d after a register write, want the record's %d", got, tail)
	}
	if e := rhqEntry(recv, 12); e.Seq != 0 {
		t.Fatalf("entry past the record's tail: %+v", e)
	}
	errs := rd(t, d, chip.CtxtReg(0, chip.CtxtErrCnt))
	wr(t, d, chip.CtxtReg(0, chip.CtxtSQTail), 16) // out of range: refused, counted
	if got := rd(t, d, chip.CtxtReg(0, chip.CtxtErrCnt)); got != errs+1 {
		t.Fatalf("error count %d after an out-of-range tail, want %d", got, errs+1)
	}
}

// TestCtxtDBRecSleeps: an engine going to sleep sets the notify flag; the
// driver then writes the register, which wakes the engine, which clears
// the flag and takes the record's tail.
func TestCtxtDBRecSleeps(t *testing.T) {
	d, dma := newTestDevice(t)
	d.cfg.DBPollIdle = time.Hour
	dma.wins[0x7000000] = make([]byte, 4096)
	sender, rec := setupCtxtRec(t, d, dma, 0)
	recv := setupCtxt(t, d, dma, 1)
	tail := uint64(0)
	for i := range 3 {
		next, notify := storeDesc(dma, sender, rec, tail, eagerDesc(uint64(i)))
		if notify != (i == 0) {
			t.Fatalf("round %d: notify %v after the store", i, notify)
		}
		tail = next
		if notify {
			wr(t, d, chip.CtxtReg(0, chip.CtxtSQTail), tail)
		}
		waitHead(t, d, 0, tail)
		d.SleepNow()
		if recFlags(dma, rec)&chip.DBRecNotify == 0 {
			t.Fatalf("round %d: notify clear after the engine slept", i)
		}
		next, notify = storeDesc(dma, sender, rec, tail, eagerDesc(uint64(10+i)))
		if !notify {
			t.Fatalf("round %d: notify clear while the engine sleeps", i)
		}
		tail = next
		wr(t, d, chip.CtxtReg(0, chip.CtxtSQTail), tail)
		waitHead(t, d, 0, tail)
		if recFlags(dma, rec)&chip.DBRecNotify != 0 {
			t.Fatalf("round %d: notify still set after the engine woke and took the tail", i)
		}
	}
	if e := rhqEntry(recv, 5); e.Tag != 12 || e.Type != uapi.GOHFI_RHF_EAGER {
		t.Fatalf("last entry %+v, want tag 12", e)
	}
}

// TestCtxtDBRecRefused: a record not DBRecAlign-aligned fails the enable
// (bad geometry); the register cannot change while the context is
// enabled; a record the device cannot reach halts the context, counted.
func TestCtxtDBRecRefused(t *testing.T) {
	d, dma := newTestDevice(t)
	setupCtxt(t, d, dma, 0)
	wr(t, d, chip.CtxtReg(0, chip.CtxtDBRecAddr), 0x1234000) // enabled: refused
	if got := rd(t, d, chip.CtxtReg(0, chip.CtxtDBRecAddr)); got != 0 {
		t.Fatalf("record address %#x written while enabled", got)
	}
	wr(t, d, chip.CtxtReg(0, chip.CtxtControl), 0)
	wr(t, d, chip.CtxtReg(0, chip.CtxtDBRecAddr), ctxtSpan+recIOVA+8)
	wr(t, d, chip.CtxtReg(0, chip.CtxtControl), chip.CtxtCtrlEnable)
	if st := rd(t, d, chip.CtxtReg(0, chip.CtxtStatus)); st&chip.CtxtStatusEnabled != 0 || st&chip.CtxtStatusHalted == 0 {
		t.Fatalf("status %#x with a misaligned record, want halted", st)
	}
	wr(t, d, chip.CtxtReg(0, chip.CtxtControl), 0)
	wr(t, d, chip.CtxtReg(0, chip.CtxtDBRecAddr), 0xdead000) // not mapped
	wr(t, d, chip.CtxtReg(0, chip.CtxtControl), chip.CtxtCtrlEnable)
	wr(t, d, chip.CtxtReg(0, chip.CtxtSQTail), 1) // wakes the engine, which reads the record
	deadline := time.Now().Add(10 * time.Second)
	for rd(t, d, chip.CtxtReg(0, chip.CtxtStatus))&chip.CtxtStatusHalted == 0 {
		if time.Now().After(deadline) {
			t.Fatal("context with an unreachable record not halted")
		}
		time.Sleep(10 * time.Microsecond)
	}
	if got := rd(t, d, chip.RegErrCntIOMMUFault); got == 0 {
		t.Fatal("unreachable record not counted as an IOMMU fault")
	}
}
