package main

// hfictl bench tid: the TID cache figures of issue 5, measured in one run on
// one device. Every operation is timed on its own (time.Now around the
// call) over N iterations and reported as median and p90, with the ratios
// and targets the issue names. Expected-receive bandwidth and latency are
// bench expected's (bench_perf.go).

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/mem"
	"github.com/gohfi/gohfi/rcvarray"
	"github.com/gohfi/gohfi/tidcache"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// Targets of issue 5.
const (
	targetHit      = 200 * time.Nanosecond // a cache hit
	targetMiss1M   = 150 * time.Microsecond
	targetMissRate = 100 // a 1 MiB miss costs at least this many hits
	memlockWant    = 1 << 30
)

type benchTIDConfig struct {
	sizes []int
	iters int
}

// parseSizes reads a comma-separated list of page-multiple sizes.
func parseSizes(list string) ([]int, error) {
	sizes, err := parseSizeList(list)
	if err != nil {
		return nil, err
	}
	for _, n := range sizes {
		if n%mem.PageSize() != 0 {
			return nil, usageErr("size %d: want a positive multiple of the page size", n)
		}
	}
	return sizes, nil
}

// parseSizeList reads a comma-separated list of positive sizes.
func parseSizeList(list string) ([]int, error) {
	var sizes []int
	for _, f := range strings.Split(list, ",") {
		n, err := parseSize("size", strings.TrimSpace(f))
		if err != nil {
			return nil, err
		}
		if n <= 0 {
			return nil, usageErr("size %q: want a positive size", f)
		}
		sizes = append(sizes, n)
	}
	return sizes, nil
}

func benchTID(s *session, args []string) (_ obj, err error) {
	fs := newFlags("bench")
	sizesArg := fs.String("sizes", "4k,64k,1m,16m", "buffer sizes for hit, miss, free and no cache")
	iters := fs.Int("iters", 200, "timed iterations per operation and size")
	if _, err := parseArgs(fs, args, 0, 0); err != nil {
		return nil, err
	}
	sizes, err := parseSizes(*sizesArg)
	if err != nil {
		return nil, err
	}
	if *iters < 1 {
		return nil, usageErr("--iters must be at least 1")
	}
	cfg := benchTIDConfig{sizes: sizes, iters: *iters}

	if s.att == nil && s.opts.Sim.RcvArrayPerCtxt > rcvarray.MaxTIDEntries {
		// A TID names its entry with a 10-bit pair index: entries past
		// 2047 of a context cannot be handed out.
		return nil, usageErr("--rcvarray %d: a TID can name at most %d entries per context",
			s.opts.Sim.RcvArrayPerCtxt, rcvarray.MaxTIDEntries)
	}
	restore, memlock, err := s.benchDevice()
	if err != nil {
		return nil, err
	}
	defer cleanup(&err, "restoring RLIMIT_MEMLOCK", restore)
	b, err := newTIDBench(s, cfg)
	if err != nil {
		return nil, err
	}
	defer cleanup(&err, "", b.close)
	o := obj{{"device", s.spec}, {"rcvarray_per_ctxt", b.rcvtids}, {"iters", cfg.iters}, {"memlock", memlock}}
	if err := b.run(&o); err != nil {
		return nil, err
	}
	return o, nil
}

// benchDevice prepares a bench run: RLIMIT_MEMLOCK raised (raiseMemlock;
// restore puts it back, so that the shell goes on with the limit it had)
// and the device attached with at least two contexts (a sender and a
// receiver) unless it already is.
func (s *session) benchDevice() (restore func() error, memlock obj, err error) {
	restore, memlock, honour := raiseMemlock()
	if s.att == nil {
		o := s.opts
		o.Sim.NumContexts = max(o.Sim.NumContexts, 2)
		o.Params.HonorCapIPCLock = o.Params.HonorCapIPCLock || honour
		a, err := attach.Open(s.ctx, s.spec, o)
		if err != nil {
			cleanup(&err, "restoring RLIMIT_MEMLOCK", restore)
			return nil, nil, err
		}
		s.att = a
	} else if honour && !s.att.Module.Params().HonorCapIPCLock {
		memlock.add("note", "device attached before bench: RLIMIT_MEMLOCK applies as it is")
	}
	return restore, memlock, nil
}

// raiseMemlock lifts RLIMIT_MEMLOCK to 1 GiB when it may (root with
// CAP_SYS_RESOURCE). Where the hard limit stays lower but the process has
// CAP_IPC_LOCK, it asks for the module parameter HonorCapIPCLock instead,
// as the kernel exempts CAP_IPC_LOCK from the limit.
func raiseMemlock() (restore func() error, info obj, honour bool) {
	restore = func() error { return nil }
	var old unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_MEMLOCK, &old); err != nil {
		return restore, obj{{"error", err.Error()}}, false
	}
	cur := old.Cur
	if os.Geteuid() == 0 && cur != unix.RLIM_INFINITY && cur < memlockWant {
		err := unix.Setrlimit(unix.RLIMIT_MEMLOCK, &unix.Rlimit{Cur: memlockWant, Max: max(old.Max, memlockWant)})
		if err != nil && old.Max > cur {
			err = unix.Setrlimit(unix.RLIMIT_MEMLOCK, &unix.Rlimit{Cur: old.Max, Max: old.Max})
		}
		if err == nil {
			restore = func() error { return unix.Setrlimit(unix.RLIMIT_MEMLOCK, &old) }
			// The limit as it is now, for the report and for honour.
			var now unix.Rlimit
			if err := unix.Getrlimit(unix.RLIMIT_MEMLOCK, &now); err != nil {
				return restore, obj{{"error", fmt.Sprintf("getrlimit after raising it: %v", err)}}, false
			}
			cur = now.Cur
		}
	}
	limit := any(cur)
	if cur == unix.RLIM_INFINITY {
		limit = "unlimited"
	}
	honour = cur != unix.RLIM_INFINITY && cur < memlockWant && hasCapIPCLock()
	return restore, obj{{"limit", limit}, {"honor_cap_ipc_lock", honour}}, honour
}

// capIPCLock is CAP_IPC_LOCK (include/uapi/linux/capability.h).
const capIPCLock = 14

func hasCapIPCLock() bool {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return false
	}
	defer func() { _ = f.Close() }() // read-only: nothing a close could lose
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "CapEff:"); ok {
			caps, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && caps&(1<<capIPCLock) != 0
		}
	}
	return false
}

// tidBench is one run: a receiver context of the device.
type tidBench struct {
	s       *session
	cfg     benchTIDConfig
	rx      *openFile
	rcvtids int
}

func newTIDBench(s *session, cfg benchTIDConfig) (*tidBench, error) {
	f, err := s.att.Device.Open()
	if err != nil {
		return nil, err
	}
	b := &tidBench{s: s, cfg: cfg, rx: &openFile{name: "bench-rx", f: f}}
	if err := s.assign(b.rx, uapi.Hfi1UserInfo{Userversion: uapi.HFI1_USER_SWVERSION}); err != nil {
		return nil, errors.Join(fmt.Errorf("%s: %w", b.rx.name, err), b.close())
	}
	b.rcvtids = int(b.rx.ci.Rcvtids)
	return b, nil
}

// close closes the file, releasing its context.
func (b *tidBench) close() error { return closeFiles(b.rx) }

// samples are the times of one operation.
type samples []time.Duration

// quantile is the nearest-rank q-quantile; the median of an even count is
// the mean of the middle two.
func (d samples) quantile(q float64) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	n := len(s)
	if n == 0 {
		return 0
	}
	if q == 0.5 && n%2 == 0 {
		return (s[n/2-1] + s[n/2]) / 2
	}
	return s[max(0, int(math.Ceil(q*float64(n)))-1)]
}

// nanos prints a duration in its unit to people and as nanoseconds in JSON.
type nanos float64

func (n nanos) String() string {
	switch {
	case n < 1e3:
		return fmt.Sprintf("%.0fns", float64(n))
	case n < 1e6:
		return fmt.Sprintf("%.1fus", float64(n)/1e3)
	}
	return fmt.Sprintf("%.2fms", float64(n)/1e6)
}

func ns(d time.Duration) nanos { return nanos(d.Nanoseconds()) }

// ratio prints as "123x".
type ratio float64

func (r ratio) String() string {
	switch {
	case r >= 10:
		return fmt.Sprintf("%.0fx", float64(r))
	case r > 0 && r < 0.1:
		return fmt.Sprintf("%.4fx", float64(r))
	}
	return fmt.Sprintf("%.2fx", float64(r))
}

func ratioOf(a, b time.Duration) ratio {
	if b <= 0 {
		return 0
	}
	return ratio(float64(a) / float64(b))
}

// gbps is bytes per second, shown in GB/s (10^9).
type gbps float64

func (g gbps) String() string {
	v := float64(g) / 1e9
	switch {
	case v < 0.001:
		return fmt.Sprintf("%.6fGB/s", v)
	case v < 0.1:
		return fmt.Sprintf("%.4fGB/s", v)
	}
	return fmt.Sprintf("%.2fGB/s", v)
}

func rate(bytes int, d time.Duration) gbps {
	if d <= 0 {
		return 0
	}
	return gbps(float64(bytes) / d.Seconds())
}

// table is a list of rows: a JSON array of objects, or aligned columns for
// people.
type table []obj

func (t table) MarshalJSON() ([]byte, error) { return json.Marshal([]obj(t)) }

func (t table) String() string {
	if len(t) == 0 {
		return "(none)"
	}
	cols := t[0]
	width := make([]int, len(cols))
	cells := make([][]string, len(t))
	for i, f := range cols {
		width[i] = len(f.key)
	}
	for r, row := range t {
		for i, f := range row {
			c := human(f.val)
			cells[r] = append(cells[r], c)
			if i < len(width) {
				width[i] = max(width[i], len(c))
			}
		}
	}
	var sb strings.Builder
	line := func(vals []string) {
		sb.WriteString("\n  ")
		for i, v := range vals {
			if i == len(vals)-1 {
				sb.WriteString(v)
				break
			}
			fmt.Fprintf(&sb, "%-*s  ", width[i], v)
		}
	}
	head := make([]string, len(cols))
	for i, f := range cols {
		head[i] = f.key
	}
	line(head)
	for _, c := range cells {
		line(c)
	}
	return sb.String()
}

// sizeLabel names a size in binary units.
func sizeLabel(n int) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%dMiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%dKiB", n>>10)
	}
	return strconv.Itoa(n) + "B"
}

// sizeResult holds one size's samples.
type sizeResult struct {
	size, windows            int
	hit, miss, free, nocache samples
}

func (b *tidBench) run(o *obj) error {
	n := b.cfg.iters
	timer := make(samples, n)
	for i := range timer {
		t0 := time.Now()
		timer[i] = time.Since(t0)
	}
	o.add("timer_overhead_ns", ns(timer.quantile(0.5)))

	var results []sizeResult
	for _, size := range b.cfg.sizes {
		r, err := b.tidOps(size)
		if err != nil {
			return fmt.Errorf("%s: %w", sizeLabel(size), err)
		}
		results = append(results, r)
	}
	var lat, ratios table
	for _, r := range results {
		for _, op := range []struct {
			name string
			d    samples
		}{{"hit", r.hit}, {"miss", r.miss}, {"free", r.free}, {"nocache", r.nocache}} {
			lat = append(lat, obj{{"op", op.name}, {"size", sizeLabel(r.size)}, {"windows", r.windows},
				{"median_ns", ns(op.d.quantile(0.5))}, {"p90_ns", ns(op.d.quantile(0.9))}, {"n", len(op.d)}})
		}
		hit := r.hit.quantile(0.5)
		ratios = append(ratios, obj{{"size", sizeLabel(r.size)},
			{"miss_per_hit", ratioOf(r.miss.quantile(0.5), hit)},
			{"nocache_per_hit", ratioOf(r.nocache.quantile(0.5), hit)},
			{"nocache_per_miss", ratioOf(r.nocache.quantile(0.5), r.miss.quantile(0.5))}})
	}
	o.add("latency", lat).add("ratios", ratios)

	var targets table
	pass := true
	target := func(name string, value, limit any, ok bool) {
		targets = append(targets, obj{{"target", name}, {"value", value}, {"limit", limit}, {"pass", ok}})
		pass = pass && ok
	}
	for _, r := range results {
		h := r.hit.quantile(0.5)
		target("hit "+sizeLabel(r.size)+" median <", ns(h), ns(targetHit), h < targetHit)
	}
	for _, r := range results {
		if r.size != 1<<20 {
			continue
		}
		m, h := r.miss.quantile(0.5), r.hit.quantile(0.5)
		target("miss 1MiB / hit 1MiB >=", ratioOf(m, h), ratio(targetMissRate), float64(ratioOf(m, h)) >= targetMissRate)
		target("miss 1MiB median <", ns(m), ns(targetMiss1M), m < targetMiss1M)
	}
	o.add("targets", targets).add("pass", pass)
	return nil
}

// windows splits [0, size) into the pieces one TID_UPDATE may register: at
// most the context's RcvArray entries in pages (hfi1 refuses more pages than
// its expected count), as PSM registers large receives window by window.
func (b *tidBench) windows(size int) [][2]int {
	max := b.rcvtids * mem.PageSize()
	var w [][2]int
	for off := 0; off < size; off += max {
		w = append(w, [2]int{off, min(max, size-off)})
	}
	return w
}

// tidOps measures hit, miss, free (TID_FREE of an idle entry) and no cache
// for one buffer size.
func (b *tidBench) tidOps(size int) (r sizeResult, err error) {
	buf, err := mem.Alloc(size)
	if err != nil {
		return r, err
	}
	defer cleanup(&err, "unmapping the buffer", buf.Close)
	c, err := tidcache.New(b.rx.f, tidcache.Options{})
	if err != nil {
		return r, err
	}
	// Close frees the idle entries' TIDs: a failure leaves them programmed.
	defer cleanup(&err, "closing the TID cache", c.Close)
	win := b.windows(size)
	r.size, r.windows = size, len(win)
	ents := make([]*tidcache.Entry, len(win))
	acquire := func() error {
		for i, w := range win {
			e, err := c.Acquire(buf.Addr()+uintptr(w[0]), w[1])
			if err != nil {
				errs := []error{err}
				for _, e := range ents[:i] {
					errs = append(errs, c.Release(e))
				}
				return errors.Join(errs...)
			}
			ents[i] = e
		}
		return nil
	}
	release := func() error {
		var errs []error
		for _, e := range ents {
			errs = append(errs, c.Release(e))
		}
		return errors.Join(errs...)
	}
	n := b.cfg.iters

	// Hit: the buffer is registered once, then every Acquire finds it.
	if err := acquire(); err != nil {
		return r, err
	}
	if err := release(); err != nil {
		return r, err
	}
	before := c.Stats()
	r.hit = make(samples, n)
	for i := range r.hit {
		t0 := time.Now()
		err := acquire()
		r.hit[i] = time.Since(t0)
		if err != nil {
			return r, err
		}
		if err := release(); err != nil {
			return r, err
		}
	}
	if st := c.Stats(); st.Misses != before.Misses || st.Hits-before.Hits != uint64(n*len(win)) {
		return r, fmt.Errorf("hit loop: cache stats %+v after %+v: not all hits", st, before)
	}
	// Else the first "miss" would be a hit.
	if err := c.Flush(); err != nil {
		return r, fmt.Errorf("flush after the hit loop: %w", err)
	}

	// Miss: Acquire of a buffer the cache freed (TID_UPDATE); then free:
	// the Flush of the idle entry (TID_FREE).
	r.miss, r.free = make(samples, n), make(samples, n)
	for i := range r.miss {
		if err := b.s.ctx.Err(); err != nil {
			return r, err
		}
		t0 := time.Now()
		err := acquire()
		r.miss[i] = time.Since(t0)
		if err != nil {
			return r, err
		}
		if err := release(); err != nil {
			return r, err
		}
		t0 = time.Now()
		err = c.Flush()
		r.free[i] = time.Since(t0)
		if err != nil {
			return r, fmt.Errorf("free: %w", err)
		}
	}

	// No cache: register and free around every receive.
	r.nocache = make(samples, n)
	for i := range r.nocache {
		if err := b.s.ctx.Err(); err != nil {
			return r, err
		}
		t0 := time.Now()
		err := acquire()
		if err == nil {
			err = release()
		}
		ferr := c.Flush()
		r.nocache[i] = time.Since(t0)
		if ferr != nil {
			err = errors.Join(err, fmt.Errorf("free: %w", ferr))
		}
		if err != nil {
			return r, err
		}
	}
	if st := c.Stats(); st.Frees != st.Misses {
		return r, fmt.Errorf("cache stats %+v: a TID was not freed", st)
	}
	return r, nil
}
