package rcvarray

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/uapi"
)

func TestEncodeTID(t *testing.T) {
	for _, tc := range []struct {
		rel, npages int
		want        uint32
	}{
		{0, 1, 1<<20 | 1},
		{1, 1, 2<<20 | 1},
		{2, 4, 1<<22 | 1<<20 | 4},
		{3, 512, 1<<22 | 2<<20 | 512},
		{2047, 2047, 1023<<22 | 2<<20 | 2047},
	} {
		if got := EncodeTID(tc.rel, tc.npages); got != tc.want {
			t.Errorf("EncodeTID(%d, %d) = %#x, want %#x", tc.rel, tc.npages, got, tc.want)
		}
		rel, npages, err := DecodeTID(tc.want)
		if err != nil || rel != tc.rel || npages != tc.npages {
			t.Errorf("DecodeTID(%#x) = %d, %d, %v; want %d, %d", tc.want, rel, npages, err, tc.rel, tc.npages)
		}
	}
}

func TestEncodeTIDPanics(t *testing.T) {
	for _, tc := range [][2]int{{-1, 1}, {2048, 1}, {0, 0}, {0, 2048}} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("EncodeTID(%d, %d) did not panic", tc[0], tc[1])
				}
			}()
			EncodeTID(tc[0], tc[1])
		}()
	}
}

func TestTIDRoundTrip(t *testing.T) {
	for rel := range MaxTIDEntries {
		for _, np := range []int{1, 2, 512, uapi.EXP_TID_TIDLEN_MASK} {
			tid := EncodeTID(rel, np)
			r, n, err := CheckTID(tid, MaxTIDEntries)
			if err != nil || r != rel || n != np {
				t.Fatalf("CheckTID(EncodeTID(%d, %d)=%#x) = %d, %d, %v", rel, np, tid, r, n, err)
			}
		}
	}
}

func TestDecodeTIDInvalid(t *testing.T) {
	for _, tc := range []struct {
		name  string
		tid   uint32
		count int
	}{
		{"ctrl 0", 5<<22 | 0<<20 | 1, 64},
		{"ctrl 3", 5<<22 | 3<<20 | 1, 64},
		{"len 0", 5<<22 | 1<<20, 64},
		{"reserved bit", 5<<22 | 1<<20 | 1<<11 | 1, 64},
		{"pair beyond count", 32<<22 | 1<<20 | 1, 64},
		{"odd entry beyond count", 31<<22 | 2<<20 | 1, 63},
		{"zero", 0, 64},
	} {
		_, _, err := CheckTID(tc.tid, tc.count)
		if !errors.Is(err, unix.EINVAL) {
			t.Errorf("%s: CheckTID(%#x, %d) = %v, want EINVAL", tc.name, tc.tid, tc.count, err)
		}
	}
}

func FuzzTID(f *testing.F) {
	for _, s := range []uint32{0, 1, 1<<20 | 1, 2<<20 | 512, 3<<20 | 1, 1023<<22 | 2<<20 | 2047, 0xffffffff} {
		f.Add(s, 64)
	}
	f.Fuzz(func(t *testing.T, tid uint32, count int) {
		if count < 0 || count > MaxTIDEntries {
			count = MaxTIDEntries
		}
		rel, npages, err := CheckTID(tid, count)
		if err != nil {
			if !errors.Is(err, unix.EINVAL) {
				t.Fatalf("CheckTID(%#x) error %v does not wrap EINVAL", tid, err)
			}
			return
		}
		if rel < 0 || rel >= count || npages < 1 || npages > uapi.EXP_TID_TIDLEN_MASK {
			t.Fatalf("CheckTID(%#x, %d) accepted rel %d npages %d", tid, count, rel, npages)
		}
		if got := EncodeTID(rel, npages); got != tid {
			t.Fatalf("EncodeTID(DecodeTID(%#x)) = %#x", tid, got)
		}
	})
}
