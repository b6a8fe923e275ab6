//go:build gohfiguest

package guestprobe

import (
	"context"
	"fmt"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/userfault"
)

// TestNotifierSources starts the driver's invalidation notifier with each
// source alone and checks that a munmap of a subscribed range reaches it:
// which of the mmu_notifier stand-ins the guest kernel allows. userfaultfd
// and the tracepoint programs must work (the driver's TID cache uses them);
// fentry is reported, not required.
func TestNotifierSources(t *testing.T) {
	inGuest(t)
	for _, c := range []struct {
		src      userfault.Source
		required bool
	}{
		{userfault.SourceUserfaultfd, true},
		{userfault.SourceTracepoint, true},
		{userfault.SourceFentry, false},
	} {
		t.Run(c.src.String(), func(t *testing.T) {
			d, err := notifierMunmap(c.src)
			if err != nil {
				fact("notifier_"+c.src.String(), "error: "+err.Error())
				if c.required {
					t.Fatal(err)
				}
				t.Logf("%s source unavailable in the guest: %v", c.src, err)
				return
			}
			fact("notifier_"+c.src.String(), "ok")
			fact("notifier_"+c.src.String()+"_munmap_to_callback_us", d.Microseconds())
		})
	}
}

// notifierMunmap subscribes a fresh 4-page mapping with a notifier of the
// one source src, unmaps it and returns the time from munmap to the
// callback (bounded by 5 s).
func notifierMunmap(src userfault.Source) (time.Duration, error) {
	n, err := userfault.New(context.Background(), userfault.Options{Sources: []userfault.Source{src}, Require: true})
	if err != nil {
		return 0, err
	}
	defer n.Close()
	const size = 4 * 4096
	mem, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return 0, err
	}
	mem[0] = 1
	got := make(chan userfault.Event, 4)
	sub, err := n.Subscribe(addrOf(mem), size, userfault.InvalidateFunc(func(_ *userfault.Subscription, ev userfault.Event) bool {
		select {
		case got <- ev:
		default:
		}
		return true
	}))
	if err != nil {
		unix.Munmap(mem)
		return 0, err
	}
	defer sub.Remove()
	start := time.Now()
	if err := unix.Munmap(mem); err != nil {
		return 0, err
	}
	select {
	case ev := <-got:
		if ev.Kind != userfault.EventUnmap {
			return 0, fmt.Errorf("munmap reported as %v", ev)
		}
		return time.Since(start), nil
	case <-time.After(5 * time.Second):
		return 0, fmt.Errorf("%s: no event within 5 s of munmap", src)
	}
}
