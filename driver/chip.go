package driver

import (
	"encoding/binary"
	"fmt"

	"github.com/gohfi/gohfi/chip"
)

// readCSR reads a 64-bit BAR0 register through the trapped path.
func (d *Device) readCSR(off uint64) (uint64, error) {
	var b [8]byte
	if err := d.vdev.ReadRegion(chip.CSRBar, off, b[:]); err != nil {
		return 0, d.ioErr(fmt.Errorf("read CSR %#x: %w", off, err))
	}
	return binary.LittleEndian.Uint64(b[:]), nil
}

// writeCSR writes a 64-bit BAR0 register.
func (d *Device) writeCSR(off, v uint64) error {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	if err := d.vdev.WriteRegion(chip.CSRBar, off, b[:]); err != nil {
		return d.ioErr(fmt.Errorf("write CSR %#x: %w", off, err))
	}
	return nil
}

func (d *Device) readCtxtCSR(ctxt int, reg uint64) (uint64, error) {
	return d.readCSR(chip.CtxtReg(ctxt, reg))
}

func (d *Device) writeCtxtCSR(ctxt int, reg, v uint64) error {
	return d.writeCSR(chip.CtxtReg(ctxt, reg), v)
}
