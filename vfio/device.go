// Package vfio is the driver's view of a device reached through VFIO: regions
// (BARs and config space) to read, write and mmap, DMA mappings of process
// memory into the device's IOVA space, interrupts delivered through eventfds,
// and reset. Two backends implement Device: the vfio-user client
// (vfio/vfiouser), which talks to a device model over a unix socket, and the
// kernel VFIO backend, which drives /dev/vfio inside a guest.
//
// The indices, flags and layouts are those of include/uapi/linux/vfio.h,
// defined once in vfio/abi, so that both backends speak in the kernel's
// terms.
package vfio

import (
	"errors"
	"os"

	"github.com/gohfi/gohfi/vfio/abi"
)

// The driver's names for the constants of vfio/abi, where they are
// defined (once, under their C names) and checked against C.

// Region indices of a PCI device (VFIO_PCI_*_REGION_INDEX).
const (
	PCIBAR0RegionIndex   = abi.VFIO_PCI_BAR0_REGION_INDEX
	PCIBAR1RegionIndex   = abi.VFIO_PCI_BAR1_REGION_INDEX
	PCIBAR2RegionIndex   = abi.VFIO_PCI_BAR2_REGION_INDEX
	PCIBAR3RegionIndex   = abi.VFIO_PCI_BAR3_REGION_INDEX
	PCIBAR4RegionIndex   = abi.VFIO_PCI_BAR4_REGION_INDEX
	PCIBAR5RegionIndex   = abi.VFIO_PCI_BAR5_REGION_INDEX
	PCIROMRegionIndex    = abi.VFIO_PCI_ROM_REGION_INDEX
	PCIConfigRegionIndex = abi.VFIO_PCI_CONFIG_REGION_INDEX
	PCIVGARegionIndex    = abi.VFIO_PCI_VGA_REGION_INDEX
	PCINumRegions        = abi.VFIO_PCI_NUM_REGIONS
)

// IRQ indices of a PCI device (VFIO_PCI_*_IRQ_INDEX).
const (
	PCIINTxIRQIndex = abi.VFIO_PCI_INTX_IRQ_INDEX
	PCIMSIIRQIndex  = abi.VFIO_PCI_MSI_IRQ_INDEX
	PCIMSIXIRQIndex = abi.VFIO_PCI_MSIX_IRQ_INDEX
	PCIErrIRQIndex  = abi.VFIO_PCI_ERR_IRQ_INDEX
	PCIReqIRQIndex  = abi.VFIO_PCI_REQ_IRQ_INDEX
	PCINumIRQs      = abi.VFIO_PCI_NUM_IRQS
)

// Device flags (VFIO_DEVICE_FLAGS_*).
const (
	DeviceFlagsReset = abi.VFIO_DEVICE_FLAGS_RESET
	DeviceFlagsPCI   = abi.VFIO_DEVICE_FLAGS_PCI
)

// Region flags (VFIO_REGION_INFO_FLAG_*).
const (
	RegionFlagRead  = abi.VFIO_REGION_INFO_FLAG_READ
	RegionFlagWrite = abi.VFIO_REGION_INFO_FLAG_WRITE
	RegionFlagMmap  = abi.VFIO_REGION_INFO_FLAG_MMAP
	RegionFlagCaps  = abi.VFIO_REGION_INFO_FLAG_CAPS
)

// IRQ info flags (VFIO_IRQ_INFO_*).
const (
	IRQInfoEventfd    = abi.VFIO_IRQ_INFO_EVENTFD
	IRQInfoMaskable   = abi.VFIO_IRQ_INFO_MASKABLE
	IRQInfoAutomasked = abi.VFIO_IRQ_INFO_AUTOMASKED
	IRQInfoNoresize   = abi.VFIO_IRQ_INFO_NORESIZE
)

// DMA mapping permissions, as seen by the device (VFIO_DMA_MAP_FLAG_READ/WRITE).
const (
	DMARead  = abi.VFIO_DMA_MAP_FLAG_READ
	DMAWrite = abi.VFIO_DMA_MAP_FLAG_WRITE
)

// DeviceInfo mirrors struct vfio_device_info.
type DeviceInfo struct {
	Flags      uint32
	NumRegions uint32
	NumIRQs    uint32
}

// SparseArea is one mmappable part of a region (struct vfio_region_sparse_mmap_area).
type SparseArea = abi.VFIORegionSparseMmapArea

// IOVARange is an inclusive range of device addresses the device's IOMMU
// accepts for DMA mappings (struct vfio_iova_range).
type IOVARange = abi.VFIOIovaRange

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
	// WriteRegionPosted writes p like WriteRegion but does not wait for the
	// device to take it, as a PCI memory write is posted: it returns once
	// the write is on its way. The device takes it before any later
	// ReadRegion, WriteRegion or WriteRegionPosted of this Device from any
	// goroutine that called after it returned (and before the reply of a
	// later read, which is what makes a read flush it). An error the
	// device would report for it is not returned (the vfio-user server
	// logs it); a local failure (closed, disconnected, bad range) is. For
	// doorbells: registers whose write has no result to wait for. A write
	// the device covers with an ioeventfd (vfio-user's
	// DEVICE_GET_REGION_IO_FDS) signals that instead and is taken in no
	// order with other accesses: a device offers them only for registers
	// whose value and order do not matter (a doorbell whose index the
	// device reads from memory).
	WriteRegionPosted(index uint32, off uint64, p []byte) error
	// MmapRegion maps [off, off+size) of region index into this process.
	// The range must lie inside one mappable area. Unmap with Munmap.
	MmapRegion(index uint32, off, size uint64, prot int) ([]byte, error)
	// DMAMap makes m reachable by the device.
	DMAMap(m DMAMapping) error
	// DMAUnmap removes the mapping that starts at iova with size size.
	DMAUnmap(iova, size uint64) error
	// IOVARanges returns the device addresses DMAMap accepts: sorted,
	// disjoint, inclusive ranges, never none. The kernel backend reports
	// the ranges of its type1 IOMMU (VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
	// which leaves out reserved windows such as x86's MSI range); a
	// backend whose IOMMU reports nothing returns the limit of its own
	// protocol. The driver allocates IOVAs only inside them.
	IOVARanges() []IOVARange
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

// DeviceRinger is a DMAAccessor whose memory a device model in another
// process can reach by itself: DeviceRing returns an io_uring instance
// (not yet enabled) whose buffer 0 is the accessor's memory and the address
// the ring knows the accessor's offset 0 at (dma.Pin; docs/pinning.md,
// "Device rings"). The caller closes the file once it has passed it on.
type DeviceRinger interface {
	DeviceRing() (*os.File, uintptr, error)
}

// AccessServer is implemented by backends that carry out every device access
// to a mapping without a File through its Access (vfio-user). Such a mapping
// may be made before anything is pinned behind it: the accessor decides per
// access, and an access it refuses fails at the device as one to an unmapped
// IOVA does. Kernel VFIO pins at DMAMap and does not implement it.
type AccessServer interface {
	ServesDMAThroughAccess() bool
}

// Errors common to the backends. Backend errors wrap a syscall.Errno where the
// failure has errno meaning, so errors.Is(err, unix.EINVAL) works.
var (
	ErrClosed       = errors.New("vfio: device closed")
	ErrDisconnected = errors.New("vfio: device disconnected")
)
