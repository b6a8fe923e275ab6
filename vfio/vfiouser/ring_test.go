package vfiouser

import (
	"bytes"
	"errors"
	"os"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/dma"
	"github.com/gohfi/gohfi/internal/testenv"
	"github.com/gohfi/gohfi/vfio"
	"github.com/gohfi/gohfi/vfio/abi"
)

// countedPin is a pin as the driver maps it, counting the accesses that
// came back over the socket (DMA_READ/DMA_WRITE) instead of the ring.
type countedPin struct {
	*dma.Pin
	socket atomic.Int64
}

func (c *countedPin) ReadAt(p []byte, off int64) (int, error) {
	c.socket.Add(1)
	return c.Pin.ReadAt(p, off)
}

func (c *countedPin) WriteAt(p []byte, off int64) (int, error) {
	c.socket.Add(1)
	return c.Pin.WriteAt(p, off)
}

// ringPins pins n anonymous buffers of size bytes, or skips where io_uring
// or buffer cloning is missing.
func ringPins(t *testing.T, k, size int) ([]*countedPin, [][]byte) {
	t.Helper()
	p, err := dma.NewPinner(dma.NewAccountant(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Available(); err != nil {
		if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) {
			testenv.Require(t, err, "io_uring")
		}
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Error(err)
		}
	})
	var pins []*countedPin
	var mems [][]byte
	for range k {
		b := anonMem(t, size)
		pin, err := p.Pin(addrOf(b), size)
		if err != nil {
			t.Fatal(err)
		}
		f, _, err := pin.DeviceRing()
		if errors.Is(err, unix.ENOTSUP) {
			testenv.Require(t, err, "io_uring buffer cloning (Linux 6.12)")
		}
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
		pins, mems = append(pins, &countedPin{Pin: pin}), append(mems, b)
	}
	return pins, mems
}

// TestDMARing: pinned anonymous memory mapped with a device ring is reached
// by the server through the ring, never over the socket: reads, writes and
// copies to and from rings, fd mappings and socket-served memory land the
// right bytes, bounds hold, and DMA_UNMAP takes the ring away.
func TestDMARing(t *testing.T) {
	requireProcessVM(t)
	leakCheck(t)
	const n = 3 << 20 // several pipes' worth
	pins, mems := ringPins(t, 2, n)
	c, m, _ := newPair(t, nil, nil)
	fm, mm := memfdMem(t, n)
	sm := anonMem(t, n)
	rw := uint32(vfio.DMARead | vfio.DMAWrite)
	maps := []vfio.DMAMapping{
		{IOVA: 0x1000_0000, Vaddr: pins[0].Addr(), Size: n, Flags: rw, Access: pins[0]},
		{IOVA: 0x2000_0000, Vaddr: pins[1].Addr(), Size: n, Flags: rw, Access: pins[1]},
		{IOVA: 0x3000_0000, Vaddr: addrOf(mm), Size: n, Flags: rw, File: fm},
		{IOVA: 0x4000_0000, Vaddr: addrOf(sm), Size: n, Flags: rw},
	}
	for _, mp := range maps {
		if err := c.DMAMap(mp); err != nil {
			t.Fatal(err)
		}
	}
	d := m.getDMA()
	cp := d.(Copier)
	mem := map[uint64][]byte{0x1000_0000: mems[0], 0x2000_0000: mems[1], 0x3000_0000: mm, 0x4000_0000: sm}
	fill := func(b []byte, seed byte) {
		for i := range b {
			b[i] = seed + byte(i*7+i>>13)
		}
	}
	// Read and Write of a ring mapping.
	fill(mems[0], 1)
	got := make([]byte, n-300)
	if err := d.Read(0x1000_0000+300, got); err != nil || !bytes.Equal(got, mems[0][300:]) {
		t.Fatalf("Read = %v; equal %v", err, bytes.Equal(got, mems[0][300:]))
	}
	fill(got, 9)
	if err := d.Write(0x1000_0000+1, got); err != nil || !bytes.Equal(mems[0][1:n-299], got) {
		t.Fatalf("Write = %v", err)
	}
	// Copies between every kind, unaligned, longer than a pipe.
	const off, cnt = 100, 2<<20 + 777
	for _, pair := range [][2]uint64{
		{0x2000_0000, 0x1000_0000}, {0x3000_0000, 0x1000_0000}, {0x1000_0000, 0x3000_0000},
		{0x4000_0000, 0x2000_0000}, {0x2000_0000, 0x4000_0000},
	} {
		dst, src := pair[0], pair[1]
		fill(mem[src], byte(dst>>24))
		clear(mem[dst])
		if err := cp.Copy(dst+off, src+off, cnt); err != nil {
			t.Fatalf("copy %#x <- %#x: %v", dst, src, err)
		}
		if !bytes.Equal(mem[dst][off:off+cnt], mem[src][off:off+cnt]) {
			t.Fatalf("copy %#x <- %#x: bytes differ", dst, src)
		}
		if !allZero(mem[dst][:off]) || !allZero(mem[dst][off+cnt:]) {
			t.Fatalf("copy %#x <- %#x: wrote outside the range", dst, src)
		}
	}
	for i, p := range pins {
		if k := p.socket.Load(); k != 0 {
			t.Errorf("pin %d: %d accesses over the socket, want none (the ring)", i, k)
		}
	}
	// Bounds: a range running past a ring mapping faults before anything
	// moves.
	before := bytes.Clone(mems[1])
	if err := cp.Copy(0x2000_0000+n-10, 0x1000_0000, 20); !errors.Is(err, ErrIOMMUFault) {
		t.Errorf("copy past the ring mapping: %v", err)
	}
	if err := d.Write(0x2000_0000+n-1, []byte{1, 2}); !errors.Is(err, ErrIOMMUFault) {
		t.Errorf("write past the ring mapping: %v", err)
	}
	if !bytes.Equal(mems[1], before) {
		t.Error("a refused access wrote")
	}
	// DMA_UNMAP revokes: the IOVA faults, and the server's ring is closed
	// (the leak check counts its fds).
	if err := c.DMAUnmap(0x1000_0000, n); err != nil {
		t.Fatal(err)
	}
	if err := d.Read(0x1000_0000, got[:8]); !errors.Is(err, ErrIOMMUFault) {
		t.Errorf("read after DMA_UNMAP: %v", err)
	}
	for _, mp := range maps[1:] {
		if err := c.DMAUnmap(mp.IOVA, mp.Size); err != nil {
			t.Fatal(err)
		}
	}
}

// TestDMARingOff: with device rings off on either side the pins are
// served over the socket, as before, with the same bytes.
func TestDMARingOff(t *testing.T) {
	requireProcessVM(t)
	for _, c := range []struct {
		name         string
		sopts, copts []Option
	}{{"server", []Option{WithoutDMARing()}, nil}, {"client", nil, []Option{WithoutDMARing()}}} {
		t.Run(c.name, func(t *testing.T) {
			leakCheck(t)
			pins, mems := ringPins(t, 1, 1<<16)
			cl, m, _ := newPair(t, c.sopts, c.copts)
			if err := cl.DMAMap(vfio.DMAMapping{IOVA: 0x10000, Vaddr: pins[0].Addr(), Size: 1 << 16,
				Flags: vfio.DMARead | vfio.DMAWrite, Access: pins[0]}); err != nil {
				t.Fatal(err)
			}
			if err := m.getDMA().Write(0x10010, []byte("over the socket")); err != nil {
				t.Fatal(err)
			}
			if string(mems[0][0x10:0x1f]) != "over the socket" || pins[0].socket.Load() == 0 {
				t.Fatalf("memory %q, %d socket accesses", mems[0][0x10:0x1f], pins[0].socket.Load())
			}
			if err := cl.DMAUnmap(0x10000, 1<<16); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestServerDMARingHostile: a DMA_MAP that claims a device ring gets a
// clear error unless it names, with a pidfd, a fresh device ring.
func TestServerDMARingHostile(t *testing.T) {
	leakCheck(t)
	pins, _ := ringPins(t, 1, 1<<16)
	m := newFakeModel(t)
	conn, _ := serve(t, m)
	r := newRawPeer(t, conn)
	r.handshake()
	pidfd, err := unix.PidfdOpen(os.Getpid(), 0)
	if err != nil {
		testenv.Require(t, err, "pidfd_open")
	}
	defer unix.Close(pidfd)
	ring, addr, err := pins[0].DeviceRing()
	if err != nil {
		t.Fatal(err)
	}
	defer ring.Close()
	var pfd [2]int
	if err := unix.Pipe2(pfd[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(pfd[0])
	defer unix.Close(pfd[1])
	dmaMap := func(iova uint64, ext []byte) []byte {
		return cat(le32(uint32(32+len(ext)), 3), le64(uint64(addr), iova, 1<<16), ext)
	}
	dup := func(fd int) int {
		d, err := unix.Dup(fd)
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	id := uint16(10)
	expect := func(what string, payload []byte, errno unix.Errno, fds ...int) {
		t.Helper()
		id++
		h, _, _ := r.call(id, abi.VFIO_USER_DMA_MAP, payload, fds...)
		for _, fd := range fds {
			unix.Close(fd) // ours: the server got its own copy
		}
		if errno == 0 {
			expectOK(t, h)
		} else if h.Flags&abi.VFIO_USER_F_ERROR == 0 || errno != 0xffff && unix.Errno(h.Errno) != errno {
			t.Errorf("%s: flags %#x errno %v, want errno %v", what, h.Flags, unix.Errno(h.Errno), errno)
		}
	}
	const anyErr = unix.Errno(0xffff)
	ringNum := uint32(ring.Fd())
	expect("no pidfd", dmaMap(0x10000, le32(ringNum, 0)), unix.EINVAL)
	expect("nonzero pad", dmaMap(0x10000, le32(ringNum, 1)), unix.EINVAL, dup(pidfd))
	expect("short extension", cat(le32(40, 3), le64(uint64(addr), 0x10000, 1<<16), le32(ringNum)), unix.EINVAL, dup(pidfd))
	expect("no such fd", dmaMap(0x10000, le32(1<<30, 0)), unix.EBADF, dup(pidfd))
	expect("not a ring", dmaMap(0x10000, le32(uint32(pfd[0]), 0)), unix.EINVAL, dup(pidfd))
	expect("not a pidfd", dmaMap(0x10000, le32(ringNum, 0)), anyErr, dup(pfd[1]))
	expect("the ring", dmaMap(0x10000, le32(ringNum, 0)), 0, dup(pidfd))
	expect("the same ring again", dmaMap(0x20000, le32(ringNum, 0)), anyErr, dup(pidfd))
	// The mapping works through the ring; a wrong address in a second
	// ring makes every access fail, never touch other memory.
	if err := m.getDMA().Write(0x10000, []byte("ring")); err != nil {
		t.Fatal(err)
	}
	ring2, _, err := pins[0].DeviceRing()
	if err != nil {
		t.Fatal(err)
	}
	defer ring2.Close()
	bad := cat(le32(40, 3), le64(uint64(addr)+1<<16, 0x30000, 1<<16), le32(uint32(ring2.Fd()), 0))
	expect("wrong address", bad, 0, dup(pidfd))
	if err := m.getDMA().Write(0x30000, []byte("x")); !errors.Is(err, unix.EFAULT) {
		t.Errorf("write through a ring at the wrong address: %v, want EFAULT", err)
	}
}

func allZero(b []byte) bool {
	for _, v := range b {
		if v != 0 {
			return false
		}
	}
	return true
}

// stickyRinger hands out copies of one device ring: the second server to
// get it finds it already enabled and restricted.
type stickyRinger struct {
	*countedPin
	ring *os.File
	addr uintptr
}

func (s *stickyRinger) DeviceRing() (*os.File, uintptr, error) {
	if s.ring == nil {
		f, addr, err := s.countedPin.DeviceRing()
		if err != nil {
			return nil, 0, err
		}
		s.ring, s.addr = f, addr
	}
	fd, err := unix.Dup(int(s.ring.Fd()))
	if err != nil {
		return nil, 0, err
	}
	return os.NewFile(uintptr(fd), "ring"), s.addr, nil
}

// TestDMARingRefusedFallsBack: a ring the server refuses (here one it
// already took for another mapping) leaves the mapping to the socket.
func TestDMARingRefusedFallsBack(t *testing.T) {
	requireProcessVM(t)
	leakCheck(t)
	pins, mems := ringPins(t, 1, 1<<16)
	sticky := &stickyRinger{countedPin: pins[0]}
	defer func() {
		if sticky.ring != nil {
			sticky.ring.Close()
		}
	}()
	c, m, _ := newPair(t, nil, nil)
	rw := uint32(vfio.DMARead | vfio.DMAWrite)
	for _, iova := range []uint64{0x10000, 0x20000} {
		if err := c.DMAMap(vfio.DMAMapping{IOVA: iova, Vaddr: pins[0].Addr(), Size: 1 << 16, Flags: rw, Access: sticky}); err != nil {
			t.Fatal(err)
		}
	}
	d := m.getDMA()
	if err := d.Write(0x10000, []byte("ring")); err != nil || pins[0].socket.Load() != 0 {
		t.Fatalf("first mapping: %v, %d socket accesses", err, pins[0].socket.Load())
	}
	if err := d.Write(0x20004, []byte("socket")); err != nil || pins[0].socket.Load() == 0 {
		t.Fatalf("second mapping: %v, %d socket accesses", err, pins[0].socket.Load())
	}
	if string(mems[0][:10]) != "ringsocket" {
		t.Fatalf("memory holds %q", mems[0][:10])
	}
	for _, iova := range []uint64{0x10000, 0x20000} {
		if err := c.DMAUnmap(iova, 1<<16); err != nil {
			t.Fatal(err)
		}
	}
}

// TestDMARingCopyHostile: a client that kept the fd of one of its device
// rings and empties the ring's buffer spoils the copies from and to that
// mapping only: each fails with a CopyError on that side and writes
// nothing, and copies between its other rings still move the right bytes.
func TestDMARingCopyHostile(t *testing.T) {
	requireProcessVM(t)
	leakCheck(t)
	const n = 1 << 20
	pins, mems := ringPins(t, 3, n)
	spoiled := &stickyRinger{countedPin: pins[2]}
	defer func() {
		if spoiled.ring != nil {
			spoiled.ring.Close()
		}
	}()
	c, m, _ := newPair(t, nil, nil)
	rw := uint32(vfio.DMARead | vfio.DMAWrite)
	for i, a := range []vfio.DMAAccessor{pins[0], pins[1], spoiled} {
		iova := uint64(i+1) << 28
		if err := c.DMAMap(vfio.DMAMapping{IOVA: iova, Vaddr: pins[i].Addr(), Size: n, Flags: rw, Access: a}); err != nil {
			t.Fatal(err)
		}
		defer c.DMAUnmap(iova, n)
	}
	cp := m.getDMA().(Copier)
	for i := range mems[0] {
		mems[0][i] = byte(i*5 + 1)
		mems[2][i] = byte(i*3 + 2)
	}
	if err := emptyRingBuffer(int(spoiled.ring.Fd())); err != nil {
		t.Fatal(err)
	}
	var ce *CopyError
	if err := cp.Copy(3<<28, 1<<28, n); !errors.As(err, &ce) || !ce.Dst || !errors.Is(err, unix.EFAULT) {
		t.Errorf("copy to the spoiled ring: %v, want EFAULT on the destination", err)
	}
	if err := cp.Copy(2<<28, 3<<28, n); !errors.As(err, &ce) || ce.Dst || !errors.Is(err, unix.EFAULT) {
		t.Errorf("copy from the spoiled ring: %v, want EFAULT on the source", err)
	}
	if !allZero(mems[1]) {
		t.Error("a copy from the spoiled ring wrote the destination")
	}
	for i := range mems[2] {
		if mems[2][i] != byte(i*3+2) {
			t.Fatalf("the spoiled ring's pages changed at %d", i)
		}
	}
	if err := cp.Copy(2<<28+7, 1<<28+3, n-10); err != nil || !bytes.Equal(mems[1][7:n-3], mems[0][3:n-7]) {
		t.Fatalf("copy between the sound rings after the failures: %v; equal %v", err, bytes.Equal(mems[1][7:n-3], mems[0][3:n-7]))
	}
	for i, p := range pins {
		if k := p.socket.Load(); k != 0 {
			t.Errorf("pin %d: %d accesses over the socket, want none (the ring)", i, k)
		}
	}
}
