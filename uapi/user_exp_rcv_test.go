package uapi

import (
	"math/rand/v2"
	"testing"
)

func TestExpTidFields(t *testing.T) {
	for _, c := range []struct {
		f          ExpTidField
		in, want   uint32
		get, value uint32
	}{
		{EXP_TID_LEN, 0xFFFF, 0x7FF, 0xFFFFFFFF, 0x7FF},
		{EXP_TID_CTRL, 0x7, 0x3 << 20, 0x00300000, 3},
		{EXP_TID_IDX, 0xFFFF, 0x3FF << 22, 0xFFC00000, 0x3FF},
	} {
		if got := ExpTidSet(c.f, c.in); got != c.want {
			t.Errorf("ExpTidSet(%d, %#x) = %#x, want %#x", c.f, c.in, got, c.want)
		}
		if got := ExpTidGet(c.get, c.f); got != c.value {
			t.Errorf("ExpTidGet(%#x, %d) = %#x, want %#x", c.get, c.f, got, c.value)
		}
	}
	tid := CreateTid(6, 16)
	if got := ExpTidReset(tid, EXP_TID_LEN, 3); ExpTidGet(got, EXP_TID_LEN) != 3 ||
		ExpTidGet(got, EXP_TID_IDX) != 3 || ExpTidGet(got, EXP_TID_CTRL) != 1 {
		t.Errorf("ExpTidReset(%#x, LEN, 3) = %#x", tid, got)
	}
}

func TestCreateTidNumbers(t *testing.T) {
	for _, c := range []struct{ entry, npages, want uint32 }{
		{0, 1, 0x00100001},    // pair 0, even, 1 page
		{1, 512, 0x00200200},  // pair 0, odd, 512 pages
		{5, 8, 0x00A00008},    // pair 2, odd
		{2046, 2, 0xFFD00002}, // pair 1023, even: IDX uses all 10 bits
	} {
		if got := CreateTid(c.entry, c.npages); got != c.want {
			t.Errorf("CreateTid(%d, %d) = %#x, want %#x", c.entry, c.npages, got, c.want)
		}
	}
}

func TestTidRoundTrip(t *testing.T) {
	for entry := uint32(0); entry < 2048; entry++ {
		for _, npages := range []uint32{1, 2, 7, 512, 2047} {
			tid := CreateTid(entry, npages)
			e, n, ok := TidRcvEntry(tid)
			if !ok || e != entry || n != npages {
				t.Fatalf("TidRcvEntry(CreateTid(%d, %d) = %#x) = %d, %d, %v", entry, npages, tid, e, n, ok)
			}
		}
	}
	for _, ctrl := range []uint32{0, 3} {
		if _, _, ok := TidRcvEntry(ExpTidSet(EXP_TID_CTRL, ctrl) | 1); ok {
			t.Errorf("TidRcvEntry accepted CTRL %d", ctrl)
		}
	}
}

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
	if MaxTidPages != 512 {
		t.Errorf("MaxTidPages = %d", MaxTidPages)
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
