package driver_test

import (
	"bytes"
	"hash/crc32"
	"math/rand"
	"runtime"
	"testing"
	"time"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/uapi"
)

// TestPostedSendsInFlight: SEND returns before the device has consumed the
// descriptor, so several are in flight; sends larger than what is left at
// the end of the 4 MiB send buffer start again at its start, waiting for
// the device to free it. Every packet arrives, in order, with its data.
func TestPostedSendsInFlight(t *testing.T) {
	_, tx, rx, dst := sendPair(t)
	const piece = 3 << 19 // 1.5 MiB: the third does not fit before the ring's end
	buf := allocBuf(t, 8<<20, true)
	tids, n, err := tidUpdate(rx.f, buf.Addr(), 8<<20)
	if err != nil || n != 8<<20 || len(tids) != 4 {
		t.Fatalf("TID_UPDATE: %d TIDs, %d bytes, %v", len(tids), n, err)
	}
	rng := rand.New(rand.NewSource(2))
	data := make([]byte, 6*piece)
	rng.Read(data)
	type sent struct {
		tid, off uint32
		data     []byte
	}
	var sends []sent
	for i := range 5 {
		// TIDs 0..3 at offset 0, then TID 0 again past the first piece.
		s := sent{tid: tids[i%4], data: data[i*piece : (i+1)*piece]}
		if i == 4 {
			s.off, s.data = piece, s.data[:2<<20-piece]
		}
		sends = append(sends, s)
		m := uapi.GohfiSend{Opcode: uapi.GOHFI_SEND_EXPECTED, DstCtxt: dst, Length: uint32(len(s.data)),
			Vaddr: uint64(uintptrOf(s.data)), TID: s.tid, TIDOffset: s.off, Tag: uint64(i + 1)}
		if err := ioctl(tx, uapi.GOHFI_IOCTL_SEND, &m); err != nil {
			t.Fatalf("SEND %d: %v", i, err)
		}
	}
	runtime.KeepAlive(data)
	for i := range sends {
		if e := rx.nextEntry(t); e.Type != uapi.GOHFI_RHF_EXPECTED || e.Tag != uint64(i+1) {
			t.Fatalf("entry %d: %+v", i, e)
		}
	}
	b := buf.Bytes()
	for i, s := range sends {
		at := tidIndex(tids, s.tid)*(2<<20) + int(s.off)
		if crc32.ChecksumIEEE(b[at:at+len(s.data)]) != crc32.ChecksumIEEE(s.data) {
			t.Errorf("send %d: data differs", i)
		}
	}
	if _, err := tidFree(rx.f, tids); err != nil {
		t.Fatal(err)
	}
}

func tidIndex(tids []uint32, tid uint32) int {
	for i, x := range tids {
		if x == tid {
			return i
		}
	}
	return -1
}

// TestPostedSendsNeverStall: a stream of sends of every size up to the
// largest, none waited for, keeps the send buffer wrapping and full; a send
// that waits for room is always woken by a consumed descriptor (only some
// ask for the interrupt), so none times out. The receiver's TID is not
// valid: the device refuses each packet (an error entry, or a drop once
// the header queue is full) and consumes its descriptor all the same.
func TestPostedSendsNeverStall(t *testing.T) {
	_, tx, rx, dst := sendPair(t)
	src := allocBuf(t, 2<<20, false)
	rng := rand.New(rand.NewSource(3))
	for i := range 300 {
		n := 1 + rng.Intn(2<<20)
		if i%7 == 0 {
			n = 2 << 20
		}
		s := uapi.GohfiSend{Opcode: uapi.GOHFI_SEND_EXPECTED, DstCtxt: dst, Length: uint32(n), Vaddr: uint64(src.Addr()), TID: 1 << 31}
		if i == 299 {
			s.Flags = uapi.GOHFI_SEND_FLAG_WAIT // and then everything was consumed
		}
		if err := ioctl(tx, uapi.GOHFI_IOCTL_SEND, &s); err != nil {
			t.Fatalf("SEND %d of %d bytes: %v", i, n, err)
		}
	}
	if e := rx.nextEntry(t); e.Type != uapi.GOHFI_RHF_ERROR || e.Err&uapi.GOHFI_RHF_ERR_TID == 0 {
		t.Fatalf("first entry %+v, want a TID error", e)
	}
}

// ctxtRecPair is sendPair on an embedded device whose engine polls
// doorbell records for idle after its last work.
func ctxtRecPair(t *testing.T, idle time.Duration) (a *attach.Attached, tx *driver.File, rx *rxCtxt, dst uint16) {
	t.Helper()
	requireRoot(t)
	o := embeddedOptions(2)
	o.Sim.DBPollIdle = idle
	a = openEmbedded(t, o)
	tx = openFile(t, a)
	assign(t, tx)
	rx = newRx(t, a)
	return a, tx, rx, ctxtOf(t, rx.f)
}

// sendChecked sends 256 bytes of pattern i from src into page i%16 of the
// TID's buffer b (SDMA or copied), and checks that its header entry and
// data arrive.
func sendChecked(t *testing.T, tx *driver.File, rx *rxCtxt, dst uint16, tid uint32, src, b []byte, i int, sdma bool) {
	t.Helper()
	data := src[:256]
	for j := range data {
		data[j] = byte(i + j)
	}
	s := uapi.GohfiSend{Opcode: uapi.GOHFI_SEND_EXPECTED, DstCtxt: dst, Length: uint32(len(data)),
		Vaddr: uint64(uintptrOf(data)), TID: tid, TIDOffset: uint32(i%16) * 4096, Tag: uint64(i)}
	if sdma {
		s.Flags = uapi.GOHFI_SEND_FLAG_SDMA
	}
	if err := ioctl(tx, uapi.GOHFI_IOCTL_SEND, &s); err != nil {
		t.Fatalf("SEND %d: %v", i, err)
	}
	if e := rx.nextEntry(t); e.Type != uapi.GOHFI_RHF_EXPECTED || e.Tag != uint64(i) {
		t.Fatalf("send %d: entry %+v", i, e)
	}
	if got := b[(i%16)*4096:][:len(data)]; !bytes.Equal(got, data) {
		t.Fatalf("send %d: data differs", i)
	}
}

// TestCtxtDBRecSleepBetweenStoreAndFlag forces the device through its way
// to sleep (set the notify flags, read the records again) exactly between
// SEND's store of the send queue's tail in the context's doorbell record
// and its load of the notify flag, on every send: no doorbell may be lost
// (the device's second read finds the tail, or the driver sees the flag
// and writes CtxtSQTail), and every packet lands.
func TestCtxtDBRecSleepBetweenStoreAndFlag(t *testing.T) {
	a, tx, rx, dst := ctxtRecPair(t, 0)
	if !driver.SetCtxtDBRecHook(tx, a.Sim.Device.SleepNow) {
		t.Fatal("the context has no doorbell record")
	}
	buf, src := allocBuf(t, 16*4096, true), allocBuf(t, 4096, true)
	tids, _, err := tidUpdate(rx.f, buf.Addr(), 16*4096)
	if err != nil || len(tids) != 1 {
		t.Fatalf("TID_UPDATE: %v, %v", tids, err)
	}
	for i := range 200 {
		sendChecked(t, tx, rx, dst, tids[0], src.Bytes(), buf.Bytes(), i, i%2 == 1)
	}
}

// TestCtxtDBRecPolled: while the engine polls (here: for ever after its
// first work) a SEND only stores its tail in the record; the first, with
// the notify flag set at setup, also writes the register. The driver's
// trace tells them apart.
func TestCtxtDBRecPolled(t *testing.T) {
	a, tx, rx, dst := ctxtRecPair(t, time.Hour)
	sub := a.Module.Trace(4096)
	defer sub.Stop()
	buf, src := allocBuf(t, 16*4096, true), allocBuf(t, 4096, true)
	tids, _, err := tidUpdate(rx.f, buf.Addr(), 16*4096)
	if err != nil || len(tids) != 1 {
		t.Fatalf("TID_UPDATE: %v, %v", tids, err)
	}
	const sends = 50
	for i := range sends {
		sendChecked(t, tx, rx, dst, tids[0], src.Bytes(), buf.Bytes(), i, i%2 == 0)
	}
	var reg, rec int
	for reg+rec < sends {
		select {
		case ev := <-sub.Events():
			switch ev.Kind {
			case driver.TraceDoorbell:
				reg++
			case driver.TraceDoorbellRecord:
				rec++
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%d register and %d record doorbells traced, want %d", reg, rec, sends)
		}
	}
	if reg != 1 || rec != sends-1 {
		t.Fatalf("%d register and %d record doorbells, want 1 and %d", reg, rec, sends-1)
	}
}
