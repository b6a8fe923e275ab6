package driver

// SetODPFaultHook installs a function an ODP fault calls between pinning
// the pages and checking for a racing invalidation.
func SetODPFaultHook(m *Module, f func()) { m.testHookODPFault = f }

// ODPFence waits until every invalidation that reached the notifier is
// flushed from the device and unpinned (what POST_SEND does first).
func (d *Device) ODPFence() error { return d.verbs.odp.fence() }
