package driver_test

import (
	"context"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// TestODPFigures measures ODP on the host-native path (embedded device) and
// logs the figures of the closing note. It runs only with
// GOHFI_ODP_FIGURES=1 (it takes tens of seconds and its numbers are for
// people):
//
//	GOHFI_ODP_FIGURES=1 go test ./driver -run TestODPFigures -v
func TestODPFigures(t *testing.T) {
	if os.Getenv("GOHFI_ODP_FIGURES") == "" {
		t.Skip("set GOHFI_ODP_FIGURES=1 to measure")
	}
	requireRoot(t)
	open := func(t *testing.T, lat time.Duration, faultAround int, noBatch bool) (*attach.Attached, *odpLoop) {
		o := attach.DefaultOptions()
		o.Sim.NumContexts = 2
		o.Sim.TLBInvLatency = lat
		o.Params.ODPFaultAround = faultAround
		o.Params.ODPNoBatch = noBatch
		a, err := attach.Open(context.Background(), "embedded", o)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { a.Close() })
		return a, newODPLoop(t, a)
	}
	pct := func(d []time.Duration) (time.Duration, time.Duration) {
		slices.Sort(d)
		if len(d) == 0 {
			return 0, 0
		}
		return d[len(d)/2], d[min(len(d)-1, len(d)*99/100)]
	}

	t.Run("fault 4KiB", func(t *testing.T) {
		a, l := open(t, 0, 4096, false)
		const n = 4 << 20
		src, dst := allocBuf(t, 4096, false), allocBuf(t, n, false)
		ms := l.reg(l.qa.f, src.Addr(), 4096, pinAccess)
		md := l.reg(l.qb.f, dst.Addr(), n, odpAccess)
		a.Sim.Device.ODPFaultLatencies()
		for off := 0; off < n; off += 4096 {
			wantOK(t, "WRITE", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(src.Addr(), 4096, ms), dst.Addr()+uintptr(off), md.Rkey))
		}
		lat := a.Sim.Device.ODPFaultLatencies()
		p50, p99 := pct(lat)
		t.Logf("4 KiB fault (raised to resumed, fault-around 4 KiB): %d faults, p50 %v, p99 %v", len(lat), p50, p99)
	})

	t.Run("first touch 1MiB", func(t *testing.T) {
		a, l := open(t, 0, 0, false)
		const n, rounds = 1 << 20, 32
		src := allocBuf(t, n, false)
		ms := l.reg(l.qa.f, src.Addr(), n, pinAccess)
		var odp, pin, pinReg []time.Duration
		var perPage []time.Duration
		for range rounds {
			dst := allocBuf(t, n, false)
			md := l.reg(l.qb.f, dst.Addr(), n, odpAccess)
			a.Sim.Device.ODPFaultLatencies()
			t0 := time.Now()
			wantOK(t, "WRITE ODP", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(src.Addr(), n, ms), dst.Addr(), md.Rkey))
			odp = append(odp, time.Since(t0))
			var sum time.Duration
			for _, d := range a.Sim.Device.ODPFaultLatencies() {
				sum += d
			}
			perPage = append(perPage, sum/(n/4096))

			pb := allocBuf(t, n, false)
			t0 = time.Now()
			mp := l.reg(l.qb.f, pb.Addr(), n, pinAccess)
			t1 := time.Now()
			wantOK(t, "WRITE pinned", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(src.Addr(), n, ms), pb.Addr(), mp.Rkey))
			pin = append(pin, time.Since(t1))
			pinReg = append(pinReg, time.Since(t0))
			for _, h := range []uint32{md.Handle, mp.Handle} {
				if err := hfiuser.DeregMR(l.qb.f, h); err != nil {
					t.Fatal(err)
				}
			}
		}
		o50, o99 := pct(odp)
		p50, p99 := pct(pin)
		r50, _ := pct(pinReg)
		f50, f99 := pct(perPage)
		t.Logf("first-touch 1 MiB WRITE: ODP p50 %v p99 %v; pinned (MR registered before) p50 %v p99 %v; pinned incl. REG_MR p50 %v; ratio ODP/pinned %.2f",
			o50, o99, p50, p99, r50, float64(o50)/float64(p50))
		t.Logf("fault time per page of a 1 MiB first touch (fault-around 1 MiB): p50 %v p99 %v", f50, f99)
	})

	t.Run("warm bandwidth", func(t *testing.T) {
		_, l := open(t, 0, 0, false)
		const n, rounds = 1 << 20, 200
		src, od, pb := allocBuf(t, n, false), allocBuf(t, n, false), allocBuf(t, n, false)
		ms := l.reg(l.qa.f, src.Addr(), n, pinAccess)
		mo := l.reg(l.qb.f, od.Addr(), n, odpAccess)
		mp := l.reg(l.qb.f, pb.Addr(), n, pinAccess)
		bw := func(addr uintptr, rkey uint32) float64 {
			wantOK(t, "warm-up", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(src.Addr(), n, ms), addr, rkey))
			t0 := time.Now()
			for range rounds {
				wantOK(t, "WRITE", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(src.Addr(), n, ms), addr, rkey))
			}
			return float64(n*rounds) / time.Since(t0).Seconds() / 1e9
		}
		var o, p float64
		for range 3 { // interleaved, best of 3
			o, p = max(o, bw(od.Addr(), mo.Rkey)), max(p, bw(pb.Addr(), mp.Rkey))
		}
		t.Logf("warm 1 MiB WRITEs: ODP %.2f GB/s, pinned %.2f GB/s (ODP/pinned %.2f)", o, p, o/p)
	})

	for _, lat := range []time.Duration{0, 10 * time.Millisecond} {
		for _, noBatch := range []bool{false, true} {
			name := "quiesce/flush " + lat.String()
			if noBatch {
				name += "/no batching"
			} else {
				name += "/batching"
			}
			t.Run(name, func(t *testing.T) {
				a, l := open(t, lat, 64<<10, noBatch)
				const n, burst = 1 << 20, 8
				src, dst := allocBuf(t, n, false), allocBuf(t, n, false)
				ms := l.reg(l.qa.f, src.Addr(), n, pinAccess)
				md := l.reg(l.qb.f, dst.Addr(), n, odpAccess)
				var one, many []time.Duration
				rounds := 30
				if lat > 0 {
					rounds = 12
				}
				for range rounds {
					// One munmap of a mapped 64 KiB chunk, then a burst of
					// 8 DONTNEEDs of 8 chunks: call to quiesced.
					wantOK(t, "WRITE", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(src.Addr(), n, ms), dst.Addr(), md.Rkey))
					t0 := time.Now()
					if err := mmapFixed(dst.Addr(), 64<<10, unix.PROT_READ|unix.PROT_WRITE); err != nil {
						t.Fatal(err)
					}
					if err := a.Device.ODPFence(); err != nil {
						t.Fatal(err)
					}
					one = append(one, time.Since(t0))
					wantOK(t, "WRITE", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(src.Addr(), n, ms), dst.Addr(), md.Rkey))
					t0 = time.Now()
					for i := range burst {
						madvise(dst.Addr()+uintptr(i*128<<10), 64<<10, unix.MADV_DONTNEED)
					}
					if err := a.Device.ODPFence(); err != nil {
						t.Fatal(err)
					}
					many = append(many, time.Since(t0))
				}
				o50, o99 := pct(one)
				m50, m99 := pct(many)
				st := a.Device.Stats()
				t.Logf("munmap to quiesced: p50 %v p99 %v; burst of %d DONTNEEDs to quiesced: p50 %v p99 %v; TLB flushes %d",
					o50, o99, burst, m50, m99, st.TlbFlushes)
			})
		}
	}
}
