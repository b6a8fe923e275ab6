package userfault

import (
	"context"
	"fmt"
	"github.com/gohfi/gohfi/internal/testenv"
	"math/rand/v2"
	"os"
	"runtime"
	"runtime/pprof"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// No deadlock under stress: goroutines map, subscribe, unmap, madvise and
// mremap for a bounded time with the garbage collector forced in between,
// while others Sync and churn subscriptions. Every unmap of a subscribed
// range must show in ReadRetry as soon as munmap returns (userfaultfd), and
// every subscription touched must have been invalidated after Sync.
func TestStress(t *testing.T) {
	fds := openFds(t)
	gs := runtime.NumGoroutine()
	n, err := New(context.Background(), Options{Sources: []Source{SourceUserfaultfd, SourceTracepoint}, Require: true})
	testenv.Require(t, err, "start notifier")

	duration := 2 * time.Second
	if testing.Short() {
		duration = 500 * time.Millisecond
	}
	ctx, cancel := context.WithTimeout(context.Background(), duration)
	defer cancel()

	var (
		wg         sync.WaitGroup
		iterations atomic.Int64
		calls      atomic.Int64
		failures   atomic.Int64
		firstErr   sync.Once
		errMsg     atomic.Value
	)
	fail := func(msg string) {
		failures.Add(1)
		firstErr.Do(func() { errMsg.Store(msg) })
	}
	const workers = 4
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(seed uint64) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, 99))
			for i := 0; ctx.Err() == nil; i++ {
				iterations.Add(1)
				if i%16 == 0 {
					runtime.GC()
				}
				pages := 2 + rng.IntN(8)
				r, _, e := unix.Syscall6(unix.SYS_MMAP, 0, uintptr(pages)*pageSize, unix.PROT_READ|unix.PROT_WRITE,
					unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE, ^uintptr(0), 0)
				if e != 0 {
					fail("mmap: " + e.Error())
					return
				}
				addr := r
				// Overlapping subscriptions, some removing themselves.
				nsub := 1 + rng.IntN(3)
				subs := make([]*Subscription, 0, nsub)
				hit := make([]atomic.Bool, nsub)
				for k := 0; k < nsub; k++ {
					off := uintptr(rng.IntN(pages)) * pageSize
					l := pageSize * uintptr(1+rng.IntN(pages-int(off/pageSize)))
					selfRemove := rng.IntN(4) == 0
					k := k
					s, err := n.Subscribe(addr+off, l, InvalidateFunc(func(s *Subscription, ev Event) bool {
						calls.Add(1)
						hit[k].Store(true)
						if selfRemove {
							s.Remove()
						}
						return true
					}))
					if err != nil {
						fail("subscribe: " + err.Error())
						return
					}
					subs = append(subs, s)
				}
				seqs := make([]uint64, len(subs))
				for k, s := range subs {
					seqs[k] = s.ReadBegin()
				}
				action := rng.IntN(4)
				switch action {
				case 0: // madvise a page, then unmap all
					p := uintptr(rng.IntN(pages))
					unix.Syscall(unix.SYS_MADVISE, addr+p*pageSize, pageSize, unix.MADV_DONTNEED)
				case 1: // move it
					if nr, _, e := unix.Syscall6(unix.SYS_MREMAP, addr, uintptr(pages)*pageSize, uintptr(pages+4)*pageSize,
						unix.MREMAP_MAYMOVE, 0, 0); e == 0 {
						addr = nr
						pages += 4
					}
				case 2: // unmap the middle first
					if pages > 2 {
						unix.Syscall(unix.SYS_MUNMAP, addr+pageSize, pageSize, 0)
					}
				}
				unix.Syscall(unix.SYS_MUNMAP, addr, uintptr(pages)*pageSize, 0)
				for k, s := range subs {
					if !s.ReadRetry(seqs[k]) && !s.removed.Load() {
						fail(fmt.Sprintf("ReadRetry false right after munmap returned: action %d sub [%#x,%#x) addr %#x pages %d seq %d now %d hit %v", action, s.start, s.end, addr, pages, seqs[k], s.Seq(), hit[k].Load()))
					}
				}
				if i%8 == 0 {
					sctx, scancel := context.WithTimeout(context.Background(), 10*time.Second)
					err := n.Sync(sctx)
					scancel()
					if err != nil {
						fail("Sync: " + err.Error())
						return
					}
					for k := range subs {
						if !hit[k].Load() {
							fail("subscription of an unmapped range never invalidated")
						}
					}
				}
				for _, s := range subs {
					s.Remove()
				}
			}
		}(uint64(w + 1))
	}
	// Sync from another goroutine all along.
	wg.Add(1)
	go func() {
		defer wg.Done()
		for ctx.Err() == nil {
			sctx, scancel := context.WithTimeout(context.Background(), 10*time.Second)
			if err := n.Sync(sctx); err != nil {
				fail("concurrent Sync: " + err.Error())
			}
			scancel()
			time.Sleep(time.Millisecond)
		}
	}()

	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-time.After(duration + 30*time.Second):
		pprof.Lookup("goroutine").WriteTo(os.Stderr, 1)
		t.Fatal("stress test deadlocked (goroutines dumped)")
	}
	if f := failures.Load(); f > 0 {
		t.Errorf("%d failures, first: %v", f, errMsg.Load())
	}
	closed := make(chan error, 1)
	go func() { closed <- n.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Errorf("Close: %v", err)
		}
	case <-time.After(10 * time.Second):
		pprof.Lookup("goroutine").WriteTo(os.Stderr, 1)
		t.Fatal("Close hung")
	}
	t.Logf("%d iterations, %d Invalidate calls, stats %+v", iterations.Load(), calls.Load(), n.Stats())
	if iterations.Load() < workers {
		t.Errorf("only %d iterations", iterations.Load())
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
