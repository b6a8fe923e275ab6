package hfisim

import (
	"encoding/binary"
	"errors"
	"os"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
)

// ringFile returns the eventfd the device offers for QP n's QPDBRing, as a
// client would get it from DEVICE_GET_REGION_IO_FDS.
func (h *vh) ringFile(n int) *os.File {
	h.t.Helper()
	subs, err := h.d.RegionIOFDs(chip.CSRBar)
	if err != nil {
		h.t.Fatal(err)
	}
	if len(subs) != h.d.cfg.NumQPs {
		h.t.Fatalf("%d ioeventfds for %d QPs", len(subs), h.d.cfg.NumQPs)
	}
	s := subs[n]
	if s.Offset != chip.QPDBReg(n, chip.QPDBRing) || s.Size != 8 || s.DataMatch || s.File == nil {
		h.t.Fatalf("ioeventfd of QP %d: %+v", n, s)
	}
	return s.File
}

// signal writes v to an eventfd as a client would.
func signalValue(t *testing.T, f *os.File, v uint64) error {
	t.Helper()
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	_, err := f.Write(b[:])
	return err
}

// TestDBRingWakes: an engine asleep on a QP with a record wakes for a
// write of QPDBRing (any value) and for a signal of its ioeventfd, and
// takes the index from the record each time.
func TestDBRingWakes(t *testing.T) {
	p := newDBRecPair(t, -1)
	h := p.h
	rec := p.asleep()
	if !h.storeSend(p.a, rec, p.write(2)) {
		t.Fatal("the driver did not see the notify flag")
	}
	wr(t, h.d, chip.QPDBReg(p.a.n, chip.QPDBRing), 0xdeadbeef)
	h.expectCQE(p.acq, 2, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
	h.d.SleepNow()
	f := h.ringFile(p.a.n)
	for i := uint64(3); i < 6; i++ {
		if !h.storeSend(p.a, rec, p.write(i)) {
			t.Fatal("the driver did not see the notify flag")
		}
		if err := signalValue(t, f, i*0x1111); err != nil {
			t.Fatal(err)
		}
		h.expectCQE(p.acq, i, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
		h.d.SleepNow()
	}
	if v := rd(t, h.d, chip.RegErrCntVerbs); v != 0 {
		t.Fatalf("ErrCntVerbs %d", v)
	}
}

// TestDBRingHostile: a ring of a QP without a record is refused and counted
// (register) or does nothing (ioeventfd, which cannot say which QP); the
// largest count an eventfd takes does no more than wake the engine, and
// the next ring still works.
func TestDBRingHostile(t *testing.T) {
	p := newDBRecPair(t, -1)
	h := p.h
	wr(t, h.d, chip.QPDBReg(p.b.n, chip.QPDBRing), 1) // no record
	if v := rd(t, h.d, chip.RegErrCntVerbs); v != 1 {
		t.Fatalf("ErrCntVerbs %d after a ring without a record, want 1", v)
	}
	rec := p.asleep()
	f := h.ringFile(p.b.n) // another QP's: any of them wakes the engine
	if err := signalValue(t, f, 1<<64-2); err != nil {
		t.Fatal(err)
	}
	if err := signalValue(t, f, 1<<64-1); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("eventfd took 2^64-1: %v", err)
	}
	stA, stB := h.state(p.a), h.state(p.b)
	h.d.waitIdle()
	if h.state(p.a) != stA || h.state(p.b) != stB {
		t.Fatal("a ring changed a QP's state")
	}
	if e, ok := h.peekCQ(p.acq); ok {
		t.Fatalf("a ring with nothing posted completed %+v", e)
	}
	if v := rd(t, h.d, chip.RegErrCntVerbs); v != 1 {
		t.Fatalf("ErrCntVerbs %d after ioeventfd rings, want 1", v)
	}
	h.d.SleepNow()
	if !h.storeSend(p.a, rec, p.write(2)) {
		t.Fatal("the driver did not see the notify flag")
	}
	if err := signalValue(t, f, 1); err != nil {
		t.Fatal(err)
	}
	h.expectCQE(p.acq, 2, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
}

// TestDBRingDetach: the eventfd is the attached client's: Detach closes it
// and stops its goroutine, a new client gets another, and a device closed
// while attached leaks neither.
func TestDBRingDetach(t *testing.T) {
	gs := runtime.NumGoroutine()
	h := newVerbs(t)
	f := h.ringFile(0)
	h.d.Detach()
	if _, err := f.Write(make([]byte, 8)); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("eventfd after Detach: %v", err)
	}
	if subs, err := h.d.RegionIOFDs(chip.CSRBar); err != nil || subs != nil {
		t.Fatalf("ioeventfds while detached: %v %v", subs, err)
	}
	h.d.Attach(h.dma)
	if g := h.ringFile(0); g == f {
		t.Fatal("the same eventfd for a new client")
	}
	if err := h.d.Close(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > gs {
		if time.Now().After(deadline) {
			t.Fatalf("goroutines %d -> %d", gs, runtime.NumGoroutine())
		}
		time.Sleep(time.Millisecond)
	}
}
