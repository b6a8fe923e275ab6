package vfiouser

import (
	"encoding/binary"
	"fmt"
	"os"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/vfio"
)

// Regions of the fake device.
const (
	fakeBAR0Size = 4096 // trapped registers
	fakeBAR2Size = 8192 // first page trapped, second page mappable (sparse)
	fakeBAR4Size = 4096 // wholly mappable, at offset 8192 of the memfd
	fakeCfgSize  = 256
	fakeMemfd    = fakeBAR2Size + fakeBAR4Size

	// BAR0 register that makes the model DMA synchronously, from inside
	// the register write: {iova u64 @0x100, len u32 @0x108, op u32 @0x10c},
	// written last is op (1 = read into the BAR0 buffer at 0x800, 2 =
	// write from it). The result errno lands at 0x110.
	regDMAIOVA   = 0x100
	regDMALen    = 0x108
	regDMAOp     = 0x10c
	regDMAResult = 0x110
	regDMABuf    = 0x800
)

// fakeModel is a DeviceModel for tests: trapped BAR0 and config space, a
// memfd shared by BAR2 (sparse) and BAR4, MSI-X with 4 vectors.
type fakeModel struct {
	mu       sync.Mutex
	bar0     []byte
	cfg      []byte
	memfd    *os.File
	mem      []byte // model's mapping of memfd
	irqs     map[uint32][]*os.File
	resets   int
	dma      DMA
	attached int
	detached int
}

func newFakeModel(t testing.TB) *fakeModel {
	t.Helper()
	fd, err := unix.MemfdCreate("fake-bars", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatalf("memfd_create: %v", err)
	}
	if err := unix.Ftruncate(fd, fakeMemfd); err != nil {
		t.Fatalf("ftruncate: %v", err)
	}
	mem, err := unix.Mmap(fd, 0, fakeMemfd, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatalf("mmap: %v", err)
	}
	m := &fakeModel{
		bar0:  make([]byte, fakeBAR0Size),
		cfg:   make([]byte, fakeCfgSize),
		memfd: os.NewFile(uintptr(fd), "fake-bars"),
		mem:   mem,
		irqs:  make(map[uint32][]*os.File),
	}
	binary.LittleEndian.PutUint32(m.cfg[0:], 0x1234abcd)
	t.Cleanup(func() {
		unix.Munmap(mem)
		m.memfd.Close()
		m.mu.Lock()
		for _, fs := range m.irqs {
			for _, f := range fs {
				if f != nil {
					f.Close()
				}
			}
		}
		m.mu.Unlock()
	})
	return m
}

func (m *fakeModel) DeviceInfo() vfio.DeviceInfo {
	return vfio.DeviceInfo{Flags: vfio.DeviceFlagsPCI | vfio.DeviceFlagsReset, NumRegions: vfio.PCINumRegions, NumIRQs: vfio.PCINumIRQs}
}

func (m *fakeModel) RegionInfo(index uint32) (vfio.RegionInfo, *os.File, error) {
	rw := uint32(vfio.RegionFlagRead | vfio.RegionFlagWrite)
	switch index {
	case vfio.PCIBAR0RegionIndex:
		return vfio.RegionInfo{Index: index, Flags: rw, Size: fakeBAR0Size}, nil, nil
	case vfio.PCIBAR2RegionIndex:
		return vfio.RegionInfo{Index: index, Flags: rw | vfio.RegionFlagMmap, Size: fakeBAR2Size,
			Sparse: []vfio.SparseArea{{Offset: 4096, Size: 4096}}}, m.memfd, nil
	case vfio.PCIBAR4RegionIndex:
		return vfio.RegionInfo{Index: index, Flags: rw | vfio.RegionFlagMmap, Size: fakeBAR4Size, Offset: fakeBAR2Size}, m.memfd, nil
	case vfio.PCIConfigRegionIndex:
		return vfio.RegionInfo{Index: index, Flags: rw, Size: fakeCfgSize}, nil, nil
	}
	return vfio.RegionInfo{Index: index}, nil, nil
}

func (m *fakeModel) region(index uint32, off uint64, n int) ([]byte, error) {
	var b []byte
	switch index {
	case vfio.PCIBAR0RegionIndex:
		b = m.bar0
	case vfio.PCIBAR2RegionIndex:
		b = m.mem[:fakeBAR2Size]
	case vfio.PCIBAR4RegionIndex:
		b = m.mem[fakeBAR2Size:]
	case vfio.PCIConfigRegionIndex:
		b = m.cfg
	}
	if off > uint64(len(b)) || uint64(n) > uint64(len(b))-off {
		return nil, fmt.Errorf("fake: region %d %#x+%d: %w", index, off, n, unix.EINVAL)
	}
	return b[off : off+uint64(n)], nil
}

func (m *fakeModel) RegionRead(index uint32, off uint64, p []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	b, err := m.region(index, off, len(p))
	if err != nil {
		return err
	}
	copy(p, b)
	return nil
}

func (m *fakeModel) RegionWrite(index uint32, off uint64, p []byte) error {
	m.mu.Lock()
	b, err := m.region(index, off, len(p))
	if err != nil {
		m.mu.Unlock()
		return err
	}
	copy(b, p)
	var op uint32
	var iova uint64
	var n uint32
	var dma DMA
	if index == vfio.PCIBAR0RegionIndex && off == regDMAOp && len(p) == 4 {
		op = binary.LittleEndian.Uint32(p)
		iova = binary.LittleEndian.Uint64(m.bar0[regDMAIOVA:])
		n = min(binary.LittleEndian.Uint32(m.bar0[regDMALen:]), fakeBAR0Size-regDMABuf)
		dma = m.dma
	}
	m.mu.Unlock()
	if op == 0 {
		return nil
	}
	// The DMA runs synchronously inside the register write, like a
	// device that fetches a descriptor when its doorbell rings.
	buf := make([]byte, n)
	var derr error
	if dma == nil {
		derr = unix.ENODEV
	} else if op == 1 {
		derr = dma.Read(iova, buf)
	} else {
		m.mu.Lock()
		copy(buf, m.bar0[regDMABuf:])
		m.mu.Unlock()
		derr = dma.Write(iova, buf)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if op == 1 && derr == nil {
		copy(m.bar0[regDMABuf:], buf)
	}
	binary.LittleEndian.PutUint32(m.bar0[regDMAResult:], uint32(errnoOf(derr)))
	return nil
}

func (m *fakeModel) IRQInfo(index uint32) (vfio.IRQInfo, error) {
	switch index {
	case vfio.PCIINTxIRQIndex:
		return vfio.IRQInfo{Index: index, Flags: vfio.IRQInfoEventfd | vfio.IRQInfoMaskable, Count: 1}, nil
	case vfio.PCIMSIXIRQIndex:
		return vfio.IRQInfo{Index: index, Flags: vfio.IRQInfoEventfd | vfio.IRQInfoNoresize, Count: 4}, nil
	}
	return vfio.IRQInfo{Index: index}, nil
}

func (m *fakeModel) SetIRQs(index, start, count uint32, fds []*os.File) error {
	info, _ := m.IRQInfo(index)
	m.mu.Lock()
	defer m.mu.Unlock()
	v := m.irqs[index]
	if len(v) < int(info.Count) {
		v = append(v, make([]*os.File, int(info.Count)-len(v))...)
	}
	if start == 0 && count == 0 && fds == nil {
		start, count = 0, info.Count
	}
	if uint64(start)+uint64(count) > uint64(info.Count) {
		for _, f := range fds {
			f.Close()
		}
		return unix.EINVAL
	}
	for i := start; i < start+count; i++ {
		if v[i] != nil {
			v[i].Close()
			v[i] = nil
		}
		if fds != nil {
			v[i] = fds[i-start]
		}
	}
	m.irqs[index] = v
	return nil
}

// trigger signals vector vec of index, as the device raising an interrupt.
func (m *fakeModel) trigger(index, vec uint32) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	v := m.irqs[index]
	if int(vec) >= len(v) || v[vec] == nil {
		return unix.ENOENT
	}
	var one [8]byte
	binary.LittleEndian.PutUint64(one[:], 1)
	_, err := v[vec].Write(one[:])
	return err
}

func (m *fakeModel) vectorsSet(index uint32) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for _, f := range m.irqs[index] {
		if f != nil {
			n++
		}
	}
	return n
}

func (m *fakeModel) Reset() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.resets++
	clear(m.bar0)
	return nil
}

func (m *fakeModel) Attach(dma DMA) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.dma = dma
	m.attached++
}

func (m *fakeModel) Detach() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.dma = nil
	m.detached++
}

func (m *fakeModel) getDMA() DMA {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.dma
}

func (m *fakeModel) counts() (attached, detached, resets int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.attached, m.detached, m.resets
}
