package tidcache_test

import (
	"context"
	"github.com/gohfi/gohfi/internal/testenv"
	"testing"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/dma"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/tidcache"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// hasCapIPCLock reports CAP_IPC_LOCK in the effective set.
func hasCapIPCLock() bool {
	ok, err := dma.HasCapability(unix.CAP_IPC_LOCK)
	return err == nil && ok
}

// benchSetup is setup for pins of up to need bytes: it raises
// RLIMIT_MEMLOCK where it may; where the hard limit is lower (no
// CAP_SYS_RESOURCE, as in containers) it loads the module with
// HonorCapIPCLock, as the kernel exempts CAP_IPC_LOCK from the limit.
func benchSetup(b *testing.B, perCtxt, need int) *env {
	b.Helper()
	requireRoot(b)
	o := attach.DefaultOptions()
	o.Sim.NumContexts = 2
	o.Sim.RcvArrayPerCtxt = perCtxt
	var old unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_MEMLOCK, &old); err != nil {
		b.Fatal(err)
	}
	want := uint64(1 << 30)
	if old.Cur < want {
		if err := unix.Setrlimit(unix.RLIMIT_MEMLOCK, &unix.Rlimit{Cur: want, Max: max(old.Max, want)}); err == nil {
			b.Cleanup(func() { unix.Setrlimit(unix.RLIMIT_MEMLOCK, &old) })
		} else if old.Cur != unix.RLIM_INFINITY && old.Cur < uint64(need)*2 {
			if !hasCapIPCLock() {
				testenv.Missing(b, "RLIMIT_MEMLOCK %d bytes cannot be raised (%v) and no CAP_IPC_LOCK", old.Cur, err)
			}
			o.Params.HonorCapIPCLock = true
		}
	}
	a, err := attach.Open(context.Background(), "embedded", o)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { a.Close() })
	e := &env{a: a}
	for _, f := range []**driver.File{&e.tx, &e.rx} {
		if *f, err = a.Device.Open(); err != nil {
			b.Fatal(err)
		}
		ui := uapi.Hfi1UserInfo{Userversion: uapi.HFI1_USER_SWVERSION}
		buf := make([]byte, ui.SizeBytes())
		ui.MarshalBytes(buf)
		if _, err := (*f).Ioctl(uapi.HFI1_IOCTL_ASSIGN_CTXT, ptr(buf)); err != nil {
			b.Fatal(err)
		}
	}
	if e.cache, err = tidcache.New(e.rx, tidcache.Options{}); err != nil {
		b.Fatal(err)
	}
	var bi uapi.Hfi1BaseInfo
	raw := make([]byte, bi.SizeBytes())
	if _, err := e.rx.Ioctl(uapi.HFI1_IOCTL_USER_INFO, ptr(raw)); err != nil {
		b.Fatal(err)
	}
	bi.UnmarshalBytes(raw)
	if e.rhq, err = e.rx.Mmap(bi.RcvhdrBufbase, a.Module.Params().RcvHdrCnt*uapi.SizeofGohfiRHQEntry, unix.PROT_READ); err != nil {
		b.Fatal(err)
	}
	return e
}

// pathSizes stop at 8 MiB: one TID_UPDATE may cover at most the context's
// RcvArray entries in pages (2048, the most a TID's 10-bit pair index can
// name), so 16 MiB cannot be registered in one call.
var pathSizes = []int{4 << 10, 64 << 10, 1 << 20, 8 << 20}

// BenchmarkMissPath times TID_UPDATE through the cache (Acquire after a
// Flush): pin, IOVA, vfio-user DMA_MAP, notifier subscriptions, RcvArray
// stores. Run it with -cpuprofile, or -trace for where the wall time waits.
func BenchmarkMissPath(b *testing.B) {
	for _, size := range pathSizes {
		b.Run(sizeName(size), func(b *testing.B) {
			e := benchSetup(b, 2048, size)
			buf := buffer(b, size)
			for b.Loop() {
				ent, err := e.cache.Acquire(buf.Addr(), size)
				if err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				e.cache.Release(ent)
				e.cache.Flush()
				b.StartTimer()
			}
		})
	}
}

// BenchmarkFreePath times TID_FREE through the cache (Flush of one idle
// entry): RcvArray clear, vfio-user DMA_UNMAP, unpin, unsubscribe.
func BenchmarkFreePath(b *testing.B) {
	for _, size := range pathSizes {
		b.Run(sizeName(size), func(b *testing.B) {
			e := benchSetup(b, 2048, size)
			buf := buffer(b, size)
			for b.Loop() {
				b.StopTimer()
				ent, err := e.cache.Acquire(buf.Addr(), size)
				if err != nil {
					b.Fatal(err)
				}
				e.cache.Release(ent)
				b.StartTimer()
				e.cache.Flush()
			}
			if st := e.cache.Stats(); st.Frees != st.Misses {
				b.Fatalf("stats %+v: every miss should have been freed", st)
			}
		})
	}
}
