package driver_test

import (
	"context"
	"testing"

	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// pollNow is one Poll that does not wait: the state as it is.
func pollNow(t *testing.T, f *driver.File) uint32 {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	ev, _ := f.Poll(ctx)
	return ev
}

// TestPollTypeUrgent: with HFI1_POLL_TYPE_URGENT a receiver's Poll reports
// POLLIN for urgent packets only, once per batch (hfi1's poll_urgent); with
// ANYRCV, for any unread header queue entry.
func TestPollTypeUrgent(t *testing.T) {
	a := openDev(t, 2)
	tx, rx := openFile(t, a), openFile(t, a)
	assign(t, tx)
	assign(t, rx)
	if err := hfiuser.IoctlScalar(rx, uapi.HFI1_IOCTL_POLL_TYPE, uapi.HFI1_POLL_TYPE_URGENT); err != nil {
		t.Fatal(err)
	}
	dst := ctxtOf(t, rx)
	send := func(flags uint8) {
		t.Helper()
		// With FLAG_WAIT, SEND returns once the device consumed the
		// descriptor, after it delivered the packet.
		flags |= uapi.GOHFI_SEND_FLAG_WAIT
		if err := hfiuser.Send(tx, uapi.GohfiSend{Opcode: uapi.GOHFI_SEND_EAGER, Flags: flags, DstCtxt: dst}, []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	send(0)
	if ev := pollNow(t, rx); ev&driver.POLLIN != 0 {
		t.Fatalf("urgent poll after an ordinary packet: %#x, want no POLLIN", ev)
	}
	send(uapi.GOHFI_SEND_FLAG_URGENT)
	if ev := pollNow(t, rx); ev&driver.POLLIN == 0 {
		t.Fatalf("urgent poll after an urgent packet: %#x, want POLLIN", ev)
	}
	if ev := pollNow(t, rx); ev&driver.POLLIN != 0 {
		t.Fatalf("urgent poll again: %#x, want no POLLIN (reported once)", ev)
	}
	if err := hfiuser.IoctlScalar(rx, uapi.HFI1_IOCTL_POLL_TYPE, uapi.HFI1_POLL_TYPE_ANYRCV); err != nil {
		t.Fatal(err)
	}
	if ev := pollNow(t, rx); ev&driver.POLLIN == 0 {
		t.Fatalf("any-receive poll with two unread entries: %#x, want POLLIN", ev)
	}
	err := hfiuser.Send(tx, uapi.GohfiSend{Opcode: uapi.GOHFI_SEND_EAGER, Flags: 1 << 3, DstCtxt: dst}, []byte("x"))
	wantErrno(t, "SEND with an unknown flag", err, unix.EINVAL)
}
