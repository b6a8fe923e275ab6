package driver_test

import (
	"hash/crc32"
	"math/rand"
	"runtime"
	"testing"

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
