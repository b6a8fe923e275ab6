package frwr

import (
	"bytes"
	"context"
	"os"
	"testing"
	"time"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/internal/testenv"
	"github.com/gohfi/gohfi/mem"
	"github.com/gohfi/gohfi/uapi"
)

const poolSize = 4 << 20

type setup struct {
	s    *Server
	c    *Client
	pool *mem.Buffer
}

func newSetup(tb testing.TB, fastReg bool) *setup {
	tb.Helper()
	testenv.RequireRoot(tb, "io_uring pins")
	o := attach.DefaultOptions()
	o.Sim.NumContexts = 2
	o.Params.NoDBRec = os.Getenv("GOHFI_BENCH_NODBREC") != "" // to compare the doorbell kinds
	a, err := attach.Open(context.Background(), "embedded", o)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { a.Close() })
	file := func() *driver.File {
		f, err := a.Device.Open()
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() { f.Close() })
		if err := hfiuser.AssignCtxt(f); err != nil {
			tb.Fatal(err)
		}
		return f
	}
	pool, err := mem.Alloc(poolSize)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { pool.Close() })
	st := &setup{pool: pool}
	if st.s, err = NewServer(file(), pool, fastReg, 8); err != nil {
		tb.Fatal(err)
	}
	if st.c, err = NewClient(file(), MaxPages*4096); err != nil {
		tb.Fatal(err)
	}
	if err := st.c.Connect(st.s.QPNum()); err != nil {
		tb.Fatal(err)
	}
	if err := st.s.Start(st.c.QPNum()); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := st.s.Stop(); err != nil {
			tb.Errorf("server: %v", err)
		}
	})
	return st
}

func fill(b []byte, seed byte) {
	for i := range b {
		b[i] = byte(i*13) ^ seed
	}
}

// TestFRWR: puts and gets of a few pages at unaligned offsets move the
// bytes with fast registration (remote invalidation for puts, pipelined
// local invalidation for gets) and with REG_MR/DEREG_MR; after a put, its
// rkey is refused.
func TestFRWR(t *testing.T) {
	for _, fastReg := range []bool{true, false} {
		name := map[bool]string{true: "fastreg", false: "regmr"}[fastReg]
		t.Run(name, func(t *testing.T) {
			st := newSetup(t, fastReg)
			pool := st.pool.Bytes()
			for i, c := range []struct{ off, n int }{{0, 4096}, {100, 9000}, {1 << 20, 64 << 10}, {3<<20 + 4000, 4 * 4096}} {
				fill(st.c.Buf()[:c.n], byte(i))
				if err := st.c.Put(uint64(c.off), c.n, fastReg); err != nil {
					t.Fatalf("put %d: %v", i, err)
				}
				// The server sees the put done once its next request arrives.
				clear(st.c.Buf()[:c.n])
				if err := st.c.Get(uint64(c.off), c.n); err != nil {
					t.Fatalf("get %d: %v", i, err)
				}
				want := make([]byte, c.n)
				fill(want, byte(i))
				if !bytes.Equal(pool[c.off:c.off+c.n], want) || !bytes.Equal(st.c.Buf()[:c.n], want) {
					t.Fatalf("request %d (%d bytes at %d): data differs", i, c.n, c.off)
				}
			}
			// Let the server finish the last put and get.
			deadline := time.Now().Add(2 * time.Second)
			for st.s.Stats().Requests < 8 && time.Now().Before(deadline) {
				time.Sleep(time.Millisecond)
			}
			stats := st.s.Stats()
			t.Logf("%+v", stats)
			if fastReg && (stats.RemoteInvals != 4 || stats.Registrations != 0) || !fastReg && stats.Registrations != 8 {
				t.Fatalf("server stats %+v", stats)
			}
			// The last put's rkey is no longer bound.
			wc, err := st.c.WriteStale(st.c.LastRkey, st.c.LastIOVA)
			if err != nil {
				t.Fatal(err)
			}
			if wc.Status != uapi.GOHFI_WC_REM_ACCESS_ERR || (wc.VendorErr != chip.VendorErrState && wc.VendorErr != chip.VendorErrKey) {
				t.Fatalf("stale rkey: %+v, want REM_ACCESS_ERR", wc)
			}
		})
	}
}

// BenchmarkFRWR: requests per second of one client doing 16 KiB puts then
// gets, with and without fast registration.
func BenchmarkFRWR(b *testing.B) {
	for _, fastReg := range []bool{true, false} {
		b.Run(map[bool]string{true: "fastreg", false: "regmr"}[fastReg], func(b *testing.B) {
			st := newSetup(b, fastReg)
			b.ResetTimer()
			for i := range b.N {
				off := uint64(i%64) * 65536
				if err := st.c.Put(off, 16<<10, fastReg); err != nil {
					b.Fatal(err)
				}
				if err := st.c.Get(off, 16<<10); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(2*b.N)/b.Elapsed().Seconds(), "req/s")
		})
	}
}
