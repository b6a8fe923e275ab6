// Package abi is the VFIO ABI, written once: the constants, ioctl numbers
// and structures of include/uapi/linux/vfio.h under their C names (as
// gVisor's pkg/abi/linux does), and the messages of the vfio-user
// protocol (QEMU's docs/interop/vfio-user.rst), which reuse the kernel
// structures and add a few of their own (vfiouser.go).
//
// Every structure is laid out like its C counterpart (structs.HostLayout,
// fixed-size fields only), so that its memory is the ABI: the kernel
// backend hands a pointer to it to ioctl(2), and the vfio-user side copies
// it to and from the wire with Encode and Decode. Flexible array members
// (sparse mmap areas, IOVA ranges, SET_IRQS data) are left out of the Go
// structures; callers walk them after the fixed part. parity_test.go
// compiles a C program against <linux/vfio.h> (and the vfio-user layouts
// of the specification) and compares every size, offset and constant.
//
// VFIO structures are in host byte order; so are vfio-user messages
// ("all data is in the endianness of the host system"). gohfi runs on
// little-endian hosts (amd64, arm64), where both are little endian.
package abi

import (
	"fmt"
	"structs"
)

// VFIO_API_VERSION is what VFIO_GET_API_VERSION returns.
const VFIO_API_VERSION = 0

// Extensions: VFIO_CHECK_EXTENSION arguments and VFIO_SET_IOMMU types.
const (
	VFIO_TYPE1_IOMMU   = 1
	VFIO_TYPE1v2_IOMMU = 3
	VFIO_DMA_CC_IOMMU  = 4
	VFIO_NOIOMMU_IOMMU = 8
	VFIO_UNMAP_ALL     = 9
)

// ioctl numbers: _IO(VFIO_TYPE, VFIO_BASE + n). VFIO uses _IO for all of
// them and carries the size in each structure's argsz instead.
const (
	VFIO_TYPE = ';'
	VFIO_BASE = 100

	VFIO_GET_API_VERSION        = VFIO_TYPE<<8 | (VFIO_BASE + 0)
	VFIO_CHECK_EXTENSION        = VFIO_TYPE<<8 | (VFIO_BASE + 1)
	VFIO_SET_IOMMU              = VFIO_TYPE<<8 | (VFIO_BASE + 2)
	VFIO_GROUP_GET_STATUS       = VFIO_TYPE<<8 | (VFIO_BASE + 3)
	VFIO_GROUP_SET_CONTAINER    = VFIO_TYPE<<8 | (VFIO_BASE + 4)
	VFIO_GROUP_UNSET_CONTAINER  = VFIO_TYPE<<8 | (VFIO_BASE + 5)
	VFIO_GROUP_GET_DEVICE_FD    = VFIO_TYPE<<8 | (VFIO_BASE + 6)
	VFIO_DEVICE_GET_INFO        = VFIO_TYPE<<8 | (VFIO_BASE + 7)
	VFIO_DEVICE_GET_REGION_INFO = VFIO_TYPE<<8 | (VFIO_BASE + 8)
	VFIO_DEVICE_GET_IRQ_INFO    = VFIO_TYPE<<8 | (VFIO_BASE + 9)
	VFIO_DEVICE_SET_IRQS        = VFIO_TYPE<<8 | (VFIO_BASE + 10)
	VFIO_DEVICE_RESET           = VFIO_TYPE<<8 | (VFIO_BASE + 11)
	VFIO_IOMMU_GET_INFO         = VFIO_TYPE<<8 | (VFIO_BASE + 12)
	VFIO_IOMMU_MAP_DMA          = VFIO_TYPE<<8 | (VFIO_BASE + 13)
	VFIO_IOMMU_UNMAP_DMA        = VFIO_TYPE<<8 | (VFIO_BASE + 14)
)

// Group status flags (struct vfio_group_status).
const (
	VFIO_GROUP_FLAGS_VIABLE        = 1 << 0
	VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1
)

// Device flags (struct vfio_device_info).
const (
	VFIO_DEVICE_FLAGS_RESET = 1 << 0
	VFIO_DEVICE_FLAGS_PCI   = 1 << 1
)

// Region flags (struct vfio_region_info) and region capability ids.
const (
	VFIO_REGION_INFO_FLAG_READ  = 1 << 0
	VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
	VFIO_REGION_INFO_FLAG_MMAP  = 1 << 2
	VFIO_REGION_INFO_FLAG_CAPS  = 1 << 3

	VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
)

// IRQ info flags (struct vfio_irq_info).
const (
	VFIO_IRQ_INFO_EVENTFD    = 1 << 0
	VFIO_IRQ_INFO_MASKABLE   = 1 << 1
	VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
	VFIO_IRQ_INFO_NORESIZE   = 1 << 3
)

// SET_IRQS flags (struct vfio_irq_set): one data type and one action.
const (
	VFIO_IRQ_SET_DATA_NONE      = 1 << 0
	VFIO_IRQ_SET_DATA_BOOL      = 1 << 1
	VFIO_IRQ_SET_DATA_EVENTFD   = 1 << 2
	VFIO_IRQ_SET_ACTION_MASK    = 1 << 3
	VFIO_IRQ_SET_ACTION_UNMASK  = 1 << 4
	VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5

	VFIO_IRQ_SET_DATA_TYPE_MASK   = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_DATA_EVENTFD
	VFIO_IRQ_SET_ACTION_TYPE_MASK = VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK | VFIO_IRQ_SET_ACTION_TRIGGER
)

// Region indices of a PCI device.
const (
	VFIO_PCI_BAR0_REGION_INDEX   = 0
	VFIO_PCI_BAR1_REGION_INDEX   = 1
	VFIO_PCI_BAR2_REGION_INDEX   = 2
	VFIO_PCI_BAR3_REGION_INDEX   = 3
	VFIO_PCI_BAR4_REGION_INDEX   = 4
	VFIO_PCI_BAR5_REGION_INDEX   = 5
	VFIO_PCI_ROM_REGION_INDEX    = 6
	VFIO_PCI_CONFIG_REGION_INDEX = 7
	VFIO_PCI_VGA_REGION_INDEX    = 8
	VFIO_PCI_NUM_REGIONS         = 9
)

// IRQ indices of a PCI device.
const (
	VFIO_PCI_INTX_IRQ_INDEX = 0
	VFIO_PCI_MSI_IRQ_INDEX  = 1
	VFIO_PCI_MSIX_IRQ_INDEX = 2
	VFIO_PCI_ERR_IRQ_INDEX  = 3
	VFIO_PCI_REQ_IRQ_INDEX  = 4
	VFIO_PCI_NUM_IRQS       = 5
)

// Type1 IOMMU info flags and capability ids (struct vfio_iommu_type1_info).
const (
	VFIO_IOMMU_INFO_PGSIZES = 1 << 0
	VFIO_IOMMU_INFO_CAPS    = 1 << 1

	VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1
	VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL      = 3
)

// DMA map and unmap flags, shared by VFIO_IOMMU_MAP_DMA / UNMAP_DMA and
// vfio-user's DMA_MAP / DMA_UNMAP.
const (
	VFIO_DMA_MAP_FLAG_READ  = 1 << 0
	VFIO_DMA_MAP_FLAG_WRITE = 1 << 1

	VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1 << 0
	VFIO_DMA_UNMAP_FLAG_ALL              = 1 << 1
)

// Sizes of the structures (of the fixed parts of those that end in a
// flexible array member), checked at compile time.
const (
	SizeofVFIOGroupStatus                = 8
	SizeofVFIODeviceInfo                 = 24
	SizeofVFIORegionInfo                 = 32
	SizeofVFIOInfoCapHeader              = 8
	SizeofVFIORegionInfoCapSparseMmap    = 16
	SizeofVFIORegionSparseMmapArea       = 16
	SizeofVFIOIrqInfo                    = 16
	SizeofVFIOIrqSet                     = 20
	SizeofVFIOIommuType1Info             = 24
	SizeofVFIOIovaRange                  = 16
	SizeofVFIOIommuType1InfoCapIovaRange = 16
	SizeofVFIOIommuType1InfoDmaAvail     = 12
	SizeofVFIOIommuType1DmaMap           = 32
	SizeofVFIOIommuType1DmaUnmap         = 24
)

// VFIOGroupStatus is struct vfio_group_status.
type VFIOGroupStatus struct {
	_     structs.HostLayout
	Argsz uint32
	Flags uint32
}

// VFIODeviceInfo is struct vfio_device_info. Pad is in newer headers only
// (older ones end at cap_offset); the kernel accepts any argsz from the end
// of num_irqs on.
type VFIODeviceInfo struct {
	_          structs.HostLayout
	Argsz      uint32
	Flags      uint32
	NumRegions uint32
	NumIRQs    uint32 `c:"num_irqs"`
	CapOffset  uint32
	Pad        uint32 `c:"-"`
}

// VFIORegionInfo is struct vfio_region_info, also the payload of vfio-user's
// DEVICE_GET_REGION_INFO. When Flags has VFIO_REGION_INFO_FLAG_CAPS, a
// capability chain follows at CapOffset (from the start of the structure).
type VFIORegionInfo struct {
	_         structs.HostLayout
	Argsz     uint32
	Flags     uint32
	Index     uint32
	CapOffset uint32
	Size      uint64
	Offset    uint64
}

// VFIOInfoCapHeader is struct vfio_info_cap_header, the head of every
// capability in a chain; Next is an offset from the start of the info
// structure, 0 at the end.
type VFIOInfoCapHeader struct {
	_       structs.HostLayout
	ID      uint16
	Version uint16
	Next    uint32
}

// VFIORegionInfoCapSparseMmap is the fixed part of struct
// vfio_region_info_cap_sparse_mmap; NrAreas VFIORegionSparseMmapArea
// follow it.
type VFIORegionInfoCapSparseMmap struct {
	_        structs.HostLayout
	Header   VFIOInfoCapHeader
	NrAreas  uint32
	Reserved uint32
}

// VFIORegionSparseMmapArea is struct vfio_region_sparse_mmap_area.
type VFIORegionSparseMmapArea struct {
	_      structs.HostLayout
	Offset uint64
	Size   uint64
}

// VFIOIrqInfo is struct vfio_irq_info, also vfio-user's GET_IRQ_INFO.
type VFIOIrqInfo struct {
	_     structs.HostLayout
	Argsz uint32
	Flags uint32
	Index uint32
	Count uint32
}

// VFIOIrqSet is the fixed part of struct vfio_irq_set (also vfio-user's
// SET_IRQS); its data (u8 bools or s32 eventfds) follows, except in
// vfio-user, where eventfds travel as SCM_RIGHTS.
type VFIOIrqSet struct {
	_     structs.HostLayout
	Argsz uint32
	Flags uint32
	Index uint32
	Start uint32
	Count uint32
}

// VFIOIommuType1Info is struct vfio_iommu_type1_info; with
// VFIO_IOMMU_INFO_CAPS a capability chain follows at CapOffset.
type VFIOIommuType1Info struct {
	_           structs.HostLayout
	Argsz       uint32
	Flags       uint32
	IOVAPgsizes uint64
	CapOffset   uint32
}

// VFIOIovaRange is struct vfio_iova_range: an inclusive range of IOVAs, so
// that the top of the address space is expressible.
type VFIOIovaRange struct {
	_     structs.HostLayout
	Start uint64
	End   uint64
}

// String formats r as "[start, end]" in hex.
func (r VFIOIovaRange) String() string { return fmt.Sprintf("[%#x, %#x]", r.Start, r.End) }

// VFIOIommuType1InfoCapIovaRange is the fixed part of struct
// vfio_iommu_type1_info_cap_iova_range; NrIovas VFIOIovaRange follow.
type VFIOIommuType1InfoCapIovaRange struct {
	_        structs.HostLayout
	Header   VFIOInfoCapHeader
	NrIOVAs  uint32 `c:"nr_iovas"`
	Reserved uint32
}

// VFIOIommuType1InfoDmaAvail is struct vfio_iommu_type1_info_dma_avail.
type VFIOIommuType1InfoDmaAvail struct {
	_      structs.HostLayout
	Header VFIOInfoCapHeader
	Avail  uint32
}

// VFIOIommuType1DmaMap is struct vfio_iommu_type1_dma_map. vfio-user's
// DMA_MAP has the same layout with Vaddr carrying the offset in the file
// sent with the message.
type VFIOIommuType1DmaMap struct {
	_     structs.HostLayout
	Argsz uint32
	Flags uint32
	Vaddr uint64
	IOVA  uint64
	Size  uint64
}

// VFIOIommuType1DmaUnmap is the fixed part of struct
// vfio_iommu_type1_dma_unmap, also vfio-user's DMA_UNMAP. The kernel
// writes the number of bytes unmapped back into Size.
type VFIOIommuType1DmaUnmap struct {
	_     structs.HostLayout
	Argsz uint32
	Flags uint32
	IOVA  uint64
	Size  uint64
}
