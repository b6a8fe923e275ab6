package hfisim

import (
	"encoding/binary"

	"github.com/gohfi/gohfi/chip"
)

// PCI configuration space offsets and bits used by the model (PCI Local Bus
// 3.0, include/uapi/linux/pci_regs.h names in comments).
const (
	cfgSpaceSize = 256

	pciVendorID      = 0x00 // PCI_VENDOR_ID
	pciDeviceID      = 0x02 // PCI_DEVICE_ID
	pciCommand       = 0x04 // PCI_COMMAND
	pciStatus        = 0x06 // PCI_STATUS
	pciRevisionID    = 0x08 // PCI_REVISION_ID
	pciClassProg     = 0x09 // PCI_CLASS_PROG
	pciHeaderType    = 0x0e // PCI_HEADER_TYPE
	pciBAR0          = 0x10 // PCI_BASE_ADDRESS_0
	pciSubsysVendor  = 0x2c // PCI_SUBSYSTEM_VENDOR_ID
	pciSubsysID      = 0x2e // PCI_SUBSYSTEM_ID
	pciCapList       = 0x34 // PCI_CAPABILITY_LIST
	pciInterruptLine = 0x3c // PCI_INTERRUPT_LINE
	pciInterruptPin  = 0x3d // PCI_INTERRUPT_PIN

	pciCommandMemory    = 0x0002 // PCI_COMMAND_MEMORY
	pciCommandMaster    = 0x0004 // PCI_COMMAND_MASTER
	pciCommandIntxDis   = 0x0400 // PCI_COMMAND_INTX_DISABLE
	pciStatusInterrupt  = 0x0008 // PCI_STATUS_INTERRUPT
	pciStatusCapList    = 0x0010 // PCI_STATUS_CAP_LIST
	pciBARMem64         = 0x4    // PCI_BASE_ADDRESS_MEM_TYPE_64
	pciCapIDMSIX        = 0x11   // PCI_CAP_ID_MSIX
	msixCapOffset       = 0x40
	msixFlagsEnable     = 0x8000 // PCI_MSIX_FLAGS_ENABLE
	msixFlagsMaskAll    = 0x4000 // PCI_MSIX_FLAGS_MASKALL
	pciCommandWriteMask = pciCommandMemory | pciCommandMaster | pciCommandIntxDis
)

// config is the PCI configuration space of the function. BARs implement the
// sizing protocol (write all ones, read back the size mask) because a guest
// kernel and QEMU both size them.
type config struct {
	space    [cfgSpaceSize]byte
	barSizes [6]uint64 // 0 for unimplemented BARs and upper halves
	barVals  [6]uint32
}

func newConfig(barSizes map[int]uint64, msixVectors int) *config {
	c := &config{}
	c.reset(barSizes, msixVectors)
	return c
}

func (c *config) reset(barSizes map[int]uint64, msixVectors int) {
	c.space = [cfgSpaceSize]byte{}
	c.barSizes = [6]uint64{}
	c.barVals = [6]uint32{}
	s := c.space[:]
	binary.LittleEndian.PutUint16(s[pciVendorID:], chip.PCIVendorID)
	binary.LittleEndian.PutUint16(s[pciDeviceID:], chip.PCIDeviceID)
	binary.LittleEndian.PutUint16(s[pciStatus:], pciStatusCapList)
	s[pciRevisionID] = chip.PCIRevision
	class := uint32(chip.PCIClassCode)
	s[pciClassProg] = byte(class)
	s[pciClassProg+1] = byte(class >> 8)
	s[pciClassProg+2] = byte(class >> 16)
	s[pciHeaderType] = 0
	binary.LittleEndian.PutUint16(s[pciSubsysVendor:], chip.PCISubVendorID)
	binary.LittleEndian.PutUint16(s[pciSubsysID:], chip.PCISubDeviceID)
	s[pciInterruptPin] = 1 // INTA#
	for bar, size := range barSizes {
		c.barSizes[bar] = size
		c.barVals[bar] = pciBARMem64
	}
	// MSI-X capability: table and PBA in BAR0 (BIR 0).
	s[pciCapList] = msixCapOffset
	s[msixCapOffset] = pciCapIDMSIX
	s[msixCapOffset+1] = 0 // end of list
	binary.LittleEndian.PutUint16(s[msixCapOffset+2:], uint16(msixVectors-1))
	binary.LittleEndian.PutUint32(s[msixCapOffset+4:], chip.MSIXTableOffset|chip.CSRBar)
	binary.LittleEndian.PutUint32(s[msixCapOffset+8:], chip.MSIXPBAOffset|chip.CSRBar)
}

func (c *config) read(off uint64, p []byte) {
	for i := range p {
		o := off + uint64(i)
		if o >= pciBAR0 && o < pciBAR0+24 {
			bar := int(o-pciBAR0) / 4
			p[i] = byte(c.barVals[bar] >> (8 * ((o - pciBAR0) % 4)))
			continue
		}
		p[i] = c.space[o]
	}
}

// write applies a config write. Only a few fields are writable; everything
// else is read-only, as on real hardware.
func (c *config) write(off uint64, p []byte) {
	for i := range p {
		o := off + uint64(i)
		v := p[i]
		switch {
		case o == pciCommand || o == pciCommand+1:
			mask := byte(uint16(pciCommandWriteMask) >> (8 * (o - pciCommand)))
			c.space[o] = c.space[o]&^mask | v&mask
		case o >= pciBAR0 && o < pciBAR0+24:
			bar := int(o-pciBAR0) / 4
			shift := 8 * ((o - pciBAR0) % 4)
			val := c.barVals[bar]&^(0xff<<shift) | uint32(v)<<shift
			c.barVals[bar] = c.applyBARMask(bar, val)
		case o == pciInterruptLine:
			c.space[o] = v
		case o == msixCapOffset+3:
			// MSI-X message control, high byte: enable and mask-all.
			c.space[o] = v & byte(uint16(msixFlagsEnable|msixFlagsMaskAll)>>8)
		}
	}
}

func (c *config) applyBARMask(bar int, val uint32) uint32 {
	if size := c.barSizes[bar]; size != 0 {
		return val&^uint32(size-1)&^0xf | pciBARMem64
	}
	if bar > 0 && c.barSizes[bar-1] != 0 {
		return val & uint32((^(c.barSizes[bar-1] - 1))>>32)
	}
	return 0
}

func (c *config) command() uint16 { return binary.LittleEndian.Uint16(c.space[pciCommand:]) }

func (c *config) setIntxStatus(on bool) {
	st := binary.LittleEndian.Uint16(c.space[pciStatus:])
	if on {
		st |= pciStatusInterrupt
	} else {
		st &^= pciStatusInterrupt
	}
	binary.LittleEndian.PutUint16(c.space[pciStatus:], st)
}

func (c *config) msixEnabled() bool {
	ctl := binary.LittleEndian.Uint16(c.space[msixCapOffset+2:])
	return ctl&msixFlagsEnable != 0 && ctl&msixFlagsMaskAll == 0
}
