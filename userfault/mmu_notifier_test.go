package userfault

import (
	"context"
	"errors"
	"github.com/gohfi/gohfi/internal/testenv"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/gohfi/gohfi/mem"
	"golang.org/x/sys/unix"
)

func TestIntervalTree(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	var tree intervalTree
	live := map[*Subscription]bool{}
	for i := 0; i < 3000; i++ {
		if len(live) > 0 && rng.IntN(3) == 0 {
			for s := range live {
				if !tree.remove(s) {
					t.Fatalf("remove %d failed", s.id)
				}
				delete(live, s)
				break
			}
		} else {
			st := uintptr(rng.IntN(1 << 16))
			s := &Subscription{id: uint64(i + 1), start: st, end: st + 1 + uintptr(rng.IntN(1<<10))}
			tree.insert(s)
			live[s] = true
		}
		if tree.n != len(live) {
			t.Fatalf("size %d, want %d", tree.n, len(live))
		}
		qs := uintptr(rng.IntN(1 << 16))
		qe := qs + 1 + uintptr(rng.IntN(1<<11))
		var got, want []uint64
		var prev uintptr
		tree.overlap(qs, qe, func(s *Subscription) {
			if s.start < prev {
				t.Fatalf("not in address order")
			}
			prev = s.start
			got = append(got, s.id)
		})
		for s := range live {
			if s.start < qe && s.end > qs {
				want = append(want, s.id)
			}
		}
		slices.Sort(got)
		slices.Sort(want)
		if !slices.Equal(got, want) {
			t.Fatalf("query [%d,%d): got %v want %v", qs, qe, got, want)
		}
	}
}

func TestRefusesGoHeap(t *testing.T) {
	n := newNotifier(t, SourceUserfaultfd)
	buf := make([]byte, 1<<20)
	_, err := n.Subscribe(sliceAddr(buf), uintptr(len(buf)), newRecorder())
	if !errors.Is(err, ErrGoHeap) {
		t.Fatalf("Subscribe of Go heap memory: %v, want ErrGoHeap", err)
	}
	small := new([64]byte)
	_, err = n.Subscribe(sliceAddr(small[:]), 64, newRecorder())
	if !errors.Is(err, ErrGoHeap) {
		t.Fatalf("Subscribe of a small Go object: %v, want ErrGoHeap", err)
	}
	runtime.KeepAlive(buf)
	runtime.KeepAlive(small)
	// Unmapped memory is refused too.
	addr := mmapAnon(t, 2)
	munmap(t, addr, 2)
	if _, err := n.Subscribe(addr, 2*pageSize, newRecorder()); !errors.Is(err, unix.EFAULT) {
		t.Fatalf("Subscribe of unmapped memory: %v, want EFAULT", err)
	}
	// mem buffers are fine.
	b, err := mem.Alloc(8192)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	subscribe(t, n, b.Addr(), uintptr(b.Len()), newRecorder())
}

// An unmap through userfaultfd is visible to ReadRetry as soon as munmap
// returns, without Sync: the read window covers the gap between the kernel
// releasing the unmapping thread and the subscription being marked.
func TestReadRetryAfterUnmapNoSync(t *testing.T) {
	n := newNotifier(t, SourceUserfaultfd)
	for i := 0; i < 200; i++ {
		addr := mmapAnon(t, 4)
		rec := newRecorder()
		s := subscribe(t, n, addr+pageSize, 2*pageSize, rec)
		seq := s.ReadBegin()
		if s.ReadRetry(seq) {
			t.Fatal("ReadRetry before any event")
		}
		munmap(t, addr+2*pageSize, 2) // overlaps the subscription's tail
		if !s.ReadRetry(seq) {
			t.Fatalf("iteration %d: ReadRetry false right after munmap returned", i)
		}
		munmap(t, addr, 2)
		s.Remove()
	}
}

func TestSeqIgnoredEvent(t *testing.T) {
	n := newNotifier(t, SourceUserfaultfd)
	addr := mmapAnon(t, 4)
	defer munmap(t, addr, 4)
	rec := newRecorder()
	rec.ret.Store(false) // not concerned: the sequence must not move
	s := subscribe(t, n, addr, 4*pageSize, rec)
	seq := s.ReadBegin()
	madvise(t, addr, 1, unix.MADV_DONTNEED)
	syncNotifier(t, n)
	if evs := rec.take(); len(evs) != 1 || evs[0].Kind != EventRemove {
		t.Fatalf("events %v, want one remove", evs)
	}
	if s.ReadRetry(seq) || s.ReadBegin() != seq {
		t.Fatalf("sequence moved for an ignored event: %d -> %d", seq, s.Seq())
	}
	rec.ret.Store(true)
	madvise(t, addr, 1, unix.MADV_DONTNEED)
	syncNotifier(t, n)
	if !s.ReadRetry(seq) || s.ReadBegin() == seq || s.ReadBegin()&1 != 0 {
		t.Fatalf("sequence did not move: %d -> %d", seq, s.Seq())
	}
}

// Overlapping subscriptions share one userfaultfd registration, made for
// whole VMAs (registering part of one would split it); the VMA stays
// registered while any subscription touches it. Whether a page is
// registered is seen by registering it with a second userfaultfd: EBUSY
// while ours holds it.
func TestOverlappingRegistration(t *testing.T) {
	n := newNotifier(t, SourceUserfaultfd)
	addr := mmapAnon(t, 8)
	defer munmap(t, addr, 8)
	other, _, err := openUffd(0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(other)
	registered := func(page int) bool {
		err := uffdioRangeCall(other, uffdioRegister, addr+uintptr(page)*pageSize, addr+uintptr(page+1)*pageSize, uffdRegisterModeWP)
		if err == nil {
			uffdioRangeCall(other, uffdioUnregister, addr+uintptr(page)*pageSize, addr+uintptr(page+1)*pageSize, 0)
			return false
		}
		if !errors.Is(err, unix.EBUSY) {
			t.Fatalf("probe register page %d: %v", page, err)
		}
		return true
	}
	ra, rb := newRecorder(), newRecorder()
	a, err := n.Subscribe(addr, 4*pageSize+10, ra) // pages 0-4 (ends mid-page 4)
	if err != nil {
		t.Fatal(err)
	}
	b, err := n.Subscribe(addr+4*pageSize+100, 2*pageSize, rb) // pages 4-6
	if err != nil {
		t.Fatal(err)
	}
	for p := 0; p < 8; p++ {
		if !registered(p) {
			t.Fatalf("page %d not registered", p)
		}
	}
	// The mapping stayed one VMA: mremap of all of it works.
	if _, _, e := unix.Syscall6(unix.SYS_MREMAP, addr, 8*pageSize, 8*pageSize, 0, 0, 0); e != 0 {
		t.Fatalf("mremap of a partly watched mapping: %v", e)
	}
	a.Remove()
	for p := 0; p < 8; p++ {
		if !registered(p) {
			t.Fatalf("after removing a: page %d not registered", p)
		}
	}
	// The shared page 4 now reports events to b only.
	madvise(t, addr+4*pageSize, 1, unix.MADV_DONTNEED)
	madvise(t, addr+7*pageSize, 1, unix.MADV_DONTNEED) // registered, nobody subscribed
	syncNotifier(t, n)
	if len(ra.take()) != 0 || len(rb.take()) != 1 {
		t.Fatal("event on the shared page not delivered to b alone")
	}
	b.Remove()
	for p := 0; p < 8; p++ {
		if registered(p) {
			t.Fatalf("after removing both: page %d still registered", p)
		}
	}
}

// A partial unmap invalidates the subscription; the rest stays watched.
func TestPartialOverlap(t *testing.T) {
	n := newNotifier(t, SourceUserfaultfd, SourceTracepoint)
	addr := mmapAnon(t, 6)
	defer munmap(t, addr, 6)
	rec := newRecorder()
	subscribe(t, n, addr+pageSize, 4*pageSize, rec)
	other := newRecorder()
	subscribe(t, n, addr+5*pageSize, pageSize, other)
	munmap(t, addr+2*pageSize, 1) // middle
	syncNotifier(t, n)
	evs := rec.take()
	if len(evs) != 1 || evs[0].Kind != EventUnmap || evs[0].Start != addr+2*pageSize || evs[0].End != addr+3*pageSize {
		t.Fatalf("middle unmap: %v", evs)
	}
	if len(other.take()) != 0 {
		t.Fatal("event delivered to a subscription it does not overlap")
	}
	madvise(t, addr+4*pageSize, 1, unix.MADV_DONTNEED) // still watched after the partial unmap
	syncNotifier(t, n)
	if evs := rec.take(); len(evs) != 1 || evs[0].Kind != EventRemove {
		t.Fatalf("after partial unmap: %v", evs)
	}
	if st := n.Stats(); st.Duplicates == 0 {
		t.Fatalf("two sources, no duplicate suppressed: %+v", st)
	}
}

// Remove from inside Invalidate works, and nothing is delivered after Remove.
func TestRemoveInCallback(t *testing.T) {
	n := newNotifier(t, SourceUserfaultfd)
	addr := mmapAnon(t, 2)
	defer munmap(t, addr, 2)
	calls := 0
	var s *Subscription
	s, err := n.Subscribe(addr, 2*pageSize, InvalidateFunc(func(sub *Subscription, ev Event) bool {
		calls++
		sub.Remove()
		return true
	}))
	if err != nil {
		t.Fatal(err)
	}
	madvise(t, addr, 1, unix.MADV_DONTNEED)
	syncNotifier(t, n)
	madvise(t, addr, 1, unix.MADV_DONTNEED)
	syncNotifier(t, n)
	if calls != 1 {
		t.Fatalf("%d calls, want 1", calls)
	}
	_ = s
}

// Close must never leave a thread hanging in munmap, and must leak nothing.
func TestCloseReleasesAndLeaksNothing(t *testing.T) {
	fds := openFds(t)
	gs := runtime.NumGoroutine()
	for i := 0; i < 3; i++ {
		n, err := New(context.Background(), Options{Sources: []Source{SourceUserfaultfd, SourceTracepoint}, Require: true})
		testenv.Require(t, err, "start notifier")
		addr := mmapAnon(t, 4)
		blocked := make(chan struct{})
		s, err := n.Subscribe(addr, 4*pageSize, InvalidateFunc(func(*Subscription, Event) bool {
			<-blocked // a slow consumer must not hold up munmap
			return true
		}))
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() {
			munmap(t, addr, 2)
			munmap(t, addr+2*pageSize, 2)
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("munmap blocked by a slow Invalidate")
		}
		close(blocked)
		s.Remove()
		if err := n.Close(); err != nil {
			t.Fatal(err)
		}
		if err := n.Sync(context.Background()); !errors.Is(err, ErrClosed) {
			t.Fatalf("Sync after Close: %v", err)
		}
		if _, err := n.Subscribe(addr, pageSize, newRecorder()); !errors.Is(err, ErrClosed) && err != nil && !errors.Is(err, unix.EFAULT) {
			t.Fatalf("Subscribe after Close: %v", err)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > gs && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if g := runtime.NumGoroutine(); g > gs {
		t.Errorf("goroutines: %d before, %d after", gs, g)
	}
	if f := openFds(t); f != fds {
		t.Errorf("fds: %d before, %d after", fds, f)
	}
}

// A source that cannot start is reported with its reason; the other works.
func TestSourceFailureReported(t *testing.T) {
	n, err := New(context.Background(), Options{Pid: 1, Sources: []Source{SourceUserfaultfd, SourceTracepoint}})
	testenv.Require(t, err, "start notifier")
	defer n.Close()
	var sawUffd, sawTP bool
	for _, st := range n.Sources() {
		switch st.Source {
		case SourceUserfaultfd:
			sawUffd = true
			if st.Started || !errors.Is(st.Err, unix.EINVAL) {
				t.Errorf("userfaultfd for another process: %v", st)
			}
		case SourceTracepoint:
			sawTP = st.Started
		}
	}
	if !sawUffd || !sawTP {
		t.Fatalf("sources: %v", n.Sources())
	}
	if _, err := New(context.Background(), Options{Pid: 1, Sources: []Source{SourceUserfaultfd, SourceTracepoint}, Require: true}); err == nil {
		t.Fatal("Require: New succeeded with a failed source")
	}
	if err := n.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestProcmapQuery(t *testing.T) {
	addr := mmapAnon(t, 3)
	defer munmap(t, addr, 3)
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	v, err := vmaAt(f, addr+pageSize)
	if errors.Is(err, unix.ENOTTY) {
		testenv.Missing(t, "kernel without PROCMAP_QUERY (the /proc/self/maps fallback is used)")
	}
	if err != nil {
		t.Fatal(err)
	}
	if v.start > addr || v.end < addr+3*pageSize || v.file {
		t.Fatalf("vma %+v for [%#x, %#x)", v, addr, addr+3*pageSize)
	}
	all, err := vmasFromMaps()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(all, func(w vma) bool { return w == v }) {
		t.Fatalf("PROCMAP_QUERY %+v not in /proc/self/maps", v)
	}
}

// Remove does not wait for an Invalidate running on the dispatcher (which
// may wait for a lock the remover holds), and nothing starts after it.
func TestRemoveDoesNotWaitForRunningCallback(t *testing.T) {
	n := newNotifier(t, SourceUserfaultfd)
	addr := mmapAnon(t, 2)
	defer munmap(t, addr, 2)
	var lock sync.Mutex
	entered := make(chan struct{}, 4)
	calls := 0
	s, err := n.Subscribe(addr, 2*pageSize, InvalidateFunc(func(*Subscription, Event) bool {
		calls++
		entered <- struct{}{}
		lock.Lock() // the consumer's lock, held by the remover below
		lock.Unlock()
		return true
	}))
	if err != nil {
		t.Fatal(err)
	}
	lock.Lock()
	madvise(t, addr, 1, unix.MADV_DONTNEED)
	<-entered
	removed := make(chan struct{})
	go func() { s.Remove(); close(removed) }()
	select {
	case <-removed:
	case <-time.After(5 * time.Second):
		t.Fatal("Remove waited for the running Invalidate: deadlock")
	}
	lock.Unlock()
	madvise(t, addr, 1, unix.MADV_DONTNEED)
	syncNotifier(t, n)
	if calls != 1 {
		t.Fatalf("%d calls, want 1", calls)
	}
}

// Invalidate may unmap watched memory and subscribe: the monitor reads the
// event it causes without waiting for the dispatcher.
func TestCallbackUnmapsWatchedMemory(t *testing.T) {
	n := newNotifier(t, SourceUserfaultfd, SourceTracepoint)
	a := mmapAnon(t, 1)
	b := mmapAnon(t, 1)
	c := mmapAnon(t, 1)
	defer munmap(t, c, 1)
	rb := newRecorder()
	subscribe(t, n, b, pageSize, rb)
	var subC *Subscription
	done := make(chan struct{})
	subscribe(t, n, a, pageSize, InvalidateFunc(func(*Subscription, Event) bool {
		if subC == nil {
			munmap(t, b, 1) // blocks until the monitor reads its UNMAP
			var err error
			if subC, err = n.Subscribe(c, pageSize, newRecorder()); err != nil {
				t.Error(err)
			}
			close(done)
		}
		return true
	}))
	munmap(t, a, 1)
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("callback unmapping watched memory deadlocked")
	}
	syncNotifier(t, n)
	if evs := rb.take(); len(evs) != 1 || evs[0].Kind != EventUnmap {
		t.Fatalf("b: %v", evs)
	}
	subC.Remove()
}

// TestRemoveHold: with userfaultfd and the tracepoints, a REMOVE keeps its
// subscriptions being invalidated (odd sequence, ReadBegin waits) until the
// madvise returned: ended by the call's exit event after a madvise that
// succeeded, by the poll of the calls in flight after one that failed
// (ENOMEM: part of the range unmapped; the mapped part is still dropped
// and reported, but no exit event comes). Nothing stays held.
func TestRemoveHold(t *testing.T) {
	n := newNotifier(t, SourceUserfaultfd, SourceTracepoint)
	addr := mmapAnon(t, 8)
	defer munmap(t, addr, 6)
	s := subscribe(t, n, addr, 4*pageSize, newRecorder())
	seq := s.ReadBegin()
	madvise(t, addr, 4, unix.MADV_DONTNEED)
	if got := s.ReadBegin(); got == seq || got&1 != 0 {
		t.Fatalf("ReadBegin after DONTNEED: %d (before %d)", got, seq)
	}
	syncNotifier(t, n)
	// Ended by the exit event, or by the poll (holdPoll, 1 ms) when the
	// monitor reads that event later than the poll finds the call over: on
	// a loaded machine either comes first, and both are right.
	st := n.Stats()
	if st.RemoveHolds != 1 {
		t.Fatalf("after a DONTNEED: %+v, want one hold", st)
	}
	polled := st.HoldsPolled
	// A madvise that fails with ENOMEM: pages 6 and 7 unmapped.
	munmap(t, addr+6*pageSize, 2)
	seq = s.ReadBegin()
	if _, _, errno := unix.Syscall(unix.SYS_MADVISE, addr, 8*pageSize, unix.MADV_DONTNEED); errno != unix.ENOMEM {
		t.Fatalf("madvise over a hole: %v, want ENOMEM", errno)
	}
	start := time.Now()
	if got := s.ReadBegin(); got == seq || got&1 != 0 {
		t.Fatalf("ReadBegin after the failed DONTNEED: %d (before %d)", got, seq)
	}
	if d := time.Since(start); d > holdMax/2 {
		t.Fatalf("ReadBegin waited %v for a failed madvise's hold", d)
	}
	if st := n.Stats(); st.RemoveHolds != 2 || st.HoldsPolled != polled+1 {
		t.Fatalf("after a failed DONTNEED: %+v, want a second hold ended by the poll", st)
	}
	n.mu.Lock()
	held := len(n.holds)
	n.mu.Unlock()
	if held != 0 {
		t.Fatalf("%d holds left", held)
	}
}

// A Subscribe whose VMA had merged with a neighbour's registers the merged
// extent; when the neighbour is unmapped and its addresses mapped with what
// userfaultfd cannot watch (a file) between reading the VMAs and
// UFFDIO_REGISTER, the register fails with EINVAL. Subscribe reads the VMAs
// again and watches what is the range's own. Before, TID_UPDATE of a fresh
// buffer failed "memory cannot be watched" under the TID stress test.
func TestSubscribeNeighbourRemapped(t *testing.T) {
	n := newNotifier(t, SourceUserfaultfd)
	exe, err := os.Open("/proc/self/exe")
	if err != nil {
		t.Fatal(err)
	}
	defer exe.Close()
	// Two pages of one anonymous VMA: the range and its neighbour.
	addr := mmapAnon(t, 2)
	defer munmap(t, addr, 2)
	neighbour := addr + pageSize
	remapped := false
	n.beforeWatch = func() {
		if remapped {
			return
		}
		remapped = true
		r, _, errno := unix.Syscall6(unix.SYS_MMAP, neighbour, pageSize, unix.PROT_READ,
			unix.MAP_PRIVATE|unix.MAP_FIXED, exe.Fd(), 0)
		if errno != 0 || r != neighbour {
			t.Errorf("map the executable over the neighbour: %#x %v", r, errno)
		}
	}
	rec := newRecorder()
	s := subscribe(t, n, addr, pageSize, rec)
	if !remapped {
		t.Fatal("the hook did not run")
	}
	// Watched: an munmap of the range is delivered.
	munmap(t, addr, 1)
	syncNotifier(t, n)
	if evs := rec.take(); !hasKind(evs, EventUnmap) {
		t.Fatalf("events after munmap of %#x: %s", s.Start(), kindsOf(evs))
	}
}
