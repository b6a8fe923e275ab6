package driver_test

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/mem"
	"golang.org/x/sys/unix"
)

// BenchmarkInvalidationLatency measures, per munmap of a registered 64 KiB
// buffer, the time from the munmap call until TID_INVAL_READ reports its
// TID (the entry is retired for user space): alone, and while another
// context registers 16 MiB buffers in a loop (2 x 8 MiB TID_UPDATE, munmap,
// TID_INVAL_READ, TID_FREE), whose invalidations share the device's one
// notifier dispatcher. Run with -benchtime 300x; it reports p50 and p99,
// of the whole and of the munmap call alone.
func BenchmarkInvalidationLatency(b *testing.B) {
	requireRoot(b)
	for _, load := range []bool{false, true} {
		name := "idle"
		if load {
			name = "with-16MiB-registrations"
		}
		b.Run(name, func(b *testing.B) {
			a, err := openLargeDevice()
			if err != nil {
				b.Fatal(err)
			}
			defer a.Close()
			f := openFile(b, a)
			assign(b, f)
			stop := make(chan struct{})
			var wg sync.WaitGroup
			var regs int
			if load {
				g := openFile(b, a)
				assign(b, g)
				wg.Add(1)
				go func() {
					defer wg.Done()
					regs = registerLoop(b, g, stop)
				}()
			}
			list := make([]uint32, 2048)
			var lat, unmapLat []time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				buf, err := mem.Alloc(64 << 10)
				if err != nil {
					b.Fatal(err)
				}
				tids, _, err := hfiuser.TIDUpdate(f, buf.Addr(), 64<<10, list)
				if err != nil {
					b.Fatal(err)
				}
				tid := tids[0]
				t0 := time.Now()
				if err := buf.Unmap(); err != nil {
					b.Fatal(err)
				}
				unmapLat = append(unmapLat, time.Since(t0))
				for {
					got, err := hfiuser.TIDInvalRead(f, list)
					if err != nil {
						b.Fatal(err)
					}
					if slices.Contains(got, tid) {
						break
					}
					// Asynchronous delivery: wait for the event bit.
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					_, err = f.Poll(ctx)
					cancel()
					if err != nil {
						b.Fatalf("TID %#x never reported: %v", tid, err)
					}
				}
				lat = append(lat, time.Since(t0))
				if _, err := hfiuser.TIDFree(f, []uint32{tid}); err != nil {
					b.Fatal(err)
				}
				buf.Close()
			}
			b.StopTimer()
			close(stop)
			wg.Wait()
			slices.Sort(lat)
			slices.Sort(unmapLat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
			// The munmap call alone: the kernel's share (mmap_lock, the
			// userfaultfd round trip), which the driver cannot shorten.
			b.ReportMetric(float64(unmapLat[len(unmapLat)/2].Microseconds()), "munmap-p50-µs")
			b.ReportMetric(float64(unmapLat[len(unmapLat)*99/100].Microseconds()), "munmap-p99-µs")
			if load {
				b.ReportMetric(float64(regs), "16MiB-regs")
			}
		})
	}
}

// registerLoop registers, unmaps and frees 16 MiB buffers on g until stop.
func registerLoop(b *testing.B, g *driver.File, stop <-chan struct{}) int {
	list := make([]uint32, 2048)
	n := 0
	for {
		select {
		case <-stop:
			return n
		default:
		}
		buf, err := mem.Alloc(16 << 20)
		if err != nil {
			b.Error(err)
			return n
		}
		var all []uint32
		for off := 0; off < 16<<20; off += 8 << 20 {
			tids, _, err := hfiuser.TIDUpdate(g, buf.Addr()+uintptr(off), 8<<20, list)
			if err != nil && !errors.Is(err, unix.EBUSY) {
				b.Error(err)
				return n
			}
			all = append(all, tids...)
		}
		buf.Unmap()
		if _, err := hfiuser.TIDInvalRead(g, list); err != nil {
			b.Error(err)
			return n
		}
		if len(all) > 0 {
			if _, err := hfiuser.TIDFree(g, all); err != nil {
				b.Error(err)
				return n
			}
		}
		buf.Close()
		n++
	}
}
