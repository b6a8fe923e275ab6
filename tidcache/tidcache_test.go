package tidcache_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"github.com/gohfi/gohfi/internal/testenv"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/mem"
	"github.com/gohfi/gohfi/tidcache"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// requireRoot: TID caching needs userfaultfd and io_uring pins.
func requireRoot(tb testing.TB) {
	tb.Helper()
	testenv.RequireRoot(tb, "userfaultfd and io_uring pins")
}

func ptr(b []byte) driver.UserPtr { return driver.UserPtrOf(&b[0]) }

type env struct {
	a      *attach.Attached
	tx, rx *driver.File
	cache  *tidcache.Cache
	rhq    []byte
	next   int
}

func setup(tb testing.TB, perCtxt int) *env { return setupWith(tb, perCtxt, false) }

// setupWith can let the module honour CAP_IPC_LOCK (benchmarks pin more than
// the default RLIMIT_MEMLOCK, which root here may not raise).
func setupWith(tb testing.TB, perCtxt int, honourCapIPCLock bool) *env {
	tb.Helper()
	requireRoot(tb)
	o := attach.DefaultOptions()
	o.Params.HonorCapIPCLock = honourCapIPCLock
	o.Sim.NumContexts = 2
	o.Sim.RcvArrayPerCtxt = perCtxt
	a, err := attach.Open(context.Background(), "embedded", o)
	if err != nil {
		tb.Fatal(err)
	}
	e := &env{a: a}
	tb.Cleanup(func() { a.Close() })
	for _, f := range []**driver.File{&e.tx, &e.rx} {
		if *f, err = a.Device.Open(); err != nil {
			tb.Fatal(err)
		}
		ui := uapi.Hfi1UserInfo{Userversion: uapi.HFI1_USER_SWVERSION}
		b := make([]byte, ui.SizeBytes())
		ui.MarshalBytes(b)
		if _, err := (*f).Ioctl(uapi.HFI1_IOCTL_ASSIGN_CTXT, ptr(b)); err != nil {
			tb.Fatal(err)
		}
	}
	if e.cache, err = tidcache.New(e.rx, tidcache.Options{}); err != nil {
		tb.Fatal(err)
	}
	var bi uapi.Hfi1BaseInfo
	b := make([]byte, bi.SizeBytes())
	if _, err := e.rx.Ioctl(uapi.HFI1_IOCTL_USER_INFO, ptr(b)); err != nil {
		tb.Fatal(err)
	}
	bi.UnmarshalBytes(b)
	if e.rhq, err = e.rx.Mmap(bi.RcvhdrBufbase, a.Module.Params().RcvHdrCnt*uapi.SizeofGohfiRHQEntry, unix.PROT_READ); err != nil {
		tb.Fatal(err)
	}
	return e
}

// send puts data into the entry's TIDs (receiver is context 1) and waits
// for every header entry.
func (e *env) send(tb testing.TB, ent *tidcache.Entry, data []byte) {
	tb.Helper()
	off := 0
	for _, tid := range ent.TIDs {
		n := min(int(uapi.ExpTidGet(tid, uapi.EXP_TID_LEN))*4096, len(data)-off)
		if n <= 0 {
			break
		}
		s := uapi.GohfiSend{Opcode: uapi.GOHFI_SEND_EXPECTED, DstCtxt: 1, Length: uint32(n), Vaddr: addrOf(data[off:]), TID: tid}
		b := make([]byte, s.SizeBytes())
		s.MarshalBytes(b)
		if _, err := e.tx.Ioctl(uapi.GOHFI_IOCTL_SEND, ptr(b)); err != nil {
			tb.Fatal(err)
		}
		e.consume(tb)
		off += n
	}
	runtime.KeepAlive(data)
}

func (e *env) consume(tb testing.TB) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cnt := len(e.rhq) / uapi.SizeofGohfiRHQEntry
	for {
		var h uapi.GohfiRHQEntry
		if err := h.UnmarshalBytes(e.rhq[e.next*uapi.SizeofGohfiRHQEntry:]); err != nil {
			tb.Fatal(err)
		}
		if h.Seq != 0 && (h.Seq-1)%uint32(cnt) == uint32(e.next) && h.Seq > 0 {
			// The device writes the seq last: read again for the rest.
			if err := h.UnmarshalBytes(e.rhq[e.next*uapi.SizeofGohfiRHQEntry:]); err != nil {
				tb.Fatal(err)
			}
			if h.Type != uapi.GOHFI_RHF_EXPECTED {
				tb.Fatalf("header entry %+v", h)
			}
			e.next = (e.next + 1) % cnt
			hb := make([]byte, 8)
			binary.LittleEndian.PutUint64(hb, uint64(e.next))
			if _, err := e.rx.Ioctl(uapi.GOHFI_IOCTL_RCVHDR_HEAD, ptr(hb)); err != nil {
				tb.Fatal(err)
			}
			return
		}
		if _, err := e.rx.Poll(ctx); err != nil {
			tb.Fatalf("waiting for delivery: %v", err)
		}
	}
}

func buffer(tb testing.TB, size int) *mem.Buffer {
	b, err := mem.Alloc(size)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { b.Close() })
	return b
}

func TestHitMissRelease(t *testing.T) {
	e := setup(t, 2048)
	buf := buffer(t, 64<<10)
	first, err := e.cache.Acquire(buf.Addr(), 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	e.cache.Release(first)
	again, err := e.cache.Acquire(buf.Addr(), 32<<10)
	if err != nil || again != first {
		t.Fatalf("second acquire: %v (same entry %v)", err, again == first)
	}
	if st := e.cache.Stats(); st.Hits != 1 || st.Misses != 1 {
		t.Fatalf("stats %+v", st)
	}
	if err := e.cache.Release(again); err != nil {
		t.Fatal(err)
	}
	if err := e.cache.Release(again); err == nil {
		t.Fatal("release of an idle entry accepted")
	}
	data := bytes.Repeat([]byte{9}, 64<<10)
	ent, _ := e.cache.Acquire(buf.Addr(), 64<<10)
	e.send(t, ent, data)
	if !bytes.Equal(buf.Bytes(), data) {
		t.Fatal("data did not land in the cached TIDs")
	}
}

// TestEvictOnENOSPC: a full RcvArray makes the cache evict idle entries and
// retry; busy entries are never evicted.
func TestEvictOnENOSPC(t *testing.T) {
	e := setup(t, 16)
	bufs := make([]*mem.Buffer, 5)
	var busy *tidcache.Entry
	for i := range bufs {
		bufs[i] = buffer(t, 4*4096) // one TID each
		ent, err := e.cache.Acquire(bufs[i].Addr(), 4*4096)
		if err != nil {
			t.Fatalf("buffer %d: %v", i, err)
		}
		if i == 0 {
			busy = ent
		} else {
			e.cache.Release(ent)
		}
	}
	// 16 entries, each buffer one TID: fill with 4-page buffers.
	for i := 0; i < 12; i++ {
		b := buffer(t, 4*4096)
		ent, err := e.cache.Acquire(b.Addr(), 4*4096)
		if err != nil {
			t.Fatalf("fill %d: %v", i, err)
		}
		e.cache.Release(ent)
	}
	if st := e.cache.Stats(); st.Evictions == 0 {
		t.Fatalf("no eviction with a full RcvArray: %+v", st)
	}
	if ent, err := e.cache.Acquire(bufs[0].Addr(), 4*4096); err != nil || ent != busy {
		t.Fatalf("busy entry was evicted: %v", err)
	}
}

// TestEvictOnENOMEM: the memlock limit makes the cache evict idle entries.
func TestEvictOnENOMEM(t *testing.T) {
	requireRoot(t)
	var old unix.Rlimit
	unix.Getrlimit(unix.RLIMIT_MEMLOCK, &old)
	if err := unix.Setrlimit(unix.RLIMIT_MEMLOCK, &unix.Rlimit{Cur: 1 << 20, Max: old.Max}); err != nil {
		t.Fatal(err)
	}
	defer unix.Setrlimit(unix.RLIMIT_MEMLOCK, &old)
	e := setup(t, 2048)
	for i := 0; i < 4; i++ {
		b := buffer(t, 512<<10)
		ent, err := e.cache.Acquire(b.Addr(), 512<<10)
		if err != nil {
			t.Fatalf("buffer %d: %v", i, err)
		}
		e.cache.Release(ent)
	}
	if st := e.cache.Stats(); st.Evictions < 2 {
		t.Fatalf("stats %+v: want evictions from ENOMEM", st)
	}
}

func pfn(t *testing.T, addr uintptr) uint64 {
	f, err := os.Open("/proc/self/pagemap")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [8]byte
	if _, err := f.ReadAt(b[:], int64(addr/4096)*8); err != nil {
		t.Fatal(err)
	}
	v := binary.LittleEndian.Uint64(b[:])
	if v&(1<<63) == 0 {
		t.Fatalf("page %#x not present", addr)
	}
	return v & (1<<55 - 1)
}

// TestReallocSameAddressMisses is libfabric's mr_cache_evict: free a cached
// buffer, map new memory at the same address on other physical pages; the
// next lookup must miss and the data must land in the new pages.
func TestReallocSameAddressMisses(t *testing.T) {
	e := setup(t, 2048)
	const size = 256 << 10
	buf := buffer(t, size)
	addr := buf.Addr()
	ent, err := e.cache.Acquire(addr, size)
	if err != nil {
		t.Fatal(err)
	}
	e.cache.Release(ent)
	oldPFN := pfn(t, addr)
	if err := buf.Unmap(); err != nil {
		t.Fatal(err)
	}
	p, err := unix.MmapPtr(-1, 0, addrPtr(addr), size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_FIXED_NOREPLACE|unix.MAP_POPULATE)
	if err != nil || uintptr(p) != addr {
		t.Fatalf("remap: %v", err)
	}
	defer unix.MunmapPtr(p, size)
	if pfn(t, addr) == oldPFN {
		t.Fatal("new mapping got the same physical page: the test proves nothing")
	}
	// The driver's notifier reported the munmap; wait until the event bit
	// is up (bounded), as PSM sees it before its next lookup.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for {
		ev, err := e.rx.Poll(ctx)
		if err != nil {
			t.Fatalf("no invalidation event: %v", err)
		}
		if ev&driver.POLLPRI != 0 {
			break
		}
	}
	misses := e.cache.Stats().Misses
	ent2, err := e.cache.Acquire(addr, size)
	if err != nil {
		t.Fatal(err)
	}
	if e.cache.Stats().Misses != misses+1 || ent2 == ent {
		t.Fatalf("lookup after re-allocation hit a stale entry: %+v", e.cache.Stats())
	}
	data := bytes.Repeat([]byte("new pages "), size/10+1)[:size]
	e.send(t, ent2, data)
	if !bytes.Equal(bytesAt(uintptr(p), size), data) {
		t.Fatal("data did not land in the new pages")
	}
	if st := e.cache.Stats(); st.Invalidations != 1 {
		t.Fatalf("stats %+v", st)
	}
}

// 8 MiB is the largest buffer one TID_UPDATE takes on a 2048-entry context
// in the worst case; hfictl bench tid measures 16 MiB as two windows.
var sizes = []int{4 << 10, 64 << 10, 1 << 20, 8 << 20}

func sizeName(n int) string {
	if n >= 1<<20 {
		return fmt.Sprintf("%dMiB", n>>20)
	}
	return fmt.Sprintf("%dKiB", n>>10)
}

// BenchmarkTIDCache: a cache hit, a miss (TID_UPDATE), and no cache
// (TID_UPDATE + TID_FREE per receive) for each size.
func BenchmarkTIDCache(b *testing.B) {
	e := setupWith(b, 2048, true)
	for _, size := range sizes {
		buf := buffer(b, size)
		b.Run("hit/"+sizeName(size), func(b *testing.B) {
			ent, err := e.cache.Acquire(buf.Addr(), size)
			if err != nil {
				b.Fatal(err)
			}
			e.cache.Release(ent)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				ent, _ := e.cache.Acquire(buf.Addr(), size)
				e.cache.Release(ent)
			}
		})
		b.Run("miss/"+sizeName(size), func(b *testing.B) {
			c, err := tidcache.New(e.rx, tidcache.Options{})
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			for i := 0; i < b.N; i++ {
				ent, err := c.Acquire(buf.Addr(), size)
				if err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				c.Release(ent)
				c.Flush() // the next Acquire misses
				b.StartTimer()
			}
		})
		b.Run("nocache/"+sizeName(size), func(b *testing.B) {
			c, err := tidcache.New(e.rx, tidcache.Options{})
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			for i := 0; i < b.N; i++ {
				ent, err := c.Acquire(buf.Addr(), size)
				if err != nil {
					b.Fatal(err)
				}
				c.Release(ent)
				c.Flush()
			}
		})
	}
}

// TestHitInsideRegisteredBuffer: a receive into part of a registered buffer
// is a hit on the buffer's entry (PSM's cache finds by range); a range
// that runs past it, or one whose memory was unmapped, is a miss.
func TestHitInsideRegisteredBuffer(t *testing.T) {
	e := setup(t, 2048)
	const size = 1 << 20
	buf := buffer(t, size)
	whole, err := e.cache.Acquire(buf.Addr(), size)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.cache.Release(whole); err != nil {
		t.Fatal(err)
	}
	for _, r := range []struct{ off, n int }{{0, 4096}, {64 << 10, 4096}, {size - 4096, 4096}, {12345, 100}} {
		got, err := e.cache.Acquire(buf.Addr()+uintptr(r.off), r.n)
		if err != nil {
			t.Fatal(err)
		}
		if got != whole {
			t.Fatalf("[%d, +%d) of a registered buffer: a new entry, want the buffer's", r.off, r.n)
		}
		if err := e.cache.Release(got); err != nil {
			t.Fatal(err)
		}
	}
	if st := e.cache.Stats(); st.Hits != 4 || st.Misses != 1 {
		t.Fatalf("stats %+v, want 4 hits 1 miss", st)
	}
	past, err := e.cache.Acquire(buf.Addr()+size-4096, 8192)
	if err == nil {
		if past == whole {
			t.Fatal("a range past the buffer's end hit it")
		}
		e.cache.Release(past)
	}
	if err := unix.MunmapPtr(addrPtr(buf.Addr()+64<<10), 64<<10); err != nil {
		t.Fatal(err)
	}
	misses := e.cache.Stats().Misses
	if got, err := e.cache.Acquire(buf.Addr()+(256<<10), 4096); err != nil {
		t.Fatal(err)
	} else if got == whole || e.cache.Stats().Misses != misses+1 {
		t.Fatal("a lookup in a buffer part of which was unmapped hit the old entry")
	}
}
