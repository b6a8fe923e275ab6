package vfiouser

import (
	"encoding/binary"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/vfio"
)

func BenchmarkRegionReadTrapped(b *testing.B) {
	c, _, _ := newPair(b, nil, nil)
	var buf [4]byte
	b.ReportAllocs()
	for b.Loop() {
		if err := c.ReadRegion(vfio.PCIBAR0RegionIndex, 0x40, buf[:]); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkRegionWriteTrapped(b *testing.B) {
	c, _, _ := newPair(b, nil, nil)
	var buf [4]byte
	b.ReportAllocs()
	for b.Loop() {
		if err := c.WriteRegion(vfio.PCIBAR0RegionIndex, 0x40, buf[:]); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkMmapStore(b *testing.B) {
	c, m, _ := newPair(b, nil, nil)
	mem, err := c.MmapRegion(vfio.PCIBAR2RegionIndex, 4096, 4096, unix.PROT_READ|unix.PROT_WRITE)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Munmap(mem)
	b.ReportAllocs()
	var i uint64
	for b.Loop() {
		binary.LittleEndian.PutUint64(mem[(i&63)*8:], i)
		i++
	}
	b.StopTimer()
	if got := binary.LittleEndian.Uint64(m.mem[4096+((i-1)&63)*8:]); got != i-1 {
		b.Fatalf("model sees %d, want %d", got, i-1)
	}
}

const benchDMASize = 64 << 10

func BenchmarkDMAMapNoFD(b *testing.B) {
	c, _, _ := newPair(b, nil, nil)
	mem := anonMem(b, benchDMASize)
	b.ReportAllocs()
	for b.Loop() {
		if err := c.DMAMap(vfio.DMAMapping{IOVA: 0x100000, Vaddr: addrOf(mem), Size: benchDMASize, Flags: vfio.DMARead | vfio.DMAWrite}); err != nil {
			b.Fatal(err)
		}
		if err := c.DMAUnmap(0x100000, benchDMASize); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDMAMapFD(b *testing.B) {
	c, _, _ := newPair(b, nil, nil)
	f, mem := memfdMem(b, benchDMASize)
	b.ReportAllocs()
	for b.Loop() {
		if err := c.DMAMap(vfio.DMAMapping{IOVA: 0x100000, Vaddr: addrOf(mem), Size: benchDMASize, Flags: vfio.DMARead | vfio.DMAWrite, File: f}); err != nil {
			b.Fatal(err)
		}
		if err := c.DMAUnmap(0x100000, benchDMASize); err != nil {
			b.Fatal(err)
		}
	}
}

func benchDMAWrite(b *testing.B, withFD bool) {
	c, m, _ := newPair(b, nil, nil)
	mp := vfio.DMAMapping{IOVA: 0x100000, Size: benchDMASize, Flags: vfio.DMARead | vfio.DMAWrite}
	if withFD {
		f, mem := memfdMem(b, benchDMASize)
		mp.File, mp.Vaddr = f, addrOf(mem)
	} else {
		mp.Vaddr = addrOf(anonMem(b, benchDMASize))
	}
	if err := c.DMAMap(mp); err != nil {
		b.Fatal(err)
	}
	dma := m.getDMA()
	data := make([]byte, benchDMASize)
	b.SetBytes(benchDMASize)
	b.ReportAllocs()
	for b.Loop() {
		if err := dma.Write(0x100000, data); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDMAWriteNoFD(b *testing.B) { requireProcessVM(b); benchDMAWrite(b, false) }
func BenchmarkDMAWriteFD(b *testing.B)   { benchDMAWrite(b, true) }

func BenchmarkDMAReadNoFD(b *testing.B) {
	requireProcessVM(b)
	c, m, _ := newPair(b, nil, nil)
	mem := anonMem(b, benchDMASize)
	if err := c.DMAMap(vfio.DMAMapping{IOVA: 0x100000, Vaddr: addrOf(mem), Size: benchDMASize, Flags: vfio.DMARead}); err != nil {
		b.Fatal(err)
	}
	dma := m.getDMA()
	var desc [64]byte
	b.ReportAllocs()
	for b.Loop() {
		if err := dma.Read(0x100000, desc[:]); err != nil {
			b.Fatal(err)
		}
	}
}
