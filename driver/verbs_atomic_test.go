package driver_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// atomEnd is one side of an atomics test: a file, an RC QP and a 4 KiB
// buffer registered with the given access.
type atomEnd struct {
	q   rcQP
	buf []byte
	mr  uapi.GohfiRegMR
}

const atomBuf = 4096

func newAtomEnd(t *testing.T, e *verbsEnv, f *driver.File, access uint32) atomEnd {
	t.Helper()
	if f == nil {
		f = verbsFile(t, e)
	}
	b := allocBuf(t, atomBuf, false)
	a := atomEnd{q: newRCQP(t, f, 16, 16, false), buf: unsafeSlice(b.Addr(), atomBuf)}
	var err error
	if a.mr, err = hfiuser.RegMR(f, b.Addr(), atomBuf, uint64(b.Addr()), access); err != nil {
		t.Fatal(err)
	}
	return a
}

// connect takes the QP to RTS towards dest, allowing qpAccess
// (IB_ACCESS_REMOTE_*) as a responder.
func (a atomEnd) connect(t *testing.T, dest, qpAccess uint32) {
	t.Helper()
	for _, s := range []uint32{uapi.GOHFI_QPS_INIT, uapi.GOHFI_QPS_RTR, uapi.GOHFI_QPS_RTS} {
		if err := hfiuser.ModifyQP(a.q.f, uapi.GohfiModifyQP{Handle: a.q.qp, QPState: s, DestQPNum: dest, AccessFlags: qpAccess}); err != nil {
			t.Fatalf("MODIFY_QP to %d: %v", s, err)
		}
	}
}

func (a atomEnd) addr(off int) uint64 { return uint64(uintptrOf(a.buf)) + uint64(off) }

func (a atomEnd) sge(off int, n uint32) []uapi.GohfiSge {
	return []uapi.GohfiSge{{Addr: a.addr(off), Length: n, Lkey: a.mr.Lkey}}
}

func (a atomEnd) u64(off int) uint64 { return binary.LittleEndian.Uint64(a.buf[off:]) }

func (a atomEnd) setU64(off int, v uint64) { binary.LittleEndian.PutUint64(a.buf[off:], v) }

func atomicWR(id uint64, op uint32, raddr uint64, rkey uint32, cmpAdd, swap uint64, sgl []uapi.GohfiSge) hfiuser.SendWR {
	return hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: id, Opcode: op, SendFlags: uapi.GOHFI_SEND_SIGNALED,
		RemoteAddr: raddr, Rkey: rkey, CompareAdd: cmpAdd, Swap: swap}, SGL: sgl}
}

const (
	atomLocal  = uapi.IB_ACCESS_LOCAL_WRITE
	atomRemote = uapi.IB_ACCESS_LOCAL_WRITE | uapi.IB_ACCESS_REMOTE_ATOMIC
)

// atomPair connects a requester (local buffer, LOCAL_WRITE) to a responder
// whose buffer has access mrB and whose QP allows qpB.
func atomPair(t *testing.T, e *verbsEnv, mrB, qpB uint32) (a, b atomEnd) {
	t.Helper()
	a, b = newAtomEnd(t, e, nil, atomLocal), newAtomEnd(t, e, nil, mrB)
	a.connect(t, b.q.qpn, 0)
	b.connect(t, a.q.qpn, qpB)
	return a, b
}

// TestVerbsAtomics: compare-and-swap that matches and one that does not,
// fetch-and-add (wrapping at 2^64): the target changes as the operation
// says, the value it held lands in the requester's 8-byte SGE, and the
// completion carries GOHFI_WC_COMP_SWAP / GOHFI_WC_FETCH_ADD and byte_len 8.
func TestVerbsAtomics(t *testing.T) {
	requireRoot(t)
	e := openVerbs(t, 2)
	e.requireEngine(t)
	a, b := atomPair(t, e, atomRemote, uapi.IB_ACCESS_REMOTE_ATOMIC)
	const target = 64
	b.setU64(target, 5)
	for i, c := range []struct {
		name             string
		op               uint32
		cmpAdd, swap     uint64
		wantOrig, wantTo uint64
		wcOp             uint32
	}{
		{"CAS equal", uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP, 5, 9, 5, 9, uapi.GOHFI_WC_COMP_SWAP},
		{"CAS not equal", uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP, 5, 1, 9, 9, uapi.GOHFI_WC_COMP_SWAP},
		{"FAA", uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD, 0x100, 0, 9, 0x109, uapi.GOHFI_WC_FETCH_ADD},
		{"FAA wraps", uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD, ^uint64(0x108), 0, 0x109, 0, uapi.GOHFI_WC_FETCH_ADD},
		{"CAS to all ones", uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP, 0, ^uint64(0), 0, ^uint64(0), uapi.GOHFI_WC_COMP_SWAP},
	} {
		res := 8 * (i + 1)
		a.setU64(res, 0xdeadbeef)
		wr := atomicWR(uint64(100+i), c.op, b.addr(target), b.mr.Rkey, c.cmpAdd, c.swap, a.sge(res, 8))
		if bad, err := hfiuser.PostSend(a.q.f, a.q.qp, []hfiuser.SendWR{wr}); err != nil || bad != 1 {
			t.Fatalf("%s: POST_SEND: bad_wr %d, %v", c.name, bad, err)
		}
		wc := pollWC(t, a.q.f, a.q.cq, 1)[0]
		if wc.Status != uapi.GOHFI_WC_SUCCESS || wc.Opcode != c.wcOp || wc.WrID != uint64(100+i) || wc.ByteLen != 8 || wc.QPNum != a.q.qpn {
			t.Fatalf("%s: completion %+v, want success, opcode %d, wr_id %d, byte_len 8", c.name, wc, c.wcOp, 100+i)
		}
		if got := a.u64(res); got != c.wantOrig {
			t.Errorf("%s: original value %#x, want %#x", c.name, got, c.wantOrig)
		}
		if got := b.u64(target); got != c.wantTo {
			t.Errorf("%s: target %#x, want %#x", c.name, got, c.wantTo)
		}
	}
	if st := e.qpState(t, a.q.qpn); st != uapi.GOHFI_QPS_RTS {
		t.Errorf("requester state %d after the atomics, want RTS", st)
	}
}

// TestVerbsAtomicConcurrentFAA: two requester QPs in two files add 1 to the
// same counter (through two responder QPs of one file) 300 times each,
// concurrently: the counter ends at 600 and the 600 values fetched are
// 0..599, each once (no two fetch-and-adds saw the same value).
func TestVerbsAtomicConcurrentFAA(t *testing.T) {
	requireRoot(t)
	e := openVerbs(t, 3)
	e.requireEngine(t)
	const perQP, batch = 300, 8
	fb := verbsFile(t, e)
	target := newAtomEnd(t, e, fb, atomRemote)
	b2 := atomEnd{q: newRCQP(t, fb, 16, 16, false)}
	reqs := []atomEnd{newAtomEnd(t, e, nil, atomLocal), newAtomEnd(t, e, nil, atomLocal)}
	for i, resp := range []rcQP{target.q, b2.q} {
		reqs[i].connect(t, resp.qpn, 0)
		atomEnd{q: resp}.connect(t, reqs[i].q.qpn, uapi.IB_ACCESS_REMOTE_ATOMIC)
	}
	const counter = 0
	target.setU64(counter, 0)

	run := func(a atomEnd) error {
		wc := make([]uapi.GohfiWC, batch)
		deadline := time.Now().Add(10 * time.Second)
		for done := 0; done < perQP; {
			n := min(batch, perQP-done)
			wrs := make([]hfiuser.SendWR, n)
			for i := range wrs {
				k := done + i
				wrs[i] = atomicWR(uint64(k), uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD, target.addr(counter), target.mr.Rkey, 1, 0, a.sge(8*k, 8))
			}
			if bad, err := hfiuser.PostSend(a.q.f, a.q.qp, wrs); err != nil || bad != n {
				return fmt.Errorf("POST_SEND: bad_wr %d of %d, %v", bad, n, err)
			}
			for got := 0; got < n; {
				k, err := hfiuser.PollCQ(a.q.f, a.q.cq, wc[:n-got])
				if err != nil {
					return err
				}
				for _, c := range wc[:k] {
					if c.Status != uapi.GOHFI_WC_SUCCESS || c.Opcode != uapi.GOHFI_WC_FETCH_ADD {
						return fmt.Errorf("completion %+v", c)
					}
				}
				got += k
				if k == 0 {
					if time.Now().After(deadline) {
						return fmt.Errorf("%d of %d completions after 10s", done+got, perQP)
					}
					ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
					a.q.f.Poll(ctx)
					cancel()
				}
			}
			done += n
		}
		return nil
	}
	var wg sync.WaitGroup
	errs := make([]error, len(reqs))
	for i := range reqs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = run(reqs[i])
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("requester %d: %v", i, err)
		}
	}
	if got := target.u64(counter); got != 2*perQP {
		t.Fatalf("counter %d, want %d", got, 2*perQP)
	}
	seen := make([]int, 2*perQP)
	for _, a := range reqs {
		for k := range perQP {
			v := a.u64(8 * k)
			if v >= 2*perQP {
				t.Fatalf("fetched value %d out of range", v)
			}
			seen[v]++
		}
	}
	for v, n := range seen {
		if n != 1 {
			t.Fatalf("value %d fetched %d times", v, n)
		}
	}
}

// TestVerbsAtomicErrors: the device's checks of an atomic. A remote_addr
// that is not 8-byte aligned is GOHFI_WC_REM_INV_REQ_ERR; a region or a
// responder QP without IB_ACCESS_REMOTE_ATOMIC is GOHFI_WC_REM_ACCESS_ERR
// (vendor_err access). Both move the requester (and the responder) to ERR
// and leave the target as it was; the WR after the failed one is flushed.
func TestVerbsAtomicErrors(t *testing.T) {
	requireRoot(t)
	e := openVerbs(t, 2)
	e.requireEngine(t)
	for _, c := range []struct {
		name           string
		mrB, qpB       uint32
		off            int
		status, vendor uint32
	}{
		{"misaligned", atomRemote, uapi.IB_ACCESS_REMOTE_ATOMIC, 68, uapi.GOHFI_WC_REM_INV_REQ_ERR, chip.VendorErrBadWQE},
		{"region without REMOTE_ATOMIC", atomLocal | uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ,
			uapi.IB_ACCESS_REMOTE_ATOMIC | uapi.IB_ACCESS_REMOTE_WRITE, 64, uapi.GOHFI_WC_REM_ACCESS_ERR, chip.VendorErrAccess},
		{"QP without REMOTE_ATOMIC", atomRemote, uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ,
			64, uapi.GOHFI_WC_REM_ACCESS_ERR, chip.VendorErrAccess},
	} {
		t.Run(c.name, func(t *testing.T) {
			a, b := atomPair(t, e, c.mrB, c.qpB)
			fill(b.buf, 7)
			want := string(b.buf)
			a.setU64(0, 0x1234)
			wrs := []hfiuser.SendWR{
				atomicWR(1, uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD, b.addr(c.off), b.mr.Rkey, 1, 0, a.sge(0, 8)),
				atomicWR(2, uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP, b.addr(64), b.mr.Rkey, 0, 1, a.sge(8, 8)),
			}
			postFailFlush(t, a.q, wrs, c.status, c.vendor)
			if string(b.buf) != want {
				t.Error("target memory changed")
			}
			if a.u64(0) != 0x1234 {
				t.Errorf("local SGE written (%#x) by a failed atomic", a.u64(0))
			}
			if st := e.qpState(t, a.q.qpn); st != uapi.GOHFI_QPS_ERR {
				t.Errorf("requester state %d, want ERR", st)
			}
			if st := e.qpState(t, b.q.qpn); st != uapi.GOHFI_QPS_ERR {
				t.Errorf("responder state %d, want ERR", st)
			}
		})
	}
}

// TestVerbsAtomicPostChecks: POST_SEND refuses, with EINVAL and bad_wr at
// the offending WR, an atomic whose scatter list is not exactly one 8-byte
// SGE (as mlx5 does) and atomic operands on a WR that does not use them;
// the WRs before it are posted and complete.
func TestVerbsAtomicPostChecks(t *testing.T) {
	requireRoot(t)
	e := openVerbs(t, 2)
	e.requireEngine(t)
	a, b := atomPair(t, e, atomRemote, uapi.IB_ACCESS_REMOTE_ATOMIC)
	good := func(id uint64) hfiuser.SendWR {
		return atomicWR(id, uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD, b.addr(0), b.mr.Rkey, 1, 0, a.sge(0, 8))
	}
	twoSGEs := append(a.sge(0, 4), a.sge(4, 4)...)
	for _, c := range []struct {
		name string
		wr   hfiuser.SendWR
	}{
		{"FAA with 4-byte SGE", atomicWR(9, uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD, b.addr(0), b.mr.Rkey, 1, 0, a.sge(0, 4))},
		{"CAS with 16-byte SGE", atomicWR(9, uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP, b.addr(0), b.mr.Rkey, 0, 1, a.sge(0, 16))},
		{"CAS with two 4-byte SGEs", atomicWR(9, uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP, b.addr(0), b.mr.Rkey, 0, 1, twoSGEs)},
		{"FAA without SGE", atomicWR(9, uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD, b.addr(0), b.mr.Rkey, 1, 0, []uapi.GohfiSge{})},
		{"FAA with swap set", atomicWR(9, uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD, b.addr(0), b.mr.Rkey, 1, 1, a.sge(0, 8))},
		{"RDMA_WRITE with compare_add set", atomicWR(9, uapi.GOHFI_WR_RDMA_WRITE, b.addr(0), b.mr.Rkey, 1, 0, a.sge(0, 8))},
	} {
		wrs := []hfiuser.SendWR{good(1), good(2), c.wr, good(3)}
		bad, err := hfiuser.PostSend(a.q.f, a.q.qp, wrs)
		wantErrno(t, c.name, err, unix.EINVAL)
		if bad != 2 {
			t.Errorf("%s: bad_wr %d, want 2", c.name, bad)
		}
		for _, wc := range pollWC(t, a.q.f, a.q.cq, 2) {
			wantWC(t, c.name+": posted WR", wc, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_FETCH_ADD, 8)
		}
	}
	// The previous layout's size is refused, not misread.
	ps := uapi.GohfiPostSend{QPHandle: a.q.qp, WrCount: 1, WrList: a.addr(0), WqeSize: 104}
	wantErrno(t, "wqe_size 104", hfiuser.Ioctl(a.q.f, uapi.GOHFI_IOCTL_POST_SEND, &ps), unix.EINVAL)
	if ps.BadWr != 0 {
		t.Errorf("wqe_size 104: bad_wr %d", ps.BadWr)
	}
}
