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
	"github.com/gohfi/gohfi/uapi"
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
