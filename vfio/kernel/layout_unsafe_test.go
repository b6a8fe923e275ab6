package kernel

import (
	"testing"
	"unsafe"
)

// Go mirrors of the C structures, laid out by the compiler with the same
// rules as the C ABI on x86-64, to check the hand-written encodings
// independently.
type cDMAMap struct {
	Argsz, Flags      uint32
	Vaddr, IOVA, Size uint64
}

type cDMAUnmap struct {
	Argsz, Flags uint32
	IOVA, Size   uint64
}

type cRegionInfo struct {
	Argsz, Flags, Index, CapOffset uint32
	Size, Offset                   uint64
}

type cIOMMUInfo struct {
	Argsz, Flags   uint32
	IOVAPgsizes    uint64
	CapOffset, Pad uint32
}

type cIRQSet struct {
	Argsz, Flags, Index, Start, Count uint32
}

func TestLayoutMatchesC(t *testing.T) {
	if s := unsafe.Sizeof(cDMAMap{}); s != dmaMapSize {
		t.Errorf("dma_map size %d, encoder uses %d", s, dmaMapSize)
	}
	if s := unsafe.Sizeof(cDMAUnmap{}); s != dmaUnmapSize {
		t.Errorf("dma_unmap size %d, encoder uses %d", s, dmaUnmapSize)
	}
	if s := unsafe.Sizeof(cRegionInfo{}); s != regionInfoSize {
		t.Errorf("region_info size %d, encoder uses %d", s, regionInfoSize)
	}
	if s := unsafe.Sizeof(cIOMMUInfo{}); s != iommuInfoSize {
		t.Errorf("iommu_info size %d, encoder uses %d", s, iommuInfoSize)
	}
	// vfio_irq_set ends in a flexible array of u8: offsetof(data) is 20.
	if s := unsafe.Sizeof(cIRQSet{}); s != irqSetSize {
		t.Errorf("irq_set header %d, encoder uses %d", s, irqSetSize)
	}

	b := encodeDMAMap(3, 0x1111, 0x2222, 0x3333)
	m := (*cDMAMap)(unsafe.Pointer(&b[0]))
	if *m != (cDMAMap{Argsz: 32, Flags: 3, Vaddr: 0x1111, IOVA: 0x2222, Size: 0x3333}) {
		t.Errorf("dma_map decodes as %+v", *m)
	}
	b = encodeDMAUnmap(0x4444, 0x5555)
	u := (*cDMAUnmap)(unsafe.Pointer(&b[0]))
	if *u != (cDMAUnmap{Argsz: 24, IOVA: 0x4444, Size: 0x5555}) {
		t.Errorf("dma_unmap decodes as %+v", *u)
	}
	r := cRegionInfo{Argsz: 32, Flags: 0xf, Index: 2, CapOffset: 0, Size: 0x1000, Offset: 0x20000000000}
	rb := unsafe.Slice((*byte)(unsafe.Pointer(&r)), unsafe.Sizeof(r))
	info, _, err := decodeRegionInfo(rb)
	if err != nil || info.Index != 2 || info.Flags != 0xf || info.Size != 0x1000 || info.Offset != 0x20000000000 {
		t.Errorf("region_info decodes as %+v, %v", info, err)
	}
	i := cIOMMUInfo{Argsz: 24, Flags: iommuInfoFlagPgsizes, IOVAPgsizes: 0x1000}
	ib := unsafe.Slice((*byte)(unsafe.Pointer(&i)), unsafe.Sizeof(i))
	ii, _, err := decodeIOMMUInfo(ib)
	if err != nil || ii.PageSizes != 0x1000 {
		t.Errorf("iommu_info decodes as %+v, %v", ii, err)
	}
	s := encodeIRQSet(IRQSetActionTrigger, 2, 3, 0, []int{5})
	h := (*cIRQSet)(unsafe.Pointer(&s[0]))
	if *h != (cIRQSet{Argsz: 24, Flags: IRQSetDataEventfd | IRQSetActionTrigger, Index: 2, Start: 3, Count: 1}) {
		t.Errorf("irq_set decodes as %+v", *h)
	}
}
