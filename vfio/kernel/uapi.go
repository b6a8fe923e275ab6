package kernel

import (
	"encoding/binary"
	"fmt"

	"github.com/gohfi/gohfi/vfio"
)

// ioctl numbers of include/uapi/linux/vfio.h: _IO(VFIO_TYPE, VFIO_BASE + n)
// with VFIO_TYPE ';'. VFIO uses _IO for all of them and carries the size in
// each structure's argsz instead.
const (
	vfioType = ';'
	vfioBase = 100
)

// The ioctls, one per method of Container, Group and Device.
const (
	ioctlGetAPIVersion     = vfioType<<8 | (vfioBase + 0)  // VFIO_GET_API_VERSION
	ioctlCheckExtension    = vfioType<<8 | (vfioBase + 1)  // VFIO_CHECK_EXTENSION
	ioctlSetIOMMU          = vfioType<<8 | (vfioBase + 2)  // VFIO_SET_IOMMU
	ioctlGroupGetStatus    = vfioType<<8 | (vfioBase + 3)  // VFIO_GROUP_GET_STATUS
	ioctlGroupSetContainer = vfioType<<8 | (vfioBase + 4)  // VFIO_GROUP_SET_CONTAINER
	ioctlGroupUnsetCont    = vfioType<<8 | (vfioBase + 5)  // VFIO_GROUP_UNSET_CONTAINER
	ioctlGroupGetDeviceFD  = vfioType<<8 | (vfioBase + 6)  // VFIO_GROUP_GET_DEVICE_FD
	ioctlDeviceGetInfo     = vfioType<<8 | (vfioBase + 7)  // VFIO_DEVICE_GET_INFO
	ioctlDeviceGetRegion   = vfioType<<8 | (vfioBase + 8)  // VFIO_DEVICE_GET_REGION_INFO
	ioctlDeviceGetIRQInfo  = vfioType<<8 | (vfioBase + 9)  // VFIO_DEVICE_GET_IRQ_INFO
	ioctlDeviceSetIRQs     = vfioType<<8 | (vfioBase + 10) // VFIO_DEVICE_SET_IRQS
	ioctlDeviceReset       = vfioType<<8 | (vfioBase + 11) // VFIO_DEVICE_RESET
	ioctlIOMMUGetInfo      = vfioType<<8 | (vfioBase + 12) // VFIO_IOMMU_GET_INFO
	ioctlIOMMUMapDMA       = vfioType<<8 | (vfioBase + 13) // VFIO_IOMMU_MAP_DMA
	ioctlIOMMUUnmapDMA     = vfioType<<8 | (vfioBase + 14) // VFIO_IOMMU_UNMAP_DMA
)

// ioctlName names an ioctl in errors.
func ioctlName(req uintptr) string {
	switch req {
	case ioctlGetAPIVersion:
		return "VFIO_GET_API_VERSION"
	case ioctlCheckExtension:
		return "VFIO_CHECK_EXTENSION"
	case ioctlSetIOMMU:
		return "VFIO_SET_IOMMU"
	case ioctlGroupGetStatus:
		return "VFIO_GROUP_GET_STATUS"
	case ioctlGroupSetContainer:
		return "VFIO_GROUP_SET_CONTAINER"
	case ioctlGroupUnsetCont:
		return "VFIO_GROUP_UNSET_CONTAINER"
	case ioctlGroupGetDeviceFD:
		return "VFIO_GROUP_GET_DEVICE_FD"
	case ioctlDeviceGetInfo:
		return "VFIO_DEVICE_GET_INFO"
	case ioctlDeviceGetRegion:
		return "VFIO_DEVICE_GET_REGION_INFO"
	case ioctlDeviceGetIRQInfo:
		return "VFIO_DEVICE_GET_IRQ_INFO"
	case ioctlDeviceSetIRQs:
		return "VFIO_DEVICE_SET_IRQS"
	case ioctlDeviceReset:
		return "VFIO_DEVICE_RESET"
	case ioctlIOMMUGetInfo:
		return "VFIO_IOMMU_GET_INFO"
	case ioctlIOMMUMapDMA:
		return "VFIO_IOMMU_MAP_DMA"
	case ioctlIOMMUUnmapDMA:
		return "VFIO_IOMMU_UNMAP_DMA"
	}
	return fmt.Sprintf("ioctl %#x", req)
}

// APIVersion is VFIO_API_VERSION.
const APIVersion = 0

// Extensions (VFIO_CHECK_EXTENSION arguments and VFIO_SET_IOMMU types).
const (
	Type1IOMMU   = 1 // VFIO_TYPE1_IOMMU
	Type1v2IOMMU = 3 // VFIO_TYPE1v2_IOMMU
	DMACCIOMMU   = 4 // VFIO_DMA_CC_IOMMU
	NoIOMMU      = 8 // VFIO_NOIOMMU_IOMMU
	UnmapAll     = 9 // VFIO_UNMAP_ALL
)

// Group status flags (VFIO_GROUP_FLAGS_*).
const (
	GroupViable       = 1 << 0
	GroupContainerSet = 1 << 1
)

// Capability ids.
const (
	regionCapSparseMmap  = 1 // VFIO_REGION_INFO_CAP_SPARSE_MMAP
	iommuCapIOVARange    = 1 // VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE
	iommuCapDMAAvail     = 3 // VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL
	iommuInfoFlagPgsizes = 1 << 0
	iommuInfoFlagCaps    = 1 << 1
)

// SET_IRQS flags (VFIO_IRQ_SET_*).
const (
	IRQSetDataNone      = 1 << 0
	IRQSetDataBool      = 1 << 1
	IRQSetDataEventfd   = 1 << 2
	IRQSetActionMask    = 1 << 3
	IRQSetActionUnmask  = 1 << 4
	IRQSetActionTrigger = 1 << 5
)

// Structure sizes (argsz of the fixed parts).
const (
	groupStatusSize = 8  // struct vfio_group_status
	deviceInfoSize  = 24 // struct vfio_device_info (with cap_offset, pad)
	regionInfoSize  = 32 // struct vfio_region_info
	irqInfoSize     = 16 // struct vfio_irq_info
	irqSetSize      = 20 // struct vfio_irq_set without data
	iommuInfoSize   = 24 // struct vfio_iommu_type1_info
	dmaMapSize      = 32 // struct vfio_iommu_type1_dma_map
	dmaUnmapSize    = 24 // struct vfio_iommu_type1_dma_unmap
	capHeaderSize   = 8  // struct vfio_info_cap_header
)

// VFIO structures are host-endian; this backend runs on x86-64 and arm64.
var le = binary.LittleEndian

// encodeGroupStatus returns a struct vfio_group_status with argsz set.
func encodeGroupStatus() []byte {
	b := make([]byte, groupStatusSize)
	le.PutUint32(b[0:], groupStatusSize)
	return b
}

func decodeGroupStatus(b []byte) uint32 { return le.Uint32(b[4:]) }

func encodeDeviceInfo() []byte {
	b := make([]byte, deviceInfoSize)
	le.PutUint32(b[0:], deviceInfoSize)
	return b
}

func decodeDeviceInfo(b []byte) vfio.DeviceInfo {
	return vfio.DeviceInfo{Flags: le.Uint32(b[4:]), NumRegions: le.Uint32(b[8:]), NumIRQs: le.Uint32(b[12:])}
}

// encodeRegionInfo returns a struct vfio_region_info of argsz bytes (at
// least regionInfoSize) asking for region index.
func encodeRegionInfo(index uint32, argsz int) []byte {
	if argsz < regionInfoSize {
		argsz = regionInfoSize
	}
	b := make([]byte, argsz)
	le.PutUint32(b[0:], uint32(argsz))
	le.PutUint32(b[8:], index)
	return b
}

// decodeRegionInfo decodes a struct vfio_region_info and, when the kernel
// returned its capability chain, the sparse-mmap capability. needed is the
// argsz the kernel asked for: when it is larger than len(b) the call must be
// repeated with a buffer that large to get the capabilities.
func decodeRegionInfo(b []byte) (info vfio.RegionInfo, needed int, err error) {
	if len(b) < regionInfoSize {
		return info, 0, fmt.Errorf("region info: %d bytes", len(b))
	}
	argsz := le.Uint32(b[0:])
	info = vfio.RegionInfo{
		Flags:  le.Uint32(b[4:]),
		Index:  le.Uint32(b[8:]),
		Size:   le.Uint64(b[16:]),
		Offset: le.Uint64(b[24:]),
	}
	if info.Flags&vfio.RegionFlagCaps == 0 {
		return info, 0, nil
	}
	// When the buffer is too small for the capabilities, the kernel sets
	// argsz to the size it needs and leaves cap_offset 0.
	if int(argsz) > len(b) {
		return info, int(argsz), nil
	}
	capOff := le.Uint32(b[12:])
	if capOff == 0 {
		return info, 0, nil
	}
	err = walkCaps(b, capOff, func(id, version uint16, c []byte) error {
		if id != regionCapSparseMmap {
			return nil
		}
		// struct vfio_region_info_cap_sparse_mmap: header, nr_areas u32,
		// reserved u32, areas[] {offset u64, size u64}.
		if len(c) < capHeaderSize+8 {
			return fmt.Errorf("sparse mmap capability: %d bytes", len(c))
		}
		n := int(le.Uint32(c[8:]))
		if len(c) < capHeaderSize+8+16*n {
			return fmt.Errorf("sparse mmap capability: %d areas in %d bytes", n, len(c))
		}
		info.Sparse = make([]vfio.SparseArea, 0, n)
		for i := range n {
			a := c[capHeaderSize+8+16*i:]
			info.Sparse = append(info.Sparse, vfio.SparseArea{Offset: le.Uint64(a), Size: le.Uint64(a[8:])})
		}
		return nil
	})
	return info, 0, err
}

// walkCaps follows a capability chain (struct vfio_info_cap_header: id u16,
// version u16, next u32; offsets from the start of b) and calls fn with each
// capability's bytes, up to the next one or the end of b.
func walkCaps(b []byte, off uint32, fn func(id, version uint16, c []byte) error) error {
	seen := map[uint32]bool{}
	for off != 0 {
		if seen[off] {
			return fmt.Errorf("capability chain loops at offset %d", off)
		}
		seen[off] = true
		if int(off)+capHeaderSize > len(b) || off < 4 {
			return fmt.Errorf("capability at offset %d outside %d bytes", off, len(b))
		}
		h := b[off:]
		id, version, next := le.Uint16(h), le.Uint16(h[2:]), le.Uint32(h[4:])
		end := uint32(len(b))
		if next > off && next < end {
			end = next
		}
		if err := fn(id, version, b[off:end]); err != nil {
			return err
		}
		off = next
	}
	return nil
}

func encodeIRQInfo(index uint32) []byte {
	b := make([]byte, irqInfoSize)
	le.PutUint32(b[0:], irqInfoSize)
	le.PutUint32(b[8:], index)
	return b
}

func decodeIRQInfo(b []byte) vfio.IRQInfo {
	return vfio.IRQInfo{Flags: le.Uint32(b[4:]), Index: le.Uint32(b[8:]), Count: le.Uint32(b[12:])}
}

// encodeIRQSet returns a struct vfio_irq_set. With fds, the data is the
// eventfds (DATA_EVENTFD, -1 detaches one vector); with nil fds and count
// 0, DATA_NONE disables the whole index for ACTION_TRIGGER, or acts on
// [start, start+count) for the mask and unmask actions.
func encodeIRQSet(action uint32, index, start, count uint32, fds []int) []byte {
	flags := action
	size := irqSetSize
	if fds != nil {
		flags |= IRQSetDataEventfd
		count = uint32(len(fds))
		size += 4 * len(fds)
	} else {
		flags |= IRQSetDataNone
	}
	b := make([]byte, size)
	le.PutUint32(b[0:], uint32(size))
	le.PutUint32(b[4:], flags)
	le.PutUint32(b[8:], index)
	le.PutUint32(b[12:], start)
	le.PutUint32(b[16:], count)
	for i, fd := range fds {
		le.PutUint32(b[irqSetSize+4*i:], uint32(int32(fd)))
	}
	return b
}

// IOVARange is an inclusive range of IOVAs the IOMMU can map
// (struct vfio_iova_range).
type IOVARange struct {
	Start, End uint64
}

// IOMMUInfo is struct vfio_iommu_type1_info with its capabilities decoded.
type IOMMUInfo struct {
	Flags      uint32
	PageSizes  uint64 // bitmap of supported page sizes
	IOVARanges []IOVARange
	DMAAvail   uint32 // mappings the container may still create; 0 if not reported
}

func encodeIOMMUInfo(argsz int) []byte {
	if argsz < iommuInfoSize {
		argsz = iommuInfoSize
	}
	b := make([]byte, argsz)
	le.PutUint32(b[0:], uint32(argsz))
	return b
}

func decodeIOMMUInfo(b []byte) (info IOMMUInfo, needed int, err error) {
	if len(b) < iommuInfoSize {
		return info, 0, fmt.Errorf("iommu info: %d bytes", len(b))
	}
	argsz := le.Uint32(b[0:])
	info.Flags = le.Uint32(b[4:])
	if info.Flags&iommuInfoFlagPgsizes != 0 {
		info.PageSizes = le.Uint64(b[8:])
	}
	if info.Flags&iommuInfoFlagCaps == 0 {
		return info, 0, nil
	}
	if int(argsz) > len(b) {
		return info, int(argsz), nil
	}
	capOff := le.Uint32(b[16:])
	if capOff == 0 {
		return info, 0, nil
	}
	err = walkCaps(b, capOff, func(id, version uint16, c []byte) error {
		switch id {
		case iommuCapIOVARange:
			// header, nr_iovas u32, reserved u32, ranges[] {start, end u64}
			if len(c) < capHeaderSize+8 {
				return fmt.Errorf("IOVA range capability: %d bytes", len(c))
			}
			n := int(le.Uint32(c[8:]))
			if len(c) < capHeaderSize+8+16*n {
				return fmt.Errorf("IOVA range capability: %d ranges in %d bytes", n, len(c))
			}
			for i := range n {
				r := c[capHeaderSize+8+16*i:]
				info.IOVARanges = append(info.IOVARanges, IOVARange{Start: le.Uint64(r), End: le.Uint64(r[8:])})
			}
		case iommuCapDMAAvail:
			if len(c) >= capHeaderSize+4 {
				info.DMAAvail = le.Uint32(c[8:])
			}
		}
		return nil
	})
	return info, 0, err
}

// encodeDMAMap returns a struct vfio_iommu_type1_dma_map.
func encodeDMAMap(flags uint32, vaddr, iova, size uint64) []byte {
	b := make([]byte, dmaMapSize)
	le.PutUint32(b[0:], dmaMapSize)
	le.PutUint32(b[4:], flags)
	le.PutUint64(b[8:], vaddr)
	le.PutUint64(b[16:], iova)
	le.PutUint64(b[24:], size)
	return b
}

// encodeDMAUnmap returns a struct vfio_iommu_type1_dma_unmap; the kernel
// writes the number of bytes unmapped back into size.
func encodeDMAUnmap(iova, size uint64) []byte {
	b := make([]byte, dmaUnmapSize)
	le.PutUint32(b[0:], dmaUnmapSize)
	le.PutUint64(b[8:], iova)
	le.PutUint64(b[16:], size)
	return b
}

func decodeDMAUnmapSize(b []byte) uint64 { return le.Uint64(b[16:]) }
