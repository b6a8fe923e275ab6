package driver_test

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/internal/testenv"
	"github.com/gohfi/gohfi/uapi"
)

// The cost of making the same pages reachable and unreachable again: a
// bind + invalidate through the send queue (FAST_REG_MR unsignaled and
// LOCAL_INV signaled in one POST_SEND, then POLL_CQ until its completion)
// against REG_MR + DEREG_MR ioctls (pin, DMA map, MTT and MPT writes; MPT
// free, MTT zap, TLB flush, unmap, unpin). Embedded device.
//
//	go test ./driver -run '^$' -bench 'FastRegCycle|RegDeregCycle' -benchtime 2000x

var cycleSizes = []int{4 << 10, 64 << 10, 1 << 20}

// benchLoopQP is a file with a QP connected to itself and a pinned buffer
// of the largest size.
func benchLoopQP(b *testing.B) (rcQP, []byte) {
	b.Helper()
	_, q, buf := benchLoopDev(b)
	return q, buf
}

// benchLoopDev is benchLoopQP with its device.
func benchLoopDev(b *testing.B) (*attach.Attached, rcQP, []byte) {
	b.Helper()
	testenv.RequireRoot(b, "io_uring pins")
	o := attach.DefaultOptions()
	o.Sim.NumContexts = 1
	o.Params.NoDBRec = os.Getenv("GOHFI_BENCH_NODBREC") != ""
	a, err := attach.Open(context.Background(), "embedded", o)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { a.Close() })
	f := openFile(b, a)
	assign(b, f)
	q := newRCQP(b, f, 64, 4, false)
	q.connect(b, q.qpn)
	buf := allocBuf(b, 1<<20, false)
	return a, q, unsafeSlice(buf.Addr(), 1<<20)
}

func BenchmarkFastRegCycle(b *testing.B) {
	q, buf := benchLoopQP(b)
	if _, err := hfiuser.RegMR(q.f, uintptrOf(buf), uint64(len(buf)), uint64(uintptrOf(buf)), uapi.IB_ACCESS_LOCAL_WRITE); err != nil {
		b.Fatal(err)
	}
	mr, err := hfiuser.AllocMR(q.f, uint32(len(buf)/4096))
	if err != nil {
		b.Fatal(err)
	}
	for _, size := range cycleSizes {
		pages := make([]uint64, size/4096)
		for i := range pages {
			pages[i] = uint64(uintptrOf(buf)) + uint64(i)*4096
		}
		b.Run(fmt.Sprintf("%dKiB", size>>10), func(b *testing.B) {
			wc := make([]uapi.GohfiWC, 1)
			key := mr.Lkey
			var postT time.Duration
			defer func() { b.ReportMetric(float64(postT.Nanoseconds())/float64(b.N), "post-ns/op") }()
			for range b.N {
				key = key&^0xff | (key+1)&0xff
				wrs := []hfiuser.SendWR{
					hfiuser.FastRegWR(1, 0, mr.Handle, key, uapi.IB_ACCESS_LOCAL_WRITE|uapi.IB_ACCESS_REMOTE_WRITE, pages, 12, frIOVA, uint64(size)),
					hfiuser.LocalInvWR(2, uapi.GOHFI_SEND_SIGNALED, key),
				}
				postT += postAndPoll(b, q, wrs, wc)
				if wc[0].Status != uapi.GOHFI_WC_SUCCESS || wc[0].Opcode != uapi.GOHFI_WC_LOCAL_INV {
					b.Fatalf("completion %+v", wc[0])
				}
			}
		})
	}
}

func BenchmarkRegDeregCycle(b *testing.B) {
	q, buf := benchLoopQP(b)
	for _, size := range cycleSizes {
		b.Run(fmt.Sprintf("%dKiB", size>>10), func(b *testing.B) {
			for range b.N {
				r, err := hfiuser.RegMR(q.f, uintptrOf(buf), uint64(size), frIOVA, uapi.IB_ACCESS_LOCAL_WRITE|uapi.IB_ACCESS_REMOTE_WRITE)
				if err != nil {
					b.Fatal(err)
				}
				if err := hfiuser.DeregMR(q.f, r.Handle); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkPollCQEmpty is the fixed cost of an ioctl that copies its
// argument in and out: POLL_CQ of an empty CQ (no device access).
func BenchmarkPollCQEmpty(b *testing.B) {
	q, _ := benchLoopQP(b)
	wc := make([]uapi.GohfiWC, 16)
	for range b.N {
		if n, err := hfiuser.PollCQ(q.f, q.cq, wc); err != nil || n != 0 {
			b.Fatalf("POLL_CQ: %d, %v", n, err)
		}
	}
}

// BenchmarkWrite8Trace is an 8 B RDMA WRITE on a QP connected to itself,
// posted and busy polled to its completion, with nobody tracing (off: the
// trace points of POST_SEND, the doorbell, the completion and the device's
// five cost an atomic load each, the device's a call too) and with a
// subscriber draining every event (on). The buffer is memfd-backed, as the
// bench's fast path.
//
//	go test ./driver -run '^$' -bench Write8Trace -count 5
func BenchmarkWrite8Trace(b *testing.B) {
	for _, on := range []bool{false, true} {
		b.Run(map[bool]string{false: "off", true: "on"}[on], func(b *testing.B) {
			a, q, _ := benchLoopDev(b)
			buf := unsafeSlice(allocBuf(b, 8192, true).Addr(), 8192) // memfd: the device maps it
			mr, err := hfiuser.RegMR(q.f, uintptrOf(buf), uint64(len(buf)), uint64(uintptrOf(buf)),
				uapi.IB_ACCESS_LOCAL_WRITE|uapi.IB_ACCESS_REMOTE_WRITE)
			if err != nil {
				b.Fatal(err)
			}
			if on {
				sub := a.Module.Trace(1 << 12)
				go func() {
					for range sub.Events() {
					}
				}()
				defer sub.Stop()
			}
			wr := hfiuser.SendWR{SGL: []uapi.GohfiSge{{Addr: uint64(uintptrOf(buf)), Length: 8, Lkey: mr.Lkey}}}
			wr.Opcode, wr.SendFlags = uapi.GOHFI_WR_RDMA_WRITE, uapi.GOHFI_SEND_SIGNALED
			wr.RemoteAddr, wr.Rkey = uint64(uintptrOf(buf))+4096, mr.Rkey
			wrs, wc := []hfiuser.SendWR{wr}, make([]uapi.GohfiWC, 1)
			b.ResetTimer()
			for i := range b.N {
				wrs[0].WrID = uint64(i)
				postAndPoll(b, q, wrs, wc)
				if wc[0].Status != uapi.GOHFI_WC_SUCCESS || wc[0].WrID != uint64(i) {
					b.Fatalf("completion %+v, want wr_id %d", wc[0], i)
				}
			}
		})
	}
}

// postAndPoll posts wrs on q, busy polls q's CQ for one completion into
// wc[0], and returns how long the post took.
func postAndPoll(b *testing.B, q rcQP, wrs []hfiuser.SendWR, wc []uapi.GohfiWC) time.Duration {
	b.Helper()
	t0 := time.Now()
	if bad, err := hfiuser.PostSend(q.f, q.qp, wrs); err != nil || bad != len(wrs) {
		b.Fatalf("POST_SEND: %d, %v", bad, err)
	}
	d := time.Since(t0)
	for {
		n, err := hfiuser.PollCQ(q.f, q.cq, wc[:1])
		if err != nil {
			b.Fatal(err)
		}
		if n == 1 {
			return d
		}
		runtime.Gosched()
	}
}
