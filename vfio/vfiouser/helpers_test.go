package vfiouser

import (
	"context"
	"encoding/binary"
	"errors"
	"github.com/gohfi/gohfi/internal/testenv"
	"net"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/vfio/abi"
)

// socketPair returns two connected unix stream sockets as *net.UnixConn.
func socketPair(t testing.TB) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("socketpair: %v", err)
	}
	conv := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatalf("FileConn: %v", err)
		}
		return c.(*net.UnixConn)
	}
	return conv(fds[0]), conv(fds[1])
}

// countFDs counts this process's open file descriptors.
func countFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatalf("reading /proc/self/fd: %v", err)
	}
	return len(ents)
}

// leakCheck records fds and goroutines now and checks at cleanup (which
// runs after cleanups registered later) that they came back.
func leakCheck(t testing.TB) {
	t.Helper()
	fds := countFDs(t)
	gs := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(2 * time.Second)
		for {
			nf, ng := countFDs(t), runtime.NumGoroutine()
			if nf <= fds && ng <= gs {
				return
			}
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<16)
				buf = buf[:runtime.Stack(buf, true)]
				t.Errorf("leak: fds %d -> %d, goroutines %d -> %d\n%s", fds, nf, gs, ng, buf)
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

// served is a server serving one connection in the background.
type served struct {
	model *fakeModel
	done  chan error
}

func (s *served) wait(t testing.TB) error {
	t.Helper()
	select {
	case err := <-s.done:
		s.done <- err
		return err
	case <-time.After(5 * time.Second):
		t.Fatalf("ServeConn did not return")
		return nil
	}
}

// serve starts a server for model on a socketpair; it returns the client
// end, raw.
func serve(t testing.TB, model *fakeModel, opts ...Option) (*net.UnixConn, *served) {
	t.Helper()
	a, b := socketPair(t)
	s := &served{model: model, done: make(chan error, 1)}
	srv := NewServer(model, opts...)
	ctx, cancel := context.WithCancel(context.Background())
	go func() { s.done <- srv.ServeConn(ctx, b) }()
	t.Cleanup(func() {
		cancel()
		a.Close()
		s.wait(t)
	})
	return a, s
}

// newPair returns a client connected to a server for a new fake model.
func newPair(t testing.TB, sopts, copts []Option) (*Client, *fakeModel, *served) {
	t.Helper()
	m := newFakeModel(t)
	conn, s := serve(t, m, sopts...)
	c, err := NewClient(conn, copts...)
	if err != nil {
		t.Fatalf("NewClient: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c, m, s
}

// rawPeer speaks raw messages on one end of a connection.
type rawPeer struct {
	t    testing.TB
	conn *net.UnixConn
	sk   *sock
	buf  []byte
}

func newRawPeer(t testing.TB, conn *net.UnixConn, opts ...Option) *rawPeer {
	o := buildOptions(append([]Option{WithMaxMsgFDs(maxFDsLimit), WithMaxDataXferSize(64 << 20)}, opts...))
	sk, err := newSock(conn, &o)
	if err != nil {
		t.Fatal(err)
	}
	return &rawPeer{t: t, conn: conn, sk: sk}
}

func msg(id, cmd uint16, flags uint32, payload []byte) []byte {
	b := make([]byte, headerSize+len(payload))
	h := header{MsgID: id, Cmd: cmd, Size: uint32(len(b)), Flags: flags}
	abi.Encode(b, &h)
	copy(b[headerSize:], payload)
	return b
}

func (r *rawPeer) send(b []byte, fds ...int) {
	r.t.Helper()
	if err := r.sk.send(b, fds); err != nil {
		r.t.Fatalf("raw send: %v", err)
	}
}

// recv reads one message (fds are closed unless keep).
func (r *rawPeer) recv() (header, []byte, []int, error) {
	r.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	h, p, fds, err := r.sk.readMsg(nil)
	return h, append([]byte(nil), p...), fds, err
}

// call sends a command and returns the reply, failing the test on a
// transport error.
func (r *rawPeer) call(id, cmd uint16, payload []byte, fds ...int) (header, []byte, []int) {
	r.t.Helper()
	r.send(msg(id, cmd, 0, payload), fds...)
	h, p, rfds, err := r.recv()
	if err != nil {
		r.t.Fatalf("raw recv after %s: %v", cmdName(cmd), err)
	}
	if h.MsgID != id || h.Cmd != cmd || !isReply(h) {
		r.t.Fatalf("reply %+v to %s id %d", h, cmdName(cmd), id)
	}
	return h, p, rfds
}

// expectErrno checks a reply is an error reply with errno.
func expectErrno(t testing.TB, h header, errno unix.Errno) {
	t.Helper()
	if h.Flags&abi.VFIO_USER_F_ERROR == 0 || unix.Errno(h.Errno) != errno {
		t.Fatalf("reply %+v: want error %v, got errno %v", h, errno, unix.Errno(h.Errno))
	}
}

func expectOK(t testing.TB, h header) {
	t.Helper()
	if h.Flags&abi.VFIO_USER_F_ERROR != 0 {
		t.Fatalf("reply %+v: error %v", h, unix.Errno(h.Errno))
	}
}

// versionPayload is a VERSION proposal like QEMU's.
func versionPayload(js string) []byte {
	b := make([]byte, abi.SizeofVFIOUserVersion+len(js)+1)
	copy(b[abi.SizeofVFIOUserVersion:], js)
	return b
}

const qemuVersionJSON = `{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"migration":{"pgsize":4096,"max_bitmap_size":1048576},"write_multiple":true}}`

// handshake does VERSION on a raw client.
func (r *rawPeer) handshake() {
	r.t.Helper()
	h, _, _ := r.call(1, abi.VFIO_USER_VERSION, versionPayload(qemuVersionJSON))
	expectOK(r.t, h)
}

func le32(v ...uint32) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], x)
	}
	return b
}

func le64(v ...uint64) []byte {
	b := make([]byte, 8*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint64(b[8*i:], x)
	}
	return b
}

func cat(parts ...[]byte) []byte {
	var b []byte
	for _, p := range parts {
		b = append(b, p...)
	}
	return b
}

func isErrno(err error, e unix.Errno) bool { return errors.Is(err, e) }

func mustContain(t testing.TB, err error, s string) {
	t.Helper()
	if err == nil || !strings.Contains(err.Error(), s) {
		t.Fatalf("error %v does not mention %q", err, s)
	}
}

// anonMem maps n bytes of anonymous memory, unmapped at cleanup (unless
// the test did it first).
func anonMem(t testing.TB, n int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatalf("mmap: %v", err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

// memfdMem returns a memfd of n bytes and the test's shared mapping of it.
func memfdMem(t testing.TB, n int) (*os.File, []byte) {
	t.Helper()
	fd, err := unix.MemfdCreate("dma", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatalf("memfd_create: %v", err)
	}
	if err := unix.Ftruncate(fd, int64(n)); err != nil {
		t.Fatal(err)
	}
	b, err := unix.Mmap(fd, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "dma")
	t.Cleanup(func() { unix.Munmap(b); f.Close() })
	return f, b
}

// requireProcessVM skips (or fails under CI) where process_vm_readv is
// not allowed (seccomp), since DMA without fds relies on it.
func requireProcessVM(t testing.TB) {
	t.Helper()
	src := []byte{1}
	dst := []byte{0}
	local := []unix.Iovec{{Base: &dst[0]}}
	local[0].SetLen(1)
	remote := []unix.RemoteIovec{{Base: addrOf(src), Len: 1}}
	_, err := unix.ProcessVMReadv(os.Getpid(), local, remote, 0)
	testenv.Require(t, err, "process_vm_readv on our own pid")
	if dst[0] != 1 {
		t.Fatal("process_vm_readv on our own pid read nothing")
	}
}
