package driver

import (
	"encoding/binary"
	"fmt"

	"github.com/gohfi/gohfi/chip"
)

// allOnes is what a read of a PCI function that is no longer there returns.
const allOnes = ^uint64(0)

// readCSR reads a 64-bit BAR0 register through the trapped path. A value
// of all ones may mean that the device was surprise-removed, as a Linux
// driver checks after a read (pci_device_is_present, ixgbe_check_remove):
// if the ID register reads all ones too, the device is marked dead.
func (d *Device) readCSR(off uint64) (uint64, error) {
	v, err := d.readCSRRaw(off)
	if err != nil || v != allOnes {
		return v, err
	}
	if off != chip.RegID {
		id, err := d.readCSRRaw(chip.RegID)
		if err != nil {
			return 0, err
		}
		if id != allOnes {
			return v, nil // a register that really holds all ones
		}
	}
	d.markDead(fmt.Errorf("CSR %#x and the ID register read all ones: surprise removal", off))
	return 0, fmt.Errorf("read CSR %#x: %w", off, d.errGone())
}

func (d *Device) readCSRRaw(off uint64) (uint64, error) {
	var b [8]byte
	if err := d.vdev.ReadRegion(chip.CSRBar, off, b[:]); err != nil {
		return 0, d.ioErr(fmt.Errorf("read CSR %#x: %w", off, err))
	}
	return binary.LittleEndian.Uint64(b[:]), nil
}

// writeCSR writes a 64-bit BAR0 register.
func (d *Device) writeCSR(off, v uint64) error {
	return d.writeCSRWith(d.vdev.WriteRegion, "write", off, v)
}

func (d *Device) writeCSRWith(write func(index uint32, off uint64, p []byte) error, what string, off, v uint64) error {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	if err := write(chip.CSRBar, off, b[:]); err != nil {
		return d.ioErr(fmt.Errorf("%s CSR %#x: %w", what, off, err))
	}
	return nil
}

// writeCSRPosted writes a 64-bit BAR0 register without waiting for the
// device to take the write (vfio.Device.WriteRegionPosted): for doorbells.
// The device takes it before any later register access of the driver.
func (d *Device) writeCSRPosted(off, v uint64) error {
	return d.writeCSRWith(d.vdev.WriteRegionPosted, "posted write", off, v)
}

func (d *Device) readCtxtCSR(ctxt int, reg uint64) (uint64, error) {
	return d.readCSR(chip.CtxtReg(ctxt, reg))
}

func (d *Device) writeCtxtCSR(ctxt int, reg, v uint64) error {
	return d.writeCSR(chip.CtxtReg(ctxt, reg), v)
}
