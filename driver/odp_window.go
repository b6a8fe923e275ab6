package driver

import (
	"errors"
	"fmt"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/dma"
	"github.com/gohfi/gohfi/vfio"
)

// odpWindow DMA-maps a whole ODP MR at one IOVA range at REG_MR, with
// nothing pinned behind it, where the backend carries out the device's
// accesses through the mapping's accessor (vfio.AccessServer: vfio-user).
// A fault then only pins and fills the slots of its pages, which saves a
// DMA_MAP round trip per fault, as mlx5 gives an ODP MR's whole range
// translation entries up front and only marks them present. An access to a
// page whose slot is empty fails at the device as one to an unmapped IOVA.
//
// Page p of the MR is always IOVA iova + p*pageSize, so a translation the
// device still caches after a zap would reach whatever a new fault put in
// that slot: a slot is filled only when the chunk that held it before has
// been released, which is after the TLB flush of its zap (odpMR.fault).
type odpWindow struct {
	iova  uint64
	size  uint64
	slots []atomic.Pointer[winSlot] // per page of the MR
}

// winSlot is what the accessor sees of a chunk: fixed once filled, so a
// (stale) device access racing the chunk's release reads a pin that is
// unpinned, and fails, rather than one being taken apart.
type winSlot struct {
	first, n int
	pin      *dma.Pin
}

// newODPWindow maps the window of MR m if the backend allows it; nil (and
// no error) when it does not, and the MR maps chunk by chunk.
func newODPWindow(d *Device, m *odpMR) (*odpWindow, error) {
	if as, ok := d.vdev.(vfio.AccessServer); !ok || !as.ServesDMAThroughAccess() {
		return nil, nil
	}
	w := &odpWindow{size: uint64(len(m.pages)) * pageSize, slots: make([]atomic.Pointer[winSlot], len(m.pages))}
	var err error
	if w.iova, err = d.iova.alloc(w.size); err != nil {
		return nil, fmt.Errorf("ODP window of %#x bytes: %w", w.size, errors.Join(err, unix.ENOMEM))
	}
	if err := d.vdev.DMAMap(vfio.DMAMapping{IOVA: w.iova, Vaddr: m.start, Size: w.size, Flags: dmaFlags(m.mr.access), Access: w}); err != nil {
		d.iova.release(w.iova, w.size)
		return nil, d.ioErr(fmt.Errorf("ODP window: DMA map: %w", err))
	}
	return w, nil
}

// close unmaps the window once no slot is filled; reuse false keeps its
// IOVAs out of circulation (a flush failed: the device may still hold
// translations).
func (w *odpWindow) close(d *Device, reuse bool) error {
	var err error
	if !d.dead.Load() {
		if err = d.vdev.DMAUnmap(w.iova, w.size); err != nil {
			err = d.ioErr(fmt.Errorf("ODP window: DMA unmap: %w", err))
		}
	}
	if reuse && err == nil {
		d.iova.release(w.iova, w.size)
	}
	return err
}

// busy reports whether a slot of c's pages still holds an earlier chunk
// (zapped, its flush or release not done yet).
func (w *odpWindow) busy(c *odpChunk) bool {
	for p := c.first; p < c.first+c.n; p++ {
		if w.slots[p].Load() != nil {
			return true
		}
	}
	return false
}

// fill makes c's pages reachable; the caller holds the MR lock and has
// seen them not busy.
func (w *odpWindow) fill(c *odpChunk) {
	c.slot = &winSlot{first: c.first, n: c.n, pin: c.pin}
	for p := c.first; p < c.first+c.n; p++ {
		w.slots[p].Store(c.slot)
	}
}

// empty makes c's pages unreachable again.
func (w *odpWindow) empty(c *odpChunk) {
	if c.slot == nil {
		return
	}
	for p := c.first; p < c.first+c.n; p++ {
		w.slots[p].CompareAndSwap(c.slot, nil)
	}
	c.slot = nil
}

// ReadAt implements vfio.DMAAccessor (the device reads memory).
func (w *odpWindow) ReadAt(b []byte, off int64) (int, error) { return w.access(b, off, false) }

// WriteAt implements vfio.DMAAccessor (the device writes memory).
func (w *odpWindow) WriteAt(b []byte, off int64) (int, error) { return w.access(b, off, true) }

func (w *odpWindow) access(b []byte, off int64, write bool) (int, error) {
	n := 0
	for n < len(b) {
		o := off + int64(n)
		if o < 0 || uint64(o) >= w.size {
			return n, fmt.Errorf("ODP window: offset %#x of %#x: %w", o, w.size, unix.EFAULT)
		}
		c := w.slots[o/pageSize].Load()
		if c == nil {
			return n, fmt.Errorf("ODP window: page %d not mapped: %w", o/pageSize, unix.EFAULT)
		}
		co := o - int64(c.first)*pageSize
		k := min(len(b)-n, int(int64(c.n)*pageSize-co))
		var err error
		if write {
			_, err = c.pin.WriteAt(b[n:n+k], co)
		} else {
			_, err = c.pin.ReadAt(b[n:n+k], co)
		}
		if err != nil {
			return n, err
		}
		n += k
	}
	return n, nil
}
