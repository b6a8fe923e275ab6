package kernel

import (
	"encoding/binary"
	"reflect"
	"testing"

	"github.com/gohfi/gohfi/vfio"
	"github.com/gohfi/gohfi/vfio/abi"
)

func TestIoctlNumbers(t *testing.T) {
	// Values from include/uapi/linux/vfio.h as compiled (_IO(';', 100+n)).
	for _, c := range []struct {
		got  uintptr
		want uintptr
		name string
	}{
		{abi.VFIO_GET_API_VERSION, 0x3b64, "VFIO_GET_API_VERSION"},
		{abi.VFIO_CHECK_EXTENSION, 0x3b65, "VFIO_CHECK_EXTENSION"},
		{abi.VFIO_SET_IOMMU, 0x3b66, "VFIO_SET_IOMMU"},
		{abi.VFIO_GROUP_GET_STATUS, 0x3b67, "VFIO_GROUP_GET_STATUS"},
		{abi.VFIO_GROUP_SET_CONTAINER, 0x3b68, "VFIO_GROUP_SET_CONTAINER"},
		{abi.VFIO_GROUP_UNSET_CONTAINER, 0x3b69, "VFIO_GROUP_UNSET_CONTAINER"},
		{abi.VFIO_GROUP_GET_DEVICE_FD, 0x3b6a, "VFIO_GROUP_GET_DEVICE_FD"},
		{abi.VFIO_DEVICE_GET_INFO, 0x3b6b, "VFIO_DEVICE_GET_INFO"},
		{abi.VFIO_DEVICE_GET_REGION_INFO, 0x3b6c, "VFIO_DEVICE_GET_REGION_INFO"},
		{abi.VFIO_DEVICE_GET_IRQ_INFO, 0x3b6d, "VFIO_DEVICE_GET_IRQ_INFO"},
		{abi.VFIO_DEVICE_SET_IRQS, 0x3b6e, "VFIO_DEVICE_SET_IRQS"},
		{abi.VFIO_DEVICE_RESET, 0x3b6f, "VFIO_DEVICE_RESET"},
		{abi.VFIO_IOMMU_GET_INFO, 0x3b70, "VFIO_IOMMU_GET_INFO"},
		{abi.VFIO_IOMMU_MAP_DMA, 0x3b71, "VFIO_IOMMU_MAP_DMA"},
		{abi.VFIO_IOMMU_UNMAP_DMA, 0x3b72, "VFIO_IOMMU_UNMAP_DMA"},
	} {
		if c.got != c.want {
			t.Errorf("%s = %#x, want %#x", c.name, c.got, c.want)
		}
		if n := ioctlName(c.got); n != c.name {
			t.Errorf("ioctlName(%#x) = %q, want %q", c.got, n, c.name)
		}
	}
	if n := ioctlName(0x1234); n != "ioctl 0x1234" {
		t.Errorf("ioctlName of an unknown number = %q", n)
	}
}

func TestEncodeIRQSet(t *testing.T) {
	b := encodeIRQSet(abi.VFIO_IRQ_SET_ACTION_TRIGGER, vfio.PCIMSIXIRQIndex, 1, 0, []int{7, -1, 9})
	le := binary.LittleEndian
	if len(b) != 20+12 || le.Uint32(b) != 32 {
		t.Fatalf("irq_set argsz/len = %d/%d, want 32", le.Uint32(b), len(b))
	}
	if f := le.Uint32(b[4:]); f != abi.VFIO_IRQ_SET_DATA_EVENTFD|abi.VFIO_IRQ_SET_ACTION_TRIGGER {
		t.Errorf("flags = %#x", f)
	}
	if le.Uint32(b[8:]) != 2 || le.Uint32(b[12:]) != 1 || le.Uint32(b[16:]) != 3 {
		t.Errorf("index/start/count = % x", b[8:20])
	}
	if int32(le.Uint32(b[20:])) != 7 || int32(le.Uint32(b[24:])) != -1 || int32(le.Uint32(b[28:])) != 9 {
		t.Errorf("fds = % x", b[20:])
	}

	// Disabling an index: DATA_NONE, count 0, no data.
	b = encodeIRQSet(abi.VFIO_IRQ_SET_ACTION_TRIGGER, vfio.PCIINTxIRQIndex, 0, 0, nil)
	if len(b) != 20 || le.Uint32(b) != 20 || le.Uint32(b[4:]) != abi.VFIO_IRQ_SET_DATA_NONE|abi.VFIO_IRQ_SET_ACTION_TRIGGER || le.Uint32(b[16:]) != 0 {
		t.Errorf("disable = % x", b)
	}
	// Unmask of INTx vector 0.
	b = encodeIRQSet(abi.VFIO_IRQ_SET_ACTION_UNMASK, vfio.PCIINTxIRQIndex, 0, 1, nil)
	if le.Uint32(b[4:]) != abi.VFIO_IRQ_SET_DATA_NONE|abi.VFIO_IRQ_SET_ACTION_UNMASK || le.Uint32(b[16:]) != 1 {
		t.Errorf("unmask = % x", b)
	}
}

// Size of struct vfio_region_info.
var regionInfoSize = abi.SizeofVFIORegionInfo

// regionInfoWithCaps builds what VFIO_DEVICE_GET_REGION_INFO returns for a
// BAR with a capability chain: an unknown capability first, then the
// sparse mmap one.
func regionInfoWithCaps(areas []vfio.SparseArea) []byte {
	le := binary.LittleEndian
	unknown := make([]byte, 16) // id 99, next -> sparse
	sparse := make([]byte, 16+16*len(areas))
	total := regionInfoSize + len(unknown) + len(sparse)
	b := make([]byte, total)
	le.PutUint32(b[0:], uint32(total))
	le.PutUint32(b[4:], vfio.RegionFlagRead|vfio.RegionFlagWrite|vfio.RegionFlagMmap|vfio.RegionFlagCaps)
	le.PutUint32(b[8:], 0)
	le.PutUint32(b[12:], uint32(regionInfoSize))
	le.PutUint64(b[16:], 0x10000)
	le.PutUint64(b[24:], 0)
	le.PutUint16(unknown[0:], 99)
	le.PutUint16(unknown[2:], 1)
	le.PutUint32(unknown[4:], uint32(regionInfoSize+len(unknown)))
	le.PutUint16(sparse[0:], abi.VFIO_REGION_INFO_CAP_SPARSE_MMAP)
	le.PutUint16(sparse[2:], 1)
	le.PutUint32(sparse[4:], 0)
	le.PutUint32(sparse[8:], uint32(len(areas)))
	for i, a := range areas {
		le.PutUint64(sparse[16+16*i:], a.Offset)
		le.PutUint64(sparse[24+16*i:], a.Size)
	}
	copy(b[regionInfoSize:], unknown)
	copy(b[regionInfoSize+len(unknown):], sparse)
	return b
}

func TestDecodeRegionInfoSparse(t *testing.T) {
	areas := []vfio.SparseArea{{Offset: 0x1000, Size: 0x3000}, {Offset: 0x8000, Size: 0x8000}}
	full := regionInfoWithCaps(areas)

	// First call with the fixed size: the kernel reports the argsz it
	// needs; the decoder asks for a second call.
	// cap_offset stays 0 in that reply, as in vfio_pci_ioctl_get_region_info.
	short := append([]byte(nil), full[:regionInfoSize]...)
	binary.LittleEndian.PutUint32(short[12:], 0)
	info, needed, err := decodeRegionInfo(short)
	if err != nil {
		t.Fatal(err)
	}
	if needed != len(full) || info.Sparse != nil {
		t.Fatalf("needed = %d (want %d), sparse %v", needed, len(full), info.Sparse)
	}

	info, needed, err = decodeRegionInfo(full)
	if err != nil || needed != 0 {
		t.Fatalf("decode: needed %d, err %v", needed, err)
	}
	if info.Size != 0x10000 || !reflect.DeepEqual(info.Sparse, areas) {
		t.Fatalf("info = %+v", info)
	}
	if !info.Mappable(0x8000, 0x8000) || info.Mappable(0, 0x1000) || info.Mappable(0x3000, 0x2000) {
		t.Error("Mappable does not follow the sparse areas")
	}
}

func TestDecodeRegionInfoBadCaps(t *testing.T) {
	b := regionInfoWithCaps([]vfio.SparseArea{{Offset: 0, Size: 0x1000}})
	// Claim more areas than the buffer holds.
	binary.LittleEndian.PutUint32(b[regionInfoSize+16+8:], 1000)
	if _, _, err := decodeRegionInfo(b); err == nil {
		t.Error("oversized nr_areas accepted")
	}
	// A chain that loops back onto itself.
	b = regionInfoWithCaps(nil)
	binary.LittleEndian.PutUint32(b[regionInfoSize+4:], uint32(regionInfoSize))
	if _, _, err := decodeRegionInfo(b); err == nil {
		t.Error("looping capability chain accepted")
	}
	// A capability offset past the end.
	b = regionInfoWithCaps(nil)
	binary.LittleEndian.PutUint32(b[12:], uint32(len(b)))
	if _, _, err := decodeRegionInfo(b); err == nil {
		t.Error("capability outside the buffer accepted")
	}
	// Fewer bytes than the structure.
	if _, _, err := decodeRegionInfo(b[:regionInfoSize-1]); err == nil {
		t.Error("short region info accepted")
	}
}

func TestDecodeIOMMUInfo(t *testing.T) {
	le := binary.LittleEndian
	iommuInfoSize := abi.SizeofVFIOIommuType1Info
	// Fixed part, IOVA range capability (two ranges), DMA avail capability.
	iova := make([]byte, 16+32)
	avail := make([]byte, 12)
	total := iommuInfoSize + len(iova) + len(avail)
	b := make([]byte, total)
	le.PutUint32(b[0:], uint32(total))
	le.PutUint32(b[4:], abi.VFIO_IOMMU_INFO_PGSIZES|abi.VFIO_IOMMU_INFO_CAPS)
	le.PutUint64(b[8:], 0x40201000) // 4K | 2M | 1G
	le.PutUint32(b[16:], uint32(iommuInfoSize))
	le.PutUint16(iova[0:], abi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE)
	le.PutUint16(iova[2:], 1)
	le.PutUint32(iova[4:], uint32(iommuInfoSize+len(iova)))
	le.PutUint32(iova[8:], 2)
	le.PutUint64(iova[16:], 0)
	le.PutUint64(iova[24:], 0xfedfffff)
	le.PutUint64(iova[32:], 0xfef00000)
	le.PutUint64(iova[40:], 0x7fffffffff)
	le.PutUint16(avail[0:], abi.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL)
	le.PutUint16(avail[2:], 1)
	le.PutUint32(avail[8:], 65535)
	copy(b[iommuInfoSize:], iova)
	copy(b[iommuInfoSize+len(iova):], avail)

	short := append([]byte(nil), b[:iommuInfoSize]...)
	le.PutUint32(short[16:], 0) // the kernel leaves cap_offset 0 when argsz is short
	info, needed, err := decodeIOMMUInfo(short)
	if err != nil || needed != total {
		t.Fatalf("short decode: needed %d want %d, err %v", needed, total, err)
	}
	info, needed, err = decodeIOMMUInfo(b)
	if err != nil || needed != 0 {
		t.Fatalf("decode: needed %d, err %v", needed, err)
	}
	want := IOMMUInfo{
		Flags:      abi.VFIO_IOMMU_INFO_PGSIZES | abi.VFIO_IOMMU_INFO_CAPS,
		PageSizes:  0x40201000,
		IOVARanges: []vfio.IOVARange{{Start: 0, End: 0xfedfffff}, {Start: 0xfef00000, End: 0x7fffffffff}},
		DMAAvail:   65535,
	}
	if !reflect.DeepEqual(info, want) {
		t.Fatalf("info = %+v\nwant   %+v", info, want)
	}
	// More ranges claimed than present.
	le.PutUint32(b[iommuInfoSize+8:], 3)
	if _, _, err := decodeIOMMUInfo(b); err == nil {
		t.Error("oversized nr_iovas accepted")
	}
}

func TestEncodeWithCaps(t *testing.T) {
	le := binary.LittleEndian
	b := encodeRegionInfo(vfio.PCIConfigRegionIndex, 0)
	if len(b) != 32 || le.Uint32(b) != 32 || le.Uint32(b[8:]) != 7 {
		t.Errorf("region_info = % x", b)
	}
	b = encodeRegionInfo(vfio.PCIBAR2RegionIndex, 100)
	if len(b) != 100 || le.Uint32(b) != 100 || le.Uint32(b[8:]) != 2 {
		t.Errorf("region_info with room for capabilities = % x", b)
	}
	b = encodeIOMMUInfo(0)
	if len(b) != 24 || le.Uint32(b) != 24 {
		t.Errorf("iommu_info = % x", b)
	}
}
