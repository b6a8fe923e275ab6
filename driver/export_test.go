package driver

import (
	"context"

	"github.com/gohfi/gohfi/chip"
)

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

// CSR reads a BAR0 register through the driver's own access path, so a
// test can look at the device on any backend (embedded or PCI).
func (d *Device) CSR(off uint64) (uint64, error) { return d.readCSR(off) }

// BAR4Word reads an 8-byte word of BAR4 (MTT, MPT) through the driver's
// mapping; 0 without the verbs engine.
func (d *Device) BAR4Word(off uint64) uint64 {
	if d.verbs == nil || d.verbs.bar4 == nil {
		return 0
	}
	return load64(d.verbs.bar4, int(off))
}

// SetCtxtDBRecHook installs a function SEND of f's context calls between
// storing the send queue's tail in the doorbell record and loading its
// notify flag; it reports whether the context has a record.
func SetCtxtDBRecHook(f *File, hook func()) bool {
	c := f.uctxt
	c.sendMu.Lock()
	defer c.sendMu.Unlock()
	c.dbHook = hook
	return c.dbRec != nil
}

// SetDBRecHook installs a function POST_SEND and POST_RECV of QP handle qp
// call between storing the producer index in the doorbell record and
// loading its notify flag; it reports whether the QP has a record.
func SetDBRecHook(f *File, qp uint32, hook func()) bool {
	pd, err := f.PD()
	if err != nil {
		return false
	}
	pd.mu.Lock()
	q := pd.qps[qp]
	pd.mu.Unlock()
	if q == nil {
		return false
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	q.dbHook = hook
	return q.dbRec != nil
}

// DBRecSQTail reads the send-queue producer index in QP handle qp's
// doorbell record; false if the QP has none (the index is then in the
// device's QPSQTail register).
func DBRecSQTail(f *File, qp uint32) (uint32, bool) {
	pd, err := f.PD()
	if err != nil {
		return 0, false
	}
	pd.mu.Lock()
	q := pd.qps[qp]
	pd.mu.Unlock()
	if q == nil {
		return 0, false
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.dbRec == nil {
		return 0, false
	}
	return load32(q.dbRec, chip.DBRecSQTail), true
}

// IOVAAllocations is how many IOVA ranges the driver holds: one per DMA
// mapping it made (rings, TIDs, MRs, SDMA cache entries).
func (d *Device) IOVAAllocations() int { return d.iova.a.Stats().Allocations }

// SDMACacheLen is how many mappings the SDMA cache of f's context holds.
func SDMACacheLen(f *File) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.uctxt == nil {
		return 0
	}
	return f.uctxt.sdma.len()
}
