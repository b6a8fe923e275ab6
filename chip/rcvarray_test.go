package chip

import (
	"math/rand/v2"
	"testing"
)

func TestRcvArrayEntryNumbers(t *testing.T) {
	for _, c := range []struct {
		addr   uint64
		npages uint32
		want   uint64
	}{
		{0, 0, 1 << 63},                  // invalid entry: write enable only
		{0xdead_0000, 0, 1 << 63},        // address ignored when invalid
		{0x1000, 1, 1<<63 | 1<<36 | 0x1}, // order 1
		{0x1234_5000, 8, 1<<63 | 4<<36 | 0x12345},
		{0x7fff_ffff_f000, 512, 1<<63 | 10<<36 | 0x7_ffff_ffff},
		{0x1234_5fff, 2, 1<<63 | 2<<36 | 0x12345}, // low 12 bits dropped
		{0x1234_5000, 3, 1<<63 | 2<<36 | 0x12345}, // ilog2 rounds down
	} {
		if got := RcvArrayEntry(c.addr, c.npages); got != c.want {
			t.Errorf("RcvArrayEntry(%#x, %d) = %#x, want %#x", c.addr, c.npages, got, c.want)
		}
	}
	if MaxTIDPages != 512 {
		t.Errorf("MaxTIDPages = %d", MaxTIDPages)
	}
}

func TestRcvArrayEntryRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 10000; i++ {
		addr := r.Uint64() & (1<<48 - 1) &^ 0xfff
		npages := uint32(1) << r.IntN(10) // 1..512
		a, n, ok := RcvArrayEntryDecode(RcvArrayEntry(addr, npages))
		if !ok || a != addr || n != npages {
			t.Fatalf("round trip of (%#x, %d) gave (%#x, %d, %v)", addr, npages, a, n, ok)
		}
	}
	if _, _, ok := RcvArrayEntryDecode(RcvArrayEntry(0x5000, 0)); ok {
		t.Error("invalid entry decoded as valid")
	}
	// The device ignores the write-enable bit.
	if a, n, ok := RcvArrayEntryDecode(RcvArrayEntry(0x5000, 4) &^ RCV_ARRAY_RT_WRITE_ENABLE_SMASK); !ok || a != 0x5000 || n != 4 {
		t.Errorf("decode without write enable = %#x, %d, %v", a, n, ok)
	}
}
