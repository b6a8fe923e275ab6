package fabric_test

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gohfi/gohfi/internal/testenv"
)

// The machine side of the fabric tests: network namespaces joined by a
// veth pair, made and removed by the test, an hfisim process in each.

// ns is a network namespace the test made.
type ns struct {
	name string
	dev  string     // its end of the veth pair
	addr netip.Addr // the end's address
}

// run runs a command and fails t with its output if it fails.
func run(t testing.TB, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
}

// twoNamespaces makes two namespaces joined by a veth pair with addresses
// 10.201.P.1 and .2/24 (P from the process id, so that concurrent runs do
// not meet) and removes them when t ends.
func twoNamespaces(t *testing.T) (a, b ns) {
	t.Helper()
	requireNetns(t)
	id := os.Getpid() % 250
	a = ns{name: fmt.Sprintf("gohfi-fab%d-a", os.Getpid()), dev: fmt.Sprintf("gfa%d", os.Getpid()),
		addr: netip.AddrFrom4([4]byte{10, 201, byte(id), 1})}
	b = ns{name: fmt.Sprintf("gohfi-fab%d-b", os.Getpid()), dev: fmt.Sprintf("gfb%d", os.Getpid()),
		addr: netip.AddrFrom4([4]byte{10, 201, byte(id), 2})}
	for _, n := range []ns{a, b} {
		addNamespace(t, n.name)
	}
	run(t, "ip", "-n", a.name, "link", "add", a.dev, "type", "veth", "peer", "name", b.dev, "netns", b.name)
	for _, n := range []ns{a, b} {
		run(t, "ip", "-n", n.name, "addr", "add", n.addr.String()+"/24", "dev", n.dev)
		run(t, "ip", "-n", n.name, "link", "set", n.dev, "up")
	}
	return a, b
}

// requireNetns skips (fails under CI=true) without root, iproute2 or
// network namespaces.
func requireNetns(t *testing.T) {
	t.Helper()
	testenv.RequireRoot(t, "network namespaces and veth pairs")
	if _, err := exec.LookPath("ip"); err != nil {
		testenv.Require(t, fmt.Errorf("iproute2: %w", syscall.ENOENT), "the ip command")
	}
	if _, err := os.Stat("/proc/self/ns/net"); err != nil {
		testenv.Require(t, err, "network namespaces")
	}
}

// setLink takes n's end of the veth pair up or down.
func (n ns) setLink(t testing.TB, up bool) {
	t.Helper()
	state := "down"
	if up {
		state = "up"
	}
	run(t, "ip", "-n", n.name, "link", "set", n.dev, state)
}

// hfisimBinary builds tools/hfisim once per test binary.
func hfisimBinary(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		dir, err := os.MkdirTemp("", "gohfi-fabric-")
		if err != nil {
			binErr = err
			return
		}
		binDir = dir
		bin := filepath.Join(dir, "hfisim")
		goCmd := filepath.Join(runtime.GOROOT(), "bin", "go")
		out, err := exec.Command(goCmd, "build", "-o", bin, "github.com/gohfi/gohfi/tools/hfisim").CombinedOutput()
		if err != nil {
			binErr = fmt.Errorf("go build hfisim: %v: %s", err, out)
			return
		}
		binPath = bin
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

// startHfisim runs hfisim with a port in namespace n and returns its
// vfio-user socket; the process is stopped (SIGTERM, then waited for) when
// t ends.
func startHfisim(t *testing.T, n ns) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "hfisim.sock")
	var log bytes.Buffer
	cmd := exec.Command("ip", "netns", "exec", n.name, hfisimBinary(t), "--socket", sock, "--contexts", "4",
		"--port", "udp:"+n.addr.String())
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM) // it may have exited: Wait tells
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("hfisim in %s: %v: %s", n.name, err, log.String())
			}
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill() // it ignored SIGTERM: Wait reports the kill
			<-exited
			t.Errorf("hfisim in %s did not stop on SIGTERM: %s", n.name, log.String())
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		if fi, err := os.Stat(sock); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return sock
		}
		select {
		case err := <-exited:
			exited <- err
			t.Fatalf("hfisim in %s exited: %v: %s", n.name, err, log.String())
		case <-ctx.Done():
			t.Fatalf("hfisim in %s: no socket after 10 s: %s", n.name, log.String())
		case <-time.After(5 * time.Millisecond):
		}
	}
}
