//go:build gohfiguest

package guest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestRxePingpong: eth0 up with its address, rxe0 on it, then the
// matrix the host sends, one line per case: "pp-server SIZE ITERS" (this
// guest's ibv_rc_pingpong is the server; once it listens the guest says
// "listening" and the host's hfictl pingpong connects) or "pp-client SIZE
// ITERS" (the host's hfictl listens and says "ready"); "rdma-server SIZE
// 0" and "rdma-client SIZE 0" the same with rxe_rdma against hfictl
// rdma-check.
// Each case's outcome goes back to the host as "ok DETAIL" or
// "fail DETAIL" once the host has said "done" (its end finished); "end"
// ends.
func TestRxePingpong(t *testing.T) {
	host := netip.MustParseAddr(os.Getenv(EnvHost))
	me := netip.MustParsePrefix(os.Getenv(EnvGuest))
	if err := ifUp("eth0", me); err != nil {
		t.Fatal(err)
	}
	if err := rxeAdd("rxe0", "eth0"); err != nil {
		t.Fatal(err)
	}
	gidIdx, err := findGID("rxe0", me.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("rxe0 GID index %d for %v", gidIdx, me.Addr())
	if out, err := exec.Command("/usr/bin/ibv_devinfo", "-v").CombinedOutput(); err != nil {
		t.Fatalf("ibv_devinfo: %v: %s", err, out)
	} else {
		t.Logf("ibv_devinfo -v:\n%s", out)
	}
	c, err := net.DialTimeout("tcp", net.JoinHostPort(host.String(), os.Getenv(EnvCtl)), 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.Close() }()
	in := bufio.NewScanner(c)
	reply := func(ok bool, detail string) {
		word := "ok"
		if !ok {
			word = "fail"
			t.Error(detail)
		}
		if _, err := fmt.Fprintf(c, "%s %s\n", word, strconv.Quote(detail)); err != nil {
			t.Fatal(err)
		}
	}
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) == 1 && f[0] == "end" {
			return
		}
		if len(f) != 3 {
			t.Fatalf("control: %q", in.Text())
		}
		var prog string
		var port int
		var args []string
		ok := func(err error, out string) bool { return err == nil }
		switch kind, _, _ := strings.Cut(f[0], "-"); kind {
		case "pp":
			prog, port = "/usr/bin/ibv_rc_pingpong", 18515
			args = []string{"-g", strconv.Itoa(gidIdx), "-s", f[1], "-n", f[2], "-r", "16", "-c"}
			ok = pingpongOK
		case "rdma":
			prog, port = RDMAProgram, 18516
			args = []string{"-g", strconv.Itoa(gidIdx), "-s", f[1]}
		default:
			t.Fatalf("control: %q", in.Text())
		}
		server := strings.HasSuffix(f[0], "-server")
		if !server {
			if !in.Scan() || in.Text() != "ready" {
				t.Fatalf("control: %q, want ready", in.Text())
			}
			args = append(args, host.String())
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		cmd := exec.CommandContext(ctx, prog, args...)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			cancel()
			t.Fatal(err)
		}
		if server {
			if err := waitListening(ctx, port); err != nil {
				cancel()
				_ = cmd.Wait() // killed by the context
				t.Fatalf("%s: %v: %s", prog, err, out.String())
			}
			if _, err := fmt.Fprintf(c, "listening\n"); err != nil {
				t.Fatal(err)
			}
		}
		// The host says "done" when its end has finished: a program
		// still running then has lost its peer and gets 10 s more.
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		next := make(chan bool, 1)
		go func() { next <- in.Scan() }()
		var err error
		select {
		case err = <-exited:
			<-next
		case <-next:
			select {
			case err = <-exited:
			case <-time.After(10 * time.Second):
				cancel()
				err = fmt.Errorf("still running 10 s after its peer ended: %w", <-exited)
			}
		}
		cancel()
		if in.Text() != "done" {
			t.Fatalf("control: %q, want done (%v)", in.Text(), in.Err())
		}
		reply(ok(err, out.String()), fmt.Sprintf("%s %s: %v\n%s", prog, strings.Join(args, " "), err, out.String()))
	}
	t.Fatalf("control connection ended without end: %v", in.Err())
}

// pingpongOK: exit status 0, and no "invalid data" (--chk prints it and
// carries on).
func pingpongOK(err error, out string) bool {
	return err == nil && !strings.Contains(out, "invalid data") && strings.Contains(out, "iters in")
}

// poll checks cond every 20 ms until it holds or ctx ends: for state the
// kernel changes without telling (a socket listening, a GID added by a
// work item), nothing to wait on.
func poll(ctx context.Context, what string, cond func() bool) error {
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w", what, ctx.Err())
		case <-tick.C:
		}
	}
	return nil
}

// waitListening waits until a TCP socket listens on port (the server's
// address exchange can start).
func waitListening(ctx context.Context, port int) error {
	want := fmt.Sprintf(":%04X ", port)
	return poll(ctx, fmt.Sprintf("nothing listened on %d", port), func() bool {
		for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
			b, _ := os.ReadFile(f) // absent without IPv6
			for _, l := range strings.Split(string(b), "\n") {
				fs := strings.Fields(l)
				if len(fs) > 3 && strings.HasSuffix(fs[1]+" ", want) && fs[3] == "0A" {
					return true
				}
			}
		}
		return false
	})
}

// ifUp gives name the address p and brings it up (ioctls, no iproute2).
func ifUp(name string, p netip.Prefix) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer func() { _ = unix.Close(fd) }()
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	if err := ifr.SetInet4Addr(p.Addr().AsSlice()); err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFADDR, ifr); err != nil {
		return fmt.Errorf("SIOCSIFADDR %s: %w", name, err)
	}
	mask := net.CIDRMask(p.Bits(), 32)
	if err := ifr.SetInet4Addr(mask); err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFNETMASK, ifr); err != nil {
		return fmt.Errorf("SIOCSIFNETMASK %s: %w", name, err)
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("SIOCSIFFLAGS %s: %w", name, err)
	}
	return nil
}

// RDMA netlink (include/uapi/rdma/rdma_netlink.h): what `rdma link add
// NAME type rxe netdev NETDEV` sends.
const (
	rdmaNLNLDEV         = 5
	rdmaNLDEVCmdNewlink = 3
	attrDevName         = 2
	attrNdevName        = 51
	attrLinkType        = 65
)

// rxeAdd creates the soft-RoCE device name on netdev.
func rxeAdd(name, netdev string) error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_RDMA)
	if err != nil {
		return fmt.Errorf("NETLINK_RDMA: %w", err)
	}
	defer func() { _ = unix.Close(fd) }()
	var attrs []byte
	for _, a := range []struct {
		typ uint16
		v   string
	}{{attrDevName, name}, {attrLinkType, "rxe"}, {attrNdevName, netdev}} {
		v := append([]byte(a.v), 0)
		l := 4 + len(v)
		b := make([]byte, (l+3)&^3)
		binary.NativeEndian.PutUint16(b[0:], uint16(l))
		binary.NativeEndian.PutUint16(b[2:], a.typ)
		copy(b[4:], v)
		attrs = append(attrs, b...)
	}
	msg := make([]byte, unix.NLMSG_HDRLEN, unix.NLMSG_HDRLEN+len(attrs))
	msg = append(msg, attrs...)
	binary.NativeEndian.PutUint32(msg[0:], uint32(len(msg)))
	binary.NativeEndian.PutUint16(msg[4:], rdmaNLNLDEV<<10|rdmaNLDEVCmdNewlink)
	binary.NativeEndian.PutUint16(msg[6:], unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	binary.NativeEndian.PutUint32(msg[8:], 1)
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("RDMA_NLDEV_CMD_NEWLINK: %w", err)
	}
	buf := make([]byte, 4096)
	n, _, err := unix.Recvfrom(fd, buf, 0)
	if err != nil {
		return fmt.Errorf("RDMA_NLDEV_CMD_NEWLINK answer: %w", err)
	}
	msgs, err := syscallParse(buf[:n])
	if err != nil {
		return err
	}
	for _, m := range msgs {
		if m.Header.Type == unix.NLMSG_ERROR && len(m.Data) >= 4 {
			if e := int32(binary.NativeEndian.Uint32(m.Data)); e != 0 {
				return fmt.Errorf("rdma link add %s type rxe netdev %s: %w", name, netdev, unix.Errno(-e))
			}
			return nil
		}
	}
	return fmt.Errorf("RDMA_NLDEV_CMD_NEWLINK: no acknowledgement")
}

// findGID returns the index of rxe's RoCE v2 GID for a (IPv4-mapped).
// The GID table is filled from the netdev's addresses by a work item
// after the link is added.
func findGID(dev string, a netip.Addr) (int, error) {
	want := netip.AddrFrom16(a.As16())
	dir := filepath.Join("/sys/class/infiniband", dev, "ports/1")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	idx := -1
	err := poll(ctx, fmt.Sprintf("no RoCE v2 GID for %v on %s", a, dev), func() bool {
		for i := 0; i < 16; i++ {
			g, err := os.ReadFile(filepath.Join(dir, "gids", strconv.Itoa(i)))
			if err != nil {
				return false
			}
			typ, err := os.ReadFile(filepath.Join(dir, "gid_attrs/types", strconv.Itoa(i)))
			if err != nil {
				continue // an empty entry has no type
			}
			ga, err := netip.ParseAddr(strings.TrimSpace(string(g)))
			if err == nil && ga == want && strings.TrimSpace(string(typ)) == "RoCE v2" {
				idx = i
				return true
			}
		}
		return false
	})
	return idx, err
}
