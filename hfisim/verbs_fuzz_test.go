package hfisim

import (
	"encoding/binary"
	"testing"
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
)

// FuzzVerbsWQE feeds the engine a send WQE and a receive WQE of arbitrary
// bytes and arbitrary register and BAR4 writes, on a connected pair with
// real regions (newPair: keys 0x15a and 0x25a), and checks that the device
// never panics and always returns to idle.
//
// Input: bytes 0-255 the send WQE, 256-511 the receive WQE, then 16-byte
// records {offset, value}: a CSR write at offset mod 64 KiB, or with bit 63
// of the offset a BAR4 write.
//
// Fast registration: before the fuzzed WQE the responder's fast-reg MR 3
// (key 0x301) is bound VALID to three pages of the remote region at frVA,
// and fast-reg MR 4 (8 MTT entries) is FREE, both in PD 1. A send WQE whose
// page list IOVA (bytes 80-87) is 1 gets the IOVA of a page list of eight
// host pages of the remote region instead (out of order, the last one not
// page-aligned); its length and shift stay the fuzzer's.
func FuzzVerbsWQE(f *testing.F) {
	f.Add(make([]byte, 512))
	f.Fuzz(fuzzVerbs)
}

func fuzzVerbs(t *testing.T, data []byte) {
	p := newPair(t, 0x3000)
	h := p.h
	h.fill(p.local, 1)
	var sq [chip.SendWQESize]byte
	var rq [chip.RecvWQESize]byte
	copy(sq[:], data)
	if len(data) > chip.SendWQESize {
		copy(rq[:], data[chip.SendWQESize:])
	}
	fr3 := h.allocFR(3, 1, 2)
	h.allocFR(4, 1, 3)
	rp := func(k uint64) uint64 { return p.remote.host(p.remote.va&^0xfff + k*4096) }
	h.postSend(p.a, regWQE(100, fr3, 1, h.pageList(rp(2), rp(0), rp(1)), 3, 12, frVA, 3*4096, allAccess))
	h.expectCQE(p.acq, 100, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_REG_MR, 0)
	if binary.LittleEndian.Uint64(sq[80:]) == 1 {
		pl := h.pageList(rp(1), rp(0), rp(2), rp(0), rp(1), rp(2), rp(1), rp(2)+8)
		binary.LittleEndian.PutUint64(sq[80:], pl)
	}
	h.write(p.b.rq, rq[:])
	wr(t, h.d, chip.QPReg(p.b.n, chip.QPRQTail), 1)
	h.write(p.a.sq+chip.SendWQESize, sq[:])
	wr(t, h.d, chip.QPReg(p.a.n, chip.QPSQTail), 2)

	ri, _, _ := h.d.RegionInfo(chip.MTTBar)
	for rec := data[min(len(data), 512):]; len(rec) >= 16; rec = rec[16:] {
		off, v := binary.LittleEndian.Uint64(rec), binary.LittleEndian.Uint64(rec[8:])
		var b [8]byte
		binary.LittleEndian.PutUint64(b[:], v)
		if off&(1<<63) != 0 {
			if err := h.d.RegionWrite(chip.MTTBar, off%ri.Size&^7, b[:]); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := h.d.RegionWrite(chip.CSRBar, off%chip.CSRBarSize&^7, b[:]); err != nil {
			t.Fatal(err)
		}
	}
	idle := make(chan struct{})
	go func() { h.d.waitIdle(); close(idle) }()
	select {
	case <-idle:
	case <-time.After(20 * time.Second): // a watchdog, not synchronisation
		t.Fatal("the engine never became idle")
	}
	if rd(t, h.d, chip.RegID) != chip.IDMagic {
		t.Fatal("device gone")
	}
}
