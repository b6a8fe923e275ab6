package hfisim

import (
	"encoding/binary"
	"net/netip"
	"os"
	"sync"
	"testing"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/vfio"
	"golang.org/x/sys/unix"
)

// The verbs test harness plays the driver: it writes MTT and MPT entries
// into BAR4, configures CQ and QP registers, writes WQEs to host memory,
// rings doorbells and waits for CQEs through the CQ ring and the interrupt
// eventfd. Host memory is one fake-IOMMU window.

const (
	hostIOVA = 0x10_0000_0000
	hostSize = 16 << 20
)

// hookDMA lets a test act between two DMAs of the engine: onWrite and
// onRead run on the engine's goroutine after the DMA (the engine holds no
// lock then).
type hookDMA struct {
	*fakeDMA
	mu      sync.Mutex
	onWrite func(iova uint64, n int)
	onRead  func(iova uint64, n int)
}

func (h *hookDMA) Read(iova uint64, p []byte) error {
	err := h.fakeDMA.Read(iova, p)
	h.mu.Lock()
	f := h.onRead
	h.mu.Unlock()
	if f != nil {
		f(iova, len(p))
	}
	return err
}

func (h *hookDMA) Write(iova uint64, p []byte) error {
	err := h.fakeDMA.Write(iova, p)
	h.mu.Lock()
	f := h.onWrite
	h.mu.Unlock()
	if f != nil {
		f(iova, len(p))
	}
	return err
}

type vh struct {
	t       testing.TB
	d       *Device
	dma     *hookDMA
	next    uint64 // host memory allocator: next free offset
	mttNext uint32
	irq     int
}

func newVerbs(t *testing.T) *vh { return newVerbsPort(t, netip.AddrPort{}, nil) }

// newVerbsPort is newVerbs with a network port at port on link l (net_test.go).
func newVerbsPort(t testing.TB, port netip.AddrPort, l link) *vh {
	t.Helper()
	cfg := DefaultConfig()
	cfg.NumContexts = 2
	cfg.RcvArrayPerCtxt = 64
	cfg.MTTEntries = 1 << 13
	cfg.MPTEntries = 64
	cfg.NumQPs, cfg.NumCQs = 8, 8
	cfg.Port = port
	d, err := newDevice(cfg, l)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	dma := &hookDMA{fakeDMA: &fakeDMA{wins: map[uint64][]byte{hostIOVA: make([]byte, hostSize)}}}
	d.Attach(dma)
	h := &vh{t: t, d: d, dma: dma}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	h.irq = efd
	if err := d.SetIRQs(vfio.PCIMSIXIRQIndex, 1, 1, []*os.File{os.NewFile(uintptr(efd), "cq-irq")}); err != nil {
		t.Fatal(err)
	}
	wr(t, d, chip.RegIntMask, chip.IntSrcCtxt(0))
	return h
}

// alloc returns page-aligned host memory.
func (h *vh) alloc(n uint64) uint64 {
	n = (n + 0xfff) &^ 0xfff
	if h.next+n > hostSize {
		h.t.Fatalf("host memory exhausted")
	}
	iova := hostIOVA + h.next
	h.next += n
	return iova
}

func (h *vh) read(iova uint64, n int) []byte {
	b := make([]byte, n)
	if err := h.dma.fakeDMA.Read(iova, b); err != nil {
		h.t.Fatal(err)
	}
	return b
}

func (h *vh) write(iova uint64, b []byte) {
	if err := h.dma.fakeDMA.Write(iova, b); err != nil {
		h.t.Fatal(err)
	}
}

func (h *vh) bar4(off, v uint64) {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	if err := h.d.RegionWrite(chip.MTTBar, off, b[:]); err != nil {
		h.t.Fatal(err)
	}
}

// mr is a registered memory region: [va, va+length) backed by host pages
// from iova on.
type mr struct {
	idx    uint32
	entry  chip.MPTEntry
	va     uint64
	iova   uint64
	length uint64
}

func (m *mr) key() uint32 { return m.entry.Key }

// host returns the IOVA of region address va.
func (m *mr) host(va uint64) uint64 { return m.iova + va - m.va&^0xfff }

// regMR registers length bytes at virtual address va as MPT entry idx.
func (h *vh) regMR(idx, pd, access uint32, va, length uint64) *mr {
	pages := (va+length+0xfff)>>12 - va>>12
	m := &mr{idx: idx, va: va, length: length, iova: h.alloc(max(pages, 1) << 12)}
	for i := uint64(0); i < pages; i++ {
		h.bar4(uint64(h.mttNext+uint32(i))*chip.MTTEntrySize, (m.iova+i<<12)|chip.MTTPresent|chip.MTTRead|chip.MTTWrite)
	}
	m.entry = chip.MPTEntry{Key: idx<<8 | 0x5a, PD: pd, Flags: chip.MPTStateValid | access<<chip.MPTAccessShift,
		MTTFirst: h.mttNext, IOVA: va, Length: length}
	h.mttNext += uint32(pages)
	h.writeMPT(idx, m.entry)
	return m
}

// writeMPT writes an entry as the driver must: word 1 (state) last.
func (h *vh) writeMPT(idx uint32, e chip.MPTEntry) {
	var b [chip.MPTEntrySize]byte
	e.Marshal(b[:])
	off := chip.MPTOffset(h.d.cfg.MTTEntries) + uint64(idx)*chip.MPTEntrySize
	for _, w := range []uint64{0, 16, 24, 8} {
		h.bar4(off+w, binary.LittleEndian.Uint64(b[w:]))
	}
}

func (h *vh) fill(m *mr, seed byte) []byte {
	b := make([]byte, m.length)
	for i := range b {
		b[i] = byte(i*7) + seed
	}
	h.write(m.host(m.va), b)
	return b
}

func (h *vh) contents(m *mr) []byte { return h.read(m.host(m.va), int(m.length)) }

// tcq is a CQ as the driver keeps it.
type tcq struct {
	n       int
	iova    uint64
	entries uint64
	head    uint64
	seq     uint32
}

func (h *vh) newCQ(n int, entries uint64) *tcq {
	c := &tcq{n: n, entries: entries, iova: h.alloc(entries * chip.CQESize)}
	wr(h.t, h.d, chip.CQReg(n, chip.CQRingBase), c.iova)
	wr(h.t, h.d, chip.CQReg(n, chip.CQEntries), entries)
	wr(h.t, h.d, chip.CQReg(n, chip.CQControl), chip.CQCtrlEnable)
	if rd(h.t, h.d, chip.CQReg(n, chip.CQControl))&chip.CQCtrlEnable == 0 {
		h.t.Fatalf("CQ %d did not enable", n)
	}
	return c
}

func (h *vh) peekCQ(c *tcq) (chip.CQE, bool) {
	var e chip.CQE
	e.Unmarshal(h.read(c.iova+c.head*chip.CQESize, chip.CQESize))
	want := c.seq + 1
	if want == 0 {
		want = 1
	}
	return e, e.Seq == want
}

// pollCQ waits for the next CQE of c: it arms the CQ, looks at the ring and
// sleeps on the interrupt eventfd until the CQE is there.
func (h *vh) pollCQ(c *tcq) chip.CQE {
	h.t.Helper()
	for {
		wr(h.t, h.d, chip.CQReg(c.n, chip.CQControl), chip.CQCtrlEnable|chip.CQCtrlArm)
		if e, ok := h.peekCQ(c); ok {
			c.seq = e.Seq
			c.head = (c.head + 1) % c.entries
			wr(h.t, h.d, chip.CQReg(c.n, chip.CQHead), c.head)
			return e
		}
		fds := []unix.PollFd{{Fd: int32(h.irq), Events: unix.POLLIN}}
		if k, err := unix.Poll(fds, 10000); err != nil && err != unix.EINTR || k == 0 {
			h.t.Fatalf("CQ %d: no CQE (tail %d): %v", c.n, rd(h.t, h.d, chip.CQReg(c.n, chip.CQTail)), err)
		}
		var b [8]byte
		unix.Read(h.irq, b[:])
	}
}

// expectCQE waits for the next CQE of c and checks its status, opcode,
// vendor_err and wr_id.
func (h *vh) expectCQE(c *tcq, wrID uint64, status, opcode, vendor uint32) chip.CQE {
	h.t.Helper()
	e := h.pollCQ(c)
	if e.WrID != wrID || e.Status != status || e.VendorErr != vendor || (status == uapi.GOHFI_WC_SUCCESS && e.Opcode != opcode) {
		h.t.Fatalf("CQ %d: CQE %+v, want wr_id %d status %d opcode %d vendor_err %d", c.n, e, wrID, status, opcode, vendor)
	}
	return e
}

// noCQE checks, once the engine is idle, that c has no new CQE.
func (h *vh) noCQE(c *tcq) {
	h.t.Helper()
	h.d.waitIdle()
	if e, ok := h.peekCQ(c); ok {
		h.t.Fatalf("CQ %d: unexpected CQE %+v", c.n, e)
	}
}

// tqp is a QP as the driver keeps it.
type tqp struct {
	n              int
	sq, rq         uint64
	entries        uint64
	sqTail, rqTail uint64
}

func (q *tqp) qpn() uint32 { return chip.QPNBase + uint32(q.n) }

func (h *vh) newQP(n int, pd uint32, access uint32, scq, rcq *tcq) *tqp {
	q := &tqp{n: n, entries: 16}
	q.sq, q.rq = h.alloc(q.entries*chip.SendWQESize), h.alloc(q.entries*chip.RecvWQESize)
	for _, r := range []struct{ reg, v uint64 }{
		{chip.QPSQBase, q.sq}, {chip.QPSQEntries, q.entries}, {chip.QPRQBase, q.rq}, {chip.QPRQEntries, q.entries},
		{chip.QPCQs, uint64(scq.n) | uint64(rcq.n)<<32}, {chip.QPPD, uint64(pd)}, {chip.QPAccess, uint64(access)},
	} {
		wr(h.t, h.d, chip.QPReg(n, r.reg), r.v)
	}
	h.modify(q, uapi.GOHFI_QPS_INIT)
	return q
}

func (h *vh) modify(q *tqp, state uint64) {
	h.t.Helper()
	wr(h.t, h.d, chip.QPReg(q.n, chip.QPControl), state|uapi.GOHFI_QPT_RC<<chip.QPTypeShift)
	if got := h.state(q); got != state {
		h.t.Fatalf("QP %d: state %d after modify to %d", q.n, got, state)
	}
}

func (h *vh) state(q *tqp) uint64 { return rd(h.t, h.d, chip.QPReg(q.n, chip.QPStatus)) }

// connect takes two QPs (or one, to itself) to RTS, each the other's
// destination.
func (h *vh) connect(a, b *tqp) {
	wr(h.t, h.d, chip.QPReg(a.n, chip.QPDest), uint64(b.qpn()))
	wr(h.t, h.d, chip.QPReg(b.n, chip.QPDest), uint64(a.qpn()))
	for _, q := range []*tqp{a, b} {
		if h.state(q) == uapi.GOHFI_QPS_INIT {
			h.modify(q, uapi.GOHFI_QPS_RTR)
			h.modify(q, uapi.GOHFI_QPS_RTS)
		}
	}
}

func (h *vh) postSend(q *tqp, w chip.SendWQE) {
	var b [chip.SendWQESize]byte
	w.Marshal(b[:])
	h.write(q.sq+q.sqTail*chip.SendWQESize, b[:])
	q.sqTail = (q.sqTail + 1) % q.entries
	wr(h.t, h.d, chip.QPReg(q.n, chip.QPSQTail), q.sqTail)
}

func (h *vh) postRecv(q *tqp, w chip.RecvWQE) {
	var b [chip.RecvWQESize]byte
	w.Marshal(b[:])
	h.write(q.rq+q.rqTail*chip.RecvWQESize, b[:])
	q.rqTail = (q.rqTail + 1) % q.entries
	wr(h.t, h.d, chip.QPReg(q.n, chip.QPRQTail), q.rqTail)
}

func sge(m *mr, off uint64, n uint32) chip.SGE {
	return chip.SGE{Addr: m.va + off, Length: n, Lkey: m.key()}
}

func sendWQE(id uint64, op uint8, sges ...chip.SGE) chip.SendWQE {
	w := chip.SendWQE{WrID: id, Opcode: op, Flags: uapi.GOHFI_SEND_SIGNALED, NumSGE: uint16(len(sges))}
	copy(w.SGE[:], sges)
	return w
}

func recvWQE(id uint64, sges ...chip.SGE) chip.RecvWQE {
	w := chip.RecvWQE{WrID: id, NumSGE: uint16(len(sges))}
	copy(w.SGE[:], sges)
	return w
}

// pair is the usual set-up: two QPs in PD 1, connected, each with its own
// CQ for sends and one shared receive CQ per side.
type pair struct {
	h              *vh
	a, b           *tqp
	acq, bcq       *tcq
	local, remote  *mr // a's and b's memory
	remoteAccess   uint32
	localAccess    uint32
	remoteQPAccess uint32
}

const allAccess = uapi.IB_ACCESS_LOCAL_WRITE | uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ | uapi.IB_ACCESS_REMOTE_ATOMIC
const remoteAll = uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ | uapi.IB_ACCESS_REMOTE_ATOMIC

// newPair connects QP 0 (requester, local memory) and QP 1 (responder,
// remote memory) with regions of size bytes at unaligned virtual addresses.
func newPair(t *testing.T, size uint64) *pair {
	h := newVerbs(t)
	p := &pair{h: h}
	p.acq, p.bcq = h.newCQ(0, 64), h.newCQ(1, 64)
	p.a = h.newQP(0, 1, remoteAll, p.acq, p.acq)
	p.b = h.newQP(1, 1, remoteAll, p.bcq, p.bcq)
	h.connect(p.a, p.b)
	p.local = h.regMR(1, 1, allAccess, 0x7f00_0000_0123, size)
	p.remote = h.regMR(2, 1, allAccess, 0x7e00_0000_0ffd, size)
	return p
}
