package driver_test

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// atDepth calls fn with depth frames of padding on the goroutine stack, so
// that over a range of depths the ioctl inside fn crosses a stack-growth
// boundary: the runtime then copies the stack elsewhere.
//
//go:noinline
func atDepth(depth int, fn func()) {
	var pad [256]byte
	if depth == 0 {
		fn()
		return
	}
	atDepth(depth-1, fn)
	pad[depth%len(pad)]++
}

// TestIoctlArgsOnMovingStacks: an argument or a TID list on the caller's
// goroutine stack still receives the driver's result when the stack moves
// during the ioctl (a bare uintptr argument lost it: the driver wrote into
// the old copy of the stack).
func TestIoctlArgsOnMovingStacks(t *testing.T) {
	a := openDev(t, 2)
	f := openFile(t, a)
	for depth := 0; depth < 400; depth++ {
		done := make(chan uint32)
		go atDepth(depth, func() {
			var v [4]byte // on the stack unless the API makes it escape
			if _, err := f.Ioctl(uapi.HFI1_IOCTL_GET_VERS, driver.UserPtrOf(&v)); err != nil {
				t.Error(err)
			}
			done <- binary.LittleEndian.Uint32(v[:])
		})
		if got := <-done; got != uapi.HFI1_USER_SWVERSION {
			t.Fatalf("depth %d: GET_VERS gave %#x, want %#x", depth, got, uapi.HFI1_USER_SWVERSION)
		}
	}
}

// TestTIDListOnMovingStacks: TID_UPDATE through hfiuser with a TID list
// array on the stack reports every TID it programmed, at every depth, and
// TID_FREE of what it reported leaves nothing programmed.
func TestTIDListOnMovingStacks(t *testing.T) {
	requireRoot(t)
	a := openDev(t, 2)
	f := openFile(t, a)
	assign(t, f)
	buf := allocBuf(t, 4*4096, false)
	for depth := 0; depth < 300; depth += 3 {
		type res struct {
			tids []uint32
			err  error
		}
		done := make(chan res)
		go atDepth(depth, func() {
			var list [4]uint32
			got, _, err := hfiuser.TIDUpdate(f, buf.Addr(), 4*4096, list[:])
			done <- res{append([]uint32(nil), got...), err}
		})
		r := <-done
		if r.err != nil {
			t.Fatalf("depth %d: %v", depth, r.err)
		}
		if len(r.tids) == 0 || r.tids[0] == 0 {
			t.Fatalf("depth %d: TIDs lost: %v", depth, r.tids)
		}
		if n, err := hfiuser.TIDFree(f, r.tids); err != nil || n != len(r.tids) {
			t.Fatalf("depth %d: TID_FREE %v: %d, %v", depth, r.tids, n, err)
		}
	}
	st, err := hfiuser.DriverStats(f)
	if err != nil {
		t.Fatal(err)
	}
	if st.TidsProgrammed != st.TidsFreed {
		t.Fatalf("programmed %d, freed %d: TIDs left behind", st.TidsProgrammed, st.TidsFreed)
	}
}

// TestTIDFreeCountOnPartialFailure: a duplicate TID frees the first copy and
// fails on the second; the caller learns 1 was freed, not 2.
func TestTIDFreeCountOnPartialFailure(t *testing.T) {
	requireRoot(t)
	a := openDev(t, 2)
	f := openFile(t, a)
	assign(t, f)
	buf := allocBuf(t, 4096, false)
	var list [1]uint32
	tids, _, err := hfiuser.TIDUpdate(f, buf.Addr(), 4096, list[:])
	if err != nil {
		t.Fatal(err)
	}
	n, err := hfiuser.TIDFree(f, []uint32{tids[0], tids[0]})
	if !errors.Is(err, unix.EINVAL) || n != 1 {
		t.Fatalf("TID_FREE [t, t]: %d freed, %v; want 1, EINVAL", n, err)
	}
	n, err = hfiuser.TIDFree(f, []uint32{tids[0]})
	if !errors.Is(err, unix.EINVAL) || n != 0 {
		t.Fatalf("TID_FREE of a freed TID: %d freed, %v; want 0, EINVAL", n, err)
	}
}
