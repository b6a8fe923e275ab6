package vfiouser

import (
	"bytes"
	"errors"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/vfio"
)

// TestDMACopy: the server's Copy moves bytes between two fd mappings, an fd
// mapping and memory the client serves (each way, in several DMA_READ /
// DMA_WRITE messages), and two served ranges; every pairing lands the same
// bytes, checks both ranges before it moves anything, and says which side
// failed.
func TestDMACopy(t *testing.T) {
	requireProcessVM(t)
	leakCheck(t)
	c, m, _ := newPair(t, nil, []Option{WithMaxDataXferSize(1024)})
	const n = 3 * 4096
	fa, ma := memfdMem(t, n)
	fb, mb := memfdMem(t, n)
	sa, sb := anonMem(t, n), anonMem(t, n)
	rw := uint32(vfio.DMARead | vfio.DMAWrite)
	maps := []vfio.DMAMapping{
		{IOVA: 0x10000, Vaddr: addrOf(ma), Size: n, Flags: rw, File: fa},
		{IOVA: 0x20000, Vaddr: addrOf(mb), Size: n, Flags: rw, File: fb},
		{IOVA: 0x30000, Vaddr: addrOf(sa), Size: n, Flags: rw},
		{IOVA: 0x40000, Vaddr: addrOf(sb), Size: n, Flags: rw},
		{IOVA: 0x50000, Vaddr: addrOf(sb), Size: 4096, Flags: vfio.DMARead}, // read-only
	}
	for _, mp := range maps {
		if err := c.DMAMap(mp); err != nil {
			t.Fatal(err)
		}
	}
	cp, ok := m.getDMA().(Copier)
	if !ok {
		t.Fatal("the server's DMA is not a Copier")
	}
	mems := map[uint64][]byte{0x10000: ma, 0x20000: mb, 0x30000: sa, 0x40000: sb}
	fill := func(b []byte, seed byte) {
		for i := range b {
			b[i] = seed + byte(i*7+i>>9)
		}
	}
	for _, pair := range [][2]uint64{{0x20000, 0x10000}, {0x30000, 0x10000}, {0x10000, 0x30000}, {0x40000, 0x30000}} {
		dst, src := pair[0], pair[1]
		fill(mems[src], byte(dst>>12))
		clear(mems[dst])
		// Unaligned, longer than one DMA message, shorter than the maps.
		const off, cnt = 100, 2*4096 + 777
		if err := cp.Copy(dst+off, src+off, cnt); err != nil {
			t.Fatalf("copy %#x <- %#x: %v", dst, src, err)
		}
		if !bytes.Equal(mems[dst][off:off+cnt], mems[src][off:off+cnt]) {
			t.Fatalf("copy %#x <- %#x: bytes differ", dst, src)
		}
		if !bytes.Equal(mems[dst][:off], make([]byte, off)) || !bytes.Equal(mems[dst][off+cnt:], make([]byte, n-off-cnt)) {
			t.Fatalf("copy %#x <- %#x: wrote outside the range", dst, src)
		}
	}
	before := bytes.Clone(mb)
	for _, c := range []struct {
		name     string
		dst, src uint64
		n        int
		dstSide  bool
		want     error
	}{
		{"source past its mapping", 0x20000, 0x10000 + n - 10, 20, false, ErrIOMMUFault},
		{"destination past its mapping", 0x20000 + n - 10, 0x10000, 20, true, ErrIOMMUFault},
		{"destination read-only", 0x50000, 0x20000, 8, true, ErrIOMMUFault},
		{"source unmapped", 0x20000, 0x90000, 8, false, ErrIOMMUFault},
		{"overlapping", 0x20000 + 8, 0x20000, 64, true, unix.EINVAL},
	} {
		err := cp.Copy(c.dst, c.src, c.n)
		var ce *CopyError
		if !errors.As(err, &ce) || ce.Dst != c.dstSide || !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want a CopyError (destination %v) wrapping %v", c.name, err, c.dstSide, c.want)
		}
	}
	if !bytes.Equal(mb, before) {
		t.Error("a refused copy wrote")
	}
	// CopyDMA copies overlapping ranges that fit its buffer as memmove.
	fill(mb, 3)
	want := append(bytes.Clone(mb[:8]), mb[:56]...)
	if err := CopyDMA(cp.(DMA), 0x20000+8, 0x20000, 56, make([]byte, 64)); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(mb[:64], want) {
		t.Error("overlapping CopyDMA differs from memmove")
	}
	for _, mp := range maps {
		if err := c.DMAUnmap(mp.IOVA, mp.Size); err != nil {
			t.Fatal(err)
		}
	}
}

// TestDMACopyTruncatedFile: a client that shrinks the file under an fd
// mapping makes the copy fail on that side with EFAULT instead of killing
// the server.
func TestDMACopyTruncatedFile(t *testing.T) {
	requireProcessVM(t)
	leakCheck(t)
	c, m, _ := newPair(t, nil, nil)
	fa, ma := memfdMem(t, 2*4096)
	sb := anonMem(t, 2*4096)
	rw := uint32(vfio.DMARead | vfio.DMAWrite)
	for _, mp := range []vfio.DMAMapping{
		{IOVA: 0x10000, Vaddr: addrOf(ma), Size: 2 * 4096, Flags: rw, File: fa},
		{IOVA: 0x20000, Vaddr: addrOf(sb), Size: 2 * 4096, Flags: rw},
	} {
		if err := c.DMAMap(mp); err != nil {
			t.Fatal(err)
		}
	}
	if err := fa.Truncate(0); err != nil {
		t.Fatal(err)
	}
	cp := m.getDMA().(Copier)
	for _, c := range []struct {
		name     string
		dst, src uint64
		dstSide  bool
	}{{"from the truncated file", 0x20000, 0x10000, false}, {"into the truncated file", 0x10000, 0x20000, true}} {
		err := cp.Copy(c.dst, c.src, 4096)
		var ce *CopyError
		if !errors.As(err, &ce) || ce.Dst != c.dstSide || !errors.Is(err, unix.EFAULT) {
			t.Errorf("%s: %v, want a CopyError (destination %v) wrapping EFAULT", c.name, err, c.dstSide)
		}
	}
}
