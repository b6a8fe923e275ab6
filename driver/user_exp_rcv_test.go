package driver_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"github.com/gohfi/gohfi/internal/testenv"
	"hash/crc32"
	"math/rand"
	"runtime"
	"testing"
	"time"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/mem"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// requireRoot: TID caching needs userfaultfd and io_uring pins.
func requireRoot(t testing.TB) {
	t.Helper()
	testenv.RequireRoot(t, "userfaultfd and io_uring pins")
}

type rxCtxt struct {
	f     *driver.File
	rhq   []byte
	count int
	next  int
}

func newRx(t *testing.T, a *attach.Attached) *rxCtxt {
	f := openFile(t, a)
	assign(t, f)
	var bi uapi.Hfi1BaseInfo
	if err := ioctl(f, uapi.HFI1_IOCTL_USER_INFO, &bi); err != nil {
		t.Fatal(err)
	}
	n := a.Module.Params().RcvHdrCnt
	rhq, err := f.Mmap(bi.RcvhdrBufbase, n*uapi.SizeofGohfiRHQEntry, unix.PROT_READ)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(rhq) })
	return &rxCtxt{f: f, rhq: rhq, count: n}
}

// nextEntry waits (bounded, through Poll) for the next header queue entry
// and consumes it.
func (r *rxCtxt) nextEntry(t *testing.T) uapi.GohfiRHQEntry {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for {
		var e uapi.GohfiRHQEntry
		if err := e.UnmarshalBytes(r.rhq[r.next*uapi.SizeofGohfiRHQEntry:]); err != nil {
			t.Fatal(err)
		}
		if e.Seq != 0 && int(e.Seq) > r.next || (r.next == 0 && e.Seq != 0) {
			// The device writes the seq last: read again for the rest.
			if err := e.UnmarshalBytes(r.rhq[r.next*uapi.SizeofGohfiRHQEntry:]); err != nil {
				t.Fatal(err)
			}
			r.next = (r.next + 1) % r.count
			head := make([]byte, 8)
			binary.LittleEndian.PutUint64(head, uint64(r.next))
			if _, err := r.f.Ioctl(uapi.GOHFI_IOCTL_RCVHDR_HEAD, argOf(head)); err != nil {
				t.Fatal(err)
			}
			return e
		}
		if _, err := r.f.Poll(ctx); err != nil {
			t.Fatalf("waiting for a header entry: %v", err)
		}
	}
}

func tidUpdate(f *driver.File, addr uintptr, length int) ([]uint32, int, error) {
	list := make([]uint32, 2048)
	ti := uapi.Hfi1TidInfo{Vaddr: uint64(addr), Tidlist: uint64(uintptrOfU32(list)), Tidcnt: uint32(len(list)), Length: uint32(length)}
	err := ioctl(f, uapi.HFI1_IOCTL_TID_UPDATE, &ti)
	runtime.KeepAlive(list)
	if err != nil {
		return nil, 0, err
	}
	return list[:ti.Tidcnt], int(ti.Length), nil
}

func tidFree(f *driver.File, tids []uint32) (int, error) {
	list := append([]uint32(nil), tids...)
	ti := uapi.Hfi1TidInfo{Tidlist: uint64(uintptrOfU32(list)), Tidcnt: uint32(len(list))}
	err := ioctl(f, uapi.HFI1_IOCTL_TID_FREE, &ti)
	runtime.KeepAlive(list)
	return int(ti.Tidcnt), err
}

func tidInvalRead(t *testing.T, f *driver.File) []uint32 {
	t.Helper()
	list := make([]uint32, 2048)
	ti := uapi.Hfi1TidInfo{Tidlist: uint64(uintptrOfU32(list)), Tidcnt: uint32(len(list))}
	if err := ioctl(f, uapi.HFI1_IOCTL_TID_INVAL_READ, &ti); err != nil {
		t.Fatal(err)
	}
	runtime.KeepAlive(list)
	return list[:ti.Tidcnt]
}

func tidPages(tid uint32) int { return int(uapi.ExpTidGet(tid, uapi.EXP_TID_LEN)) }

// sendExpected sends data into the receiver's TIDs in order, one packet per
// TID (and per 2 MiB), the way PSM walks a TID list after a rendezvous.
func sendExpected(t *testing.T, tx *driver.File, dst uint16, tids []uint32, data []byte) error {
	t.Helper()
	off := 0
	for _, tid := range tids {
		n := min(tidPages(tid)*4096, len(data)-off)
		if n <= 0 {
			break
		}
		s := uapi.GohfiSend{Opcode: uapi.GOHFI_SEND_EXPECTED, DstCtxt: dst, Length: uint32(n), Vaddr: uint64(uintptrOf(data[off:])), TID: tid}
		if err := ioctl(tx, uapi.GOHFI_IOCTL_SEND, &s); err != nil {
			return err
		}
		off += n
	}
	runtime.KeepAlive(data)
	return nil
}

func ctxtOf(t *testing.T, f *driver.File) uint16 {
	var ci uapi.Hfi1CtxtInfo
	if err := ioctl(f, uapi.HFI1_IOCTL_CTXT_INFO, &ci); err != nil {
		t.Fatal(err)
	}
	return ci.Ctxt
}

func allocBuf(t testing.TB, size int, memfd bool) *mem.Buffer {
	t.Helper()
	alloc := mem.Alloc
	if memfd {
		alloc = mem.AllocMemfd
	}
	b, err := alloc(size)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

// sendPair is a root-only device of two contexts: a sender's file and a
// receiver (its header queue mapped), and the receiver's context number.
func sendPair(t *testing.T) (a *attach.Attached, tx *driver.File, rx *rxCtxt, dst uint16) {
	t.Helper()
	requireRoot(t)
	a = openDev(t, 2)
	tx = openFile(t, a)
	assign(t, tx)
	rx = newRx(t, a)
	return a, tx, rx, ctxtOf(t, rx.f)
}

// TestExpectedReceiveIntact: data lands intact in TID buffers of many sizes,
// including buffers split across 2 MiB chunks, anonymous and memfd-backed.
func TestExpectedReceiveIntact(t *testing.T) {
	a, tx, rx, dst := sendPair(t)
	rng := rand.New(rand.NewSource(1))
	for _, size := range []int{4096, 8192, 64 << 10, 1 << 20, 3<<20 + 4096, 5 << 20} {
		for _, memfd := range []bool{false, true} {
			buf := allocBuf(t, size, memfd)
			tids, length, err := tidUpdate(rx.f, buf.Addr(), size)
			if err != nil {
				t.Fatalf("size %d: TID_UPDATE: %v", size, err)
			}
			if length != size {
				t.Fatalf("size %d: programmed %d", size, length)
			}
			pages := 0
			for _, tid := range tids {
				p := tidPages(tid)
				if p&(p-1) != 0 || p > 512 {
					t.Fatalf("TID %#x covers %d pages: not a power of two <= 512", tid, p)
				}
				pages += p
			}
			if pages*4096 < size {
				t.Fatalf("TIDs cover %d pages for %d bytes", pages, size)
			}
			data := make([]byte, size)
			rng.Read(data)
			if err := sendExpected(t, tx, dst, tids, data); err != nil {
				t.Fatal(err)
			}
			for range tids {
				if e := rx.nextEntry(t); e.Type != uapi.GOHFI_RHF_EXPECTED {
					t.Fatalf("entry %+v", e)
				}
			}
			if crc32.ChecksumIEEE(buf.Bytes()[:size]) != crc32.ChecksumIEEE(data) {
				t.Fatalf("size %d memfd %v: data differs", size, memfd)
			}
			if n, err := tidFree(rx.f, tids); err != nil || n != len(tids) {
				t.Fatalf("TID_FREE: %d %v", n, err)
			}
		}
	}
	st := a.Device.Stats()
	if st.PagesPinned != st.PagesUnpinned || st.TidsProgrammed != st.TidsFreed {
		t.Fatalf("after freeing everything: %+v", st)
	}
}

// TestTIDOffsetsAndErrors: sends at offsets inside a TID; a freed TID, a
// stale TID and another context's TID are refused.
func TestTIDOffsetsAndErrors(t *testing.T) {
	requireRoot(t)
	a := openDev(t, 3)
	tx := openFile(t, a)
	assign(t, tx)
	rx := newRx(t, a)
	other := newRx(t, a)
	dst := ctxtOf(t, rx.f)
	buf := allocBuf(t, 16<<10, false)
	tids, _, err := tidUpdate(rx.f, buf.Addr(), 16<<10)
	if err != nil || len(tids) != 1 {
		t.Fatalf("TID_UPDATE: %v %v", tids, err)
	}
	payload := bytes.Repeat([]byte{0xc3}, 1000)
	s := uapi.GohfiSend{Opcode: uapi.GOHFI_SEND_EXPECTED, DstCtxt: dst, Length: 1000, Vaddr: uint64(uintptrOf(payload)), TID: tids[0], TIDOffset: 12345}
	if err := ioctl(tx, uapi.GOHFI_IOCTL_SEND, &s); err != nil {
		t.Fatal(err)
	}
	if e := rx.nextEntry(t); e.Type != uapi.GOHFI_RHF_EXPECTED || e.TIDOffset != 12345 {
		t.Fatalf("entry %+v", e)
	}
	b := buf.Bytes()
	if !bytes.Equal(b[12345:13345], payload) || b[12344] != 0 || b[13345] != 0 {
		t.Fatal("payload not exactly at the offset")
	}
	// Past the end of the TID: the device refuses, nothing written.
	s.TIDOffset = 16<<10 - 10
	ioctl(tx, uapi.GOHFI_IOCTL_SEND, &s)
	if e := rx.nextEntry(t); e.Type != uapi.GOHFI_RHF_ERROR || e.Err&uapi.GOHFI_RHF_ERR_TID == 0 {
		t.Fatalf("overlong send: %+v", e)
	}
	// Another context cannot free our TID.
	if _, err := tidFree(other.f, tids); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("foreign TID_FREE: %v, want EINVAL", err)
	}
	if n, err := tidFree(rx.f, tids); err != nil || n != 1 {
		t.Fatalf("TID_FREE: %d %v", n, err)
	}
	if _, err := tidFree(rx.f, tids); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("double TID_FREE: %v, want EINVAL", err)
	}
	// A send into a freed TID is rejected by the device.
	s.TIDOffset = 0
	ioctl(tx, uapi.GOHFI_IOCTL_SEND, &s)
	if e := rx.nextEntry(t); e.Type != uapi.GOHFI_RHF_ERROR || e.Err&uapi.GOHFI_RHF_ERR_TID == 0 {
		t.Fatalf("send into freed TID: %+v", e)
	}
	runtime.KeepAlive(payload)
	// Malformed requests.
	if _, _, err := tidUpdate(rx.f, buf.Addr()+1, 4096); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("unaligned TID_UPDATE: %v, want EINVAL", err)
	}
	if _, _, err := tidUpdate(rx.f, buf.Addr(), 0); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("empty TID_UPDATE: %v, want EINVAL", err)
	}
	ti := uapi.Hfi1TidInfo{Vaddr: uint64(buf.Addr()), Tidlist: 64, Tidcnt: 4, Length: 4096}
	if err := ioctl(rx.f, uapi.HFI1_IOCTL_TID_UPDATE, &ti); !errors.Is(err, unix.EFAULT) {
		t.Fatalf("bad tidlist pointer: %v, want EFAULT", err)
	}
	if st := a.Device.Stats(); st.PagesPinned != st.PagesUnpinned {
		t.Fatalf("a failed TID_UPDATE left pins: %+v", st)
	}
}

// waitEvent waits (bounded) until the TID_MMU_NOTIFY bit is set.
func waitEvent(t *testing.T, f *driver.File) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for {
		ev, err := f.Poll(ctx)
		if err != nil {
			t.Fatalf("waiting for the TID_MMU_NOTIFY event: %v", err)
		}
		if ev&driver.POLLPRI != 0 {
			return
		}
	}
}

// TestMunmapInvalidation is the seed's promise: munmap of a registered
// buffer is reported through the event bit and TID_INVAL_READ with the
// right TIDs; the TIDs stay programmed and pinned, so a send into them
// completes into the old pages and never into memory mapped later at the
// same address; TID_FREE then releases them.
func TestMunmapInvalidation(t *testing.T) {
	a, tx, rx, dst := sendPair(t)

	size := 3 << 20 // TIDs of 2 MiB and 1 MiB
	buf := allocBuf(t, size, false)
	base := buf.Addr()
	tids, _, err := tidUpdate(rx.f, base, size)
	if err != nil || len(tids) != 2 {
		t.Fatalf("TID_UPDATE: %v %v", tids, err)
	}
	other := allocBuf(t, 64<<10, false)
	keep, _, err := tidUpdate(rx.f, other.Addr(), 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	// Partial munmap: one page inside the second (1 MiB) TID.
	if err := unix.MunmapPtr(unsafePtr(base+2<<20+8192), 4096); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, rx.f)
	got := tidInvalRead(t, rx.f)
	if len(got) != 1 || got[0] != tids[1] {
		t.Fatalf("TID_INVAL_READ %#x, want [%#x]", got, tids[1])
	}
	// Now the whole buffer, and new memory at the same address.
	if err := buf.Unmap(); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, rx.f)
	got = tidInvalRead(t, rx.f)
	if len(got) != 1 || got[0] != tids[0] {
		t.Fatalf("TID_INVAL_READ %#x, want [%#x]", got, tids[0])
	}
	if got := tidInvalRead(t, rx.f); len(got) != 0 {
		t.Fatalf("second TID_INVAL_READ %#x, want none", got)
	}
	fresh, err := unix.MmapPtr(-1, 0, unsafePtr(base), uintptr(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_FIXED_NOREPLACE)
	if err != nil || uintptr(fresh) != base {
		t.Fatalf("remap at %#x: %v", base, err)
	}
	defer unix.MunmapPtr(fresh, uintptr(size))
	data := bytes.Repeat([]byte{0x77}, size)
	if err := sendExpected(t, tx, dst, tids, data); err != nil {
		t.Fatal(err)
	}
	for range tids {
		if e := rx.nextEntry(t); e.Type != uapi.GOHFI_RHF_EXPECTED {
			t.Fatalf("send into an invalidated, not freed TID: %+v (the seed lets it complete)", e)
		}
	}
	for i, b := range unsafeSlice(base, size) {
		if b != 0 {
			t.Fatalf("byte %d of the new mapping was written by the device", i)
		}
	}
	st := a.Device.Stats()
	if st.TidInvalidations != 2 || st.TidInvalReads != 2 {
		t.Fatalf("stats %+v", st)
	}
	if n, err := tidFree(rx.f, tids); err != nil || n != 2 {
		t.Fatalf("TID_FREE of invalidated TIDs: %d %v", n, err)
	}
	// The untouched buffer's TID is still valid.
	if got := tidInvalRead(t, rx.f); len(got) != 0 {
		t.Fatalf("spurious invalidation %#x", got)
	}
	if _, err := tidFree(rx.f, keep); err != nil {
		t.Fatal(err)
	}
}

// TestUnmapOnInvalidateParam: the newer kernels' behaviour clears and
// unpins at invalidation; a send into the TID is then refused.
func TestUnmapOnInvalidateParam(t *testing.T) {
	requireRoot(t)
	o := attach.DefaultOptions()
	o.Sim.NumContexts = 2
	o.Params.TIDUnmapOnInvalidate = true
	a, err := attach.Open(context.Background(), "embedded", o)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	tx := openFile(t, a)
	assign(t, tx)
	rx := newRx(t, a)
	buf := allocBuf(t, 64<<10, false)
	tids, _, err := tidUpdate(rx.f, buf.Addr(), 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	buf.Unmap()
	waitEvent(t, rx.f)
	if got := tidInvalRead(t, rx.f); len(got) != 1 || got[0] != tids[0] {
		t.Fatalf("TID_INVAL_READ %#x", got)
	}
	if st := a.Device.Stats(); st.PagesUnpinned != st.PagesPinned {
		t.Fatalf("pages still pinned after invalidation: %+v", st)
	}
	data := make([]byte, 4096)
	sendExpected(t, tx, ctxtOf(t, rx.f), tids, data)
	if e := rx.nextEntry(t); e.Type != uapi.GOHFI_RHF_ERROR {
		t.Fatalf("send into a cleared TID: %+v", e)
	}
	if n, err := tidFree(rx.f, tids); err != nil || n != 1 {
		t.Fatalf("TID_FREE: %d %v", n, err)
	}
}

// TestMemlockLimit: pins past RLIMIT_MEMLOCK fail with ENOMEM and leave
// nothing programmed or pinned.
func TestMemlockLimit(t *testing.T) {
	requireRoot(t)
	var old unix.Rlimit
	unix.Getrlimit(unix.RLIMIT_MEMLOCK, &old)
	lim := unix.Rlimit{Cur: 1 << 20, Max: old.Max}
	if err := unix.Setrlimit(unix.RLIMIT_MEMLOCK, &lim); err != nil {
		t.Fatal(err)
	}
	defer unix.Setrlimit(unix.RLIMIT_MEMLOCK, &old)
	a := openDev(t, 1)
	rx := newRx(t, a)
	small := allocBuf(t, 512<<10, false)
	if _, _, err := tidUpdate(rx.f, small.Addr(), 512<<10); err != nil {
		t.Fatal(err)
	}
	big := allocBuf(t, 1<<20, false)
	if _, _, err := tidUpdate(rx.f, big.Addr(), 1<<20); !errors.Is(err, unix.ENOMEM) {
		t.Fatalf("TID_UPDATE past the memlock limit: %v, want ENOMEM", err)
	}
	st := a.Device.Stats()
	if st.TidsProgrammed != 1 || st.PagesPinned-st.PagesUnpinned != 128 {
		t.Fatalf("after ENOMEM: %+v", st)
	}
}

// TestRcvArrayExhaustion: a context with 16 entries runs out; the call
// that straddles the end succeeds partially, the next gets ENOSPC.
func TestRcvArrayExhaustion(t *testing.T) {
	requireRoot(t)
	o := attach.DefaultOptions()
	o.Sim.NumContexts = 1
	o.Sim.RcvArrayPerCtxt = 16
	a, err := attach.Open(context.Background(), "embedded", o)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	rx := newRx(t, a)
	buf := allocBuf(t, 15*4096, false) // 8+4+2+1 pages: 4 TIDs
	var all []uint32
	for i := 0; i < 4; i++ {
		tids, length, err := tidUpdate(rx.f, buf.Addr(), 15*4096)
		if err != nil || length != 15*4096 || len(tids) != 4 {
			t.Fatalf("round %d: %d TIDs, %d bytes, %v", i, len(tids), length, err)
		}
		all = append(all, tids...)
	}
	if _, _, err := tidUpdate(rx.f, buf.Addr(), 4096); !errors.Is(err, unix.ENOSPC) {
		t.Fatalf("full RcvArray: %v, want ENOSPC", err)
	}
	if _, err := tidFree(rx.f, all[:2]); err != nil {
		t.Fatal(err)
	}
	tids, length, err := tidUpdate(rx.f, buf.Addr(), 15*4096)
	if err != nil || len(tids) != 2 || length != 12*4096 {
		t.Fatalf("partial TID_UPDATE: %d TIDs, %d bytes, %v; want 2 TIDs, %d bytes", len(tids), length, err, 12*4096)
	}
}

// TestCloseUnprogramsEverything: Close leaves no programmed entry and no pin.
func TestCloseUnprogramsEverything(t *testing.T) {
	requireRoot(t)
	a := openDev(t, 1)
	rx := newRx(t, a)
	buf := allocBuf(t, 4<<20, false)
	if _, _, err := tidUpdate(rx.f, buf.Addr(), 4<<20); err != nil {
		t.Fatal(err)
	}
	if err := rx.f.Close(); err != nil {
		t.Fatal(err)
	}
	st := a.Device.Stats()
	if st.PagesPinned == 0 || st.PagesPinned != st.PagesUnpinned {
		t.Fatalf("after close: %+v", st)
	}
	for i, b := range a.Sim.Device.RcvArraySnapshot() {
		if b != 0 {
			t.Fatalf("RcvArray entry %d still programmed after close", i)
		}
	}
}

// TestFreeRacingInvalidate: TID_FREE while the notifier is delivering the
// munmap of the same buffer must not deadlock (Remove waits for a running
// Invalidate, which needs the lock TID_FREE holds).
func TestFreeRacingInvalidate(t *testing.T) {
	requireRoot(t)
	a := openDev(t, 1)
	rx := newRx(t, a)
	done := make(chan error, 1)
	go func() {
		for i := 0; i < 200; i++ {
			b, err := mem.Alloc(64 << 10)
			if err != nil {
				done <- err
				return
			}
			tids, _, err := tidUpdate(rx.f, b.Addr(), 64<<10)
			if err != nil {
				done <- err
				return
			}
			b.Unmap() // the invalidation races with the free below
			if _, err := tidFree(rx.f, tids); err != nil {
				done <- err
				return
			}
			b.Close()
		}
		done <- nil
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(60 * time.Second):
		buf := make([]byte, 1<<20)
		t.Fatalf("TID_FREE racing an invalidation deadlocked\n%s", buf[:runtime.Stack(buf, true)])
	}
	st := a.Device.Stats()
	if st.TidsProgrammed != st.TidsFreed || st.PagesPinned != st.PagesUnpinned {
		t.Fatalf("after the race: %+v", st)
	}
}

// TestTIDUpdateRacingUnmap: an munmap that lands while TID_UPDATE is pinning
// (hfi1's 2023 cover-notifier fix) fails the call with EBUSY and leaves
// nothing programmed, pinned or mapped.
func TestTIDUpdateRacingUnmap(t *testing.T) {
	requireRoot(t)
	a := openDev(t, 1)
	rx := newRx(t, a)
	buf := allocBuf(t, 256<<10, false)
	driver.SetTIDUpdateHook(a.Module, func() {
		buf.Unmap()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := a.Device.SyncNotifier(ctx); err != nil {
			t.Errorf("sync: %v", err)
		}
	})
	_, _, err := tidUpdate(rx.f, buf.Addr(), 256<<10)
	driver.SetTIDUpdateHook(a.Module, nil)
	if !errors.Is(err, unix.EBUSY) {
		t.Fatalf("TID_UPDATE racing munmap: %v, want EBUSY", err)
	}
	st := a.Device.Stats()
	if st.TidsProgrammed != 0 || st.PagesPinned != st.PagesUnpinned {
		t.Fatalf("after EBUSY: %+v", st)
	}
	for i, v := range a.Sim.Device.RcvArraySnapshot() {
		if v != 0 {
			t.Fatalf("RcvArray entry %d programmed after EBUSY", i)
		}
	}
	if got := tidInvalRead(t, rx.f); len(got) != 0 {
		t.Fatalf("EBUSY left TIDs to report: %#x", got)
	}
}
