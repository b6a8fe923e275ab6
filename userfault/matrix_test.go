package userfault

import (
	"bufio"
	"context"
	"fmt"
	"github.com/gohfi/gohfi/internal/testenv"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gohfi/gohfi/mem"
	"golang.org/x/sys/unix"
)

// The coverage matrix: which source sees which event. docs/userfault.md
// shows the same table; keep them in step.
//
// Each source runs in its own notifier, so duplicates are not merged and
// every source's view is recorded.

const (
	madvPopulateWrite = 23
)

type matrixRow struct {
	name string
	// run maps memory, subscribes it through sub, acts, and cleans up.
	run  func(t *testing.T, sub func(addr, length uintptr))
	want map[Source]EventKind // sources that must see it, with the kind
}

func TestCoverageMatrix(t *testing.T) {
	srcs := []Source{SourceUserfaultfd, SourceTracepoint, SourceKVM}
	notifiers := map[Source]*Notifier{}
	for _, s := range srcs {
		n, err := New(context.Background(), Options{Sources: []Source{s}, Require: true})
		if s == SourceKVM && err != nil {
			// Optional source: hosts without a usable /dev/kvm lack it.
			t.Logf("KVM source unavailable, its column is not checked: %v", err)
			continue
		}
		testenv.Require(t, err, "start "+s.String())
		defer n.Close()
		notifiers[s] = n
		t.Logf("%v", n.Sources())
	}
	U, T, K := SourceUserfaultfd, SourceTracepoint, SourceKVM
	// active are the subscriptions of the running row; unsub removes them
	// after syncing every notifier, so the row's cleanup is not recorded.
	var active []*Subscription
	unsub := func(t *testing.T) {
		t.Helper()
		for _, n := range notifiers {
			syncNotifier(t, n)
		}
		for _, s := range active {
			s.Remove()
		}
		active = nil
	}
	const pages = 8
	ps := pageSize
	rows := []matrixRow{
		{"munmap whole", func(t *testing.T, sub func(a, l uintptr)) {
			a := mmapAnon(t, pages)
			sub(a, pages*ps)
			munmap(t, a, pages)
		}, map[Source]EventKind{U: EventUnmap, T: EventUnmap, K: EventKernel}},
		{"munmap head", func(t *testing.T, sub func(a, l uintptr)) {
			a := mmapAnon(t, pages)
			sub(a, pages*ps)
			munmap(t, a, 2)
			munmap(t, a+2*ps, pages-2)
		}, map[Source]EventKind{U: EventUnmap, T: EventUnmap, K: EventKernel}},
		{"munmap middle", func(t *testing.T, sub func(a, l uintptr)) {
			a := mmapAnon(t, pages+2)
			sub(a+ps, pages*ps)
			munmap(t, a+3*ps, 2)
			unsub(t)
			munmap(t, a, pages+2)
		}, map[Source]EventKind{U: EventUnmap, T: EventUnmap, K: EventKernel}},
		{"munmap tail", func(t *testing.T, sub func(a, l uintptr)) {
			a := mmapAnon(t, pages)
			sub(a, pages*ps)
			munmap(t, a+(pages-2)*ps, 2)
			unsub(t)
			munmap(t, a, pages-2)
		}, map[Source]EventKind{U: EventUnmap, T: EventUnmap, K: EventKernel}},
		{"mremap move", func(t *testing.T, sub func(a, l uintptr)) {
			a := mmapAnon(t, pages)
			dst := mmapAnon(t, pages)
			sub(a, pages*ps)
			mremap(t, a, pages*ps, pages*ps, unix.MREMAP_MAYMOVE|unix.MREMAP_FIXED, dst)
			unsub(t)
			munmap(t, dst, pages)
		}, map[Source]EventKind{U: EventRemap, T: EventRemap, K: EventKernel}},
		{"mremap shrink", func(t *testing.T, sub func(a, l uintptr)) {
			a := mmapAnon(t, pages)
			sub(a, pages*ps)
			mremap(t, a, pages*ps, 2*ps, 0, 0)
			unsub(t)
			munmap(t, a, 2)
		}, map[Source]EventKind{U: EventUnmap, T: EventUnmap, K: EventKernel}},
		{"mremap grow in place", func(t *testing.T, sub func(a, l uintptr)) {
			a := mmapAnon(t, 2*pages)
			munmap(t, a+pages*ps, pages) // room to grow
			sub(a, pages*ps)
			mremap(t, a, pages*ps, 2*pages*ps, 0, 0)
			unsub(t)
			munmap(t, a, 2*pages)
		}, map[Source]EventKind{}},
		{"madvise DONTNEED", func(t *testing.T, sub func(a, l uintptr)) {
			a := mmapAnon(t, pages)
			sub(a, pages*ps)
			madvise(t, a+ps, 2, unix.MADV_DONTNEED)
			unsub(t)
			munmap(t, a, pages)
		}, map[Source]EventKind{U: EventRemove, T: EventRemove, K: EventKernel}},
		{"madvise FREE", func(t *testing.T, sub func(a, l uintptr)) {
			a := mmapAnon(t, pages)
			sub(a, pages*ps)
			madvise(t, a+ps, 2, unix.MADV_FREE)
			unsub(t)
			munmap(t, a, pages)
		}, map[Source]EventKind{U: EventRemove, T: EventRemove, K: EventKernel}},
		{"madvise REMOVE (memfd)", func(t *testing.T, sub func(a, l uintptr)) {
			b, err := mem.AllocMemfd(pages * int(ps))
			if err != nil {
				t.Fatal(err)
			}
			defer b.Close()
			sub(b.Addr(), pages*ps)
			madvise(t, b.Addr()+ps, 2, unix.MADV_REMOVE)
			unsub(t)
		}, map[Source]EventKind{U: EventRemove, T: EventRemove, K: EventKernel}},
		{"brk shrink", func(t *testing.T, sub func(a, l uintptr)) {
			cur := brk(t, 0)
			base := pageUp(cur)
			if got := brk(t, base+2*pages*ps); got != base+2*pages*ps {
				testenv.Missing(t, "brk cannot grow: %#x", got)
			}
			madvise(t, base, 2*pages, madvPopulateWrite)
			sub(base, pages*ps)
			brk(t, base)
			unsub(t)
			brk(t, cur)
		}, map[Source]EventKind{U: EventUnmap, T: EventUnmap, K: EventKernel}},
		{"fork, then exit of the child", func(t *testing.T, sub func(a, l uintptr)) {
			a := mmapAnon(t, pages)
			sub(a, pages*ps)
			forkAndExit(t)
			unsub(t)
			munmap(t, a, pages)
		}, map[Source]EventKind{U: EventFork, T: EventFork, K: EventKernel}},
		{"mmap MAP_FIXED over the range", func(t *testing.T, sub func(a, l uintptr)) {
			a := mmapAnon(t, pages)
			sub(a, pages*ps)
			mmapAt(t, a+ps, 2, -1, unix.MAP_FIXED)
			unsub(t)
			munmap(t, a, pages)
		}, map[Source]EventKind{U: EventUnmap, K: EventKernel}},
		{"mprotect", func(t *testing.T, sub func(a, l uintptr)) {
			a := mmapAnon(t, pages)
			sub(a, pages*ps)
			if _, _, e := unix.Syscall(unix.SYS_MPROTECT, a+ps, 2*ps, unix.PROT_READ); e != 0 {
				t.Fatal(e)
			}
			unsub(t)
			munmap(t, a, pages)
		}, map[Source]EventKind{K: EventKernel}},
	}
	table := [][]string{{"event", "userfaultfd", "tracepoint", "kvm"}}
	for _, row := range rows {
		recs := map[Source]*recorder{}
		var subAddr, subEnd uintptr
		t.Run(row.name, func(t *testing.T) {
			row.run(t, func(addr, length uintptr) {
				subAddr, subEnd = addr, addr+length
				for s, n := range notifiers {
					r := newRecorder()
					recs[s] = r
					sb, err := n.Subscribe(addr, length, r)
					if err != nil {
						t.Fatalf("%s: Subscribe: %v", s, err)
					}
					active = append(active, sb)
				}
			})
			unsub(t)
			line := []string{row.name}
			for _, s := range srcs {
				if notifiers[s] == nil {
					line = append(line, "n/a")
					continue
				}
				seen := recs[s].take()
				for _, ev := range seen {
					if ev.End <= subAddr || ev.Start >= subEnd || ev.Source != s {
						t.Errorf("%s: event outside the subscription or from another source: %v", s, ev)
					}
				}
				kind, want := row.want[s]
				switch {
				case want && len(seen) == 0:
					t.Errorf("%s: saw nothing, want %s", s, kind)
				case !want && len(seen) > 0 && (s == SourceKVM || s == SourceFentry):
					// The kernel-side sources see the mm's own notifier, which
					// also fires for what no syscall here did (THP work,
					// compaction, migration): an extra event is allowed there.
					t.Logf("%s: saw %v beside the operation (kernel-side)", s, seen)
				case !want && len(seen) > 0:
					t.Errorf("%s: saw %v, want nothing", s, seen)
				case want && !hasKind(seen, kind):
					t.Errorf("%s: saw %v, want a %s", s, seen, kind)
				}
				line = append(line, kindsOf(seen))
			}
			table = append(table, line)
		})
	}
	t.Run("process exit", func(t *testing.T) {
		table = append(table, processExitRow(t))
	})
	var sb strings.Builder
	for _, l := range table {
		fmt.Fprintf(&sb, "| %-30s | %-12s | %-12s | %-12s |\n", l[0], l[1], l[2], l[3])
	}
	t.Logf("coverage matrix:\n%s", sb.String())
}

func hasKind(evs []Event, k EventKind) bool {
	for _, e := range evs {
		if e.Kind == k {
			return true
		}
	}
	return false
}

func kindsOf(evs []Event) string {
	if len(evs) == 0 {
		return "-"
	}
	var ks []string
	for _, e := range evs {
		if s := e.Kind.String(); len(ks) == 0 || ks[len(ks)-1] != s {
			ks = append(ks, s)
		}
	}
	return strings.Join(ks, "+")
}

func mremap(t *testing.T, addr, oldLen, newLen uintptr, flags int, newAddr uintptr) uintptr {
	t.Helper()
	r, _, e := unix.Syscall6(unix.SYS_MREMAP, addr, oldLen, newLen, uintptr(flags), newAddr, 0)
	if e != 0 {
		t.Fatalf("mremap: %v", e)
	}
	return r
}

func brk(t *testing.T, addr uintptr) uintptr {
	t.Helper()
	r, _, _ := unix.Syscall(unix.SYS_BRK, addr, 0, 0)
	return r
}

// forkAndExit forks a child that exits at once, with no Go code running in
// it, and waits for it.
func forkAndExit(t *testing.T) {
	t.Helper()
	pid, errno := rawForkExit()
	if errno != 0 {
		t.Fatalf("fork: %v", errno)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		var ws unix.WaitStatus
		got, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil)
		if err != nil {
			t.Fatalf("wait4: %v", err)
		}
		if got == pid {
			if !ws.Exited() || ws.ExitStatus() != 7 {
				t.Fatalf("child status %v", ws)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("forked child did not exit (blocked on a userfaultfd?)")
		}
		time.Sleep(time.Millisecond)
	}
}

//go:nosplit
func rawForkExit() (int, syscall.Errno) {
	r, _, e := syscall.RawSyscall6(syscall.SYS_CLONE, uintptr(syscall.SIGCHLD), 0, 0, 0, 0, 0)
	if e != 0 {
		return 0, e
	}
	if r == 0 {
		syscall.RawSyscall(syscall.SYS_EXIT_GROUP, 7, 0, 0)
	}
	return int(r), 0
}

const childEnv = "USERFAULT_TEST_CHILD"

// TestMain makes the test binary the child process of the tests that need
// one (childEnv set), and runs the tests otherwise.
func TestMain(m *testing.M) {
	switch os.Getenv(childEnv) {
	case "":
		os.Exit(m.Run())
	case "nouffd", "nobpf":
		degradedChild(os.Getenv(childEnv))
		os.Exit(0)
	case "exit":
		// Print the address of a buffer, wait for stdin to close, exit.
		b, err := mem.Alloc(4 * int(pageSize))
		if err != nil {
			fmt.Println("error", err)
			os.Exit(2)
		}
		fmt.Printf("%d %d\n", b.Addr(), b.Len())
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	default:
		fmt.Fprintf(os.Stderr, "%s=%q: unknown child mode\n", childEnv, os.Getenv(childEnv))
		os.Exit(2)
	}
}

// startChild re-executes the test binary as a helper child.
func startChild(t *testing.T, mode string) (*exec.Cmd, io.WriteCloser, *bufio.Reader) {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), childEnv+"="+mode)
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		in.Close()
		cmd.Process.Kill()
		cmd.Wait()
	})
	return cmd, in, bufio.NewReader(out)
}

// processExitRow watches a child process by pid and lets it exit.
func processExitRow(t *testing.T) []string {
	cmd, in, out := startChild(t, "exit")
	line, err := out.ReadString('\n')
	if err != nil {
		t.Fatalf("child: %v", err)
	}
	f := strings.Fields(line)
	if len(f) != 2 {
		t.Fatalf("child said %q", line)
	}
	addr, _ := strconv.ParseUint(f[0], 10, 64)
	length, _ := strconv.ParseUint(f[1], 10, 64)
	pid := cmd.Process.Pid
	row := []string{"process exit (watched by pid)"}
	for _, s := range []Source{SourceUserfaultfd, SourceTracepoint, SourceKVM} {
		n, err := New(context.Background(), Options{Pid: pid, Sources: []Source{s}, Require: true})
		if s != SourceTracepoint {
			if err == nil {
				n.Close()
				t.Errorf("%s watches another process?", s)
			}
			row = append(row, "n/a")
			continue
		}
		testenv.Require(t, err, "tracepoint notifier for the child")
		defer n.Close()
		rec := newRecorder()
		sub, err := n.Subscribe(uintptr(addr), uintptr(length), rec)
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Remove()
		in.Close()
		if err := cmd.Wait(); err != nil {
			t.Fatalf("child: %v", err)
		}
		syncNotifier(t, n)
		evs := rec.take()
		if !hasKind(evs, EventExit) {
			t.Errorf("tracepoint: saw %v, want exit", evs)
		}
		row = append(row, kindsOf(evs))
	}
	return row
}
