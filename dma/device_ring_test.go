package dma

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/internal/testenv"
)

// pinAnon maps n bytes of anonymous memory and pins them with p; the pin
// and the mapping are undone at cleanup.
func pinAnon(t *testing.T, p *Pinner, n int) (*Pin, []byte) {
	t.Helper()
	m := mmapAnon(t, n)
	t.Cleanup(func() { _ = unix.Munmap(m) }) // runs after the Unpin below
	pin, err := p.Pin(sliceAddr(m), n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pin.Unpin() })
	return pin, m
}

// deviceRingFD makes pin's device ring and returns the device's own copy
// of its fd, as a device in another process gets it (the client's copy is
// closed, as after sending it), and the address the ring knows the pin at.
func deviceRingFD(t *testing.T, pin *Pin) (int, uintptr) {
	t.Helper()
	client, fd, addr := deviceRingFDs(t, pin)
	if err := client.Close(); err != nil {
		t.Fatal(err)
	}
	return fd, addr
}

// deviceRingFDs is deviceRingFD that also returns the client's copy of the
// ring, as a client keeps it that does not close it after sending.
func deviceRingFDs(t *testing.T, pin *Pin) (*os.File, int, uintptr) {
	t.Helper()
	f, addr, err := pin.DeviceRing()
	if errors.Is(err, unix.ENOTSUP) {
		testenv.Require(t, err, "io_uring buffer cloning (Linux 6.12)")
	}
	if err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Dup(int(f.Fd()))
	if err != nil {
		_ = f.Close() // the test fails with the dup's error
		t.Fatal(err)
	}
	return f, fd, addr
}

// openTestDeviceRing opens pin's device ring as a device would
// (deviceRingFD), closed at cleanup.
func openTestDeviceRing(t *testing.T, pin *Pin, sameProcess bool) *DeviceRingBuffer {
	t.Helper()
	fd, addr := deviceRingFD(t, pin)
	b, err := OpenDeviceRing(fd, uint64(addr), uint64(pin.Len()), sameProcess)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := b.Close(); err != nil {
			t.Error(err)
		}
	})
	return b
}

func TestDeviceRing(t *testing.T) {
	checkNoLeaks(t)
	p := newTestPinner(t, NewAccountant(), nil)
	const size = 3 << 20 // more than a pipe holds
	src := make([]byte, size)
	for i := range src {
		src[i] = byte(rand.Uint32())
	}
	pa, a := pinAnon(t, p, size)
	copy(a, src) // the pinned pages: the ring reads them, not a copy
	pb, bm := pinAnon(t, p, size)
	// rb as an embedded device's: its queues' addresses stay taken.
	ra, rb := openTestDeviceRing(t, pa, false), openTestDeviceRing(t, pb, true)

	// Reads and writes of the pinned pages, across pipe-sized chunks.
	got := make([]byte, size-5)
	if n, err := ra.ReadAt(got, 5); err != nil || n != len(got) || !bytes.Equal(got, src[5:]) {
		t.Fatalf("ReadAt = %d, %v; data equal %v", n, err, bytes.Equal(got, src[5:]))
	}
	if n, err := rb.WriteAt(src[:size-100], 100); err != nil || n != size-100 || !bytes.Equal(bm[100:], src[:size-100]) {
		t.Fatalf("WriteAt = %d, %v; data equal %v", n, err, bytes.Equal(bm[100:], src[:size-100]))
	}
	// Ring to ring.
	clear(bm)
	if dstSide, err := ra.CopyTo(rb, 7, 3, size-10); err != nil || !bytes.Equal(bm[7:size-3], src[3:size-7]) || bm[6] != 0 {
		t.Fatalf("CopyTo = %v (dst %v); data equal %v", err, dstSide, bytes.Equal(bm[7:size-3], src[3:size-7]))
	}

	// Bounds: nothing outside the mapping, on either side.
	for _, c := range []struct {
		off int64
		n   int
	}{{size - 1, 2}, {-1, 1}, {size, 1}, {1 << 62, 1}} {
		if _, err := ra.ReadAt(make([]byte, c.n), c.off); !errors.Is(err, unix.EFAULT) {
			t.Errorf("ReadAt %d at %d = %v, want EFAULT", c.n, c.off, err)
		}
		if _, err := ra.WriteAt(make([]byte, c.n), c.off); !errors.Is(err, unix.EFAULT) {
			t.Errorf("WriteAt %d at %d = %v, want EFAULT", c.n, c.off, err)
		}
		if dst, err := ra.CopyTo(rb, c.off, 0, c.n); !dst || !errors.Is(err, unix.EFAULT) {
			t.Errorf("CopyTo %d to %d = %v (dst %v), want EFAULT on the destination", c.n, c.off, err, dst)
		}
		if dst, err := ra.CopyTo(rb, 0, c.off, c.n); dst || !errors.Is(err, unix.EFAULT) {
			t.Errorf("CopyTo %d from %d = %v (dst %v), want EFAULT on the source", c.n, c.off, err, dst)
		}
	}
	// Within one ring.
	copy(a, src)
	if _, err := ra.CopyTo(ra, size/2+1, 5, size/2-7); err != nil || !bytes.Equal(a[size/2+1:size-6], src[5:size/2-2]) || !bytes.Equal(a[:size/2+1], src[:size/2+1]) {
		t.Fatalf("CopyTo within the ring = %v", err)
	}
	if dst, err := ra.CopyTo(ra, 8, 0, 16); !dst || !errors.Is(err, unix.EINVAL) {
		t.Errorf("overlapping CopyTo within the ring = %v (dst %v), want EINVAL", err, dst)
	}
	copy(a, src)
	// After the refusals the ring still works.
	if _, err := ra.ReadAt(got[:4096], 0); err != nil || !bytes.Equal(got[:4096], src[:4096]) {
		t.Fatalf("ReadAt after refusals = %v", err)
	}

	// The ring reaches the pinned pages, not what is mapped at the address
	// now: after munmap and a new mapping there, a write lands in the old
	// pages (seen through the pin), not in the new mapping.
	addr := sliceAddr(a)
	if err := unix.Munmap(a); err != nil {
		t.Fatal(err)
	}
	nw := mmapAnonAt(t, addr, size)
	defer unix.Munmap(nw)
	if _, err := ra.WriteAt([]byte("after the remap"), 0); err != nil {
		t.Fatal(err)
	}
	if !allEqual(nw, 0) {
		t.Fatal("a write through the device ring reached the new mapping")
	}
	old := make([]byte, 15)
	if _, err := pa.ReadAt(old, 0); err != nil || string(old) != "after the remap" {
		t.Fatalf("pinned pages hold %q (%v)", old, err)
	}

	// Closed: every access refused.
	if err := ra.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := ra.ReadAt(got[:1], 0); !errors.Is(err, unix.EBADF) {
		t.Errorf("ReadAt after Close = %v, want EBADF", err)
	}
}

// TestDeviceRingRefused: the device takes only a disabled io_uring it can
// restrict itself, and only once.
func TestDeviceRingRefused(t *testing.T) {
	checkNoLeaks(t)
	p := newTestPinner(t, NewAccountant(), nil)
	pin, m := pinAnon(t, p, 1<<16)
	f, addr, err := pin.DeviceRing()
	if errors.Is(err, unix.ENOTSUP) {
		testenv.Require(t, err, "io_uring buffer cloning (Linux 6.12)")
	}
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	// Not an io_uring.
	var pfd [2]int
	if err := unix.Pipe2(pfd[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(pfd[1])
	if _, err := OpenDeviceRing(pfd[0], uint64(addr), 1<<16, false); !errors.Is(err, unix.EINVAL) {
		t.Errorf("pipe as a device ring = %v, want EINVAL", err)
	}
	// An enabled ring (the client could submit anything on it).
	var params ioUringParams
	params.Flags = ioringSetupClamp
	enabled, err := ioUringSetup(4, &params)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := OpenDeviceRing(enabled, uint64(addr), 1<<16, false); err == nil {
		t.Error("an enabled ring was accepted")
	}
	// The same ring twice: the second device cannot restrict it again.
	dup := func() int {
		fd, err := unix.Dup(int(f.Fd()))
		if err != nil {
			t.Fatal(err)
		}
		return fd
	}
	first, err := OpenDeviceRing(dup(), uint64(addr), 1<<16, false)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	if _, err := OpenDeviceRing(dup(), uint64(addr), 1<<16, false); err == nil {
		t.Error("a ring opened twice was accepted twice")
	}
	// A hostile address: the mapping claimed past the buffer. The kernel
	// refuses every request outside the cloned buffer.
	fd2, _ := deviceRingFD(t, pin)
	wrong, err := OpenDeviceRing(fd2, uint64(addr)+1<<16, 1<<16, false)
	if err != nil {
		t.Fatal(err)
	}
	defer wrong.Close()
	if _, err := wrong.WriteAt([]byte("x"), 0); !errors.Is(err, unix.EFAULT) {
		t.Errorf("request outside the cloned buffer = %v, want EFAULT", err)
	}
	if !allEqual(m, 0) {
		t.Error("memory changed by a refused request")
	}
}

// TestDeviceRingKeptBound: an embedded device's closed rings leave their
// queue addresses taken and are counted; every keptCheck of them the
// process's mappings are counted, and while they are more than half of
// vm.max_map_count new embedded rings are refused with ENOSPC (checkNoLeaks:
// closing the fd), taken again once they are fewer, while a device in
// another process (nothing kept) always takes them. Past keptCheck rings
// with few mappings nothing is refused: the rings are no measure of what
// their merged covers cost.
func TestDeviceRingKeptBound(t *testing.T) {
	checkNoLeaks(t)
	p := newTestPinner(t, NewAccountant(), nil)
	pin, _ := pinAnon(t, p, 1<<16)

	n0 := keptRings.Load()
	b := openTestDeviceRing(t, pin, true)
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if n := keptRings.Load(); n != n0+1 {
		t.Fatalf("kept rings %d after closing an embedded ring, want %d", n, n0+1)
	}

	maps := 10
	old := mapCount
	mapCount = func() (int, int, error) { return maps, 65530, nil }
	defer func() { mapCount = old; _ = keptRoom() }()
	kept.mu.Lock()
	kept.nextCheck = 0 // count at the next ring
	kept.mu.Unlock()
	keptRings.Store(n0 + 10*keptCheck)
	defer keptRings.Store(n0 + 1)
	if err := openTestDeviceRing(t, pin, true).Close(); err != nil {
		t.Fatalf("embedded ring past %d kept rings with %d mappings: %v", 10*keptCheck, maps, err)
	}

	maps = 65530/2 + 1
	kept.mu.Lock()
	kept.nextCheck = 0
	kept.mu.Unlock()
	fd, addr := deviceRingFD(t, pin)
	if _, err := OpenDeviceRing(fd, uint64(addr), 1<<16, true); !errors.Is(err, unix.ENOSPC) {
		t.Fatalf("embedded ring with %d of 65530 mappings = %v, want ENOSPC", maps, err)
	}
	openTestDeviceRing(t, pin, false) // another process's device keeps nothing: no bound

	maps = 100 // counted again at the next ring: taken again
	if err := openTestDeviceRing(t, pin, true).Close(); err != nil {
		t.Fatalf("embedded ring once the mappings are fewer: %v", err)
	}
}

// ringBuffers lists the buffer table of the io_uring fd as the kernel shows
// it in /proc/self/fdinfo: one line per slot, "<none>" for an empty one.
func ringBuffers(t *testing.T, fd int) []string {
	t.Helper()
	info, err := os.ReadFile("/proc/self/fdinfo/" + strconv.Itoa(fd))
	if err != nil {
		t.Fatal(err)
	}
	var bufs []string
	in := false
	for _, l := range strings.Split(string(info), "\n") {
		switch {
		case strings.HasPrefix(l, "UserBufs:"):
			in = true
		case in && strings.Contains(l, ": "):
			if _, err := strconv.Atoi(strings.TrimSpace(l[:strings.Index(l, ":")])); err != nil {
				return bufs
			}
			bufs = append(bufs, strings.TrimSpace(l[strings.Index(l, ":")+1:]))
		case in:
			return bufs
		}
	}
	return bufs
}

// TestDeviceRingCopyLends: CopyTo lends the destination's buffer to the
// source's ring only while it copies: afterwards the source's ring holds
// its own pages alone, and a closed destination is refused on its side.
func TestDeviceRingCopyLends(t *testing.T) {
	checkNoLeaks(t)
	p := newTestPinner(t, NewAccountant(), nil)
	const size = 1 << 20
	pa, a := pinAnon(t, p, size)
	pb, bm := pinAnon(t, p, size)
	for i := range a {
		a[i] = byte(i * 13)
	}
	ra, rb := openTestDeviceRing(t, pa, false), openTestDeviceRing(t, pb, false)
	// A write first: its vmsplice must not spoil the copy's pipe
	// (FMODE_NOWAIT).
	if _, err := ra.WriteAt(a[:3*4096+5], 1); err != nil {
		t.Fatal(err)
	}
	for i := range a {
		a[i] = byte(i * 13)
	}
	if dst, err := ra.CopyTo(rb, 0, 0, size); err != nil || !bytes.Equal(a, bm) {
		t.Fatalf("CopyTo = %v (dst %v); data equal %v", err, dst, bytes.Equal(a, bm))
	}
	bufs := ringBuffers(t, ra.r.fd)
	want := fmt.Sprintf("%#x/%d", sliceAddr(a), size)
	if len(bufs) == 0 || bufs[0] != want || len(bufs) > 1 && bufs[1] != "<none>" || len(bufs) > 2 {
		t.Fatalf("source ring's buffers after CopyTo: %q, want [%s <none>]", bufs, want)
	}
	if err := rb.Close(); err != nil {
		t.Fatal(err)
	}
	if dst, err := ra.CopyTo(rb, 0, 0, 4096); !dst || !errors.Is(err, unix.EBADF) {
		t.Fatalf("CopyTo a closed ring = %v (dst %v), want EBADF on the destination", err, dst)
	}
	if dst, err := rb.CopyTo(ra, 0, 0, 4096); dst || !errors.Is(err, unix.EBADF) {
		t.Fatalf("CopyTo from a closed ring = %v (dst %v), want EBADF on the source", err, dst)
	}
}

// TestDeviceRingCopyHostileClient: a client that kept its rings' fds can
// use the register operations the device allows (lending needs them) only
// on its own memory: it empties its rings' buffers, and the copies from or
// to them fail on that side, touch nothing else, and leave the other rings
// working; the device's pipe stays out of its reach.
func TestDeviceRingCopyHostileClient(t *testing.T) {
	checkNoLeaks(t)
	p := newTestPinner(t, NewAccountant(), nil)
	const size = 1 << 18
	pins := make([]*Pin, 3)
	mems := make([][]byte, 3)
	rings := make([]*DeviceRingBuffer, 3)
	clients := make([]int, 3) // the client's copies of the rings
	for i := range pins {
		pins[i], mems[i] = pinAnon(t, p, size)
		f, fd, addr := deviceRingFDs(t, pins[i])
		clients[i] = int(f.Fd())
		defer f.Close()
		var err error
		if rings[i], err = OpenDeviceRing(fd, uint64(addr), size, false); err != nil {
			t.Fatal(err)
		}
		defer rings[i].Close()
	}
	for i := range mems[0] {
		mems[0][i] = byte(i*7 + 1)
	}
	// The device's files stay the device's.
	files := [2]int32{0, 1}
	upd := ioUringRsrcUpdate2{Data: addrOf(&files), Nr: 2}
	if _, err := ioUringRegister(clients[0], ioringRegisterFilesUpdate2, addrOf(&upd), uint32(sizeofRsrcUpdate2)); !errors.Is(err, unix.EACCES) {
		t.Fatalf("client's FILES_UPDATE on its device ring = %v, want EACCES", err)
	}
	// The client empties the buffer of ring 1 (its destination) and then
	// of ring 2 (a source).
	empty := func(fd int) {
		var iov ioIovec
		upd := ioUringRsrcUpdate2{Data: addrOf(&iov), Nr: 1}
		if _, err := ioUringRegister(fd, ioringRegisterBuffersUpdate, addrOf(&upd), uint32(sizeofRsrcUpdate2)); err != nil {
			t.Fatal(err)
		}
	}
	empty(clients[1])
	if dst, err := rings[0].CopyTo(rings[1], 0, 0, size); !dst || !errors.Is(err, unix.EFAULT) {
		t.Errorf("CopyTo an emptied ring = %v (dst %v), want EFAULT on the destination", err, dst)
	}
	if !allEqual(mems[1], 0) {
		t.Error("the emptied destination's pages changed")
	}
	// The source ring still copies (its pipe drained) to a sound ring.
	if _, err := rings[0].CopyTo(rings[2], 0, 0, size); err != nil || !bytes.Equal(mems[2], mems[0]) {
		t.Fatalf("CopyTo after a failure = %v; data equal %v", err, bytes.Equal(mems[2], mems[0]))
	}
	empty(clients[2])
	clear(mems[0])
	if dst, err := rings[2].CopyTo(rings[0], 0, 0, size); dst || !errors.Is(err, unix.EFAULT) {
		t.Errorf("CopyTo from an emptied ring = %v (dst %v), want EFAULT on the source", err, dst)
	}
	if !allEqual(mems[0], 0) {
		t.Error("a copy from an emptied ring wrote the destination")
	}

	// A mapping claimed twice as long as the ring's buffer: a copy from
	// past the buffer fails on the source's side and leaves no request
	// waiting on the pipe (one would take the bytes of the next access).
	for i := range mems[1] {
		mems[1][i] = byte(i*3 + 5)
	}
	fd, addr := deviceRingFD(t, pins[1])
	long, err := OpenDeviceRing(fd, uint64(addr), 2*size, false)
	if err != nil {
		t.Fatal(err)
	}
	defer long.Close()
	if dst, err := long.CopyTo(rings[0], 0, size, size); dst || !errors.Is(err, unix.EFAULT) {
		t.Errorf("CopyTo from past the buffer = %v (dst %v), want EFAULT on the source", err, dst)
	}
	got := make([]byte, size)
	if _, err := long.ReadAt(got, 0); err != nil || !bytes.Equal(got, mems[1]) {
		t.Fatalf("ReadAt after a failed copy = %v; data equal %v", err, bytes.Equal(got, mems[1]))
	}
	if dst, err := long.CopyTo(rings[0], 0, 0, size); err != nil || !bytes.Equal(mems[0], mems[1]) {
		t.Fatalf("CopyTo after a failed copy = %v (dst %v); data equal %v", err, dst, bytes.Equal(mems[0], mems[1]))
	}
}
