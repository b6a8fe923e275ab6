// Package rxe tests gohfi against the Linux kernel's soft-RoCE
// (rdma_rxe): the QEMU guest of test/qemu, its eth0 on a tap device in a
// network namespace the test makes, rdma-core's ibv_rc_pingpong in the
// guest (Debian trixie's, fetched by tools/vmimage) and hfictl pingpong
// with an embedded hfisim whose port is the tap's address on the host.
package rxe

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/internal/ctest"
	"github.com/gohfi/gohfi/internal/testenv"
	"github.com/gohfi/gohfi/test/qemu"
	"github.com/gohfi/gohfi/test/rxe/guest"
	"github.com/gohfi/gohfi/tools/vmimage/vmimage"
)

const ctlPort = 18600

// hfictlTimeout bounds hfictl's exchange and each of its waits for a
// completion: a message takes at most 150 ms here (1 MiB under TCG), and
// a case that fails should not hold the matrix up for long.
const hfictlTimeout = "15s"

// netns is the namespace with the tap device.
type netns struct {
	name, tap   string
	host, guest netip.Prefix
}

func run(t testing.TB, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
}

// tapNamespace makes a namespace with a tap device (QEMU's end) at
// 10.203.P.1/24, the guest to be 10.203.P.2, removed when t ends.
func tapNamespace(t *testing.T) netns {
	testenv.RequireRoot(t, "network namespaces and tap devices")
	if _, err := exec.LookPath("ip"); err != nil {
		testenv.Require(t, fmt.Errorf("iproute2: %w", unix.ENOENT), "the ip command")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		testenv.Require(t, err, "/dev/net/tun")
	}
	id := os.Getpid() % 250
	n := netns{name: fmt.Sprintf("gohfi-rxe%d", os.Getpid()), tap: fmt.Sprintf("grxe%d", os.Getpid()%100000),
		host:  netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 203, byte(id), 1}), 24),
		guest: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 203, byte(id), 2}), 24)}
	run(t, "ip", "netns", "add", n.name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", n.name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", n.name, err, out)
		}
	})
	run(t, "ip", "-n", n.name, "tuntap", "add", "dev", n.tap, "mode", "tap")
	run(t, "ip", "-n", n.name, "addr", "add", n.host.String(), "dev", n.tap)
	run(t, "ip", "-n", n.name, "link", "set", n.tap, "up")
	run(t, "ip", "-n", n.name, "link", "set", "lo", "up")
	return n
}

// inNamespace runs f on the calling goroutine with its thread in n's
// network namespace: sockets f opens and processes it starts live there
// (the runtime starts new threads from a clean template thread while one
// is locked, so nothing else lands in the namespace). The thread goes
// back to its own namespace afterwards, also when f calls t.Fatal; if it
// cannot, it stays locked and ends with the goroutine.
func inNamespace(t *testing.T, n netns, f func()) {
	t.Helper()
	runtime.LockOSThread()
	orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatal(err)
	}
	target, err := unix.Open("/var/run/netns/"+n.name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err == nil {
		err = unix.Setns(target, unix.CLONE_NEWNET)
		_ = unix.Close(target) // joined or not: nothing to lose
	}
	if err != nil {
		_ = unix.Close(orig) // never used
		runtime.UnlockOSThread()
		t.Fatalf("setns %s: %v", n.name, err)
	}
	defer func() {
		err := unix.Setns(orig, unix.CLONE_NEWNET)
		_ = unix.Close(orig) // read-only namespace handle
		if err != nil {
			t.Errorf("setns back from %s: %v (the thread stays locked)", n.name, err)
			return
		}
		runtime.UnlockOSThread()
	}()
	f()
}

func hfictlBinary(t *testing.T) string {
	bin := filepath.Join(t.TempDir(), "hfictl")
	out, err := exec.Command(filepath.Join(runtime.GOROOT(), "bin", "go"), "build", "-o", bin,
		"github.com/gohfi/gohfi/tools/hfictl").CombinedOutput()
	if err != nil {
		t.Fatalf("go build hfictl: %v: %s", err, out)
	}
	return bin
}

// ppCase is one cell of the matrix: a SEND ping-pong (ibv_rc_pingpong
// against hfictl pingpong) or an RDMA READ and WRITE (rxe_rdma against
// hfictl rdma-check), the guest's program as server or client.
type ppCase struct {
	rdma        bool
	guestServer bool
	size, iters int
}

func (c ppCase) String() string {
	dir := "gohfi -> rxe (rxe server)"
	if !c.guestServer {
		dir = "rxe -> gohfi (gohfi server)"
	}
	if c.rdma {
		who := "gohfi READs and WRITEs rxe's MR"
		if !c.guestServer {
			who = "rxe READs and WRITEs gohfi's MR"
		}
		return fmt.Sprintf("RDMA READ+WRITE %7d B, %s", c.size, who)
	}
	return fmt.Sprintf("SEND ping-pong  %7d B x %d, %s", c.size, c.iters, dir)
}

// guestCmd is the control line for the guest.
func (c ppCase) guestCmd() string {
	kind, role := "pp", "client"
	if c.rdma {
		kind = "rdma"
	}
	if c.guestServer {
		role = "server"
	}
	return fmt.Sprintf("%s-%s %d %d", kind, role, c.size, c.iters)
}

// hfictlArgs is hfictl's command line (without HOST or --server).
func (c ppCase) hfictlArgs(n netns, hfictl string) []string {
	a := []string{"netns", "exec", n.name, hfictl, "--json", "--port", "udp:" + n.host.Addr().String()}
	if c.rdma {
		return append(a, "rdma-check", "-s", strconv.Itoa(c.size), "--timeout", hfictlTimeout)
	}
	// hfictl registers SIZE x (rx_depth+1) bytes, within RLIMIT_MEMLOCK
	// (8 MiB here; the driver's pinner counts it as ib_umem does).
	rx := "16"
	if c.size > 65536 {
		rx = "4"
	}
	return append(a, "pingpong", "-s", strconv.Itoa(c.size), "-n", strconv.Itoa(c.iters), "-r", rx, "-c",
		"--timeout", hfictlTimeout)
}

// TestRxeInterop: the stock ibv_rc_pingpong on rdma_rxe in the guest
// against hfictl pingpong on the host, and rxe_rdma against hfictl
// rdma-check (an RDMA READ and WRITE between an rxe MR and a gohfi MR),
// both directions, 1 B to 1 MiB, the data checked at both ends (--chk and
// the exit status in the guest, every message compared in hfictl; READ
// data by the initiator, WRITE data by the target), every packet's ICRC
// checked on the tap. One boot for the whole matrix.
func TestRxeInterop(t *testing.T) {
	start := time.Now()
	a := qemu.Setup(t)
	n := tapNamespace(t)
	ctx, cancel := context.WithTimeout(context.Background(), qemu.FetchTimeout)
	defer cancel()
	var log strings.Builder
	u, err := vmimage.FetchUserland(ctx, vmimage.FetchOptions{Log: &log}, "rdma", vmimage.RDMAPackages)
	if err != nil {
		t.Logf("fetch log:\n%s", log.String())
	}
	qemu.RequireOrSkip(t, err == nil, "cannot fetch the guest's rdma-core packages: %v", err)
	if err := u.CheckLinks(); err != nil {
		t.Fatal(err)
	}
	files, links, err := u.Entries()
	if err != nil {
		t.Fatal(err)
	}
	hfictl := hfictlBinary(t)

	var cases []ppCase
	for _, rdma := range []bool{false, true} {
		for _, size := range []int{1, 1000, 4096, 65536, 1 << 20} {
			iters := 20
			if size > 65536 {
				iters = 5 // TCG: a MiB each way takes tens of ms
			}
			for _, gs := range []bool{true, false} {
				cases = append(cases, ppCase{rdma: rdma, guestServer: gs, size: size, iters: iters})
			}
		}
	}
	files[guest.RDMAProgram] = rdmaProgram(t)
	var ln net.Listener
	inNamespace(t, n, func() {
		ln, err = net.Listen("tcp", netip.AddrPortFrom(n.host.Addr(), ctlPort).String())
	})
	if err != nil {
		t.Fatal(err)
	}
	capt := startCapture(t, n)
	ctl := &control{ln: ln}
	results := make(chan []string, 1)
	go func() { results <- ctl.drive(t, n, hfictl, cases) }()
	// Also when the guest run fails the test (t.Fatal): the control
	// connection ends, and drive with it, before t is done.
	defer func() {
		ctl.close()
		<-results // drive uses t: it must end first (an hfictl it runs ends within its --timeout)
	}()

	inNamespace(t, n, func() {
		qemu.RunGuest(t, a, qemu.GuestConfig{
			Tests: []vmimage.TestPackage{{Package: "./test/rxe/guest", Tags: []string{"gohfiguest"},
				Run: "^TestRxePingpong$", Timeout: 8 * time.Minute}},
			Env: []string{guest.EnvHost + "=" + n.host.Addr().String(), guest.EnvGuest + "=" + n.guest.String(),
				guest.EnvCtl + "=" + strconv.Itoa(ctlPort)},
			Modules: vmimage.RDMAModules, Files: files, Links: links,
			QEMUArgs: []string{"-netdev", "tap,id=n0,ifname=" + n.tap + ",script=no,downscript=no",
				"-device", "virtio-net-pci,netdev=n0"},
			Timeout: 10 * time.Minute,
		})
	})
	ctl.close() // the guest is gone
	matrix := <-results
	results <- matrix // for the deferred close
	fromRxe, toRxe, err := capt.stop()
	if err != nil {
		t.Errorf("capture: %v", err)
	}
	t.Logf("on the tap: rxe sent %v; hfisim sent %v", fromRxe, toRxe)
	if fromRxe.packets == 0 || fromRxe.badICRC+toRxe.badICRC != 0 {
		t.Errorf("the capture saw %d packets from rxe, %d bad ICRCs", fromRxe.packets, fromRxe.badICRC+toRxe.badICRC)
	}
	t.Logf("interop matrix (total %v):\n%s", time.Since(start).Round(time.Second), strings.Join(matrix, "\n"))
}

// control is the host's end of the control connection.
type control struct {
	ln net.Listener
	mu sync.Mutex
	c  net.Conn // once accepted
}

// close ends the listener and the connection: drive returns.
func (ctl *control) close() {
	_ = ctl.ln.Close() // closing twice is harmless
	ctl.mu.Lock()
	defer ctl.mu.Unlock()
	if ctl.c != nil {
		_ = ctl.c.Close()
	}
}

// drive accepts the guest's control connection and runs the cases: for
// each, hfictl pingpong or rdma-check in the namespace as the other end
// of the guest's program. It returns one line per case; a control
// connection that fails ends it (the guest's failure is in its output).
func (ctl *control) drive(t *testing.T, n netns, hfictl string, cases []ppCase) []string {
	var matrix []string
	c, err := ctl.ln.Accept()
	if err != nil {
		t.Errorf("control: %v", err)
		return nil
	}
	ctl.mu.Lock()
	ctl.c = c
	ctl.mu.Unlock()
	_ = c.SetDeadline(time.Now().Add(10 * time.Minute)) // bounded by the guest's run anyway
	in := bufio.NewReader(c)
	line := func() (string, error) {
		s, err := in.ReadString('\n')
		if err != nil {
			t.Errorf("control: %v", err)
		}
		return strings.TrimSpace(s), err
	}
	for _, pc := range cases {
		hf := pc.hfictlArgs(n, hfictl)
		var stdout, stderr bytes.Buffer
		var cmd *exec.Cmd
		var hfErr error
		if pc.guestServer {
			fmt.Fprintf(c, "%s\n", pc.guestCmd())
			if l, err := line(); err != nil || l != "listening" {
				return append(matrix, fmt.Sprintf("%v: FAIL: the guest said %q", pc, l))
			}
			cmd = exec.Command("ip", append(hf, n.guest.Addr().String())...)
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			hfErr = cmd.Run()
			fmt.Fprintf(c, "done\n")
		} else {
			fmt.Fprintf(c, "%s\n", pc.guestCmd())
			cmd = exec.Command("ip", append(hf, "--server")...)
			cmd.Stdout = &stdout
			pr, pw := io.Pipe()
			cmd.Stderr = io.MultiWriter(&stderr, pw)
			if err := cmd.Start(); err != nil {
				t.Error(err)
				return matrix
			}
			waited := make(chan error, 1)
			go func() { err := cmd.Wait(); _ = pw.Close(); waited <- err }()
			sc := bufio.NewScanner(pr)
			for sc.Scan() && !strings.Contains(sc.Text(), "local address") {
			}
			go func() { _, _ = io.Copy(io.Discard, pr) }() // keep stderr flowing
			fmt.Fprintf(c, "ready\n")
			hfErr = <-waited
			fmt.Fprintf(c, "done\n")
		}
		g, err := line()
		if err != nil {
			return append(matrix, fmt.Sprintf("%v: FAIL: no answer from the guest", pc))
		}
		var res map[string]any
		_ = json.Unmarshal(stdout.Bytes(), &res) // an error object or the result
		hfOK := hfErr == nil && res["error"] == nil
		gOK := strings.HasPrefix(g, "ok ")
		verdict := "ok"
		if !hfOK || !gOK {
			verdict = "FAIL"
			t.Errorf("%v: hfictl: %v %s %s; guest: %s", pc, hfErr, stdout.String(), stderr.String(), g)
		}
		cnt, _ := res["counters"].(map[string]any)
		if hfOK && (cnt["drop_icrc"] != 0.0 || cnt["rx_packets"] == 0.0) {
			t.Errorf("%v: hfisim's port counters: %v", pc, cnt)
		}
		n := func(k string) int64 { v, _ := res[k].(float64); return int64(v) }
		detail := fmt.Sprintf("hfictl checked %d messages, %d us/iter", n("checked"), n("usec_per_iter"))
		if pc.rdma && pc.guestServer {
			detail = fmt.Sprintf("hfictl checked the READ (%d B in %d us), rxe_rdma the WRITE (%d us)",
				n("read_checked"), n("read_us"), n("write_us"))
		} else if pc.rdma {
			detail = fmt.Sprintf("rxe_rdma checked the READ, hfictl the WRITE (%d B)", n("write_checked"))
		}
		if e, ok := res["error"].(string); ok {
			detail = "hfictl: " + e
		}
		if cnt != nil {
			detail += fmt.Sprintf("; %v packets in, %v out, %v ICRC drops", cnt["rx_packets"], cnt["tx_packets"], cnt["drop_icrc"])
		}
		matrix = append(matrix, fmt.Sprintf("%v: %s (%s; guest %s)", pc, verdict, detail, firstWord(g)))
	}
	fmt.Fprintf(c, "end\n")
	return matrix
}

// rdmaProgram builds testdata/rxe_rdma.c for the guest with the host's
// gcc and libibverbs (scripts/install-deps.sh installs libibverbs-dev).
func rdmaProgram(t *testing.T) string {
	gcc := ctest.GCC(t)
	if _, err := os.Stat("/usr/include/infiniband/verbs.h"); err != nil {
		testenv.Require(t, err, "libibverbs-dev (infiniband/verbs.h)")
	}
	bin := filepath.Join(t.TempDir(), "rxe_rdma")
	out, err := exec.Command(gcc, "-O2", "-Wall", "-Werror", "-o", bin, "testdata/rxe_rdma.c", "-libverbs").CombinedOutput()
	if err != nil {
		t.Fatalf("gcc rxe_rdma.c: %v: %s", err, out)
	}
	return bin
}

func firstWord(s string) string { f, _, _ := strings.Cut(s, " "); return f }
