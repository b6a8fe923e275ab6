package userfault

import (
	"context"
	"fmt"
	"github.com/gohfi/gohfi/internal/testenv"
	"io"
	"os"
	"runtime"
	"strings"
	"syscall"
	"testing"

	"github.com/gohfi/gohfi/mem"
	"golang.org/x/sys/unix"
)

// A source that cannot start is reported with its reason and the other keeps
// working: a child process drops the capability one source needs, on all its
// threads (through the bounding set and a re-exec), then runs a default
// notifier and reports what it saw.

const (
	capSysPtrace = 19
	capSysAdmin  = 21
	capPerfmon   = 38
	capBPF       = 39
)

// dropCaps removes capabilities from the bounding set of this thread and
// re-executes the program from it: root's capabilities after execve are the
// bounding set, so the new image lacks them on every thread.
func dropCaps(caps ...int) error {
	if os.Getenv(childEnv+"_STAGE") == "2" {
		return nil
	}
	runtime.LockOSThread()
	for _, c := range caps {
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); err != nil {
			return fmt.Errorf("PR_CAPBSET_DROP %d: %w", c, err)
		}
	}
	err := syscall.Exec(os.Args[0], os.Args, append(os.Environ(), childEnv+"_STAGE=2"))
	return fmt.Errorf("re-exec: %w", err)
}

// degradedChild runs in the child: drop, start, watch a munmap, report.
func degradedChild(mode string) {
	var err error
	switch mode {
	case "nouffd":
		err = dropCaps(capSysPtrace)
	case "nobpf":
		err = dropCaps(capBPF, capPerfmon, capSysAdmin)
	}
	if err != nil {
		fmt.Println("error", err)
		os.Exit(2)
	}
	n, err := New(context.Background(), Options{})
	if err != nil {
		fmt.Println("error", err)
		os.Exit(2)
	}
	defer n.Close()
	for _, st := range n.Sources() {
		fmt.Printf("status %s %v %v\n", st.Source, st.Started, st.Err)
	}
	b, err := mem.Alloc(4 * int(pageSize))
	if err != nil {
		fmt.Println("error", err)
		os.Exit(2)
	}
	got := make(chan Event, 8)
	if _, err := n.Subscribe(b.Addr(), uintptr(b.Len()), InvalidateFunc(func(_ *Subscription, ev Event) bool {
		got <- ev
		return true
	})); err != nil {
		fmt.Println("error", err)
		os.Exit(2)
	}
	b.Close()
	if err := n.Sync(context.Background()); err != nil {
		fmt.Println("error", err)
		os.Exit(2)
	}
	select {
	case ev := <-got:
		fmt.Printf("event %s %s\n", ev.Source, ev.Kind)
	default:
		fmt.Println("event none")
	}
}

func TestDegradedSources(t *testing.T) {
	for _, tc := range []struct {
		mode, dead, alive string
	}{
		{"nouffd", "userfaultfd", "tracepoint"},
		{"nobpf", "tracepoint", "userfaultfd"},
	} {
		t.Run(tc.mode, func(t *testing.T) {
			if os.Geteuid() != 0 {
				testenv.Missing(t, "dropping capabilities needs root")
			}
			cmd, in, out := startChild(t, tc.mode)
			in.Close()
			b, _ := io.ReadAll(out)
			if err := cmd.Wait(); err != nil {
				t.Fatalf("child: %v\n%s", err, b)
			}
			lines := string(b)
			t.Logf("child said:\n%s", lines)
			if !strings.Contains(lines, "status "+tc.dead+" false ") || !strings.Contains(lines, "operation not permitted") {
				t.Errorf("%s not reported as failed with EPERM", tc.dead)
			}
			if !strings.Contains(lines, "status "+tc.alive+" true") {
				t.Errorf("%s did not start", tc.alive)
			}
			if !strings.Contains(lines, "event "+tc.alive+" unmap") {
				t.Errorf("the surviving source %s delivered no unmap", tc.alive)
			}
		})
	}
}
