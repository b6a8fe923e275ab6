package hfisim

import (
	"bytes"
	"encoding/binary"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/vfio"
	"golang.org/x/sys/unix"
)

// The ODP tests play the driver's page-fault handler: the regions are
// MPTTypeODP with every MTT entry not present; a goroutine reads the event
// queue, checks each EQE and makes the faulting pages present (or resumes
// with an error), then writes RegPFResume.

// odpHarness is an event queue and its servicer.
type odpHarness struct {
	h       *vh
	eq      uint64
	entries uint64
	irq     int

	mu      sync.Mutex
	events  []chip.EQE
	fail    func(chip.EQE) bool // resume with an error
	regions map[uint32]*mr      // by key
	pages   uint64              // 0: map the whole faulting length; else at most this many pages
	stop    chan struct{}
	done    chan struct{}
}

// odp makes m an ODP region: MPT type ODP, every MTT entry not present.
func (o *odpHarness) odp(m *mr) {
	h := o.h
	m.entry.Flags |= chip.MPTTypeODP
	h.writeMPT(m.idx, m.entry)
	o.zap(m, m.va, m.length)
	o.mu.Lock()
	o.regions[m.key()] = m
	o.mu.Unlock()
}

// zap makes the pages of [va, va+n) of m not present and flushes the TLB.
func (o *odpHarness) zap(m *mr, va, n uint64) {
	first, last := (va-m.va&^0xfff)>>12, (va+n-1-m.va&^0xfff)>>12
	for p := first; p <= last; p++ {
		o.h.bar4(uint64(m.entry.MTTFirst+uint32(p))*chip.MTTEntrySize, 0)
	}
	seq := rd(o.h.t, o.h.d, chip.RegTLBInvDone)
	wr(o.h.t, o.h.d, chip.RegTLBInvStart, uint64(m.entry.MTTFirst)+first)
	wr(o.h.t, o.h.d, chip.RegTLBInvCount, last-first+1)
	for rd(o.h.t, o.h.d, chip.RegTLBInvDone) == seq {
		time.Sleep(time.Millisecond)
	}
}

// mapPage makes page va of m present with flags.
func (o *odpHarness) mapPage(m *mr, va, flags uint64) {
	p := (va - m.va&^0xfff) >> 12
	o.h.bar4(uint64(m.entry.MTTFirst+uint32(p))*chip.MTTEntrySize, (m.iova+p<<12)|flags)
}

func newODP(t *testing.T, p *pair, entries uint64) *odpHarness {
	h := p.h
	o := &odpHarness{h: h, entries: entries, regions: map[uint32]*mr{}, stop: make(chan struct{}), done: make(chan struct{})}
	o.eq = h.alloc(entries * chip.EQESize)
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	o.irq = efd
	if err := h.d.SetIRQs(vfio.PCIMSIXIRQIndex, 0, 1, []*os.File{os.NewFile(uintptr(efd), "eq-irq")}); err != nil {
		t.Fatal(err)
	}
	wr(t, h.d, chip.RegIntMask, chip.IntSrcCtxt(0)|chip.IntSrcEQ)
	wr(t, h.d, chip.RegEQBase, o.eq)
	wr(t, h.d, chip.RegEQEntries, entries)
	if rd(t, h.d, chip.RegEQEntries) != entries {
		t.Fatal("EQ refused")
	}
	go o.serve()
	t.Cleanup(func() { close(o.stop); <-o.done })
	return o
}

// serve services faults until stopped.
func (o *odpHarness) serve() {
	defer close(o.done)
	var head uint64
	var seq uint32
	for {
		var e chip.EQE
		e.Unmarshal(o.h.read(o.eq+head*chip.EQESize, chip.EQESize))
		if e.Seq != seq+1 {
			fds := []unix.PollFd{{Fd: int32(o.irq), Events: unix.POLLIN}}
			unix.Poll(fds, 5)
			var b [8]byte
			unix.Read(o.irq, b[:])
			select {
			case <-o.stop:
				return
			default:
			}
			continue
		}
		seq = e.Seq
		head = (head + 1) % o.entries
		o.h.d.RegionWrite(chip.CSRBar, chip.RegEQHead, le(head))
		o.mu.Lock()
		o.events = append(o.events, e)
		fail := o.fail != nil && o.fail(e)
		m := o.regions[e.Key]
		pages := o.pages
		o.mu.Unlock()
		v := uint64(e.FaultID)
		if fail || m == nil {
			v |= chip.PFResumeError
		} else {
			flags := uint64(chip.MTTPresent | chip.MTTRead | chip.MTTWrite)
			end := e.VA + uint64(e.Length)
			if pages != 0 {
				end = min(end, e.VA&^0xfff+pages<<12)
			}
			for va := e.VA &^ 0xfff; va < end; va += 4096 {
				o.mapPage(m, va, flags)
			}
			// An entry that was present (read-only) may be cached:
			// an upgrade needs a flush, as on hardware.
			first := uint64(m.entry.MTTFirst) + (e.VA&^0xfff-m.va&^0xfff)>>12
			o.h.d.RegionWrite(chip.CSRBar, chip.RegTLBInvStart, le(first))
			o.h.d.RegionWrite(chip.CSRBar, chip.RegTLBInvCount, le((end-e.VA&^0xfff+0xfff)>>12))
		}
		o.h.d.RegionWrite(chip.CSRBar, chip.RegPFResume, le(v))
	}
}

func le(v uint64) []byte {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	return b[:]
}

func (o *odpHarness) taken() []chip.EQE {
	o.mu.Lock()
	defer o.mu.Unlock()
	ev := o.events
	o.events = nil
	return ev
}

// TestODPFaultEveryPath: every access the engine makes to an ODP region
// with nothing present faults, with the EQE naming the side, the key, the
// address and the length; after the resume the operation completes and the
// data is right. Regions are 3 pages at unaligned addresses, so messages
// cross pages and fault more than once.
func TestODPFaultEveryPath(t *testing.T) {
	const size = 0x3000
	type fault struct {
		responder, write bool
	}
	for _, c := range []struct {
		name       string
		local, rem bool
		op         uint8
		want       []fault // the first fault of each side, in order
	}{
		{"write/requester", true, false, uapi.GOHFI_WR_RDMA_WRITE, []fault{{false, false}}},
		{"write/responder", false, true, uapi.GOHFI_WR_RDMA_WRITE, []fault{{true, true}}},
		{"read/requester", true, false, uapi.GOHFI_WR_RDMA_READ, []fault{{false, true}}},
		{"read/responder", false, true, uapi.GOHFI_WR_RDMA_READ, []fault{{true, false}}},
		{"send/requester", true, false, uapi.GOHFI_WR_SEND, []fault{{false, false}}},
		{"send/receive", false, true, uapi.GOHFI_WR_SEND, []fault{{true, true}}},
		{"send/both", true, true, uapi.GOHFI_WR_SEND, []fault{{false, false}, {true, true}}},
		{"fetchadd/requester", true, false, uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD, []fault{{false, true}}},
		{"fetchadd/responder", false, true, uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD, []fault{{true, true}}},
		{"cmpswap/responder", false, true, uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP, []fault{{true, true}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := newPair(t, size)
			h := p.h
			o := newODP(t, p, 8)
			o.pages = 1 // one page per fault: a message faults page by page
			src := h.fill(p.local, 1)
			dst := h.fill(p.remote, 2)
			if c.local {
				o.odp(p.local)
			}
			if c.rem {
				o.odp(p.remote)
			}
			n := uint32(size)
			atomic := isAtomic(c.op)
			if atomic {
				n = 8
			}
			w := sendWQE(7, c.op, sge(p.local, 0, n))
			w.RemoteAddr, w.Rkey = p.remote.va, p.remote.key()
			if atomic {
				w.RemoteAddr = (p.remote.va + 0x1000) &^ 7
				w.SGE[0].Addr = (p.local.va + 0x1000) &^ 7
				w.CompareAdd, w.Swap = 5, 77
			}
			if c.op == uapi.GOHFI_WR_SEND {
				h.postRecv(p.b, recvWQE(8, sge(p.remote, 0, n)))
			}
			h.postSend(p.a, w)
			wc := map[uint8]uint32{uapi.GOHFI_WR_RDMA_WRITE: uapi.GOHFI_WC_RDMA_WRITE, uapi.GOHFI_WR_RDMA_READ: uapi.GOHFI_WC_RDMA_READ,
				uapi.GOHFI_WR_SEND: uapi.GOHFI_WC_SEND, uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD: uapi.GOHFI_WC_FETCH_ADD,
				uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP: uapi.GOHFI_WC_COMP_SWAP}[c.op]
			h.expectCQE(p.acq, 7, uapi.GOHFI_WC_SUCCESS, wc, 0)
			if c.op == uapi.GOHFI_WR_SEND {
				h.expectCQE(p.bcq, 8, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RECV, 0)
			}
			evs := o.taken()
			var seen []fault
			for _, e := range evs {
				f := fault{e.Flags&chip.EQEFlagResponder != 0, e.Flags&chip.EQEFlagWrite != 0}
				m, qp, wqe := p.local, uint32(p.a.n), uint32(0)
				if f.responder {
					m, qp, wqe = p.remote, uint32(p.b.n), chip.EQEWQENone
					if c.op == uapi.GOHFI_WR_SEND {
						wqe = 0
					}
				}
				if e.Type != chip.EQETypePageFault || e.Key != m.key() || e.QP != qp || e.ReqQP != uint32(p.a.n) || e.PD != 1 ||
					e.WQE != wqe || e.VA < m.va || e.VA >= m.va+size || e.Length == 0 || e.FaultID == 0 {
					t.Fatalf("EQE %+v (responder %v): want key %#x QP %d WQE %#x", e, f.responder, m.key(), qp, wqe)
				}
				if len(seen) == 0 || seen[len(seen)-1] != f {
					seen = append(seen, f)
				}
			}
			if !atomic && len(evs) < 3 {
				t.Errorf("%d faults for a 3-page message, want at least 3", len(evs))
			}
			for i, f := range c.want {
				if i >= len(seen) || seen[i] != f {
					t.Fatalf("faults %+v, want %+v first", seen, c.want)
				}
			}
			if got := rd(t, h.d, chip.RegCntPageFaults); got != uint64(len(evs)) || rd(t, h.d, chip.RegCntPFResumes) != got {
				t.Fatalf("counters: %d faults, %d resumes, %d EQEs", got, rd(t, h.d, chip.RegCntPFResumes), len(evs))
			}
			switch {
			case atomic:
				tv := binary.LittleEndian.Uint64(dst[w.RemoteAddr-p.remote.va:])
				want := tv + 5
				if c.op == uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP {
					want = tv
				}
				if got := binary.LittleEndian.Uint64(h.read(p.remote.host(w.RemoteAddr), 8)); got != want {
					t.Fatalf("target %#x, want %#x", got, want)
				}
				if got := binary.LittleEndian.Uint64(h.read(p.local.host(w.SGE[0].Addr), 8)); got != tv {
					t.Fatalf("result %#x, want %#x", got, tv)
				}
			case c.op == uapi.GOHFI_WR_RDMA_READ:
				if !bytes.Equal(h.contents(p.local), dst) {
					t.Fatal("READ: data differs")
				}
			default:
				if !bytes.Equal(h.contents(p.remote), src) {
					t.Fatal("data differs")
				}
			}
		})
	}
}

// TestODPFaultErrors: a fault resumed with an error fails the operation
// with the status of its side and vendor error VendorErrPageFault, and the
// memory is unchanged; without an event queue a fault fails at once.
func TestODPFaultErrors(t *testing.T) {
	for _, c := range []struct {
		name       string
		local, rem bool
		op         uint8
		status     uint32
		recvStatus uint32 // of the receive WQE, SEND only
		respERR    bool
	}{
		{"write/requester", true, false, uapi.GOHFI_WR_RDMA_WRITE, uapi.GOHFI_WC_LOC_PROT_ERR, 0, false},
		{"write/responder", false, true, uapi.GOHFI_WR_RDMA_WRITE, uapi.GOHFI_WC_REM_ACCESS_ERR, 0, true},
		{"read/responder", false, true, uapi.GOHFI_WR_RDMA_READ, uapi.GOHFI_WC_REM_ACCESS_ERR, 0, true},
		{"read/requester", true, false, uapi.GOHFI_WR_RDMA_READ, uapi.GOHFI_WC_LOC_PROT_ERR, 0, false},
		{"send/receive", false, true, uapi.GOHFI_WR_SEND, uapi.GOHFI_WC_REM_ACCESS_ERR, uapi.GOHFI_WC_LOC_PROT_ERR, true},
		{"send/requester", true, false, uapi.GOHFI_WR_SEND, uapi.GOHFI_WC_LOC_PROT_ERR, 0, false},
		{"atomic/responder", false, true, uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD, uapi.GOHFI_WC_REM_ACCESS_ERR, 0, true},
	} {
		for _, noEQ := range []bool{false, true} {
			name := c.name
			if noEQ {
				name += "/no-eq"
			}
			t.Run(name, func(t *testing.T) {
				p := newPair(t, 0x2000)
				h := p.h
				o := newODP(t, p, 8)
				o.fail = func(chip.EQE) bool { return true }
				if noEQ {
					wr(t, h.d, chip.RegEQEntries, 0)
				}
				dst := h.fill(p.remote, 2)
				src := h.fill(p.local, 3)
				if c.local {
					o.odp(p.local)
				}
				if c.rem {
					o.odp(p.remote)
				}
				n := uint32(0x2000)
				w := sendWQE(7, c.op, sge(p.local, 0, n))
				w.RemoteAddr, w.Rkey = p.remote.va, p.remote.key()
				if isAtomic(c.op) {
					w.SGE[0].Length = 8
					w.RemoteAddr = (p.remote.va + 8) &^ 7
				}
				if c.op == uapi.GOHFI_WR_SEND {
					h.postRecv(p.b, recvWQE(8, sge(p.remote, 0, n)))
				}
				h.postSend(p.a, w)
				h.expectCQE(p.acq, 7, c.status, 0, chip.VendorErrPageFault)
				if c.recvStatus != 0 {
					h.expectCQE(p.bcq, 8, c.recvStatus, 0, chip.VendorErrPageFault)
				}
				if h.state(p.a) != uapi.GOHFI_QPS_ERR {
					t.Fatal("requester not in ERR")
				}
				if got := h.state(p.b) == uapi.GOHFI_QPS_ERR; got != c.respERR {
					t.Fatalf("responder in ERR %v, want %v", got, c.respERR)
				}
				if !bytes.Equal(h.contents(p.remote), dst) || !bytes.Equal(h.contents(p.local), src) {
					t.Fatal("memory changed")
				}
				if evs := o.taken(); noEQ != (len(evs) == 0) {
					t.Fatalf("%d EQEs with no-eq %v", len(evs), noEQ)
				}
			})
		}
	}
}

// TestODPWriteToReadOnlyPage: a present page without MTTWrite faults for a
// write (EQEFlagWrite) and reads through it without a fault; an MR that is
// not ODP gets the plain DMA error instead.
func TestODPWriteToReadOnlyPage(t *testing.T) {
	p := newPair(t, 0x1000)
	h := p.h
	o := newODP(t, p, 8)
	o.odp(p.remote)
	o.mapPage(p.remote, p.remote.va, chip.MTTPresent|chip.MTTRead)
	o.mapPage(p.remote, p.remote.va+0x1000, chip.MTTPresent|chip.MTTRead)
	// READ: no fault.
	w := sendWQE(1, uapi.GOHFI_WR_RDMA_READ, sge(p.local, 0, 0x1000))
	w.RemoteAddr, w.Rkey = p.remote.va, p.remote.key()
	h.postSend(p.a, w)
	h.expectCQE(p.acq, 1, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_READ, 0)
	if evs := o.taken(); len(evs) != 0 {
		t.Fatalf("READ of read-only pages faulted: %+v", evs)
	}
	// WRITE: one write fault for the read-only (and cached) entries; the
	// servicer makes them writable and flushes them.
	o.mu.Lock()
	o.fail = func(e chip.EQE) bool {
		if e.Flags&chip.EQEFlagWrite == 0 {
			t.Errorf("fault %+v without the write flag", e)
		}
		return false
	}
	o.mu.Unlock()
	w = sendWQE(2, uapi.GOHFI_WR_RDMA_WRITE, sge(p.local, 0, 0x100))
	w.RemoteAddr, w.Rkey = p.remote.va, p.remote.key()
	h.postSend(p.a, w)
	h.expectCQE(p.acq, 2, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
	evs := o.taken()
	if len(evs) != 1 || evs[0].Flags != chip.EQEFlagWrite|chip.EQEFlagResponder || evs[0].VA != p.remote.va || evs[0].Length != 0x100 {
		t.Fatalf("faults %+v, want one write fault at %#x of 0x100 bytes", evs, p.remote.va)
	}
}

// TestODPEventQueueFull: faults that find the queue full wait in the device
// and are written when the driver moves the head; the interrupt source is
// IntSrcEQ on vector 0.
func TestODPEventQueueFull(t *testing.T) {
	p := newPair(t, 0x4000)
	h := p.h
	// A queue of 2 entries holds one EQE; the servicer below is slow to
	// move the head, so the second fault waits.
	o := newODP(t, p, 2)
	o.pages = 1
	o.odp(p.remote)
	src := h.fill(p.local, 9)
	w := sendWQE(1, uapi.GOHFI_WR_RDMA_WRITE, sge(p.local, 0, 0x4000))
	w.RemoteAddr, w.Rkey = p.remote.va, p.remote.key()
	h.postSend(p.a, w)
	h.expectCQE(p.acq, 1, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
	if !bytes.Equal(h.contents(p.remote), src) {
		t.Fatal("data differs")
	}
	if n := len(o.taken()); n < 5 {
		t.Fatalf("%d faults for 5 pages", n)
	}
	if rd(t, h.d, chip.RegIntStatus)&chip.IntSrcEQ == 0 {
		t.Fatal("IntSrcEQ not set")
	}
}

// TestTLBInvLatency: with a latency configured, the TLB-invalidate command
// completes that much later, in order, with RegTLBInvDone and IntSrcTLB;
// until then the device still translates through the entries it cached.
func TestTLBInvLatency(t *testing.T) {
	cfg := DefaultConfig()
	cfg.TLBInvLatency = 20 * time.Millisecond
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	wr(t, d, chip.RegIntMask, chip.IntSrcTLB)
	d.mu.Lock()
	d.tlb.put(5, 0x1000|chip.MTTPresent)
	d.mu.Unlock()
	start := time.Now()
	wr(t, d, chip.RegTLBInvStart, 5)
	wr(t, d, chip.RegTLBInvCount, 1)
	wr(t, d, chip.RegTLBInvCount, 1)
	d.mu.Lock()
	_, cached := d.tlb.get(5)
	d.mu.Unlock()
	if !cached || rd(t, d, chip.RegTLBInvDone) != 0 {
		t.Fatal("flush completed at once")
	}
	for rd(t, d, chip.RegTLBInvDone) < 2 {
		if time.Since(start) > 2*time.Second {
			t.Fatal("flushes never completed")
		}
		time.Sleep(time.Millisecond)
	}
	if el := time.Since(start); el < 20*time.Millisecond {
		t.Fatalf("completed after %v", el)
	}
	d.mu.Lock()
	_, cached = d.tlb.get(5)
	d.mu.Unlock()
	if cached || rd(t, d, chip.RegIntStatus)&chip.IntSrcTLB == 0 {
		t.Fatal("entry still cached or no IntSrcTLB")
	}
	if _, err := New(Config{TLBInvLatency: -1}); err == nil {
		t.Fatal("negative latency accepted")
	}
}
