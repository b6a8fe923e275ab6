package fabric_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/ibwire"
	"github.com/gohfi/gohfi/internal/testenv"
	"github.com/gohfi/gohfi/uapi"
)

// The wire is real: a run captured on the veth (a packet socket in the
// namespace),
// every RoCEv2 frame's ICRC checked against the IP and UDP headers the
// kernel really sent (ibwire.DecodeDatagram: Wireshark 4.0 shows the ICRC
// but does not check it), and tshark's decoding of the opcodes, QPs and
// PSNs compared with what was posted.

// capture records every frame on n's end of the veth (an AF_PACKET
// socket in n: capturing as soon as it is bound, unlike a tshark started
// in the background) until stop is called, which returns them.
func capture(t *testing.T, n ns) (stop func() [][]byte) {
	t.Helper()
	type res struct {
		frames [][]byte
		err    error
	}
	started, done := make(chan error, 1), make(chan res, 1)
	quit := make(chan struct{})
	go func() {
		runtime.LockOSThread() // never unlocked: the thread joins n and dies with the goroutine
		fd, err := packetSocket(n)
		started <- err
		if err != nil {
			return
		}
		defer unix.Close(fd)
		var frames [][]byte
		buf := make([]byte, 65536)
		for {
			k, _, err := unix.Recvfrom(fd, buf, 0)
			switch {
			case err == nil:
				frames = append(frames, bytes.Clone(buf[:k]))
				continue
			case errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR):
			default:
				done <- res{frames, err}
				return
			}
			select {
			case <-quit:
				done <- res{frames, nil}
				return
			default:
			}
		}
	}()
	testenv.Require(t, <-started, "an AF_PACKET socket on "+n.dev)
	return func() [][]byte {
		close(quit)
		r := <-done
		if r.err != nil {
			t.Fatalf("capture on %s: %v", n.dev, r.err)
		}
		return r.frames
	}
}

// packetSocket opens a raw packet socket on n's veth end, from this thread
// moved into n, with a receive timeout so that its reader can stop.
func packetSocket(n ns) (int, error) {
	f, err := os.Open("/run/netns/" + n.name)
	if err != nil {
		return -1, err
	}
	defer f.Close()
	if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
		return -1, fmt.Errorf("setns %s: %w", n.name, err)
	}
	ifc, err := net.InterfaceByName(n.dev)
	if err != nil {
		return -1, err
	}
	const ethPAll = 0x0003
	proto := int(ethPAll>>8 | ethPAll&0xff<<8) // network order
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return -1, err
	}
	tv := unix.Timeval{Usec: 20000}
	if err := errors.Join(unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv),
		unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: uint16(proto), Ifindex: ifc.Index})); err != nil {
		_ = unix.Close(fd) // the error above is the one to report
		return -1, err
	}
	return fd, nil
}

// pcapFile is frames as a pcap file (link type Ethernet).
func pcapFile(frames [][]byte) []byte {
	var b []byte
	b = binary.LittleEndian.AppendUint32(b, 0xa1b2c3d4)
	b = binary.LittleEndian.AppendUint16(b, 2)
	b = binary.LittleEndian.AppendUint16(b, 4)
	b = append(b, make([]byte, 8)...) // time zone, accuracy
	b = binary.LittleEndian.AppendUint32(b, 65535)
	b = binary.LittleEndian.AppendUint32(b, 1)
	for i, f := range frames {
		b = binary.LittleEndian.AppendUint32(b, uint32(i)) // seconds: the frame's number, in order
		b = binary.LittleEndian.AppendUint32(b, 0)
		b = binary.LittleEndian.AppendUint32(b, uint32(len(f)))
		b = binary.LittleEndian.AppendUint32(b, uint32(len(f)))
		b = append(b, f...)
	}
	return b
}

// wirePacket is one RoCEv2 packet as tshark decoded it.
type wirePacket struct {
	src    string
	opcode int
	destQP uint32
	psn    uint32
	rnr    bool // an RNR NAK
}

func tsharkDecode(t *testing.T, file string) []wirePacket {
	t.Helper()
	if _, err := exec.LookPath("tshark"); err != nil {
		testenv.Missing(t, "tshark (Debian package tshark; scripts/install-deps.sh installs it): %v", err)
	}
	args := []string{"-r", file, "-T", "fields", "-E", "separator=,", "-e", "ip.src",
		"-e", "infiniband.bth.opcode", "-e", "infiniband.bth.destqp", "-e", "infiniband.bth.psn",
		"-e", "_ws.malformed", "-e", "_ws.expert", "-e", "infiniband.aeth.syndrome"}
	// The payload heuristics (RPC over RDMA, SMB Direct, ...) would read
	// the test's bytes as their headers.
	for _, p := range []string{"smc", "smb_direct", "rpcordma", "nvme-rdma", "lnet", "iser", "infiniband_sdp", "fcoib"} {
		args = append(args, "--disable-protocol", p)
	}
	var stderr bytes.Buffer
	cmd := exec.Command("tshark", args...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("tshark -r: %v: %s", err, stderr.String())
	}
	var ps []wirePacket
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Split(line, ",")
		if len(f) < 7 || f[1] == "" {
			t.Fatalf("tshark did not decode a frame as RoCE: %q (%s)", line, stderr.String())
		}
		if f[4] != "" || f[5] != "" {
			t.Errorf("tshark finds the frame malformed or complains: %q", line)
		}
		op, err1 := strconv.Atoi(f[1])
		qp, err2 := strconv.ParseUint(f[2], 0, 32)
		psn, err3 := strconv.ParseUint(f[3], 0, 32)
		if err1 != nil || err2 != nil || err3 != nil {
			t.Fatalf("tshark line %q", line)
		}
		p := wirePacket{src: f[0], opcode: op, destQP: uint32(qp), psn: uint32(psn)}
		if f[6] != "" {
			syn, err := strconv.ParseUint(f[6], 0, 8)
			if err != nil {
				t.Fatalf("tshark line %q", line)
			}
			p.rnr = ibwire.AETH{Syndrome: uint8(syn)}.IsRNRNAK()
		}
		ps = append(ps, p)
	}
	return ps
}

// wireCheck posts a WRITE of three packets, a READ of two responses and a
// SEND of one packet on fresh QPs, captures them on the veth, and checks
// the capture.
func wireCheck(t *testing.T, x, y *node) {
	connect(t, x, y, driver.NetAttr{Timeout: 14, RetryCnt: 7, RnrRetry: 7, MinRnrTimer: 1})
	stop := capture(t, x.ns)
	fill(x.bytes()[:4096], 5)
	post(t, x, driver.SendWR{WrID: 1, Opcode: uapi.GOHFI_WR_RDMA_WRITE, SendFlags: uapi.GOHFI_SEND_SIGNALED,
		SGL: x.sge(0, 2500), RemoteAddr: uint64(y.buf.Addr()), Rkey: y.mr.Rkey()})
	want(t, x, "WRITE", x.wait(t, 1)[0], uapi.GOHFI_WC_RDMA_WRITE)
	post(t, x, driver.SendWR{WrID: 2, Opcode: uapi.GOHFI_WR_RDMA_READ, SendFlags: uapi.GOHFI_SEND_SIGNALED,
		SGL: x.sge(8192, 1500), RemoteAddr: uint64(y.buf.Addr()), Rkey: y.mr.Rkey()})
	want(t, x, "READ", x.wait(t, 1)[0], uapi.GOHFI_WC_RDMA_READ)
	if k, err := y.qp.PostRecv([]driver.RecvWR{{WrID: 3, SGL: y.sge(1<<20, 4096)}}); err != nil || k != 1 {
		t.Fatalf("POST_RECV: %d, %v", k, err)
	}
	post(t, x, driver.SendWR{WrID: 4, Opcode: uapi.GOHFI_WR_SEND, SendFlags: uapi.GOHFI_SEND_SIGNALED, SGL: x.sge(0, 10)})
	want(t, x, "SEND", x.wait(t, 1)[0], uapi.GOHFI_WC_SEND)
	want(t, y, "RECV", y.wait(t, 1)[0], uapi.GOHFI_WC_RECV)
	all := stop()

	// Every RoCEv2 frame's ICRC against the headers the kernel sent.
	var frames [][]byte
	for _, f := range all {
		if len(f) >= 14+28 && binary.BigEndian.Uint16(f[12:]) == 0x0800 && f[14+9] == 17 &&
			binary.BigEndian.Uint16(f[14+22:]) == ibwire.UDPPort {
			frames = append(frames, f)
		}
	}
	file := filepath.Join(t.TempDir(), "roce.pcap")
	if err := os.WriteFile(file, pcapFile(frames), 0o644); err != nil {
		t.Fatal(err)
	}
	for i, f := range frames {
		var p ibwire.Packet
		if _, _, err := ibwire.DecodeDatagram(f[14:], &p); err != nil {
			t.Errorf("frame %d: %v", i+1, err)
		}
	}

	ps := tsharkDecode(t, file)
	if len(ps) != len(frames) {
		t.Fatalf("tshark decoded %d frames of %d", len(ps), len(frames))
	}
	const base = 0xfff000
	wantReq := []wirePacket{
		{x.ns.addr.String(), int(ibwire.RCWriteFirst), y.qp.Num(), base, false},
		{x.ns.addr.String(), int(ibwire.RCWriteMiddle), y.qp.Num(), base + 1, false},
		{x.ns.addr.String(), int(ibwire.RCWriteLast), y.qp.Num(), base + 2, false},
		{x.ns.addr.String(), int(ibwire.RCReadRequest), y.qp.Num(), base + 3, false},
		{x.ns.addr.String(), int(ibwire.RCSendOnly), y.qp.Num(), base + 5, false},
	}
	wantResp := []wirePacket{
		{y.ns.addr.String(), int(ibwire.RCAcknowledge), x.qp.Num(), base + 2, false},
		{y.ns.addr.String(), int(ibwire.RCReadResponseFirst), x.qp.Num(), base + 3, false},
		{y.ns.addr.String(), int(ibwire.RCReadResponseLast), x.qp.Num(), base + 4, false},
		{y.ns.addr.String(), int(ibwire.RCAcknowledge), x.qp.Num(), base + 5, false},
	}
	// The SEND may come before the receive's doorbell reached y's
	// device: an RNR NAK, and the SEND again, are then on the wire too.
	var req, resp []wirePacket
	rnr := map[uint32]int{}
	for _, p := range ps {
		switch {
		case p.src != x.ns.addr.String() && p.rnr:
			rnr[p.psn]++
		case p.src != x.ns.addr.String():
			resp = append(resp, p)
		case rnr[p.psn] > 0:
			rnr[p.psn]-- // the request again after the RNR NAK
		default:
			req = append(req, p)
		}
	}
	if fmt.Sprint(req) != fmt.Sprint(wantReq) || fmt.Sprint(resp) != fmt.Sprint(wantResp) {
		t.Fatalf("on the wire:\nrequests  %v\nwant      %v\nresponses %v\nwant      %v", req, wantReq, resp, wantResp)
	}
	t.Logf("%d frames captured on %s, ICRCs good, decoded by tshark as posted", len(frames), x.ns.dev)
}
