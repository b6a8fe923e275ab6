package vfiouser

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/vfio"
	"github.com/gohfi/gohfi/vfio/abi"
)

// --- A hostile client against the server. ---

func TestServerFramingSizeTooSmall(t *testing.T) {
	leakCheck(t)
	m := newFakeModel(t)
	conn, s := serve(t, m)
	r := newRawPeer(t, conn)
	r.handshake()
	b := msg(2, abi.VFIO_USER_DEVICE_RESET, 0, nil)
	binary.LittleEndian.PutUint32(b[4:], 8)
	r.send(b)
	if _, _, _, err := r.recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("server kept the connection after size 8: %v", err)
	}
	if err := s.wait(t); err == nil {
		t.Fatalf("ServeConn returned nil for a framing error")
	}
	if _, d, _ := m.counts(); d != 1 {
		t.Fatalf("detached %d times", d)
	}
}

func TestServerFramingSizeHuge(t *testing.T) {
	leakCheck(t)
	m := newFakeModel(t)
	conn, s := serve(t, m)
	r := newRawPeer(t, conn)
	r.handshake()
	b := msg(2, abi.VFIO_USER_REGION_WRITE, 0, nil)
	binary.LittleEndian.PutUint32(b[4:], 0xffffffff)
	r.send(b)
	h, _, _, err := r.recv()
	if err != nil {
		t.Fatalf("no error reply: %v", err)
	}
	expectErrno(t, h, unix.E2BIG)
	if _, _, _, err := r.recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("connection kept: %v", err)
	}
	s.wait(t)
}

func TestServerTruncatedHeader(t *testing.T) {
	leakCheck(t)
	m := newFakeModel(t)
	conn, s := serve(t, m)
	r := newRawPeer(t, conn)
	r.handshake()
	r.send(msg(2, abi.VFIO_USER_DEVICE_RESET, 0, nil)[:8])
	conn.CloseWrite()
	if err := s.wait(t); err != nil {
		t.Fatalf("ServeConn: %v", err)
	}
	if _, d, r := m.counts(); d != 1 || r != 0 {
		t.Fatalf("detached %d, resets %d", d, r)
	}
}

func TestServerClientVanishesMidMessage(t *testing.T) {
	leakCheck(t)
	m := newFakeModel(t)
	conn, s := serve(t, m)
	r := newRawPeer(t, conn)
	r.handshake()
	mem := anonMem(t, 4096)
	_ = mem
	b := msg(2, abi.VFIO_USER_REGION_WRITE, 0, cat(le64(0), le32(0, 100), make([]byte, 100)))
	r.send(b[:40])
	conn.Close()
	if err := s.wait(t); err != nil {
		t.Fatalf("ServeConn: %v", err)
	}
	if _, d, _ := m.counts(); d != 1 {
		t.Fatalf("detached %d", d)
	}
}

func TestServerBadCommands(t *testing.T) {
	leakCheck(t)
	m := newFakeModel(t)
	conn, _ := serve(t, m, WithMaxDataXferSize(4096), WithMaxDMAMaps(2))
	r := newRawPeer(t, conn)
	r.handshake()
	id := uint16(10)
	expect := func(cmd uint16, payload []byte, errno unix.Errno) {
		t.Helper()
		id++
		h, _, fds := r.call(id, cmd, payload)
		closeFDs(fds)
		if errno == 0 {
			expectOK(t, h)
		} else {
			expectErrno(t, h, errno)
		}
	}
	expect(99, nil, unix.ENOSYS)
	expect(14, nil, unix.ENOSYS)
	expect(abi.VFIO_USER_DEVICE_FEATURE, le32(8, 1<<16|1), unix.ENOTTY)
	expect(abi.VFIO_USER_DMA_READ, le64(0, 8), unix.ENOSYS) // wrong direction

	// Short payloads of every command that has one.
	for _, cmd := range []uint16{abi.VFIO_USER_DMA_MAP, abi.VFIO_USER_DMA_UNMAP, abi.VFIO_USER_DEVICE_GET_INFO, abi.VFIO_USER_DEVICE_GET_REGION_INFO, abi.VFIO_USER_DEVICE_GET_REGION_IO_FDS,
		abi.VFIO_USER_DEVICE_GET_IRQ_INFO, abi.VFIO_USER_DEVICE_SET_IRQS, abi.VFIO_USER_REGION_READ, abi.VFIO_USER_REGION_WRITE, abi.VFIO_USER_REGION_WRITE_MULTI} {
		expect(cmd, []byte{1, 2, 3}, unix.EINVAL)
	}
	expect(abi.VFIO_USER_DEVICE_GET_INFO, le32(8, 0, 0, 0), unix.EINVAL) // argsz too small
	expect(abi.VFIO_USER_DEVICE_GET_INFO, le32(16, 0, 0, 0), 0)
	expect(abi.VFIO_USER_DEVICE_GET_IRQ_INFO, le32(16, 0, 99, 0), unix.EINVAL)
	expect(abi.VFIO_USER_DEVICE_GET_REGION_INFO, cat(le32(32, 0, 99, 0), le64(0, 0)), unix.EINVAL)
	expect(abi.VFIO_USER_DEVICE_GET_REGION_IO_FDS, le32(16, 0, 0, 0), 0)
	expect(abi.VFIO_USER_DEVICE_GET_REGION_IO_FDS, le32(16, 0, 99, 0), unix.EINVAL)

	// Region accesses.
	expect(abi.VFIO_USER_REGION_READ, cat(le64(0), le32(0, 0)), unix.EINVAL)     // count 0
	expect(abi.VFIO_USER_REGION_READ, cat(le64(0), le32(0, 8192)), unix.E2BIG)   // above max_data_xfer_size
	expect(abi.VFIO_USER_REGION_READ, cat(le64(0), le32(99, 4)), unix.EINVAL)    // region
	expect(abi.VFIO_USER_REGION_READ, cat(le64(1<<62), le32(0, 4)), unix.EINVAL) // the model's check
	expect(abi.VFIO_USER_REGION_WRITE, cat(le64(0), le32(0, 8), []byte{1, 2}), unix.EINVAL)
	expect(abi.VFIO_USER_REGION_WRITE, cat(le64(0), le32(0, 2), []byte{1, 2, 3}), unix.EINVAL)
	expect(abi.VFIO_USER_REGION_WRITE_MULTI, le64(0), unix.EINVAL)
	expect(abi.VFIO_USER_REGION_WRITE_MULTI, le64(1000), unix.EINVAL)
	expect(abi.VFIO_USER_REGION_WRITE_MULTI, cat(le64(1), le64(0), le32(0, 9), le64(0)), unix.EINVAL) // 9 > 8 bytes
	expect(abi.VFIO_USER_REGION_WRITE_MULTI, cat(le64(2), le64(0x10), le32(0, 4), le64(0xaabbccdd), le64(0x20), le32(0, 2), le64(0x1122)), 0)
	m.mu.Lock()
	if binary.LittleEndian.Uint32(m.bar0[0x10:]) != 0xaabbccdd || binary.LittleEndian.Uint16(m.bar0[0x20:]) != 0x1122 {
		t.Errorf("REGION_WRITE_MULTI not applied")
	}
	m.mu.Unlock()

	// SET_IRQS.
	trig := uint32(abi.VFIO_IRQ_SET_DATA_NONE | abi.VFIO_IRQ_SET_ACTION_TRIGGER)
	expect(abi.VFIO_USER_DEVICE_SET_IRQS, le32(20, abi.VFIO_IRQ_SET_DATA_NONE|abi.VFIO_IRQ_SET_DATA_BOOL|abi.VFIO_IRQ_SET_ACTION_TRIGGER, 2, 0, 1), unix.EINVAL)
	expect(abi.VFIO_USER_DEVICE_SET_IRQS, le32(20, abi.VFIO_IRQ_SET_DATA_NONE, 2, 0, 1), unix.EINVAL)                              // no action
	expect(abi.VFIO_USER_DEVICE_SET_IRQS, le32(20, trig, 99, 0, 0), unix.EINVAL)                                                   // index
	expect(abi.VFIO_USER_DEVICE_SET_IRQS, le32(20, trig, 2, 3, 2), unix.EINVAL)                                                    // vectors 3+2 of 4
	expect(abi.VFIO_USER_DEVICE_SET_IRQS, le32(20, trig, 2, 0xffffffff, 2), unix.EINVAL)                                           // wraps
	expect(abi.VFIO_USER_DEVICE_SET_IRQS, le32(20, trig, 2, 0, 1), unix.ENOTSUP)                                                   // loopback trigger
	expect(abi.VFIO_USER_DEVICE_SET_IRQS, le32(20, abi.VFIO_IRQ_SET_DATA_BOOL|abi.VFIO_IRQ_SET_ACTION_MASK, 0, 0, 1), unix.EINVAL) // bool without data
	expect(abi.VFIO_USER_DEVICE_SET_IRQS, append(le32(21, abi.VFIO_IRQ_SET_DATA_BOOL|abi.VFIO_IRQ_SET_ACTION_MASK, 0, 0, 1), 1), 0)
	expect(abi.VFIO_USER_DEVICE_SET_IRQS, le32(20, abi.VFIO_IRQ_SET_DATA_NONE|abi.VFIO_IRQ_SET_ACTION_UNMASK, 0, 0, 1), 0)
	expect(abi.VFIO_USER_DEVICE_SET_IRQS, le32(20, trig, 2, 0, 0), 0) // disable all

	// DMA_MAP / DMA_UNMAP.
	expect(abi.VFIO_USER_DMA_MAP, cat(le32(32, 0), le64(0, 0x1000, 0x1000)), unix.EINVAL)        // no permission
	expect(abi.VFIO_USER_DMA_MAP, cat(le32(32, 1|8), le64(0, 0x1000, 0x1000)), unix.EINVAL)      // unknown flag
	expect(abi.VFIO_USER_DMA_MAP, cat(le32(32, 3), le64(0, 0x1000, 0)), unix.EINVAL)             // size 0
	expect(abi.VFIO_USER_DMA_MAP, cat(le32(32, 3), le64(0, ^uint64(0)-10, 0x1000)), unix.EINVAL) // wraps
	expect(abi.VFIO_USER_DMA_MAP, cat(le32(32, 3), le64(0, 0x1000, 0x1000)), 0)                  //
	expect(abi.VFIO_USER_DMA_MAP, cat(le32(32, 3), le64(0, 0x1800, 0x1000)), unix.EEXIST)        // overlap
	expect(abi.VFIO_USER_DMA_MAP, cat(le32(32, 3), le64(0, 0x0800, 0x1000)), unix.EEXIST)        // overlap
	expect(abi.VFIO_USER_DMA_MAP, cat(le32(32, 3), le64(0, 0x2000, 0x1000)), 0)                  // adjacent
	expect(abi.VFIO_USER_DMA_MAP, cat(le32(32, 3), le64(0, 0x9000, 0x1000)), unix.ENOSPC)        // max_dma_maps 2
	expect(abi.VFIO_USER_DMA_UNMAP, cat(le32(24, abi.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP), le64(0x1000, 0x1000)), unix.ENOTSUP)
	expect(abi.VFIO_USER_DMA_UNMAP, cat(le32(24, 0x10), le64(0x1000, 0x1000)), unix.EINVAL)
	expect(abi.VFIO_USER_DMA_UNMAP, cat(le32(24, 0), le64(0x1000, 0)), unix.EINVAL)
	expect(abi.VFIO_USER_DMA_UNMAP, cat(le32(24, 0), le64(0x1800, 0x1000)), unix.EINVAL) // cuts
	expect(abi.VFIO_USER_DMA_UNMAP, cat(le32(24, abi.VFIO_DMA_UNMAP_FLAG_ALL), le64(0, 0)), 0)
	expect(abi.VFIO_USER_DMA_MAP, cat(le32(32, 3), le64(0, 0x9000, 0x1000)), 0) // room again

	// A message type that is neither command nor reply.
	id++
	r.send(msg(id, abi.VFIO_USER_DEVICE_RESET, 2, nil))
	h, _, _, err := r.recv()
	if err != nil {
		t.Fatal(err)
	}
	expectErrno(t, h, unix.EINVAL)

	// A reply to a DMA request the server never sent is ignored.
	r.send(msg(4242, abi.VFIO_USER_DMA_READ, abi.VFIO_USER_F_TYPE_REPLY, le64(0, 0)))
	expect(abi.VFIO_USER_DEVICE_GET_INFO, le32(16, 0, 0, 0), 0)
}

func TestServerPostedWrites(t *testing.T) {
	leakCheck(t)
	m := newFakeModel(t)
	conn, _ := serve(t, m)
	r := newRawPeer(t, conn)
	r.handshake()
	// Posted writes get no reply, even when they fail; a later read sees
	// them in order.
	for i := range 10 {
		r.send(msg(uint16(100+i), abi.VFIO_USER_REGION_WRITE, abi.VFIO_USER_F_NO_REPLY, cat(le64(uint64(4*i)), le32(0, 4), le32(uint32(i+1)))))
	}
	r.send(msg(200, abi.VFIO_USER_REGION_WRITE, abi.VFIO_USER_F_NO_REPLY, cat(le64(1<<40), le32(0, 4), le32(1)))) // fails silently
	h, p, _ := r.call(201, abi.VFIO_USER_REGION_READ, cat(le64(36), le32(0, 4)))
	expectOK(t, h)
	if v := binary.LittleEndian.Uint32(p[16:]); v != 10 {
		t.Fatalf("read %d after posted writes", v)
	}
}

func TestServerTooManyFDs(t *testing.T) {
	leakCheck(t)
	m := newFakeModel(t)
	conn, _ := serve(t, m, WithMaxMsgFDs(2))
	r := newRawPeer(t, conn)
	r.handshake()
	var efds []int
	for range 3 {
		fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
		if err != nil {
			t.Fatal(err)
		}
		efds = append(efds, fd)
	}
	defer closeFDs(efds)
	before := countFDs(t)
	evt := uint32(abi.VFIO_IRQ_SET_DATA_EVENTFD | abi.VFIO_IRQ_SET_ACTION_TRIGGER)
	h, _, _ := r.call(2, abi.VFIO_USER_DEVICE_SET_IRQS, le32(20, evt, 2, 0, 3), efds...)
	expectErrno(t, h, unix.EINVAL)
	h, _, _ = r.call(3, abi.VFIO_USER_DEVICE_SET_IRQS, le32(20, evt, 2, 0, 2), efds[0]) // count 2, 1 fd
	expectErrno(t, h, unix.EINVAL)
	h, _, _ = r.call(4, abi.VFIO_USER_REGION_READ, cat(le64(0), le32(0, 4)), efds[0]) // fd with a command that takes none
	expectErrno(t, h, unix.EINVAL)
	h, _, _ = r.call(5, abi.VFIO_USER_DEVICE_SET_IRQS, le32(20, abi.VFIO_IRQ_SET_DATA_NONE|abi.VFIO_IRQ_SET_ACTION_TRIGGER, 2, 0, 0), efds[0])
	expectErrno(t, h, unix.EINVAL)
	h, _, _ = r.call(6, abi.VFIO_USER_DEVICE_SET_IRQS, le32(20, evt|0, 2, 0, 1), efds[1])
	expectOK(t, h)
	h, _, _ = r.call(7, abi.VFIO_USER_DEVICE_SET_IRQS, le32(20, abi.VFIO_IRQ_SET_DATA_EVENTFD|abi.VFIO_IRQ_SET_ACTION_MASK, 2, 0, 1), efds[1])
	expectErrno(t, h, unix.ENOTSUP)
	h, _, _ = r.call(8, abi.VFIO_USER_DEVICE_SET_IRQS, le32(20, abi.VFIO_IRQ_SET_DATA_NONE|abi.VFIO_IRQ_SET_ACTION_TRIGGER, 2, 0, 0))
	expectOK(t, h)
	if after := countFDs(t); after != before {
		t.Fatalf("fds %d -> %d", before, after)
	}
}

func TestServerDMAMapBadFD(t *testing.T) {
	leakCheck(t)
	m := newFakeModel(t)
	conn, _ := serve(t, m)
	r := newRawPeer(t, conn)
	r.handshake()
	f, _ := memfdMem(t, 8192)
	fd := int(f.Fd())
	before := countFDs(t)
	cases := []struct {
		payload []byte
		fds     []int
		errno   unix.Errno
	}{
		{cat(le32(32, 3), le64(100, 0x1000, 0x1000)), []int{fd}, unix.EINVAL}, // unaligned offset
		{cat(le32(32, 3), le64(4096, 0x1000, 8192)), []int{fd}, unix.EINVAL},  // beyond the file
		{cat(le32(32, 3), le64(^uint64(0)&^4095, 0x1000, 8192)), []int{fd}, unix.EINVAL},
		{cat(le32(32, 3), le64(0, 0x1000, 4096)), []int{fd, fd}, unix.EINVAL}, // two fds
		{cat(le32(32, 3), le64(0)), []int{fd}, unix.EINVAL},                   // short
		{cat(le32(32, 3), le64(0, 0x1000, 8192)), []int{fd}, 0},
		{cat(le32(32, 3), le64(0, 0x1000, 8192)), []int{fd}, unix.EEXIST},
	}
	for i, c := range cases {
		h, _, _ := r.call(uint16(10+i), abi.VFIO_USER_DMA_MAP, c.payload, c.fds...)
		if c.errno == 0 {
			expectOK(t, h)
		} else {
			expectErrno(t, h, c.errno)
		}
	}
	// The server closed every fd it got (the good map's after mmap).
	if after := countFDs(t); after != before {
		t.Fatalf("fds %d -> %d", before, after)
	}
	// The client shrinks the file under the server's mapping: device
	// accesses fail instead of killing the server with SIGBUS.
	if err := unix.Ftruncate(fd, 0); err != nil {
		t.Fatal(err)
	}
	dma := m.getDMA()
	if err := dma.Read(0x1000+4096, make([]byte, 8)); !isErrno(err, unix.EFAULT) {
		t.Fatalf("read of truncated mapping: %v", err)
	}
	if err := dma.Write(0x1000, make([]byte, 8)); !isErrno(err, unix.EFAULT) {
		t.Fatalf("write of truncated mapping: %v", err)
	}
}

// --- A hostile server against the client. ---

// scripted returns a client whose server is the test: the handshake is
// answered properly, the rest is up to the test.
func scripted(t *testing.T, copts ...Option) (*Client, *rawPeer) {
	t.Helper()
	a, b := socketPair(t)
	srv := newRawPeer(t, b)
	t.Cleanup(func() { b.Close() })
	type res struct {
		c   *Client
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := NewClient(a, copts...)
		ch <- res{c, err}
	}()
	h, _, _, err := srv.recv()
	if err != nil || h.Cmd != abi.VFIO_USER_VERSION {
		t.Fatalf("handshake: %+v %v", h, err)
	}
	srv.send(msg(h.MsgID, abi.VFIO_USER_VERSION, abi.VFIO_USER_F_TYPE_REPLY, versionPayload(`{"capabilities":{"max_msg_fds":4}}`)))
	h, _, _, err = srv.recv()
	if err != nil || h.Cmd != abi.VFIO_USER_DEVICE_GET_INFO {
		t.Fatalf("handshake: %+v %v", h, err)
	}
	srv.send(msg(h.MsgID, abi.VFIO_USER_DEVICE_GET_INFO, abi.VFIO_USER_F_TYPE_REPLY, le32(16, vfio.DeviceFlagsPCI, vfio.PCINumRegions, vfio.PCINumIRQs)))
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	t.Cleanup(func() { r.c.Close() })
	return r.c, srv
}

// answer runs call in the background, reads its request and sends the
// reply reply(request header) returns; it returns call's error.
func answer(t *testing.T, srv *rawPeer, call func() error, reply func(h header, p []byte) ([]byte, []int)) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- call() }()
	h, p, fds, err := srv.recv()
	closeFDs(fds)
	if err != nil {
		t.Fatalf("script: %v", err)
	}
	b, rfds := reply(h, p)
	if b != nil {
		srv.send(b, rfds...)
	}
	select {
	case err := <-done:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("client call hung")
		return nil
	}
}

func TestClientHostileReplies(t *testing.T) {
	leakCheck(t)
	c, srv := scripted(t, WithTimeout(300*time.Millisecond), WithMaxMsgFDs(1))
	read4 := func() error { return c.ReadRegion(0, 8, make([]byte, 4)) }

	// A reply with the wrong id is ignored; the right one still counts.
	err := answer(t, srv, read4, func(h header, p []byte) ([]byte, []int) {
		srv.send(msg(h.MsgID+1, h.Cmd, abi.VFIO_USER_F_TYPE_REPLY, cat(p, le32(7))))
		return msg(h.MsgID, h.Cmd, abi.VFIO_USER_F_TYPE_REPLY, cat(p, le32(7))), nil
	})
	if err != nil {
		t.Fatalf("after a wrong id: %v", err)
	}
	// Wrong command in the reply.
	err = answer(t, srv, read4, func(h header, p []byte) ([]byte, []int) {
		return msg(h.MsgID, abi.VFIO_USER_REGION_WRITE, abi.VFIO_USER_F_TYPE_REPLY, cat(p, le32(7))), nil
	})
	if !isErrno(err, unix.EPROTO) {
		t.Fatalf("wrong command: %v", err)
	}
	// Wrong sizes and fields.
	for i, bad := range []func(p []byte) []byte{
		func(p []byte) []byte { return p },                                 // no data
		func(p []byte) []byte { return cat(p, le64(1)) },                   // too much data
		func(p []byte) []byte { return cat(le64(0), le32(0, 4), le32(1)) }, // another offset
		func(p []byte) []byte { return cat(le64(8), le32(1, 4), le32(1)) }, // another region
		func(p []byte) []byte { return cat(le64(8), le32(0, 3), le32(1)) }, // another count
		func(p []byte) []byte { return p[:5] },                             // truncated
	} {
		err = answer(t, srv, read4, func(h header, p []byte) ([]byte, []int) {
			return msg(h.MsgID, h.Cmd, abi.VFIO_USER_F_TYPE_REPLY, bad(p)), nil
		})
		if !isErrno(err, unix.EPROTO) && !isErrno(err, unix.EINVAL) {
			t.Fatalf("bad REGION_READ reply %d: %v", i, err)
		}
	}
	// Error reply without errno.
	err = answer(t, srv, read4, func(h header, p []byte) ([]byte, []int) {
		return msg(h.MsgID, h.Cmd, abi.VFIO_USER_F_TYPE_REPLY|abi.VFIO_USER_F_ERROR, nil), nil
	})
	if !isErrno(err, unix.EIO) {
		t.Fatalf("error without errno: %v", err)
	}
	// Too many fds with a reply: refused, and closed.
	fd1, _ := unix.Eventfd(0, unix.EFD_CLOEXEC)
	fd2, _ := unix.Eventfd(0, unix.EFD_CLOEXEC)
	defer unix.Close(fd1)
	defer unix.Close(fd2)
	before := countFDs(t)
	err = answer(t, srv, read4, func(h header, p []byte) ([]byte, []int) {
		return msg(h.MsgID, h.Cmd, abi.VFIO_USER_F_TYPE_REPLY, cat(p, le32(7))), []int{fd1, fd2}
	})
	if err == nil {
		t.Fatalf("reply with 2 fds accepted")
	}
	// An fd with a reply that takes none.
	err = answer(t, srv, c.Reset, func(h header, p []byte) ([]byte, []int) {
		return msg(h.MsgID, h.Cmd, abi.VFIO_USER_F_TYPE_REPLY, nil), []int{fd1}
	})
	if !isErrno(err, unix.EPROTO) {
		t.Fatalf("reset reply with fd: %v", err)
	}
	if after := countFDs(t); after != before {
		t.Fatalf("fds %d -> %d", before, after)
	}
	// No reply at all: the call times out, the client stays usable.
	err = answer(t, srv, read4, func(h header, p []byte) ([]byte, []int) { return nil, nil })
	if !isErrno(err, unix.ETIMEDOUT) {
		t.Fatalf("no reply: %v", err)
	}
	err = answer(t, srv, c.Reset, func(h header, p []byte) ([]byte, []int) {
		return msg(h.MsgID, h.Cmd, abi.VFIO_USER_F_TYPE_REPLY, nil), nil
	})
	if err != nil {
		t.Fatalf("after a timeout: %v", err)
	}
}

func TestClientHostileRegionInfo(t *testing.T) {
	leakCheck(t)
	c, srv := scripted(t, WithTimeout(time.Second))
	memfd, _ := memfdMem(t, 4096)
	mfd := int(memfd.Fd())
	before := countFDs(t)
	ri := func(flags, capOff uint32, size, off uint64) []byte {
		r := abi.VFIORegionInfo{Argsz: abi.SizeofVFIORegionInfo, Flags: flags, Index: 2, CapOffset: capOff, Size: size, Offset: off}
		b := make([]byte, abi.SizeofVFIORegionInfo)
		abi.Encode(b, &r)
		return b
	}
	withArgsz := func(b []byte, argsz uint32) []byte { binary.LittleEndian.PutUint32(b, argsz); return b }
	sparse := func(next uint32, areas ...uint64) []byte {
		b := cat(le32(abi.VFIO_REGION_INFO_CAP_SPARSE_MMAP|capSparseMmapVersion<<16, next, uint32(len(areas)/2), 0), le64(areas...))
		return b
	}
	mmapCaps := uint32(vfio.RegionFlagRead | vfio.RegionFlagMmap | vfio.RegionFlagCaps)
	cases := []struct {
		name string
		p    []byte
		fds  []int
	}{
		{"offset+size overflow", ri(vfio.RegionFlagRead, 0, 1<<63, 1<<63), nil},
		{"other index", func() []byte { b := ri(1, 0, 4096, 0); b[8] = 3; return b }(), nil},
		{"argsz below struct", withArgsz(ri(1, 0, 4096, 0), 8), nil},
		{"longer than asked", withArgsz(cat(ri(1, 0, 4096, 0), make([]byte, 4096)), 32+4096), nil},
		{"mmap without fd", ri(vfio.RegionFlagMmap, 0, 4096, 0), nil},
		{"two fds", ri(vfio.RegionFlagMmap, 0, 4096, 0), []int{mfd, mfd}},
		{"cap offset inside struct", withArgsz(cat(ri(mmapCaps, 8, 8192, 0), sparse(0, 0, 4096)), 64), []int{mfd}},
		{"cap offset beyond", withArgsz(cat(ri(mmapCaps, 200, 8192, 0), sparse(0, 0, 4096)), 64), []int{mfd}},
		{"area outside region", withArgsz(cat(ri(mmapCaps, 32, 8192, 0), sparse(0, 4096, 8192)), 64), []int{mfd}},
		{"area wraps", withArgsz(cat(ri(mmapCaps, 32, 8192, 0), sparse(0, ^uint64(0), 2)), 64), []int{mfd}},
		{"too many areas", withArgsz(cat(ri(mmapCaps, 32, 8192, 0), le32(abi.VFIO_REGION_INFO_CAP_SPARSE_MMAP|1<<16, 0, 1000, 0)), 48), []int{mfd}},
		{"cap loop", withArgsz(cat(ri(mmapCaps, 32, 8192, 0), sparse(32, 0, 4096)), 64), []int{mfd}},
		{"wants absurd argsz", withArgsz(ri(1, 0, 4096, 0), 1<<30), nil},
	}
	for _, tc := range cases {
		// Each case asks a region not yet cached; the index is always 2
		// and the client caches nothing on failure.
		err := answer(t, srv, func() error { _, err := c.RegionInfo(2); return err }, func(h header, p []byte) ([]byte, []int) {
			return msg(h.MsgID, h.Cmd, abi.VFIO_USER_F_TYPE_REPLY, tc.p), tc.fds
		})
		if !isErrno(err, unix.EPROTO) {
			t.Errorf("%s: %v", tc.name, err)
		}
	}
	if after := countFDs(t); after != before {
		t.Fatalf("fds %d -> %d", before, after)
	}
	// A good one, after a "too small" round.
	err := answer(t, srv, func() error {
		info, err := c.RegionInfo(2)
		if err == nil && (len(info.Sparse) != 1 || info.Sparse[0].Offset != 4096) {
			return errors.New("wrong sparse areas")
		}
		return err
	}, func(h header, p []byte) ([]byte, []int) {
		// Asked with enough room already (the client starts generous).
		return msg(h.MsgID, h.Cmd, abi.VFIO_USER_F_TYPE_REPLY, withArgsz(cat(ri(mmapCaps, 32, 8192, 0), sparse(0, 4096, 4096)), 64)), []int{mfd}
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestClientServerVanishes(t *testing.T) {
	leakCheck(t)
	c, srv := scripted(t) // default 5 s timeout: the disconnect must beat it
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- c.Reset() }()
	if _, _, _, err := srv.recv(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-c.Done():
		t.Fatal("Done closed while the server is up")
	default:
	}
	srv.conn.Close()
	select {
	case err := <-done:
		if !errors.Is(err, vfio.ErrDisconnected) {
			t.Fatalf("pending call: %v", err)
		}
		if d := time.Since(start); d > time.Second {
			t.Fatalf("took %v", d)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("pending call hung after the server vanished")
	}
	select {
	case <-c.Done(): // tells the owner without a call of its own
	case <-time.After(3 * time.Second):
		t.Fatal("Done not closed after the server vanished")
	}
	if err := c.Reset(); !errors.Is(err, vfio.ErrDisconnected) {
		t.Fatalf("later call: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("Close after disconnect: %v", err)
	}
}

func TestClientServerBreaksFraming(t *testing.T) {
	leakCheck(t)
	c, srv := scripted(t)
	b := msg(1, abi.VFIO_USER_DMA_READ, 0, nil)
	binary.LittleEndian.PutUint32(b[4:], 3)
	srv.send(b)
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := c.dead()
		if errors.Is(err, vfio.ErrDisconnected) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("client still up after a framing error: %v", err)
		}
		time.Sleep(time.Millisecond)
	}
	if err := c.Reset(); !errors.Is(err, vfio.ErrDisconnected) {
		t.Fatalf("call: %v", err)
	}
}

func TestClientHostileVersion(t *testing.T) {
	leakCheck(t)
	for _, tc := range []struct {
		name  string
		reply []byte
		errno unix.Errno
	}{
		{"bad JSON", versionPayload(`{"capabilities":[`), unix.EPROTO},
		{"major 1", le32(1), unix.ENOTSUP},
		{"minor 3", le32(3 << 16), unix.ENOTSUP},
		{"short", []byte{0}, unix.EPROTO},
		{"zero xfer", versionPayload(`{"capabilities":{"max_data_xfer_size":0}}`), unix.EPROTO},
	} {
		a, b := socketPair(t)
		srv := newRawPeer(t, b)
		ch := make(chan error, 1)
		go func() {
			c, err := NewClient(a, WithTimeout(time.Second))
			if err == nil {
				c.Close()
			}
			ch <- err
		}()
		h, _, _, err := srv.recv()
		if err != nil {
			t.Fatal(err)
		}
		srv.send(msg(h.MsgID, abi.VFIO_USER_VERSION, abi.VFIO_USER_F_TYPE_REPLY, tc.reply))
		if err := <-ch; !isErrno(err, tc.errno) {
			t.Errorf("%s: %v", tc.name, err)
		}
		b.Close()
	}
}

func TestClientServesHostileDMA(t *testing.T) {
	requireProcessVM(t)
	leakCheck(t)
	c, srv := scripted(t, WithMaxDataXferSize(4096))
	mem := anonMem(t, 4096)
	copy(mem, "abcdefgh")
	err := answer(t, srv, func() error {
		return c.DMAMap(vfio.DMAMapping{IOVA: 0x1000, Vaddr: addrOf(mem), Size: 4096, Flags: vfio.DMARead})
	}, func(h header, p []byte) ([]byte, []int) {
		return msg(h.MsgID, h.Cmd, abi.VFIO_USER_F_TYPE_REPLY, nil), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	ask := func(id, cmd uint16, payload []byte) (header, []byte) {
		t.Helper()
		h, p, _ := srv.call(id, cmd, payload)
		return h, p
	}
	h, p := ask(1, abi.VFIO_USER_DMA_READ, le64(0x1000+2, 4))
	expectOK(t, h)
	if string(p[16:]) != "cdef" || binary.LittleEndian.Uint64(p) != 0x1002 {
		t.Fatalf("DMA_READ reply % x", p)
	}
	h, _ = ask(2, abi.VFIO_USER_DMA_READ, le64(0x5000, 4)) // not mapped
	expectErrno(t, h, unix.EFAULT)
	h, _ = ask(3, abi.VFIO_USER_DMA_READ, le64(0x1ffe, 4)) // past the end
	expectErrno(t, h, unix.EFAULT)
	h, _ = ask(4, abi.VFIO_USER_DMA_WRITE, cat(le64(0x1000, 2), []byte{1, 2})) // read-only mapping
	expectErrno(t, h, unix.EFAULT)
	h, _ = ask(5, abi.VFIO_USER_DMA_WRITE, cat(le64(0x1000, 5), []byte{1, 2})) // count mismatch
	expectErrno(t, h, unix.EINVAL)
	h, _ = ask(6, abi.VFIO_USER_DMA_READ, le64(0x1000, 1<<40)) // absurd count
	expectErrno(t, h, unix.E2BIG)
	h, _ = ask(7, abi.VFIO_USER_DMA_READ, []byte{1})
	expectErrno(t, h, unix.EINVAL)
	h, _ = ask(8, abi.VFIO_USER_DEVICE_RESET, nil) // not a server-to-client command
	expectErrno(t, h, unix.ENOSYS)
	h, _ = ask(9, abi.VFIO_USER_DMA_READ, le64(^uint64(0)-1, 4)) // wraps
	expectErrno(t, h, unix.EFAULT)
	if mem[0] != 'a' {
		t.Fatalf("memory changed")
	}
}

var _ = net.ErrClosed

// The buffered reader must give each message the fds sent with it, also
// when several messages arrive in one read.
func TestServerFDAttributionPipelined(t *testing.T) {
	leakCheck(t)
	m := newFakeModel(t)
	conn, _ := serve(t, m)
	r := newRawPeer(t, conn)
	r.handshake()
	f, _ := memfdMem(t, 4*4096)
	fd := int(f.Fd())
	before := countFDs(t)
	// Queue everything before the server reads: posted write, map with fd,
	// posted write, map with fd, map without fd, a read.
	r.send(msg(10, abi.VFIO_USER_REGION_WRITE, abi.VFIO_USER_F_NO_REPLY, cat(le64(0), le32(0, 4), le32(1))))
	r.send(msg(11, abi.VFIO_USER_DMA_MAP, 0, cat(le32(32, 3), le64(0, 0x10000, 4096))), fd)
	r.send(msg(12, abi.VFIO_USER_REGION_WRITE, abi.VFIO_USER_F_NO_REPLY, cat(le64(4), le32(0, 4), le32(2))))
	r.send(msg(13, abi.VFIO_USER_DMA_MAP, 0, cat(le32(32, 3), le64(4096, 0x20000, 4096))), fd)
	r.send(msg(14, abi.VFIO_USER_DMA_MAP, 0, cat(le32(32, 3), le64(0, 0x30000, 4096))))
	r.send(msg(15, abi.VFIO_USER_REGION_READ, 0, cat(le64(0), le32(0, 8))))
	for _, id := range []uint16{11, 13, 14, 15} {
		h, p, fds, err := r.recv()
		if err != nil || h.MsgID != id || len(fds) != 0 {
			t.Fatalf("reply %+v fds %v err %v, want id %d", h, fds, err, id)
		}
		expectOK(t, h)
		if id == 15 && (binary.LittleEndian.Uint32(p[16:]) != 1 || binary.LittleEndian.Uint32(p[20:]) != 2) {
			t.Fatalf("posted writes lost: % x", p[16:])
		}
	}
	tbl := m.getDMA().(*iommu)
	tbl.mu.RLock()
	withFD := 0
	for _, x := range tbl.maps {
		if x.mem != nil {
			withFD++
		}
	}
	tbl.mu.RUnlock()
	if withFD != 2 || tbl.count() != 3 {
		t.Fatalf("%d mappings, %d with fd", tbl.count(), withFD)
	}
	// fds sent in the middle of a message belong to no message start in
	// their read, or to the message whose start they follow: either way
	// they are closed, never kept or given to the wrong command.
	b := msg(16, abi.VFIO_USER_REGION_READ, 0, cat(le64(0), le32(0, 8)))
	r.send(b[:10])
	r.send(b[10:], fd)
	h, _, _, err := r.recv()
	if err != nil || h.MsgID != 16 {
		t.Fatalf("reply %+v %v", h, err)
	}
	if h.Flags&abi.VFIO_USER_F_ERROR != 0 {
		expectErrno(t, h, unix.EINVAL)
	}
	r.call(17, abi.VFIO_USER_DMA_UNMAP, cat(le32(24, abi.VFIO_DMA_UNMAP_FLAG_ALL), le64(0, 0)))
	if after := countFDs(t); after != before {
		t.Fatalf("fds %d -> %d", before, after)
	}
}

// A client that floods posted writes meets the queue budget: the reader
// waits for the handler, nothing is lost.
func TestServerQueueBudget(t *testing.T) {
	leakCheck(t)
	m := newFakeModel(t)
	a, b := socketPair(t)
	srv := NewServer(m)
	srv.opts.queueBudget = 16 << 10
	done := make(chan error, 1)
	go func() { done <- srv.ServeConn(context.Background(), b) }()
	r := newRawPeer(t, a)
	r.handshake()
	data := make([]byte, 2048)
	for i := range 200 {
		binary.LittleEndian.PutUint32(data, uint32(i))
		r.send(msg(uint16(10+i), abi.VFIO_USER_REGION_WRITE, abi.VFIO_USER_F_NO_REPLY, cat(le64(0), le32(0, uint32(len(data))), data)))
	}
	h, p, _ := r.call(500, abi.VFIO_USER_REGION_READ, cat(le64(0), le32(0, 4)))
	expectOK(t, h)
	if v := binary.LittleEndian.Uint32(p[16:]); v != 199 {
		t.Fatalf("last posted write %d, want 199", v)
	}
	a.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ServeConn hung")
	}
}
