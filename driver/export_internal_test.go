package driver

import "context"

// SetTIDUpdateHook installs a function TID_UPDATE calls between pinning the
// buffer and checking for a racing invalidation.
func SetTIDUpdateHook(m *Module, f func()) { m.testHookTIDUpdate = f }

// SyncNotifier waits until every invalidation that happened before the call
// has been delivered.
func (d *Device) SyncNotifier(ctx context.Context) error {
	n, err := d.notifier()
	if err != nil {
		return err
	}
	return n.Sync(ctx)
}

// PinnedNow is how many pins the device's pinner holds.
func (d *Device) PinnedNow() int { return d.pinner.Pins() }
