package driver_test

import (
	"bytes"
	"context"
	"fmt"
	"runtime"
	"testing"
	"time"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/internal/testenv"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// The data path on the embedded device, next to memcpy of the same size in
// the same run: expected receives (SEND of the whole buffer, one packet per
// TID, into TIDs programmed once, several sends in flight) and RDMA WRITE
// and READ (a window of WRs in flight), into memfd-backed and anonymous
// buffers. Every message's data is checked after the timing (a changing
// pattern in the source, compared at the destination).
//
//	go test ./driver -run '^$' -bench DataPath -benchtime 200x

const dataPathWindow = 8 // sends or WRs in flight

func BenchmarkDataPath(b *testing.B) {
	testenv.RequireRoot(b, "io_uring pins for anonymous buffers")
	a, err := openLargeDevice()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { a.Close() })
	for _, size := range []int{1 << 20, 16 << 20} {
		b.Run(fmt.Sprintf("memcpy/%dMiB", size>>20), func(b *testing.B) {
			src, dst := allocBuf(b, size, false), allocBuf(b, size, false)
			fill(src.Bytes(), 1)
			b.SetBytes(int64(size))
			for range b.N {
				copy(dst.Bytes(), src.Bytes())
			}
			b.StopTimer()
			if !bytes.Equal(dst.Bytes(), src.Bytes()) {
				b.Fatal("memcpy differs")
			}
		})
		for _, memfd := range []bool{true, false} {
			kind := map[bool]string{true: "memfd", false: "anon"}[memfd]
			b.Run(fmt.Sprintf("expected/%s/%dMiB", kind, size>>20), func(b *testing.B) {
				benchExpected(b, a, size, memfd)
			})
		}
	}
	for _, op := range []uint32{uapi.GOHFI_WR_RDMA_WRITE, uapi.GOHFI_WR_RDMA_READ} {
		for _, memfd := range []bool{true, false} {
			name := map[uint32]string{uapi.GOHFI_WR_RDMA_WRITE: "write", uapi.GOHFI_WR_RDMA_READ: "read"}[op]
			kind := map[bool]string{true: "memfd", false: "anon"}[memfd]
			b.Run(fmt.Sprintf("%s/%s/1MiB", name, kind), func(b *testing.B) {
				benchRDMA(b, a, op, 1<<20, memfd)
			})
		}
	}
}

// openLargeDevice attaches an embedded device with two contexts of 2048
// RcvArray entries (8 MiB of TIDs each) and a module that, as the kernel,
// lets CAP_IPC_LOCK pin past RLIMIT_MEMLOCK: room for 16 MiB buffers.
func openLargeDevice() (*attach.Attached, error) {
	o := attach.DefaultOptions()
	o.Sim.NumContexts = 2
	o.Sim.RcvArrayPerCtxt = 2048
	o.Params.HonorCapIPCLock = true
	return attach.Open(context.Background(), "embedded", o)
}

// benchExpected: each op sends the source buffer into the receive buffer's
// TIDs (programmed once, per 8 MiB window as TID_UPDATE allows), keeping up
// to dataPathWindow sends in flight and consuming every header entry.
func benchExpected(b *testing.B, a *attach.Attached, size int, memfd bool) {
	tx, rx := openFile(b, a), openFile(b, a)
	assign(b, tx)
	assign(b, rx)
	bi, err := hfiuser.UserInfo(rx)
	if err != nil {
		b.Fatal(err)
	}
	p := a.Module.Params()
	rhq, err := rx.Mmap(bi.RcvhdrBufbase, p.RcvHdrCnt*uapi.SizeofGohfiRHQEntry, unix.PROT_READ)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { unix.Munmap(rhq) })
	ci, err := hfiuser.CtxtInfo(rx)
	if err != nil {
		b.Fatal(err)
	}
	src, dst := allocBuf(b, size, false), allocBuf(b, size, memfd)
	type piece struct {
		tid uint32
		off int
		n   int
	}
	var pieces []piece
	win := int(ci.Rcvtids) * 4096
	for off := 0; off < size; off += win {
		n := min(win, size-off)
		tids, got, err := hfiuser.TIDUpdate(rx, dst.Addr()+uintptr(off), n, make([]uint32, ci.Rcvtids))
		if err != nil || got != n {
			b.Fatalf("TID_UPDATE %d bytes at %d: %d, %v", n, off, got, err)
		}
		o := off
		for _, tid := range tids {
			k := min(int(uapi.ExpTidGet(tid, uapi.EXP_TID_LEN))*4096, off+n-o)
			pieces = append(pieces, piece{tid, o, k})
			o += k
		}
		b.Cleanup(func() { hfiuser.TIDFree(rx, tids) })
	}
	r := &rhqReader{f: rx, rhq: rhq, count: p.RcvHdrCnt}
	inFlight := 0
	b.SetBytes(int64(size))
	b.ResetTimer()
	for i := range b.N {
		b.StopTimer()
		fill(src.Bytes()[:64], byte(i)) // a new pattern for every message
		b.StartTimer()
		for _, pc := range pieces {
			s := uapi.GohfiSend{Opcode: uapi.GOHFI_SEND_EXPECTED, DstCtxt: ci.Ctxt, Length: uint32(pc.n),
				Vaddr: uint64(src.Addr()) + uint64(pc.off), TID: pc.tid}
			if err := hfiuser.Ioctl(tx, uapi.GOHFI_IOCTL_SEND, &s); err != nil {
				b.Fatal(err)
			}
			if inFlight++; inFlight >= dataPathWindow {
				r.expected(b)
				inFlight--
			}
		}
		if i == b.N-1 {
			for ; inFlight > 0; inFlight-- {
				r.expected(b)
			}
		}
	}
	b.StopTimer()
	if !bytes.Equal(dst.Bytes(), src.Bytes()) {
		b.Fatal("the last message differs at the receiver")
	}
	runtime.KeepAlive(src)
}

// rhqReader consumes a context's header queue through its mapping.
type rhqReader struct {
	f     *driver.File
	rhq   []byte
	count int
	next  int
	seq   uint32
}

func (r *rhqReader) expected(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	want := r.seq + 1
	if want == 0 {
		want = 1
	}
	for {
		var e uapi.GohfiRHQEntry
		if err := e.UnmarshalBytes(r.rhq[r.next*uapi.SizeofGohfiRHQEntry:]); err != nil {
			b.Fatal(err)
		}
		if e.Seq == want {
			// The device writes the seq last: read the rest again.
			if err := e.UnmarshalBytes(r.rhq[r.next*uapi.SizeofGohfiRHQEntry:]); err != nil {
				b.Fatal(err)
			}
			if e.Type != uapi.GOHFI_RHF_EXPECTED {
				b.Fatalf("header entry %+v", e)
			}
			r.seq, r.next = want, (r.next+1)%r.count
			if err := hfiuser.SetRcvHdrHead(r.f, uint64(r.next)); err != nil {
				b.Fatal(err)
			}
			return
		}
		if _, err := r.f.Poll(ctx); err != nil {
			b.Fatalf("waiting for a header entry: %v", err)
		}
	}
}

// benchRDMA: each op is one RDMA WRITE or READ of size bytes between two
// files' MRs, up to dataPathWindow in flight, every one signaled.
func benchRDMA(b *testing.B, a *attach.Attached, op uint32, size int, memfd bool) {
	fa, fb := openFile(b, a), openFile(b, a)
	assign(b, fa)
	assign(b, fb)
	qa, qb := newRCQP(b, fa, 64, 4, false), newRCQP(b, fb, 64, 4, false)
	qa.connect(b, qb.qpn)
	qb.connect(b, qa.qpn)
	local, remote := allocBuf(b, size, memfd), allocBuf(b, size, memfd)
	access := uint32(uapi.IB_ACCESS_LOCAL_WRITE | uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ)
	lmr, err := hfiuser.RegMR(fa, local.Addr(), uint64(size), uint64(local.Addr()), access)
	if err != nil {
		b.Fatal(err)
	}
	rmr, err := hfiuser.RegMR(fb, remote.Addr(), uint64(size), uint64(remote.Addr()), access)
	if err != nil {
		b.Fatal(err)
	}
	src, dst := local, remote
	if op == uapi.GOHFI_WR_RDMA_READ {
		src, dst = remote, local
	}
	fill(src.Bytes(), 3)
	wr := hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{Opcode: op, SendFlags: uapi.GOHFI_SEND_SIGNALED,
		RemoteAddr: uint64(remote.Addr()), Rkey: rmr.Rkey},
		SGL: []uapi.GohfiSge{{Addr: uint64(local.Addr()), Length: uint32(size), Lkey: lmr.Lkey}}}
	wc := make([]uapi.GohfiWC, dataPathWindow)
	inFlight := 0
	reap := func(min int) {
		for inFlight > min {
			n, err := hfiuser.PollCQ(fa, qa.cq, wc)
			if err != nil {
				b.Fatal(err)
			}
			for _, w := range wc[:n] {
				if w.Status != uapi.GOHFI_WC_SUCCESS {
					b.Fatalf("completion %+v", w)
				}
			}
			inFlight -= n
			if n == 0 {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				_, err := fa.Poll(ctx)
				cancel()
				if err != nil {
					b.Fatalf("waiting for completions: %v", err)
				}
			}
		}
	}
	b.SetBytes(int64(size))
	b.ResetTimer()
	for i := range b.N {
		wr.WrID = uint64(i)
		if bad, err := hfiuser.PostSend(fa, qa.qp, []hfiuser.SendWR{wr}); err != nil || bad != 1 {
			b.Fatalf("POST_SEND: %d, %v", bad, err)
		}
		inFlight++
		reap(dataPathWindow - 1)
	}
	reap(0)
	b.StopTimer()
	if !bytes.Equal(dst.Bytes(), src.Bytes()) {
		b.Fatal("data differs")
	}
}
