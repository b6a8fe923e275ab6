package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
)

// TestPingpongMessage: the address message is ibv_rc_pingpong's 52 bytes
// ("%04x:%06x:%06x:" and the GID's 16 bytes as 32 hex digits, a NUL), read
// back exactly; malformed ones are EPROTO.
func TestPingpongMessage(t *testing.T) {
	d := ppDest{lid: 0, qpn: 0x11, psn: 0xabcdef, gid: [16]byte{10: 0xff, 11: 0xff, 12: 10, 13: 203, 14: 1, 15: 2}}
	w := d.wire()
	if len(w) != 52 || string(w) != "0000:000011:abcdef:00000000000000000000ffff0acb0102\x00" {
		t.Fatalf("message %q", w)
	}
	got, err := parsePPDest(w)
	if err != nil || got != d {
		t.Fatalf("parsed %+v, %v", got, err)
	}
	for _, bad := range []string{
		"0000:000011:abcdef:00000000000000000000ffff0acb0102",     // no NUL
		"0000-000011:abcdef:00000000000000000000ffff0acb0102\x00", // separator
		"0000:00001g:abcdef:00000000000000000000ffff0acb0102\x00", // not hex
		"0000:000011:abcdef:00000000000000000000ffff0acb01zz\x00", // GID not hex
	} {
		if _, err := parsePPDest([]byte(bad)); err == nil || !strings.Contains(err.Error(), "malformed") {
			t.Errorf("%q: %v", bad, err)
		}
	}
}

// TestPingpongRefusals: what pingpong refuses before it touches the network.
func TestPingpongRefusals(t *testing.T) {
	checkNoLeaks(t)
	for _, c := range []struct {
		args  []string
		errno string
	}{
		{[]string{"pingpong"}, "EINVAL"},                           // neither --server nor HOST
		{[]string{"pingpong", "--server", "10.0.0.1"}, "EINVAL"},   // both
		{[]string{"pingpong", "-g", "1", "10.0.0.1"}, "EINVAL"},    // one GID
		{[]string{"pingpong", "-m", "4096", "10.0.0.1"}, "EINVAL"}, // PMTU 1024
		{[]string{"pingpong", "-s", "0", "10.0.0.1"}, "EINVAL"},    // size
		{[]string{"pingpong", "10.0.0.1"}, "ENOTSUP"},              // no port
		{[]string{"rdma-check", "--server", "10.0.0.1"}, "EINVAL"}, // both
		{[]string{"rdma-check", "--server"}, "ENOTSUP"},            // no port
		{[]string{"rdma-check", "-s", "2G", "--server"}, "EINVAL"}, // size
	} {
		code, out, _ := hfictl(t, "", append([]string{"--json"}, c.args...)...)
		if code != 1 || !strings.Contains(out, `"errno":"`+c.errno+`"`) {
			t.Errorf("%v: exit %d, %s; want %s", c.args, code, out, c.errno)
		}
	}
}

// TestRDMACheckLoopback: rdma-check between two embedded devices on
// loopback addresses (the exchange over TCP, the READ and WRITE over the
// ports), both sizes below and above one packet; the target's result says
// it checked the WRITE, the initiator's that it checked the READ.
func TestRDMACheckLoopback(t *testing.T) {
	checkNoLeaks(t)
	id := os.Getpid() % 250
	srvAddr, cliAddr := fmt.Sprintf("127.77.%d.1", id), fmt.Sprintf("127.77.%d.2", id)
	for _, size := range []int{1, 70000} {
		port := freeTCPPort(t)
		pr, pw := io.Pipe()
		var srvOut bytes.Buffer
		srvDone := make(chan int, 1)
		go func() {
			code := runContext(context.Background(), []string{"--json", "--port", "udp:" + srvAddr, "rdma-check",
				"--server", "-p", strconv.Itoa(port), "-s", strconv.Itoa(size), "--timeout", "20s"},
				strings.NewReader(""), &srvOut, pw)
			_ = pw.Close() // the pipe's reader sees the end
			srvDone <- code
		}()
		// The target says when it listens.
		sc := bufio.NewScanner(pr)
		listening := false
		for sc.Scan() {
			if strings.Contains(sc.Text(), "waiting on") {
				listening = true
				break
			}
		}
		go func() { _, _ = io.Copy(io.Discard, pr) }() // the rest of its stderr
		if !listening {
			t.Fatalf("size %d: the target never listened: %s", size, srvOut.String())
		}
		code, out, errs := hfictl(t, "", "--json", "--port", "udp:"+cliAddr, "rdma-check", srvAddr, "-p",
			strconv.Itoa(port), "-s", strconv.Itoa(size), "--timeout", "20s")
		srvCode := <-srvDone
		if code != 0 || srvCode != 0 {
			t.Fatalf("size %d: initiator exit %d %s %s; target exit %d %s", size, code, out, errs, srvCode, srvOut.String())
		}
		ini, tgt := jsonLines(t, out)[0], jsonLines(t, srvOut.String())[0]
		if num(t, ini, "read_checked") != float64(size) || num(t, ini, "write_checked_by_target") != float64(size) ||
			num(t, tgt, "write_checked") != float64(size) || ini["peer_addr"] != srvAddr || tgt["peer_addr"] != cliAddr {
			t.Fatalf("size %d: initiator %v, target %v", size, ini, tgt)
		}
		if num(t, ini, "counters.drop_icrc")+num(t, tgt, "counters.drop_icrc") != 0 || num(t, tgt, "counters.rx_packets") == 0 {
			t.Fatalf("size %d: counters %v, %v", size, ini["counters"], tgt["counters"])
		}
	}
}

// freeTCPPort returns a TCP port nothing listens on now.
func freeTCPPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	return port
}
