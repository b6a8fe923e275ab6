package hfisim

import (
	"encoding/binary"
	"testing"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// TestRHQHeadRecord plays a driver that stores its RHQ consumer index in a
// record (chip.CtxtRHQHeadAddr) and never writes CtxtRHQHead: a packet that
// finds the queue full by the device's head reads the record once; a full
// record drops the packet (counted), a record out of range is refused.
func TestRHQHeadRecord(t *testing.T) {
	d, dma := newTestDevice(t)
	if rd(t, d, chip.RegCapFlags)&chip.CapRHQHeadRec == 0 {
		t.Fatal("no CapRHQHeadRec")
	}
	dma.wins[0x7000000] = make([]byte, 4096)
	sender := setupCtxt(t, d, dma, 0)
	recv := setupCtxt(t, d, dma, 1)

	// Misaligned: the enable fails, as bad geometry does.
	wr(t, d, chip.CtxtReg(1, chip.CtxtControl), 0)
	wr(t, d, chip.CtxtReg(1, chip.CtxtRHQHeadAddr), 2*ctxtSpan+recIOVA+4)
	wr(t, d, chip.CtxtReg(1, chip.CtxtControl), chip.CtxtCtrlEnable)
	if rd(t, d, chip.CtxtReg(1, chip.CtxtStatus))&chip.CtxtStatusEnabled != 0 {
		t.Fatal("context enabled with a misaligned head record")
	}
	rec := make([]byte, 8)
	dma.mu.Lock()
	dma.wins[2*ctxtSpan+recIOVA] = rec
	dma.mu.Unlock()
	wr(t, d, chip.CtxtReg(1, chip.CtxtControl), 0)
	wr(t, d, chip.CtxtReg(1, chip.CtxtRHQHeadAddr), 2*ctxtSpan+recIOVA)
	wr(t, d, chip.CtxtReg(1, chip.CtxtControl), chip.CtxtCtrlEnable)
	if rd(t, d, chip.CtxtReg(1, chip.CtxtStatus))&chip.CtxtStatusEnabled == 0 {
		t.Fatal("context with a head record did not enable")
	}
	setHead := func(v uint64) {
		dma.mu.Lock()
		binary.LittleEndian.PutUint64(rec, v)
		dma.mu.Unlock()
	}
	tag := uint64(0)
	send := func() {
		tag++
		post(t, d, sender, 0, chip.SendDesc{Opcode: chip.OpEager, DstCtxt: 1, Length: 64, SrcIOVA: 0x7000000, Tag: tag})
	}
	full := func() uint64 { return rd(t, d, chip.RegErrCntRHQFull) }

	// 15 entries fill a queue of 16; the 16th finds the record at 0: dropped.
	for range 15 {
		send()
	}
	send()
	if got := full(); got != 1 {
		t.Fatalf("RHQ-full count %d after 16 packets into 16 entries, record 0; want 1", got)
	}
	// 5 consumed, stored in the record only: 5 more packets land.
	setHead(5)
	for range 5 {
		send()
	}
	if got := full(); got != 1 {
		t.Fatalf("RHQ-full count %d after 5 packets into 5 entries freed in the record; want 1", got)
	}
	for i, want := range map[int]uint64{14: 15, 15: 17, 0: 18, 3: 21} {
		if e := rhqEntry(recv, i); e.Type != uapi.GOHFI_RHF_EAGER || e.Tag != want {
			t.Fatalf("entry %d: %+v, want eager tag %d", i, e, want)
		}
	}
	if got := rd(t, d, chip.CtxtReg(1, chip.CtxtRHQHead)); got != 5 {
		t.Fatalf("CtxtRHQHead %d, want 5 taken from the record", got)
	}
	// Full again; a record out of range is refused and counted.
	errs := rd(t, d, chip.CtxtReg(1, chip.CtxtErrCnt))
	setHead(16)
	send()
	if got := full(); got != 2 {
		t.Fatalf("RHQ-full count %d after a packet with the record out of range; want 2", got)
	}
	if got := rd(t, d, chip.CtxtReg(1, chip.CtxtErrCnt)); got != errs+2 {
		t.Fatalf("context error count %d, want %d (the refused record and the drop)", got, errs+2)
	}
	if got := rd(t, d, chip.CtxtReg(1, chip.CtxtRHQHead)); got != 5 {
		t.Fatalf("CtxtRHQHead %d after a refused record, want 5", got)
	}
	// A record the device cannot read: an IOMMU fault, the packet dropped,
	// the context still receives once the record is back.
	faults := rd(t, d, chip.RegErrCntIOMMUFault)
	dma.mu.Lock()
	delete(dma.wins, 2*ctxtSpan+recIOVA)
	dma.mu.Unlock()
	send()
	if got := rd(t, d, chip.RegErrCntIOMMUFault); got != faults+1 || full() != 3 {
		t.Fatalf("IOMMU faults %d (want %d), RHQ-full %d (want 3) after an unreadable record", got, faults+1, full())
	}
	dma.mu.Lock()
	dma.wins[2*ctxtSpan+recIOVA] = rec
	dma.mu.Unlock()
	setHead(6)
	send()
	if e := rhqEntry(recv, 4); e.Tag != tag || full() != 3 {
		t.Fatalf("entry 4 %+v (want tag %d), RHQ-full %d after the record came back", e, tag, full())
	}
}

// TestRHQArm: with CtxtCtrlIntArm and a record, an entry raises the receive
// interrupt only when the record's arm word changed since the device last
// raised; an unreadable arm word raises anyway; without a record the bit is
// ignored and every entry raises.
func TestRHQArm(t *testing.T) {
	d, dma := newTestDevice(t)
	dma.wins[0x7000000] = make([]byte, 4096)
	sender := setupCtxt(t, d, dma, 0)
	recv := setupCtxt(t, d, dma, 1)
	recAddr := uint64(2*ctxtSpan + recIOVA)
	rec := make([]byte, chip.RHQHeadRecSize)
	dma.mu.Lock()
	dma.wins[recAddr] = rec
	dma.mu.Unlock()
	wr(t, d, chip.CtxtReg(1, chip.CtxtControl), 0)
	wr(t, d, chip.CtxtReg(1, chip.CtxtRHQHeadAddr), recAddr)
	wr(t, d, chip.CtxtReg(1, chip.CtxtControl), chip.CtxtCtrlEnable|chip.CtxtCtrlIntEnable|chip.CtxtCtrlIntArm)
	if rd(t, d, chip.CtxtReg(1, chip.CtxtStatus))&chip.CtxtStatusEnabled == 0 {
		t.Fatal("context did not enable")
	}
	tag := uint64(0)
	// send delivers one packet (post waits for the sender's completion,
	// which comes after the delivery) and reports whether the receiver's
	// interrupt was raised for it.
	send := func() bool {
		t.Helper()
		tag++
		post(t, d, sender, 0, chip.SendDesc{Opcode: chip.OpEager, DstCtxt: 1, Length: 64, SrcIOVA: 0x7000000, Tag: tag})
		var b [8]byte
		if err := unix.SetNonblock(recv.irq, true); err != nil {
			t.Fatal(err)
		}
		_, err := unix.Read(recv.irq, b[:])
		return err == nil
	}
	arm := func(v uint64) {
		dma.mu.Lock()
		binary.LittleEndian.PutUint64(rec[chip.RHQArmOff:], v)
		dma.mu.Unlock()
	}
	for i := range 3 {
		if send() {
			t.Fatalf("packet %d raised with the arm word at 0", i)
		}
	}
	arm(1)
	if !send() {
		t.Fatal("no interrupt after the arm word moved")
	}
	if send() {
		t.Fatal("a second interrupt for one arm")
	}
	arm(2)
	if !send() {
		t.Fatal("no interrupt after the arm word moved again")
	}
	// Unreadable: raised, and counted.
	faults := rd(t, d, chip.RegErrCntIOMMUFault)
	dma.mu.Lock()
	delete(dma.wins, recAddr)
	dma.mu.Unlock()
	if !send() {
		t.Fatal("no interrupt when the arm word could not be read")
	}
	if got := rd(t, d, chip.RegErrCntIOMMUFault); got != faults+1 {
		t.Fatalf("IOMMU faults %d, want %d", got, faults+1)
	}
	// Without a record the bit is ignored: every entry raises.
	wr(t, d, chip.CtxtReg(1, chip.CtxtControl), 0)
	wr(t, d, chip.CtxtReg(1, chip.CtxtRHQHeadAddr), 0)
	wr(t, d, chip.CtxtReg(1, chip.CtxtControl), chip.CtxtCtrlEnable|chip.CtxtCtrlIntEnable|chip.CtxtCtrlIntArm)
	for i := range 3 {
		if !send() {
			t.Fatalf("packet %d without a record raised nothing", i)
		}
	}
}
