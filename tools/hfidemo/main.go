// Command hfidemo is the main job of the README: expected receive with TID
// caching on the embedded device (hfisim in-process over vfio-user).
//
// A receiver reuses the same buffers for many expected receives, first
// registering them for every receive (no cache: TID_UPDATE + TID_FREE), then
// through the TID cache (one TID_UPDATE, then hits). Then the application
// unmaps a cached buffer and the invalidation reaches user space: the event
// bit, TID_INVAL_READ, and the cache's next lookup missing.
//
// The ODP part (odp.go) writes a buffer larger than RLIMIT_MEMLOCK through
// an on-demand paging MR and unmaps part of it.
// The fast-registration part (frwr.go) runs ulp/frwr's model ULP with and
// without fast registration and shows a stale rkey refused.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"hash/crc32"
	"os"
	"time"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/mem"
	"github.com/gohfi/gohfi/tidcache"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

func main() {
	device := flag.String("device", "embedded", "device: embedded or vfio-user:PATH")
	iters := flag.Int("n", 200, "receives per run")
	size := flag.Int("size", 1<<20, "message size in bytes")
	bufs := flag.Int("buffers", 4, "receive buffers reused round robin")
	flag.Parse()
	err := run(*device, *iters, *size, *bufs)
	if err == nil {
		err = runODP(os.Stdout, *device, defaultODPConfig)
	}
	if err == nil {
		err = runFRWR(os.Stdout, *device, defaultFRWRConfig)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "hfidemo:", err)
		os.Exit(1)
	}
}

// cleanup runs a deferred cleanup and joins its failure, as "what: error",
// after the error the part returns (first cause first): the demo shows the
// driver, and a teardown that fails is part of what it shows.
func cleanup(err *error, what string, f func() error) {
	if cerr := f(); cerr != nil {
		*err = errors.Join(*err, fmt.Errorf("%s: %w", what, cerr))
	}
}

type receiver struct {
	f    *driver.File
	rhq  []byte
	next int
}

// wait consumes the next header queue entry.
func (r *receiver) wait(ctx context.Context) (uapi.GohfiRHQEntry, error) {
	cnt := len(r.rhq) / uapi.SizeofGohfiRHQEntry
	for {
		var e uapi.GohfiRHQEntry
		if err := e.UnmarshalBytes(r.rhq[r.next*uapi.SizeofGohfiRHQEntry:]); err != nil {
			return e, err
		}
		if e.Seq != 0 && int((e.Seq-1)%uint32(cnt)) == r.next {
			// The device writes the seq last: the rest, read after it.
			if err := e.UnmarshalBytes(r.rhq[r.next*uapi.SizeofGohfiRHQEntry:]); err != nil {
				return e, err
			}
			r.next = (r.next + 1) % cnt
			return e, hfiuser.SetRcvHdrHead(r.f, uint64(r.next))
		}
		if _, err := r.f.Poll(ctx); err != nil {
			return e, err
		}
	}
}

func run(spec string, iters, size, nbufs int) (err error) {
	ctx := context.Background()
	a, err := openDevice(spec)
	if err != nil {
		return err
	}
	defer cleanup(&err, "closing the device", a.Close)
	info := a.Device.Info()
	fmt.Printf("device      %04x:%04x rev %#x, %d contexts, %d RcvArray entries each, irq %s\n",
		info.VendorID, info.DeviceID, info.Revision, info.NumContexts, info.RcvArrayPerCtxt, info.IRQMode)

	var files [2]*driver.File
	for i := range files {
		if files[i], err = a.Device.Open(); err != nil {
			return err
		}
		if err := hfiuser.AssignCtxt(files[i]); err != nil {
			return fmt.Errorf("ASSIGN_CTXT: %w", err)
		}
	}
	tx, rxf := files[0], files[1]
	ci, err := hfiuser.CtxtInfo(rxf)
	if err != nil {
		return err
	}
	bi, err := hfiuser.UserInfo(rxf)
	if err != nil {
		return err
	}
	rhq, err := rxf.Mmap(bi.RcvhdrBufbase, int(ci.RcvhdrqCnt)*uapi.SizeofGohfiRHQEntry, unix.PROT_READ)
	if err != nil {
		return err
	}
	defer cleanup(&err, "unmapping the header queue", func() error { return unix.Munmap(rhq) })
	rx := &receiver{f: rxf, rhq: rhq}

	bufs := make([]*mem.Buffer, nbufs)
	for i := range bufs {
		if bufs[i], err = mem.Alloc(size); err != nil {
			return err
		}
		defer cleanup(&err, "unmapping a receive buffer", bufs[i].Close)
	}
	payload := bytes.Repeat([]byte("gohfi expected receive "), size/23+1)[:size]
	want := crc32.ChecksumIEEE(payload)

	// One expected receive: send into the TIDs, wait for every header entry.
	recv := func(tids []uint32, buf *mem.Buffer) error {
		off := 0
		for _, tid := range tids {
			n := min(int(uapi.ExpTidGet(tid, uapi.EXP_TID_LEN))*4096, size-off)
			if n <= 0 {
				break
			}
			s := uapi.GohfiSend{Opcode: uapi.GOHFI_SEND_EXPECTED, DstCtxt: ci.Ctxt, TID: tid}
			if err := hfiuser.Send(tx, s, payload[off:off+n]); err != nil {
				return fmt.Errorf("send: %w", err)
			}
			wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			e, err := rx.wait(wctx)
			cancel()
			if err != nil {
				return err
			}
			if e.Type != uapi.GOHFI_RHF_EXPECTED {
				return fmt.Errorf("receive failed: header %+v", e)
			}
			off += n
		}
		if crc32.ChecksumIEEE(buf.Bytes()[:size]) != want {
			return fmt.Errorf("data corrupted in buffer %#x", buf.Addr())
		}
		return nil
	}

	cache, err := tidcache.New(rxf, tidcache.Options{})
	if err != nil {
		return err
	}
	// Close frees the idle entries' TIDs (TID_FREE).
	defer cleanup(&err, "closing the TID cache", cache.Close)

	// loop receives iters messages into the reused buffers; with flush the
	// cache is emptied after every receive, so each one registers and frees
	// its buffer (no cache).
	loop := func(flush bool) (reg, total time.Duration, err error) {
		start := time.Now()
		for i := 0; i < iters; i++ {
			b := bufs[i%nbufs]
			t0 := time.Now()
			ent, err := cache.Acquire(b.Addr(), size)
			if err != nil {
				return 0, 0, err
			}
			reg += time.Since(t0)
			if err := recv(ent.TIDs, b); err != nil {
				return 0, 0, err
			}
			if err := cache.Release(ent); err != nil {
				return 0, 0, err
			}
			if flush {
				// A failed free would make the next receive a hit.
				t0 = time.Now()
				err := cache.Flush()
				reg += time.Since(t0)
				if err != nil {
					return 0, 0, fmt.Errorf("flush: %w", err)
				}
			}
		}
		return reg, time.Since(start), nil
	}
	regNoCache, totalNoCache, err := loop(true)
	if err != nil {
		return err
	}
	before := cache.Stats()
	regCache, totalCache, err := loop(false)
	if err != nil {
		return err
	}
	st := cache.Stats()
	misses, hits := st.Misses-before.Misses, st.Hits-before.Hits

	fmt.Printf("receives    %d x %d bytes into %d reused buffers, data verified by CRC32\n", iters, size, nbufs)
	fmt.Printf("no cache    registration %8.1f us/receive, total %8.1f us/receive\n", us(regNoCache, iters), us(totalNoCache, iters))
	fmt.Printf("TID cache   registration %8.3f us/receive, total %8.1f us/receive (%d misses, %d hits)\n",
		us(regCache, iters), us(totalCache, iters), misses, hits)
	fmt.Printf("speed-up    registration %.0fx, end to end %.2fx\n",
		float64(regNoCache)/float64(max(regCache, 1)), float64(totalNoCache)/float64(totalCache))

	// The application unmaps a cached buffer: the invalidation reaches user
	// space through the event page and TID_INVAL_READ.
	victim := bufs[0]
	addr := victim.Addr()
	if err := victim.Unmap(); err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	for {
		ev, err := rxf.Poll(wctx)
		if err != nil {
			return fmt.Errorf("no invalidation event after munmap: %w", err)
		}
		if ev&driver.POLLPRI != 0 {
			break
		}
	}
	fmt.Printf("munmap      buffer %#x unmapped: HFI1_EVENT_TID_MMU_NOTIFY raised\n", addr)
	before = cache.Stats()
	other := bufs[1%nbufs]
	ent, err := cache.Acquire(other.Addr(), size) // the lookup reads the event first
	if err != nil {
		return err
	}
	if err := cache.Release(ent); err != nil {
		return err
	}
	after := cache.Stats()
	ds := a.Device.Stats()
	fmt.Printf("invalidate  TID_INVAL_READ retired %d cache entry, freed with TID_FREE; driver counted %d TID invalidations\n",
		after.Invalidations-before.Invalidations, ds.TidInvalidations)
	fmt.Printf("driver      TIDs programmed %d, freed %d, pages pinned %d, unpinned %d\n",
		ds.TidsProgrammed, ds.TidsFreed, ds.PagesPinned, ds.PagesUnpinned)
	return nil
}

func us(d time.Duration, n int) float64 { return float64(d.Microseconds()) / float64(n) }

// openDevice opens the device of spec with the two contexts every part of
// the demo uses.
func openDevice(spec string) (*attach.Attached, error) {
	o := attach.DefaultOptions()
	o.Sim.NumContexts = 2
	return attach.Open(context.Background(), spec, o)
}
