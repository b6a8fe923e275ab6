package userfault

import (
	"context"
	"errors"
	"github.com/gohfi/gohfi/internal/testenv"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

var pageSize = uintptr(os.Getpagesize())

// newNotifier starts a notifier with exactly the given sources, or skips.
func newNotifier(t testing.TB, srcs ...Source) *Notifier {
	t.Helper()
	n, err := New(context.Background(), Options{Sources: srcs, Require: true})
	testenv.Require(t, err, "start notifier")
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return n
}

func syncNotifier(t testing.TB, n *Notifier) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := n.Sync(ctx); err != nil {
		t.Fatalf("Sync: %v", err)
	}
}

// mmapAnon maps pages of private anonymous memory, prefaulted.
func mmapAnon(t testing.TB, pages int) uintptr {
	t.Helper()
	return mmapAt(t, 0, pages, -1, 0)
}

func mmapAt(t testing.TB, addr uintptr, pages int, fd int, extra int) uintptr {
	t.Helper()
	flags := unix.MAP_PRIVATE | unix.MAP_ANONYMOUS | unix.MAP_POPULATE | extra
	if fd >= 0 {
		flags = unix.MAP_SHARED | unix.MAP_POPULATE | extra
	}
	r, _, errno := unix.Syscall6(unix.SYS_MMAP, addr, uintptr(pages)*pageSize,
		unix.PROT_READ|unix.PROT_WRITE, uintptr(flags), uintptr(fd), 0)
	if errno != 0 {
		t.Fatalf("mmap: %v", errno)
	}
	return r
}

func munmap(t testing.TB, addr uintptr, pages int) {
	t.Helper()
	if _, _, errno := unix.Syscall(unix.SYS_MUNMAP, addr, uintptr(pages)*pageSize, 0); errno != 0 {
		t.Fatalf("munmap %#x: %v", addr, errno)
	}
}

func madvise(t testing.TB, addr uintptr, pages int, advice int) {
	t.Helper()
	if _, _, errno := unix.Syscall(unix.SYS_MADVISE, addr, uintptr(pages)*pageSize, uintptr(advice)); errno != 0 {
		t.Fatalf("madvise %#x %d: %v", addr, advice, errno)
	}
}

// recorder collects the events delivered to its subscriptions.
type recorder struct {
	mu     sync.Mutex
	events []Event
	// ret is what Invalidate answers. Atomic: the test sets it before an
	// munmap that the dispatcher delivers, and the kernel's ordering of
	// the two is no happens-before edge the race detector can see.
	ret atomic.Bool
}

func newRecorder() *recorder {
	r := &recorder{}
	r.ret.Store(true)
	return r
}

func (r *recorder) Invalidate(_ *Subscription, ev Event) bool {
	r.mu.Lock()
	r.events = append(r.events, ev)
	r.mu.Unlock()
	return r.ret.Load()
}

func (r *recorder) take() []Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	ev := r.events
	r.events = nil
	return ev
}

func subscribe(t testing.TB, n *Notifier, addr uintptr, length uintptr, ops IntervalOps) *Subscription {
	t.Helper()
	s, err := n.Subscribe(addr, length, ops)
	if err != nil {
		t.Fatalf("Subscribe [%#x, +%#x): %v", addr, length, err)
	}
	t.Cleanup(s.Remove)
	return s
}

// openFds counts this process's open file descriptors.
func openFds(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func isErrno(err error, e unix.Errno) bool { return errors.Is(err, e) }
