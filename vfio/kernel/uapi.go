package kernel

import (
	"encoding/binary"
	"fmt"

	"github.com/gohfi/gohfi/vfio"
	"github.com/gohfi/gohfi/vfio/abi"
)

// The structures the ioctls take are vfio/abi's, whose memory is the C
// layout: fixed-size ones go to the kernel as they are (abi.Bytes); those
// the kernel extends with a capability chain or data are built in a
// larger buffer here.

// ioctlNames names the ioctls in errors.
var ioctlNames = map[uintptr]string{
	abi.VFIO_GET_API_VERSION:        "VFIO_GET_API_VERSION",
	abi.VFIO_CHECK_EXTENSION:        "VFIO_CHECK_EXTENSION",
	abi.VFIO_SET_IOMMU:              "VFIO_SET_IOMMU",
	abi.VFIO_GROUP_GET_STATUS:       "VFIO_GROUP_GET_STATUS",
	abi.VFIO_GROUP_SET_CONTAINER:    "VFIO_GROUP_SET_CONTAINER",
	abi.VFIO_GROUP_UNSET_CONTAINER:  "VFIO_GROUP_UNSET_CONTAINER",
	abi.VFIO_GROUP_GET_DEVICE_FD:    "VFIO_GROUP_GET_DEVICE_FD",
	abi.VFIO_DEVICE_GET_INFO:        "VFIO_DEVICE_GET_INFO",
	abi.VFIO_DEVICE_GET_REGION_INFO: "VFIO_DEVICE_GET_REGION_INFO",
	abi.VFIO_DEVICE_GET_IRQ_INFO:    "VFIO_DEVICE_GET_IRQ_INFO",
	abi.VFIO_DEVICE_SET_IRQS:        "VFIO_DEVICE_SET_IRQS",
	abi.VFIO_DEVICE_RESET:           "VFIO_DEVICE_RESET",
	abi.VFIO_IOMMU_GET_INFO:         "VFIO_IOMMU_GET_INFO",
	abi.VFIO_IOMMU_MAP_DMA:          "VFIO_IOMMU_MAP_DMA",
	abi.VFIO_IOMMU_UNMAP_DMA:        "VFIO_IOMMU_UNMAP_DMA",
}

// ioctlName names an ioctl in errors.
func ioctlName(req uintptr) string {
	if n, ok := ioctlNames[req]; ok {
		return n
	}
	return fmt.Sprintf("ioctl %#x", req)
}

// withCaps returns a buffer of argsz bytes (at least the size of *fixed)
// that starts with *fixed, its Argsz set by set: the argument of an ioctl
// whose reply the kernel may extend with a capability chain.
func withCaps[T abi.Struct](fixed *T, argsz int, set func(*T, uint32)) []byte {
	argsz = max(argsz, len(abi.Bytes(fixed)))
	set(fixed, uint32(argsz))
	b := make([]byte, argsz)
	abi.Encode(b, fixed)
	return b
}

// encodeRegionInfo returns a struct vfio_region_info of argsz bytes (at
// least the structure) asking for region index.
func encodeRegionInfo(index uint32, argsz int) []byte {
	return withCaps(&abi.VFIORegionInfo{Index: index}, argsz, func(r *abi.VFIORegionInfo, n uint32) { r.Argsz = n })
}

// decodeRegionInfo decodes a struct vfio_region_info and, when the kernel
// returned its capability chain, the sparse-mmap capability. needed is the
// argsz the kernel asked for: when it is larger than len(b) the call must be
// repeated with a buffer that large to get the capabilities.
func decodeRegionInfo(b []byte) (info vfio.RegionInfo, needed int, err error) {
	var ri abi.VFIORegionInfo
	if !abi.Decode(b, &ri) {
		return info, 0, fmt.Errorf("region info: %d bytes", len(b))
	}
	info = vfio.RegionInfo{Flags: ri.Flags, Index: ri.Index, Size: ri.Size, Offset: ri.Offset}
	if ri.Flags&abi.VFIO_REGION_INFO_FLAG_CAPS == 0 {
		return info, 0, nil
	}
	// When the buffer is too small for the capabilities, the kernel sets
	// argsz to the size it needs and leaves cap_offset 0.
	if int(ri.Argsz) > len(b) {
		return info, int(ri.Argsz), nil
	}
	err = walkCaps(b, ri.CapOffset, func(h abi.VFIOInfoCapHeader, c []byte) error {
		if h.ID != abi.VFIO_REGION_INFO_CAP_SPARSE_MMAP {
			return nil
		}
		areas, err := decodeCapArray[abi.VFIORegionInfoCapSparseMmap, abi.VFIORegionSparseMmapArea](c, "sparse mmap",
			func(sp *abi.VFIORegionInfoCapSparseMmap) int { return int(sp.NrAreas) })
		info.Sparse = areas
		return err
	})
	return info, 0, err
}

// decodeCapArray decodes a capability that is a fixed part H followed by
// count(H) entries E (a flexible array member: sparse mmap areas, IOVA
// ranges).
func decodeCapArray[H, E abi.Struct](c []byte, name string, count func(*H) int) ([]E, error) {
	var h H
	if !abi.Decode(c, &h) {
		return nil, fmt.Errorf("%s capability: %d bytes", name, len(c))
	}
	es, ok := abi.DecodeSlice[E](c[len(abi.Bytes(&h)):], count(&h))
	if !ok {
		return nil, fmt.Errorf("%s capability: %d entries in %d bytes", name, count(&h), len(c))
	}
	return es, nil
}

// walkCaps follows a capability chain (struct vfio_info_cap_header;
// offsets from the start of b) and calls fn with each capability's header
// and bytes, up to the next one or the end of b.
func walkCaps(b []byte, off uint32, fn func(h abi.VFIOInfoCapHeader, c []byte) error) error {
	seen := map[uint32]bool{}
	for off != 0 {
		if seen[off] {
			return fmt.Errorf("capability chain loops at offset %d", off)
		}
		seen[off] = true
		var h abi.VFIOInfoCapHeader
		if off < 4 || int(off) > len(b) || !abi.Decode(b[off:], &h) {
			return fmt.Errorf("capability at offset %d outside %d bytes", off, len(b))
		}
		end := uint32(len(b))
		if h.Next > off && h.Next < end {
			end = h.Next
		}
		if err := fn(h, b[off:end]); err != nil {
			return err
		}
		off = h.Next
	}
	return nil
}

// encodeIRQSet returns a struct vfio_irq_set. With fds, the data is the
// eventfds (DATA_EVENTFD, -1 detaches one vector); with nil fds and count
// 0, DATA_NONE disables the whole index for ACTION_TRIGGER, or acts on
// [start, start+count) for the mask and unmask actions.
func encodeIRQSet(action uint32, index, start, count uint32, fds []int) []byte {
	s := abi.VFIOIrqSet{Flags: action | abi.VFIO_IRQ_SET_DATA_NONE, Index: index, Start: start, Count: count}
	fixed := abi.SizeofVFIOIrqSet
	if fds != nil {
		s.Flags = action | abi.VFIO_IRQ_SET_DATA_EVENTFD
		s.Count = uint32(len(fds))
	}
	b := withCaps(&s, fixed+4*len(fds), func(s *abi.VFIOIrqSet, n uint32) { s.Argsz = n })
	for i, fd := range fds {
		binary.NativeEndian.PutUint32(b[fixed+4*i:], uint32(int32(fd)))
	}
	return b
}

// IOMMUInfo is struct vfio_iommu_type1_info with its capabilities decoded.
type IOMMUInfo struct {
	Flags      uint32
	PageSizes  uint64 // bitmap of supported page sizes
	IOVARanges []vfio.IOVARange
	DMAAvail   uint32 // mappings the container may still create; 0 if not reported
}

func encodeIOMMUInfo(argsz int) []byte {
	return withCaps(&abi.VFIOIommuType1Info{}, argsz, func(i *abi.VFIOIommuType1Info, n uint32) { i.Argsz = n })
}

func decodeIOMMUInfo(b []byte) (info IOMMUInfo, needed int, err error) {
	var ii abi.VFIOIommuType1Info
	if !abi.Decode(b, &ii) {
		return info, 0, fmt.Errorf("iommu info: %d bytes", len(b))
	}
	info.Flags = ii.Flags
	if ii.Flags&abi.VFIO_IOMMU_INFO_PGSIZES != 0 {
		info.PageSizes = ii.IOVAPgsizes
	}
	if ii.Flags&abi.VFIO_IOMMU_INFO_CAPS == 0 {
		return info, 0, nil
	}
	if int(ii.Argsz) > len(b) {
		return info, int(ii.Argsz), nil
	}
	err = walkCaps(b, ii.CapOffset, func(h abi.VFIOInfoCapHeader, c []byte) error {
		switch h.ID {
		case abi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
			r, err := decodeCapArray[abi.VFIOIommuType1InfoCapIovaRange, abi.VFIOIovaRange](c, "IOVA range",
				func(cr *abi.VFIOIommuType1InfoCapIovaRange) int { return int(cr.NrIOVAs) })
			if err != nil {
				return err
			}
			info.IOVARanges = append(info.IOVARanges, r...)
		case abi.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL:
			var a abi.VFIOIommuType1InfoDmaAvail
			if abi.Decode(c, &a) {
				info.DMAAvail = a.Avail
			}
		}
		return nil
	})
	return info, 0, err
}
