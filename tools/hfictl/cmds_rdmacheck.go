package main

// hfictl rdma-check: an RDMA WRITE and an RDMA READ between an MR of this
// device and an MR of a remote RoCEv2 peer, the data checked at both
// ends. The other end is this command again or test/rxe's rxe_rdma.c on
// rdma_rxe.
//
// The exchange, over TCP (port 18516): the initiator (the client) writes
// one line "QPN PSN SEED GID ADDR RKEY SIZE\n" (hex; QPN and PSN 6 digits,
// SEED 8, the GID 32 digits of its 16 bytes in order, ADDR 16, RKEY 8),
// the target (the server) reads it, connects its QP, and answers with its
// own line. Each side registers 2*SIZE bytes with remote read and write:
// [0, SIZE) is its source, byte k = SEED + 7k + 13(k>>8) (mod 256), and
// [SIZE, 2*SIZE) its sink, zero. The initiator READs the target's source
// into its sink and checks it against the target's SEED, then WRITEs its
// source into the target's sink and sends "written\n"; the target checks
// its sink against the initiator's SEED (and its source unchanged) and
// answers "ok\n" or "bad ...\n".

import (
	"bufio"
	"context"
	enchex "encoding/hex"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

const rcDefaultPort = 18516

// rcDest is one end's line of the exchange.
type rcDest struct {
	ppDest
	seed       uint32
	addr, size uint64
	rkey       uint32
}

func (d rcDest) line() string {
	return fmt.Sprintf("%06x %06x %08x %s %016x %08x %x\n", d.qpn, d.psn, d.seed, enchex.EncodeToString(d.gid[:]),
		d.addr, d.rkey, d.size)
}

func parseRCDest(line string) (rcDest, error) {
	var d rcDest
	f := strings.Fields(line)
	bad := fmt.Errorf("rdma-check: malformed address line %q: %w", line, unix.EPROTO)
	if len(f) != 7 || len(f[3]) != 32 {
		return d, bad
	}
	var v [7]uint64
	for i, bits := range []int{24, 24, 32, 0, 64, 32, 64} {
		if i == 3 {
			continue
		}
		x, err := strconv.ParseUint(f[i], 16, bits)
		if err != nil {
			return d, bad
		}
		v[i] = x
	}
	if _, err := enchex.Decode(d.gid[:], []byte(f[3])); err != nil {
		return d, bad
	}
	d.qpn, d.psn, d.seed, d.addr, d.rkey, d.size = uint32(v[0]), uint32(v[1]), uint32(v[2]), v[4], uint32(v[5]), v[6]
	return d, nil
}

// rcPattern is byte k of the source of the side with seed.
func rcPattern(seed uint32, k int) byte { return byte(seed + uint32(k)*7 + uint32(k>>8)*13) }

func rcCheck(b []byte, seed uint32) int {
	for k := range b {
		if b[k] != rcPattern(seed, k) {
			return k
		}
	}
	return -1
}

func cmdRDMACheck(s *session, args []string) (_ obj, err error) {
	fs := newFlags("rdma-check")
	var o exchangeOpts
	o.flags(fs, rcDefaultPort, "bytes to WRITE and READ")
	if err := o.parse("rdma-check", fs, args); err != nil {
		return nil, err
	}
	a, own, err := portDevice(s, "rdma-check")
	if err != nil {
		return nil, err
	}
	size := o.size
	const remote = uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ
	e, err := newVerbsEnd(a.Device, size, 2*size, 0, uapi.IB_ACCESS_LOCAL_WRITE|remote, remote, o.timeout)
	if err != nil {
		return nil, err
	}
	defer cleanup(&err, "rdma-check teardown", e.close)
	buf := e.buf.Bytes()
	me := rcDest{ppDest: ppDest{qpn: e.qpn, psn: rand.Uint32() & 0xFFFFFF, gid: own.Addr().As16()},
		seed: rand.Uint32(), addr: uint64(e.buf.Addr()), size: uint64(size), rkey: e.mr.Rkey}
	for k := range size {
		buf[k] = rcPattern(me.seed, k)
	}
	ctx, cancel := context.WithTimeout(s.ctx, o.timeout)
	defer cancel()

	c, err := exchangeConn(ctx, o.host, o.port, func() {
		_, _ = fmt.Fprintf(s.p.errOut, "  local address:  QPN 0x%06x, PSN 0x%06x, GID %s, waiting on %d\n",
			me.qpn, me.psn, own.Addr(), o.port) // informational
	})
	if err != nil {
		return nil, fmt.Errorf("rdma-check: %w", err)
	}
	defer func() { _ = c.Close() }() // the exchange's errors were seen
	in := bufio.NewReader(c)
	readLine := func(what string) (string, error) {
		l, err := in.ReadString('\n')
		if err != nil {
			return "", fmt.Errorf("rdma-check: reading %s: %w", what, err)
		}
		return strings.TrimSuffix(l, "\n"), nil
	}
	initiator := o.host != ""
	if initiator {
		if _, err := c.Write([]byte(me.line())); err != nil {
			return nil, fmt.Errorf("rdma-check: sending the local address: %w", err)
		}
	}
	l, err := readLine("the remote address")
	if err != nil {
		return nil, err
	}
	rem, err := parseRCDest(l)
	if err != nil {
		return nil, err
	}
	if rem.size != uint64(size) {
		return nil, fmt.Errorf("rdma-check: sizes differ: %d here, %d there: %w", size, rem.size, unix.EINVAL)
	}
	if err := e.connect(a.Device, o.peer, rem.ppDest, me.psn); err != nil {
		return nil, err
	}
	res := obj{{"role", map[bool]string{true: "initiator", false: "target"}[initiator]},
		{"local", strings.TrimSpace(me.line())}, {"remote", l},
		{"peer_addr", netip.AddrFrom16(rem.gid).Unmap().String()}, {"size", size}}
	if !initiator {
		if _, err := c.Write([]byte(me.line())); err != nil {
			return nil, fmt.Errorf("rdma-check: sending the local address: %w", err)
		}
		if l, err := readLine("written"); err != nil || l != "written" {
			return nil, fmt.Errorf("rdma-check: want written, got %q (%v): %w", l, err, unix.EPROTO)
		}
		reply := "ok\n"
		bad := rcCheck(buf[size:], rem.seed)
		if bad >= 0 {
			reply = fmt.Sprintf("bad WRITE data at byte %d\n", bad)
		}
		if _, err := c.Write([]byte(reply)); err != nil {
			return nil, fmt.Errorf("rdma-check: answering: %w", err)
		}
		if bad >= 0 {
			return nil, fmt.Errorf("rdma-check: the WRITE's data differs at byte %d: %#02x, want %#02x: %w",
				bad, buf[size+bad], rcPattern(rem.seed, bad), unix.EIO)
		}
		if k := rcCheck(buf[:size], me.seed); k >= 0 {
			return nil, fmt.Errorf("rdma-check: the source changed at byte %d: %w", k, unix.EIO)
		}
		co, err := netCounters(a.Device)
		if err != nil {
			return nil, err
		}
		return append(res, field{"write_checked", size}, field{"counters", co}), nil
	}
	post := func(op uint32, local, remote uint64) error {
		sge := []uapi.GohfiSge{{Addr: local, Length: uint32(size), Lkey: e.mr.Lkey}}
		w := hfiuser.SendWR{SGL: sge}
		w.WrID, w.Opcode, w.SendFlags, w.RemoteAddr, w.Rkey = uint64(op), op, uapi.GOHFI_SEND_SIGNALED, remote, rem.rkey
		if _, err := hfiuser.PostSend(e.f, e.qp, []hfiuser.SendWR{w}); err != nil {
			return fmt.Errorf("POST_SEND: %w", err)
		}
		return nil
	}
	start := time.Now()
	if err := post(uapi.GOHFI_WR_RDMA_READ, me.addr+uint64(size), rem.addr); err != nil {
		return nil, err
	}
	if _, err := e.waitWC(s.ctx, "RDMA READ"); err != nil {
		return nil, err
	}
	readTime := time.Since(start)
	if k := rcCheck(buf[size:], rem.seed); k >= 0 {
		return nil, fmt.Errorf("rdma-check: the READ's data differs at byte %d: %#02x, want %#02x: %w",
			k, buf[size+k], rcPattern(rem.seed, k), unix.EIO)
	}
	start = time.Now()
	if err := post(uapi.GOHFI_WR_RDMA_WRITE, me.addr, rem.addr+uint64(size)); err != nil {
		return nil, err
	}
	if _, err := e.waitWC(s.ctx, "RDMA WRITE"); err != nil {
		return nil, err
	}
	writeTime := time.Since(start)
	if _, err := c.Write([]byte("written\n")); err != nil {
		return nil, fmt.Errorf("rdma-check: %w", err)
	}
	if l, err := readLine("the target's check"); err != nil || l != "ok" {
		return nil, fmt.Errorf("rdma-check: the target says %q (%v): %w", l, err, unix.EIO)
	}
	co, err := netCounters(a.Device)
	if err != nil {
		return nil, err
	}
	return append(res, field{"read_checked", size}, field{"write_checked_by_target", size},
		field{"read_us", readTime.Microseconds()}, field{"write_us", writeTime.Microseconds()},
		field{"counters", co}), nil
}
