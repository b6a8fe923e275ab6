package driver_test

import (
	"bytes"
	"testing"

	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// TestMemfdTIDUnpinnedAndPinned: a memfd-backed buffer's TIDs pin nothing
// (the device maps the file), an anonymous buffer's pin every page; and a
// device write through a memfd TID whose buffer the application unmapped
// and replaced lands in the file, never in the new memory at the address.
func TestMemfdTIDUnpinnedAndPinned(t *testing.T) {
	a, tx, rx, dst := sendPair(t)
	const size = 64 << 10
	for _, memfd := range []bool{true, false} {
		buf := allocBuf(t, size, memfd)
		before := a.Device.Stats().PagesPinned
		tids, _, err := tidUpdate(rx.f, buf.Addr(), size)
		if err != nil {
			t.Fatal(err)
		}
		pinned := a.Device.Stats().PagesPinned - before
		if want := map[bool]uint64{true: 0, false: size / 4096}[memfd]; pinned != want {
			t.Errorf("memfd %v: %d pages pinned, want %d", memfd, pinned, want)
		}
		if _, err := tidFree(rx.f, tids); err != nil {
			t.Fatal(err)
		}
	}

	buf := allocBuf(t, size, true)
	tids, _, err := tidUpdate(rx.f, buf.Addr(), size)
	if err != nil || len(tids) != 1 {
		t.Fatalf("TID_UPDATE: %v %v", tids, err)
	}
	if err := buf.Unmap(); err != nil {
		t.Fatal(err)
	}
	fresh, err := unix.MmapPtr(-1, 0, unsafePtr(buf.Addr()), size, unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_FIXED)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.MunmapPtr(fresh, size) })
	payload := bytes.Repeat([]byte("late write "), 100)
	if err := hfiuser.Send(tx, uapi.GohfiSend{Opcode: uapi.GOHFI_SEND_EXPECTED, DstCtxt: dst, TID: tids[0]}, payload); err != nil {
		t.Fatal(err)
	}
	if e := rx.nextEntry(t); e.Type != uapi.GOHFI_RHF_EXPECTED {
		t.Fatalf("entry %+v", e)
	}
	if !bytes.Equal(unsafeSlice(buf.Addr(), len(payload)), make([]byte, len(payload))) {
		t.Fatal("the device wrote into the new memory at the old address")
	}
	got := make([]byte, len(payload))
	if _, err := buf.File().ReadAt(got, 0); err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("the file does not hold the late write (%v)", err)
	}
	if _, err := tidFree(rx.f, tids); err != nil {
		t.Fatal(err)
	}
}

// TestMemfdMRUnpinned: REG_MR of memfd-backed memory pins nothing, of
// anonymous memory every page; RDMA WRITE and READ through both move the
// data.
func TestMemfdMRUnpinned(t *testing.T) {
	e := openVerbs(t, 2)
	e.requireEngine(t)
	fa, fb := verbsFile(t, e), verbsFile(t, e)
	qa, qb := newRCQP(t, fa, 16, 4, true), newRCQP(t, fb, 16, 4, true)
	qa.connect(t, qb.qpn)
	qb.connect(t, qa.qpn)
	const size = 3 * 4096
	access := uint32(uapi.IB_ACCESS_LOCAL_WRITE | uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ)
	for _, memfd := range []bool{true, false} {
		local, remote := allocBuf(t, size, memfd), allocBuf(t, size, memfd)
		before := e.a.Device.Stats().PagesPinned
		lmr, err := hfiuser.RegMR(fa, local.Addr(), size, uint64(local.Addr()), access)
		if err != nil {
			t.Fatal(err)
		}
		rmr, err := hfiuser.RegMR(fb, remote.Addr(), size, uint64(remote.Addr()), access)
		if err != nil {
			t.Fatal(err)
		}
		if pinned, want := e.a.Device.Stats().PagesPinned-before, map[bool]uint64{true: 0, false: 2 * size / 4096}[memfd]; pinned != want {
			t.Errorf("memfd %v: %d pages pinned, want %d", memfd, pinned, want)
		}
		fill(local.Bytes(), 5)
		for i, op := range []uint32{uapi.GOHFI_WR_RDMA_WRITE, uapi.GOHFI_WR_RDMA_READ} {
			if op == uapi.GOHFI_WR_RDMA_READ {
				fill(remote.Bytes(), 9)
			}
			wr := hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: uint64(i), Opcode: op, RemoteAddr: uint64(remote.Addr()), Rkey: rmr.Rkey},
				SGL: []uapi.GohfiSge{{Addr: uint64(local.Addr()) + 100, Length: size - 200, Lkey: lmr.Lkey}}}
			if _, err := hfiuser.PostSend(fa, qa.qp, []hfiuser.SendWR{wr}); err != nil {
				t.Fatal(err)
			}
			wantWC(t, "RDMA", pollWC(t, fa, qa.cq, 1)[0], uapi.GOHFI_WC_SUCCESS, map[uint32]uint32{uapi.GOHFI_WR_RDMA_WRITE: uapi.GOHFI_WC_RDMA_WRITE, uapi.GOHFI_WR_RDMA_READ: uapi.GOHFI_WC_RDMA_READ}[op], size-200)
			if !bytes.Equal(local.Bytes()[100:size-100], remote.Bytes()[:size-200]) {
				t.Fatalf("memfd %v op %d: data differs", memfd, op)
			}
		}
		for _, m := range []struct {
			f *driver.File
			h uint32
		}{{fa, lmr.Handle}, {fb, rmr.Handle}} {
			if err := hfiuser.DeregMR(m.f, m.h); err != nil {
				t.Fatal(err)
			}
		}
	}
}
