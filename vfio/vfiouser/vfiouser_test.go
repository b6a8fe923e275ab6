package vfiouser

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/vfio"
	"github.com/gohfi/gohfi/vfio/abi"
)

func TestVersionNegotiation(t *testing.T) {
	leakCheck(t)
	m := newFakeModel(t)
	conn, s := serve(t, m, WithMaxMsgFDs(8), WithMaxDataXferSize(65536), WithMaxDMAMaps(100))
	r := newRawPeer(t, conn)

	// Anything before VERSION is refused.
	h, _, _ := r.call(1, abi.VFIO_USER_DEVICE_GET_INFO, le32(16, 0, 0, 0))
	expectErrno(t, h, unix.EINVAL)
	// Malformed JSON is EINVAL, and the session can still negotiate.
	h, _, _ = r.call(2, abi.VFIO_USER_VERSION, versionPayload(`{"capabilities":`))
	expectErrno(t, h, unix.EINVAL)
	h, _, _ = r.call(3, abi.VFIO_USER_VERSION, versionPayload(`{"capabilities":{"max_msg_fds":"many"}}`))
	expectErrno(t, h, unix.EINVAL)
	h, _, _ = r.call(4, abi.VFIO_USER_VERSION, append(le32(1), 0)) // major 1
	expectErrno(t, h, unix.ENOTSUP)

	h, p, _ := r.call(5, abi.VFIO_USER_VERSION, versionPayload(qemuVersionJSON))
	expectOK(t, h)
	if binary.LittleEndian.Uint32(p) != 0 {
		t.Fatalf("version %x, want 0.0", p[:4])
	}
	js := bytes.TrimRight(p[4:], "\x00")
	if len(p) == 4 || p[len(p)-1] != 0 {
		t.Fatalf("JSON not NUL-terminated: %q", p[4:])
	}
	var v map[string]map[string]any
	if err := json.Unmarshal(js, &v); err != nil {
		t.Fatalf("server JSON %q: %v", js, err)
	}
	caps := v["capabilities"]
	want := map[string]any{"max_msg_fds": 8.0, "max_data_xfer_size": 65536.0, "pgsizes": 4096.0, "max_dma_maps": 100.0, "write_multiple": true}
	for k, w := range want {
		if caps[k] != w {
			t.Errorf("capability %s = %v, want %v (%s)", k, caps[k], w, js)
		}
	}
	if _, ok := caps["migration"]; ok {
		t.Errorf("server offers migration: %s", js)
	}
	if a, _, _ := m.counts(); a != 1 {
		t.Fatalf("model attached %d times", a)
	}
	// A second VERSION is refused.
	h, _, _ = r.call(6, abi.VFIO_USER_VERSION, versionPayload(qemuVersionJSON))
	expectErrno(t, h, unix.EINVAL)

	conn.Close()
	if err := s.wait(t); err != nil {
		t.Fatalf("ServeConn: %v", err)
	}
	if _, d, _ := m.counts(); d != 1 {
		t.Fatalf("model detached %d times", d)
	}
}

func TestVersionNoJSON(t *testing.T) {
	m := newFakeModel(t)
	conn, _ := serve(t, m)
	r := newRawPeer(t, conn)
	h, p, _ := r.call(1, abi.VFIO_USER_VERSION, le32(0)) // 0.0 without capabilities
	expectOK(t, h)
	if len(p) <= 4 {
		t.Fatalf("reply without capabilities")
	}
}

func TestClientInfo(t *testing.T) {
	leakCheck(t)
	c, _, _ := newPair(t, []Option{WithMaxDataXferSize(4096), WithMaxMsgFDs(3)}, nil)
	info := c.Info()
	if info.NumRegions != vfio.PCINumRegions || info.NumIRQs != vfio.PCINumIRQs || info.Flags&vfio.DeviceFlagsReset == 0 {
		t.Fatalf("info %+v", info)
	}
	if c.serverMaxData != 4096 || c.serverMaxFDs != 3 {
		t.Fatalf("server caps: data %d fds %d", c.serverMaxData, c.serverMaxFDs)
	}
	ii, err := c.IRQInfo(vfio.PCIMSIXIRQIndex)
	if err != nil || ii.Count != 4 || ii.Flags&vfio.IRQInfoEventfd == 0 {
		t.Fatalf("IRQInfo = %+v, %v", ii, err)
	}
	if _, err := c.IRQInfo(99); !isErrno(err, unix.EINVAL) {
		t.Fatalf("IRQInfo(99): %v", err)
	}
}

func TestClientDoneOnClose(t *testing.T) {
	c, _, _ := newPair(t, nil, nil)
	select {
	case <-c.Done():
		t.Fatal("Done closed on a live connection")
	default:
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-c.Done():
	default:
		t.Fatal("Done not closed by Close")
	}
}

func TestRegionInfoSparse(t *testing.T) {
	leakCheck(t)
	c, _, _ := newPair(t, nil, nil)
	ri, err := c.RegionInfo(vfio.PCIBAR2RegionIndex)
	if err != nil {
		t.Fatal(err)
	}
	if ri.Flags&vfio.RegionFlagMmap == 0 || ri.Size != fakeBAR2Size || len(ri.Sparse) != 1 ||
		ri.Sparse[0] != (vfio.SparseArea{Offset: 4096, Size: 4096}) {
		t.Fatalf("BAR2 info %+v", ri)
	}
	if ri.Mappable(0, 4096) || !ri.Mappable(4096, 4096) {
		t.Fatalf("Mappable wrong for %+v", ri)
	}
	ri, err = c.RegionInfo(vfio.PCIBAR0RegionIndex)
	if err != nil || ri.Flags&vfio.RegionFlagMmap != 0 || ri.Size != fakeBAR0Size {
		t.Fatalf("BAR0 info %+v, %v", ri, err)
	}
	if _, err := c.RegionInfo(vfio.PCINumRegions); !isErrno(err, unix.EINVAL) {
		t.Fatalf("RegionInfo out of range: %v", err)
	}
}

func TestRegionInfoArgsz(t *testing.T) {
	m := newFakeModel(t)
	conn, _ := serve(t, m)
	r := newRawPeer(t, conn)
	r.handshake()
	req := func(argsz, index uint32) []byte { return cat(le32(argsz, 0, index, 0), le64(0, 0)) }

	// QEMU asks with argsz 32 first: the reply says how much is needed,
	// has no capabilities and no fd.
	h, p, fds := r.call(2, abi.VFIO_USER_DEVICE_GET_REGION_INFO, req(32, vfio.PCIBAR2RegionIndex))
	expectOK(t, h)
	var ri abi.VFIORegionInfo
	abi.Decode(p, &ri)
	need := uint32(abi.SizeofVFIORegionInfo + abi.SizeofVFIORegionInfoCapSparseMmap + abi.SizeofVFIORegionSparseMmapArea)
	if len(p) != abi.SizeofVFIORegionInfo || ri.Argsz != need || ri.Flags&vfio.RegionFlagCaps != 0 || ri.CapOffset != 0 || len(fds) != 0 {
		t.Fatalf("small argsz: %d bytes %+v fds %v", len(p), ri, fds)
	}
	h, p, fds = r.call(3, abi.VFIO_USER_DEVICE_GET_REGION_INFO, req(need, vfio.PCIBAR2RegionIndex))
	expectOK(t, h)
	abi.Decode(p, &ri)
	if len(p) != int(need) || ri.Flags&vfio.RegionFlagCaps == 0 || ri.CapOffset != abi.SizeofVFIORegionInfo || len(fds) != 1 {
		t.Fatalf("full argsz: %d bytes %+v fds %v", len(p), ri, fds)
	}
	closeFDs(fds)
	c := p[abi.SizeofVFIORegionInfo:]
	if binary.LittleEndian.Uint16(c) != abi.VFIO_REGION_INFO_CAP_SPARSE_MMAP || binary.LittleEndian.Uint16(c[2:]) != 1 ||
		binary.LittleEndian.Uint32(c[8:]) != 1 || binary.LittleEndian.Uint64(c[16:]) != 4096 || binary.LittleEndian.Uint64(c[24:]) != 4096 {
		t.Fatalf("sparse capability % x", c)
	}
	// argsz below the fixed structure is EINVAL.
	h, _, _ = r.call(4, abi.VFIO_USER_DEVICE_GET_REGION_INFO, req(16, vfio.PCIBAR2RegionIndex))
	expectErrno(t, h, unix.EINVAL)
	// A whole-mappable region carries its fd with the fixed structure.
	h, p, fds = r.call(5, abi.VFIO_USER_DEVICE_GET_REGION_INFO, req(32, vfio.PCIBAR4RegionIndex))
	expectOK(t, h)
	abi.Decode(p, &ri)
	if len(fds) != 1 || ri.Offset != fakeBAR2Size || ri.Flags&vfio.RegionFlagCaps != 0 {
		t.Fatalf("BAR4: %+v fds %v", ri, fds)
	}
	closeFDs(fds)
}

func TestRegionTrapped(t *testing.T) {
	leakCheck(t)
	// A small max_data_xfer_size makes the client split large accesses.
	c, m, _ := newPair(t, []Option{WithMaxDataXferSize(512)}, nil)
	var id [4]byte
	if err := c.ReadRegion(vfio.PCIConfigRegionIndex, 0, id[:]); err != nil {
		t.Fatal(err)
	}
	if binary.LittleEndian.Uint32(id[:]) != 0x1234abcd {
		t.Fatalf("config id %x", id)
	}
	big := make([]byte, 3000)
	for i := range big {
		big[i] = byte(i * 7)
	}
	if err := c.WriteRegion(vfio.PCIBAR0RegionIndex, 100, big); err != nil {
		t.Fatal(err)
	}
	m.mu.Lock()
	same := bytes.Equal(m.bar0[100:3100], big)
	m.mu.Unlock()
	if !same {
		t.Fatalf("model did not see the write")
	}
	back := make([]byte, len(big))
	if err := c.ReadRegion(vfio.PCIBAR0RegionIndex, 100, back); err != nil || !bytes.Equal(back, big) {
		t.Fatalf("read back: %v", err)
	}
	// The trapped part of the sparse BAR reaches the same memory as the model's.
	if err := c.WriteRegion(vfio.PCIBAR2RegionIndex, 8, []byte{1, 2, 3, 4}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(m.mem[8:12], []byte{1, 2, 3, 4}) {
		t.Fatalf("BAR2 trapped write not seen")
	}
	// Model errors keep their errno.
	if err := c.ReadRegion(vfio.PCIBAR0RegionIndex, fakeBAR0Size-2, id[:]); !isErrno(err, unix.EINVAL) {
		t.Fatalf("out-of-range read: %v", err)
	}
}

// TestRegionWritePosted: posted writes (VFIO_USER_F_NO_REPLY) get no reply
// and are taken in order before a later read, also when split; one the
// model refuses fails nothing on the client and the connection lives on.
func TestRegionWritePosted(t *testing.T) {
	leakCheck(t)
	c, m, _ := newPair(t, []Option{WithMaxDataXferSize(512)}, nil)
	big := make([]byte, 1500)
	for round := range 50 {
		for i := range big {
			big[i] = byte(i*7 + round)
		}
		if err := c.WriteRegionPosted(vfio.PCIBAR0RegionIndex, 100, big); err != nil {
			t.Fatal(err)
		}
		for i := range 8 {
			if err := c.WriteRegionPosted(vfio.PCIBAR0RegionIndex, 2000+uint64(i), []byte{byte(round + i)}); err != nil {
				t.Fatal(err)
			}
		}
		back := make([]byte, len(big)+1)
		if err := c.ReadRegion(vfio.PCIBAR0RegionIndex, 100, back[:len(big)]); err != nil || !bytes.Equal(back[:len(big)], big) {
			t.Fatalf("round %d: read after posted writes: %v", round, err)
		}
		if err := c.ReadRegion(vfio.PCIBAR0RegionIndex, 2007, back[:1]); err != nil || back[0] != byte(round+7) {
			t.Fatalf("round %d: last posted byte %d: %v", round, back[0], err)
		}
	}
	m.mu.Lock()
	same := bytes.Equal(m.bar0[100:1600], big)
	m.mu.Unlock()
	if !same {
		t.Fatalf("model did not see the posted write")
	}
	if err := c.WriteRegionPosted(vfio.PCIBAR0RegionIndex, fakeBAR0Size-2, []byte{1, 2, 3, 4}); err != nil {
		t.Fatalf("refused posted write reported %v", err)
	}
	var id [4]byte
	if err := c.ReadRegion(vfio.PCIConfigRegionIndex, 0, id[:]); err != nil {
		t.Fatalf("read after a refused posted write: %v", err)
	}
	c.Close()
	if err := c.WriteRegionPosted(vfio.PCIBAR0RegionIndex, 0, []byte{1}); !errors.Is(err, vfio.ErrClosed) {
		t.Fatalf("posted write after Close: %v", err)
	}
}

func TestMmapRegion(t *testing.T) {
	leakCheck(t)
	c, m, _ := newPair(t, nil, nil)
	b, err := c.MmapRegion(vfio.PCIBAR2RegionIndex, 4096, 4096, unix.PROT_READ|unix.PROT_WRITE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(b)
	binary.LittleEndian.PutUint64(b[16:], 0xfeedface12345678)
	if got := binary.LittleEndian.Uint64(m.mem[4096+16:]); got != 0xfeedface12345678 {
		t.Fatalf("model sees %#x", got)
	}
	m.mem[4096+100] = 0x5a
	if b[100] != 0x5a {
		t.Fatalf("client does not see model store")
	}
	// The trapped page cannot be mapped.
	if _, err := c.MmapRegion(vfio.PCIBAR2RegionIndex, 0, 4096, unix.PROT_READ); !isErrno(err, unix.EINVAL) {
		t.Fatalf("mmap of trapped part: %v", err)
	}
	if _, err := c.MmapRegion(vfio.PCIBAR0RegionIndex, 0, 4096, unix.PROT_READ); !isErrno(err, unix.EINVAL) {
		t.Fatalf("mmap of trapped BAR: %v", err)
	}
	// BAR4 lives at offset 8192 of the memfd.
	b4, err := c.MmapRegion(vfio.PCIBAR4RegionIndex, 0, 4096, unix.PROT_READ|unix.PROT_WRITE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(b4)
	b4[0] = 0x77
	if m.mem[fakeBAR2Size] != 0x77 {
		t.Fatalf("BAR4 store not at memfd offset 8192")
	}
}

func TestDMAMapFD(t *testing.T) {
	leakCheck(t)
	c, m, _ := newPair(t, nil, nil)
	f, mem := memfdMem(t, 3*4096)
	// Map the second and third page at IOVA 0x10000.
	if err := c.DMAMap(vfio.DMAMapping{IOVA: 0x10000, Vaddr: addrOf(mem[4096:]), Size: 8192,
		Flags: vfio.DMARead | vfio.DMAWrite, File: f, FileOffset: 4096}); err != nil {
		t.Fatal(err)
	}
	dma := m.getDMA()
	if err := dma.Write(0x10000+8, []byte("hello")); err != nil {
		t.Fatal(err)
	}
	if string(mem[4096+8:4096+13]) != "hello" {
		t.Fatalf("client memory %q", mem[4096+8:4096+13])
	}
	copy(mem[4096+8192-3:], "xyz")
	got := make([]byte, 3)
	if err := dma.Read(0x10000+8192-3, got); err != nil || string(got) != "xyz" {
		t.Fatalf("dma read %q %v", got, err)
	}
	// One byte past the mapping faults and copies nothing.
	got = []byte("....")
	if err := dma.Read(0x10000+8192-3, got); !errors.Is(err, ErrIOMMUFault) || string(got) != "...." {
		t.Fatalf("read across the end: %q %v", got, err)
	}
	if err := c.DMAUnmap(0x10000, 8192); err != nil {
		t.Fatal(err)
	}
	if err := dma.Read(0x10000, got); !errors.Is(err, ErrIOMMUFault) {
		t.Fatalf("read after unmap: %v", err)
	}
}

func TestDMAMapNoFD(t *testing.T) {
	requireProcessVM(t)
	leakCheck(t)
	// Small transfer size: the server splits into several DMA_READ/WRITE.
	c, m, _ := newPair(t, nil, []Option{WithMaxDataXferSize(1024)})
	mem := anonMem(t, 3*4096)
	if err := c.DMAMap(vfio.DMAMapping{IOVA: 0x20000, Vaddr: addrOf(mem), Size: 3 * 4096, Flags: vfio.DMARead | vfio.DMAWrite}); err != nil {
		t.Fatal(err)
	}
	dma := m.getDMA()
	data := make([]byte, 5000)
	for i := range data {
		data[i] = byte(i)
	}
	if err := dma.Write(0x20000+100, data); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(mem[100:5100], data) {
		t.Fatalf("client memory differs")
	}
	mem[9000] = 0xee
	got := make([]byte, 1)
	if err := dma.Read(0x20000+9000, got); err != nil || got[0] != 0xee {
		t.Fatalf("dma read %x %v", got, err)
	}
	if err := c.DMAUnmap(0x20000, 3*4096); err != nil {
		t.Fatal(err)
	}
	if err := dma.Read(0x20000, got); !errors.Is(err, ErrIOMMUFault) {
		t.Fatalf("after unmap: %v", err)
	}
}

func TestDMAAccessor(t *testing.T) {
	leakCheck(t)
	c, m, _ := newPair(t, nil, nil)
	acc := &memAccessor{b: make([]byte, 4096)}
	if err := c.DMAMap(vfio.DMAMapping{IOVA: 0x1000, Size: 4096, Flags: vfio.DMARead | vfio.DMAWrite, Access: acc}); err != nil {
		t.Fatal(err)
	}
	dma := m.getDMA()
	if err := dma.Write(0x1010, []byte{9, 8, 7}); err != nil {
		t.Fatal(err)
	}
	acc.mu.Lock()
	defer acc.mu.Unlock()
	if !bytes.Equal(acc.b[0x10:0x13], []byte{9, 8, 7}) {
		t.Fatalf("accessor not used")
	}
}

type memAccessor struct {
	mu      sync.Mutex
	b       []byte
	block   chan struct{} // when set, ReadAt waits for it
	entered chan struct{}
}

func (a *memAccessor) ReadAt(p []byte, off int64) (int, error) {
	if a.block != nil {
		a.entered <- struct{}{}
		<-a.block
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return copy(p, a.b[off:]), nil
}

func (a *memAccessor) WriteAt(p []byte, off int64) (int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return copy(a.b[off:], p), nil
}

func TestDMASpanAndPermissions(t *testing.T) {
	requireProcessVM(t)
	leakCheck(t)
	c, m, _ := newPair(t, nil, nil)
	f, fmem := memfdMem(t, 4096)
	amem := anonMem(t, 4096)
	// [0x100000, 0x101000) by fd, [0x101000, 0x102000) without fd: adjacent.
	if err := c.DMAMap(vfio.DMAMapping{IOVA: 0x100000, Vaddr: addrOf(fmem), Size: 4096, Flags: vfio.DMARead | vfio.DMAWrite, File: f}); err != nil {
		t.Fatal(err)
	}
	if err := c.DMAMap(vfio.DMAMapping{IOVA: 0x101000, Vaddr: addrOf(amem), Size: 4096, Flags: vfio.DMARead | vfio.DMAWrite}); err != nil {
		t.Fatal(err)
	}
	dma := m.getDMA()
	span := bytes.Repeat([]byte{0xab}, 200)
	if err := dma.Write(0x101000-100, span); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(fmem[4096-100:], span[:100]) || !bytes.Equal(amem[:100], span[100:]) {
		t.Fatalf("spanning write landed wrong")
	}
	// Overlap is refused.
	if err := c.DMAMap(vfio.DMAMapping{IOVA: 0x101800, Vaddr: addrOf(amem), Size: 4096, Flags: vfio.DMARead}); !isErrno(err, unix.EEXIST) {
		t.Fatalf("overlapping map: %v", err)
	}
	// Read-only mapping: device writes fault, reads work.
	ro := anonMem(t, 4096)
	ro[0] = 42
	if err := c.DMAMap(vfio.DMAMapping{IOVA: 0x200000, Vaddr: addrOf(ro), Size: 4096, Flags: vfio.DMARead}); err != nil {
		t.Fatal(err)
	}
	if err := dma.Write(0x200000, []byte{1}); !errors.Is(err, ErrIOMMUFault) || ro[0] != 42 {
		t.Fatalf("write to read-only mapping: %v (byte %d)", err, ro[0])
	}
	b := []byte{0}
	if err := dma.Read(0x200000, b); err != nil || b[0] != 42 {
		t.Fatalf("read of read-only mapping: %v %d", err, b[0])
	}
	// Hole between 0x102000 and 0x200000: a span across it faults and
	// copies nothing, even the part that is mapped.
	before := append([]byte(nil), amem[4000:]...)
	if err := dma.Write(0x101000+4000, make([]byte, 200)); !errors.Is(err, ErrIOMMUFault) {
		t.Fatalf("write across a hole: %v", err)
	}
	if !bytes.Equal(amem[4000:], before) {
		t.Fatalf("faulting write copied something")
	}
	if err := dma.Read(0xdead0000, b); !errors.Is(err, ErrIOMMUFault) {
		t.Fatalf("unmapped IOVA: %v", err)
	}
	if err := dma.Read(^uint64(0)-1, make([]byte, 4)); !errors.Is(err, ErrIOMMUFault) {
		t.Fatalf("wrapping IOVA: %v", err)
	}
	// Unmap that cuts a mapping is refused; one covering nothing succeeds,
	// one covering several removes them.
	if err := c.DMAUnmap(0x100800, 4096); !isErrno(err, unix.EINVAL) {
		t.Fatalf("cutting unmap: %v", err)
	}
	if err := c.DMAUnmap(0x7000000000, 1<<30); err != nil {
		t.Fatalf("unmap of nothing: %v", err)
	}
	if err := c.DMAUnmap(0, 1<<48); err != nil {
		t.Fatalf("whole-space unmap: %v", err)
	}
	if err := dma.Read(0x200000, b); !errors.Is(err, ErrIOMMUFault) {
		t.Fatalf("after whole-space unmap: %v", err)
	}
}

func TestDMAMunmappedClientMemory(t *testing.T) {
	requireProcessVM(t)
	leakCheck(t)
	c, m, _ := newPair(t, nil, nil)
	mem, err := unix.Mmap(-1, 0, 8192, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	addr := addrOf(mem)
	if err := c.DMAMap(vfio.DMAMapping{IOVA: 0x40000, Vaddr: addr, Size: 8192, Flags: vfio.DMARead | vfio.DMAWrite}); err != nil {
		t.Fatal(err)
	}
	// The pages go as with munmap, but a PROT_NONE mapping takes their
	// place in the same call: a hole could be taken meanwhile by any other
	// mmap of this process (the runtime's, another test's), and a DMA into
	// that would succeed (seen about once in 120 runs).
	if err := replaceProtNone(addr, 8192); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = unmapAt(addr, 8192) }()
	dma := m.getDMA()
	err = dma.Write(0x40000, []byte{1, 2, 3})
	if err == nil || errors.Is(err, ErrIOMMUFault) || !isErrno(err, unix.EFAULT) {
		t.Fatalf("DMA to munmapped client memory: %v", err)
	}
	if err := dma.Read(0x40000, make([]byte, 16)); !isErrno(err, unix.EFAULT) {
		t.Fatalf("DMA from munmapped client memory: %v", err)
	}
	// Read-only client memory: the device write fails with EFAULT.
	ro, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(ro)
	if err := c.DMAMap(vfio.DMAMapping{IOVA: 0x80000, Vaddr: addrOf(ro), Size: 4096, Flags: vfio.DMARead | vfio.DMAWrite}); err != nil {
		t.Fatal(err)
	}
	if err := dma.Write(0x80000, []byte{1}); !isErrno(err, unix.EFAULT) {
		t.Fatalf("DMA write to read-only memory: %v", err)
	}
	// The connection still works.
	if err := c.Reset(); err != nil {
		t.Fatal(err)
	}
}

func TestDMAFromRegisterWrite(t *testing.T) {
	requireProcessVM(t)
	leakCheck(t)
	c, m, _ := newPair(t, nil, nil)
	mem := anonMem(t, 4096)
	copy(mem[64:], "descriptor")
	if err := c.DMAMap(vfio.DMAMapping{IOVA: 0x9000, Vaddr: addrOf(mem), Size: 4096, Flags: vfio.DMARead | vfio.DMAWrite}); err != nil {
		t.Fatal(err)
	}
	w := func(off uint64, v []byte) {
		if err := c.WriteRegion(vfio.PCIBAR0RegionIndex, off, v); err != nil {
			t.Fatal(err)
		}
	}
	// The model reads from client memory inside the doorbell write: the
	// server must read the client's DMA reply while its handler waits.
	w(regDMAIOVA, le64(0x9000+64))
	w(regDMALen, le32(10))
	w(regDMAOp, le32(1))
	var res [4]byte
	if err := c.ReadRegion(vfio.PCIBAR0RegionIndex, regDMAResult, res[:]); err != nil || binary.LittleEndian.Uint32(res[:]) != 0 {
		t.Fatalf("DMA result %v %v", res, err)
	}
	m.mu.Lock()
	got := string(m.bar0[regDMABuf : regDMABuf+10])
	m.mu.Unlock()
	if got != "descriptor" {
		t.Fatalf("model read %q", got)
	}
	// And a faulting one reports EFAULT to the model.
	w(regDMAIOVA, le64(0x1_0000_0000))
	w(regDMAOp, le32(2))
	if err := c.ReadRegion(vfio.PCIBAR0RegionIndex, regDMAResult, res[:]); err != nil || unix.Errno(binary.LittleEndian.Uint32(res[:])) != unix.EFAULT {
		t.Fatalf("faulting DMA result %v %v", res, err)
	}
}

func TestDMAUnmapWaitsForInflight(t *testing.T) {
	leakCheck(t)
	c, m, _ := newPair(t, nil, nil)
	acc := &memAccessor{b: make([]byte, 4096), block: make(chan struct{}), entered: make(chan struct{}, 1)}
	if err := c.DMAMap(vfio.DMAMapping{IOVA: 0x1000, Size: 4096, Flags: vfio.DMARead, Access: acc}); err != nil {
		t.Fatal(err)
	}
	dma := m.getDMA()
	readDone := make(chan error, 1)
	go func() { readDone <- dma.Read(0x1000, make([]byte, 8)) }()
	select {
	case <-acc.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("device read never reached the client")
	}
	// The device access is in flight (blocked in the client's accessor,
	// the server holding its table for reading). The unmap must wait for it.
	unmapDone := make(chan error, 1)
	go func() { unmapDone <- c.DMAUnmap(0x1000, 4096) }()
	tbl := dma.(*iommu)
	deadline := time.Now().Add(5 * time.Second)
	for !iommuWriterWaiting(tbl) {
		if time.Now().After(deadline) {
			t.Fatal("unmap never reached the server")
		}
		time.Sleep(time.Millisecond)
	}
	if n := tbl.count(); n != 1 {
		t.Fatalf("mapping removed while a device access was in flight (%d left)", n)
	}
	close(acc.block)
	if err := <-readDone; err != nil {
		t.Fatalf("in-flight read: %v", err)
	}
	select {
	case err := <-unmapDone:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("unmap never finished")
	}
	if n := tbl.count(); n != 0 {
		t.Fatalf("%d mappings after unmap", n)
	}
}

// iommuWriterWaiting reports whether an unmap is waiting for the table: a
// reader that cannot get the lock means a writer holds or awaits it.
func iommuWriterWaiting(m *iommu) bool {
	if m.mu.TryRLock() {
		m.mu.RUnlock()
		return false
	}
	return true
}

func TestSetIRQs(t *testing.T) {
	leakCheck(t)
	// The server takes 2 fds per message: the client splits 4 vectors.
	c, m, _ := newPair(t, []Option{WithMaxMsgFDs(2)}, nil)
	var efds []int
	for range 4 {
		fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		if err != nil {
			t.Fatal(err)
		}
		efds = append(efds, fd)
	}
	defer closeFDs(efds)
	if err := c.SetIRQs(vfio.PCIMSIXIRQIndex, 0, efds); err != nil {
		t.Fatal(err)
	}
	if n := m.vectorsSet(vfio.PCIMSIXIRQIndex); n != 4 {
		t.Fatalf("%d vectors set", n)
	}
	if err := m.trigger(vfio.PCIMSIXIRQIndex, 3); err != nil {
		t.Fatal(err)
	}
	var buf [8]byte
	if _, err := unix.Read(efds[3], buf[:]); err != nil || binary.LittleEndian.Uint64(buf[:]) != 1 {
		t.Fatalf("eventfd 3: %v %x", err, buf)
	}
	if _, err := unix.Read(efds[2], buf[:]); err != unix.EAGAIN {
		t.Fatalf("eventfd 2 signalled: %v", err)
	}
	// -1 disconnects one vector.
	if err := c.SetIRQs(vfio.PCIMSIXIRQIndex, 1, []int{-1}); err != nil {
		t.Fatal(err)
	}
	if n := m.vectorsSet(vfio.PCIMSIXIRQIndex); n != 3 {
		t.Fatalf("%d vectors after de-assign", n)
	}
	// Out of range.
	if err := c.SetIRQs(vfio.PCIMSIXIRQIndex, 3, efds[:2]); !isErrno(err, unix.EINVAL) {
		t.Fatalf("vectors 3+2 of 4: %v", err)
	}
	// nil disables the whole index.
	if err := c.SetIRQs(vfio.PCIMSIXIRQIndex, 0, nil); err != nil {
		t.Fatal(err)
	}
	if n := m.vectorsSet(vfio.PCIMSIXIRQIndex); n != 0 {
		t.Fatalf("%d vectors after disable", n)
	}
	if err := m.trigger(vfio.PCIMSIXIRQIndex, 0); err == nil {
		t.Fatalf("trigger after disable worked")
	}
}

func TestIRQsDisabledOnDisconnect(t *testing.T) {
	m := newFakeModel(t)
	conn, s := serve(t, m)
	c, err := NewClient(conn)
	if err != nil {
		t.Fatal(err)
	}
	fd, _ := unix.Eventfd(0, unix.EFD_CLOEXEC)
	defer unix.Close(fd)
	if err := c.SetIRQs(vfio.PCIINTxIRQIndex, 0, []int{fd}); err != nil {
		t.Fatal(err)
	}
	if m.vectorsSet(vfio.PCIINTxIRQIndex) != 1 {
		t.Fatal("INTx not set")
	}
	c.Close()
	if err := s.wait(t); err != nil {
		t.Fatal(err)
	}
	if m.vectorsSet(vfio.PCIINTxIRQIndex) != 0 {
		t.Fatal("INTx eventfd kept after the client left")
	}
}

func TestReset(t *testing.T) {
	leakCheck(t)
	c, m, _ := newPair(t, nil, nil)
	if err := c.WriteRegion(vfio.PCIBAR0RegionIndex, 0, []byte{1}); err != nil {
		t.Fatal(err)
	}
	if err := c.Reset(); err != nil {
		t.Fatal(err)
	}
	if _, _, r := m.counts(); r != 1 {
		t.Fatalf("%d resets", r)
	}
	var b [1]byte
	if err := c.ReadRegion(vfio.PCIBAR0RegionIndex, 0, b[:]); err != nil || b[0] != 0 {
		t.Fatalf("after reset %v %v", b, err)
	}
}

func TestClientClose(t *testing.T) {
	leakCheck(t)
	c, _, s := newPair(t, nil, nil)
	if _, err := c.RegionInfo(vfio.PCIBAR2RegionIndex); err != nil { // caches an fd
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Reset(); !errors.Is(err, vfio.ErrClosed) {
		t.Fatalf("call after Close: %v", err)
	}
	if err := c.Close(); !errors.Is(err, vfio.ErrClosed) {
		t.Fatalf("second Close: %v", err)
	}
	if err := s.wait(t); err != nil {
		t.Fatalf("ServeConn after client Close: %v", err)
	}
}

func TestServeListener(t *testing.T) {
	leakCheck(t)
	m := newFakeModel(t)
	path := t.TempDir() + "/sock"
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(m)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	// Two clients one after the other; the model sees both sessions.
	for i := range 2 {
		c, err := Dial(ctx, path)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.WriteRegion(vfio.PCIBAR0RegionIndex, 0, []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, d, _ := m.counts(); d == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("second session never ended")
		}
		time.Sleep(time.Millisecond)
	}
	cancel()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("Serve returned nil after cancel")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return")
	}
	os.Remove(path)
}

// Many callers and a device DMAing at the same time, with mappings coming
// and going: every call gets its own reply, nothing deadlocks.
func TestConcurrentCallsAndDMA(t *testing.T) {
	leakCheck(t)
	requireProcessVM(t)
	c, m, _ := newPair(t, nil, nil)
	mem := anonMem(t, 8192)
	if err := c.DMAMap(vfio.DMAMapping{IOVA: 0x10000, Vaddr: addrOf(mem), Size: 4096, Flags: vfio.DMARead | vfio.DMAWrite}); err != nil {
		t.Fatal(err)
	}
	dma := m.getDMA()
	errs := make(chan error, 16)
	stop := make(chan struct{})
	deviceDone := make(chan struct{})
	// The device: DMA into the stable mapping, and into one that comes and
	// goes (faults are expected there, nothing else).
	go func() {
		defer close(deviceDone)
		buf := make([]byte, 256)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if err := dma.Write(0x10000+uint64(i%16)*256, buf); err != nil {
				errs <- err
				return
			}
			if err := dma.Read(0x20000, buf[:8]); err != nil && !errors.Is(err, ErrIOMMUFault) {
				errs <- err
				return
			}
		}
	}()
	var callers sync.WaitGroup
	for g := range 6 {
		callers.Add(1)
		go func() {
			defer callers.Done()
			off := uint64(0x200 + 8*g)
			got := make([]byte, 4)
			for i := range 150 {
				v := le32(uint32(g<<16 | i))
				if err := c.WriteRegion(vfio.PCIBAR0RegionIndex, off, v); err != nil {
					errs <- err
					return
				}
				if err := c.ReadRegion(vfio.PCIBAR0RegionIndex, off, got); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(got, v) {
					errs <- errors.New("read back another caller's value")
					return
				}
			}
		}()
	}
	callers.Add(1)
	go func() {
		defer callers.Done()
		for range 100 {
			if err := c.DMAMap(vfio.DMAMapping{IOVA: 0x20000, Vaddr: addrOf(mem[4096:]), Size: 4096, Flags: vfio.DMARead}); err != nil {
				errs <- err
				return
			}
			if err := c.DMAUnmap(0x20000, 4096); err != nil {
				errs <- err
				return
			}
		}
	}()
	callersDone := make(chan struct{})
	go func() { callers.Wait(); close(callersDone) }()
	select {
	case <-callersDone:
	case <-time.After(20 * time.Second):
		t.Fatal("callers deadlocked")
	}
	close(stop)
	select {
	case <-deviceDone:
	case <-time.After(5 * time.Second):
		t.Fatal("device deadlocked")
	}
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
}

// TestDMAUnmapToTopOfSpace: QEMU unmaps ranges that end exactly at 2^64
// ([0xfef00000, 2^64)); that is a valid range, and it removes what lies in it.
func TestDMAUnmapToTopOfSpace(t *testing.T) {
	leakCheck(t)
	c, m, _ := newPair(t, nil, nil)
	acc := &memAccessor{b: make([]byte, 4096)}
	if err := c.DMAMap(vfio.DMAMapping{IOVA: 0xff000000, Size: 4096, Flags: vfio.DMARead | vfio.DMAWrite, Access: acc}); err != nil {
		t.Fatal(err)
	}
	base := uint64(0xfef00000)
	if err := c.DMAUnmap(base, -base); err != nil {
		t.Fatalf("unmap to 2^64: %v", err)
	}
	if err := m.getDMA().Write(0xff000000, []byte{1}); !errors.Is(err, ErrIOMMUFault) {
		t.Fatalf("mapping survived the unmap: %v", err)
	}
	if err := c.DMAUnmap(base, -base+1); err == nil {
		t.Fatal("a range past 2^64 was accepted")
	}
}
