// Package userfault stands in for the kernel's mmu_notifier in user space: a
// driver subscribes a virtual address range and is called back when the
// memory behind it goes away or changes (munmap, mremap, madvise, brk, fork,
// exit, and kernel-side invalidations where the kernel lets us see them).
//
// The API has the shape of mmu_interval_notifier: Subscribe a range with an
// IntervalOps; Invalidate is called for every event that overlaps it; a
// sequence number (ReadBegin / ReadRetry) tells a caller that pinned and
// programmed a range whether an invalidation landed meanwhile.
//
// Sources, merged into one stream and de-duplicated:
//   - userfaultfd (synchronous: the unmapping thread waits until the monitor
//     has read the event), ranges registered in write-protect mode;
//   - eBPF programs on syscall tracepoints (asynchronous, see what
//     userfaultfd cannot: exit, other processes), delivered by a ring buffer;
//   - optionally the KVM mmu-notifier tracepoint and fentry on the kernel's
//     notifier (kernel-side invalidations: migration, THP split, COW).
//
// See docs/userfault.md for what each source sees.
package userfault

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// EventKind says why a range was invalidated.
type EventKind uint8

const (
	// EventUnmap: the mapping is gone (munmap, brk shrink, the tail of an
	// mremap shrink, a MAP_FIXED mremap onto the range).
	EventUnmap EventKind = iota + 1
	// EventRemove: the pages were dropped, the mapping stays
	// (madvise DONTNEED, FREE, REMOVE, PAGEOUT).
	EventRemove
	// EventRemap: the mapping moved (mremap); Event.To is the new address
	// when the source knows it.
	EventRemap
	// EventFork: the process forked; its private pages are copy-on-write, so
	// the next write by the parent may land on a new page. Range: everything.
	EventFork
	// EventExit: the watched process exited. Range: everything.
	EventExit
	// EventKernel: an invalidation seen inside the kernel (KVM mmu notifier,
	// fentry) whose cause is not known: migration, THP split, COW,
	// mprotect, reclaim, or one of the above.
	EventKernel
	// EventOverflow: a source lost events (its ring buffer was full).
	// Range: everything.
	EventOverflow
)

var kindNames = [...]string{"?", "unmap", "remove", "remap", "fork", "exit", "kernel", "overflow"}

func (k EventKind) String() string {
	if int(k) < len(kindNames) {
		return kindNames[k]
	}
	return fmt.Sprintf("EventKind(%d)", k)
}

// Source names where an event came from.
type Source uint8

const (
	// SourceUserfaultfd: non-cooperative userfaultfd events.
	SourceUserfaultfd Source = iota + 1
	// SourceTracepoint: eBPF on the syscall and sched tracepoints.
	SourceTracepoint
	// SourceKVM: eBPF on tp_btf/kvm_unmap_hva_range, fed by a KVM VM this
	// notifier creates so that the process's mm gets a real mmu_notifier.
	SourceKVM
	// SourceFentry: eBPF fentry on __mmu_notifier_invalidate_range_start.
	SourceFentry
)

var sourceNames = [...]string{"?", "userfaultfd", "tracepoint", "kvm", "fentry"}

func (s Source) String() string {
	if int(s) < len(sourceNames) {
		return sourceNames[s]
	}
	return fmt.Sprintf("Source(%d)", s)
}

// Event is one invalidation: [Start, End) of the watched address space.
type Event struct {
	Kind       EventKind
	Start, End uintptr
	Source     Source
	To         uintptr // EventRemap: new address, when known
}

func (e Event) String() string {
	return fmt.Sprintf("%s %s [%#x, %#x)", e.Source, e.Kind, e.Start, e.End)
}

// IntervalOps is what a subscriber implements, like mmu_interval_notifier_ops.
type IntervalOps interface {
	// Invalidate is called for each event overlapping the subscription's
	// range (partial overlaps included), on the notifier's dispatch
	// goroutine, one call at a time. It returns whether the event concerns
	// the subscriber: true advances the subscription's sequence number (so
	// ReadRetry reports the race), false leaves it as it was (the kernel's
	// callback not calling mmu_interval_set_seq). It must not call ReadBegin
	// or Sync; it may call Remove and Subscribe, and may unmap memory.
	Invalidate(sub *Subscription, ev Event) bool
}

// InvalidateFunc adapts a function to IntervalOps.
type InvalidateFunc func(sub *Subscription, ev Event) bool

// Invalidate calls f.
func (f InvalidateFunc) Invalidate(sub *Subscription, ev Event) bool { return f(sub, ev) }

// Options choose the process and the sources.
type Options struct {
	// Pid is the process whose address space is watched; 0 means this one.
	// Another process can only be watched by the eBPF sources.
	Pid int
	// Sources to start. Nil means userfaultfd and tracepoints (and only the
	// tracepoints for another process).
	Sources []Source
	// Require makes New fail if any chosen source cannot start. Without it a
	// failed source is reported by Sources and the others keep working; New
	// fails only if none starts.
	Require bool
	// Observer, if set, is told of the userfaultfd read windows (see
	// GenerationObserver).
	Observer GenerationObserver
}

// GenerationObserver publishes the notifier's generations where user space
// can read them without a system call (kdreg2's scheme): a consumer that
// sees the opened generation move waits until the delivered generation
// catches up, and only then trusts its cache.
type GenerationObserver interface {
	// WindowOpened runs on the userfaultfd monitor thread before the read
	// that releases the unmapping threads, so gen is visible before munmap
	// (mremap, madvise) returns. It must be quick, must not touch watched
	// memory and must not wait for anything a thread that unmaps may hold.
	WindowOpened(gen uint64)
	// WindowsDelivered runs once every event read in windows up to gen has
	// been delivered (every Invalidate for them returned).
	WindowsDelivered(gen uint64)
}

// SourceStatus tells whether a source started and, if not, why.
type SourceStatus struct {
	Source  Source
	Started bool
	Err     error  // why it did not start
	Detail  string // what it runs (features, programs attached)
}

func (s SourceStatus) String() string {
	if s.Started {
		return fmt.Sprintf("%s: started (%s)", s.Source, s.Detail)
	}
	return fmt.Sprintf("%s: not started: %v", s.Source, s.Err)
}

// ErrClosed is returned by a closed Notifier.
var ErrClosed = errors.New("userfault: notifier closed")

// source is one event source. watch and unwatch run with Notifier.mu held.
type source interface {
	kind() Source
	detail() string
	watch(start, end uintptr, vmas pageRange) error // page-aligned range newly subscribed; vmas: extent of its VMAs (self only)
	unwatch(pieces []pageRange)                     // page-aligned ranges no subscription covers now
	sync(ctx context.Context) error                 // every event that happened before is posted
	close() error
}

type pageRange struct{ start, end uintptr }

// Notifier watches one address space. It is safe for concurrent use.
type Notifier struct {
	pid  int
	self bool

	mu      sync.Mutex
	cond    sync.Cond // on mu: a subscription settled, or a read window closed
	tree    intervalTree
	nextID  uint64
	closed  bool
	sources []source
	status  []SourceStatus
	dedup   dedup
	maps    *procMaps // this process's VMAs; nil when watching another
	windows uint64    // userfaultfd read windows closed
	// beforeWatch, set by tests, runs between reading the VMAs of a
	// Subscribe and the sources' watch.
	beforeWatch func()

	// inflight counts open userfaultfd read windows: set before the read
	// that releases an unmapping thread, cleared once the events are posted
	// and their subscriptions marked. ReadRetry and ReadBegin look at it,
	// so a thread whose munmap returned never sees a stale subscription.
	inflight atomic.Int32

	// Generations: genOpened counts read windows opened, genDelivered the
	// windows whose events have all been delivered. Waiters of
	// WaitDelivered sleep on gch.
	obs          GenerationObserver
	genOpened    atomic.Uint64
	genDelivered atomic.Uint64
	gmu          sync.Mutex
	gch          chan struct{}

	qmu   sync.Mutex
	queue []*batch
	qsig  chan struct{}
	done  chan struct{}
	dtid  atomic.Int32 // thread id of the dispatch goroutine

	delivered   atomic.Uint64
	dropped     atomic.Uint64 // duplicates suppressed
	unwatchErrs atomic.Uint64 // Stats.UnwatchErrors

	// ender tells when a madvise that userfaultfd reported as REMOVE has
	// returned (the tracepoint source, watching this process); nil without
	// it. holds are the REMOVEs delivered whose madvise has not returned:
	// their subscriptions stay "being invalidated" until then (see
	// removeHold). Under mu.
	ender                  removeEnder
	holds                  []*removeHold
	holdsMade, holdsPolled atomic.Uint64
}

// removeEnder is a source that sees a madvise end: its exit event ends
// holds (endHoldsLocked), and inFlight says whether a madvise containing
// [start, end) is still running (a call that failed reports no exit
// event).
type removeEnder interface {
	inFlight(start, end uintptr) (bool, error)
}

// removeHold is invalidate_range_end for userfaultfd's REMOVE. The kernel
// sends REMOVE (madvise DONTNEED, FREE, REMOVE) before it zaps the pages,
// and nothing after: a subscriber that re-validated the range as soon as
// its Invalidate returned could take the pages the kernel is about to
// drop. mmu_notifier keeps the interval's sequence odd from
// invalidate_range_start to invalidate_range_end, so read_begin waits and
// read_retry fails across the whole window; a hold does the same: every
// subscription the REMOVE reached keeps one more pending delivery (an odd
// sequence) until the madvise has returned, told by the tracepoint
// source's exit event for the call (normally tens of microseconds later),
// or, for a call that failed and so has no exit event, by the call being
// gone from the programs' table of calls in flight (polled every
// holdPoll), or after holdMax.
type removeHold struct {
	start, end uintptr
	subs       []*Subscription
	at         time.Time
	released   bool
}

const (
	holdPoll = time.Millisecond
	holdMax  = time.Second
)

type batch struct {
	events []Event
	subs   [][]*Subscription // per event
	marker chan struct{}     // closed when the dispatcher reaches it
	gen    uint64            // windows up to gen are delivered when the dispatcher reaches it
	stop   bool
}

// New starts a notifier with the chosen sources.
func New(ctx context.Context, opts Options) (*Notifier, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("userfault: %w", err)
	}
	self := os.Getpid()
	pid := opts.Pid
	if pid == 0 {
		pid = self
	}
	n := &Notifier{pid: pid, self: pid == self, qsig: make(chan struct{}, 1), done: make(chan struct{}), obs: opts.Observer}
	n.cond.L = &n.mu
	if n.self {
		m, err := openProcMaps()
		if err != nil {
			return nil, fmt.Errorf("userfault: %w", err)
		}
		n.maps = m
	}
	srcs := opts.Sources
	if srcs == nil {
		srcs = []Source{SourceTracepoint}
		if n.self {
			srcs = []Source{SourceUserfaultfd, SourceTracepoint}
		}
	}
	started := make(chan struct{})
	go n.dispatch(started)
	<-started

	var ebpfSources []Source
	for _, s := range srcs {
		switch s {
		case SourceUserfaultfd:
			st := SourceStatus{Source: s}
			if !n.self {
				st.Err = fmt.Errorf("userfaultfd watches only the calling process, not pid %d: %w", pid, unix.EINVAL)
			} else if u, err := newUffd(n); err != nil {
				st.Err = err
			} else {
				st.Started, st.Detail = true, u.detail()
				n.sources = append(n.sources, u)
			}
			n.status = append(n.status, st)
		case SourceTracepoint, SourceKVM, SourceFentry:
			ebpfSources = append(ebpfSources, s)
		default:
			n.status = append(n.status, SourceStatus{Source: s, Err: fmt.Errorf("unknown source: %w", unix.EINVAL)})
		}
	}
	if len(ebpfSources) > 0 {
		b, sts := newBPF(ctx, n, ebpfSources)
		if b != nil {
			n.sources = append(n.sources, b)
		}
		n.status = append(n.status, sts...)
	}
	// The tracepoint source sees a madvise return: with userfaultfd, whose
	// REMOVE comes before the pages go, it ends the REMOVE's invalidation.
	if n.self && n.status != nil {
		var uffd, tp bool
		var ender removeEnder
		for _, src := range n.sources {
			switch x := src.(type) {
			case *uffdSource:
				uffd = true
			case *bpfSource:
				if slices.Contains(x.kinds, SourceTracepoint) {
					tp, ender = true, x
				}
			}
		}
		if uffd && tp {
			n.mu.Lock()
			n.ender = ender
			n.mu.Unlock()
		}
	}
	var errs []error
	for _, st := range n.status {
		if !st.Started {
			errs = append(errs, fmt.Errorf("%s: %w", st.Source, st.Err))
		}
	}
	if len(n.sources) == 0 || (opts.Require && len(errs) > 0) {
		err := fmt.Errorf("userfault: sources failed: %w", errors.Join(errs...))
		return nil, errors.Join(err, n.Close())
	}
	return n, nil
}

// Sources reports which sources started and why the others did not.
func (n *Notifier) Sources() []SourceStatus {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]SourceStatus(nil), n.status...)
}

// markDead records that a started source stopped. Called with n.mu held.
func (n *Notifier) markDead(src Source, err error) {
	for i := range n.status {
		if n.status[i].Source == src {
			n.status[i].Started = false
			n.status[i].Err = err
		}
	}
}

// Pid is the watched process.
func (n *Notifier) Pid() int { return n.pid }

// Stats are counters for tests and diagnostics.
type Stats struct {
	Delivered  uint64 // Invalidate calls made
	Duplicates uint64 // events suppressed because another source saw them
	// RemoveHolds counts userfaultfd REMOVEs held until their madvise
	// returned; HoldsPolled those of them ended by the poll (the call
	// failed, or its exit event came late) rather than by the exit event.
	RemoveHolds, HoldsPolled uint64
	// UnwatchErrors counts failed narrowings of a source's watched ranges
	// after Remove (the eBPF ranges map): the source then watches more than
	// it must, which costs events but loses none.
	UnwatchErrors uint64
}

// Stats returns the counters.
func (n *Notifier) Stats() Stats {
	return Stats{Delivered: n.delivered.Load(), Duplicates: n.dropped.Load(),
		RemoveHolds: n.holdsMade.Load(), HoldsPolled: n.holdsPolled.Load(), UnwatchErrors: n.unwatchErrs.Load()}
}

// Subscription is one watched range, like struct mmu_interval_notifier.
type Subscription struct {
	n          *Notifier
	id         uint64
	start, end uintptr
	ops        IntervalOps

	seq atomic.Uint64 // even: stable; odd: an invalidation is being delivered
	// under n.mu:
	pending int  // undelivered (event, subscription) pairs
	hit     bool // an Invalidate in the pending window returned true
	removed atomic.Bool
	calling atomic.Int32 // see deliver
}

// Start and End give the subscribed range [Start, End).
func (s *Subscription) Start() uintptr { return s.start }

// End is the end of the subscribed range (exclusive).
func (s *Subscription) End() uintptr { return s.end }

func pageDown(a uintptr) uintptr { return a &^ uintptr(os.Getpagesize()-1) }
func pageUp(a uintptr) uintptr {
	ps := uintptr(os.Getpagesize())
	return (a + ps - 1) &^ (ps - 1)
}

// Subscribe watches [start, start+length). The pages holding the range are
// watched; events are delivered for overlaps with the exact range. Memory
// must be mapped and not belong to the Go heap (use package mem).
func (n *Notifier) Subscribe(start, length uintptr, ops IntervalOps) (*Subscription, error) {
	return n.subscribe(start, length, ops, true)
}

// Track is Subscribe without watching anything yet: events the sources
// report for [start, start+length) are delivered to ops (and move the
// subscription's sequence), but no memory is checked or registered now, so
// the range may hold holes, unmapped space and the Go heap. Pages become
// watched when a Subscribe covers them, and stay watched after that
// subscription's Remove while the tracked one covers them. For implicit
// ODP, whose range is the address space: each fault watches the pages it
// maps.
func (n *Notifier) Track(start, length uintptr, ops IntervalOps) (*Subscription, error) {
	return n.subscribe(start, length, ops, false)
}

func (n *Notifier) subscribe(start, length uintptr, ops IntervalOps, watch bool) (*Subscription, error) {
	what := "subscribe"
	if !watch {
		what = "track"
	}
	end := start + length
	if length == 0 || end < start || ops == nil {
		return nil, fmt.Errorf("userfault: %s [%#x, +%#x): %w", what, start, length, unix.EINVAL)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil, ErrClosed
	}
	var vmas pageRange
	if n.maps != nil && watch {
		var err error
		if vmas, err = n.maps.check(pageDown(start), pageUp(end)); err != nil {
			return nil, fmt.Errorf("userfault: subscribe [%#x, %#x): %w", start, end, err)
		}
	}
	if n.beforeWatch != nil && watch {
		n.beforeWatch()
	}
	n.nextID++
	s := &Subscription{n: n, id: n.nextID, start: start, end: end, ops: ops}
	n.tree.insert(s)
	if !watch {
		return s, nil
	}
	for i, src := range n.sources {
		if err := src.watch(pageDown(start), pageUp(end), vmas); err != nil {
			n.tree.remove(s)
			pieces := n.uncovered(pageDown(start), pageUp(end))
			for _, prev := range n.sources[:i] {
				prev.unwatch(pieces)
			}
			return nil, fmt.Errorf("userfault: subscribe [%#x, %#x): %s: %w", start, end, src.kind(), err)
		}
	}
	return s, nil
}

// uncovered returns the page-aligned parts of [start, end) that the pages of
// no subscription cover. Called with n.mu held.
func (n *Notifier) uncovered(start, end uintptr) []pageRange {
	ps := uintptr(os.Getpagesize())
	var out []pageRange
	cur := start
	hi := end + ps
	if hi < end {
		hi = ^uintptr(0)
	}
	// Widen the query by a page: a subscription ending or starting mid-page
	// next to the range still covers that page.
	n.tree.overlap(start-min(start, ps), hi, func(o *Subscription) {
		ostart, oend := pageDown(o.start), pageUp(o.end)
		if oend <= cur || ostart >= end {
			return
		}
		if ostart > cur {
			out = append(out, pageRange{cur, ostart})
		}
		cur = oend
	})
	if cur < end {
		out = append(out, pageRange{cur, end})
	}
	return out
}

// Remove ends the subscription, like mmu_interval_notifier_remove except
// that it does not wait for an Invalidate already running on the dispatch
// goroutine (that call may be blocked on a lock the caller holds). No
// Invalidate starts after Remove returns. Remove is idempotent and may be
// called from Invalidate.
func (s *Subscription) Remove() {
	n := s.n
	n.mu.Lock()
	if s.removed.Swap(true) {
		n.mu.Unlock()
		return
	}
	n.tree.remove(s)
	if !n.closed {
		pieces := n.uncovered(pageDown(s.start), pageUp(s.end))
		if len(pieces) > 0 {
			for _, src := range n.sources {
				src.unwatch(pieces)
			}
		}
	}
	n.mu.Unlock()
	for s.calling.Load() == 1 {
		runtime.Gosched()
	}
}

// ReadBegin returns the subscription's sequence number once no invalidation
// of it is being delivered, like mmu_interval_read_begin: read it, pin and
// program, then check ReadRetry under your own lock before committing.
func (s *Subscription) ReadBegin() uint64 {
	n := s.n
	if n.inflight.Load() == 0 {
		if v := s.seq.Load(); v&1 == 0 && n.inflight.Load() == 0 {
			return v
		}
	}
	// From inside Invalidate (a misuse) the subscription's own delivery
	// cannot finish while we wait: wait for the read window only.
	own := n.onDispatcher()
	n.mu.Lock()
	defer n.mu.Unlock()
	for (!own && s.seq.Load()&1 != 0 || n.inflight.Load() != 0) && !n.closed {
		n.cond.Wait()
	}
	return s.seq.Load() &^ 1
}

// ReadRetry reports whether an invalidation touched the subscription since
// ReadBegin returned seq (or is being delivered now), like
// mmu_interval_read_retry. Usually it is two atomic loads. While a
// userfaultfd read window is open, the events just read are not yet
// matched to subscriptions: it waits for that window to close (it takes
// no lock a caller may hold, only the notifier's), so that an unmap of
// some other range is not reported as a race (the spurious EBUSY of a
// registration of fresh memory).
func (s *Subscription) ReadRetry(seq uint64) bool {
	n := s.n
	if n.inflight.Load() != 0 && !n.onDispatcher() {
		n.mu.Lock()
		for w := n.windows; n.inflight.Load() != 0 && n.windows == w && !n.closed; {
			n.cond.Wait()
		}
		n.mu.Unlock()
	}
	return s.seq.Load() != seq
}

// Seq is the current sequence number, without waiting.
func (s *Subscription) Seq() uint64 { return s.seq.Load() }

func (n *Notifier) onDispatcher() bool {
	t := n.dtid.Load()
	return t != 0 && int32(unix.Gettid()) == t
}

// openWindow and closeWindow bracket a userfaultfd read (see inflight and
// the generations).
func (n *Notifier) openWindow() uint64 {
	n.inflight.Add(1)
	gen := n.genOpened.Add(1)
	if n.obs != nil {
		n.obs.WindowOpened(gen)
	}
	return gen
}

func (n *Notifier) closeWindow(gen uint64, evs []Event) {
	n.mu.Lock()
	n.postLocked(evs)
	// After the window's events, in queue order: the dispatcher reaching
	// it means every event of this and earlier windows was delivered.
	n.enqueue(&batch{gen: gen})
	n.inflight.Add(-1)
	n.windows++
	n.cond.Broadcast()
	n.mu.Unlock()
}

// post hands events from an asynchronous source to the dispatcher. If a
// userfaultfd read window is open, it waits for it to close: the window may
// hold the userfaultfd copy of these events, which must be counted first
// (see dedup).
func (n *Notifier) post(evs []Event) {
	n.mu.Lock()
	if n.inflight.Load() != 0 {
		for w := n.windows; n.windows == w && n.inflight.Load() != 0 && !n.closed; {
			n.cond.Wait()
		}
	}
	n.postLocked(evs)
	n.mu.Unlock()
}

func (n *Notifier) postLocked(evs []Event) {
	if n.closed || len(evs) == 0 {
		return
	}
	// A madvise's exit (or lost events) ends the REMOVE holds it covers,
	// whether or not the event is then dropped as a copy.
	for _, ev := range evs {
		if ev.Source == SourceTracepoint && (ev.Kind == EventRemove || ev.Kind == EventOverflow) {
			n.endHoldsLocked(ev.Start, ev.End)
		}
	}
	// Drop copies first, on the events as the sources saw them (one per
	// syscall), then merge what is left of one read.
	now := time.Now()
	kept := evs[:0]
	var prev Event
	for _, ev := range evs {
		// userfaultfd reports an mremap as UNMAP and REMAP of one range:
		// one operation, counted once.
		pair := ev.Source == SourceUserfaultfd && prev.Source == ev.Source && prev.Start == ev.Start &&
			prev.End == ev.End && dedupClass(prev.Kind) == dedupClass(ev.Kind)
		prev = ev
		if !pair && n.dedup.duplicate(ev, now) {
			n.dropped.Add(1)
			continue
		}
		kept = append(kept, ev)
	}
	if len(kept) == 0 {
		return
	}
	b := &batch{}
	for _, ev := range coalesce(kept) {
		var subs []*Subscription
		n.tree.overlap(ev.Start, ev.End, func(s *Subscription) {
			if s.pending == 0 {
				s.seq.Add(1) // odd: being invalidated
			}
			s.pending++
			subs = append(subs, s)
		})
		if len(subs) == 0 {
			continue
		}
		if ev.Source == SourceUserfaultfd && ev.Kind == EventRemove && n.ender != nil {
			n.holdLocked(ev, subs)
		}
		b.events = append(b.events, ev)
		b.subs = append(b.subs, subs)
	}
	if len(b.events) > 0 {
		n.enqueue(b)
	}
}

// coalesce merges adjacent events of one kind and source from one read.
func coalesce(evs []Event) []Event {
	out := evs[:1]
	for _, ev := range evs[1:] {
		last := &out[len(out)-1]
		if ev.Source == last.Source && ev.Start == last.Start && ev.End == last.End &&
			dedupClass(ev.Kind) == dedupClass(last.Kind) {
			if ev.Kind == EventRemap { // userfaultfd's mremap: UNMAP and REMAP
				*last = ev
			}
			continue
		}
		if ev.Kind == last.Kind && ev.Source == last.Source && ev.Kind != EventRemap &&
			ev.Start <= last.End && ev.End >= last.Start {
			last.Start, last.End = min(last.Start, ev.Start), max(last.End, ev.End)
			continue
		}
		out = append(out, ev)
	}
	return out
}

func (n *Notifier) enqueue(b *batch) {
	n.qmu.Lock()
	n.queue = append(n.queue, b)
	n.qmu.Unlock()
	select {
	case n.qsig <- struct{}{}:
	default:
	}
}

// dispatch delivers batches in order on one locked OS thread, so that a
// callback can be recognised (Remove, ReadBegin) by its thread id.
func (n *Notifier) dispatch(started chan<- struct{}) {
	defer close(n.done)
	runtime.LockOSThread()
	n.dtid.Store(int32(unix.Gettid()))
	close(started)
	for {
		<-n.qsig
		for {
			n.qmu.Lock()
			if len(n.queue) == 0 {
				n.qmu.Unlock()
				break
			}
			b := n.queue[0]
			n.queue[0] = nil
			n.queue = n.queue[1:]
			n.qmu.Unlock()
			if b.stop {
				return
			}
			if b.marker != nil {
				close(b.marker)
				continue
			}
			if b.gen != 0 {
				n.windowsDelivered(b.gen)
				continue
			}
			n.deliver(b)
		}
	}
}

func (n *Notifier) deliver(b *batch) {
	for i, ev := range b.events {
		for _, s := range b.subs[i] {
			// calling: 1 while deciding, 2 once the call has started. Remove
			// waits out state 1 only, so no call starts after it returns and
			// it never waits for a running one.
			hit := false
			s.calling.Store(1)
			if !s.removed.Load() {
				s.calling.Store(2)
				n.delivered.Add(1)
				hit = s.ops.Invalidate(s, ev)
			}
			s.calling.Store(0)
			n.mu.Lock()
			s.hit = s.hit || hit
			n.settleLocked(s)
			n.mu.Unlock()
		}
	}
}

// settleLocked ends one pending delivery (or hold) of s; the last one
// makes the sequence even: a new value if an Invalidate concerned the
// subscriber, else the value before.
func (n *Notifier) settleLocked(s *Subscription) {
	s.pending--
	if s.pending != 0 {
		return
	}
	if s.hit {
		s.seq.Add(1) // even, new value
	} else {
		s.seq.Add(^uint64(0)) // back to the value before
	}
	s.hit = false
	n.cond.Broadcast()
}

// holdLocked keeps the subscriptions of a userfaultfd REMOVE being
// invalidated until its madvise has returned (see removeHold).
func (n *Notifier) holdLocked(ev Event, subs []*Subscription) {
	h := &removeHold{start: ev.Start, end: ev.End, subs: append([]*Subscription(nil), subs...), at: time.Now()}
	for _, s := range h.subs {
		s.pending++ // already odd: the delivery is pending too
	}
	n.holds = append(n.holds, h)
	n.holdsMade.Add(1)
	time.AfterFunc(holdPoll, func() { n.pollHold(h) })
}

// releaseLocked ends a hold.
func (n *Notifier) releaseLocked(h *removeHold) {
	if h.released {
		return
	}
	h.released = true
	for _, s := range h.subs {
		n.settleLocked(s)
	}
	n.holds = slices.DeleteFunc(n.holds, func(x *removeHold) bool { return x == h })
}

// endHoldsLocked ends the holds of the REMOVEs a madvise of [start, end)
// reported (userfaultfd sends one per VMA, each inside the call's range),
// oldest first, at most one for any page: a REMOVE of the same pages by
// another call still running keeps its hold until that call's own exit.
func (n *Notifier) endHoldsLocked(start, end uintptr) {
	var done []*removeHold
	for _, h := range n.holds {
		if h.start < start || h.end > end {
			continue
		}
		if slices.ContainsFunc(done, func(d *removeHold) bool { return d.start < h.end && h.start < d.end }) {
			continue
		}
		done = append(done, h)
	}
	for _, h := range done {
		n.releaseLocked(h)
	}
}

// pollHold ends a hold whose madvise is no longer running without an exit
// event having done it (the call failed), or that is older than holdMax.
func (n *Notifier) pollHold(h *removeHold) {
	n.mu.Lock()
	if h.released || n.closed || n.ender == nil {
		n.mu.Unlock()
		return
	}
	e := n.ender
	n.mu.Unlock()
	running, err := e.inFlight(h.start, h.end)
	n.mu.Lock()
	defer n.mu.Unlock()
	if h.released {
		return
	}
	if err != nil || !running || time.Since(h.at) >= holdMax {
		n.holdsPolled.Add(1)
		n.releaseLocked(h)
		return
	}
	time.AfterFunc(holdPoll, func() { n.pollHold(h) })
}

// Sync returns once every event that happened before the call has been
// delivered: userfaultfd read windows closed, a marker sent through each
// eBPF ring and read back, and the dispatcher drained.
func (n *Notifier) Sync(ctx context.Context) error {
	if n.onDispatcher() {
		return fmt.Errorf("userfault: Sync called from Invalidate: %w", unix.EDEADLK)
	}
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return ErrClosed
	}
	srcs := append([]source(nil), n.sources...)
	n.mu.Unlock()
	for _, s := range srcs {
		if err := s.sync(ctx); err != nil {
			return fmt.Errorf("userfault: sync %s: %w", s.kind(), err)
		}
	}
	m := &batch{marker: make(chan struct{})}
	n.enqueue(m)
	select {
	case <-m.marker:
		return nil
	case <-n.done:
		return ErrClosed
	case <-ctx.Done():
		return fmt.Errorf("userfault: sync: %w", ctx.Err())
	}
}

// Generation returns how many userfaultfd read windows were opened and how
// many of them had all their events delivered. The two are equal when no
// synchronous invalidation is pending.
func (n *Notifier) Generation() (opened, delivered uint64) {
	return n.genOpened.Load(), n.genDelivered.Load()
}

// WaitDelivered returns once every event read in windows up to gen has been
// delivered (also when the notifier closes). It must not be called from
// Invalidate, whose return it may be waiting for.
func (n *Notifier) WaitDelivered(ctx context.Context, gen uint64) error {
	for {
		n.gmu.Lock()
		if n.genDelivered.Load() >= gen {
			n.gmu.Unlock()
			return nil
		}
		if n.onDispatcher() {
			n.gmu.Unlock()
			return fmt.Errorf("userfault: WaitDelivered called from Invalidate: %w", unix.EDEADLK)
		}
		if n.gch == nil {
			n.gch = make(chan struct{})
		}
		ch := n.gch
		n.gmu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("userfault: wait for generation %d: %w", gen, ctx.Err())
		}
	}
}

func (n *Notifier) windowsDelivered(gen uint64) {
	n.gmu.Lock()
	if gen > n.genDelivered.Load() {
		n.genDelivered.Store(gen)
	}
	if n.gch != nil {
		close(n.gch)
		n.gch = nil
	}
	n.gmu.Unlock()
	if n.obs != nil {
		n.obs.WindowsDelivered(gen)
	}
}

// waitWindows waits until no userfaultfd read window is open.
func (n *Notifier) waitWindows(ctx context.Context) error {
	for i := 0; n.inflight.Load() != 0; i++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		if i < 100 {
			runtime.Gosched()
		} else {
			time.Sleep(10 * time.Microsecond)
		}
	}
	return nil
}

// Close stops every source (userfaultfd first: closing it releases any thread
// waiting in munmap), delivers what was already read, and stops the
// dispatcher. Subscriptions stay readable; no Invalidate runs after Close.
func (n *Notifier) Close() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	// Closed first: no Subscribe or Remove touches a source being closed.
	n.closed = true
	srcs := n.sources
	n.cond.Broadcast()
	n.mu.Unlock()
	var errs []error
	for _, s := range srcs {
		if err := s.close(); err != nil {
			errs = append(errs, fmt.Errorf("userfault: close %s: %w", s.kind(), err))
		}
	}
	n.mu.Lock()
	if n.maps != nil {
		_ = n.maps.close() // read-only /proc/self/maps: nothing a close could lose
	}
	n.cond.Broadcast()
	n.mu.Unlock()
	n.enqueue(&batch{stop: true})
	<-n.done
	// Settle what the dispatcher did not reach.
	n.qmu.Lock()
	rest := n.queue
	n.queue = nil
	n.qmu.Unlock()
	n.mu.Lock()
	for _, b := range rest {
		for _, subs := range b.subs {
			for _, s := range subs {
				s.hit = true
				n.settleLocked(s)
			}
		}
		if b.marker != nil {
			close(b.marker)
		}
	}
	for len(n.holds) > 0 {
		n.releaseLocked(n.holds[0])
	}
	n.cond.Broadcast()
	n.mu.Unlock()
	// Nothing more will be delivered: release generation waiters.
	n.windowsDelivered(n.genOpened.Load())
	return errors.Join(errs...)
}

// dedup makes the same invalidation seen by two sources delivered once.
//
// userfaultfd is synchronous: its event is read before the syscall returns,
// so it comes first, and it is always delivered. The tracepoints report at
// syscall exit, after that read: a tracepoint event is the copy of a pending
// userfaultfd event with the same class and range, and is dropped with it.
// A tracepoint event without such a partner (an operation userfaultfd did
// not see) is delivered. The kernel-side sources (KVM, fentry) fire inside
// the kernel in any order; their event is dropped if an event of the same
// range was delivered very recently, and it never suppresses another.
// Dropping only copies from the asynchronous sources means a duplicate can
// at worst be delivered twice, never swallowed.
type dedup struct {
	pending map[dedupKey]dedupCount
	recent  [64]dedupRecent
	next    int
}

type dedupKey struct {
	class      EventKind
	start, end uintptr
}

type dedupCount struct {
	n  int
	at time.Time
}

type dedupRecent struct {
	start, end uintptr
	at         time.Time
}

const (
	dedupWindow       = time.Second           // a copy comes later than this: deliver it
	dedupKernelWindow = 50 * time.Millisecond // kernel-side copies
	dedupMaxPending   = 4096
)

// dedupClass groups kinds that name the same invalidation: an mremap is an
// UNMAP and a REMAP to userfaultfd and a REMAP to the tracepoints.
func dedupClass(k EventKind) EventKind {
	if k == EventRemap {
		return EventUnmap
	}
	return k
}

func (d *dedup) duplicate(ev Event, now time.Time) bool {
	switch ev.Source {
	case SourceUserfaultfd:
		if d.pending == nil {
			d.pending = map[dedupKey]dedupCount{}
		}
		if len(d.pending) >= dedupMaxPending {
			for k, c := range d.pending {
				if now.Sub(c.at) > dedupWindow {
					delete(d.pending, k)
				}
			}
			if len(d.pending) >= dedupMaxPending {
				clear(d.pending)
			}
		}
		k := dedupKey{dedupClass(ev.Kind), ev.Start, ev.End}
		c := d.pending[k]
		if now.Sub(c.at) > dedupWindow {
			c.n = 0
		}
		d.pending[k] = dedupCount{n: c.n + 1, at: now}
		d.remember(ev, now)
		return false
	case SourceTracepoint:
		k := dedupKey{dedupClass(ev.Kind), ev.Start, ev.End}
		if c, ok := d.pending[k]; ok && c.n > 0 && now.Sub(c.at) <= dedupWindow {
			if c.n == 1 {
				delete(d.pending, k)
			} else {
				d.pending[k] = dedupCount{n: c.n - 1, at: c.at}
			}
			return true
		}
		d.remember(ev, now)
		return false
	case SourceKVM, SourceFentry:
		if ev.Kind == EventOverflow {
			return false
		}
		for _, r := range d.recent {
			if r.start == ev.Start && r.end == ev.End && now.Sub(r.at) <= dedupKernelWindow {
				return true
			}
		}
	}
	return false
}

func (d *dedup) remember(ev Event, now time.Time) {
	d.recent[d.next] = dedupRecent{start: ev.Start, end: ev.End, at: now}
	d.next = (d.next + 1) % len(d.recent)
}
