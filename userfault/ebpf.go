package userfault

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"
)

// The eBPF sources (bpf/notifier.c). The tracepoint programs report munmap,
// mremap, madvise, brk, fork and exit of the watched tgid, filtered in the
// kernel by tgid and by the watched ranges (a sorted array in a map, binary
// searched under a sequence lock); the optional KVM and fentry programs
// report kernel-side invalidations by range. All write one ring buffer.

const (
	bpfEvUnmap  = 1
	bpfEvRemove = 2
	bpfEvRemap  = 3
	bpfEvFork   = 4
	bpfEvExit   = 5
	bpfEvKernel = 6
	bpfEvMarker = 100

	bpfOrigSyscall = 0
	bpfOrigFentry  = 1
	bpfOrigKVM     = 2

	bpfMarkerAdvice = 0x47484649
	bpfMaxRanges    = 8192

	kvmCreateVM = 0xAE01 // _IO(KVMIO, 0x01)

	tracefsDir = "/sys/kernel/tracing"
)

// coreObjects are the programs every eBPF notifier needs.
type coreObjects struct {
	EnterMunmap  *ebpf.Program  `ebpf:"enter_munmap"`
	EnterMremap  *ebpf.Program  `ebpf:"enter_mremap"`
	EnterMadvise *ebpf.Program  `ebpf:"enter_madvise"`
	ExitMunmap   *ebpf.Program  `ebpf:"exit_munmap"`
	ExitMremap   *ebpf.Program  `ebpf:"exit_mremap"`
	ExitMadvise  *ebpf.Program  `ebpf:"exit_madvise"`
	ExitBrk      *ebpf.Program  `ebpf:"exit_brk"`
	ProcessExit  *ebpf.Program  `ebpf:"process_exit"`
	Events       *ebpf.Map      `ebpf:"events"`
	Ranges       *ebpf.Map      `ebpf:"ranges"`
	Config       *ebpf.Map      `ebpf:"config"`
	Calls        *ebpf.Map      `ebpf:"calls"`
	Bss          *ebpf.Map      `ebpf:".bss"`
	Lost         *ebpf.Variable `ebpf:"lost"`
}

type bpfSource struct {
	n        *Notifier
	core     coreObjects
	extra    []*ebpf.Program
	links    []link.Link
	rd       *ringbuf.Reader
	kvm      int // KVM VM fd, or -1
	btfCache *btf.Cache
	gen      uint64 // config generation, under n.mu
	nranges  int
	cookie   uint64
	kinds    []Source
	info     []string
	done     chan struct{}

	markerNext atomic.Uint64
	mu         sync.Mutex
	seen       uint64
	seenCh     chan struct{} // closed and replaced when seen advances
	lastLost   uint64

	closeOnce sync.Once
	closeErr  error
}

// checkTracefs reports a clear error when tracefs is not mounted where the
// tracepoint links look for it. Mounting it is the machine's setup
// (scripts/test.sh does it for the tests), not a library's business.
func checkTracefs() error {
	for _, dir := range []string{tracefsDir, "/sys/kernel/debug/tracing"} {
		if _, err := os.Stat(dir + "/events"); err == nil {
			return nil
		}
	}
	return fmt.Errorf("tracefs is not mounted (mount -t tracefs nodev %s): %w", tracefsDir, unix.ENOENT)
}

func newBPF(ctx context.Context, n *Notifier, kinds []Source) (*bpfSource, []SourceStatus) {
	fail := func(err error) (*bpfSource, []SourceStatus) {
		var sts []SourceStatus
		for _, k := range kinds {
			sts = append(sts, SourceStatus{Source: k, Err: err})
		}
		return nil, sts
	}
	want := map[Source]bool{}
	for _, k := range kinds {
		want[k] = true
	}
	spec, err := loadNotifier()
	if err != nil {
		return fail(fmt.Errorf("ebpf: load spec: %w", err))
	}
	b := &bpfSource{n: n, kvm: -1, done: make(chan struct{}), seenCh: make(chan struct{})}
	b.cookie = uint64(os.Getpagesize()) * (uint64(os.Getpid())<<20 | uint64(uintptrOf(b))&0xfffff)
	syscallsOn := uint32(0)
	if want[SourceTracepoint] {
		syscallsOn = 1
	}
	for name, v := range map[string]any{"watch_tgid": uint32(n.pid), "self_tgid": uint32(os.Getpid()),
		"marker_cookie": b.cookie, "syscalls_on": syscallsOn} {
		if err := spec.Variables[name].Set(v); err != nil {
			return fail(fmt.Errorf("ebpf: set %s: %w", name, err))
		}
	}
	// One parse of the kernel's BTF for all the loads of this notifier.
	b.btfCache = btf.NewCache()
	if err := spec.LoadAndAssign(&b.core, &ebpf.CollectionOptions{Cache: b.btfCache}); err != nil {
		return fail(fmt.Errorf("ebpf: load programs: %w", explainBPF(err)))
	}
	var sts []SourceStatus
	defer func() {
		if len(b.kinds) == 0 {
			_ = b.closeObjects() // best effort: every source's status carries the failure
		}
	}()
	// The madvise program also carries Sync's markers: attach it always.
	if err := checkTracefs(); err != nil {
		return fail(fmt.Errorf("ebpf: %w", err))
	}
	l, err := link.Tracepoint("syscalls", "sys_enter_madvise", b.core.EnterMadvise, nil)
	if err != nil {
		_ = b.closeObjects() // best effort after the failure reported
		return fail(fmt.Errorf("ebpf: attach tracepoint syscalls/sys_enter_madvise: %w", explainBPF(err)))
	}
	b.links = append(b.links, l)
	if want[SourceTracepoint] {
		if err := b.attachTracepoints(spec); err != nil {
			sts = append(sts, SourceStatus{Source: SourceTracepoint, Err: err})
		} else {
			b.kinds = append(b.kinds, SourceTracepoint)
			sts = append(sts, SourceStatus{Source: SourceTracepoint, Started: true, Detail: strings.Join(b.info, ", ")})
		}
	}
	if want[SourceKVM] || want[SourceFentry] {
		// A KVM VM gives this process's mm a real mmu_notifier: its
		// tracepoint (and the kernel's notifier entry point) then fire for
		// every invalidation of our memory.
		fd, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
		var vmErr error
		if err != nil {
			vmErr = fmt.Errorf("open /dev/kvm: %w", err)
		} else {
			r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), kvmCreateVM, 0)
			_ = unix.Close(fd) // the VM fd holds the VM; /dev/kvm's fd has nothing to flush
			if errno != 0 {
				vmErr = fmt.Errorf("KVM_CREATE_VM: %w", errno)
			} else {
				b.kvm = int(r)
			}
		}
		for _, k := range []Source{SourceKVM, SourceFentry} {
			if !want[k] {
				continue
			}
			if vmErr != nil && (k == SourceKVM || n.pid != os.Getpid()) {
				sts = append(sts, SourceStatus{Source: k, Err: vmErr})
				continue
			}
			if n.pid != os.Getpid() && k == SourceKVM {
				sts = append(sts, SourceStatus{Source: k, Err: fmt.Errorf("the KVM notifier watches only this process: %w", unix.EINVAL)})
				continue
			}
			name, detail := "kvm_unmap_hva_range", "tp_btf/kvm_unmap_hva_range"
			if k == SourceFentry {
				name, detail = "mmu_invalidate_start", "fentry/__mmu_notifier_invalidate_range_start"
			}
			if err := b.attachExtra(spec, name); err != nil {
				sts = append(sts, SourceStatus{Source: k, Err: fmt.Errorf("%s: %w", detail, err)})
				continue
			}
			b.kinds = append(b.kinds, k)
			sts = append(sts, SourceStatus{Source: k, Started: true, Detail: detail})
		}
	}
	if len(b.kinds) == 0 {
		return nil, sts
	}
	rd, err := ringbuf.NewReader(b.core.Events)
	if err != nil {
		b.kinds = nil
		return fail(fmt.Errorf("ebpf: ring buffer reader: %w", err))
	}
	b.rd = rd
	b.btfCache = nil
	go b.read()
	if n.self {
		// Teach exit_brk the current break, so that a later shrink is seen.
		// brk(0) only returns the break: it cannot fail, and the program
		// reads the value, not us.
		_, _, _ = unix.Syscall(unix.SYS_BRK, 0, 0, 0)
	}
	return b, sts
}

// explainBPF adds the likely cause to a permission error.
func explainBPF(err error) error {
	if !errors.Is(err, unix.EPERM) && !errors.Is(err, unix.EACCES) {
		return err
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if unix.Capget(&hdr, &data[0]) == nil {
		has := func(c uint) bool { return data[c/32].Effective&(1<<(c%32)) != 0 }
		const capSysAdmin, capPerfmon, capBPF = 21, 38, 39
		if !has(capSysAdmin) && !(has(capBPF) && has(capPerfmon)) {
			return fmt.Errorf("%w (needs CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN)", err)
		}
	}
	if b, rerr := os.ReadFile("/sys/kernel/security/lockdown"); rerr == nil {
		l := string(b)
		if i, j := strings.IndexByte(l, '['), strings.IndexByte(l, ']'); i >= 0 && j > i && l[i+1:j] != "none" {
			return fmt.Errorf("%w (kernel lockdown is %q; locked-down kernels refuse fentry/fexit)", err, l[i+1:j])
		}
	}
	return fmt.Errorf("%w (a locked-down kernel refuses fentry/fexit)", err)
}

func (b *bpfSource) attachTracepoints(spec *ebpf.CollectionSpec) error {
	for _, tp := range []struct {
		group, name string
		prog        *ebpf.Program
	}{
		{"syscalls", "sys_enter_munmap", b.core.EnterMunmap},
		{"syscalls", "sys_exit_munmap", b.core.ExitMunmap},
		{"syscalls", "sys_enter_mremap", b.core.EnterMremap},
		{"syscalls", "sys_exit_mremap", b.core.ExitMremap},
		{"syscalls", "sys_exit_madvise", b.core.ExitMadvise},
		{"syscalls", "sys_exit_brk", b.core.ExitBrk},
	} {
		l, err := link.Tracepoint(tp.group, tp.name, tp.prog, nil)
		if err != nil {
			return fmt.Errorf("attach tracepoint %s/%s: %w", tp.group, tp.name, explainBPF(err))
		}
		b.links = append(b.links, l)
	}
	b.info = append(b.info, "tracepoints munmap, mremap, madvise, brk (reported at exit)")
	// Exit: tp_btf gives group_dead (the last thread); else the classic
	// tracepoint and the thread group leader's exit.
	if err := b.attachExtra(spec, "process_exit_btf"); err == nil {
		b.info = append(b.info, "tp_btf/sched_process_exit")
	} else {
		l, err := link.Tracepoint("sched", "sched_process_exit", b.core.ProcessExit, nil)
		if err != nil {
			return fmt.Errorf("attach tracepoint sched/sched_process_exit: %w", explainBPF(err))
		}
		b.links = append(b.links, l)
		b.info = append(b.info, "tracepoint sched_process_exit")
	}
	// Fork needs the task's mm to tell a fork from a thread: tp_btf.
	if err := b.attachExtra(spec, "process_fork"); err != nil {
		b.info = append(b.info, fmt.Sprintf("no fork events: tp_btf/sched_process_fork: %v", err))
	} else {
		b.info = append(b.info, "tp_btf/sched_process_fork")
	}
	return nil
}

// attachExtra loads one more program sharing the core's maps and attaches it
// as a BTF tracing program (tp_btf or fentry).
func (b *bpfSource) attachExtra(spec *ebpf.CollectionSpec, name string) error {
	ps, ok := spec.Programs[name]
	if !ok {
		return fmt.Errorf("no program %s", name)
	}
	one := &ebpf.CollectionSpec{
		Maps:      spec.Maps,
		Programs:  map[string]*ebpf.ProgramSpec{name: ps},
		Variables: spec.Variables,
		Types:     spec.Types,
		ByteOrder: spec.ByteOrder,
	}
	coll, err := ebpf.NewCollectionWithOptions(one, ebpf.CollectionOptions{Cache: b.btfCache, MapReplacements: map[string]*ebpf.Map{
		"events": b.core.Events, "ranges": b.core.Ranges, "config": b.core.Config, ".bss": b.core.Bss,
		"calls": b.core.Calls,
	}})
	if err != nil {
		return fmt.Errorf("load: %w", explainBPF(err))
	}
	prog := coll.DetachProgram(name)
	coll.Close()
	l, err := link.AttachTracing(link.TracingOptions{Program: prog})
	if err != nil {
		_ = prog.Close() // best effort: never attached, the attach error is reported
		return fmt.Errorf("attach: %w", explainBPF(err))
	}
	b.extra = append(b.extra, prog)
	b.links = append(b.links, l)
	return nil
}

func (b *bpfSource) kind() Source { return b.kinds[0] }

func (b *bpfSource) detail() string { return strings.Join(b.info, ", ") }

func (b *bpfSource) watch(start, end uintptr, _ pageRange) error { return b.pushRanges() }

// unwatch narrows the ranges map. A failed update leaves the programs
// watching a superset (the old ranges, or every range while the generation
// is odd): more events, never fewer, until the next update rewrites the map.
// Nothing waits for the answer (Remove is void, like
// mmu_interval_notifier_remove), so the failure is counted in Stats.
func (b *bpfSource) unwatch([]pageRange) {
	if err := b.pushRanges(); err != nil {
		b.n.unwatchErrs.Add(1)
	}
}

// pushRanges writes the union of the subscriptions' pages, sorted, into the
// ranges map under the sequence lock. Called with n.mu held.
func (b *bpfSource) pushRanges() error {
	var rs []notifierRange
	b.n.tree.each(func(s *Subscription) {
		st, en := uint64(pageDown(s.start)), uint64(pageUp(s.end))
		if k := len(rs); k > 0 && st <= rs[k-1].End {
			rs[k-1].End = max(rs[k-1].End, en)
			return
		}
		rs = append(rs, notifierRange{Start: st, End: en})
	})
	for len(rs) > bpfMaxRanges {
		// Too many: merge neighbours (a superset watches more, never less).
		out := rs[:0]
		for i := 0; i < len(rs); i += 2 {
			r := rs[i]
			if i+1 < len(rs) {
				r.End = rs[i+1].End
			}
			out = append(out, r)
		}
		rs = out
	}
	// Only this function writes the config (under n.mu): keep it here.
	c := notifierConf{N: uint64(b.nranges), Gen: b.gen + 1} // odd: the programs treat every range as watched
	if err := b.core.Config.Update(uint32(0), &c, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("ebpf: config: %w", err)
	}
	if len(rs) > 0 {
		keys := make([]uint32, len(rs))
		for i := range keys {
			keys[i] = uint32(i)
		}
		if _, err := b.core.Ranges.BatchUpdate(keys, rs, nil); err != nil {
			for i := range rs { // kernels without batch ops on arrays
				if err := b.core.Ranges.Update(keys[i], &rs[i], ebpf.UpdateAny); err != nil {
					return fmt.Errorf("ebpf: ranges: %w", err)
				}
			}
		}
	}
	c.N = uint64(len(rs))
	c.Gen++
	if err := b.core.Config.Update(uint32(0), &c, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("ebpf: config: %w", err)
	}
	b.gen, b.nranges = c.Gen, len(rs)
	return nil
}

func (b *bpfSource) read() {
	defer close(b.done)
	var rec ringbuf.Record
	evs := make([]Event, 0, 64)
	for {
		if err := b.rd.ReadInto(&rec); err != nil {
			if errors.Is(err, ringbuf.ErrClosed) || errors.Is(err, os.ErrClosed) {
				return
			}
			continue
		}
		evs = evs[:0]
		var marker uint64
		for {
			if ev, m, ok := b.parse(rec.RawSample); ok {
				evs = append(evs, ev)
			} else if m != 0 {
				marker = max(marker, m)
			}
			if len(evs) == cap(evs) || b.rd.AvailableBytes() == 0 {
				break
			}
			if err := b.rd.ReadInto(&rec); err != nil {
				break
			}
		}
		var lost uint64
		if err := b.core.Lost.Get(&lost); err == nil && lost != b.lastLost {
			b.lastLost = lost
			evs = append(evs, Event{Kind: EventOverflow, Start: 0, End: ^uintptr(0), Source: b.kinds[0]})
		}
		b.n.post(evs)
		if marker != 0 {
			b.mu.Lock()
			if marker > b.seen {
				b.seen = marker
				close(b.seenCh)
				b.seenCh = make(chan struct{})
			}
			b.mu.Unlock()
		}
	}
}

func (b *bpfSource) parse(raw []byte) (ev Event, marker uint64, ok bool) {
	// struct event as bpf2go generated it from bpf/notifier.c.
	var rec notifierEvent
	if _, err := binary.Decode(raw, binary.LittleEndian, &rec); err != nil {
		return Event{}, 0, false
	}
	start, end, aux := uintptr(rec.Start), uintptr(rec.End), rec.Aux
	kind, origin := rec.Kind, rec.Origin
	src := SourceTracepoint
	switch origin {
	case bpfOrigKVM:
		src = SourceKVM
	case bpfOrigFentry:
		src = SourceFentry
	}
	ev = Event{Start: start, End: end, Source: src}
	switch kind {
	case bpfEvUnmap:
		ev.Kind = EventUnmap
	case bpfEvRemove:
		ev.Kind = EventRemove
	case bpfEvRemap:
		ev.Kind, ev.To = EventRemap, uintptr(aux)
	case bpfEvFork:
		ev.Kind = EventFork
	case bpfEvExit:
		ev.Kind = EventExit
	case bpfEvKernel:
		ev.Kind = EventKernel
	case bpfEvMarker:
		return Event{}, aux, false
	default:
		return Event{}, 0, false
	}
	return ev, 0, true
}

// sync sends a marker through the ring: a madvise with an invalid advice
// (the kernel refuses it and does nothing) that the program reports. Events
// that happened before it were written to the ring before it.
func (b *bpfSource) sync(ctx context.Context) error {
	seq := b.marker()
	retry := time.NewTimer(100 * time.Millisecond)
	defer retry.Stop()
	for {
		b.mu.Lock()
		seen, ch := b.seen, b.seenCh
		b.mu.Unlock()
		if seen >= seq {
			return nil
		}
		select {
		case <-ch:
		case <-retry.C:
			// A full ring drops the marker too: send another; any later
			// marker orders everything before it as well.
			b.marker()
			retry.Reset(100 * time.Millisecond)
		case <-b.done:
			return ErrClosed
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (b *bpfSource) marker() uint64 {
	seq := b.markerNext.Add(1)
	// The kernel refuses the invalid advice (EINVAL), as intended: the
	// program has seen the call by then.
	_, _, _ = unix.Syscall(unix.SYS_MADVISE, uintptr(b.cookie), uintptr(seq), bpfMarkerAdvice)
	return seq
}

// closeObjects detaches the links still held and closes the programs, the
// maps and the KVM VM.
func (b *bpfSource) closeObjects() error {
	var errs []error
	for _, l := range b.links {
		errs = append(errs, l.Close())
	}
	b.links = nil
	for _, p := range b.extra {
		errs = append(errs, p.Close())
	}
	b.extra = nil
	for _, p := range []*ebpf.Program{b.core.EnterMunmap, b.core.EnterMremap, b.core.EnterMadvise,
		b.core.ExitMunmap, b.core.ExitMremap, b.core.ExitMadvise, b.core.ExitBrk, b.core.ProcessExit} {
		if p != nil {
			errs = append(errs, p.Close())
		}
	}
	for _, m := range []*ebpf.Map{b.core.Events, b.core.Ranges, b.core.Config, b.core.Calls, b.core.Bss} {
		if m != nil {
			errs = append(errs, m.Close())
		}
	}
	if b.kvm >= 0 {
		errs = append(errs, unix.Close(b.kvm))
		b.kvm = -1
	}
	return errors.Join(errs...)
}

func (b *bpfSource) close() error {
	b.closeOnce.Do(func() {
		// Detach first so nothing new is written, then stop the reader.
		// Each detach waits for an RCU grace period: overlap them.
		var wg sync.WaitGroup
		errs := make([]error, len(b.links))
		for i, l := range b.links {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[i] = l.Close()
			}()
		}
		wg.Wait()
		b.links = nil
		if b.rd != nil {
			errs = append(errs, b.rd.Close())
			<-b.done
		}
		errs = append(errs, b.closeObjects())
		b.closeErr = errors.Join(errs...)
	})
	return b.closeErr
}

// bpfSCMadvise is SC_MADVISE of bpf/notifier.c: the calls map's tag of a
// madvise remembered at entry and forgotten at exit.
const bpfSCMadvise = 3

// inFlight reports whether a madvise of this process that covers
// [start, end) has entered and not yet returned: enter_madvise remembers
// the calls of watched ranges in the calls map by thread id, and
// exit_madvise deletes the entry whether the call succeeded or not.
func (b *bpfSource) inFlight(start, end uintptr) (bool, error) {
	var (
		tid uint32
		c   notifierCall
	)
	it := b.core.Calls.Iterate()
	for it.Next(&tid, &c) {
		if c.Sc != bpfSCMadvise {
			continue
		}
		lo := uintptr(c.Args[0])
		hi := lo + (uintptr(c.Args[1])+uintptr(os.Getpagesize())-1)&^uintptr(os.Getpagesize()-1)
		if lo <= start && end <= hi {
			return true, nil
		}
	}
	if err := it.Err(); err != nil {
		return false, fmt.Errorf("ebpf: calls map: %w", err)
	}
	return false, nil
}
