package dma

import (
	"bytes"
	"errors"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/vfio"
)

var _ vfio.DMAAccessor = (*Pin)(nil)

func fill(b []byte, v byte) {
	for i := range b {
		b[i] = v
	}
}

func allEqual(b []byte, v byte) bool {
	for _, x := range b {
		if x != v {
			return false
		}
	}
	return true
}

// TestPinSurvivesRemap is the property the host-native path depends on: a
// pin keeps the pages it pinned after the application unmaps the range and
// maps new memory at the same address, and WriteAt/ReadAt reach the old
// pages, never the new mapping.
func TestPinSurvivesRemap(t *testing.T) {
	checkNoLeaks(t)
	acct := NewAccountant()
	p := newTestPinner(t, acct, nil)
	const size = 64 << 10
	old := mmapAnon(t, size)
	fill(old, 0xaa)
	addr := sliceAddr(old)
	pinBefore := vmPinKB(t)

	pin, err := p.Pin(addr, size)
	if err != nil {
		t.Fatal(err)
	}
	if got := vmPinKB(t) - pinBefore; got != size>>10 {
		t.Errorf("VmPin grew by %d kB, want %d", got, size>>10)
	}
	if acct.Pinned() != size/PageSize() {
		t.Errorf("Accountant.Pinned = %d, want %d", acct.Pinned(), size/PageSize())
	}

	// Before the remap, WriteAt lands in the mapped memory.
	if _, err := pin.WriteAt([]byte("first"), 0); err != nil {
		t.Fatal(err)
	}
	if string(old[:5]) != "first" {
		t.Fatalf("WriteAt before remap not visible in the mapping: %q", old[:5])
	}

	if err := unix.Munmap(old); err != nil {
		t.Fatal(err)
	}
	nw := mmapAnonAt(t, addr, size)
	defer unix.Munmap(nw)
	fill(nw, 0x55)

	// The device writes through the pin: into the old pages only.
	msg := []byte("written through the pin after the remap")
	if n, err := pin.WriteAt(msg, 100); err != nil || n != len(msg) {
		t.Fatalf("WriteAt after remap = %d, %v", n, err)
	}
	if !allEqual(nw, 0x55) {
		t.Fatal("WriteAt through the pin changed the memory mapped at the address now")
	}
	got := make([]byte, size)
	if n, err := pin.ReadAt(got, 0); err != nil || n != size {
		t.Fatalf("ReadAt = %d, %v", n, err)
	}
	want := bytes.Repeat([]byte{0xaa}, size)
	copy(want, "first")
	copy(want[100:], msg)
	if !bytes.Equal(got, want) {
		t.Fatal("ReadAt does not return the old pages with what was written")
	}

	if err := pin.Unpin(); err != nil {
		t.Fatal(err)
	}
	if got := vmPinKB(t) - pinBefore; got != 0 {
		t.Errorf("VmPin %d kB above the start after Unpin", got)
	}
	if acct.Pinned() != 0 {
		t.Errorf("Accountant.Pinned = %d after Unpin", acct.Pinned())
	}
	if err := pin.Unpin(); !errors.Is(err, unix.EINVAL) {
		t.Errorf("second Unpin = %v, want EINVAL", err)
	}
	if _, err := pin.ReadAt(got[:1], 0); !errors.Is(err, unix.EINVAL) {
		t.Errorf("ReadAt after Unpin = %v, want EINVAL", err)
	}
}
