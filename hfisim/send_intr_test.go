package hfisim

import (
	"encoding/binary"
	"testing"

	"github.com/gohfi/gohfi/chip"
	"golang.org/x/sys/unix"
)

// TestDescIntrIdle: descriptors with DescFlagIntrIdle raise the sender's
// interrupt once, when the send queue runs empty; a DescFlagIntr among them
// raises at once and takes the pending one with it.
func TestDescIntrIdle(t *testing.T) {
	d, dma := newTestDevice(t)
	dma.wins[0x7000000] = make([]byte, 4096)
	sender := setupCtxt(t, d, dma, 0)
	setupCtxt(t, d, dma, 1)
	if err := unix.SetNonblock(sender.irq, true); err != nil {
		t.Fatal(err)
	}
	tail := uint64(0)
	// batch posts descriptors with these flags behind one doorbell and
	// returns how many interrupts the sender got for them.
	batch := func(flags ...uint8) uint64 {
		t.Helper()
		for i, f := range flags {
			desc := chip.SendDesc{Opcode: chip.OpEager, Flags: f, DstCtxt: 1, Length: 64, SrcIOVA: 0x7000000, Tag: uint64(i)}
			desc.Marshal(sender.sq[tail*chip.SendDescSize:])
			tail = (tail + 1) % 16
		}
		wr(t, d, chip.CtxtReg(0, chip.CtxtSQTail), tail)
		waitHead(t, d, 0, tail)
		d.waitIdle() // the raise follows the head
		var b [8]byte
		if _, err := unix.Read(sender.irq, b[:]); err != nil {
			return 0
		}
		return binary.LittleEndian.Uint64(b[:])
	}
	idle, intr := uint8(chip.DescFlagIntrIdle), uint8(chip.DescFlagIntr)
	for _, c := range []struct {
		flags []uint8
		want  uint64
	}{
		{[]uint8{idle, idle, idle, idle}, 1},
		{[]uint8{idle, 0, 0}, 1},
		{[]uint8{idle, intr}, 1},
		{[]uint8{intr, idle}, 2},
		{[]uint8{0, 0}, 0},
		{[]uint8{idle}, 1},
	} {
		if got := batch(c.flags...); got != c.want {
			t.Fatalf("flags %v: %d interrupts, want %d", c.flags, got, c.want)
		}
	}
}
