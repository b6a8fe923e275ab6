package driver

import (
	"encoding/binary"
	"fmt"

	"github.com/gohfi/gohfi/chip"
)

// postedWriter is a vfio.Device that can post register writes
// (vfiouser.Client.WriteRegionPosted).
type postedWriter interface {
	WriteRegionPosted(index uint32, off uint64, p []byte) error
}

// writeCSRPosted writes a 64-bit BAR0 register without waiting for the
// device to take it, where the backend posts writes; elsewhere (kernel
// VFIO, whose pwrite is a posted MMIO store already, or a wrapper) it is
// writeCSR. The device takes it before any later register access of the
// driver. For writes with no result to wait for: the ODP resume.
func (d *Device) writeCSRPosted(off, v uint64) error {
	pw, ok := d.vdev.(postedWriter)
	if !ok {
		return d.writeCSR(off, v)
	}
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	if err := pw.WriteRegionPosted(chip.CSRBar, off, b[:]); err != nil {
		return d.ioErr(fmt.Errorf("posted write CSR %#x: %w", off, err))
	}
	return nil
}
