package dma

import (
	"bytes"
	"errors"
	"fmt"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// newROPinner returns a Pinner whose read-only pins use segments of seg
// bytes (0: the default). Read-only pins need no io_uring.
func newROPinner(t testing.TB, acct *Accountant, seg int) *Pinner {
	t.Helper()
	p, err := NewPinner(acct, &PinnerOptions{ReadOnlySegment: seg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("Pinner.Close: %v", err)
		}
	})
	return p
}

// pattern fills b with bytes that differ from page to page and within a
// page, starting from seed.
func pattern(b []byte, seed byte) {
	for i := range b {
		b[i] = seed + byte(i) + byte(i>>12)*7
	}
}

// mmapReadOnly maps n bytes, fills them with pattern(seed) and makes them
// PROT_READ: what io_uring refuses to pin.
func mmapReadOnly(t testing.TB, n int, seed byte) []byte {
	t.Helper()
	b := mmapAnon(t, n)
	pattern(b, seed)
	if err := unix.Mprotect(b, unix.PROT_READ); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestPinReadOnlySurvivesRemap: a read-only pin holds PROT_READ memory
// (which Pin refuses), charges the Accountant but not VmPin, holds one pipe
// per segment, reads the pinned bytes at any offset and length (within and
// across segments), still reads them after the application unmapped the
// range and mapped other memory there, refuses device writes, and gives
// everything back at Unpin.
func TestPinReadOnlySurvivesRemap(t *testing.T) {
	checkNoLeaks(t)
	acct := NewAccountant()
	ps := PageSize()
	p := newROPinner(t, acct, 2*ps)
	const pages = 5
	size := pages * ps
	old := mmapReadOnly(t, size, 3)
	want := bytes.Clone(old)
	addr := sliceAddr(old)
	fds, pinKB := countFDs(t), vmPinKB(t)

	pin, err := p.PinReadOnly(addr, size)
	if err != nil {
		t.Fatal(err)
	}
	if !pin.ReadOnly() || pin.Addr() != addr || pin.Len() != size || pin.Pages() != pages {
		t.Fatalf("pin: read-only %v, %#x+%d, %d pages", pin.ReadOnly(), pin.Addr(), pin.Len(), pin.Pages())
	}
	if acct.Pinned() != pages || p.Pins() != 1 {
		t.Errorf("Accountant.Pinned %d, Pins %d; want %d, 1", acct.Pinned(), p.Pins(), pages)
	}
	// /dev/null (opened at the first read-only pin) and one pipe per
	// segment, the write ends closed.
	if got, segs := countFDs(t)-fds, (pages+1)/2; got != 1+segs {
		t.Errorf("a pin of %d segments holds %d descriptors, want %d", segs, got, 1+segs)
	}
	if got := vmPinKB(t) - pinKB; got != 0 {
		t.Errorf("VmPin grew by %d kB: page references are not FOLL_PIN pins", got)
	}

	check := func(when string) {
		t.Helper()
		for _, r := range []struct{ off, n int }{
			{0, size}, {0, 1}, {ps - 3, 7}, {2*ps - 1, 2}, {ps, 2 * ps}, {ps + 100, 3 * ps}, {size - 1, 1}, {4 * ps, ps}, {17, size - 17},
		} {
			got := make([]byte, r.n)
			if n, err := pin.ReadAt(got, int64(r.off)); err != nil || n != r.n {
				t.Fatalf("%s: ReadAt(%d bytes at %d) = %d, %v", when, r.n, r.off, n, err)
			}
			if !bytes.Equal(got, want[r.off:r.off+r.n]) {
				t.Fatalf("%s: ReadAt(%d bytes at %d) returned other bytes", when, r.n, r.off)
			}
		}
	}
	check("before the remap")

	if err := unix.Munmap(old); err != nil {
		t.Fatal(err)
	}
	nw := mmapAnonAt(t, addr, size)
	defer unix.Munmap(nw)
	pattern(nw, 99)
	check("after munmap and a new mapping at the address")

	if _, err := pin.WriteAt([]byte{1, 2, 3}, 0); !errors.Is(err, unix.EFAULT) {
		t.Errorf("WriteAt into a read-only pin = %v, want EFAULT", err)
	}
	check("after a refused write")
	for _, off := range []int64{-1, int64(size) - 7, int64(size), 1 << 40} {
		if _, err := pin.ReadAt(make([]byte, 8), off); !errors.Is(err, unix.EFAULT) {
			t.Errorf("ReadAt(8 bytes, %d) of a %d-byte pin = %v, want EFAULT", off, size, err)
		}
	}

	if err := pin.Unpin(); err != nil {
		t.Fatal(err)
	}
	if acct.Pinned() != 0 || p.Pins() != 0 {
		t.Errorf("after Unpin: %d pages charged, %d pins", acct.Pinned(), p.Pins())
	}
	if got := countFDs(t) - fds; got != 1 {
		t.Errorf("after Unpin %d descriptors more than before the pin, want 1 (/dev/null)", got)
	}
	if err := pin.Unpin(); !errors.Is(err, unix.EINVAL) {
		t.Errorf("second Unpin = %v, want EINVAL", err)
	}
	if _, err := pin.ReadAt(make([]byte, 1), 0); !errors.Is(err, unix.EINVAL) {
		t.Errorf("ReadAt after Unpin = %v, want EINVAL", err)
	}
}

// TestPinReadOnlyReadsThePages: the pin holds the pages, not a copy of
// them: a change made to the same pages after the pin is what the device
// reads. Here through the file of a shared memfd mapping, and through the
// mapping itself once made writable again (an anonymous page this process
// wrote is its own, and a write fault reuses it).
func TestPinReadOnlyReadsThePages(t *testing.T) {
	checkNoLeaks(t)
	p := newROPinner(t, NewAccountant(), 0)
	ps := PageSize()

	fd, err := unix.MemfdCreate("ropin", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, int64(2*ps)); err != nil {
		t.Fatal(err)
	}
	shm, err := unix.Mmap(fd, 0, 2*ps, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(shm)
	pin, err := p.PinReadOnly(sliceAddr(shm), 2*ps)
	if err != nil {
		t.Fatal(err)
	}
	msg := []byte("written to the file after the pin")
	if _, err := unix.Pwrite(fd, msg, int64(ps+10)); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	if _, err := pin.ReadAt(got, int64(ps+10)); err != nil || !bytes.Equal(got, msg) {
		t.Errorf("memfd page written after the pin: read %q, %v", got, err)
	}
	if err := pin.Unpin(); err != nil {
		t.Fatal(err)
	}

	anon := mmapReadOnly(t, ps, 1)
	defer unix.Munmap(anon)
	pin, err = p.PinReadOnly(sliceAddr(anon), ps)
	if err != nil {
		t.Fatal(err)
	}
	defer pin.Unpin()
	if err := unix.Mprotect(anon, unix.PROT_READ|unix.PROT_WRITE); err != nil {
		t.Fatal(err)
	}
	copy(anon[100:], msg)
	if _, err := pin.ReadAt(got, 100); err != nil || !bytes.Equal(got, msg) {
		t.Errorf("own anonymous page written after mprotect: read %q, %v", got, err)
	}
}

// TestPinReadOnlyRefused: what cannot be held fails with the kernel's
// errno and holds nothing: a range with a hole, PROT_NONE memory, a range
// past RLIMIT_MEMLOCK (ENOMEM before anything is referenced), bad
// arguments; a page never touched (the shared zero page) is held.
func TestPinReadOnlyRefused(t *testing.T) {
	checkNoLeaks(t)
	acct := NewAccountant()
	ps := PageSize()
	p := newROPinner(t, acct, 2*ps)
	buf := mmapReadOnly(t, 8*ps, 0)
	defer unix.Munmap(buf)
	addr := sliceAddr(buf)
	// Open /dev/null now so that the descriptor count below is the pins'.
	warm, err := p.PinReadOnly(addr, ps)
	if err != nil {
		t.Fatal(err)
	}
	if err := warm.Unpin(); err != nil {
		t.Fatal(err)
	}
	fds := countFDs(t)

	if _, _, errno := unix.Syscall(unix.SYS_MUNMAP, addr+uintptr(5*ps), uintptr(ps), 0); errno != 0 {
		t.Fatal(errno)
	}
	if _, err := p.PinReadOnly(addr, 8*ps); !errors.Is(err, unix.EFAULT) {
		t.Errorf("read-only pin over a hole = %v, want EFAULT", err)
	}
	if err := unix.Mprotect(buf[:ps], unix.PROT_NONE); err != nil {
		t.Fatal(err)
	}
	if _, err := p.PinReadOnly(addr, 2*ps); !errors.Is(err, unix.EFAULT) {
		t.Errorf("read-only pin of PROT_NONE memory = %v, want EFAULT", err)
	}
	for _, tc := range []struct {
		addr   uintptr
		length int
	}{{addr + 1, ps}, {addr, ps + 1}, {addr, 0}, {addr, -ps}, {addr, MaxPinSize + ps}, {^uintptr(0) &^ uintptr(ps-1), 2 * ps}} {
		if _, err := p.PinReadOnly(tc.addr, tc.length); !errors.Is(err, unix.EINVAL) {
			t.Errorf("PinReadOnly(%#x, %d) = %v, want EINVAL", tc.addr, tc.length, err)
		}
	}
	withMemlockLimit(t, uint64(2*ps))
	if _, err := p.PinReadOnly(addr+uintptr(2*ps), 3*ps); !errors.Is(err, unix.ENOMEM) {
		t.Errorf("read-only pin of 3 pages under a 2-page RLIMIT_MEMLOCK = %v, want ENOMEM", err)
	}
	if acct.Pinned() != 0 || p.Pins() != 0 || countFDs(t) != fds {
		t.Fatalf("failed pins hold %d pages, %d pins, %d descriptors", acct.Pinned(), p.Pins(), countFDs(t)-fds)
	}

	zero, err := unix.Mmap(-1, 0, 2*ps, unix.PROT_READ, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(zero)
	pin, err := p.PinReadOnly(sliceAddr(zero), 2*ps)
	if err != nil {
		t.Fatalf("read-only pin of untouched PROT_READ memory: %v", err)
	}
	got := bytes.Repeat([]byte{0xff}, 2*ps)
	if _, err := pin.ReadAt(got, 0); err != nil || !allEqual(got, 0) {
		t.Errorf("untouched memory reads %v, not zeros", err)
	}
	if err := pin.Unpin(); err != nil {
		t.Fatal(err)
	}
}

// TestPinReadOnlyClose: Pinner.Close releases the read-only pins it holds;
// after it they are unusable, Unpin is nil and no new pin is made.
func TestPinReadOnlyClose(t *testing.T) {
	checkNoLeaks(t)
	acct := NewAccountant()
	p, err := NewPinner(acct, nil)
	if err != nil {
		t.Fatal(err)
	}
	ps := PageSize()
	buf := mmapReadOnly(t, 4*ps, 7)
	defer unix.Munmap(buf)
	pin, err := p.PinReadOnly(sliceAddr(buf), 4*ps)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pin.ReadAt(make([]byte, 10), 5); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if acct.Pinned() != 0 || p.Pins() != 0 {
		t.Errorf("after Close: %d pages charged, %d pins", acct.Pinned(), p.Pins())
	}
	if _, err := pin.ReadAt(make([]byte, 10), 5); !errors.Is(err, ErrClosed) {
		t.Errorf("ReadAt after Close = %v, want ErrClosed", err)
	}
	if err := pin.Unpin(); err != nil {
		t.Errorf("Unpin after Close = %v, want nil", err)
	}
	if _, err := p.PinReadOnly(sliceAddr(buf), ps); !errors.Is(err, ErrClosed) {
		t.Errorf("PinReadOnly after Close = %v, want ErrClosed", err)
	}
}

// TestPinReadOnlyConcurrent: reads of one pin and of several pins from
// several goroutines, with pins made and released meanwhile (-race).
func TestPinReadOnlyConcurrent(t *testing.T) {
	checkNoLeaks(t)
	acct := NewAccountant()
	ps := PageSize()
	p := newROPinner(t, acct, 4*ps)
	const pages = 16
	buf := mmapReadOnly(t, pages*ps, 11)
	defer unix.Munmap(buf)
	shared, err := p.PinReadOnly(sliceAddr(buf), pages*ps)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got := make([]byte, 3*ps)
			for i := range 50 {
				off := ((g*50 + i) * 1237) % (pages*ps - len(got))
				pin := shared
				if i%5 == 0 {
					var err error
					if pin, err = p.PinReadOnly(sliceAddr(buf), pages*ps); err != nil {
						errs <- err
						return
					}
				}
				if _, err := pin.ReadAt(got, int64(off)); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(got, buf[off:off+len(got)]) {
					errs <- fmt.Errorf("goroutine %d: read at %d returned other bytes", g, off)
					return
				}
				if pin != shared {
					if err := pin.Unpin(); err != nil {
						errs <- err
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if err := shared.Unpin(); err != nil {
		t.Fatal(err)
	}
	if acct.Pinned() != 0 || p.Pins() != 0 {
		t.Errorf("after all unpins: %d pages charged, %d pins", acct.Pinned(), p.Pins())
	}
}

// TestPinReadOnlyLargeSegment: segments larger than a pipe's default 64 KiB
// grow their pipes (and the bounce) with F_SETPIPE_SZ.
func TestPinReadOnlyLargeSegment(t *testing.T) {
	checkNoLeaks(t)
	const seg, size = 256 << 10, 1 << 20
	acct := NewAccountant()
	if lim, err := acct.LimitPages(); err != nil || (lim >= 0 && lim < size/PageSize()) {
		withMemlockLimit(t, size)
	}
	p := newROPinner(t, acct, seg)
	buf := mmapReadOnly(t, size, 5)
	defer unix.Munmap(buf)
	pin, err := p.PinReadOnly(sliceAddr(buf), size)
	if err != nil {
		t.Fatal(err)
	}
	defer pin.Unpin()
	got := make([]byte, size)
	if _, err := pin.ReadAt(got, 0); err != nil || !bytes.Equal(got, buf) {
		t.Fatalf("ReadAt of the whole pin: %v, equal %v", err, bytes.Equal(got, buf))
	}
	if _, err := pin.ReadAt(got[:5000], seg-100); err != nil || !bytes.Equal(got[:5000], buf[seg-100:seg+4900]) {
		t.Fatalf("ReadAt across segments: %v", err)
	}
}

func TestNewPinnerReadOnlySegmentInvalid(t *testing.T) {
	for _, seg := range []int{-4096, 100, PageSize() + 1, MaxReadOnlySegment + PageSize()} {
		if _, err := NewPinner(NewAccountant(), &PinnerOptions{ReadOnlySegment: seg}); !errors.Is(err, unix.EINVAL) {
			t.Errorf("NewPinner(ReadOnlySegment %d) = %v, want EINVAL", seg, err)
		}
	}
}

// TestPinReadOnlyReadsInOrder: reads that continue the last one (a device
// reading packet by packet) are served from what the bounce kept of the
// segment; mixed with jumps back and forth, every read returns its bytes.
func TestPinReadOnlyReadsInOrder(t *testing.T) {
	checkNoLeaks(t)
	ps := PageSize()
	p := newROPinner(t, NewAccountant(), 2*ps)
	size := 5 * ps
	buf := mmapReadOnly(t, size, 21)
	defer unix.Munmap(buf)
	pin, err := p.PinReadOnly(sliceAddr(buf), size)
	if err != nil {
		t.Fatal(err)
	}
	defer pin.Unpin()
	read := func(off, n int) {
		t.Helper()
		got := make([]byte, n)
		if _, err := pin.ReadAt(got, int64(off)); err != nil {
			t.Fatalf("ReadAt(%d bytes at %d): %v", n, off, err)
		}
		if !bytes.Equal(got, buf[off:off+n]) {
			t.Fatalf("ReadAt(%d bytes at %d) returned other bytes", n, off)
		}
	}
	for _, step := range []int{1000, ps, 3, 2*ps + 1} {
		for off := 0; off < size; off += step {
			read(off, min(step, size-off))
		}
	}
	// In order, with jumps: back into the segment the bounce holds, ahead
	// within it, into another, and on in order from each.
	for _, r := range [][2]int{{0, 100}, {100, 100}, {50, 10}, {60, 5000}, {5060, 10}, {7000, 10}, {7010, 3 * ps}, {3*ps + 7010 - ps, 10}, {100, 10}, {110, size - 110}} {
		read(r[0], min(r[1], size-r[0]))
	}
}

// TestPinReadOnlyNoUnshare pins down the difference from a kernel
// read-only long-term pin that docs/pinning.md states: vmsplice takes a
// reference to the page mapped now without making it the process's own,
// so never-written PROT_READ memory is held as the shared zero page, and a
// write after mprotect(PROT_WRITE) goes to a new page the pin does not
// see. (pin_user_pages(FOLL_LONGTERM) would have unshared the page first.)
// If a kernel ever unshares for vmsplice, this test says so.
func TestPinReadOnlyNoUnshare(t *testing.T) {
	checkNoLeaks(t)
	p := newROPinner(t, NewAccountant(), 0)
	ps := PageSize()
	b, err := unix.Mmap(-1, 0, ps, unix.PROT_READ, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(b)
	pin, err := p.PinReadOnly(sliceAddr(b), ps)
	if err != nil {
		t.Fatal(err)
	}
	defer pin.Unpin()
	if err := unix.Mprotect(b, unix.PROT_READ|unix.PROT_WRITE); err != nil {
		t.Fatal(err)
	}
	fill(b, 0x5a)
	got := make([]byte, ps)
	if _, err := pin.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if allEqual(got, 0x5a) {
		t.Fatal("the pin reads what the process wrote into a page it never owned before: vmsplice unshares now; update docs/pinning.md")
	}
	if !allEqual(got, 0) {
		t.Fatal("the pin of never-written memory reads neither zeros nor the process's write")
	}
}
