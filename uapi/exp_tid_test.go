package uapi

import "testing"

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
