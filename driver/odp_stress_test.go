package driver_test

import (
	"bytes"
	"encoding/binary"
	"math/rand"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/userfault"
	"golang.org/x/sys/unix"
)

// TestODPPinBudget: an ODP MR of 64 MiB is written in full, 1 MiB per RDMA
// WRITE, through an RLIMIT_MEMLOCK of 8 MiB: faults past the limit evict
// the least recently faulted pages of the file's ODP MRs; every byte
// lands, the pinned pages never pass the limit, evictions are counted as
// invalidations and all of them are handled.
func TestODPPinBudget(t *testing.T) {
	a, l := startODP(t)
	const (
		size  = 64 << 20
		limit = 8 << 20
		chunk = 1 << 20
	)
	var old unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_MEMLOCK, &old); err != nil {
		t.Fatal(err)
	}
	if err := unix.Setrlimit(unix.RLIMIT_MEMLOCK, &unix.Rlimit{Cur: limit, Max: old.Max}); err != nil {
		t.Skipf("cannot set RLIMIT_MEMLOCK: %v", err)
	}
	t.Cleanup(func() { unix.Setrlimit(unix.RLIMIT_MEMLOCK, &old) })
	src, dst := allocBuf(t, chunk, false), allocBuf(t, size, false)
	ms := l.reg(l.qa.f, src.Addr(), chunk, pinAccess)
	md := l.reg(l.qb.f, dst.Addr(), size, odpAccess)
	maxPinned := uint64(0)
	for off := 0; off < size; off += chunk {
		fill(src.Bytes(), byte(off/chunk))
		wantOK(t, "WRITE", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(src.Addr(), chunk, ms), dst.Addr()+uintptr(off), md.Rkey))
		s := l.stats(l.qb.f, md)
		maxPinned = max(maxPinned, s.PagesPinned)
	}
	want := make([]byte, chunk)
	for off := 0; off < size; off += chunk {
		fill(want, byte(off/chunk))
		if !bytes.Equal(dst.Bytes()[off:off+chunk], want) {
			t.Fatalf("MiB %d differs", off/chunk)
		}
	}
	if err := a.Device.ODPFence(); err != nil {
		t.Fatal(err)
	}
	s := l.stats(l.qb.f, md)
	t.Logf("64 MiB through 8 MiB: %+v, at most %d pages pinned", s, maxPinned)
	if maxPinned*4096 > limit || s.PageInvalidations < (size-limit)/4096 || s.PageInvalidationsHandled != s.PageInvalidations {
		t.Fatalf("budget not kept or evictions not counted: %+v, max pinned %d pages", s, maxPinned)
	}
}

// TestODPFaultRacesInvalidation: an invalidation that lands while a fault
// pins the old pages (between read_begin and read_retry) makes the fault
// start over: the WRITE lands in the new mapping, never in the old pages.
func TestODPFaultRacesInvalidation(t *testing.T) {
	a, l := startODP(t)
	const n = 64 << 10
	src, dst := allocBuf(t, n, false), allocBuf(t, n, false)
	ms := l.reg(l.qa.f, src.Addr(), n, pinAccess)
	md := l.reg(l.qb.f, dst.Addr(), n, odpAccess)
	var raced atomic.Int32
	driver.SetODPFaultHook(a.Module, func() {
		if raced.Add(1) == 1 {
			if err := mmapFixed(dst.Addr(), n, unix.PROT_READ|unix.PROT_WRITE); err != nil {
				t.Error(err)
			}
		}
	})
	defer driver.SetODPFaultHook(a.Module, nil)
	fill(src.Bytes(), 7)
	wantOK(t, "WRITE", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(src.Addr(), n, ms), dst.Addr(), md.Rkey))
	if raced.Load() < 2 {
		t.Fatalf("the fault ran %d times, want a retry", raced.Load())
	}
	if !bytes.Equal(unsafeSlice(dst.Addr(), n), src.Bytes()) {
		t.Fatal("WRITE did not land in the mapping that replaced the old one")
	}
}

// TestODPStressNoStaleEntry: WRITEs and READs into an ODP MR race random
// mmap(MAP_FIXED) replacements and MADV_DONTNEEDs of its pages for a while;
// the invalidations stop a little before the operations, so pages faulted
// during the race stay mapped; then, once the invalidations are flushed,
// every page the device can
// reach (MTT or TLB present) must be the page the process has there: present
// in /proc/self/pagemap, and holding the token the CPU just wrote.
func TestODPStressNoStaleEntry(t *testing.T) {
	a, l := startODP(t)
	if a.Sim == nil {
		t.Skip("needs the embedded device's view (PeekMR)")
	}
	const n = 2 << 20
	src, dst := allocBuf(t, n, false), allocBuf(t, n, false)
	ms := l.reg(l.qa.f, src.Addr(), n, pinAccess)
	md := l.reg(l.qb.f, dst.Addr(), n, odpAccess)
	pm, err := os.Open("/proc/self/pagemap")
	if err != nil {
		t.Skip(err)
	}
	defer pm.Close()
	dur := 2 * time.Second
	if testing.Short() {
		dur = 300 * time.Millisecond
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // the invalidations, for 80% of the time
		defer wg.Done()
		rng := rand.New(rand.NewSource(2))
		for end := time.Now().Add(dur * 4 / 5); time.Now().Before(end); {
			select {
			case <-stop:
				return
			default:
			}
			p := rng.Intn(n / 4096)
			k := 1 + rng.Intn(min(64, n/4096-p))
			addr := dst.Addr() + uintptr(p*4096)
			if rng.Intn(2) == 0 {
				mmapFixed(addr, k*4096, unix.PROT_READ|unix.PROT_WRITE)
			} else {
				madvise(addr, k*4096, unix.MADV_DONTNEED)
			}
			time.Sleep(time.Duration(rng.Intn(2000)) * time.Microsecond)
		}
	}()
	rng := rand.New(rand.NewSource(3))
	ops := 0
	for deadline := time.Now().Add(dur); time.Now().Before(deadline); ops++ {
		off := rng.Intn(n - 1)
		size := 1 + rng.Intn(min(n-off, 256<<10))
		opc := uint32(uapi.GOHFI_WR_RDMA_WRITE)
		if ops%2 == 1 {
			opc = uapi.GOHFI_WR_RDMA_READ
		}
		wantOK(t, "op", l.op(opc, sg(src.Addr()+uintptr(off), size, ms), dst.Addr()+uintptr(off), md.Rkey))
	}
	close(stop)
	wg.Wait()
	if err := a.Device.SyncNotifier(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := a.Device.ODPFence(); err != nil {
		t.Fatal(err)
	}
	view := unsafeSlice(dst.Addr(), n)
	present, checked := 0, 0
	var tok [8]byte
	for p := 0; p < n/4096; p++ {
		addr := dst.Addr() + uintptr(p*4096)
		_, inProc := pageFrame(t, pm, addr)
		var dev [4096]byte
		onDev, err := a.Sim.Device.PeekMR(md.Rkey, uint64(addr), dev[:8])
		if err != nil {
			t.Fatal(err)
		}
		if !onDev {
			continue
		}
		present++
		if !inProc {
			t.Fatalf("page %d: the device maps it, the process has no page there (stale entry)", p)
		}
		binary.LittleEndian.PutUint64(tok[:], uint64(p)<<32|uint64(rng.Uint32()))
		copy(view[p*4096:], tok[:])
		if _, err := a.Sim.Device.PeekMR(md.Rkey, uint64(addr), dev[:8]); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(dev[:8], tok[:]) {
			t.Fatalf("page %d: the device reaches another page than the process's (stale entry)", p)
		}
		checked++
	}
	s := l.stats(l.qb.f, md)
	t.Logf("%d operations; %d of %d pages mapped on the device at the end, all the process's; %+v", ops, present, n/4096, s)
	if s.PageInvalidations == 0 {
		t.Fatal("no invalidation reached the MR")
	}
}

// TestODPDontneedRaceWindow: userfaultfd reports MADV_DONTNEED (REMOVE)
// before the kernel drops the pages. A device fault that starts once the
// REMOVE was delivered, while the kernel is still zapping, must not pin
// and map the pages about to go (the device would keep a page the process
// no longer has). The window is held open: the ODP MR is the last 64 KiB
// of a 512 MiB mapping whose pages are all present, the madvise covers
// all of it (the kernel zaps in address order, so the MR's pages go last,
// tens of milliseconds later), and the Invalidate hook posts a device
// WRITE into the MR as soon as the REMOVE is delivered. A trial counts if
// that WRITE was posted before madvise returned; after it returned, a
// second WRITE must be seen by the CPU. Without the REMOVE hold
// (userfault's invalidate_range_end) most such trials fail.
func TestODPDontneedRaceWindow(t *testing.T) {
	a, l := startODP(t)
	const (
		big    = 512 << 20
		n      = 64 << 10
		want   = 3  // trials in the window
		trials = 30 // at most: a loaded machine lands fewer trials in the window
	)
	src, buf := allocBuf(t, n, false), allocBuf(t, big, false)
	if err := madvise(buf.Addr(), big, unix.MADV_NOHUGEPAGE); err != nil {
		t.Fatal(err)
	}
	ms := l.reg(l.qa.f, src.Addr(), n, pinAccess)
	dst := buf.Addr() + big - n
	md := l.reg(l.qb.f, dst, n, odpAccess)
	view := unsafeSlice(dst, n)
	zeros := make([]byte, n)
	defer driver.SetODPInvalidateHook(a.Module, nil)
	inWindow := 0
	for trial := 0; trial < trials && inWindow < want; trial++ {
		fill(buf.Bytes(), 1) // every page present: the zap has work to do
		fill(src.Bytes(), 2)
		wantOK(t, "WRITE before", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(src.Addr(), n, ms), dst, md.Rkey))
		fill(src.Bytes(), 3)
		done := make(chan uapi.GohfiWC, 1)
		var posted atomic.Int64
		var once sync.Once
		driver.SetODPInvalidateHook(a.Module, func(ev userfault.Event) {
			if ev.Kind != userfault.EventRemove {
				return
			}
			once.Do(func() {
				go func() { // not on the dispatcher: POST_SEND waits for it
					w := hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: 9, Opcode: uapi.GOHFI_WR_RDMA_WRITE,
						SendFlags: uapi.GOHFI_SEND_SIGNALED, RemoteAddr: uint64(dst), Rkey: md.Rkey}, SGL: sg(src.Addr(), n, ms)}
					if _, err := hfiuser.PostSend(l.qa.f, l.qa.qp, []hfiuser.SendWR{w}); err != nil {
						t.Errorf("POST_SEND in the window: %v", err)
						done <- uapi.GohfiWC{Status: ^uint32(0)}
						return
					}
					posted.Store(time.Now().UnixNano())
					done <- pollWC(t, l.qa.f, l.qa.cq, 1)[0]
				}()
			})
		})
		if err := madvise(buf.Addr(), big, unix.MADV_DONTNEED); err != nil {
			t.Fatal(err)
		}
		returned := time.Now().UnixNano()
		var wc uapi.GohfiWC
		select {
		case wc = <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("the WRITE posted in the window did not complete")
		}
		driver.SetODPInvalidateHook(a.Module, nil)
		wantOK(t, "WRITE in the window", wc)
		// It raced the madvise: it landed before the pages went (zeros
		// now) or in the new pages (3s), nothing else.
		if !bytes.Equal(view, src.Bytes()) && !bytes.Equal(view, zeros) {
			t.Fatal("the WRITE in the window left neither its data nor zeros")
		}
		if posted.Load() < returned {
			inWindow++
		}
		fill(src.Bytes(), 4)
		wantOK(t, "WRITE after madvise", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(src.Addr(), n, ms), dst, md.Rkey))
		if !bytes.Equal(view, src.Bytes()) {
			t.Fatalf("trial %d (WRITE posted %v before madvise returned): a WRITE posted after madvise(DONTNEED) returned did not reach the process's pages; the device kept a page the kernel dropped",
				trial, time.Duration(returned-posted.Load()))
		}
	}
	if inWindow < want {
		t.Fatalf("only %d of %d trials posted the WRITE before madvise returned", inWindow, trials)
	}
}
