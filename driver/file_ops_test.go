package driver_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

func openDev(t testing.TB, ctxts int) *attach.Attached {
	t.Helper()
	if a := openEnvDevice(t, ctxts); a != nil {
		return a
	}
	return openEmbedded(t, embeddedOptions(ctxts))
}

// embeddedOptions are openDev's options for an embedded device of ctxts
// contexts.
func embeddedOptions(ctxts int) attach.Options {
	o := attach.DefaultOptions()
	o.Sim.NumContexts = ctxts
	o.Sim.RcvArrayPerCtxt = 2048
	return o
}

// openEmbedded opens an embedded device with o and closes it when t ends.
func openEmbedded(t testing.TB, o attach.Options) *attach.Attached {
	t.Helper()
	a, err := attach.Open(context.Background(), "embedded", o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := a.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return a
}

func openFile(t testing.TB, a *attach.Attached) *driver.File {
	t.Helper()
	f, err := a.Device.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// ioctl passes a Go struct (in C layout) as the user argument.
func ioctl[T any, P interface {
	*T
	uapi.Marshallable
}](f *driver.File, cmd uint32, m P) error {
	return hfiuser.Ioctl(f, cmd, m)
}

func assign(t testing.TB, f *driver.File) {
	t.Helper()
	ui := uapi.Hfi1UserInfo{Userversion: uapi.HFI1_USER_SWVERSION}
	if err := ioctl(f, uapi.HFI1_IOCTL_ASSIGN_CTXT, &ui); err != nil {
		t.Fatalf("ASSIGN_CTXT: %v", err)
	}
}

func TestProbeReadsDevice(t *testing.T) {
	a := openDev(t, 4)
	i := a.Device.Info()
	if i.VendorID != chip.PCIVendorID || i.NumContexts != 4 || i.RcvArrayPerCtxt != 2048 || i.MaxTIDPages != 512 {
		t.Fatalf("info %+v", i)
	}
	if i.IRQMode != "msix" {
		t.Fatalf("irq mode %q, want msix", i.IRQMode)
	}
}

func TestGetVersAndBadIoctls(t *testing.T) {
	a := openDev(t, 2)
	f := openFile(t, a)
	var v [4]byte
	if _, err := f.Ioctl(uapi.HFI1_IOCTL_GET_VERS, argOf(v[:])); err != nil {
		t.Fatal(err)
	}
	if got := uint32(v[0]) | uint32(v[1])<<8 | uint32(v[2])<<16 | uint32(v[3])<<24; got != uapi.HFI1_USER_SWVERSION {
		t.Fatalf("version %#x", got)
	}
	if _, err := f.Ioctl(uapi.HFI1_IOCTL_GET_VERS, driver.UserAddr(8)); !errors.Is(err, unix.EFAULT) {
		t.Fatalf("bad pointer: %v, want EFAULT", err)
	}
	if _, err := f.Ioctl(0x1234, driver.UserPtr{}); !errors.Is(err, unix.ENOTTY) {
		t.Fatalf("unknown command: %v, want ENOTTY", err)
	}
	var ci uapi.Hfi1CtxtInfo
	if err := ioctl(f, uapi.HFI1_IOCTL_CTXT_INFO, &ci); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("CTXT_INFO without context: %v, want EINVAL", err)
	}
	ui := uapi.Hfi1UserInfo{Userversion: 5 << uapi.HFI1_SWMAJOR_SHIFT}
	if err := ioctl(f, uapi.HFI1_IOCTL_ASSIGN_CTXT, &ui); !errors.Is(err, unix.ENODEV) {
		t.Fatalf("old user version: %v, want ENODEV", err)
	}
	ui = uapi.Hfi1UserInfo{Userversion: uapi.HFI1_USER_SWVERSION, SubctxtCnt: 2}
	if err := ioctl(f, uapi.HFI1_IOCTL_ASSIGN_CTXT, &ui); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("subcontexts: %v, want EINVAL", err)
	}
}

func TestAssignCtxtInfoAndMmap(t *testing.T) {
	a := openDev(t, 2)
	f := openFile(t, a)
	assign(t, f)
	ui := uapi.Hfi1UserInfo{Userversion: uapi.HFI1_USER_SWVERSION}
	if err := ioctl(f, uapi.HFI1_IOCTL_ASSIGN_CTXT, &ui); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("second ASSIGN_CTXT: %v, want EINVAL", err)
	}
	var ci uapi.Hfi1CtxtInfo
	if err := ioctl(f, uapi.HFI1_IOCTL_CTXT_INFO, &ci); err != nil {
		t.Fatal(err)
	}
	p := a.Module.Params()
	if ci.Rcvtids != 2048 || int(ci.RcvhdrqCnt) != p.RcvHdrCnt || ci.RcvhdrqEntsize != uapi.SizeofGohfiRHQEntry || int(ci.RcvegrSize) != p.EagerBufferSize {
		t.Fatalf("ctxt info %+v", ci)
	}
	var bi uapi.Hfi1BaseInfo
	if err := ioctl(f, uapi.HFI1_IOCTL_USER_INFO, &bi); err != nil {
		t.Fatal(err)
	}
	if bi.SwVersion != uapi.HFI1_USER_SWVERSION || bi.RcvhdrBufbase == 0 || bi.EventsBufbase == 0 {
		t.Fatalf("base info %+v", bi)
	}
	if _, err := f.Mmap(bi.EventsBufbase, 4096, unix.PROT_READ|unix.PROT_WRITE); !errors.Is(err, unix.EPERM) {
		t.Fatalf("writable events mapping: %v, want EPERM", err)
	}
	if _, err := f.Mmap(bi.EventsBufbase+1, 4096, unix.PROT_READ); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("bad token: %v, want EINVAL", err)
	}
	m, err := f.Mmap(bi.RcvhdrBufbase, p.RcvHdrCnt*uapi.SizeofGohfiRHQEntry, unix.PROT_READ)
	if err != nil {
		t.Fatal(err)
	}
	unix.Munmap(m)
	if _, err := f.Ioctl(uapi.HFI1_IOCTL_CTXT_RESET, driver.UserPtr{}); err != nil {
		t.Fatalf("CTXT_RESET: %v", err)
	}
}

func TestContextsExhaustedAndReleased(t *testing.T) {
	a := openDev(t, 3)
	var files []*driver.File
	for i := 0; i < 3; i++ {
		f := openFile(t, a)
		assign(t, f)
		files = append(files, f)
	}
	extra := openFile(t, a)
	ui := uapi.Hfi1UserInfo{Userversion: uapi.HFI1_USER_SWVERSION}
	if err := ioctl(extra, uapi.HFI1_IOCTL_ASSIGN_CTXT, &ui); !errors.Is(err, unix.EBUSY) {
		t.Fatalf("fourth context: %v, want EBUSY", err)
	}
	if err := files[1].Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := files[1].Ioctl(uapi.HFI1_IOCTL_GET_VERS, driver.UserPtr{}); !errors.Is(err, unix.EBADF) {
		t.Fatalf("ioctl after close: %v, want EBADF", err)
	}
	assign(t, extra)
	var ci uapi.Hfi1CtxtInfo
	if err := ioctl(extra, uapi.HFI1_IOCTL_CTXT_INFO, &ci); err != nil || ci.Ctxt != 1 {
		t.Fatalf("reused context %d (%v), want 1", ci.Ctxt, err)
	}
}

// TestEagerSendAndPoll: context 0 sends to context 1, which polls, reads the
// header queue entry and the eager buffer through its mappings.
func TestEagerSendAndPoll(t *testing.T) {
	a := openDev(t, 2)
	tx, rx := openFile(t, a), openFile(t, a)
	assign(t, tx)
	assign(t, rx)
	var bi uapi.Hfi1BaseInfo
	if err := ioctl(rx, uapi.HFI1_IOCTL_USER_INFO, &bi); err != nil {
		t.Fatal(err)
	}
	p := a.Module.Params()
	rhq, err := rx.Mmap(bi.RcvhdrBufbase, p.RcvHdrCnt*uapi.SizeofGohfiRHQEntry, unix.PROT_READ)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(rhq)
	eager, err := rx.Mmap(bi.RcvegrBufbase, p.RcvHdrCnt*p.EagerBufferSize, unix.PROT_READ)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(eager)

	payload := bytes.Repeat([]byte{0xa5, 0x5a, 1, 2}, 1000)
	s := uapi.GohfiSend{Opcode: uapi.GOHFI_SEND_EAGER, DstCtxt: 1, Length: uint32(len(payload)), Vaddr: uint64(uintptrOf(payload)), Tag: 77}
	if err := ioctl(tx, uapi.GOHFI_IOCTL_SEND, &s); err != nil {
		t.Fatalf("SEND: %v", err)
	}
	runtime.KeepAlive(payload)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ev, err := rx.Poll(ctx)
	if err != nil || ev&driver.POLLIN == 0 {
		t.Fatalf("poll: %#x %v", ev, err)
	}
	var e uapi.GohfiRHQEntry
	if err := e.UnmarshalBytes(rhq); err != nil {
		t.Fatal(err)
	}
	if e.Type != uapi.GOHFI_RHF_EAGER || e.Tag != 77 || int(e.Length) != len(payload) || e.Seq != 1 {
		t.Fatalf("entry %+v", e)
	}
	if !bytes.Equal(eager[:len(payload)], payload) {
		t.Fatal("eager data differs")
	}
	head := []byte{1, 0, 0, 0, 0, 0, 0, 0}
	if _, err := rx.Ioctl(uapi.GOHFI_IOCTL_RCVHDR_HEAD, argOf(head)); err != nil {
		t.Fatal(err)
	}
	ctx2, cancel2 := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel2()
	if ev, err := rx.Poll(ctx2); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("poll after consuming: %#x %v, want timeout", ev, err)
	}
	bad := uapi.GohfiSend{Opcode: uapi.GOHFI_SEND_EAGER, DstCtxt: 9, Length: 4, Vaddr: uint64(uintptrOf(payload))}
	if err := ioctl(tx, uapi.GOHFI_IOCTL_SEND, &bad); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("send to context 9: %v, want EINVAL", err)
	}
	bad = uapi.GohfiSend{Opcode: uapi.GOHFI_SEND_EAGER, DstCtxt: 1, Length: 4, Vaddr: 16}
	if err := ioctl(tx, uapi.GOHFI_IOCTL_SEND, &bad); !errors.Is(err, unix.EFAULT) {
		t.Fatalf("send from bad pointer: %v, want EFAULT", err)
	}
}

func countFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestNoLeaks: a full attach/open/assign/close/detach cycle leaves no fds
// and no goroutines behind.
func TestNoLeaks(t *testing.T) {
	cycle := func() {
		o := attach.DefaultOptions()
		o.Sim.NumContexts = 2
		a, err := attach.Open(context.Background(), "embedded", o)
		if err != nil {
			t.Fatal(err)
		}
		f, _ := a.Device.Open()
		assign(t, f)
		f.Close()
		g, _ := a.Device.Open()
		assign(t, g) // left open: Exit must release it
		if err := a.Close(); err != nil {
			t.Fatal(err)
		}
	}
	cycle()
	check := leakCheck(t)
	for i := 0; i < 3; i++ {
		cycle()
	}
	check()
}

// leakCheck records the open fds and goroutines; the function it returns
// fails t if there are more of either.
func leakCheck(t *testing.T) func() {
	fds, gs := countFDs(t), runtime.NumGoroutine()
	return func() {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for runtime.NumGoroutine() > gs && time.Now().Before(deadline) {
			runtime.Gosched() // goroutines of a closed client may still be returning
		}
		if got := countFDs(t); got != fds {
			t.Fatalf("fds %d -> %d", fds, got)
		}
		if got := runtime.NumGoroutine(); got > gs {
			buf := make([]byte, 1<<16)
			t.Fatalf("goroutines %d -> %d\n%s", gs, got, buf[:runtime.Stack(buf, true)])
		}
	}
}

// TestDeviceDisconnect: when the device goes away, calls fail with ENXIO
// promptly and close still works.
func TestDeviceDisconnect(t *testing.T) {
	a := openDev(t, 2)
	f := openFile(t, a)
	assign(t, f)
	a.Sim.Stop()
	var ci uapi.Hfi1CtxtInfo
	ioctl(f, uapi.HFI1_IOCTL_CTXT_INFO, &ci) // served from driver state
	done := make(chan error, 1)
	go func() { _, err := f.Ioctl(uapi.HFI1_IOCTL_CTXT_RESET, driver.UserPtr{}); done <- err }()
	select {
	case err := <-done:
		if !errors.Is(err, unix.ENXIO) {
			t.Fatalf("CTXT_RESET on a gone device: %v, want ENXIO", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ioctl hung on a gone device")
	}
	if _, err := a.Device.Open(); !errors.Is(err, unix.ENXIO) {
		t.Fatalf("open of a gone device: %v, want ENXIO", err)
	}
}
