// Package frwr is a small upper-layer protocol in the shape of the kernel's
// NFS/RDMA transport (net/sunrpc/xprtrdma/frwr_ops.c), written against the
// driver's in-module verbs API: a server registers one pinned buffer pool
// and, per request, binds only the pages of that request to a fast-reg MR
// under a fresh key variant (IncRkey), so a peer holds a key to those pages
// for as long as the request runs and no longer:
//
//   - Put (the peer writes into the pool): the server posts REG_MR and the
//     reply carrying the rkey in one post; the peer RDMA-WRITEs and ends
//     with SEND_WITH_INV of the rkey, so the binding is gone by the time
//     the server sees the request done (remote invalidation, as
//     frwr_ops.c's frwr_reminv).
//   - Get (the server sends pool bytes): REG_MR, the SEND out of the bound
//     MR and a fenced LOCAL_INV in one post (frwr_unmap_sync's chain,
//     pipelined with the data).
//
// With FastReg off, the server registers and deregisters the request's
// pages with REG_MR/DEREG_MR instead (the cost fast registration removes).
package frwr

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"time"

	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/mem"
	"github.com/gohfi/gohfi/uapi"
)

// Message: 32 bytes of control, sent and received through each side's
// message MR.
const (
	msgSize  = 32
	msgSlots = 16

	opPut     = 1 // client: put length bytes at pool offset
	opGet     = 2 // client: get length bytes from pool offset
	opReply   = 3 // server: rkey and iova for a put
	opPutDone = 4 // client: the put's data is written
)

type msg struct {
	op     uint32
	rkey   uint32
	off    uint64 // pool offset (put, get), iova (reply)
	length uint64
	id     uint64
}

func (m *msg) put(b []byte) {
	binary.LittleEndian.PutUint32(b[0:], m.op)
	binary.LittleEndian.PutUint32(b[4:], m.rkey)
	binary.LittleEndian.PutUint64(b[8:], m.off)
	binary.LittleEndian.PutUint64(b[16:], m.length)
	binary.LittleEndian.PutUint64(b[24:], m.id)
}

func (m *msg) get(b []byte) {
	m.op = binary.LittleEndian.Uint32(b[0:])
	m.rkey = binary.LittleEndian.Uint32(b[4:])
	m.off = binary.LittleEndian.Uint64(b[8:])
	m.length = binary.LittleEndian.Uint64(b[16:])
	m.id = binary.LittleEndian.Uint64(b[24:])
}

// endpoint is one side: a CQ, an RC QP, a message MR of send and receive
// slots.
type endpoint struct {
	f     *driver.File
	pd    *driver.PD
	cq    *driver.CQ
	qp    *driver.QP
	msgs  *mem.Buffer
	msgMR *driver.MR
}

const maxSGE = 2

func newEndpoint(f *driver.File) (*endpoint, error) {
	pd, err := f.PD()
	if err != nil {
		return nil, err
	}
	e := &endpoint{f: f, pd: pd}
	if e.cq, err = pd.CreateCQ(256, 0); err != nil {
		return nil, err
	}
	if e.qp, err = pd.CreateQP(driver.QPInitAttr{Type: uapi.GOHFI_QPT_RC, SendCQ: e.cq, RecvCQ: e.cq,
		MaxSendWR: 64, MaxRecvWR: msgSlots, MaxSendSge: maxSGE, MaxRecvSge: maxSGE}); err != nil {
		return nil, err
	}
	if e.msgs, err = mem.Alloc(2 * msgSlots * msgSize); err != nil {
		return nil, err
	}
	if e.msgMR, err = pd.RegMR(e.msgs.Addr(), uint64(e.msgs.Len()), uint64(e.msgs.Addr()), uapi.IB_ACCESS_LOCAL_WRITE); err != nil {
		return nil, err
	}
	return e, nil
}

// connect takes the QP to RTS towards dest; with prepost every message
// slot gets a receive (the server's side: it only receives messages).
func (e *endpoint) connect(dest uint32, prepost bool) error {
	for _, s := range []uint32{uapi.GOHFI_QPS_INIT, uapi.GOHFI_QPS_RTR, uapi.GOHFI_QPS_RTS} {
		if err := e.qp.Modify(driver.QPAttr{State: s, DestQPNum: dest, AccessFlags: uapi.IB_ACCESS_REMOTE_WRITE}); err != nil {
			return err
		}
	}
	for i := range msgSlots * btoi(prepost) {
		if err := e.postRecv(i); err != nil {
			return err
		}
	}
	return nil
}

// recvSGE and sendSGE are message slot i for receiving and sending.
func (e *endpoint) recvSGE(i int) driver.SGE {
	return driver.SGE{Addr: uint64(e.msgs.Addr()) + uint64(i*msgSize), Length: msgSize, Lkey: e.msgMR.Lkey()}
}

func (e *endpoint) sendSGE(i int) driver.SGE {
	return driver.SGE{Addr: uint64(e.msgs.Addr()) + uint64((msgSlots+i%msgSlots)*msgSize), Length: msgSize, Lkey: e.msgMR.Lkey()}
}

func (e *endpoint) postRecv(i int) error {
	_, err := e.qp.PostRecv([]driver.RecvWR{{WrID: uint64(i), SGL: []driver.SGE{e.recvSGE(i)}}})
	return err
}

func (e *endpoint) setSend(i int, m *msg) driver.SGE {
	g := e.sendSGE(i)
	m.put(e.msgs.Bytes()[g.Addr-uint64(e.msgs.Addr()):])
	return g
}

func (e *endpoint) readRecv(i int) msg {
	var m msg
	m.get(e.msgs.Bytes()[i*msgSize:])
	return m
}

func (e *endpoint) post(wrs ...driver.SendWR) error {
	n, err := e.qp.PostSend(wrs)
	if err == nil && n != len(wrs) {
		err = fmt.Errorf("frwr: %d of %d WRs posted", n, len(wrs))
	}
	return err
}

// poll waits for one completion: it polls the CQ a few times, then sleeps
// in File.Poll (which arms the CQs, so the next completion interrupts),
// as a kernel ULP would take a completion interrupt after ib_req_notify_cq.
// Spinning alone would starve the device's goroutines on few CPUs.
func (e *endpoint) poll(stop <-chan struct{}) (uapi.GohfiWC, error) {
	wc := make([]uapi.GohfiWC, 1)
	deadline := time.Now().Add(5 * time.Second)
	for spin := 0; ; spin++ {
		n, err := e.cq.Poll(wc)
		if err != nil || n == 1 {
			return wc[0], err
		}
		select {
		case <-stop:
			return wc[0], errStopped
		default:
		}
		if time.Now().After(deadline) {
			return wc[0], errors.New("frwr: no completion in 5s")
		}
		if spin < 8 {
			runtime.Gosched()
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		_, err = e.f.Poll(ctx)
		cancel()
		if err != nil && !errors.Is(err, context.DeadlineExceeded) {
			return wc[0], err
		}
	}
}

var (
	errStopped = errors.New("frwr: stopped")
	errClosed  = errors.New("frwr: connection in error")
)

// frmr is a fast-reg MR with its page list (one binding outstanding each).
type frmr struct {
	mr  *driver.FastRegMR
	pl  *driver.PageList
	key uint32
}

// Server serves a pinned pool.
type Server struct {
	ep      *endpoint
	pool    *mem.Buffer
	poolMR  *driver.MR
	fastReg bool
	free    []*frmr
	byKey   map[uint32]*frmr
	byID    map[uint64]*driver.MR // REG_MR mode: the request's MR
	sendN   int

	stop chan struct{}
	done chan error
	mu   sync.Mutex
	stat Stats
}

// Stats counts what the server did.
type Stats struct {
	Requests      int
	RemoteInvals  int // put bindings ended by SEND_WITH_INV
	LocalInvals   int // get bindings ended by LOCAL_INV
	Registrations int // REG_MR ioctls (fast registration off)
}

// MaxPages is the most pages one request may cover.
const MaxPages = 64

// NewServer registers pool (pinned, whole) in the protection domain of f
// (a file with a context) and, with fastReg, allocates nMR fast-reg MRs of
// MaxPages pages each.
func NewServer(f *driver.File, pool *mem.Buffer, fastReg bool, nMR int) (*Server, error) {
	ep, err := newEndpoint(f)
	if err != nil {
		return nil, fmt.Errorf("frwr: server: %w", err)
	}
	s := &Server{ep: ep, pool: pool, fastReg: fastReg, byKey: map[uint32]*frmr{}, byID: map[uint64]*driver.MR{}}
	pd := ep.pd
	if s.poolMR, err = pd.RegMR(pool.Addr(), uint64(pool.Len()), uint64(pool.Addr()), uapi.IB_ACCESS_LOCAL_WRITE); err != nil {
		return nil, fmt.Errorf("frwr: server pool: %w", err)
	}
	for range nMR * btoi(fastReg) {
		m, err := pd.AllocMR(MaxPages)
		if err != nil {
			return nil, fmt.Errorf("frwr: server: %w", err)
		}
		pl, err := pd.AllocPageList(MaxPages)
		if err != nil {
			return nil, fmt.Errorf("frwr: server: %w", err)
		}
		s.free = append(s.free, &frmr{mr: m, pl: pl, key: m.Rkey()})
	}
	return s, nil
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// QPNum is the server QP's number, for the client to connect to.
func (s *Server) QPNum() uint32 { return s.ep.qp.Num() }

// Stats returns the server's counters.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stat
}

// Start connects the server to client QP number peer and serves until Stop.
func (s *Server) Start(peer uint32) error {
	if err := s.ep.connect(peer, true); err != nil {
		return fmt.Errorf("frwr: server: %w", err)
	}
	s.stop, s.done = make(chan struct{}), make(chan error, 1)
	go func() { s.done <- s.serve() }()
	return nil
}

// Stop ends the server loop and returns its error, if any.
func (s *Server) Stop() error {
	close(s.stop)
	if err := <-s.done; !errors.Is(err, errStopped) && !errors.Is(err, errClosed) {
		return err
	}
	return nil
}

func (s *Server) serve() error {
	for {
		wc, err := s.ep.poll(s.stop)
		if err != nil {
			return err
		}
		if wc.Status == uapi.GOHFI_WC_WR_FLUSH_ERR {
			return errClosed // the QP is in ERR (a peer's access was refused)
		}
		if wc.Status != uapi.GOHFI_WC_SUCCESS {
			return fmt.Errorf("frwr: server completion %+v", wc)
		}
		switch wc.Opcode {
		case uapi.GOHFI_WC_RECV:
			slot := int(wc.WrID)
			m := s.ep.readRecv(slot)
			if err := s.ep.postRecv(slot); err != nil {
				return err
			}
			if err := s.handle(&m, &wc); err != nil {
				return err
			}
		case uapi.GOHFI_WC_LOCAL_INV:
			f := s.byKey[uint32(wc.WrID)]
			delete(s.byKey, uint32(wc.WrID))
			s.free = append(s.free, f)
			s.count(func(st *Stats) { st.LocalInvals++ })
		case uapi.GOHFI_WC_SEND:
			if mr := s.byID[wc.WrID]; mr != nil { // REG_MR mode: the get's data is out
				delete(s.byID, wc.WrID)
				if err := mr.Dereg(); err != nil {
					return err
				}
			}
		}
	}
}

func (s *Server) count(f func(*Stats)) {
	s.mu.Lock()
	f(&s.stat)
	s.mu.Unlock()
}

// bind makes the request's pages reachable: a fast-reg MR bound through
// the send queue (REG_MR, returned to prepend to the post), or a REG_MR.
func (s *Server) bind(off, length uint64, access uint32) (wr *driver.SendWR, key uint32, iova uint64, mr *driver.MR, err error) {
	if length == 0 || off+length > uint64(s.pool.Len()) || (off+length+4095)/4096-off/4096 > MaxPages {
		return nil, 0, 0, nil, fmt.Errorf("frwr: request %d+%d outside the pool or over %d pages", off, length, MaxPages)
	}
	va := s.pool.Addr() + uintptr(off)
	if !s.fastReg {
		mr, err = s.ep.pd.RegMR(va, length, uint64(va), access|uapi.IB_ACCESS_LOCAL_WRITE)
		s.count(func(st *Stats) { st.Registrations++ })
		if err != nil {
			return nil, 0, 0, nil, err
		}
		return nil, mr.Rkey(), uint64(va), mr, nil
	}
	if len(s.free) == 0 {
		return nil, 0, 0, nil, errors.New("frwr: no free fast-reg MR")
	}
	f := s.free[len(s.free)-1]
	s.free = s.free[:len(s.free)-1]
	segs, err := s.poolMR.DMASegs(va, length)
	if err != nil {
		return nil, 0, 0, nil, err
	}
	if n, err := f.pl.MapSG(segs, 0, 12); err != nil || n != len(segs) {
		return nil, 0, 0, nil, fmt.Errorf("frwr: map %d segments: %d, %w", len(segs), n, err)
	}
	f.key = driver.IncRkey(f.key)
	s.byKey[f.key] = f
	reg := driver.SendWR{Opcode: uapi.GOHFI_WR_REG_MR,
		Reg: &driver.RegWR{MR: f.mr, PageList: f.pl, Key: f.key, Access: access | uapi.IB_ACCESS_LOCAL_WRITE}}
	return &reg, f.key, f.pl.IOVA(), nil, nil
}

func (s *Server) handle(m *msg, wc *uapi.GohfiWC) error {
	switch m.op {
	case opPut:
		reg, key, iova, mr, err := s.bind(m.off, m.length, uapi.IB_ACCESS_REMOTE_WRITE)
		if err != nil {
			return err
		}
		if mr != nil {
			s.byID[m.id] = mr
		}
		s.sendN++
		reply := driver.SendWR{WrID: m.id, Opcode: uapi.GOHFI_WR_SEND,
			SGL: []driver.SGE{s.ep.setSend(s.sendN, &msg{op: opReply, rkey: key, off: iova, length: m.length, id: m.id})}}
		if reg != nil {
			return s.ep.post(*reg, reply) // REG_MR and the rkey's advertisement in one post
		}
		return s.ep.post(reply)
	case opPutDone:
		s.count(func(st *Stats) { st.Requests++ })
		if !s.fastReg {
			mr := s.byID[m.id]
			delete(s.byID, m.id)
			return mr.Dereg()
		}
		f := s.byKey[m.rkey]
		if f == nil || wc.WcFlags&uapi.GOHFI_WC_WITH_INVALIDATE == 0 || wc.InvalidatedRkey != m.rkey {
			return fmt.Errorf("frwr: put %d done without the remote invalidation of %#x: %+v", m.id, m.rkey, *wc)
		}
		delete(s.byKey, m.rkey)
		s.free = append(s.free, f)
		s.count(func(st *Stats) { st.RemoteInvals++ })
		return nil
	case opGet:
		s.count(func(st *Stats) { st.Requests++ })
		reg, key, iova, mr, err := s.bind(m.off, m.length, 0)
		if err != nil {
			return err
		}
		data := driver.SendWR{WrID: m.id, Opcode: uapi.GOHFI_WR_SEND,
			SGL: []driver.SGE{{Addr: iova, Length: uint32(m.length), Lkey: key}}}
		if mr != nil {
			s.byID[m.id] = mr
			data.SendFlags = uapi.GOHFI_SEND_SIGNALED
			return s.ep.post(data)
		}
		// REG_MR, the data out of the bound MR, and LOCAL_INV after it.
		inv := driver.SendWR{WrID: uint64(key), Opcode: uapi.GOHFI_WR_LOCAL_INV,
			SendFlags: uapi.GOHFI_SEND_SIGNALED | uapi.GOHFI_SEND_FENCE, InvalidateRkey: key}
		return s.ep.post(*reg, data, inv)
	}
	return fmt.Errorf("frwr: unknown message %+v", *m)
}

// Client talks to a server.
type Client struct {
	ep     *endpoint
	buf    *mem.Buffer
	bufMR  *driver.MR
	nextID uint64
	slot   int

	// LastRkey is the rkey of the last put's binding (for tests: it must
	// be refused once the put is done).
	LastRkey uint32
	LastIOVA uint64
}

// NewClient creates a client on f (a file with a context) with a pinned
// buffer of size bytes.
func NewClient(f *driver.File, size int) (*Client, error) {
	ep, err := newEndpoint(f)
	if err != nil {
		return nil, fmt.Errorf("frwr: client: %w", err)
	}
	c := &Client{ep: ep}
	if c.buf, err = mem.Alloc(size); err != nil {
		return nil, err
	}
	if c.bufMR, err = ep.pd.RegMR(c.buf.Addr(), uint64(size), uint64(c.buf.Addr()), uapi.IB_ACCESS_LOCAL_WRITE); err != nil {
		return nil, err
	}
	return c, nil
}

// QPNum is the client QP's number; Buf its buffer.
func (c *Client) QPNum() uint32 { return c.ep.qp.Num() }
func (c *Client) Buf() []byte   { return c.buf.Bytes() }

// Connect connects the client to the server's QP.
func (c *Client) Connect(server uint32) error { return c.ep.connect(server, false) }

func (c *Client) request(m *msg) error {
	c.nextID++
	m.id = c.nextID
	c.slot++
	return c.ep.post(driver.SendWR{Opcode: uapi.GOHFI_WR_SEND, SGL: []driver.SGE{c.ep.setSend(c.slot, m)}})
}

// waitRecv waits for the next receive completion. The client posts each
// receive just before the request it answers (a receive queue is consumed
// in order, and a Get's data needs the buffer, not a message slot).
func (c *Client) waitRecv() (uapi.GohfiWC, msg, error) {
	wc, err := c.waitFor("reply", func(wc *uapi.GohfiWC) bool {
		return wc.Opcode == uapi.GOHFI_WC_RECV && wc.Status == uapi.GOHFI_WC_SUCCESS
	})
	if err != nil {
		return wc, msg{}, err
	}
	return wc, c.ep.readRecv(int(wc.WrID)), nil
}

// waitFor polls until match accepts a completion; a failed completion it
// does not accept is an error.
func (c *Client) waitFor(what string, match func(*uapi.GohfiWC) bool) (uapi.GohfiWC, error) {
	for {
		wc, err := c.ep.poll(nil)
		switch {
		case err != nil:
			return wc, err
		case match(&wc):
			return wc, nil
		case wc.Status != uapi.GOHFI_WC_SUCCESS:
			return wc, fmt.Errorf("frwr: %s: completion %+v", what, wc)
		}
	}
}

// Put writes Buf()[:n] into the server's pool at off: request, reply with
// the rkey, RDMA WRITE, then SEND_WITH_INV of the rkey (fast registration)
// or a plain SEND.
func (c *Client) Put(off uint64, n int, fastReg bool) error {
	if err := c.ep.postRecv(0); err != nil {
		return err
	}
	if err := c.request(&msg{op: opPut, off: off, length: uint64(n)}); err != nil {
		return err
	}
	_, r, err := c.waitRecv()
	if err != nil {
		return err
	}
	if r.op != opReply {
		return fmt.Errorf("frwr: put: reply %+v", r)
	}
	c.LastRkey, c.LastIOVA = r.rkey, r.off
	write := driver.SendWR{Opcode: uapi.GOHFI_WR_RDMA_WRITE, RemoteAddr: r.off, Rkey: r.rkey,
		SGL: []driver.SGE{{Addr: uint64(c.buf.Addr()), Length: uint32(n), Lkey: c.bufMR.Lkey()}}}
	c.slot++
	done := driver.SendWR{Opcode: uapi.GOHFI_WR_SEND,
		SGL: []driver.SGE{c.ep.setSend(c.slot, &msg{op: opPutDone, rkey: r.rkey, id: r.id})}}
	if fastReg {
		done.Opcode, done.InvalidateRkey = uapi.GOHFI_WR_SEND_WITH_INV, r.rkey
	}
	// The buffer is the caller's again once the done message is out.
	done.WrID, done.SendFlags = 1<<21, uapi.GOHFI_SEND_SIGNALED
	if err := c.ep.post(write, done); err != nil {
		return err
	}
	_, err = c.waitFor("put", func(wc *uapi.GohfiWC) bool { return wc.WrID == 1<<21 && wc.Status == uapi.GOHFI_WC_SUCCESS })
	return err
}

// Get reads n bytes of the server's pool at off into Buf()[:n].
func (c *Client) Get(off uint64, n int) error {
	if _, err := c.ep.qp.PostRecv([]driver.RecvWR{{WrID: 1 << 20,
		SGL: []driver.SGE{{Addr: uint64(c.buf.Addr()), Length: uint32(n), Lkey: c.bufMR.Lkey()}}}}); err != nil {
		return err
	}
	if err := c.request(&msg{op: opGet, off: off, length: uint64(n)}); err != nil {
		return err
	}
	wc, err := c.waitFor("get", func(wc *uapi.GohfiWC) bool {
		return wc.Opcode == uapi.GOHFI_WC_RECV && wc.WrID == 1<<20 && wc.Status == uapi.GOHFI_WC_SUCCESS
	})
	if err == nil && int(wc.ByteLen) != n {
		err = fmt.Errorf("frwr: get: %d bytes, want %d", wc.ByteLen, n)
	}
	return err
}

// WriteStale RDMA-WRITEs one byte through rkey at iova and returns the
// completion: a test of a key the server no longer holds bound.
func (c *Client) WriteStale(rkey uint32, iova uint64) (uapi.GohfiWC, error) {
	if err := c.ep.post(driver.SendWR{WrID: 77, Opcode: uapi.GOHFI_WR_RDMA_WRITE, SendFlags: uapi.GOHFI_SEND_SIGNALED,
		RemoteAddr: iova, Rkey: rkey, SGL: []driver.SGE{{Addr: uint64(c.buf.Addr()), Length: 1, Lkey: c.bufMR.Lkey()}}}); err != nil {
		return uapi.GohfiWC{}, err
	}
	return c.waitFor("stale write", func(wc *uapi.GohfiWC) bool { return wc.WrID == 77 })
}
