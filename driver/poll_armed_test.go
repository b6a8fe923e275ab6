package driver_test

import (
	"context"
	"testing"
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/uapi"
)

// TestPollArmsReceiveInterrupt: on a device with RHQ records the receive
// interrupt is armed by a Poll about to sleep (chip.CtxtCtrlIntArm), so
// entries nobody waits for raise none, and every Poll that sleeps is woken
// by the next entry, once.
func TestPollArmsReceiveInterrupt(t *testing.T) {
	a := openDev(t, 2)
	if a.Device.Info().CapFlags&chip.CapRHQHeadRec == 0 {
		t.Skip("the device has no RHQ records: every entry raises the receive interrupt")
	}
	tx, rx := openFile(t, a), openFile(t, a)
	assign(t, tx)
	assign(t, rx)
	dst := ctxtOf(t, rx)
	rxSrc := chip.IntSrcCtxt(int(dst))
	sub := a.Module.Trace(1 << 14)
	defer sub.Stop()
	// rxInterrupts counts the receiver's interrupts traced so far (the
	// handler traces before it wakes anyone); until, if set, waits for
	// the receiver's Poll to go to sleep.
	rxInterrupts := 0
	drain := func(until bool) {
		t.Helper()
		deadline := time.After(10 * time.Second)
		for {
			select {
			case ev := <-sub.Events():
				switch {
				case ev.Kind == driver.TraceInterrupt && ev.A&rxSrc != 0:
					rxInterrupts++
				case ev.Kind == driver.TracePollSleep && ev.Ctxt == int(dst) && until:
					if ev.A == 0 {
						t.Fatal("Poll sleeps with arm word 0")
					}
					return
				}
			case <-deadline:
				t.Fatal("no poll_sleep of the receiver in 10 s")
			default:
				if !until {
					return
				}
			}
		}
	}
	send := func() {
		t.Helper()
		// FLAG_WAIT: returns once the device consumed the descriptor,
		// after it delivered the packet.
		if err := hfiuser.Send(tx, uapi.GohfiSend{Opcode: uapi.GOHFI_SEND_EAGER, Flags: uapi.GOHFI_SEND_FLAG_WAIT, DstCtxt: dst}, []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	const unpolled = 100
	for range unpolled {
		send()
	}
	drain(false)
	if rxInterrupts != 0 {
		t.Fatalf("%d entries nobody polled for raised %d receive interrupts, want 0", unpolled, rxInterrupts)
	}
	head := uint64(unpolled)
	if err := hfiuser.SetRcvHdrHead(rx, head); err != nil {
		t.Fatal(err)
	}
	cnt := uint64(a.Module.Params().RcvHdrCnt)
	const rounds = 200
	for i := range rounds {
		done := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			ev, err := rx.Poll(ctx)
			if err == nil && ev&driver.POLLIN == 0 {
				err = context.DeadlineExceeded
			}
			done <- err
		}()
		drain(true) // asleep: only the interrupt can end its wait now
		send()
		if err := <-done; err != nil {
			t.Fatalf("round %d: Poll: %v", i, err)
		}
		head = (head + 1) % cnt
		if err := hfiuser.SetRcvHdrHead(rx, head); err != nil {
			t.Fatal(err)
		}
	}
	drain(false)
	if rxInterrupts != rounds {
		t.Fatalf("%d sleeping Polls took %d receive interrupts, want one each", rounds, rxInterrupts)
	}
}

// TestPollReadyAcrossWrap: Poll's receive condition (from the header queue
// in memory with RHQ records, from the registers without) says POLLIN
// exactly while an entry is unconsumed, over three laps of the queue, with
// the queue full and with heads moved by one and by many entries.
func TestPollReadyAcrossWrap(t *testing.T) {
	a := openDev(t, 2)
	tx, rx := openFile(t, a), openFile(t, a)
	assign(t, tx)
	assign(t, rx)
	dst := ctxtOf(t, rx)
	n := a.Module.Params().RcvHdrCnt
	send := func(k int) {
		t.Helper()
		for range k {
			// FLAG_WAIT: delivered when SEND returns.
			if err := hfiuser.Send(tx, uapi.GohfiSend{Opcode: uapi.GOHFI_SEND_EAGER, Flags: uapi.GOHFI_SEND_FLAG_WAIT, DstCtxt: dst}, []byte("x")); err != nil {
				t.Fatal(err)
			}
		}
	}
	head := 0
	consume := func(k int) {
		t.Helper()
		head = (head + k) % n
		if err := hfiuser.SetRcvHdrHead(rx, uint64(head)); err != nil {
			t.Fatal(err)
		}
	}
	ready := func(want bool, what string) {
		t.Helper()
		if got := pollNow(t, rx)&driver.POLLIN != 0; got != want {
			t.Fatalf("%s (head %d): POLLIN %v, want %v", what, head, got, want)
		}
	}
	ready(false, "nothing sent")
	for lap := range 3 {
		send(1)
		ready(true, "one entry")
		consume(1)
		ready(false, "consumed")
		send(n - 1) // the queue full
		ready(true, "full queue")
		consume(n - 2)
		ready(true, "one entry left of a full queue")
		consume(1)
		ready(false, "a full queue consumed")
		send(lap + 3)
		consume(lap + 2)
		ready(true, "one of several left")
		consume(1)
		ready(false, "several consumed")
	}
}
