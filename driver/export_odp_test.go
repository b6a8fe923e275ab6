package driver

import "github.com/gohfi/gohfi/userfault"

// SetODPFaultHook installs a function an ODP fault calls between pinning
// the pages and checking for a racing invalidation.
func SetODPFaultHook(m *Module, f func()) { m.testHookODPFault.Store(&f) }

// SetODPInvalidateHook installs a function an ODP MR's Invalidate calls
// once it has zapped the range, on the notifier's dispatcher.
func SetODPInvalidateHook(m *Module, f func(userfault.Event)) {
	if f == nil {
		m.testHookODPInvalidate.Store(nil)
		return
	}
	m.testHookODPInvalidate.Store(&f)
}

// ODPFence waits until every invalidation that reached the notifier is
// flushed from the device and unpinned (what POST_SEND does first).
func (d *Device) ODPFence() error { return d.verbs.odp.fence() }

// TLBWaits returns how the driver's waits for a TLB flush ended: woken by
// IntSrcTLB, or by the 10 ms timer.
func (d *Device) TLBWaits() (intr, timer uint64) {
	if d.verbs == nil {
		return 0, 0
	}
	return d.verbs.tlbIntrWakes.Load(), d.verbs.tlbTimerWakes.Load()
}
