package driver_test

import (
	"errors"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/mem"
	"golang.org/x/sys/unix"
)

// TestTIDStressNoSpuriousEBUSY: 2 files x 4 goroutines (register fresh
// memory, unmap it, read invalidations, free) for GOHFI_STRESS_TIME
// (default 2s). A TID_UPDATE of memory that nobody unmaps must never get
// EBUSY; before ReadRetry waited out the open read window, about 760 in
// 10 s did (an munmap of any other buffer counted as a race). Every TID
// ends freed, every page unpinned.
func TestTIDStressNoSpuriousEBUSY(t *testing.T) {
	requireRoot(t)
	dur := 2 * time.Second
	if v := os.Getenv("GOHFI_STRESS_TIME"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatal(err)
		}
		dur = d
	}
	a := openDev(t, 2)
	var updates, busy atomic.Int64
	deadline := time.Now().Add(dur)
	var wg sync.WaitGroup
	errc := make(chan error, 16)
	for range 2 {
		f := openFile(t, a)
		assign(t, f)
		type reg struct {
			buf  *mem.Buffer
			tids []uint32
		}
		unmapQ := make(chan reg, 8)
		freeQ := make(chan []uint32, 8)
		wg.Add(4)
		go func() { // registers fresh buffers
			defer wg.Done()
			defer close(unmapQ)
			for time.Now().Before(deadline) {
				buf, err := mem.Alloc(64 << 10)
				if err != nil {
					errc <- err
					return
				}
				list := make([]uint32, 16)
				tids, _, err := hfiuser.TIDUpdate(f, buf.Addr(), 64<<10, list)
				updates.Add(1)
				if errors.Is(err, unix.EBUSY) {
					busy.Add(1)
					buf.Close()
					continue
				}
				if err != nil {
					errc <- err
					buf.Close()
					return
				}
				unmapQ <- reg{buf, append([]uint32(nil), tids...)}
			}
		}()
		go func() { // unmaps them: invalidations
			defer wg.Done()
			defer close(freeQ)
			for r := range unmapQ {
				if err := r.buf.Close(); err != nil {
					errc <- err
				}
				freeQ <- r.tids
			}
		}()
		stopRead := make(chan struct{})
		go func() { // reads invalidations, as a TID cache does
			defer wg.Done()
			list := make([]uint32, 2048)
			for {
				select {
				case <-stopRead:
					return
				default:
				}
				if _, err := hfiuser.TIDInvalRead(f, list); err != nil {
					errc <- err
					return
				}
			}
		}()
		go func() { // frees
			defer wg.Done()
			defer close(stopRead)
			for tids := range freeQ {
				if n, err := hfiuser.TIDFree(f, tids); err != nil || n != len(tids) {
					errc <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Error(err)
	}
	t.Logf("%d TID_UPDATEs of fresh memory in %v, %d EBUSY", updates.Load(), dur, busy.Load())
	if busy.Load() != 0 {
		t.Fatalf("%d of %d TID_UPDATEs of fresh memory failed with EBUSY", busy.Load(), updates.Load())
	}
	st := a.Device.Stats()
	if st.TidsProgrammed != st.TidsFreed || st.PagesPinned != st.PagesUnpinned {
		t.Fatalf("state left behind: %+v", st)
	}
}
