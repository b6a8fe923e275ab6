package driver_test

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfisim"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/vfio"
	"github.com/gohfi/gohfi/vfio/vfiouser"
	"golang.org/x/sys/unix"
)

// The device-death tests run hfisim as a separate process (this test
// binary, re-executed) and kill it with SIGKILL while the driver waits for
// it. The process's model never consumes a send descriptor (it acknowledges
// the doorbell and drops it) and prints what the tests synchronise on:
//
//	listening       the socket accepts connections
//	doorbell N      context N's SQ tail was written (and dropped)
const deviceProcessEnv = "GOHFI_TEST_DEVICE_PROCESS"

// wakeLimit bounds how long a waiter may take to notice a dead device.
const wakeLimit = 2 * time.Second

// TestMain makes the test binary the device process of the device-death
// tests when they start it (deviceProcessEnv set), and runs the tests
// otherwise.
func TestMain(m *testing.M) {
	if sock := os.Getenv(deviceProcessEnv); sock != "" {
		os.Exit(serveDeviceProcess(sock))
	}
	os.Exit(m.Run())
}

func serveDeviceProcess(sock string) int {
	// An orphan does not outlive its test: stdin closes when the test ends.
	go func() {
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	cfg := hfisim.DefaultConfig()
	cfg.NumContexts = 3
	cfg.RcvArrayPerCtxt = 256
	dev, err := hfisim.New(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "device process:", err)
		return 1
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		fmt.Fprintln(os.Stderr, "device process:", err)
		return 1
	}
	fmt.Println("listening")
	err = vfiouser.NewServer(stallingModel{dev, cfg.NumContexts}).Serve(context.Background(), ln)
	fmt.Fprintln(os.Stderr, "device process:", err)
	return 1
}

// hideCtxtDBRec clears CapCtxtDBRec from a read of RegCapFlags: the driver
// then rings every SEND's doorbell in the SQTail register, which the test
// devices below drop; with records an awake engine would take SENDs from
// memory.
func hideCtxtDBRec(index uint32, off uint64, p []byte) {
	if index == chip.CSRBar && off == chip.RegCapFlags && len(p) == 8 {
		binary.LittleEndian.PutUint64(p, binary.LittleEndian.Uint64(p)&^chip.CapCtxtDBRec)
	}
}

// stallingModel is hfisim whose send engine never hears a doorbell: it
// swallows SQTail writes and hides context doorbell records, which the
// engine would read without a register write.
type stallingModel struct {
	*hfisim.Device
	ctxts int
}

func (m stallingModel) ctxtOf(index uint32, off, reg uint64) int {
	if index != chip.CSRBar {
		return -1
	}
	for n := 0; n < m.ctxts; n++ {
		if off == chip.CtxtReg(n, reg) {
			return n
		}
	}
	return -1
}

func (m stallingModel) RegionRead(index uint32, off uint64, p []byte) error {
	err := m.Device.RegionRead(index, off, p)
	hideCtxtDBRec(index, off, p)
	return err
}

func (m stallingModel) RegionWrite(index uint32, off uint64, p []byte) error {
	if n := m.ctxtOf(index, off, chip.CtxtSQTail); n >= 0 {
		fmt.Printf("doorbell %d\n", n)
		return nil
	}
	return m.Device.RegionWrite(index, off, p)
}

// deviceProcess is a running device process with the driver attached to it.
type deviceProcess struct {
	cmd   *exec.Cmd
	lines chan string
	a     *attach.Attached
}

// startDeviceProcess starts the device process and attaches the driver to
// it over vfio-user. The process is killed, if still alive, when t ends.
func startDeviceProcess(t *testing.T) *deviceProcess {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "hfi.sock")
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), deviceProcessEnv+"="+sock)
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &deviceProcess{cmd: cmd, lines: make(chan string, 1024)}
	go func() {
		defer close(p.lines)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			p.lines <- sc.Text()
		}
	}()
	t.Cleanup(func() {
		in.Close()
		cmd.Process.Kill()
		cmd.Wait()
	})
	p.await(t, "listening")
	a, err := attach.Open(context.Background(), "vfio-user:"+sock, attach.DefaultOptions())
	if err != nil {
		t.Fatal(err)
	}
	p.a = a
	t.Cleanup(func() { a.Close() })
	return p
}

// await waits for the device process to print line.
func (p *deviceProcess) await(t *testing.T, line string) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case l, ok := <-p.lines:
			if !ok {
				t.Fatalf("device process ended before printing %q", line)
			}
			if l == line {
				return
			}
		case <-timeout:
			t.Fatalf("device process did not print %q within 10 s", line)
		}
	}
}

// kill kills the device process with SIGKILL and returns when it did.
func (p *deviceProcess) kill(t *testing.T) time.Time {
	t.Helper()
	at := time.Now()
	if err := p.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	return at
}

// result is what a blocked call returned, and when.
type result struct {
	err error
	at  time.Time
}

func pollAsync(f *driver.File) chan result {
	res := make(chan result, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, err := f.Poll(ctx)
		res <- result{err, time.Now()}
	}()
	return res
}

func sendAsync(f *driver.File, dst uint16) chan result {
	res := make(chan result, 1)
	go func() {
		payload := []byte("never consumed")
		// SEND is posted; with FLAG_WAIT it waits for the device to
		// consume the descriptor, which the stopped device never does.
		s := uapi.GohfiSend{Opcode: uapi.GOHFI_SEND_EAGER, Flags: uapi.GOHFI_SEND_FLAG_WAIT, DstCtxt: dst, Tag: 9}
		err := hfiuser.Send(f, s, payload)
		res <- result{err, time.Now()}
	}()
	return res
}

// awaitENXIO waits for a blocked call to fail with ENXIO within wakeLimit
// of since, and returns how long it took.
func awaitENXIO(t *testing.T, what string, res chan result, since time.Time) time.Duration {
	t.Helper()
	select {
	case r := <-res:
		d := r.at.Sub(since)
		if !errors.Is(r.err, unix.ENXIO) {
			t.Errorf("%s returned %v after %v, want ENXIO", what, r.err, d)
		} else if d > wakeLimit {
			t.Errorf("%s returned ENXIO %v after the device died, want < %v", what, d, wakeLimit)
		}
		return d
	case <-time.After(10 * time.Second):
		t.Fatalf("%s still blocked 10 s after the device died", what)
	}
	return 0
}

// deathLatency is how long the blocked calls took to return after the
// device died.
type deathLatency struct{ poll, send time.Duration }

// killDuringWaits assigns three contexts on a device process; with poll, a
// Poll on context 0 and with send, a SEND from context 1 are waiting when
// the process is killed, and must fail with ENXIO promptly. Everything
// after that fails with ENXIO too, and closing releases everything.
func killDuringWaits(t *testing.T, poll, send bool) deathLatency {
	p := startDeviceProcess(t)
	files := make([]*driver.File, 3)
	for i := range files {
		files[i] = openFile(t, p.a)
		assign(t, files[i])
	}
	var pollRes, sendRes chan result
	if send {
		sendRes = sendAsync(files[1], 0)
		p.await(t, "doorbell 1")
	}
	if poll {
		sub := p.a.Module.Trace(256)
		pollRes = pollAsync(files[0])
		awaitPollSleep(t, sub, ctxtOf(t, files[0]))
		sub.Stop()
	}
	// The device answers in order: once this write is acknowledged, the
	// reply to the doorbell has reached the driver, so both calls wait
	// without talking to the device.
	// (RECV_CTRL writes Control and waits for it; RCVHDR_HEAD is posted.)
	if err := hfiuser.IoctlScalar(files[2], uapi.HFI1_IOCTL_RECV_CTRL, 1); err != nil {
		t.Fatalf("RECV_CTRL: %v", err)
	}
	killed := p.kill(t)
	var lat deathLatency
	if poll {
		lat.poll = awaitENXIO(t, "Poll", pollRes, killed)
	}
	if send {
		lat.send = awaitENXIO(t, "SEND", sendRes, killed)
	}
	checkDead(t, p.a, files)
	return lat
}

// checkDead checks that a dead device fails every call with ENXIO and that
// its files and the module still close.
func checkDead(t *testing.T, a *attach.Attached, files []*driver.File) {
	t.Helper()
	f := files[0]
	calls := []struct {
		name string
		call func() error
	}{
		{"ASSIGN_CTXT", func() error { return hfiuser.AssignCtxt(f) }},
		{"CTXT_INFO", func() error { _, err := hfiuser.CtxtInfo(f); return err }},
		{"USER_INFO", func() error { _, err := hfiuser.UserInfo(f); return err }},
		{"SEND", func() error {
			return hfiuser.Send(f, uapi.GohfiSend{Opcode: uapi.GOHFI_SEND_EAGER, DstCtxt: 1}, []byte("x"))
		}},
		{"RCVHDR_HEAD", func() error { return hfiuser.SetRcvHdrHead(f, 0) }},
		{"RECV_CTRL", func() error { return hfiuser.IoctlScalar(f, uapi.HFI1_IOCTL_RECV_CTRL, 1) }},
		{"TID_FREE", func() error { _, err := hfiuser.TIDFree(f, []uint32{1}); return err }},
		{"Poll", func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := f.Poll(ctx)
			return err
		}},
		{"Open", func() error { _, err := a.Device.Open(); return err }},
	}
	for _, c := range calls {
		if err := c.call(); !errors.Is(err, unix.ENXIO) {
			t.Errorf("%s on a dead device: %v, want ENXIO", c.name, err)
		}
	}
	start := time.Now()
	for i, f := range files {
		if err := f.Close(); err != nil {
			t.Errorf("close file %d: %v", i, err)
		}
	}
	if err := a.Module.Exit(); err != nil {
		t.Errorf("module exit: %v", err)
	}
	if d := time.Since(start); d > wakeLimit {
		t.Errorf("closing after the device died took %v", d)
	}
}

// TestDeviceDeathWakesPoll: a Poll waiting with a long timeout returns
// ENXIO as soon as the device process dies.
func TestDeviceDeathWakesPoll(t *testing.T) {
	lat := killDuringWaits(t, true, false)
	t.Logf("Poll woke %v after SIGKILL", lat.poll)
}

// TestDeviceDeathWakesSend: a SEND waiting for the device to consume its
// descriptor returns ENXIO as soon as the device process dies, not after
// the send timeout.
func TestDeviceDeathWakesSend(t *testing.T) {
	lat := killDuringWaits(t, false, true)
	t.Logf("SEND woke %v after SIGKILL", lat.send)
}

// TestDeviceDeathNoLeaks: killing the device under a waiting Poll and SEND,
// then closing everything, leaves no fds and no goroutines behind.
func TestDeviceDeathNoLeaks(t *testing.T) {
	cycle := func(i int) {
		t.Run(fmt.Sprintf("cycle%d", i), func(t *testing.T) {
			killDuringWaits(t, true, true)
		})
	}
	cycle(0)
	check := leakCheck(t)
	for i := 1; i <= 2; i++ {
		cycle(i)
	}
	check()
}

// removableDevice is a vfio.Device that can be surprise-removed the way a
// PCI function behind kernel VFIO is: afterwards its registers read all
// ones and writes are dropped, and nothing else tells the driver.
type removableDevice struct {
	vfio.Device
	removed atomic.Bool
}

// ReadRegion hides context doorbell records, as stallingModel does: a SEND
// rings the register, which a removed device drops.
func (r *removableDevice) ReadRegion(index uint32, off uint64, p []byte) error {
	if r.removed.Load() {
		for i := range p {
			p[i] = 0xff
		}
		return nil
	}
	err := r.Device.ReadRegion(index, off, p)
	hideCtxtDBRec(index, off, p)
	return err
}

func (r *removableDevice) WriteRegion(index uint32, off uint64, p []byte) error {
	if r.removed.Load() {
		return nil
	}
	return r.Device.WriteRegion(index, off, p)
}

func (r *removableDevice) WriteRegionPosted(index uint32, off uint64, p []byte) error {
	if r.removed.Load() {
		return nil
	}
	return r.Device.WriteRegionPosted(index, off, p)
}

// TestSurpriseRemovalAllOnes: on the kernel VFIO path a removed device only
// reads all ones. The driver notices it by itself and wakes a waiting Poll
// and SEND with ENXIO.
func TestSurpriseRemovalAllOnes(t *testing.T) {
	rd := &removableDevice{}
	a, err := openBehind(t, attach.DefaultOptions(), smallSim(2), func(d vfio.Device) vfio.Device {
		rd.Device = d
		return rd
	})
	if err != nil {
		t.Fatal(err)
	}
	files := []*driver.File{openFile(t, a), openFile(t, a)}
	for _, f := range files {
		assign(t, f)
	}
	sub := a.Module.Trace(256)
	pollRes := pollAsync(files[0])
	awaitPollSleep(t, sub, ctxtOf(t, files[0]))
	sub.Stop()
	rd.removed.Store(true)
	removed := time.Now()
	// The doorbell is dropped, so this SEND waits too, unless the driver
	// has noticed the removal already.
	sendRes := sendAsync(files[1], 0)
	lat := deathLatency{poll: awaitENXIO(t, "Poll", pollRes, removed), send: awaitENXIO(t, "SEND", sendRes, removed)}
	t.Logf("Poll woke %v and SEND %v after the removal", lat.poll, lat.send)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if _, err := files[0].Poll(ctx); !strings.Contains(fmt.Sprint(err), "all ones") {
		t.Errorf("Poll after the removal: %v, want the cause (all ones)", err)
	}
	checkDead(t, a, files)
}

// awaitPollSleep waits (bounded) until a Poll on context ctxt goes to sleep
// (trace poll_sleep): from then on it waits without talking to the device.
func awaitPollSleep(t *testing.T, sub *driver.TraceSub, ctxt uint16) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case ev := <-sub.Events():
			if ev.Kind == driver.TracePollSleep && ev.Ctxt == int(ctxt) {
				return
			}
		case <-timeout:
			t.Fatalf("no Poll of context %d went to sleep within 10 s", ctxt)
		}
	}
}
