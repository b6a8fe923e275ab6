package vfiouser

import (
	"encoding/binary"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/vfio"
	"github.com/gohfi/gohfi/vfio/abi"
)

// Doorbells of the fake device offered as ioeventfds: BAR0 0x200 (8 bytes,
// any value) and 0x208 (4 bytes, value 7) on one eventfd, 0x210 (8 bytes)
// on another.
const (
	regRing      = 0x200
	regRingMatch = 0x208
	regRing2     = 0x210
)

// ioModel is the fake model with ioeventfds, made at Attach and closed at
// Detach as a model must.
type ioModel struct {
	*fakeModel
	t      testing.TB
	ring   *os.File
	ring2  *os.File
	closed []*os.File // the eventfds of detached clients
}

// rings returns the attached client's eventfds.
func (m *ioModel) rings() (ring, ring2 *os.File) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.ring, m.ring2
}

func newIOModel(t testing.TB) *ioModel { return &ioModel{fakeModel: newFakeModel(t), t: t} }

func newEventfd(t testing.TB) *os.File {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatalf("eventfd: %v", err)
	}
	return os.NewFile(uintptr(fd), "ring")
}

func (m *ioModel) Attach(dma DMA) {
	m.mu.Lock()
	m.ring, m.ring2 = newEventfd(m.t), newEventfd(m.t)
	m.mu.Unlock()
	m.fakeModel.Attach(dma)
}

func (m *ioModel) Detach() {
	m.mu.Lock()
	m.ring.Close()
	m.ring2.Close()
	m.closed = append(m.closed, m.ring, m.ring2)
	m.mu.Unlock()
	m.fakeModel.Detach()
}

func (m *ioModel) RegionIOFDs(index uint32) ([]IOEventFD, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if index != vfio.PCIBAR0RegionIndex {
		return nil, nil
	}
	return []IOEventFD{
		{Offset: regRing2, Size: 8, File: m.ring2},
		{Offset: regRing, Size: 8, File: m.ring},
		{Offset: regRingMatch, Size: 4, DataMatch: true, Data: 7, File: m.ring},
	}, nil
}

// count reads and resets an eventfd's count (0: not signalled).
func count(t testing.TB, f *os.File) uint64 {
	t.Helper()
	var b [8]byte
	rc, err := f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	var rerr error
	if err := rc.Control(func(fd uintptr) { n, rerr = unix.Read(int(fd), b[:]) }); err != nil {
		t.Fatal(err)
	}
	if rerr == unix.EAGAIN {
		return 0
	}
	if rerr != nil || n != 8 {
		t.Fatalf("eventfd read: %d %v", n, rerr)
	}
	return binary.LittleEndian.Uint64(b[:])
}

func newIOPair(t *testing.T) (*Client, *ioModel, *served) {
	t.Helper()
	m := newIOModel(t)
	a, b := socketPair(t)
	s := &served{done: make(chan error, 1)}
	srv := NewServer(m)
	go func() { s.done <- srv.ServeConn(t.Context(), b) }()
	c, err := NewClient(a)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Close()
		s.wait(t)
	})
	return c, m, s
}

// TestIOEventFDDoorbell: a posted write the server covers with an
// ioeventfd signals it and sends no message; writes it does not cover
// (other size, other value, other offset, not posted) are messages.
func TestIOEventFDDoorbell(t *testing.T) {
	leakCheck(t)
	c, m, _ := newIOPair(t)
	bar0 := func(off uint64, n int) []byte {
		b := make([]byte, n)
		if err := c.ReadRegion(0, off, b); err != nil {
			t.Fatal(err)
		}
		return b
	}
	ring, ring2 := m.rings()
	for i := range 3 {
		if err := c.WriteRegionPosted(0, regRing, le64(0xdead+uint64(i))); err != nil {
			t.Fatal(err)
		}
	}
	if n := count(t, ring); n != 3 {
		t.Fatalf("ring count %d after 3 doorbells, want 3", n)
	}
	if v := binary.LittleEndian.Uint64(bar0(regRing, 8)); v != 0 {
		t.Fatalf("the register was written (%#x): the doorbell went as a message", v)
	}
	if err := c.WriteRegionPosted(0, regRing2, le64(1)); err != nil {
		t.Fatal(err)
	}
	if a, b := count(t, ring), count(t, ring2); a != 0 || b != 1 {
		t.Fatalf("counts %d %d, want 0 1", a, b)
	}
	// Datamatch: 7 signals, 8 is written.
	if err := c.WriteRegionPosted(0, regRingMatch, le32(7)); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteRegionPosted(0, regRingMatch, le32(8)); err != nil {
		t.Fatal(err)
	}
	if n := count(t, ring); n != 1 {
		t.Fatalf("ring count %d, want 1 (datamatch)", n)
	}
	if v := binary.LittleEndian.Uint32(bar0(regRingMatch, 4)); v != 8 {
		t.Fatalf("register %#x, want 8 written as a message", v)
	}
	// Another size, and a write that waits, are messages.
	if err := c.WriteRegionPosted(0, regRing, le32(5)); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteRegion(0, regRing+4, le32(6)); err != nil {
		t.Fatal(err)
	}
	if v := binary.LittleEndian.Uint64(bar0(regRing, 8)); v != 6<<32|5 {
		t.Fatalf("register %#x, want both halves written", v)
	}
	if n := count(t, ring); n != 0 {
		t.Fatalf("ring count %d after writes not covered", n)
	}
}

// TestIOEventFDNone: a server whose model offers none answers with no
// sub-regions, and the client's doorbells are messages.
func TestIOEventFDNone(t *testing.T) {
	leakCheck(t)
	c, _, _ := newPair(t, nil, nil)
	if err := c.WriteRegionPosted(0, regRing, le64(9)); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 8)
	if err := c.ReadRegion(0, regRing, b); err != nil {
		t.Fatal(err)
	}
	if v := binary.LittleEndian.Uint64(b); v != 9 {
		t.Fatalf("register %#x, want 9", v)
	}
}

// TestIOEventFDServerRequests: the server's answers to raw requests: bad
// requests are refused, an argsz too small gets the size needed and no fd,
// a good one the sub-regions with one fd per eventfd. The fds die with the
// session.
func TestIOEventFDServerRequests(t *testing.T) {
	leakCheck(t)
	m := newIOModel(t)
	a, b := socketPair(t)
	done := make(chan error, 1)
	go func() { done <- NewServer(m).ServeConn(t.Context(), b) }()
	r := newRawPeer(t, a)
	r.handshake()
	const cmd = abi.VFIO_USER_DEVICE_GET_REGION_IO_FDS
	for _, bad := range [][]byte{
		le32(8, 0, 0, 0),   // argsz below the request
		le32(16, 1, 0, 0),  // flags
		le32(16, 0, 0, 3),  // count
		le32(16, 0, 99, 0), // index
		le32(16, 0, 0),     // short
	} {
		h, _, fds := r.call(1, cmd, bad)
		closeFDs(fds)
		expectErrno(t, h, unix.EINVAL)
	}
	const full = 16 + 3*40
	h, p, fds := r.call(2, cmd, le32(16, 0, 0, 0))
	expectOK(t, h)
	if len(fds) != 0 || len(p) != 16 || binary.LittleEndian.Uint32(p) != full || binary.LittleEndian.Uint32(p[12:]) != 3 {
		t.Fatalf("small argsz: reply %x with %d fds", p, len(fds))
	}
	h, p, fds = r.call(3, cmd, le32(full, 0, 0, 0))
	expectOK(t, h)
	if len(fds) != 2 || len(p) != full {
		t.Fatalf("reply of %d bytes with %d fds", len(p), len(fds))
	}
	subs, _ := abi.DecodeSlice[abi.VFIOUserSubRegionIOEventFD](p[16:], 3)
	want := []abi.VFIOUserSubRegionIOEventFD{
		{Offset: regRing2, Size: 8, FDIndex: 0},
		{Offset: regRing, Size: 8, FDIndex: 1},
		{Offset: regRingMatch, Size: 4, FDIndex: 1, Flags: abi.KVM_IOEVENTFD_FLAG_DATAMATCH, Datamatch: 7},
	}
	for i := range want {
		if subs[i] != want[i] {
			t.Errorf("sub-region %d: %+v, want %+v", i, subs[i], want[i])
		}
	}
	// The fds are the model's eventfds: a signal on ours reaches it.
	ring, _ := m.rings()
	if _, err := unix.Write(fds[1], le64(1)); err != nil {
		t.Fatal(err)
	}
	if n := count(t, ring); n != 1 {
		t.Fatalf("model's ring count %d", n)
	}
	// Other regions have none.
	h, p, fds2 := r.call(4, cmd, le32(full, 0, 2, 0))
	expectOK(t, h)
	if len(fds2) != 0 || len(p) != 16 || binary.LittleEndian.Uint32(p[12:]) != 0 {
		t.Fatalf("region 2: %x with %d fds", p, len(fds2))
	}
	a.Close()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// Detached: the model closed its eventfds; ours signal nothing.
	m.mu.Lock()
	closed := len(m.closed)
	m.mu.Unlock()
	if closed != 2 {
		t.Fatalf("%d eventfds closed at detach", closed)
	}
	closeFDs(fds)
}

// TestClientHostileIOFDs: a GET_REGION_IO_FDS reply that lies is a
// protocol error, its fds are closed, and nothing is used.
func TestClientHostileIOFDs(t *testing.T) {
	leakCheck(t)
	c, srv := scripted(t, WithTimeout(time.Second))
	efd := newEventfd(t)
	defer efd.Close()
	p0, p1, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer p0.Close()
	defer p1.Close()
	ev, pipe := int(efd.Fd()), int(p1.Fd())
	before := countFDs(t)
	sub := func(off, size uint64, fdIndex, typ, flags uint32, data uint64) []byte {
		b := make([]byte, abi.SizeofVFIOUserSubRegionIOEventFD)
		abi.Encode(b, &abi.VFIOUserSubRegionIOEventFD{Offset: off, Size: size, FDIndex: fdIndex, Type: typ, Flags: flags, Datamatch: data})
		return b
	}
	reply := func(index, count uint32, subs ...[]byte) []byte {
		return cat(le32(16+40*count, 0, index, count), cat(subs...))
	}
	cases := []struct {
		name string
		p    []byte
		fds  []int
	}{
		{"outside region", reply(0, 1, sub(fakeBAR0Size-4, 8, 0, 0, 0, 0)), []int{ev}},
		{"offset wraps", reply(0, 1, sub(^uint64(0)-3, 8, 0, 0, 0, 0)), []int{ev}},
		{"size 3", reply(0, 1, sub(0, 3, 0, 0, 0, 0)), []int{ev}},
		{"size 0", reply(0, 1, sub(0, 0, 0, 0, 0, 0)), []int{ev}},
		{"fd index", reply(0, 1, sub(0, 8, 1, 0, 0, 0)), []int{ev}},
		{"no fds", reply(0, 1, sub(0, 8, 0, 0, 0, 0)), nil},
		{"unknown flags", reply(0, 1, sub(0, 8, 0, 0, 8, 0)), []int{ev}},
		{"datamatch too wide", reply(0, 1, sub(0, 4, 0, 0, abi.KVM_IOEVENTFD_FLAG_DATAMATCH, 1<<32)), []int{ev}},
		{"not an eventfd", reply(0, 1, sub(0, 8, 0, 0, 0, 0)), []int{pipe}},
		{"other index", reply(2, 1, sub(0, 8, 0, 0, 0, 0)), []int{ev}},
		{"argsz vs count", cat(le32(16+40, 0, 0, 2), sub(0, 8, 0, 0, 0, 0)), []int{ev}},
		{"fds without sub-regions", reply(0, 0), []int{ev}},
		{"bigger with fds", le32(16+40*1000, 0, 0, 1000), []int{ev}},
	}
	for _, tc := range cases {
		_, _, err := func() ([]ioEventFD, []int, error) {
			var subs []ioEventFD
			var fds []int
			err := answer(t, srv, func() error {
				var err error
				subs, fds, err = c.getRegionIOFDs(0, fakeBAR0Size)
				return err
			}, func(h header, p []byte) ([]byte, []int) {
				return msg(h.MsgID, h.Cmd, abi.VFIO_USER_F_TYPE_REPLY, tc.p), tc.fds
			})
			return subs, fds, err
		}()
		if !isErrno(err, unix.EPROTO) {
			t.Errorf("%s: %v", tc.name, err)
		}
	}
	if after := countFDs(t); after != before {
		t.Fatalf("fds %d -> %d", before, after)
	}
	// ioregionfd and PIO sub-regions are left out, their fds closed; an
	// error reply means none.
	var subs []ioEventFD
	var fds []int
	err = answer(t, srv, func() error {
		var err error
		subs, fds, err = c.getRegionIOFDs(0, fakeBAR0Size)
		return err
	}, func(h header, p []byte) ([]byte, []int) {
		return msg(h.MsgID, h.Cmd, abi.VFIO_USER_F_TYPE_REPLY, reply(0, 3,
			sub(0x10, 8, 0, abi.VFIO_USER_IO_FD_TYPE_IOREGIONFD, 0, 0),
			sub(0x18, 8, 0, 0, abi.KVM_IOEVENTFD_FLAG_PIO, 0),
			sub(0x20, 4, 1, 0, 0, 0))), []int{pipe, ev}
	})
	if err != nil || len(subs) != 1 || subs[0].off != 0x20 || len(fds) != 1 {
		t.Fatalf("mixed reply: %+v %v %v", subs, fds, err)
	}
	closeFDs(fds)
	if after := countFDs(t); after != before {
		t.Fatalf("fds %d -> %d", before, after)
	}
	err = answer(t, srv, func() error {
		subs, _, err := c.getRegionIOFDs(0, fakeBAR0Size)
		if subs != nil {
			t.Error("sub-regions from an error reply")
		}
		return err
	}, func(h header, p []byte) ([]byte, []int) {
		return msg(h.MsgID, h.Cmd, abi.VFIO_USER_F_TYPE_REPLY|abi.VFIO_USER_F_ERROR, nil), nil
	})
	if err != nil {
		t.Fatalf("error reply: %v", err)
	}
}
