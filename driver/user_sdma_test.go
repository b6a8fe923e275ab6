package driver_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"math/rand"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/mem"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// sdmaSend posts one SDMA send of [addr, addr+n) into tid at off and
// returns its completion number.
func sdmaSend(tx *driver.File, dst uint16, tid, off uint32, addr uintptr, n int, flags uint8) (uint64, error) {
	s := uapi.GohfiSend{Opcode: uapi.GOHFI_SEND_EXPECTED, Flags: uapi.GOHFI_SEND_FLAG_SDMA | flags, DstCtxt: dst,
		Length: uint32(n), Vaddr: uint64(addr), TID: tid, TIDOffset: off}
	err := ioctl(tx, uapi.GOHFI_IOCTL_SEND, &s)
	return s.Reserved, err
}

// eventsPage maps f's events page read-only.
func eventsPage(t *testing.T, f *driver.File) []byte {
	t.Helper()
	var bi uapi.Hfi1BaseInfo
	if err := ioctl(f, uapi.HFI1_IOCTL_USER_INFO, &bi); err != nil {
		t.Fatal(err)
	}
	ev, err := f.Mmap(bi.EventsBufbase, 4096, unix.PROT_READ)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(ev) })
	return ev
}

// waitSDMADone waits, polling the events page as an application would, until
// the SDMA sends up to completion number n have left their buffers.
func waitSDMADone(t *testing.T, ev []byte, n uint64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for binary.LittleEndian.Uint64(ev[uapi.GOHFI_EVENTS_SDMA_DONE_OFF:]) < n {
		if time.Now().After(deadline) {
			t.Fatalf("SDMA_DONE is %d, send %d never completed", binary.LittleEndian.Uint64(ev[uapi.GOHFI_EVENTS_SDMA_DONE_OFF:]), n)
		}
		runtime.Gosched()
	}
}

// TestSDMASendSizes: SDMA sends of 1 B to 2 MiB from memfd-backed and
// anonymous buffers, at page offsets and not, land intact; completion
// numbers count up and the events page reports each; anonymous buffers are
// pinned (once, cached), memfd ones not; Close gives every pin and mapping
// back.
func TestSDMASendSizes(t *testing.T) {
	a, tx, rx, dst := sendPair(t)
	ev := eventsPage(t, tx)
	dstBuf := allocBuf(t, 2<<20, true)
	tids, n, err := tidUpdate(rx.f, dstBuf.Addr(), 2<<20)
	if err != nil || n != 2<<20 || len(tids) != 1 {
		t.Fatalf("TID_UPDATE: %v %d %v", tids, n, err)
	}
	iovasBefore, pinsBefore := a.Device.IOVAAllocations(), a.Device.PinnedNow()
	statsBefore := a.Device.Stats()
	rng := rand.New(rand.NewSource(12))
	var seq uint64
	for _, memfd := range []bool{true, false} {
		src := allocBuf(t, 2<<20+4096, memfd)
		for _, size := range []int{1, 100, 4095, 4096, 4097, 64<<10 + 3, 1 << 20, 2 << 20} {
			for _, at := range []int{0, 1234} {
				if at+size > src.Len() {
					continue
				}
				data := src.Bytes()[at : at+size]
				rng.Read(data)
				got, err := sdmaSend(tx, dst, tids[0], 0, src.Addr()+uintptr(at), size, 0)
				if err != nil {
					t.Fatalf("memfd %v size %d at %d: SEND: %v", memfd, size, at, err)
				}
				if seq++; got != seq {
					t.Fatalf("completion number %d, want %d", got, seq)
				}
				if e := rx.nextEntry(t); e.Type != uapi.GOHFI_RHF_EXPECTED || e.Length != uint32(size) {
					t.Fatalf("memfd %v size %d: entry %+v", memfd, size, e)
				}
				waitSDMADone(t, ev, seq)
				if !bytes.Equal(dstBuf.Bytes()[:size], data) {
					t.Fatalf("memfd %v size %d at %d: data differs", memfd, size, at)
				}
			}
		}
		pinned := a.Device.Stats().PagesPinned - statsBefore.PagesPinned
		if memfd && pinned != 0 {
			t.Errorf("memfd-backed sends pinned %d pages", pinned)
		}
		if !memfd && pinned == 0 {
			t.Error("anonymous sends pinned nothing")
		}
	}
	if l := driver.SDMACacheLen(tx); l == 0 {
		t.Error("the SDMA cache holds nothing after the sends")
	}
	if err := tx.Close(); err != nil {
		t.Fatal(err)
	}
	st := a.Device.Stats()
	if a.Device.PinnedNow() != pinsBefore || st.PagesPinned-statsBefore.PagesPinned != st.PagesUnpinned-statsBefore.PagesUnpinned {
		t.Errorf("after Close: %d pins (before %d), %d pages pinned, %d unpinned", a.Device.PinnedNow(), pinsBefore,
			st.PagesPinned-statsBefore.PagesPinned, st.PagesUnpinned-statsBefore.PagesUnpinned)
	}
	// The sender's context rings were mapped before the count was taken.
	if got, want := a.Device.IOVAAllocations(), iovasBefore-6+1; got > iovasBefore {
		t.Errorf("after Close: %d IOVA ranges held, %d before (want at most %d)", got, iovasBefore, want)
	}
}

// TestSDMAFreeAndReuse: a send buffer unmapped right after its completion
// and replaced by new memory at the same address with other data is sent
// again: the receiver gets the new data, never the old pages a stale cache
// entry would still map. Both kinds of memory, replaced by both kinds.
func TestSDMAFreeAndReuse(t *testing.T) {
	a, tx, rx, dst := sendPair(t)
	ev := eventsPage(t, tx)
	dstBuf := allocBuf(t, 2<<20, true)
	tids, _, err := tidUpdate(rx.f, dstBuf.Addr(), 2<<20)
	if err != nil || len(tids) != 1 {
		t.Fatalf("TID_UPDATE: %v %v", tids, err)
	}
	pinsBefore := a.Device.PinnedNow()
	const size = 256 << 10
	for _, memfd := range []bool{true, false} {
		for _, againMemfd := range []bool{true, false} {
			src := allocBuf(t, size, memfd)
			addr := src.Addr()
			for round := range 3 {
				fill := byte('a' + round)
				data := unsafeSlice(addr, size)
				for i := range data {
					data[i] = fill + byte(i%7)
				}
				n, err := sdmaSend(tx, dst, tids[0], 0, addr, size, 0)
				if err != nil {
					t.Fatalf("round %d: SEND: %v", round, err)
				}
				if e := rx.nextEntry(t); e.Type != uapi.GOHFI_RHF_EXPECTED {
					t.Fatalf("round %d: entry %+v", round, e)
				}
				waitSDMADone(t, ev, n)
				if !bytes.Equal(dstBuf.Bytes()[:size], data) {
					t.Fatalf("memfd %v, then memfd %v: round %d: the receiver got old data", memfd, againMemfd, round)
				}
				// Free the buffer and map new memory at the same address.
				if round == 0 {
					if err := src.Unmap(); err != nil {
						t.Fatal(err)
					}
				} else if err := unix.MunmapPtr(unsafePtr(addr), size); err != nil {
					t.Fatal(err)
				}
				mapAt(t, addr, size, againMemfd)
			}
			if err := unix.MunmapPtr(unsafePtr(addr), size); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Each freed buffer's entry was dropped and released once idle.
	if err := a.Device.SyncNotifier(context.Background()); err != nil {
		t.Fatal(err)
	}
	if l := driver.SDMACacheLen(tx); l != 0 {
		t.Errorf("%d SDMA cache entries left for unmapped memory", l)
	}
	if p := a.Device.PinnedNow(); p != pinsBefore {
		t.Errorf("%d pins held for unmapped memory, %d before", p, pinsBefore)
	}
}

// mapAt maps size bytes of fresh memory (memfd-backed or anonymous) at addr.
func mapAt(t *testing.T, addr uintptr, size int, memfd bool) {
	t.Helper()
	if !memfd {
		if _, err := unix.MmapPtr(-1, 0, unsafePtr(addr), uintptr(size), unix.PROT_READ|unix.PROT_WRITE,
			unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_FIXED); err != nil {
			t.Fatal(err)
		}
		return
	}
	fd, err := unix.MemfdCreate("sdma-reuse", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		t.Fatal(err)
	}
	if _, err := unix.MmapPtr(fd, 0, unsafePtr(addr), uintptr(size), unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_SHARED|unix.MAP_FIXED); err != nil {
		t.Fatal(err)
	}
}

// TestSDMAErrors: unmapped memory is EFAULT, as is an address outside user
// space; unknown flag bits and a set reserved field are EINVAL; nothing is
// posted or left pinned.
func TestSDMAErrors(t *testing.T) {
	a, tx, rx, dst := sendPair(t)
	dstBuf := allocBuf(t, 1<<20, true)
	tids, _, err := tidUpdate(rx.f, dstBuf.Addr(), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	pins := a.Device.PinnedNow()
	gone := allocBuf(t, 64<<10, false)
	addr := gone.Addr()
	if err := gone.Unmap(); err != nil {
		t.Fatal(err)
	}
	if _, err := sdmaSend(tx, dst, tids[0], 0, addr, 64<<10, 0); !errors.Is(err, unix.EFAULT) {
		t.Errorf("SEND from unmapped memory: %v, want EFAULT", err)
	}
	if _, err := sdmaSend(tx, dst, tids[0], 0, 1<<47-4096, 8192, 0); !errors.Is(err, unix.EFAULT) {
		t.Errorf("SEND from beyond user space: %v, want EFAULT", err)
	}
	src := allocBuf(t, 4096, true)
	if _, err := sdmaSend(tx, dst, tids[0], 0, src.Addr(), 4096, 1<<5); !errors.Is(err, unix.EINVAL) {
		t.Errorf("SEND with flag bit 5: %v, want EINVAL", err)
	}
	s := uapi.GohfiSend{Opcode: uapi.GOHFI_SEND_EXPECTED, Flags: uapi.GOHFI_SEND_FLAG_SDMA, DstCtxt: dst,
		Length: 4096, Vaddr: uint64(src.Addr()), TID: tids[0], Reserved: 1}
	if err := ioctl(tx, uapi.GOHFI_IOCTL_SEND, &s); !errors.Is(err, unix.EINVAL) {
		t.Errorf("SEND with reserved set: %v, want EINVAL", err)
	}
	if p := a.Device.PinnedNow(); p != pins {
		t.Errorf("%d pins after failed sends, %d before", p, pins)
	}
	// The context still works; with a fence, the send has completed when
	// SEND returns.
	ev := eventsPage(t, tx)
	n, err := sdmaSend(tx, dst, tids[0], 0, src.Addr(), 4096, uapi.GOHFI_SEND_FLAG_WAIT)
	if err != nil || n != 1 {
		t.Fatalf("SEND after the errors: %d %v", n, err)
	}
	if done := binary.LittleEndian.Uint64(ev[uapi.GOHFI_EVENTS_SDMA_DONE_OFF:]); done != 1 {
		t.Errorf("SDMA_DONE %d after a SEND with GOHFI_SEND_FLAG_WAIT, want 1", done)
	}
	if e := rx.nextEntry(t); e.Type != uapi.GOHFI_RHF_EXPECTED {
		t.Fatalf("entry %+v", e)
	}
}

// TestSDMACloseInFlight: Close while SDMA sends are in flight (a sender
// goroutine keeps posting until the file is closed under it) releases every
// mapping and pin; the sends after it fail with EBADF.
func TestSDMACloseInFlight(t *testing.T) {
	for _, memfd := range []bool{false, true} {
		a, tx, rx, dst := sendPair(t)
		dstBuf := allocBuf(t, 2<<20, true)
		tids, _, err := tidUpdate(rx.f, dstBuf.Addr(), 2<<20)
		if err != nil {
			t.Fatal(err)
		}
		pins, iovas := a.Device.PinnedNow(), a.Device.IOVAAllocations()
		srcs := make([]*mem.Buffer, 4)
		for i := range srcs {
			srcs[i] = allocBuf(t, 1<<20, memfd)
		}
		started := make(chan struct{})
		var wg sync.WaitGroup
		var sendErr error
		wg.Go(func() {
			for i := 0; ; i++ {
				_, err := sdmaSend(tx, dst, tids[0], 0, srcs[i%len(srcs)].Addr(), 1<<20, 0)
				if i == 8 {
					close(started)
				}
				if err != nil {
					sendErr = err
					if i <= 8 {
						close(started)
					}
					return
				}
			}
		})
		<-started
		if err := tx.Close(); err != nil {
			t.Fatal(err)
		}
		wg.Wait()
		if !errors.Is(sendErr, unix.EBADF) {
			t.Errorf("memfd %v: a send after Close: %v, want EBADF", memfd, sendErr)
		}
		if p := a.Device.PinnedNow(); p != pins {
			t.Errorf("memfd %v: %d pins after Close, %d before", memfd, p, pins)
		}
		// The sender's rings were freed too: fewer ranges than before.
		if n := a.Device.IOVAAllocations(); n >= iovas {
			t.Errorf("memfd %v: %d IOVA ranges after Close, %d before", memfd, n, iovas)
		}
	}
}

// TestSDMADeviceDeath: with SDMA sends of anonymous (pinned) memory in
// flight (the device process never consumes them), the device process
// dies: a later SDMA send fails with ENXIO, and Close gives back every pin.
func TestSDMADeviceDeath(t *testing.T) {
	requireRoot(t)
	p := startDeviceProcess(t)
	tx := openFile(t, p.a)
	assign(t, tx)
	pins := p.a.Device.PinnedNow()
	src := allocBuf(t, 64<<10, false)
	dst := ctxtOf(t, tx)
	send := func(flags uint8) error {
		s := uapi.GohfiSend{Opcode: uapi.GOHFI_SEND_EAGER, Flags: uapi.GOHFI_SEND_FLAG_SDMA | flags, DstCtxt: dst,
			Length: 64 << 10, Vaddr: uint64(src.Addr())}
		return ioctl(tx, uapi.GOHFI_IOCTL_SEND, &s)
	}
	if err := send(0); err != nil {
		t.Fatalf("SEND: %v", err)
	}
	if p.a.Device.PinnedNow() == pins {
		t.Fatal("the anonymous send buffer is not pinned")
	}
	if err := send(0); err != nil {
		t.Fatalf("SEND: %v", err)
	}
	p.kill(t)
	deadline := time.Now().Add(10 * time.Second)
	var err error
	for err = send(0); !errors.Is(err, unix.ENXIO); err = send(0) {
		// The driver learns of the death at its next device access or
		// interrupt wait: sends before that are posted into the void.
		if err != nil || time.Now().After(deadline) {
			t.Fatalf("SEND on a dead device: %v, want ENXIO", err)
		}
	}
	if err := tx.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if n := p.a.Device.PinnedNow(); n != pins {
		t.Errorf("%d pins after Close on a dead device, %d before", n, pins)
	}
}

// TestSDMABurstEventsCount: an application that posts a burst of SDMA
// sends and then only watches the events page (no further system call)
// sees the count reach the burst's last send, whether the burst ends with
// an SDMA send or with a copying send posted behind it; bursts of 1 to 40
// sends, not multiples of the driver's interrupt interval.
func TestSDMABurstEventsCount(t *testing.T) {
	_, tx, rx, dst := sendPair(t)
	ev := eventsPage(t, tx)
	dstBuf := allocBuf(t, 64<<10, true)
	tids, n, err := tidUpdate(rx.f, dstBuf.Addr(), 64<<10)
	if err != nil || n != 64<<10 || len(tids) != 1 {
		t.Fatalf("TID_UPDATE: %v %d %v", tids, n, err)
	}
	src := allocBuf(t, 64<<10, true)
	var seq uint64
	for _, burst := range []int{1, 3, 17, 40} {
		for _, pioLast := range []bool{false, true} {
			for i := range burst {
				got, err := sdmaSend(tx, dst, tids[0], uint32(i*1024), src.Addr()+uintptr(i*1024), 1024, 0)
				if err != nil {
					t.Fatalf("burst %d: SDMA SEND %d: %v", burst, i, err)
				}
				if seq++; got != seq {
					t.Fatalf("completion number %d, want %d", got, seq)
				}
			}
			entries := burst
			if pioLast {
				m := uapi.GohfiSend{Opcode: uapi.GOHFI_SEND_EXPECTED, DstCtxt: dst, Length: 8,
					Vaddr: uint64(src.Addr()), TID: tids[0]}
				if err := ioctl(tx, uapi.GOHFI_IOCTL_SEND, &m); err != nil {
					t.Fatalf("burst %d: copying SEND: %v", burst, err)
				}
				entries++
			}
			waitSDMADone(t, ev, seq)
			for range entries {
				if e := rx.nextEntry(t); e.Type != uapi.GOHFI_RHF_EXPECTED {
					t.Fatalf("burst %d: entry %+v", burst, e)
				}
			}
		}
	}
}

// TestSDMAStreamCompletions: a stream of SDMA sends without FLAG_WAIT, as a
// library posts them, ends with every completion on the events page: the
// descriptors ask for one interrupt when the device's send queue runs empty
// (chip.DescFlagIntrIdle), and each SEND reaps what was consumed before it.
// The last sends have no later SEND to reap them: only the interrupt can
// report them.
func TestSDMAStreamCompletions(t *testing.T) {
	a, tx, rx, dst := sendPair(t)
	ev := eventsPage(t, tx)
	dstBuf := allocBuf(t, 1<<20, true)
	tids, _, err := tidUpdate(rx.f, dstBuf.Addr(), 1<<20)
	if err != nil || len(tids) != 1 {
		t.Fatalf("TID_UPDATE: %v %v", tids, err)
	}
	src := allocBuf(t, 1<<20, true)
	txCtxt := ctxtOf(t, tx)
	sub := a.Module.Trace(1 << 12)
	defer sub.Stop()
	const sends = 200 // fewer than the receiver's header queue entries
	var seq uint64
	for i := range sends {
		off := (i % 256) * 4096
		got, err := sdmaSend(tx, dst, tids[0], uint32(off), src.Addr()+uintptr(off), 4096, 0)
		if err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
		if seq++; got != seq {
			t.Fatalf("completion number %d, want %d", got, seq)
		}
	}
	waitSDMADone(t, ev, sends)
	for range sends {
		if e := rx.nextEntry(t); e.Type != uapi.GOHFI_RHF_EXPECTED || e.Length != 4096 {
			t.Fatalf("entry %+v", e)
		}
	}
	irqs := 0
	for len(sub.Events()) > 0 {
		if e := <-sub.Events(); e.Kind == driver.TraceInterrupt && e.A&chip.IntSrcCtxt(int(txCtxt)) != 0 {
			irqs++
		}
	}
	t.Logf("%d SDMA sends, %d interrupts of the sender", sends, irqs)
	if irqs > sends {
		t.Fatalf("%d interrupts for %d sends", irqs, sends)
	}
}
