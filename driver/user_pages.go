package driver

import (
	"errors"
	"fmt"
	"os"

	"github.com/gohfi/gohfi/dma"
	"github.com/gohfi/gohfi/vfio"
)

// userMapping is a range of user memory made reachable by the device at
// its own IOVA (hfi1's user_pages.c with the DMA mapping): memfd-backed
// memory is mapped with its file, which the device maps itself (nothing
// pinned); other memory is pinned first and the mapping reads and writes
// it through the pin (docs/pinning.md). TIDs (user_exp_rcv.go) and SDMA
// sends (user_sdma.go) map user buffers this way.
type userMapping struct {
	iova uint64
	size uint64
	pin  *dma.Pin // nil for memfd-backed memory
}

// mapUser maps [vaddr, vaddr+size) (page-aligned) for the device with
// flags (vfio.DMARead, vfio.DMAWrite). shm is the memfd behind the range
// (userfault.ShmemFile) at shmOff, or nil to pin; readOnly lets a pin fall
// back to a read-only one (the device only reads). On error nothing is
// left mapped or pinned.
func (d *Device) mapUser(vaddr uintptr, size uint64, flags uint32, shm *os.File, shmOff uint64, readOnly bool) (userMapping, error) {
	m := userMapping{size: size}
	var err error
	if shm == nil {
		if m.pin, err = pinFor(d.pinner, vaddr, size, readOnly); err != nil {
			return userMapping{}, err
		}
		d.stats.pagesPinned.Add(uint64(m.pin.Pages()))
	}
	if m.iova, err = d.iova.alloc(size); err != nil {
		m.iova = 0
		return userMapping{}, errors.Join(err, d.unmapUser(&m))
	}
	dm := vfio.DMAMapping{IOVA: m.iova, Vaddr: vaddr, Size: size, Flags: flags}
	if shm != nil {
		dm.File, dm.FileOffset = shm, shmOff
	} else {
		dm.Access = m.pin
	}
	if err = d.vdev.DMAMap(dm); err != nil {
		d.iova.release(m.iova, size)
		m.iova = 0
		return userMapping{}, errors.Join(d.ioErr(fmt.Errorf("DMA map: %w", err)), d.unmapUser(&m))
	}
	return m, nil
}

// unmapUser drops a mapping made by mapUser (a device round trip on the
// vfio-user path; skipped once the device is gone) and its pin. The device
// must no longer be using it. Idempotent.
func (d *Device) unmapUser(m *userMapping) error {
	var errs []error
	if m.iova != 0 {
		if !d.dead.Load() {
			if err := d.vdev.DMAUnmap(m.iova, m.size); err != nil {
				errs = append(errs, d.ioErr(err))
			}
		}
		d.iova.release(m.iova, m.size)
		m.iova = 0
	}
	if m.pin != nil {
		pages := m.pin.Pages()
		errs = append(errs, m.pin.Unpin())
		m.pin = nil
		d.stats.pagesUnpinned.Add(uint64(pages))
	}
	return errors.Join(errs...)
}
