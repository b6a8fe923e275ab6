package userfault

import (
	"context"
	"github.com/gohfi/gohfi/internal/testenv"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func percentile(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[min(len(s)-1, int(float64(len(s))*p))]
}

// BenchmarkEventLatency measures munmap call to Invalidate callback, per
// source, and reports p50 and p99.
func BenchmarkEventLatency(b *testing.B) {
	for _, src := range []Source{SourceUserfaultfd, SourceTracepoint, SourceKVM} {
		b.Run(src.String(), func(b *testing.B) {
			n, err := New(context.Background(), Options{Sources: []Source{src}, Require: true})
			if src == SourceKVM && err != nil {
				testenv.Require(b, err, "optional KVM source")
			}
			testenv.Require(b, err, "start "+src.String())
			defer n.Close()
			const pages = 1024
			got := make(chan time.Time, 1)
			var addr uintptr
			var sub *Subscription
			next := pages
			lat := make([]time.Duration, 0, b.N)
			ops := InvalidateFunc(func(_ *Subscription, ev Event) bool {
				select {
				case got <- time.Now():
				default:
				}
				return true
			})
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if next == pages {
					b.StopTimer()
					if sub != nil {
						sub.Remove()
					}
					addr = mmapAnon(b, pages)
					sub, err = n.Subscribe(addr, pages*pageSize, ops)
					if err != nil {
						b.Fatal(err)
					}
					next = 0
					b.StartTimer()
				}
				t0 := time.Now()
				unix.Syscall(unix.SYS_MUNMAP, addr+uintptr(next)*pageSize, pageSize, 0)
				next++
				select {
				case t1 := <-got:
					lat = append(lat, t1.Sub(t0))
				case <-time.After(5 * time.Second):
					b.Fatal("no event")
				}
			}
			b.StopTimer()
			if sub != nil {
				sub.Remove()
				if next < pages {
					munmap(b, addr+uintptr(next)*pageSize, pages-next)
				}
			}
			b.ReportMetric(float64(percentile(lat, 0.5).Nanoseconds()), "p50-ns")
			b.ReportMetric(float64(percentile(lat, 0.99).Nanoseconds()), "p99-ns")
		})
	}
}

// BenchmarkSyscallCost measures what the running notifier adds to munmap and
// madvise(DONTNEED) of one page, watched and unwatched, as ratios to the
// plain call measured in the same run before the notifier started. The
// reported figures are medians; ns/op is meaningless here.
func BenchmarkSyscallCost(b *testing.B) {
	for _, cfg := range []struct {
		name string
		srcs []Source
	}{
		{"userfaultfd", []Source{SourceUserfaultfd}},
		{"tracepoint", []Source{SourceTracepoint}},
		{"both", []Source{SourceUserfaultfd, SourceTracepoint}},
	} {
		for _, call := range []string{"munmap", "madvise"} {
			b.Run(cfg.name+"/"+call, func(b *testing.B) {
				samples := max(b.N, 200)
				measure := func(n *Notifier, watched bool) time.Duration {
					d := make([]time.Duration, 0, samples)
					var madvAddr uintptr
					var madvSub *Subscription
					if call == "madvise" {
						madvAddr = mmapAnon(b, 1)
						defer munmap(b, madvAddr, 1)
						if watched {
							madvSub = subscribe(b, n, madvAddr, pageSize, InvalidateFunc(func(*Subscription, Event) bool { return true }))
							defer madvSub.Remove()
						}
					}
					for i := 0; i < samples; i++ {
						switch call {
						case "munmap":
							a := mmapAnon(b, 1)
							var s *Subscription
							if watched {
								var err error
								if s, err = n.Subscribe(a, pageSize, InvalidateFunc(func(*Subscription, Event) bool { return true })); err != nil {
									b.Fatal(err)
								}
							}
							t0 := time.Now()
							unix.Syscall(unix.SYS_MUNMAP, a, pageSize, 0)
							d = append(d, time.Since(t0))
							if s != nil {
								s.Remove()
							}
						case "madvise":
							madvise(b, madvAddr, 1, madvPopulateWrite)
							t0 := time.Now()
							unix.Syscall(unix.SYS_MADVISE, madvAddr, pageSize, unix.MADV_DONTNEED)
							d = append(d, time.Since(t0))
						}
					}
					return percentile(d, 0.5)
				}
				b.ResetTimer()
				plain := measure(nil, false)
				n, err := New(context.Background(), Options{Sources: cfg.srcs, Require: true})
				testenv.Require(b, err, "start notifier")
				defer n.Close()
				unwatched := measure(n, false)
				watched := measure(n, true)
				b.StopTimer()
				b.ReportMetric(float64(plain.Nanoseconds()), "plain-ns")
				b.ReportMetric(float64(unwatched.Nanoseconds()), "unwatched-ns")
				b.ReportMetric(float64(watched.Nanoseconds()), "watched-ns")
				b.ReportMetric(float64(unwatched)/float64(plain), "unwatched-x")
				b.ReportMetric(float64(watched)/float64(plain), "watched-x")
			})
		}
	}
}
