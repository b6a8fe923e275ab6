package driver

import (
	"context"
	"fmt"
	"sync"

	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/userfault"
)

// notifier returns the device's invalidation notifier, starting it at first
// use (userfaultfd and eBPF tracepoint sources; at least one must start).
func (d *Device) notifier() (*userfault.Notifier, error) {
	d.mmuNotifierMu.Lock()
	defer d.mmuNotifierMu.Unlock()
	if d.mmuNotifier != nil {
		return d.mmuNotifier, nil
	}
	n, err := userfault.New(context.Background(), userfault.Options{Observer: &d.gens})
	if err != nil {
		return nil, fmt.Errorf("start invalidation notifier: %w", err)
	}
	d.mmuNotifier = n
	return n, nil
}

// runningNotifier returns the notifier if it was started, else nil.
func (d *Device) runningNotifier() *userfault.Notifier {
	d.mmuNotifierMu.Lock()
	defer d.mmuNotifierMu.Unlock()
	return d.mmuNotifier
}

// waitInvalidations waits until every synchronous invalidation begun before
// the call (its generation already visible in the events pages) has been
// delivered to the TIDs. Called without e.mu: delivery takes it.
func (d *Device) waitInvalidations(ctx context.Context) error {
	n := d.runningNotifier()
	if n == nil {
		return nil
	}
	opened, delivered := n.Generation()
	if delivered >= opened {
		return nil
	}
	return n.WaitDelivered(ctx, opened)
}

// genPages writes the notifier's generations into the events page of every
// live context (uapi.GOHFI_EVENTS_GEN_*), so a user-space TID cache learns
// of an invalidation with one load, before munmap returns. It is the
// notifier's GenerationObserver; WindowOpened runs on the userfaultfd
// monitor thread, which must never wait for long: the lock is taken by
// nothing that unmaps memory.
type genPages struct {
	mu    sync.RWMutex
	ctxts map[*ctxtData]struct{}
}

func (g *genPages) WindowOpened(gen uint64) { g.store(uapi.GOHFI_EVENTS_GEN_OPENED_OFF, gen) }

func (g *genPages) WindowsDelivered(gen uint64) { g.store(uapi.GOHFI_EVENTS_GEN_DELIVERED_OFF, gen) }

func (g *genPages) store(off int, gen uint64) {
	g.mu.RLock()
	for c := range g.ctxts {
		store64(c.events.mem, off, gen)
	}
	g.mu.RUnlock()
}

// add publishes the current generations in a new context's page and keeps
// it current.
func (g *genPages) add(c *ctxtData, n *userfault.Notifier) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if n != nil {
		opened, delivered := n.Generation()
		store64(c.events.mem, uapi.GOHFI_EVENTS_GEN_OPENED_OFF, opened)
		store64(c.events.mem, uapi.GOHFI_EVENTS_GEN_DELIVERED_OFF, delivered)
	}
	if g.ctxts == nil {
		g.ctxts = map[*ctxtData]struct{}{}
	}
	g.ctxts[c] = struct{}{}
}

// remove stops writing to c's page; its rings can be freed after.
func (g *genPages) remove(c *ctxtData) {
	g.mu.Lock()
	delete(g.ctxts, c)
	g.mu.Unlock()
}
