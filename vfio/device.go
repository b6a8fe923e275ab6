// Package vfio is the driver's view of a device reached through VFIO: regions
// (BARs and config space) to read, write and mmap, DMA mappings of process
// memory into the device's IOVA space, interrupts delivered through eventfds,
// and reset. Two backends implement Device: the vfio-user client
// (vfio/vfiouser), which talks to a device model over a unix socket, and the
// kernel VFIO backend, which drives /dev/vfio inside a guest.
//
// The indices, flags and info layouts follow include/uapi/linux/vfio.h so that
// both backends speak in the kernel's terms.
package vfio

import (
	"errors"
	"os"
)

// Region indices of a PCI device (VFIO_PCI_*_REGION_INDEX).
const (
	PCIBAR0RegionIndex   = 0
	PCIBAR1RegionIndex   = 1
	PCIBAR2RegionIndex   = 2
	PCIBAR3RegionIndex   = 3
	PCIBAR4RegionIndex   = 4
	PCIBAR5RegionIndex   = 5
	PCIROMRegionIndex    = 6
	PCIConfigRegionIndex = 7
	PCIVGARegionIndex    = 8
	PCINumRegions        = 9
)

// IRQ indices of a PCI device (VFIO_PCI_*_IRQ_INDEX).
const (
	PCIINTxIRQIndex = 0
	PCIMSIIRQIndex  = 1
	PCIMSIXIRQIndex = 2
	PCIErrIRQIndex  = 3
	PCIReqIRQIndex  = 4
	PCINumIRQs      = 5
)

// Device flags (VFIO_DEVICE_FLAGS_*).
const (
	DeviceFlagsReset = 1 << 0
	DeviceFlagsPCI   = 1 << 1
)

// Region flags (VFIO_REGION_INFO_FLAG_*).
const (
	RegionFlagRead  = 1 << 0
	RegionFlagWrite = 1 << 1
	RegionFlagMmap  = 1 << 2
	RegionFlagCaps  = 1 << 3
)

// IRQ info flags (VFIO_IRQ_INFO_*).
const (
	IRQInfoEventfd    = 1 << 0
	IRQInfoMaskable   = 1 << 1
	IRQInfoAutomasked = 1 << 2
	IRQInfoNoresize   = 1 << 3
)

// DMA mapping permissions, as seen by the device (VFIO_DMA_MAP_FLAG_READ/WRITE).
const (
	DMARead  = 1 << 0
	DMAWrite = 1 << 1
)

// DeviceInfo mirrors struct vfio_device_info.
type DeviceInfo struct {
	Flags      uint32
	NumRegions uint32
	NumIRQs    uint32
}

// SparseArea is one mmappable part of a region (struct vfio_region_sparse_mmap_area).
type SparseArea struct {
	Offset uint64
	Size   uint64
}

// RegionInfo mirrors struct vfio_region_info with its sparse-mmap capability
// decoded. When Flags has RegionFlagMmap and Sparse is empty, the whole region
// is mappable.
type RegionInfo struct {
	Index  uint32
	Flags  uint32
	Size   uint64
	Offset uint64 // offset of the region in the device fd (kernel) or in the mmap fd (vfio-user)
	Sparse []SparseArea
}

// Mappable reports whether [off, off+size) lies inside an mmappable part.
func (r RegionInfo) Mappable(off, size uint64) bool {
	if r.Flags&RegionFlagMmap == 0 || size == 0 || off+size < off || off+size > r.Size {
		return false
	}
	if len(r.Sparse) == 0 {
		return true
	}
	for _, a := range r.Sparse {
		if off >= a.Offset && off+size <= a.Offset+a.Size {
			return true
		}
	}
	return false
}

// IRQInfo mirrors struct vfio_irq_info.
type IRQInfo struct {
	Index uint32
	Flags uint32
	Count uint32
}

// DMAMapping describes process memory to make reachable by the device at IOVA.
//
// Vaddr/Size name the memory in this process. When File is set, the memory is
// a shared mapping of File at FileOffset (memfd-backed): a vfio-user server
// maps the same pages itself; the kernel backend only needs Vaddr. Without a
// File, the vfio-user client serves the device's DMA_READ/DMA_WRITE requests
// from Vaddr.
type DMAMapping struct {
	IOVA       uint64
	Vaddr      uintptr
	Size       uint64
	Flags      uint32 // DMARead | DMAWrite
	File       *os.File
	FileOffset uint64
	// Access, when set, serves the device's DMA_READ/DMA_WRITE requests for
	// this mapping instead of plain loads and stores at Vaddr: the driver
	// uses it to reach pages it pinned even after the application unmapped
	// them (see dma/). Offsets are relative to IOVA. Ignored by backends in
	// which the device reaches memory by itself (kernel VFIO, fd mappings).
	Access DMAAccessor
}

// DMAAccessor reads and writes a DMA mapping on behalf of the device.
type DMAAccessor interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
}

// Device is a VFIO device as the driver uses it. Implementations are safe for
// concurrent use.
type Device interface {
	// Info returns the device's flags and the number of regions and IRQ indices.
	Info() DeviceInfo
	// RegionInfo describes region index.
	RegionInfo(index uint32) (RegionInfo, error)
	// ReadRegion reads len(p) bytes at off of region index through the
	// trapped path (not through an mmap).
	ReadRegion(index uint32, off uint64, p []byte) error
	// WriteRegion writes p at off of region index through the trapped path.
	WriteRegion(index uint32, off uint64, p []byte) error
	// MmapRegion maps [off, off+size) of region index into this process.
	// The range must lie inside one mappable area. Unmap with Munmap.
	MmapRegion(index uint32, off, size uint64, prot int) ([]byte, error)
	// DMAMap makes m reachable by the device.
	DMAMap(m DMAMapping) error
	// DMAUnmap removes the mapping that starts at iova with size size.
	DMAUnmap(iova, size uint64) error
	// IRQInfo describes IRQ index.
	IRQInfo(index uint32) (IRQInfo, error)
	// SetIRQs connects eventfds to vectors [start, start+len(fds)) of IRQ
	// index (VFIO_IRQ_SET_DATA_EVENTFD | ACTION_TRIGGER). A nil fds slice
	// disables all vectors of the index.
	SetIRQs(index, start uint32, fds []int) error
	// Reset resets the device (VFIO_DEVICE_RESET).
	Reset() error
	// Done returns a channel that is closed when the device is gone for
	// good: the backend lost it (a vfio-user server hung up or died; calls
	// then fail with ErrDisconnected) or Close was called. A backend that
	// cannot see a device go closes it only on Close: a surprise-removed
	// PCI function behind kernel VFIO just reads all ones, which the
	// driver has to notice itself.
	Done() <-chan struct{}
	// Close releases the device. Mappings made by MmapRegion stay valid
	// until unmapped.
	Close() error
}

// Errors common to the backends. Backend errors wrap a syscall.Errno where the
// failure has errno meaning, so errors.Is(err, unix.EINVAL) works.
var (
	ErrClosed       = errors.New("vfio: device closed")
	ErrDisconnected = errors.New("vfio: device disconnected")
)
