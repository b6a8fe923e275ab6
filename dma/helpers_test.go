package dma

import (
	"bufio"
	"errors"
	"fmt"
	"github.com/gohfi/gohfi/internal/testenv"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// newTestPinner returns a Pinner whose io_uring works, or skips.
func newTestPinner(t testing.TB, acct *Accountant, opts *PinnerOptions) *Pinner {
	t.Helper()
	p, err := NewPinner(acct, opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Available(); err != nil {
		if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) {
			testenv.Require(t, err, "io_uring")
		}
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("Pinner.Close: %v", err)
		}
	})
	return p
}

// mmapAnon maps n bytes of private anonymous memory, unmapped at cleanup
// unless the test already did.
func mmapAnon(t testing.TB, n int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// vmPinKB returns VmPin from /proc/self/status: pages pinned long-term in
// this mm (io_uring accounts fixed buffers there).
func vmPinKB(t testing.TB) int {
	t.Helper()
	f, err := os.Open("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if rest, ok := strings.CutPrefix(s.Text(), "VmPin:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	testenv.Missing(t, "no VmPin line in /proc/self/status: VmPin accounting")
	return 0
}

// withMemlockLimit sets RLIMIT_MEMLOCK's soft limit for the test and
// restores it after, or skips when the process may not (raising it past the
// hard limit needs CAP_SYS_RESOURCE).
func withMemlockLimit(t testing.TB, bytes uint64) {
	t.Helper()
	if err := trySetMemlock(t, bytes); err != nil {
		testenv.Require(t, err, fmt.Sprintf("setrlimit(RLIMIT_MEMLOCK, %d)", bytes))
	}
}

// trySetMemlock is withMemlockLimit returning the error instead of skipping.
func trySetMemlock(t testing.TB, bytes uint64) error {
	t.Helper()
	var old unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_MEMLOCK, &old); err != nil {
		t.Fatal(err)
	}
	lim := old
	lim.Cur = bytes
	if lim.Max != unix.RLIM_INFINITY && lim.Cur > lim.Max {
		lim.Max = lim.Cur // needs CAP_SYS_RESOURCE
	}
	if err := unix.Setrlimit(unix.RLIMIT_MEMLOCK, &lim); err != nil {
		return err
	}
	t.Cleanup(func() {
		if err := unix.Setrlimit(unix.RLIMIT_MEMLOCK, &old); err != nil {
			t.Errorf("restore RLIMIT_MEMLOCK: %v", err)
		}
	})
	return nil
}

func countFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// checkNoLeaks records fds and goroutines now and checks at cleanup that
// they are back (give goroutines a moment to exit).
func checkNoLeaks(t *testing.T) {
	fds, gs := countFDs(t), runtime.NumGoroutine()
	t.Cleanup(func() {
		if n := countFDs(t); n != fds {
			t.Errorf("fd leak: %d open, %d before", n, fds)
		}
		deadline := time.Now().Add(time.Second)
		for runtime.NumGoroutine() > gs && time.Now().Before(deadline) {
			runtime.Gosched()
		}
		if n := runtime.NumGoroutine(); n > gs {
			t.Errorf("goroutine leak: %d, %d before", n, gs)
		}
	})
}
