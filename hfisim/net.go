package hfisim

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/ibwire"
	"golang.org/x/sys/unix"
)

// The network port (chip/net.go, docs/fabric.md): RoCEv2 datagrams through
// a UDP socket. A QP whose QPDest port is not 0 is a network QP: its
// requester (rc_req.go) sends its packets out of the port, and the packets
// that arrive for it are checked here and handed to its responder
// (rc_resp.go) or, for acknowledgements and READ responses, to its
// requester. Everything runs on the engine goroutine except the socket's
// reader, which only queues datagrams.

const (
	// netPMTU is the payload of one packet on the wire: IB MTU 1024, as
	// rxe picks on a 1500-byte Ethernet MTU (4 KiB would not fit a frame).
	netPMTU = 1024
	// netRxQueue bounds the datagrams waiting for the engine; more is a
	// flood, dropped and counted.
	netRxQueue = 4096
	// netRxBatch is how many datagrams the engine handles per pass
	// before the QPs' send queues get a turn.
	netRxBatch = 256
	// maxDatagram is the largest IB packet the port sends or accepts.
	maxDatagram = netPMTU + 64
	// netTxBatch is how many packets the engine queues before it sends
	// them (one sendmmsg); it sends what it has at the end of each pass.
	netTxBatch = 64
	// netRxMmsg is how many datagrams one recvmmsg reads, into buffers of
	// netRxBufSize: room for the largest packet the port accepts and its
	// IPv4 header; a longer one comes truncated and is a length drop.
	netRxMmsg    = 64
	netRxBufSize = 2048
)

// link is what the port sends through: a UDP socket, or in tests an
// in-process lossy wire. send sends a batch of datagrams, in order; one
// the link refuses is lost, and the rest still go.
type link interface {
	send(b []txDatagram) error
	close() error
}

// txDatagram is a packet the engine queued for sending.
type txDatagram struct {
	to netip.AddrPort
	b  []byte
}

// netPort is a device's network port.
type netPort struct {
	local netip.AddrPort
	link  link
	rx    chan rxDatagram
	bufs  sync.Pool
	cnt   [chip.NetCntNum]atomic.Uint64

	// Guarded by Device.mu.
	peers   [chip.MaxPeers + 1]peerEntry
	attr    []uint64  // QPNetAttr per QP
	latch   []netPeer // the peer and attributes a QP latched at RTR/RTS
	retrans []uint64  // QPNetRetrans per QP

	// Engine goroutine only.
	rc      []rcQP
	txBufs  [netTxBatch][]byte // the packets queued for sending
	txq     []txDatagram       // the queue, sent by flushTx
	txPk    ibwire.Packet      // the packet transmit encodes (a copy: the caller's stays on its stack)
	rxPk    ibwire.Packet      // the packet receive decodes
	spans   []span             // a packet's translation at the responder (scratch: used at once; a 1 KiB packet spans 2 pages at most)
	payload []byte             // a packet's payload, read from host memory
	mv      mover              // the backing arrays of the translations the shared helpers make (mover.go); the port moves no bytes through it
	timer   *time.Timer
	due     time.Time // when timer fires (zero: stopped)
}

type peerEntry struct{ gidHi, gidLo, port uint64 }

// netPeer is a network QP's remote end as it latched it.
type netPeer struct {
	addr netip.AddrPort
	attr uint64
}

type rxDatagram struct {
	from netip.AddrPort
	ip   ipv4Var
	b    []byte
	buf  *[]byte
}

// ipv4Var is what an IPv4 header had that the ICRC covers and the sender
// chose: the identification and the don't-fragment bit. Linux sends a
// UDP socket's DF datagrams with identification 0; rdma_rxe builds its
// own headers and numbers them (__ip_select_ident), so only a receiver
// that sees the header can check rxe's ICRC.
type ipv4Var struct {
	id uint16
	df bool
}

// udpSocketIPv4 is what a receiver that only has a UDP socket assumes.
var udpSocketIPv4 = ipv4Var{df: true}

// ParsePort parses a --port argument: "udp:ADDR[:PORT]" (an IPv6 address
// in brackets when a port follows), port 4791 by default. The address must
// be a specific one, not a wildcard: it is the source of the ICRC.
func ParsePort(s string) (netip.AddrPort, error) {
	rest, ok := strings.CutPrefix(s, "udp:")
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("hfisim: port %q: want udp:ADDR[:PORT]", s)
	}
	if ap, err := netip.ParseAddrPort(rest); err == nil {
		return checkPortAddr(s, ap)
	}
	a, err := netip.ParseAddr(rest)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("hfisim: port %q: %w", s, err)
	}
	return checkPortAddr(s, netip.AddrPortFrom(a, ibwire.UDPPort))
}

func checkPortAddr(s string, ap netip.AddrPort) (netip.AddrPort, error) {
	a := ap.Addr().Unmap()
	if a.IsUnspecified() || a.IsMulticast() || a.Zone() != "" {
		return netip.AddrPort{}, fmt.Errorf("hfisim: port %q: want a unicast address of this host", s)
	}
	return netip.AddrPortFrom(a, ap.Port()), nil
}

// udpLink is the port's UDP socket. An IPv4 port receives through a raw
// IPPROTO_UDP socket when it may (CAP_NET_RAW): the datagrams come with
// their IP header, whose identification the ICRC covers; the UDP socket
// stays bound (so that the kernel answers no ICMP port unreachable) with
// a filter that drops what it would receive, and sends.
type udpLink struct {
	conn *net.UDPConn
	raw  *os.File // nil: the UDP socket receives
	wg   sync.WaitGroup

	// Sending: the engine goroutine only.
	wconn      syscall.RawConn
	v6         bool // the socket is AF_INET6
	tx         *mmsg
	txOff, txN int                // the batch's next message, its length
	txSent     int                // what the last sendmmsg sent
	txErr      error              // and its error
	txFn       func(uintptr) bool // the sendmmsg call, made once
}

// openUDP binds the port's socket: don't-fragment always (RoCEv2 packets
// are never fragmented, and the ICRC covers the IPv4 DF bit and, with
// DF, the zero identification Linux then sends).
func openUDP(local netip.AddrPort) (*udpLink, error) {
	lc := net.ListenConfig{Control: func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			if local.Addr().Is4() {
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_DO)
			} else {
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_MTU_DISCOVER, unix.IP_PMTUDISC_DO)
			}
		})
		return errors.Join(err, serr)
	}}
	pc, err := lc.ListenPacket(context.Background(), "udp", local.String())
	if err != nil {
		return nil, fmt.Errorf("hfisim: port %v: %w", local, err)
	}
	conn := pc.(*net.UDPConn)
	// Room for bursts: a READ response or a go-back is a burst of
	// packets; a datagram the receiving socket has no room for is lost,
	// and a sender whose socket is full blocks (on loopback and veth a
	// datagram counts against its sender until it is read), holding up
	// the engine. As root the sizes are forced past net.core.rmem_max and
	// wmem_max; otherwise the kernel caps them (an error would say nothing
	// the cap does not).
	if rc, err := conn.SyscallConn(); err == nil {
		_ = rc.Control(func(fd uintptr) {
			if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, netSocketBuf) != nil {
				_ = conn.SetReadBuffer(netSocketBuf) // capped, not refused
			}
			if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, netSocketBuf) != nil {
				_ = conn.SetWriteBuffer(netSocketBuf) // capped, not refused
			}
		})
	}
	wconn, err := conn.SyscallConn()
	if err != nil {
		_ = conn.Close() // never used
		return nil, fmt.Errorf("hfisim: port %v: %w", local, err)
	}
	l := &udpLink{conn: conn, wconn: wconn, tx: newMmsg(netTxBatch, 0)}
	l.txFn = func(fd uintptr) bool {
		l.txSent, l.txErr = l.tx.sendmmsg(int(fd), l.txOff, l.txN)
		return l.txErr != unix.EAGAIN
	}
	var serr error
	if err := wconn.Control(func(fd uintptr) {
		var sa unix.Sockaddr
		sa, serr = unix.Getsockname(int(fd))
		_, l.v6 = sa.(*unix.SockaddrInet6)
	}); err != nil || serr != nil {
		_ = conn.Close() // never used
		return nil, fmt.Errorf("hfisim: port %v: %w", local, errors.Join(err, serr))
	}
	if local.Addr().Is4() {
		bound := conn.LocalAddr().(*net.UDPAddr).AddrPort()
		raw, err := openRaw(netip.AddrPortFrom(local.Addr(), bound.Port()))
		switch {
		case err == nil:
			l.raw = raw
			if err := filterSocket(conn, dropAll); err != nil {
				_ = raw.Close()  // never read
				_ = conn.Close() // never used
				return nil, fmt.Errorf("hfisim: port %v: %w", local, err)
			}
		case errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES):
			// Without CAP_NET_RAW the UDP socket receives, and the ICRC
			// is checked against identification 0: other hfisim ports
			// and Linux UDP sockets, not rdma_rxe (docs/fabric.md).
		default:
			_ = conn.Close() // never used
			return nil, fmt.Errorf("hfisim: port %v: raw socket: %w", local, err)
		}
	}
	return l, nil
}

// dropAll is a socket filter that accepts nothing.
var dropAll = []unix.SockFilter{{Code: unix.BPF_RET | unix.BPF_K, K: 0}}

// rawFilter accepts IPv4 UDP datagrams to local, not fragments (the raw
// socket sees packets after reassembly, but a filter costs nothing).
func rawFilter(local netip.AddrPort) []unix.SockFilter {
	a := local.Addr().As4()
	addr := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	const drop, accept = 0, 0xFFFF
	return []unix.SockFilter{
		{Code: unix.BPF_LD | unix.BPF_B | unix.BPF_ABS, K: 9},                 // protocol
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jt: 0, Jf: 7, K: 17}, // UDP
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: 16},                // destination
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jt: 0, Jf: 5, K: addr},
		{Code: unix.BPF_LD | unix.BPF_H | unix.BPF_ABS, K: 6}, // flags, fragment offset
		{Code: unix.BPF_JMP | unix.BPF_JSET | unix.BPF_K, Jt: 3, Jf: 0, K: 0x3FFF},
		{Code: unix.BPF_LDX | unix.BPF_B | unix.BPF_MSH, K: 0}, // X = header length
		{Code: unix.BPF_LD | unix.BPF_H | unix.BPF_IND, K: 2},  // UDP destination port
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jt: 1, Jf: 0, K: uint32(local.Port())},
		{Code: unix.BPF_RET | unix.BPF_K, K: drop},
		{Code: unix.BPF_RET | unix.BPF_K, K: accept},
	}
}

// openRaw opens the raw IPPROTO_UDP socket that receives local's
// datagrams with their IPv4 headers. A raw socket receives from its
// creation on: what it queued before its filter was attached is drained.
func openRaw(local netip.AddrPort) (*os.File, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_UDP)
	if err != nil {
		return nil, err
	}
	f := rawFilter(local)
	prog := unix.SockFprog{Len: uint16(len(f)), Filter: &f[0]}
	err = unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, &prog)
	if err == nil {
		err = unix.Bind(fd, &unix.SockaddrInet4{Addr: local.Addr().As4()})
	}
	if err == nil && unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, netSocketBuf) != nil {
		err = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, netSocketBuf)
	}
	if err != nil {
		_ = unix.Close(fd) // never used
		return nil, err
	}
	// What arrived before the filter was attached is not the port's.
	var b [1]byte
	for {
		if _, _, err := unix.Recvfrom(fd, b[:], 0); err != nil {
			break // EAGAIN: empty
		}
	}
	// Non-blocking: the runtime's poller waits, and Close ends a Read.
	return os.NewFile(uintptr(fd), "hfisim-raw-"+local.String()), nil
}

// filterSocket attaches filter f to conn.
func filterSocket(conn *net.UDPConn, f []unix.SockFilter) error {
	rc, err := conn.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		prog := unix.SockFprog{Len: uint16(len(f)), Filter: &f[0]}
		serr = unix.SetsockoptSockFprog(int(fd), unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, &prog)
	})
	return errors.Join(err, serr)
}

// netSocketBuf is the port socket's receive buffer.
const netSocketBuf = 8 << 20

// send sends b with as few sendmmsg calls as the socket takes; a full
// socket buffer waits in the runtime's poller, as a blocking send would.
// A datagram the kernel refuses (sendmmsg fails on it) is lost and the
// rest go on; the error is the socket's end.
func (l *udpLink) send(b []txDatagram) error {
	for i := range b {
		l.tx.setSend(i, b[i].to, b[i].b, l.v6)
	}
	l.txOff, l.txN = 0, len(b)
	for l.txOff < l.txN {
		err := l.wconn.Write(l.txFn)
		switch {
		case err != nil:
			return err // closed
		case l.txErr == unix.EINTR:
		case l.txErr != nil:
			l.txOff++ // refused (EMSGSIZE, an ICMP error): lost, as on a wire
		default:
			l.txOff += l.txSent
		}
	}
	return nil
}

func (l *udpLink) close() error {
	err := l.conn.Close()
	if l.raw != nil {
		err = errors.Join(err, l.raw.Close())
	}
	l.wg.Wait()
	return err
}

// readLoop queues every datagram for the engine until the socket closes,
// a batch per recvmmsg. The engine is woken by the batch's first datagram
// (it works while the rest are queued; a pending wake-up absorbs the
// others' kicks).
func (l *udpLink) readLoop(d *Device) {
	defer l.wg.Done()
	var rc syscall.RawConn
	var err error
	if l.raw != nil {
		rc, err = l.raw.SyscallConn()
	} else {
		rc, err = l.conn.SyscallConn()
	}
	if err != nil {
		return // closed already
	}
	m := newMmsg(netRxMmsg, netRxBufSize)
	var n int
	var rerr error
	recv := func(fd uintptr) bool { // one closure for all batches: no allocation per batch
		n, rerr = m.recvmmsg(int(fd))
		return rerr != unix.EAGAIN
	}
	for {
		if err := rc.Read(recv); err != nil {
			return // closed
		}
		if rerr != nil {
			continue // ICMP errors surface here (ECONNREFUSED): the packet is lost, as on a wire
		}
		for i := range n {
			b := m.bufs[i][:min(int(m.hdrs[i].Len), len(m.bufs[i]))]
			trunc := m.hdrs[i].Hdr.Flags&unix.MSG_TRUNC != 0
			if l.raw != nil {
				l.rawInput(d, b, trunc)
				continue
			}
			if trunc {
				d.net.count(chip.NetCntRxPkts)
				d.net.count(chip.NetCntDropLength)
				continue
			}
			d.netInput(m.from(i), b)
		}
	}
}

// rawInput queues a datagram of the raw socket: an IPv4 datagram with its
// header, the kernel's filter having let through UDP to the port's
// address and port only. The headers are checked again here (a filter is
// not a parser): a datagram that is not UDP to the port, or is a
// fragment, is dropped as not RoCE (NetCntDropHeader), one shorter than
// its headers say, or longer than the receive buffer (trunc), as a length
// error.
func (l *udpLink) rawInput(d *Device, b []byte, trunc bool) {
	if trunc {
		d.net.count(chip.NetCntRxPkts)
		d.net.count(chip.NetCntDropLength)
		return
	}
	from, ip, ib, cnt := splitIPv4UDP(b, d.net.local)
	if cnt >= 0 {
		d.net.count(chip.NetCntRxPkts)
		d.net.count(cnt)
		return
	}
	d.netInputIP(from, ip, ib)
}

// splitIPv4UDP takes an IPv4 datagram apart: its source, the header
// fields the ICRC needs, and the UDP payload. cnt is the drop counter
// when it is not for local, has IP options or is malformed, else -1.
func splitIPv4UDP(b []byte, local netip.AddrPort) (from netip.AddrPort, ip ipv4Var, payload []byte, cnt int) {
	if len(b) < 20+8 || b[0]>>4 != 4 {
		return from, ip, nil, chip.NetCntDropLength
	}
	hl := int(b[0]&0x0F) * 4
	total := int(b[2])<<8 | int(b[3])
	if hl < 20 || total < hl+8 || total > len(b) {
		return from, ip, nil, chip.NetCntDropLength
	}
	if hl != 20 { // IPv4 options: not RoCEv2 (ibwire refuses them too)
		return from, ip, nil, chip.NetCntDropHeader
	}
	frag := uint16(b[6])<<8 | uint16(b[7])
	dst := netip.AddrFrom4([4]byte(b[16:20]))
	u := b[hl:total]
	dport := uint16(u[2])<<8 | uint16(u[3])
	if b[9] != unix.IPPROTO_UDP || frag&0x3FFF != 0 || dst != local.Addr() || dport != local.Port() {
		return from, ip, nil, chip.NetCntDropHeader
	}
	if ulen := int(u[4])<<8 | int(u[5]); ulen != len(u) {
		return from, ip, nil, chip.NetCntDropLength
	}
	from = netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[12:16])), uint16(u[0])<<8|uint16(u[1]))
	return from, ipv4Var{id: uint16(b[4])<<8 | uint16(b[5]), df: frag&0x4000 != 0}, u[8:], -1
}

// newNetPort makes the port of a device with nqps QPs on link l.
func newNetPort(local netip.AddrPort, l link, nqps int) *netPort {
	p := &netPort{local: local, link: l, rx: make(chan rxDatagram, netRxQueue),
		attr: make([]uint64, nqps), latch: make([]netPeer, nqps), retrans: make([]uint64, nqps),
		rc: make([]rcQP, nqps), txq: make([]txDatagram, 0, netTxBatch), payload: make([]byte, netPMTU),
		spans: make([]span, 0, 4)}
	p.bufs.New = func() any { b := make([]byte, maxDatagram); return &b }
	for i := range p.txBufs {
		p.txBufs[i] = make([]byte, maxDatagram)
	}
	for i := range p.attr {
		p.attr[i] = defaultNetAttr
	}
	return p
}

// defaultNetAttr is QPNetAttr after reset: timeout 14 (67 ms), 7 retries,
// RNR retries without limit, RNR timer code 12 (640 us).
var defaultNetAttr = chip.QPNetAttrValue(14, 7, 7, 12)

// startNet opens the port of d: the UDP socket of cfg.Port, or l (tests).
func (d *Device) startNet(l link) error {
	local := d.cfg.Port
	if l == nil {
		u, err := openUDP(local)
		if err != nil {
			return err
		}
		if local.Port() == 0 { // an ephemeral port: the one the kernel chose
			local = u.conn.LocalAddr().(*net.UDPAddr).AddrPort()
			local = netip.AddrPortFrom(local.Addr().Unmap(), local.Port())
		}
		d.net = newNetPort(local, u, len(d.qps))
		u.wg.Add(1)
		go u.readLoop(d)
		return nil
	}
	d.net = newNetPort(local, l, len(d.qps))
	return nil
}

// stopNet closes the port after the engine stopped.
func (d *Device) stopNet() error {
	if d.net == nil {
		return nil
	}
	if d.net.timer != nil {
		d.net.timer.Stop()
	}
	return d.net.link.close()
}

// PortAddr is the address of the device's network port (invalid without
// one).
func (d *Device) PortAddr() netip.AddrPort {
	if d.net == nil {
		return netip.AddrPort{}
	}
	return d.net.local
}

func (p *netPort) count(i int) { p.cnt[i].Add(1) }

// NetCounter reads network counter i (chip.NetCnt*); 0 without a port.
func (d *Device) NetCounter(i int) uint64 {
	if d.net == nil || i < 0 || i >= chip.NetCntNum {
		return 0
	}
	return d.net.cnt[i].Load()
}

// netInput queues a datagram that arrived from from (copied: b is the
// caller's) and wakes the engine. A full queue drops it.
func (d *Device) netInput(from netip.AddrPort, b []byte) {
	d.netInputIP(from, udpSocketIPv4, b)
}

// netInputIP is netInput for a datagram whose IPv4 header was seen.
func (d *Device) netInputIP(from netip.AddrPort, ip ipv4Var, b []byte) {
	p := d.net
	p.count(chip.NetCntRxPkts)
	if len(b) > maxDatagram {
		p.count(chip.NetCntDropLength)
		return
	}
	buf := p.bufs.Get().(*[]byte)
	n := copy(*buf, b)
	select {
	case p.rx <- rxDatagram{from: netip.AddrPortFrom(from.Addr().Unmap(), from.Port()), ip: ip, b: (*buf)[:n], buf: buf}:
		d.kickEngine()
	default:
		p.bufs.Put(buf)
		p.count(chip.NetCntDropFlood)
	}
}

// netRegLocked reads the port's registers.
func (d *Device) netRegLocked(reg uint64) (uint64, bool) {
	p := d.net
	switch {
	case reg >= chip.RegNetGIDHi && reg <= chip.RegNetPMTU:
		if p == nil {
			return 0, true
		}
		hi, lo := chip.GIDWords(p.local.Addr())
		return [...]uint64{hi, lo, uint64(p.local.Port()), chip.MaxPeers, netPMTU}[(reg-chip.RegNetGIDHi)/8], true
	case reg >= chip.RegNetCntBase && reg < chip.RegNetCnt(chip.NetCntNum):
		if p == nil {
			return 0, true
		}
		return p.cnt[(reg-chip.RegNetCntBase)/8].Load(), true
	}
	if i, r, ok := peerReg(reg); ok {
		if p == nil {
			return 0, true
		}
		e := p.peers[i]
		return [...]uint64{e.gidHi, e.gidLo, e.port, 0}[r/8], true
	}
	if n, r, ok := d.qpNetReg(reg); ok {
		switch {
		case p == nil:
			return 0, true
		case r == chip.QPNetAttr:
			return p.attr[n], true
		case r == chip.QPNetRetrans:
			return p.retrans[n], true
		}
		return 0, true
	}
	return 0, false
}

// netWriteLocked writes the port's registers (false: not one of them).
func (d *Device) netWriteLocked(reg, v uint64) bool {
	p := d.net
	if i, r, ok := peerReg(reg); ok {
		if p == nil || i == 0 {
			return true
		}
		e := &p.peers[i]
		switch r {
		case chip.PeerGIDHi:
			e.gidHi = v
		case chip.PeerGIDLo:
			e.gidLo = v
		case chip.PeerUDPPort:
			e.port = v & (chip.PeerValid | 0xffff)
		}
		return true
	}
	if n, r, ok := d.qpNetReg(reg); ok {
		if p != nil && r == chip.QPNetAttr {
			p.attr[n] = v & chip.QPNetAttrValue(0xff, 0xff, 0xff, 0xff)
		}
		return true
	}
	return false
}

func peerReg(reg uint64) (int, uint64, bool) {
	if reg < chip.PeerBase || reg >= chip.PeerReg(chip.MaxPeers+1, 0) {
		return 0, 0, false
	}
	return int((reg - chip.PeerBase) / chip.PeerStride), (reg - chip.PeerBase) % chip.PeerStride, true
}

func (d *Device) qpNetReg(reg uint64) (int, uint64, bool) {
	if reg < chip.QPNetBase || reg >= chip.QPNetBase+uint64(len(d.qps))*chip.QPNetStride {
		return 0, 0, false
	}
	return int((reg - chip.QPNetBase) / chip.QPNetStride), (reg - chip.QPNetBase) % chip.QPNetStride, true
}

// peerLocked is peer table entry i as an address (ok false: no port, no
// such entry, not valid, or not of the port's address family).
func (d *Device) peerLocked(i uint32) (netip.AddrPort, bool) {
	p := d.net
	if p == nil || i == 0 || i > chip.MaxPeers {
		return netip.AddrPort{}, false
	}
	e := p.peers[i]
	if e.port&chip.PeerValid == 0 || uint16(e.port) == 0 {
		return netip.AddrPort{}, false
	}
	a := chip.GIDAddr(e.gidHi, e.gidLo)
	if a.Is4() != p.local.Addr().Is4() || a.IsUnspecified() || a.IsMulticast() {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(a, uint16(e.port)), true
}

// netLatchLocked is the port's part of a QP transition that succeeded: a
// network QP latches its peer at RTR and its attributes at RTR and RTS;
// RESET clears its retransmission counter.
func (d *Device) netLatchLocked(n int, to uint8) {
	p := d.net
	if p == nil {
		return
	}
	q := &d.qps[n]
	switch to {
	case stateReset:
		p.retrans[n] = 0
		p.latch[n] = netPeer{}
	case stateRTR:
		p.latch[n] = netPeer{attr: p.attr[n]}
		if q.destPort() != 0 {
			p.latch[n].addr, _ = d.peerLocked(q.destPort())
		}
	case stateRTS:
		p.latch[n].attr = p.attr[n]
	}
}

// resetNetLocked is the port at device reset: peers, attributes and
// counters cleared. The engine drops its transport state by the device
// generation.
func (d *Device) resetNetLocked() {
	p := d.net
	if p == nil {
		return
	}
	p.peers = [chip.MaxPeers + 1]peerEntry{}
	for i := range p.attr {
		p.attr[i], p.latch[i], p.retrans[i] = defaultNetAttr, netPeer{}, 0
	}
	for i := range p.cnt {
		p.cnt[i].Store(0)
	}
}

// isNetQPLocked reports whether q goes through the port.
func (d *Device) isNetQPLocked(q *qpState) bool { return d.net != nil && q.destPort() != 0 }

// transmit encodes pk for a peer, with its ICRC, and queues it; the queue
// goes out when it is full and at the end of the engine's pass (flushTx).
// A send the socket refuses is a packet lost on the wire.
func (d *Device) transmit(to netip.AddrPort, pk *ibwire.Packet) {
	p := d.net
	if len(p.txq) == netTxBatch {
		p.flushTx()
	}
	tx := p.txBufs[len(p.txq)]
	p.txPk = *pk // Encode's header table makes its packet escape: a copy in the port, not one per packet on the heap
	n, err := p.txPk.Encode(tx)
	if err != nil {
		panic(fmt.Sprintf("hfisim: encoding a packet the engine built: %v", err)) // a bug of the engine, never input
	}
	ip := ibwire.IPHeader{Src: p.local.Addr(), Dst: to.Addr(), DF: true}
	crc, err := ibwire.ComputeICRCPorts(&ip, p.local.Port(), to.Port(), tx[:n])
	if err != nil {
		panic(fmt.Sprintf("hfisim: ICRC of a packet the engine built: %v", err))
	}
	putLE32(tx[n-ibwire.ICRCLen:], crc)
	p.count(chip.NetCntTxPkts)
	p.txq = append(p.txq, txDatagram{to: to, b: tx[:n]})
}

// flushTx sends the queued packets. A refused send is a lost packet: the
// peer's silence retries it.
func (p *netPort) flushTx() {
	if len(p.txq) == 0 {
		return
	}
	_ = p.link.send(p.txq) // only a closed socket fails: the device is stopping
	p.txq = p.txq[:0]
}

func putLE32(b []byte, v uint32) {
	b[0], b[1], b[2], b[3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
}

// pollNet handles up to netRxBatch datagrams, then sends the ACKs they
// asked for (one per QP: coalesced) and runs the transport timers. It
// reports whether it did anything.
func (d *Device) pollNet() bool {
	p := d.net
	busy := false
	for range netRxBatch {
		var dg rxDatagram
		select {
		case dg = <-p.rx:
		default:
		}
		if dg.buf == nil {
			break
		}
		busy = true
		d.receive(dg.from, dg.ip, dg.b)
		p.bufs.Put(dg.buf)
	}
	if d.pumpReads() {
		busy = true
	}
	if d.flushAcks() {
		busy = true
	}
	if d.runTimers(time.Now()) {
		busy = true
	}
	p.flushTx() // the ACKs and responses first, the QPs' requests after
	return busy
}

// receive checks one datagram and hands it to its QP: ICRC, headers,
// transport, destination QP, source.
func (d *Device) receive(from netip.AddrPort, v ipv4Var, b []byte) {
	p := d.net
	if len(b) < ibwire.BTHLen+ibwire.ICRCLen {
		p.count(chip.NetCntDropLength)
		return
	}
	ip := ibwire.IPHeader{Src: from.Addr(), Dst: p.local.Addr(), DF: true}
	if from.Addr().Is4() {
		ip.ID, ip.DF = v.id, v.df
	}
	if err := ibwire.ValidateICRC(&ip, ibwire.UDPHeader{SrcPort: from.Port(), DstPort: p.local.Port()}, b); err != nil {
		p.count(chip.NetCntDropICRC)
		return
	}
	pk := &p.rxPk // the engine's alone; nothing keeps it past this call
	*pk = ibwire.Packet{}
	if err := pk.Decode(b); err != nil {
		if errors.Is(err, ibwire.ErrShort) || errors.Is(err, ibwire.ErrLength) {
			p.count(chip.NetCntDropLength)
		} else {
			p.count(chip.NetCntDropHeader)
		}
		return
	}
	op := pk.BTH.Opcode
	if op.Transport() != ibwire.TransportRC || pk.BTH.PKey != ibwire.DefaultPKey || pk.BTH.TVer != 0 ||
		op == ibwire.RCFlush || op == ibwire.RCAtomicWrite {
		p.count(chip.NetCntDropHeader)
		return
	}
	if err := pk.CheckPMTU(netPMTU); err != nil {
		p.count(chip.NetCntDropLength)
		return
	}
	n := int(pk.BTH.DestQP) - chip.QPNBase
	d.mu.Lock()
	if pk.BTH.DestQP < chip.QPNBase || n >= len(d.qps) {
		d.mu.Unlock()
		p.count(chip.NetCntDropQP)
		return
	}
	q := &d.qps[n]
	peer := p.latch[n].addr
	ok := q.accepts() && d.isNetQPLocked(q) && peer.IsValid()
	d.mu.Unlock()
	switch {
	case !ok:
		p.count(chip.NetCntDropQP)
		return
	case from.Addr() != peer.Addr():
		// By address only: a RoCEv2 sender picks its UDP source port
		// for entropy (rxe hashes the QP number), so only the address
		// identifies the peer. Replies go to the peer's own port.
		p.count(chip.NetCntDropPeer)
		return
	}
	if op.IsRequest() {
		d.rcRequest(n, pk)
	} else {
		d.rcResponse(n, pk)
	}
}

// armTimer makes the engine wake at t (or earlier, if it must already).
func (d *Device) armTimer(t time.Time) {
	p := d.net
	if !p.due.IsZero() && !t.Before(p.due) && p.due.After(time.Now()) {
		return
	}
	p.due = t
	dt := time.Until(t)
	if p.timer == nil {
		p.timer = time.AfterFunc(dt, d.kickEngine)
		return
	}
	p.timer.Reset(dt)
}

// runTimers fires the QPs' retransmission and RNR timers that are due and
// re-arms the port's timer for the next one.
func (d *Device) runTimers(now time.Time) bool {
	p := d.net
	busy := false
	var next time.Time
	for n := range p.rc {
		rc := &p.rc[n]
		if rc.deadline.IsZero() {
			continue
		}
		if !now.Before(rc.deadline) {
			rc.deadline = time.Time{}
			if d.rcTimeout(n) {
				busy = true
			}
		}
		if !rc.deadline.IsZero() && (next.IsZero() || rc.deadline.Before(next)) {
			next = rc.deadline
		}
	}
	p.due = time.Time{}
	if !next.IsZero() {
		d.armTimer(next)
	}
	return busy
}

// peerOKLocked reports whether a QP may connect to peer table entry i.
func (d *Device) peerOKLocked(i uint32) bool {
	_, ok := d.peerLocked(i)
	return ok
}
