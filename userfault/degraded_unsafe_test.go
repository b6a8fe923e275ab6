package userfault

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"
	"testing"
	"unsafe"

	"github.com/gohfi/gohfi/mem"
	"golang.org/x/sys/unix"
)

// A source that cannot start is reported with its reason and the other keeps
// working: a child process drops the capability one source needs, on all its
// threads, then runs a default notifier and reports what it saw.

const (
	capSysPtrace = 19
	capSysAdmin  = 21
	capPerfmon   = 38
	capBPF       = 39
)

func dropCaps(caps ...int) error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return fmt.Errorf("capget: %w", err)
	}
	for _, c := range caps {
		data[c/32].Effective &^= 1 << (c % 32)
		data[c/32].Permitted &^= 1 << (c % 32)
		data[c/32].Inheritable &^= 1 << (c % 32)
	}
	// Capabilities are per thread: change every thread of the process.
	if _, _, e := syscall.AllThreadsSyscall(syscall.SYS_CAPSET, uintptr(unsafe.Pointer(&hdr)), uintptr(unsafe.Pointer(&data[0])), 0); e != 0 {
		return fmt.Errorf("capset: %w", e)
	}
	return nil
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
				requireOrSkip(t, fmt.Errorf("not root"), "dropping capabilities")
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
