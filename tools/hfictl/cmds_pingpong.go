package main

// hfictl pingpong: rdma-core's ibv_rc_pingpong on a gohfi QP over the
// network port, speaking its connection exchange, so that a stock
// ibv_rc_pingpong (on rdma_rxe, or any RoCEv2 device) is the other end.
//
// The exchange (rdma-core libibverbs/examples/rc_pingpong.c): the client
// connects to the server's TCP port (18515) and writes its address as the
// text "LLLL:QQQQQQ:PPPPPP:GGGG...G" (LID, QPN and PSN in hex, the GID as
// 32 hex digits of its 16 bytes in order) with its terminating NUL, 52
// bytes; the server reads it, connects its QP (RTR, RTS), writes its own
// address the same way and reads the client's final "done" (5 bytes with
// the NUL). Then each side has receives posted; the client sends first and
// each side sends its next message when its previous send and a receive
// have completed, iters times.
//
// Data: a stock ibv_rc_pingpong sends from the buffer it receives into, so
// from its second message on (the server: from its first) it sends back
// what it received last. Every message this side sends is different (a
// pattern of the iteration), and every message received must be the one
// this side sent last; the client's first message, sent before it received
// anything, must be its initial buffer (0x7b bytes, with --chk the first
// byte of every page 0). The first byte of every page of what this side
// sends is 0, which ibv_rc_pingpong --chk checks.

import (
	"context"
	enchex "encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"strconv"
	"time"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/ibwire"
	"github.com/gohfi/gohfi/mem"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

const (
	ppDefaultPort = 18515
	ppMsgLen      = len("0000:000000:000000:00000000000000000000000000000000") + 1 // with the NUL
	ppRecvWRID    = 1
	ppSendWRID    = 2
	ppPage        = 4096 // the page whose first byte --chk checks (x86-64)
	ppInitByte    = 0x7b // ibv_rc_pingpong's buffer before anything arrived
)

// ppDest is one end's address as the exchange carries it.
type ppDest struct {
	lid, qpn, psn uint32
	gid           [16]byte
}

func (d ppDest) String() string {
	return fmt.Sprintf("%04x:%06x:%06x:%s", d.lid, d.qpn, d.psn, enchex.EncodeToString(d.gid[:]))
}

// wire is the 52-byte message.
func (d ppDest) wire() []byte {
	b := make([]byte, ppMsgLen)
	copy(b, d.String())
	return b
}

// parsePPDest parses a 52-byte message (what sscanf("%x:%x:%x:%s") of
// the stock program accepts, stricter: exactly the widths it writes).
func parsePPDest(b []byte) (ppDest, error) {
	var d ppDest
	if len(b) != ppMsgLen || b[ppMsgLen-1] != 0 || b[4] != ':' || b[11] != ':' || b[18] != ':' {
		return d, fmt.Errorf("pingpong: malformed address message %q: %w", b, unix.EPROTO)
	}
	field := func(s []byte, bits int) (uint32, error) {
		v, err := strconv.ParseUint(string(s), 16, bits)
		return uint32(v), err
	}
	var err [3]error
	d.lid, err[0] = field(b[0:4], 16)
	d.qpn, err[1] = field(b[5:11], 24)
	d.psn, err[2] = field(b[12:18], 24)
	if _, e := enchex.Decode(d.gid[:], b[19:51]); e != nil || errors.Join(err[:]...) != nil {
		return d, fmt.Errorf("pingpong: malformed address message %q: %w", b, unix.EPROTO)
	}
	return d, nil
}

// exchangeOpts are the flags pingpong and rdma-check share: the role,
// the TCP port of the exchange, the size, the peer table entry, the bound
// on waits; after parse, the host (empty for the server) and the size.
type exchangeOpts struct {
	server  bool
	port    int
	sizeArg string
	peer    int
	timeout time.Duration

	host string
	size int
}

func (o *exchangeOpts) flags(fs *flag.FlagSet, port int, sizeWhat string) {
	fs.BoolVar(&o.server, "server", false, "wait for the peer (the default without HOST)")
	fs.IntVar(&o.port, "p", port, "TCP port of the exchange")
	fs.IntVar(&o.port, "port", port, "TCP port of the exchange")
	fs.StringVar(&o.sizeArg, "s", "4096", sizeWhat)
	fs.StringVar(&o.sizeArg, "size", "4096", sizeWhat)
	fs.IntVar(&o.peer, "peer", 1, "peer table entry to use for the remote end")
	fs.DurationVar(&o.timeout, "timeout", 30*time.Second, "bound on the exchange and on each wait for a completion")
}

// parse parses args and checks the shared flags; cmd names the command.
func (o *exchangeOpts) parse(cmd string, fs *flag.FlagSet, args []string) error {
	pos, err := parseArgs(fs, args, 0, 1)
	if err != nil {
		return err
	}
	if o.server == (len(pos) == 1) {
		return usageErr("%s: either --server or HOST", cmd)
	}
	if len(pos) == 1 {
		o.host = pos[0]
	}
	if o.size, err = parseSize("size", o.sizeArg); err != nil {
		return err
	}
	if o.size < 1 || o.size > 1<<30 {
		return usageErr("%s: size %d out of range", cmd, o.size)
	}
	if o.port < 1 || o.port > 65535 {
		return usageErr("%s: port %d", cmd, o.port)
	}
	return nil
}

// portDevice is the session's device and its network port's address.
func portDevice(s *session, cmd string) (*attach.Attached, netip.AddrPort, error) {
	a, err := s.device()
	if err != nil {
		return nil, netip.AddrPort{}, err
	}
	own, err := a.Device.PortAddr()
	if err != nil {
		return nil, own, fmt.Errorf("%s: the device has no network port (--port udp:ADDR): %w", cmd, err)
	}
	return a, own, nil
}

func cmdPingpong(s *session, args []string) (_ obj, err error) {
	fs := newFlags("pingpong")
	var o exchangeOpts
	o.flags(fs, ppDefaultPort, "message size")
	iters := fs.Int("n", 1000, "exchanges")
	fs.IntVar(iters, "iters", 1000, "exchanges")
	rxDepth := fs.Int("r", 500, "receives posted at a time")
	fs.IntVar(rxDepth, "rx-depth", 500, "receives posted at a time")
	gidIdx := fs.Int("g", 0, "local GID index (the port has one: 0)")
	fs.IntVar(gidIdx, "gid-idx", 0, "local GID index (the port has one: 0)")
	mtu := fs.Int("m", 1024, "path MTU (the port's: 1024)")
	fs.IntVar(mtu, "mtu", 1024, "path MTU (the port's: 1024)")
	chk := fs.Bool("c", false, "the peer runs with --chk: its first message has 0 at every page start")
	fs.BoolVar(chk, "chk", false, "the peer runs with --chk")
	if err := o.parse("pingpong", fs, args); err != nil {
		return nil, err
	}
	switch {
	case *iters < 1 || *rxDepth < 1 || *rxDepth > 4096:
		return nil, usageErr("pingpong: iters and rx-depth (1..4096) must be positive")
	case *gidIdx != 0:
		return nil, usageErr("pingpong: GID index %d: the port has one GID, 0", *gidIdx)
	case *mtu != 1024:
		return nil, usageErr("pingpong: MTU %d: the port's path MTU is 1024", *mtu)
	}
	a, own, err := portDevice(s, "pingpong")
	if err != nil {
		return nil, err
	}
	size := o.size
	pp, err := newPingpong(s.ctx, a.Device, size, *rxDepth, o.timeout)
	if err != nil {
		return nil, err
	}
	defer cleanup(&err, "pingpong teardown", pp.close)
	me := ppDest{qpn: pp.qpn, psn: rand.Uint32() & 0xFFFFFF, gid: own.Addr().As16()}

	ctx, cancel := context.WithTimeout(s.ctx, o.timeout)
	defer cancel()
	connect := func(rem ppDest) error {
		return pp.connect(a.Device, o.peer, rem, me.psn)
	}
	rem, err := ppExchange(ctx, o.host, o.port, me, connect, func() {
		// As ibv_rc_pingpong prints it, once the port listens (on
		// stderr: stdout has the result).
		_, _ = fmt.Fprintf(s.p.errOut, "  local address:  LID 0x%04x, QPN 0x%06x, PSN 0x%06x, GID %s\n",
			me.lid, me.qpn, me.psn, own.Addr().String()) // informational
	})
	if err != nil {
		return nil, err
	}
	start := time.Now()
	checked, err := pp.run(s.ctx, o.host != "", *iters, *chk)
	if err != nil {
		return nil, err
	}
	el := time.Since(start)
	co, err := netCounters(a.Device)
	if err != nil {
		return nil, err
	}
	bytes := int64(size) * int64(*iters) * 2
	return obj{{"local", me.String()}, {"remote", rem.String()},
		{"peer_addr", netip.AddrFrom16(rem.gid).Unmap().String()},
		{"size", size}, {"iters", *iters}, {"bytes", bytes}, {"seconds", el.Seconds()},
		{"mbit_per_s", float64(bytes) * 8 / float64(el.Microseconds()+1)},
		{"usec_per_iter", float64(el.Microseconds()) / float64(*iters)},
		{"checked", checked}, {"counters", co}}, nil
}

// exchangeConn is the TCP connection of an exchange: to host:port, or
// with host empty the one client accepted on port (listening is called
// once the port listens). Its deadline is ctx's.
func exchangeConn(ctx context.Context, host string, port int, listening func()) (net.Conn, error) {
	var c net.Conn
	if host != "" {
		var d net.Dialer
		var err error
		if c, err = d.DialContext(ctx, "tcp", net.JoinHostPort(host, strconv.Itoa(port))); err != nil {
			return nil, err
		}
	} else {
		var lc net.ListenConfig
		l, err := lc.Listen(ctx, "tcp", ":"+strconv.Itoa(port))
		if err != nil {
			return nil, err
		}
		listening()
		stop := context.AfterFunc(ctx, func() { _ = l.Close() }) // unblocks Accept
		c, err = l.Accept()
		stop()
		_ = l.Close() // one client
		if err != nil {
			if ctx.Err() != nil {
				err = fmt.Errorf("%w: %w", ctx.Err(), unix.ETIMEDOUT)
			}
			return nil, fmt.Errorf("waiting for a client: %w", err)
		}
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl) // a TCP conn always takes a deadline
	}
	return c, nil
}

// ppExchange is the exchange as client (host given: write, read, connect
// the QP, write done) or server (read, connect the QP, write, read done).
func ppExchange(ctx context.Context, host string, port int, me ppDest, connect func(ppDest) error, listening func()) (ppDest, error) {
	c, err := exchangeConn(ctx, host, port, listening)
	if err != nil {
		return ppDest{}, fmt.Errorf("pingpong: %w", err)
	}
	defer func() { _ = c.Close() }() // the exchange is over: its errors were seen
	send := func() error {
		if _, err := c.Write(me.wire()); err != nil {
			return fmt.Errorf("pingpong: sending the local address: %w", err)
		}
		return nil
	}
	if host != "" {
		if err := send(); err != nil {
			return ppDest{}, err
		}
	}
	msg := make([]byte, ppMsgLen)
	if _, err := io.ReadFull(c, msg); err != nil {
		return ppDest{}, fmt.Errorf("pingpong: reading the remote address: %w", err)
	}
	rem, err := parsePPDest(msg)
	if err != nil {
		return ppDest{}, err
	}
	if host != "" {
		if _, err := c.Write([]byte("done\x00")); err != nil {
			return ppDest{}, fmt.Errorf("pingpong: sending done: %w", err)
		}
		return rem, connect(rem)
	}
	if err := connect(rem); err != nil {
		return ppDest{}, err
	}
	if err := send(); err != nil {
		return ppDest{}, err
	}
	done := make([]byte, 5)
	if _, err := io.ReadFull(c, done); err != nil || string(done) != "done\x00" {
		return ppDest{}, fmt.Errorf("pingpong: no done from the client (%q, %v): %w", done, err, unix.EPROTO)
	}
	return rem, nil
}

// pingpong is the gohfi end: one file, a CQ, an RC QP, a send buffer and
// rxDepth receive slots in one MR.
type pingpong struct {
	f        *driver.File
	cq, qp   uint32
	qpn      uint32
	buf      *mem.Buffer
	mr       uapi.GohfiRegMR
	size     int
	rxDepth  int
	timeout  time.Duration
	access   uint32 // the QP's remote access (MODIFY_QP sets it at every transition)
	posted   int    // receives posted so far (slot = count % rxDepth)
	received int
}

func newPingpong(ctx context.Context, dev *driver.Device, size, rxDepth int, timeout time.Duration) (*pingpong, error) {
	pp, err := newVerbsEnd(dev, size, size*(rxDepth+1), rxDepth, uapi.IB_ACCESS_LOCAL_WRITE, 0, timeout)
	if err != nil {
		return nil, err
	}
	// Receives before the exchange, as the stock program posts them:
	// the peer may send as soon as it is connected.
	if err := pp.postRecvs(rxDepth); err != nil {
		return nil, errors.Join(err, pp.close())
	}
	return pp, nil
}

// newVerbsEnd opens a file with a CQ, an RC QP in INIT (remote access
// qpAccess) and a buffer of bufLen bytes registered with mrAccess (its
// IOVA is its address, as ibv_reg_mr's).
func newVerbsEnd(dev *driver.Device, size, bufLen, rxDepth int, mrAccess, qpAccess uint32, timeout time.Duration) (_ *pingpong, err error) {
	pp := &pingpong{size: size, rxDepth: rxDepth, timeout: timeout, access: qpAccess}
	defer func() {
		if err != nil {
			err = errors.Join(err, pp.close())
		}
	}()
	if pp.f, err = dev.Open(); err != nil {
		return nil, err
	}
	if err := hfiuser.AssignCtxt(pp.f); err != nil {
		return nil, fmt.Errorf("ASSIGN_CTXT: %w", err)
	}
	if pp.cq, _, err = hfiuser.CreateCQ(pp.f, uint32(rxDepth+2), 0); err != nil {
		return nil, fmt.Errorf("CREATE_CQ: %w", err)
	}
	r, err := hfiuser.CreateQP(pp.f, uapi.GohfiCreateQP{QPType: uapi.GOHFI_QPT_RC, SendCQ: pp.cq, RecvCQ: pp.cq,
		MaxSendWR: 2, MaxRecvWR: uint32(max(rxDepth, 1)), MaxSendSge: 1, MaxRecvSge: 1})
	if err != nil {
		return nil, fmt.Errorf("CREATE_QP: %w", err)
	}
	pp.qp, pp.qpn = r.Handle, r.QPNum
	if pp.buf, err = mem.Alloc(bufLen); err != nil {
		return nil, err
	}
	if pp.mr, err = hfiuser.RegMR(pp.f, pp.buf.Addr(), uint64(pp.buf.Len()), uint64(pp.buf.Addr()), mrAccess); err != nil {
		return nil, fmt.Errorf("REG_MR: %w", err)
	}
	if err := hfiuser.ModifyQP(pp.f, uapi.GohfiModifyQP{Handle: pp.qp, QPState: uapi.GOHFI_QPS_INIT, AccessFlags: qpAccess}); err != nil {
		return nil, fmt.Errorf("MODIFY_QP to INIT: %w", err)
	}
	return pp, nil
}

// connect takes the QP to RTR and RTS towards rem through peer table
// entry peer, with ibv_rc_pingpong's attributes (min_rnr_timer 12,
// timeout 14, retry_cnt 7, rnr_retry 7).
func (pp *pingpong) connect(dev *driver.Device, peer int, rem ppDest, psn uint32) error {
	addr := netip.AddrFrom16(rem.gid).Unmap()
	if addr.IsUnspecified() {
		return fmt.Errorf("pingpong: the peer sent no GID (run ibv_rc_pingpong with -g INDEX of its RoCE v2 GID): %w", unix.EINVAL)
	}
	if err := dev.SetPeer(peer, netip.AddrPortFrom(addr, ibwire.UDPPort)); err != nil {
		return fmt.Errorf("pingpong: peer %d: %w", peer, err)
	}
	err := hfiuser.ModifyQP(pp.f, uapi.GohfiModifyQP{Handle: pp.qp, QPState: uapi.GOHFI_QPS_RTR, DestQPNum: rem.qpn,
		DestPort: uint32(peer), RqPsn: rem.psn, AccessFlags: pp.access, Flags: uapi.GOHFI_MODIFY_QP_NET,
		Timeout: 14, RetryCnt: 7, RnrRetry: 7, MinRnrTimer: 12})
	if err != nil {
		return fmt.Errorf("MODIFY_QP to RTR: %w", err)
	}
	if err := hfiuser.ModifyQP(pp.f, uapi.GohfiModifyQP{Handle: pp.qp, QPState: uapi.GOHFI_QPS_RTS, SqPsn: psn, AccessFlags: pp.access}); err != nil {
		return fmt.Errorf("MODIFY_QP to RTS: %w", err)
	}
	return nil
}

func (pp *pingpong) close() error {
	var errs []error
	if pp.f != nil {
		errs = append(errs, pp.f.Close()) // destroys the QP, CQ and MR
		pp.f = nil
	}
	if pp.buf != nil {
		errs = append(errs, pp.buf.Close())
		pp.buf = nil
	}
	return errors.Join(errs...)
}

func (pp *pingpong) sendSlot() []byte { return pp.buf.Bytes()[:pp.size] }

func (pp *pingpong) recvSlot(i int) []byte {
	off := pp.size * (1 + i%pp.rxDepth)
	return pp.buf.Bytes()[off : off+pp.size]
}

func (pp *pingpong) postRecvs(n int) error {
	wrs := make([]hfiuser.RecvWR, n)
	sgl := make([]uapi.GohfiSge, n)
	for k := range wrs {
		slot := pp.recvSlot(pp.posted + k)
		clear(slot)
		sgl[k] = uapi.GohfiSge{Addr: uint64(pp.buf.Addr()) + uint64(pp.size*(1+(pp.posted+k)%pp.rxDepth)),
			Length: uint32(pp.size), Lkey: pp.mr.Lkey}
		wrs[k].SGL = sgl[k : k+1]
		wrs[k].WrID = ppRecvWRID
	}
	k, err := hfiuser.PostRecv(pp.f, pp.qp, wrs)
	pp.posted += k
	if err != nil {
		return fmt.Errorf("POST_RECV (%d of %d posted): %w", k, n, err)
	}
	return nil
}

// fill writes message i into the send buffer: 0 at every page start,
// elsewhere a pattern of i and the offset.
func (pp *pingpong) fill(i int) {
	b := pp.sendSlot()
	for k := range b {
		if k%ppPage == 0 {
			b[k] = 0
		} else {
			b[k] = byte(i*131 + k*7 + k>>8 + 1)
		}
	}
}

// run is the stock program's loop: the client sends first; a send is
// posted when the previous send and a receive have completed. It returns
// how many received messages were checked.
func (pp *pingpong) run(ctx context.Context, client bool, iters int, chk bool) (int, error) {
	pending := ppRecvWRID
	scnt, rcnt := 0, 0
	var last []byte // what this side sent last
	send := func() error {
		pp.fill(scnt)
		last = append(last[:0], pp.sendSlot()...)
		sge := []uapi.GohfiSge{{Addr: uint64(pp.buf.Addr()), Length: uint32(pp.size), Lkey: pp.mr.Lkey}}
		w := hfiuser.SendWR{SGL: sge}
		w.WrID, w.Opcode, w.SendFlags = ppSendWRID, uapi.GOHFI_WR_SEND, uapi.GOHFI_SEND_SIGNALED
		if _, err := hfiuser.PostSend(pp.f, pp.qp, []hfiuser.SendWR{w}); err != nil {
			return fmt.Errorf("POST_SEND of message %d: %w", scnt, err)
		}
		pending = ppRecvWRID | ppSendWRID
		return nil
	}
	if client {
		if err := send(); err != nil {
			return 0, err
		}
	}
	outstanding := pp.posted - pp.received
	for rcnt < iters || scnt < iters {
		wc, err := pp.waitWC(ctx, fmt.Sprintf("%d sent, %d received of %d", scnt, rcnt, iters))
		if err != nil {
			return rcnt, err
		}
		switch wc.WrID {
		case ppSendWRID:
			scnt++
		case ppRecvWRID:
			got := pp.recvSlot(pp.received)
			if int(wc.ByteLen) != pp.size {
				return rcnt, fmt.Errorf("pingpong: message %d has %d bytes, want %d: %w", rcnt, wc.ByteLen, pp.size, unix.EIO)
			}
			if err := pp.check(got, last, rcnt, client, chk); err != nil {
				return rcnt, err
			}
			pp.received++
			rcnt++
			if outstanding--; outstanding <= 1 {
				k := pp.rxDepth - outstanding
				if err := pp.postRecvs(k); err != nil {
					return rcnt, err
				}
				outstanding += k
			}
		default:
			return rcnt, fmt.Errorf("pingpong: completion for unknown wr_id %d: %w", wc.WrID, unix.EIO)
		}
		pending &^= int(wc.WrID)
		if scnt < iters && pending == 0 {
			if err := send(); err != nil {
				return rcnt, err
			}
		}
	}
	return rcnt, nil
}

// waitWC waits for the next completion (pp.timeout at most) and fails
// on an error status; doing says what was going on, for the errors.
func (pp *pingpong) waitWC(ctx context.Context, doing string) (uapi.GohfiWC, error) {
	wc := make([]uapi.GohfiWC, 1)
	for {
		n, err := hfiuser.PollCQ(pp.f, pp.cq, wc)
		if err != nil {
			return wc[0], fmt.Errorf("POLL_CQ: %w", err)
		}
		if n == 1 {
			if wc[0].Status != uapi.GOHFI_WC_SUCCESS {
				return wc[0], fmt.Errorf("completion of wr_id %d (%s): %s (vendor error %d): %w", wc[0].WrID, doing,
					wcStatusStr(wc[0].Status), wc[0].VendorErr, unix.EIO)
			}
			return wc[0], nil
		}
		wctx, cancel := context.WithTimeout(ctx, pp.timeout)
		_, err = pp.f.Poll(wctx)
		cancel()
		if err != nil {
			if errors.Is(err, context.DeadlineExceeded) {
				err = unix.ETIMEDOUT
			}
			return wc[0], fmt.Errorf("waiting for a completion (%s): %w", doing, err)
		}
	}
}

// check compares received message i with what it must be: what this side
// sent last, or for the server's first message (the client's initial
// buffer) 0x7b bytes with, under --chk, 0 at every page start.
func (pp *pingpong) check(got, last []byte, i int, client, chk bool) error {
	want := last
	if !client && i == 0 {
		want = make([]byte, pp.size)
		for k := range want {
			want[k] = ppInitByte
			if chk && k%ppPage == 0 {
				want[k] = 0
			}
		}
	}
	for k := range got {
		if got[k] != want[k] {
			return fmt.Errorf("pingpong: message %d differs at byte %d: %#02x, want %#02x: %w", i, k, got[k], want[k], unix.EIO)
		}
	}
	return nil
}
