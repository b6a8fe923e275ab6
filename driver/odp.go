package driver

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/dma"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/userfault"
	"github.com/gohfi/gohfi/vfio"
	"golang.org/x/sys/unix"
)

// On-demand paging MRs (chip.CapODP), in the shape of the kernel's
// ib_umem_odp and mlx5's odp.c: an ODP MR is registered without pinning,
// every MTT entry not present, its range subscribed to the invalidation
// notifier. A device access to a missing page raises a page fault (an EQE
// and IntSrcEQ); the EQ reader hands each fault to its own goroutine, which
// pins and DMA-maps the pages around it (Params.ODPFaultAround), writes the
// MTT entries under the MR's lock after read_retry, and resumes the QP.
// An invalidation (UNMAP, REMOVE, REMAP from the notifier, or an eviction
// for the pin budget) zaps the MTT entries under the MR's lock and queues
// the pages for the flusher, which flushes the device TLB once for every
// invalidation queued meanwhile, waits for the flush, and only then unmaps
// and unpins.
//
// Unlike the kernel, where ODP pages are never pinned, every page the
// device can reach here is pinned (io_uring fixed buffers on the
// host-native path, VFIO type1 in a guest): ODP means pinning lazily on
// fault and unpinning on invalidation or eviction, and an ODP MR may be far
// larger than RLIMIT_MEMLOCK: a fault that would pass the limit first
// evicts the least recently faulted pages of the file's ODP MRs.
//
// Pages are mapped in chunks: one pin, one IOVA range and one DMA mapping
// per run of pages faulted together. A chunk is invalidated, evicted and
// unpinned whole, so an invalidation of part of a chunk (a DONTNEED of one
// page) drops the rest of it too; the device faults it back when it needs
// it.
//
// Lock order: odpMR.mu, then odpDev.mu or odpDev.fmu (never the other way);
// pinning, DMA mapping, TLB flushes and waits run without odpMR.mu. The
// notifier calls odpMR.Invalidate on its dispatcher, which takes odpMR.mu
// and odpDev.fmu only, and never waits for a flush.

// ODP defaults.
const (
	// DefaultODPFaultAround is Params.ODPFaultAround's default: the window
	// a fault maps (mlx5 prefetches up to 4 MiB for RDMA).
	DefaultODPFaultAround = 1 << 20
	// odpEQEntries is the size of the event queue: at most one fault per
	// QP is outstanding, so a queue larger than chip.MaxQPs never fills.
	odpEQEntries = 256
	// odpMaxRetries bounds a fault that keeps losing to invalidations.
	odpMaxRetries = 64
	// odpEQPoll is how often the EQ reader looks at the queue without an
	// interrupt (a safety net; the interrupt is what wakes it).
	odpEQPoll = 50 * time.Millisecond
	// odpInlinePages: a device fault whose window is at most this many
	// pages is handled on the interrupt goroutine that read it, without a
	// hand-off to a goroutine of its own (see drain).
	odpInlinePages = 16
)

// errWouldWait is what an inline fault returns when it would have to wait
// (for an eviction's flush, or a rewatch): it is handed to a goroutine.
var errWouldWait = errors.New("ODP: the fault would wait")

// odpDev is a device's ODP engine: the event queue, the ODP MRs by MPT
// index, and the invalidation flusher.
type odpDev struct {
	d *Device
	v *verbsDev

	startMu sync.Mutex
	started bool
	stop    chan struct{}
	wg      sync.WaitGroup // the reader and the flusher
	wake    chan struct{}  // IntSrcEQ for the reader
	running atomic.Bool    // start finished: interrupt may use the queue and wake

	// The event queue, read by whoever holds eqMu: the interrupt
	// goroutine on IntSrcEQ (handling small faults itself, see drain) or
	// the reader (when the interrupt goroutine found eqMu taken, and on
	// its poll).
	eqMu     sync.Mutex
	eq       *ringMem
	eqClosed bool // shutdown: nothing reads eq any more
	head     int
	told     int // head as last written to RegEQHead
	seq      uint32
	handlers sync.WaitGroup // fault goroutines

	mu  sync.Mutex
	mrs map[uint32]*odpMR // by MPT index
	nmr atomic.Int64

	// Invalidations queued for the flusher: groups of zapped chunks, one
	// per invalidation, each with its ticket. doneGen is the last ticket
	// whose pages are flushed and unpinned.
	fmu      sync.Mutex
	groups   []zapGroup
	zapGen   atomic.Uint64
	doneGen  atomic.Uint64
	flushReq chan struct{}
	doneQ    waitQueue

	// releaseErr is the first chunk release of the flusher that failed
	// (pages left pinned or mapped until removal, when Pinner.Close
	// unpins and the vfio device's close unmaps what is left), with
	// their count; shutdown reports it. The flusher has no caller to
	// return it to.
	releaseMu    sync.Mutex
	releaseErr   error
	releaseFails int

	fenced atomic.Uint64 // notifier generation known fully invalidated
	clock  atomic.Uint64 // fault stamps, for least-recently-faulted eviction
	tlbQ   waitQueue     // woken by IntSrcTLB
}

type zapGroup struct {
	ticket uint64
	chunks []*odpChunk
}

// odpMR is the ODP state of an MR (ib_umem_odp).
type odpMR struct {
	o     *odpDev
	mr    *MR
	start uintptr // page-aligned user range [start, end)
	end   uintptr
	sub   *userfault.Subscription
	win   *odpWindow // nil: each chunk is DMA-mapped by itself
	// rewatch: an UNMAP or REMAP went through the range; a new mapping at
	// the same address is not registered with userfaultfd yet, so the next
	// fault subscribes it before pinning (see rewatchLocked).
	rewatch atomic.Bool

	mu     sync.Mutex
	dead   bool
	pages  []*odpChunk // per page of the MR: the chunk mapping it, or nil
	chunks map[*odpChunk]struct{}
	pinned int

	faults, faultsHandled, invals, invalsHandled, prefetched atomic.Uint64

	// Implicit ODP (odp_implicit.go): imr on the parent, the MR of the
	// whole address space (no pages, sub or chunks of its own); child on
	// each of its 1 GiB children.
	imr   *implicitMR
	child *implicitChild
}

// odpChunk is one run of pages of an ODP MR mapped together.
type odpChunk struct {
	m     *odpMR
	first int // first page, as an index into the MR
	n     int
	pin   *dma.Pin
	iova  uint64
	stamp uint64
	slot  *winSlot // in m.win, from commit to release
}

func newODPDev(d *Device, v *verbsDev) *odpDev {
	return &odpDev{d: d, v: v, mrs: map[uint32]*odpMR{}, flushReq: make(chan struct{}, 1)}
}

// window is the fault-around window in bytes.
func (o *odpDev) window() uintptr {
	if w := o.d.m.params.ODPFaultAround; w > 0 {
		return uintptr(w)
	}
	return DefaultODPFaultAround
}

// start sets up the event queue and starts the EQ reader and the
// flusher, at the first ODP registration.
func (o *odpDev) start() error {
	o.startMu.Lock()
	defer o.startMu.Unlock()
	if o.started {
		return nil
	}
	d := o.d
	eq, err := newRingMem("eq", odpEQEntries*chip.EQESize)
	if err != nil {
		return fmt.Errorf("event queue: %w", errors.Join(err, unix.ENOMEM))
	}
	if err := d.dmaMap(eq, vfio.DMARead|vfio.DMAWrite); err != nil {
		eq.free()
		return fmt.Errorf("event queue: %w", err)
	}
	for _, w := range []struct{ reg, v uint64 }{{chip.RegEQEntries, 0}, {chip.RegEQBase, eq.iova}, {chip.RegEQEntries, odpEQEntries}} {
		if err = d.writeCSR(w.reg, w.v); err != nil {
			break
		}
	}
	if err == nil {
		var got uint64
		if got, err = d.readCSR(chip.RegEQEntries); err == nil && got != odpEQEntries {
			err = fmt.Errorf("device refused an event queue of %d entries: %w", odpEQEntries, unix.EIO)
		}
	}
	if err != nil {
		// Off first, so the device no longer writes to the queue (some of
		// the writes above may have reached it), then unmapped: an IOVA
		// left mapped would keep the pages pinned. Both reported.
		err = joinUndo(fmt.Errorf("event queue: %w", err), "undo", errors.Join(d.writeCSR(chip.RegEQEntries, 0), d.dmaUnmap(eq)))
		eq.free()
		return err
	}
	o.eqMu.Lock()
	o.eq, o.eqClosed, o.head, o.told, o.seq = eq, false, 0, 0, 0
	o.eqMu.Unlock()
	o.wake, o.stop = make(chan struct{}, 1), make(chan struct{})
	o.started = true
	o.wg.Add(2)
	go o.reader()
	go o.flusher()
	// Published last: the interrupt goroutine reads wake and the queue
	// without startMu once it sees this.
	o.running.Store(true)
	return nil
}

// shutdown stops the goroutines (device removal; every file is released
// already) and frees the event queue. Its error is a live device that
// could not be told to stop using the queue, the queue left mapped, or
// the flusher's failed chunk releases (releaseErr).
func (o *odpDev) shutdown() error {
	if o == nil {
		return nil
	}
	o.startMu.Lock()
	defer o.startMu.Unlock()
	if !o.started {
		return nil
	}
	close(o.stop)
	o.wg.Wait()
	o.eqMu.Lock() // the interrupt goroutine may still be reading the queue
	o.eqClosed = true
	o.eqMu.Unlock()
	o.handlers.Wait()
	errs := []error{o.releaseError()}
	if !o.d.dead.Load() {
		if err := o.d.writeCSR(chip.RegEQEntries, 0); err != nil {
			errs = append(errs, fmt.Errorf("disable event queue: %w", err))
		}
		if err := o.d.dmaUnmap(o.eq); err != nil {
			errs = append(errs, fmt.Errorf("event queue: %w", err))
		}
	}
	o.eq.free()
	o.started = false
	return errors.Join(errs...)
}

// interrupt is called by the interrupt handler for vector 0's sources. On
// IntSrcEQ it reads the event queue itself (drain) unless the reader is at
// it, in which case it wakes the reader; it wakes the TLB-flush waiters.
func (o *odpDev) interrupt(src uint64) {
	o.tlbQ.wakeAll()
	if src&(chip.IntSrcEQ|chip.IntSrcError) == 0 || !o.running.Load() {
		return
	}
	// (With MSI-X, vector 0 does not say which of its sources fired.)
	if o.eqMu.TryLock() {
		o.drain(true)
		o.eqMu.Unlock()
		return
	}
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

// reader reads the event queue when the interrupt goroutine could not (it
// found eqMu taken) and every odpEQPoll, a safety net.
func (o *odpDev) reader() {
	defer o.wg.Done()
	t := time.NewTimer(odpEQPoll)
	defer t.Stop()
	for {
		o.eqMu.Lock()
		o.drain(false)
		o.eqMu.Unlock()
		t.Reset(odpEQPoll)
		select {
		case <-o.stop:
			return
		case <-o.d.deadCh:
			return
		case <-o.wake:
		case <-t.C:
		}
	}
}

// drain takes every new entry of the event queue, under eqMu. A fault goes
// to a goroutine of its own, so that a slow one (a large pin, an eviction
// waiting for a flush) never holds up another context's; but on the
// interrupt goroutine (inline) a small fault, whose window is at most
// odpInlinePages, is handled right there: it saves the wake-up of another
// goroutine, which on a busy machine waits for the interrupt goroutine's P
// to come back from epoll_wait (tens of microseconds). An inline fault
// never waits for a TLB flush (the flush's own interrupt comes through
// this goroutine): what would wait goes to a goroutine.
func (o *odpDev) drain(inline bool) {
	if o.eqClosed || o.eq == nil {
		return
	}
	n := 0
	for {
		off := o.head * chip.EQESize
		if uint32(load64(o.eq.mem, off+chip.EQESeqOff-4)>>32) != uapi.NextSeq(o.seq) {
			break
		}
		var e chip.EQE
		e.Unmarshal(o.eq.mem[off : off+chip.EQESize])
		o.seq = e.Seq
		o.head = (o.head + 1) % odpEQEntries
		n++
		if inline && o.small(e) {
			o.handleFault(e, true)
		} else {
			o.handOff(func() { o.handleFault(e, false) })
		}
	}
	// The head is reported every quarter ring (a CSR write is a round
	// trip): at most chip.MaxQPs faults are outstanding, so the device
	// never finds the queue full.
	if n > 0 && (o.head-o.told+odpEQEntries)%odpEQEntries >= odpEQEntries/4 {
		// A write that fails is tried again at the next drain (writeCSR
		// has marked a lost device dead): told stays where the device
		// last heard it.
		if err := o.d.writeCSR(chip.RegEQHead, uint64(o.head)); err == nil {
			o.told = o.head
		}
	}
}

// small reports whether fault e maps at most odpInlinePages pages.
func (o *odpDev) small(e chip.EQE) bool {
	if e.Type != chip.EQETypePageFault {
		return true
	}
	m := o.lookup(e.Key)
	if m == nil {
		return true
	}
	if m = m.existingTarget(e.VA); m == nil {
		return false // an implicit MR's new child is made off the interrupt goroutine
	}
	uva := m.userAddr(e.VA)
	need, win := m.deviceSpans(uva, uint64(e.Length))
	return max(need.last, win.last)-min(need.first, win.first) <= odpInlinePages
}

// handleFault resolves one page fault and resumes it. A key that names no
// ODP MR (deregistered meanwhile) is resumed with success: the device then
// checks the key again and fails the access with its usual error.
func (o *odpDev) handleFault(e chip.EQE, inline bool) {
	if e.Type != chip.EQETypePageFault {
		return
	}
	m := o.lookup(e.Key)
	if m != nil {
		m.faults.Add(1)
		o.d.stats.odpFaults.Add(1)
	}
	o.d.trace(TraceODPFault, -1, e.VA, uint64(e.Length), uint64(e.Key))
	o.resolve(m, e, inline)
}

// resolve faults in the pages of fault e of MR m (nil: none) and resumes
// it. Inline (on the interrupt goroutine), what would wait goes to a
// goroutine: the whole fault (an eviction, a rewatch), or its resume (the
// TLB flush of an earlier invalidation of these pages still running).
func (o *odpDev) resolve(m *odpMR, e chip.EQE, inline bool) {
	var err error
	var t *odpMR // the MR whose pages the fault maps: m, or its implicit child
	if m != nil {
		t, err = m.faultTarget(e.VA, inline)
	}
	if inline && errors.Is(err, errWouldWait) {
		o.handOff(func() { o.resolve(m, e, false) })
		return
	}
	if t != nil {
		uva := t.userAddr(e.VA)
		_, win := t.deviceSpans(uva, uint64(e.Length))
		var ticket uint64
		_, ticket, err = t.fault(uva, uint64(e.Length), faultDevice, e.Flags&chip.EQEFlagWrite != 0, win, inline)
		switch {
		case inline && errors.Is(err, errWouldWait):
			o.handOff(func() { o.resolve(m, e, false) })
			return
		case err == nil && o.doneGen.Load() < ticket:
			if inline {
				o.handOff(func() { o.finish(m, e, o.waitDone(ticket)) })
				return
			}
			err = o.waitDone(ticket)
		}
	}
	o.finish(m, e, err)
}

// handOff runs f on a fault goroutine.
func (o *odpDev) handOff(f func()) {
	o.handlers.Add(1)
	go func() {
		defer o.handlers.Done()
		f()
	}()
}

// finish counts the outcome of fault e and resumes it, with the error flag
// if the pages could not be mapped. The resume is a posted write: nothing
// waits for the device to take it.
func (o *odpDev) finish(m *odpMR, e chip.EQE, err error) {
	ok := true
	if m != nil {
		switch {
		case err == nil:
			m.faultsHandled.Add(1)
			o.d.stats.odpFaultsHandled.Add(1)
		case errors.Is(err, unix.ENOENT): // deregistered meanwhile
		default:
			ok = false
		}
	}
	v := uint64(e.FaultID)
	failed := uint64(0)
	if !ok {
		v |= chip.PFResumeError
		failed = 1
	}
	// A lost resume is a dead device: markDead has woken everyone already.
	_ = o.d.writeCSRPosted(chip.RegPFResume, v)
	o.d.trace(TraceODPResume, -1, e.VA, uint64(e.Length), failed)
}

// lookup finds the ODP MR of key (index and variant).
func (o *odpDev) lookup(key uint32) *odpMR {
	o.mu.Lock()
	defer o.mu.Unlock()
	m := o.mrs[chip.MPTIndex(key)]
	if m == nil || m.mr.key != key {
		return nil
	}
	return m
}

// userAddr turns an address in the MR's key space (its iova) into the user
// address.
func (m *odpMR) userAddr(va uint64) uintptr {
	return uintptr(va - m.mr.iova + uint64(m.mr.addr))
}

// window is the fault-around window containing uva, as a page range of
// the MR.
func (m *odpMR) window(uva uintptr) pageSpan {
	w := m.o.window()
	lo := max(uva&^(w-1), m.start)
	hi := min(lo&^(w-1)+w, m.end)
	return m.span(lo, hi)
}

// deviceSpans are the pages a device fault of length bytes at uva needs
// (the access, up to a window of it) and its fault-around window.
func (m *odpMR) deviceSpans(uva uintptr, length uint64) (need, win pageSpan) {
	need = m.span(uva&^(pageSize-1), uva+uintptr(min(max(length, 1), uint64(m.o.window()))))
	return need, m.window(uva)
}

// pageSpan is a range of pages of an MR, [first, last).
type pageSpan struct{ first, last int }

func (s pageSpan) empty() bool { return s.first >= s.last }

// span is the pages of the MR that [lo, hi) touches.
func (m *odpMR) span(lo, hi uintptr) pageSpan {
	lo, hi = max(lo, m.start), min(hi, m.end)
	if lo >= hi {
		return pageSpan{}
	}
	return pageSpan{int((lo - m.start) / pageSize), int((hi - m.start + pageSize - 1) / pageSize)}
}

// faultMode says how a fault treats pages it cannot map.
type faultMode int

const (
	faultDevice   faultMode = iota // a device fault: the needed pages must map, the window may not
	faultPrefetch                  // ADVISE_MR PREFETCH(_WRITE): every page must map
	faultNoFault                   // PREFETCH_NO_FAULT: only pages resident in the process
)

// fault maps the pages of the MR that [uva, uva+length) needs and the rest
// of win (the fault-around window) that can be mapped, and returns how many
// pages it mapped and the ticket of the invalidations that must be flushed
// before the device may use them (waitDone). The needed pages failing is
// the error (EFAULT: not mapped, or not writable for a write; ENOMEM: over
// the pin budget with nothing to evict; ENOENT: the MR was deregistered).
// A read (write false) maps memory the process cannot write with read-only
// pins and MTT entries; a write first drops the read-only chunks the access
// needs (an invalidation: the device may have cached their entries), so
// that it pins them for writing or fails. With noWait (the interrupt
// goroutine) a fault that would have to evict or rewatch stops with
// errWouldWait, having mapped nothing.
func (m *odpMR) fault(uva uintptr, length uint64, mode faultMode, write bool, win pageSpan, noWait bool) (int, uint64, error) {
	o := m.o
	var need pageSpan
	switch mode {
	case faultDevice: // the access, up to a window of it
		need, _ = m.deviceSpans(uva, length)
	case faultPrefetch:
		need = m.span(uva&^(pageSize-1), uva+uintptr(max(length, 1)))
	}
	if !need.empty() {
		win = pageSpan{min(win.first, need.first), max(win.last, need.last)}
	}
	for try := 0; ; try++ {
		if try == odpMaxRetries {
			return 0, 0, fmt.Errorf("ODP fault at %#x: %d invalidations raced it: %w", uva, try, unix.EAGAIN)
		}
		seq := m.sub.ReadBegin()
		var cover *userfault.Subscription
		if m.mustWatch(win) {
			if noWait {
				return 0, 0, errWouldWait
			}
			var err error
			if cover, win, err = m.rewatchFault(win, need); err != nil {
				return 0, 0, err
			}
		}
		m.mu.Lock()
		if m.dead {
			m.mu.Unlock()
			dropCover(cover)
			return 0, 0, errnoErr("ODP fault: MR deregistered", unix.ENOENT)
		}
		var upgrade []*odpChunk
		if write {
			upgrade = m.zapReadOnlyLocked(need)
		}
		runs := m.absentLocked(win)
		m.mu.Unlock()
		o.queueZap(upgrade)
		if len(runs) == 0 {
			dropCover(cover)
			return 0, 0, nil
		}
		made, err := m.mapRuns(runs, need, win, mode, write, noWait)
		if err != nil {
			dropCover(cover)
			return 0, 0, err
		}
		if h := o.d.m.testHookODPFault.Load(); h != nil && *h != nil {
			(*h)()
		}
		m.mu.Lock()
		busy := m.busyLocked(made)
		if m.dead || m.sub.ReadRetry(seq) || m.conflictLocked(made) || busy {
			dead := m.dead
			m.mu.Unlock()
			dropCover(cover)
			// Never committed: no MTT entry names them, so nothing to
			// flush; a release that fails leaves pages pinned or mapped,
			// and ends the fault.
			var rerrs []error
			for _, c := range made {
				rerrs = append(rerrs, c.release(true))
			}
			rerr := errors.Join(rerrs...)
			if dead {
				return 0, 0, joinUndo(errnoErr("ODP fault: MR deregistered", unix.ENOENT), "releasing the fault's pages", rerr)
			}
			if rerr != nil {
				return 0, 0, fmt.Errorf("ODP fault at %#x: releasing the pages of a fault that gave way: %w", uva, rerr)
			}
			if busy {
				// The window's slots still hold zapped chunks: their
				// flush and release come first.
				if noWait {
					return 0, 0, errWouldWait
				}
				if err := o.waitDone(o.zapGen.Load()); err != nil {
					return 0, 0, err
				}
			}
			continue
		}
		n := 0
		for _, c := range made {
			m.commitLocked(c)
			n += c.n
		}
		// Entries of these pages zapped by an invalidation whose flush is
		// still running may be cached by the device: the caller resumes
		// only after it.
		ticket := o.zapGen.Load()
		m.mu.Unlock()
		dropCover(cover)
		return n, ticket, nil
	}
}

// rewatchRange registers the pages of win with userfaultfd again after an
// UNMAP or REMAP (see odpMR.rewatch) through a short-lived subscription:
// the whole MR if all of it is mapped (then the flag is cleared), else the
// window. Its Remove leaves the VMAs registered, the MR's own subscription
// covering them.
func (m *odpMR) rewatchRange(win pageSpan) *userfault.Subscription {
	n := m.o.d.runningNotifier()
	if n == nil {
		return nil
	}
	ops := userfault.InvalidateFunc(func(*userfault.Subscription, userfault.Event) bool { return false })
	if s, err := n.Subscribe(m.start, m.end-m.start, ops); err == nil {
		m.rewatch.Store(false)
		return s
	}
	if win.empty() {
		return nil
	}
	// Without this cover too, the window's new pages go unwatched for
	// this fault only: the flag stays set and the next fault tries again.
	s, _ := n.Subscribe(m.start+uintptr(win.first)*pageSize, uintptr(win.last-win.first)*pageSize, ops)
	return s
}

// absentLocked returns the runs of pages of win that no chunk maps, each
// at most the fault-around window long.
func (m *odpMR) absentLocked(win pageSpan) []pageSpan {
	var runs []pageSpan
	wp := int(m.o.window() / pageSize)
	for p := win.first; p < win.last; {
		if m.pages[p] != nil {
			p++
			continue
		}
		q := p
		for q < win.last && m.pages[q] == nil && q-p < wp {
			q++
		}
		runs = append(runs, pageSpan{p, q})
		p = q
	}
	return runs
}

// busyLocked reports whether a window slot of made's pages still holds a
// zapped chunk.
func (m *odpMR) busyLocked(made []*odpChunk) bool {
	if m.win == nil {
		return false
	}
	for _, c := range made {
		if m.win.busy(c) {
			return true
		}
	}
	return false
}

// conflictLocked reports whether a page of made was mapped meanwhile (two
// faults on the same pages: the later one gives way).
func (m *odpMR) conflictLocked(made []*odpChunk) bool {
	for _, c := range made {
		for p := c.first; p < c.first+c.n; p++ {
			if m.pages[p] != nil {
				return true
			}
		}
	}
	return false
}

// mapRuns pins and DMA-maps runs of the MR, without its lock. A run that
// fails to pin (a hole, or memory the pin cannot take) is cut down to the
// pages that need it; in NO_FAULT mode only resident pages are taken. An
// ENOMEM from the pin evicts pages of the file's ODP MRs (not those of win)
// and tries again.
func (m *odpMR) mapRuns(runs []pageSpan, need, win pageSpan, mode faultMode, write, noWait bool) ([]*odpChunk, error) {
	var made []*odpChunk
	undo := func(err error) ([]*odpChunk, error) {
		errs := []error{err}
		for _, c := range made {
			errs = append(errs, c.release(true))
		}
		return nil, errors.Join(errs...)
	}
	if mode == faultNoFault {
		runs = m.residentRuns(runs)
	}
	for _, r := range runs {
		c, err := m.mapEvicting(r, win, write, noWait)
		if err != nil && mode == faultDevice && !errors.Is(err, unix.ENOMEM) && !errors.Is(err, errWouldWait) {
			// Fault-around is best effort: keep to what the access needs.
			if nr := (pageSpan{max(r.first, need.first), min(r.last, need.last)}); !nr.empty() && nr != r {
				c, err = m.mapEvicting(nr, win, write, noWait)
			} else if nr.empty() {
				continue
			}
		}
		if err != nil {
			if mode == faultNoFault {
				continue
			}
			return undo(err)
		}
		made = append(made, c)
	}
	return made, nil
}

// mapEvicting maps run r, evicting on ENOMEM until it fits or nothing is
// left to evict; with noWait an ENOMEM is errWouldWait (an eviction waits
// for its flush).
func (m *odpMR) mapEvicting(r pageSpan, keep pageSpan, write, noWait bool) (*odpChunk, error) {
	for {
		c, err := m.mapRun(r, write)
		if err == nil || !errors.Is(err, unix.ENOMEM) {
			return c, err
		}
		if noWait {
			return nil, errWouldWait
		}
		if m.o.evict(m.mr.pd, r.last-r.first, m, keep) == 0 {
			return nil, err
		}
	}
}

// mapRun pins pages r of the MR and maps them at a fresh IOVA range. For a
// read, memory the pinner cannot pin for writing (EFAULT: not writable, or
// not mapped, which the read-only pin then reports) is pinned read-only and
// mapped for device reads only.
func (m *odpMR) mapRun(r pageSpan, write bool) (*odpChunk, error) {
	d := m.o.d
	c := &odpChunk{m: m, first: r.first, n: r.last - r.first}
	vaddr := m.start + uintptr(r.first)*pageSize
	size := uint64(c.n) * pageSize
	var err error
	if c.pin, err = pinFor(d.pinner, vaddr, size, !write); err != nil {
		return nil, fmt.Errorf("ODP: pin %#x+%#x: %w", vaddr, size, err)
	}
	d.stats.pagesPinned.Add(uint64(c.n))
	if m.win != nil {
		return c, nil // its IOVAs are the window's (commitLocked)
	}
	if c.iova, err = d.iova.alloc(size); err != nil {
		c.iova = 0
		return nil, errors.Join(fmt.Errorf("ODP: %w", errors.Join(err, unix.ENOMEM)), c.release(true))
	}
	flags := dmaFlags(m.mr.access)
	if c.pin.ReadOnly() {
		flags &^= vfio.DMAWrite
	}
	if err = d.vdev.DMAMap(vfio.DMAMapping{IOVA: c.iova, Vaddr: vaddr, Size: size, Flags: flags, Access: c.pin}); err != nil {
		d.iova.release(c.iova, size)
		c.iova = 0
		return nil, errors.Join(fmt.Errorf("ODP: %w", d.ioErr(fmt.Errorf("DMA map: %w", err))), c.release(true))
	}
	return c, nil
}

// release unmaps and unpins a chunk no MTT entry names (or whose entries
// are zapped and flushed); reuse false keeps its IOVAs out of circulation
// (a flush failed: the device may still hold translations).
func (c *odpChunk) release(reuse bool) error {
	d := c.m.o.d
	var errs []error
	size := uint64(c.n) * pageSize
	if w := c.m.win; w != nil {
		w.empty(c)
	}
	if c.iova != 0 {
		if !d.dead.Load() {
			if err := d.vdev.DMAUnmap(c.iova, size); err != nil {
				errs = append(errs, d.ioErr(fmt.Errorf("DMA unmap: %w", err)))
			}
		}
		if reuse {
			d.iova.release(c.iova, size)
		}
		c.iova = 0
	}
	if c.pin != nil {
		errs = append(errs, c.pin.Unpin())
		d.stats.pagesUnpinned.Add(uint64(c.n))
		c.pin = nil
	}
	return errors.Join(errs...)
}

// commitLocked writes a chunk's MTT entries and makes it the MR's; a
// read-only pin's entries lack MTTWrite.
func (m *odpMR) commitLocked(c *odpChunk) {
	mtt, flags := m.o.v.mtt, mttFlags(m.mr.access)
	iova := c.iova
	if m.win != nil {
		m.win.fill(c)
		iova = m.win.iova + uint64(c.first)*pageSize
	}
	if c.pin.ReadOnly() {
		flags &^= chip.MTTWrite
	}
	for i := 0; i < c.n; i++ {
		store64(mtt, (m.mr.mttFirst+c.first+i)*chip.MTTEntrySize, (iova+uint64(i)*pageSize)&chip.MTTAddrMask|flags)
		m.pages[c.first+i] = c
	}
	c.stamp = m.o.clock.Add(1)
	m.chunks[c] = struct{}{}
	m.pinned += c.n
}

// zapReadOnlyLocked zaps the read-only chunks that map pages of s (see
// zapLocked) and returns them.
func (m *odpMR) zapReadOnlyLocked(s pageSpan) []*odpChunk {
	var zapped []*odpChunk
	for p := s.first; p < s.last; p++ {
		if c := m.pages[p]; c != nil && c.pin.ReadOnly() {
			m.zapLocked(c)
			zapped = append(zapped, c)
			p = c.first + c.n - 1
		}
	}
	return zapped
}

// zapLocked writes not-present entries for a chunk and detaches it; the
// caller queues it for the flusher.
func (m *odpMR) zapLocked(c *odpChunk) {
	mtt := m.o.v.mtt
	for i := 0; i < c.n; i++ {
		store64(mtt, (m.mr.mttFirst+c.first+i)*chip.MTTEntrySize, 0)
		m.pages[c.first+i] = nil
	}
	delete(m.chunks, c)
	m.pinned -= c.n
}

// Invalidate implements userfault.IntervalOps: UNMAP, REMOVE (DONTNEED,
// FREE), REMAP and the kernel-side and overflow events zap every chunk the
// range touches and queue it for the flusher (which flushes the device TLB,
// waits, then unmaps and unpins); it does not wait for the flush. FORK needs
// nothing: the kernel copies pinned pages for the child, the parent keeps
// the ones the device reaches.
func (m *odpMR) Invalidate(_ *userfault.Subscription, ev userfault.Event) bool {
	switch ev.Kind {
	case userfault.EventUnmap, userfault.EventRemap:
		m.rewatch.Store(true)
	case userfault.EventRemove, userfault.EventKernel, userfault.EventOverflow:
	default:
		return false
	}
	m.mu.Lock()
	if m.dead {
		m.mu.Unlock()
		return true
	}
	s := m.span(ev.Start, ev.End)
	var zapped []*odpChunk
	for p := s.first; p < s.last; p++ {
		if c := m.pages[p]; c != nil {
			m.zapLocked(c)
			zapped = append(zapped, c)
			p = c.first + c.n - 1
		}
	}
	m.mu.Unlock()
	for _, c := range zapped {
		m.o.d.trace(TraceInvalBegin, -1, uint64(c.first), uint64(c.n), 0)
	}
	m.o.queueZap(zapped)
	if h := m.o.d.m.testHookODPInvalidate.Load(); h != nil {
		(*h)(ev)
	}
	return true
}

// queueZap hands zapped chunks to the flusher and returns their ticket.
// Evictions count as invalidations (of pages the driver chose).
func (o *odpDev) queueZap(chunks []*odpChunk) uint64 {
	if len(chunks) == 0 {
		return 0
	}
	for _, c := range chunks {
		c.m.invals.Add(uint64(c.n))
		o.d.stats.odpInvals.Add(uint64(c.n))
	}
	o.fmu.Lock()
	t := o.zapGen.Add(1)
	o.groups = append(o.groups, zapGroup{ticket: t, chunks: chunks})
	o.fmu.Unlock()
	select {
	case o.flushReq <- struct{}{}:
	default:
	}
	return t
}

// flusher flushes the device TLB for the zapped chunks and releases them:
// with batching (the default) everything queued since the last flush in
// one flush, else one flush per invalidation.
func (o *odpDev) flusher() {
	defer o.wg.Done()
	for {
		select {
		case <-o.stop:
			o.flushQueued() // nothing may stay pinned
			return
		case <-o.flushReq:
		}
		o.flushQueued()
	}
}

func (o *odpDev) flushQueued() {
	for {
		o.fmu.Lock()
		gs := o.groups
		if !o.d.m.params.ODPNoBatch && len(gs) > 0 {
			o.groups = nil
		} else if len(gs) > 0 {
			gs, o.groups = gs[:1], gs[1:]
		}
		o.fmu.Unlock()
		if len(gs) == 0 {
			return
		}
		lo, hi := -1, -1
		for _, g := range gs {
			for _, c := range g.chunks {
				f := c.m.mr.mttFirst + c.first
				if lo < 0 || f < lo {
					lo = f
				}
				hi = max(hi, f+c.n)
			}
		}
		err := o.v.flushTLB(lo, hi-lo)
		reuse := err == nil || o.d.dead.Load()
		for _, g := range gs {
			for _, c := range g.chunks {
				o.recordRelease(c.release(reuse))
				c.m.invalsHandled.Add(uint64(c.n))
				o.d.stats.odpInvalsHandled.Add(uint64(c.n))
			}
		}
		o.doneGen.Store(gs[len(gs)-1].ticket)
		o.doneQ.wakeAll()
	}
}

// recordRelease keeps a failed chunk release of the flusher (releaseErr).
func (o *odpDev) recordRelease(err error) {
	if err == nil {
		return
	}
	o.releaseMu.Lock()
	defer o.releaseMu.Unlock()
	if o.releaseFails == 0 {
		o.releaseErr = err
	}
	o.releaseFails++
}

// releaseError reports the flusher's failed chunk releases, or nil.
func (o *odpDev) releaseError() error {
	o.releaseMu.Lock()
	defer o.releaseMu.Unlock()
	if o.releaseFails == 0 {
		return nil
	}
	return fmt.Errorf("ODP flusher: %d chunk releases failed, the first: %w", o.releaseFails, o.releaseErr)
}

// waitDone returns once every invalidation up to ticket is flushed and
// unpinned.
func (o *odpDev) waitDone(ticket uint64) error {
	for o.doneGen.Load() < ticket {
		ch := o.doneQ.wait()
		if o.doneGen.Load() >= ticket {
			break
		}
		select {
		case <-ch:
		case <-o.d.deadCh:
			return o.d.errGone()
		}
	}
	return nil
}

// fence makes the invalidations that reached the notifier before the call
// visible to the device: every userfaultfd event read (munmap, madvise,
// mremap that returned) delivered, and its pages zapped, flushed and
// unpinned. POST_SEND and POST_RECV call it, so an operation posted after
// an munmap returned never goes through the old pages. One atomic load
// when the file has no ODP MR, three when nothing is pending.
func (o *odpDev) fence() error {
	if o == nil || o.nmr.Load() == 0 {
		return nil
	}
	n := o.d.runningNotifier()
	if n == nil {
		return nil
	}
	opened, delivered := n.Generation()
	if opened <= o.fenced.Load() && o.doneGen.Load() >= o.zapGen.Load() {
		return nil
	}
	if delivered < opened {
		if err := n.WaitDelivered(context.Background(), opened); err != nil {
			return fmt.Errorf("ODP fence: %w", err)
		}
	}
	if err := o.waitDone(o.zapGen.Load()); err != nil {
		return err
	}
	for f := o.fenced.Load(); f < opened && !o.fenced.CompareAndSwap(f, opened); f = o.fenced.Load() {
	}
	return nil
}

// evict frees at least need pages of pd's ODP MRs, least recently faulted
// first, sparing the pages keep of MR self; it waits until they are
// flushed and unpinned and returns how many pages it freed.
func (o *odpDev) evict(pd *PD, need int, self *odpMR, keep pageSpan) int {
	o.mu.Lock()
	var mrs []*odpMR
	for _, m := range o.mrs {
		if m.mr.pd == pd {
			mrs = append(mrs, m)
			mrs = append(mrs, m.children()...)
		}
	}
	o.mu.Unlock()
	type cand struct {
		c     *odpChunk
		stamp uint64
	}
	var cands []cand
	for _, m := range mrs {
		m.mu.Lock()
		for c := range m.chunks {
			if m == self && c.first < keep.last && keep.first < c.first+c.n {
				continue
			}
			cands = append(cands, cand{c, c.stamp})
		}
		m.mu.Unlock()
	}
	slices.SortFunc(cands, func(a, b cand) int { return int(a.stamp - b.stamp) })
	var zapped []*odpChunk
	freed := 0
	for _, k := range cands {
		if freed >= need {
			break
		}
		m := k.c.m
		m.mu.Lock()
		if _, ok := m.chunks[k.c]; ok && !m.dead {
			m.zapLocked(k.c)
			zapped = append(zapped, k.c)
			freed += k.c.n
		}
		m.mu.Unlock()
	}
	if t := o.queueZap(zapped); t != 0 {
		// Fails only when the device is gone (errGone); the caller's
		// next map attempt fails with that.
		_ = o.waitDone(t)
	}
	return freed
}

// residentRuns cuts runs down to the pages resident in the process
// (mincore), for PREFETCH_NO_FAULT.
func (m *odpMR) residentRuns(runs []pageSpan) []pageSpan {
	var out []pageSpan
	for _, r := range runs {
		vec, err := mincore(m.start+uintptr(r.first)*pageSize, (r.last-r.first)*pageSize)
		if err != nil {
			continue
		}
		for i := 0; i < len(vec); {
			if vec[i]&1 == 0 {
				i++
				continue
			}
			j := i
			for j < len(vec) && vec[j]&1 != 0 {
				j++
			}
			out = append(out, pageSpan{r.first + i, r.first + j})
			i = j
		}
	}
	return out
}

// regODP is REG_MR's ODP part: nothing pinned or mapped, the MTT entries
// left not present (freed entries are zero), the range subscribed to the
// notifier. The caller writes the MPT entry (type ODP) once it returns.
func (pd *PD) regODP(mr *MR) error {
	d, v := pd.d, pd.v
	if d.info.CapFlags&chip.CapODP == 0 || v.odp == nil {
		return errnoErr("REG_MR: the device has no on-demand paging", unix.EOPNOTSUPP)
	}
	o := v.odp
	if err := o.start(); err != nil {
		return fmt.Errorf("gohfi: REG_MR: %w", err)
	}
	not, err := d.notifier()
	if err != nil {
		return fmt.Errorf("gohfi: REG_MR: %w", err)
	}
	start := mr.addr &^ (pageSize - 1)
	m := &odpMR{o: o, mr: mr, start: start, end: start + uintptr(mr.npages)*pageSize,
		pages: make([]*odpChunk, mr.npages), chunks: map[*odpChunk]struct{}{}}
	if m.win, err = newODPWindow(d, m); err != nil {
		return fmt.Errorf("gohfi: REG_MR: %w", err)
	}
	if m.sub, err = not.Subscribe(m.start, m.end-m.start, m); err != nil {
		if m.win != nil {
			err = joinUndo(err, "unmapping the ODP window", m.win.close(d, true))
		}
		if errors.Is(err, userfault.ErrGoHeap) || errors.Is(err, unix.ENOMEM) || errors.Is(err, unix.EFAULT) {
			return errnoErr(fmt.Sprintf("REG_MR: watch %#x+%d: %v", mr.addr, mr.length, err), unix.EFAULT)
		}
		return fmt.Errorf("gohfi: REG_MR: watch %#x+%d: %w", mr.addr, mr.length, err)
	}
	mr.odp = m
	o.mu.Lock()
	o.mrs[mr.index] = m
	o.mu.Unlock()
	o.nmr.Add(1)
	return nil
}

// deregODP takes an ODP MR apart after its MPT entry was made free: no new
// fault commits (dead), the notifier forgets it, every chunk is zapped,
// the TLB flushed for the whole MR, and everything it holds unmapped and
// unpinned, including chunks an invalidation queued before.
func (m *odpMR) dereg() error {
	if m.imr != nil {
		return m.imr.dereg()
	}
	o := m.o
	o.forget(m)
	m.sub.Remove()
	m.mu.Lock()
	m.dead = true
	var zapped []*odpChunk
	for c := range m.chunks {
		m.zapLocked(c)
		zapped = append(zapped, c)
	}
	m.mu.Unlock()
	var errs []error
	var ferr error
	if !o.d.dead.Load() {
		ferr = o.v.flushTLB(m.mr.mttFirst, m.mr.npages)
		errs = append(errs, ferr)
	}
	for _, c := range zapped {
		errs = append(errs, c.release(true))
	}
	if o.started {
		errs = append(errs, o.waitDone(o.zapGen.Load()))
	}
	if m.win != nil {
		errs = append(errs, m.win.close(o.d, ferr == nil))
	}
	return errors.Join(errs...)
}

// forget takes m out of the device's ODP MRs: faults no longer find it.
func (o *odpDev) forget(m *odpMR) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.mrs[m.mr.index] == m {
		delete(o.mrs, m.mr.index)
		o.nmr.Add(-1)
	}
}

// pagesPinned is how many pages the ODP MR holds mapped now.
func (m *odpMR) pagesPinned() int {
	if m.imr != nil {
		return m.imr.pagesPinned()
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.pinned
}

// stats fills an MR_STATS answer.
func (m *odpMR) stats(s *uapi.GohfiMRStats) {
	s.PageFaults = m.faults.Load()
	s.PageFaultsHandled = m.faultsHandled.Load()
	s.PageInvalidations = m.invals.Load()
	s.PageInvalidationsHandled = m.invalsHandled.Load()
	s.PagePrefetch = m.prefetched.Load()
	if m.imr != nil {
		m.imr.stats(s)
	}
}

// AdviseMR gives advice about [addr, addr+length) of the ODP MR lkey
// (ib_advise_mr): PREFETCH and PREFETCH_WRITE fault the range in (whole,
// in fault-around windows), PREFETCH_NO_FAULT maps only the pages resident
// in the process; with GOHFI_ADVISE_MR_FLAG_FLUSH it returns when done,
// else it starts the work and returns. Errors: EOPNOTSUPP (unknown advice,
// no ODP), EINVAL (unknown flags, zero length, not an ODP MR), EFAULT (no
// such lkey in this file, the range outside the MR; synchronously also a
// range that cannot be faulted in), EPERM (PREFETCH_WRITE on an MR without
// IB_ACCESS_LOCAL_WRITE).
func (pd *PD) AdviseMR(advice, flags, lkey uint32, addr, length uint64) error {
	switch {
	case advice > uapi.GOHFI_ADVISE_MR_ADVICE_PREFETCH_NO_FAULT:
		return errnoErr(fmt.Sprintf("ADVISE_MR: advice %d", advice), unix.EOPNOTSUPP)
	case flags&^uapi.GOHFI_ADVISE_MR_FLAG_FLUSH != 0:
		return errnoErr(fmt.Sprintf("ADVISE_MR: flags %#x", flags), unix.EINVAL)
	case length == 0:
		return errnoErr("ADVISE_MR: zero length", unix.EINVAL)
	}
	pd.mu.RLock()
	var mr *MR
	for _, x := range pd.mrs {
		if x.key == lkey {
			mr = x
			break
		}
	}
	pd.mu.RUnlock()
	switch {
	case mr == nil:
		return errnoErr(fmt.Sprintf("ADVISE_MR: no MR with lkey %#x in this file", lkey), unix.EFAULT)
	case mr.odp == nil:
		return errnoErr(fmt.Sprintf("ADVISE_MR: MR %#x is not an ODP MR", lkey), unix.EINVAL)
	case addr < mr.iova || length > mr.length || addr-mr.iova > mr.length-length:
		return errnoErr(fmt.Sprintf("ADVISE_MR: %#x+%d outside the MR (%#x+%d)", addr, length, mr.iova, mr.length), unix.EFAULT)
	case advice == uapi.GOHFI_ADVISE_MR_ADVICE_PREFETCH_WRITE && mr.access&uapi.IB_ACCESS_LOCAL_WRITE == 0:
		return errnoErr("ADVISE_MR: PREFETCH_WRITE on an MR without IB_ACCESS_LOCAL_WRITE", unix.EPERM)
	}
	m := mr.odp
	mode := faultPrefetch
	if advice == uapi.GOHFI_ADVISE_MR_ADVICE_PREFETCH_NO_FAULT {
		mode = faultNoFault
	}
	run := func() error {
		uva := m.userAddr(addr)
		end := uva + uintptr(length)
		w := m.o.window()
		for lo, hi := uva, uva; lo < end; lo = hi {
			t, err := m.faultTarget(uint64(lo), false)
			if err != nil {
				return err
			}
			hi = min(end, (lo&^(w-1))+w, t.end)
			n, ticket, err := t.fault(lo, uint64(hi-lo), mode, advice == uapi.GOHFI_ADVISE_MR_ADVICE_PREFETCH_WRITE, t.span(lo, hi), false)
			m.prefetched.Add(uint64(n))
			pd.d.stats.odpPrefetch.Add(uint64(n))
			if err == nil {
				err = m.o.waitDone(ticket)
			}
			if err != nil {
				return err
			}
		}
		return nil
	}
	if flags&uapi.GOHFI_ADVISE_MR_FLAG_FLUSH != 0 {
		if err := run(); err != nil {
			if errors.Is(err, unix.ENOENT) {
				return errnoErr("ADVISE_MR: MR deregistered", unix.EFAULT)
			}
			return fmt.Errorf("gohfi: ADVISE_MR: %w", err)
		}
		return nil
	}
	// Asynchronous, as the kernel's work queue (mlx5's prefetch work):
	// nobody is left to take its error, which only says that some pages
	// were not prefetched; a later access faults them in.
	go func() { _ = run() }()
	return nil
}

func (pd *PD) ioctlAdviseMR(arg UserPtr) error {
	var a uapi.GohfiAdviseMR
	if err := readArg(arg, &a, "ADVISE_MR"); err != nil {
		return err
	}
	if a.Reserved != 0 {
		return errnoErr("ADVISE_MR: reserved field set", unix.EINVAL)
	}
	return pd.AdviseMR(a.Advice, a.Flags, a.Lkey, a.Addr, a.Length)
}

// odpCaps are QUERY_DEVICE's ODP capabilities: RC SEND, RECV, RDMA WRITE
// and READ fault on both sides, atomics once POST_SEND takes them;
// implicit ODP where the device can take it (implicitSupported); no UC,
// UD or SRQ.
func (v *verbsDev) odpCaps() (general uint64, rc uint32) {
	if v.odp == nil {
		return 0, 0
	}
	rc = uapi.IBV_ODP_SUPPORT_SEND | uapi.IBV_ODP_SUPPORT_RECV | uapi.IBV_ODP_SUPPORT_WRITE |
		uapi.IBV_ODP_SUPPORT_READ | uapi.IBV_ODP_SUPPORT_ATOMIC
	general = uapi.IBV_ODP_SUPPORT
	if v.implicitSupported() {
		general |= uapi.IBV_ODP_SUPPORT_IMPLICIT
	}
	return general, rc
}

// tlbWake returns the channel the next IntSrcTLB closes (nil without ODP,
// whose devices do not raise it: the flush then polls).
func (v *verbsDev) tlbWake() <-chan struct{} {
	if v.odp == nil {
		return nil
	}
	return v.odp.tlbQ.wait()
}

// waitTLBInterrupt sleeps until IntSrcTLB (wake) or for poll without one.
func (v *verbsDev) waitTLBInterrupt(wake <-chan struct{}, poll time.Duration) {
	if wake == nil {
		time.Sleep(poll)
		return
	}
	t := time.NewTimer(10 * time.Millisecond) // the flush's own deadline is checked by the caller
	defer t.Stop()
	select {
	case <-wake:
		v.tlbIntrWakes.Add(1)
	case <-t.C:
		v.tlbTimerWakes.Add(1)
	case <-v.d.deadCh:
	}
}

// dropCover removes a rewatch subscription, if one was made.
func dropCover(s *userfault.Subscription) {
	if s != nil {
		s.Remove()
	}
}
