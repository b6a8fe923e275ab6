package dma

import (
	"bytes"
	"errors"
	"fmt"
	"github.com/gohfi/gohfi/internal/testenv"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/vfio"
)

var _ vfio.DMAAccessor = (*Pin)(nil)

func fill(b []byte, v byte) {
	for i := range b {
		b[i] = v
	}
}

func allEqual(b []byte, v byte) bool {
	for _, x := range b {
		if x != v {
			return false
		}
	}
	return true
}

// TestPinSurvivesRemap is the property the host-native path depends on: a
// pin keeps the pages it pinned after the application unmaps the range and
// maps new memory at the same address, and WriteAt/ReadAt reach the old
// pages, never the new mapping.
func TestPinSurvivesRemap(t *testing.T) {
	checkNoLeaks(t)
	acct := NewAccountant()
	p := newTestPinner(t, acct, nil)
	const size = 64 << 10
	old := mmapAnon(t, size)
	fill(old, 0xaa)
	addr := sliceAddr(old)
	pinBefore := vmPinKB(t)

	pin, err := p.Pin(addr, size)
	if err != nil {
		t.Fatal(err)
	}
	if got := vmPinKB(t) - pinBefore; got != size>>10 {
		t.Errorf("VmPin grew by %d kB, want %d", got, size>>10)
	}
	if acct.Pinned() != size/PageSize() {
		t.Errorf("Accountant.Pinned = %d, want %d", acct.Pinned(), size/PageSize())
	}

	// Before the remap, WriteAt lands in the mapped memory.
	if _, err := pin.WriteAt([]byte("first"), 0); err != nil {
		t.Fatal(err)
	}
	if string(old[:5]) != "first" {
		t.Fatalf("WriteAt before remap not visible in the mapping: %q", old[:5])
	}

	if err := unix.Munmap(old); err != nil {
		t.Fatal(err)
	}
	nw := mmapAnonAt(t, addr, size)
	defer unix.Munmap(nw)
	fill(nw, 0x55)

	// The device writes through the pin: into the old pages only.
	msg := []byte("written through the pin after the remap")
	if n, err := pin.WriteAt(msg, 100); err != nil || n != len(msg) {
		t.Fatalf("WriteAt after remap = %d, %v", n, err)
	}
	if !allEqual(nw, 0x55) {
		t.Fatal("WriteAt through the pin changed the memory mapped at the address now")
	}
	got := make([]byte, size)
	if n, err := pin.ReadAt(got, 0); err != nil || n != size {
		t.Fatalf("ReadAt = %d, %v", n, err)
	}
	want := bytes.Repeat([]byte{0xaa}, size)
	copy(want, "first")
	copy(want[100:], msg)
	if !bytes.Equal(got, want) {
		t.Fatal("ReadAt does not return the old pages with what was written")
	}

	if err := pin.Unpin(); err != nil {
		t.Fatal(err)
	}
	if got := vmPinKB(t) - pinBefore; got != 0 {
		t.Errorf("VmPin %d kB above the start after Unpin", got)
	}
	if acct.Pinned() != 0 {
		t.Errorf("Accountant.Pinned = %d after Unpin", acct.Pinned())
	}
	if err := pin.Unpin(); !errors.Is(err, unix.EINVAL) {
		t.Errorf("second Unpin = %v, want EINVAL", err)
	}
	if _, err := pin.ReadAt(got[:1], 0); !errors.Is(err, unix.EINVAL) {
		t.Errorf("ReadAt after Unpin = %v, want EINVAL", err)
	}
}

func TestPinMemlockLimit(t *testing.T) {
	checkNoLeaks(t)
	acct := NewAccountant()
	p := newTestPinner(t, acct, nil)
	ps := PageSize()
	withMemlockLimit(t, uint64(16*ps))
	buf := mmapAnon(t, 32*ps)
	defer unix.Munmap(buf)
	addr := sliceAddr(buf)

	if _, err := p.Pin(addr, 17*ps); !errors.Is(err, unix.ENOMEM) {
		t.Fatalf("Pin of 17 pages under a 16-page limit = %v, want ENOMEM", err)
	}
	if acct.Pinned() != 0 || p.Pins() != 0 {
		t.Fatalf("failed pin left %d pages charged, %d pins", acct.Pinned(), p.Pins())
	}
	a, err := p.Pin(addr, 10*ps)
	if err != nil {
		t.Fatal(err)
	}
	b, err := p.Pin(addr+uintptr(10*ps), 6*ps) // exactly at the limit
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Pin(addr+uintptr(16*ps), ps); !errors.Is(err, unix.ENOMEM) {
		t.Fatalf("Pin past the limit = %v, want ENOMEM", err)
	}
	if acct.Pinned() != 16 {
		t.Fatalf("Pinned = %d, want 16", acct.Pinned())
	}
	if err := a.Unpin(); err != nil {
		t.Fatal(err)
	}
	c, err := p.Pin(addr+uintptr(16*ps), ps)
	if err != nil {
		t.Fatalf("Pin after Unpin made room: %v", err)
	}
	for _, x := range []*Pin{b, c} {
		if err := x.Unpin(); err != nil {
			t.Fatal(err)
		}
	}
	if acct.Pinned() != 0 {
		t.Fatalf("Pinned = %d after unpinning all", acct.Pinned())
	}
}

func TestPinInvalid(t *testing.T) {
	checkNoLeaks(t)
	p := newTestPinner(t, NewAccountant(), nil)
	ps := PageSize()
	buf := mmapAnon(t, 4*ps)
	defer unix.Munmap(buf)
	addr := sliceAddr(buf)
	for _, tc := range []struct {
		name   string
		addr   uintptr
		length int
	}{
		{"unaligned address", addr + 1, ps},
		{"unaligned length", addr, ps + 1},
		{"short length", addr, ps - 1},
		{"zero length", addr, 0},
		{"negative length", addr, -ps},
		{"too large", addr, MaxPinSize + ps},
		{"wraps", ^uintptr(0) &^ uintptr(ps-1), 2 * ps},
	} {
		if _, err := p.Pin(tc.addr, tc.length); !errors.Is(err, unix.EINVAL) {
			t.Errorf("%s: Pin(%#x, %d) = %v, want EINVAL", tc.name, tc.addr, tc.length, err)
		}
	}
	// Not mapped: the kernel refuses to pin.
	hole := mmapAnon(t, ps)
	holeAddr := sliceAddr(hole)
	unix.Munmap(hole)
	if _, err := p.Pin(holeAddr, ps); !errors.Is(err, unix.EFAULT) {
		t.Errorf("Pin of unmapped memory = %v, want EFAULT", err)
	}
	if p.Pins() != 0 {
		t.Errorf("failed pins left %d pins", p.Pins())
	}

	pin, err := p.Pin(addr, 2*ps)
	if err != nil {
		t.Fatal(err)
	}
	defer pin.Unpin()
	small := make([]byte, 8)
	for _, off := range []int64{-1, int64(2*ps) - 7, int64(2 * ps), 1 << 40} {
		if _, err := pin.WriteAt(small, off); !errors.Is(err, unix.EFAULT) {
			t.Errorf("WriteAt(8 bytes, %d) on a %d-byte pin = %v, want EFAULT", off, 2*ps, err)
		}
		if _, err := pin.ReadAt(small, off); !errors.Is(err, unix.EFAULT) {
			t.Errorf("ReadAt(8 bytes, %d) on a %d-byte pin = %v, want EFAULT", off, 2*ps, err)
		}
	}
	if n, err := pin.WriteAt(nil, int64(2*ps)); n != 0 || err != nil {
		t.Errorf("empty WriteAt at the end = %d, %v", n, err)
	}
}

// TestPinMemfd pins shared memfd memory: writes through the pin are the
// file's pages, seen through the mapping and by pread.
func TestPinMemfd(t *testing.T) {
	checkNoLeaks(t)
	p := newTestPinner(t, NewAccountant(), nil)
	const size = 256 << 10
	fd, err := unix.MemfdCreate("dma-test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, size); err != nil {
		t.Fatal(err)
	}
	m, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	pin, err := p.Pin(sliceAddr(m), size)
	if err != nil {
		t.Fatal(err)
	}
	msg := bytes.Repeat([]byte("memfd!"), 1000)
	if _, err := pin.WriteAt(msg, 5000); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(m[5000:5000+len(msg)], msg) {
		t.Error("WriteAt not visible through the memfd mapping")
	}
	got := make([]byte, len(msg))
	if _, err := unix.Pread(fd, got, 5000); err != nil || !bytes.Equal(got, msg) {
		t.Errorf("pread of the memfd after WriteAt: %v, equal=%v", err, bytes.Equal(got, msg))
	}
	copy(m[100:], "from the cpu")
	if _, err := pin.ReadAt(got[:12], 100); err != nil || string(got[:12]) != "from the cpu" {
		t.Errorf("ReadAt of CPU stores = %q, %v", got[:12], err)
	}
	if err := pin.Unpin(); err != nil {
		t.Fatal(err)
	}
}

// TestPinLargeTransfer moves more than the bounce buffers in one call, at an
// odd offset, so it is chunked: with a small pipe (all reads through the
// pipe) and with the default sizes (large reads through the memfd).
func TestPinLargeTransfer(t *testing.T) {
	ps := PageSize()
	for _, tc := range []struct {
		name    string
		scratch int
		size    int
	}{
		{"small pipe", 4 * ps, 64 * ps},
		{"default", 0, 3<<20 + 5*ps},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkNoLeaks(t)
			p := newTestPinner(t, NewAccountant(), &PinnerOptions{ScratchSize: tc.scratch})
			buf := mmapAnon(t, tc.size)
			defer unix.Munmap(buf)
			pin, err := p.Pin(sliceAddr(buf), tc.size)
			if err != nil {
				t.Fatal(err)
			}
			defer pin.Unpin()
			src := make([]byte, tc.size-777)
			for i := range src {
				src[i] = byte(i*7 + i>>8)
			}
			if n, err := pin.WriteAt(src, 777); err != nil || n != len(src) {
				t.Fatalf("WriteAt = %d, %v", n, err)
			}
			if !bytes.Equal(buf[777:], src) || !allEqual(buf[:777], 0) {
				t.Fatal("chunked WriteAt wrote the wrong bytes")
			}
			got := make([]byte, len(src))
			if n, err := pin.ReadAt(got, 777); err != nil || n != len(got) || !bytes.Equal(got, src) {
				t.Fatalf("chunked ReadAt = %d, %v, equal=%v", n, err, bytes.Equal(got, src))
			}
			// A read that ends in a short tail takes both paths.
			got = got[:tc.size/3+100]
			if _, err := pin.ReadAt(got, 5); err != nil || !bytes.Equal(got, buf[5:5+len(got)]) {
				t.Fatalf("ReadAt of %d bytes at 5: %v", len(got), err)
			}
		})
	}
}

// TestPinConcurrent runs pins, transfers and unpins from several goroutines.
func TestPinConcurrent(t *testing.T) {
	checkNoLeaks(t)
	acct := NewAccountant()
	p := newTestPinner(t, acct, &PinnerOptions{MaxPins: 8, ScratchSize: 2 * PageSize()})
	ps := PageSize()
	const workers, rounds = 4, 50
	bufs := make([][]byte, workers)
	for i := range bufs {
		bufs[i] = mmapAnon(t, 8*ps)
		defer unix.Munmap(bufs[i])
	}
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			msg := bytes.Repeat([]byte{byte(w + 1)}, 5*ps+3)
			got := make([]byte, len(msg))
			for r := range rounds {
				pin, err := p.Pin(sliceAddr(bufs[w]), 8*ps)
				if err != nil {
					errs <- err
					return
				}
				off := int64(r % ps)
				if _, err := pin.WriteAt(msg, off); err != nil {
					errs <- err
					return
				}
				if _, err := pin.ReadAt(got, off); err != nil || !bytes.Equal(got, msg) {
					errs <- errors.Join(err, errors.New("read back differs"))
					return
				}
				if err := pin.Unpin(); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if acct.Pinned() != 0 || p.Pins() != 0 {
		t.Errorf("after all unpins: %d pages charged, %d pins", acct.Pinned(), p.Pins())
	}
}

func TestPinnerClose(t *testing.T) {
	checkNoLeaks(t)
	acct := NewAccountant()
	p, err := NewPinner(acct, &PinnerOptions{MaxPins: 2})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Available(); err != nil {
		if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) {
			testenv.Require(t, err, "io_uring")
		}
		t.Fatal(err)
	}
	ps := PageSize()
	buf := mmapAnon(t, 4*ps)
	defer unix.Munmap(buf)
	before := vmPinKB(t)
	a, err := p.Pin(sliceAddr(buf), 2*ps)
	if err != nil {
		t.Fatal(err)
	}
	b, err := p.Pin(sliceAddr(buf)+uintptr(2*ps), 2*ps)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Pin(sliceAddr(buf), ps); !errors.Is(err, unix.ENOSPC) {
		t.Errorf("Pin with a full table = %v, want ENOSPC", err)
	}
	if err := a.Unpin(); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if acct.Pinned() != 0 {
		t.Errorf("Pinned = %d after Close", acct.Pinned())
	}
	if got := vmPinKB(t) - before; got != 0 {
		t.Errorf("VmPin %d kB above the start after Close", got)
	}
	if err := b.Unpin(); err != nil {
		t.Errorf("Unpin after Close = %v, want nil", err)
	}
	if _, err := b.WriteAt([]byte{1}, 0); !errors.Is(err, ErrClosed) {
		t.Errorf("WriteAt after Close = %v, want ErrClosed", err)
	}
	if _, err := p.Pin(sliceAddr(buf), ps); !errors.Is(err, ErrClosed) {
		t.Errorf("Pin after Close = %v, want ErrClosed", err)
	}
}

func TestNewPinnerInvalid(t *testing.T) {
	acct := NewAccountant()
	if _, err := NewPinner(nil, nil); !errors.Is(err, unix.EINVAL) {
		t.Errorf("NewPinner(nil) = %v", err)
	}
	for _, o := range []PinnerOptions{{MaxPins: -1}, {MaxPins: 1 << 15}, {ScratchSize: 100}, {ScratchSize: -4096}} {
		if _, err := NewPinner(acct, &o); !errors.Is(err, unix.EINVAL) {
			t.Errorf("NewPinner(%+v) = %v, want EINVAL", o, err)
		}
	}
	// A Pinner that never pinned closes without having set up io_uring.
	p, err := NewPinner(acct, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestPinWithoutIOUring: when io_uring cannot be set up (here faked as the
// io_uring_disabled sysctl's EPERM), Pin says so with the errno, every
// time, and charges nothing.
func TestPinWithoutIOUring(t *testing.T) {
	acct := NewAccountant()
	p, err := NewPinner(acct, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	calls := 0
	p.newRing = func(uint32) (*ring, error) {
		calls++
		return nil, fmt.Errorf("dma: io_uring_setup: %w", unix.EPERM)
	}
	buf := mmapAnon(t, PageSize())
	defer unix.Munmap(buf)
	for range 2 {
		if _, err := p.Pin(sliceAddr(buf), PageSize()); !errors.Is(err, unix.EPERM) {
			t.Fatalf("Pin without io_uring = %v, want EPERM", err)
		}
	}
	if err := p.Available(); !errors.Is(err, unix.EPERM) {
		t.Fatalf("Available = %v, want EPERM", err)
	}
	if calls != 1 {
		t.Errorf("io_uring setup tried %d times, want once", calls)
	}
	if acct.Pinned() != 0 {
		t.Errorf("Pinned = %d", acct.Pinned())
	}
}

// TestPinReadOnlyMemory: io_uring pins a fixed buffer for writing
// (io_pin_pages asks pin_user_pages_fast for FOLL_WRITE | FOLL_LONGTERM,
// whatever the requests will do with it), so memory the process maps
// without PROT_WRITE cannot be pinned: EFAULT, nothing charged, nothing
// held. docs/pinning.md, "Read-only memory", says what follows for ODP.
// If a kernel ever pins such memory, this test says so.
func TestPinReadOnlyMemory(t *testing.T) {
	acct := NewAccountant()
	p := newTestPinner(t, acct, nil)
	b := mmapAnon(t, 2*pageSize)
	defer unix.Munmap(b)
	b[0], b[pageSize] = 1, 2 // present, and this process's own pages
	if err := unix.Mprotect(b, unix.PROT_READ); err != nil {
		t.Fatal(err)
	}
	pin, err := p.Pin(sliceAddr(b), len(b))
	if err == nil {
		pin.Unpin()
		t.Fatal("io_uring pinned PROT_READ memory: read-only ODP pins can use the Pinner now (docs/pinning.md)")
	}
	if !errors.Is(err, unix.EFAULT) {
		t.Fatalf("pin of PROT_READ memory: %v, want EFAULT", err)
	}
	if acct.Pinned() != 0 || p.Pins() != 0 {
		t.Fatalf("failed pin left %d pages charged, %d pins", acct.Pinned(), p.Pins())
	}
}
