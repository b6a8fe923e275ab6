package hfisim

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"testing"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/vfio"
	"github.com/gohfi/gohfi/vfio/vfiouser"
	"golang.org/x/sys/unix"
)

// fakeDMA is an IOMMU with a few mapped windows, for driving the model
// without a vfio-user client.
type fakeDMA struct {
	mu   sync.Mutex
	wins map[uint64][]byte
}

// findLocked returns the mapped bytes of [iova, iova+n). The caller holds
// f.mu for the whole access, so a test reading host memory while the engine
// writes it sees whole DMAs (and the race detector sees the ordering).
func (f *fakeDMA) findLocked(iova uint64, n int) ([]byte, error) {
	for base, m := range f.wins {
		if iova >= base && iova+uint64(n) <= base+uint64(len(m)) {
			return m[iova-base : iova-base+uint64(n)], nil
		}
	}
	return nil, fmt.Errorf("iova %#x+%d: %w", iova, n, vfiouser.ErrIOMMUFault)
}

func (f *fakeDMA) Read(iova uint64, p []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	m, err := f.findLocked(iova, len(p))
	if err == nil {
		copy(p, m)
	}
	return err
}

func (f *fakeDMA) Write(iova uint64, p []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	m, err := f.findLocked(iova, len(p))
	if err == nil {
		copy(m, p)
	}
	return err
}

func newTestDevice(t *testing.T) (*Device, *fakeDMA) {
	t.Helper()
	cfg := DefaultConfig()
	cfg.NumContexts = 4
	cfg.RcvArrayPerCtxt = 64
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	dma := &fakeDMA{wins: map[uint64][]byte{}}
	d.Attach(dma)
	return d, dma
}

func rd(t testing.TB, d *Device, off uint64) uint64 {
	t.Helper()
	var b [8]byte
	if err := d.RegionRead(chip.CSRBar, off, b[:]); err != nil {
		t.Fatalf("read %#x: %v", off, err)
	}
	return binary.LittleEndian.Uint64(b[:])
}

func wr(t testing.TB, d *Device, off, v uint64) {
	t.Helper()
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	if err := d.RegionWrite(chip.CSRBar, off, b[:]); err != nil {
		t.Fatalf("write %#x: %v", off, err)
	}
}

func TestIdentityAndCaps(t *testing.T) {
	d, _ := newTestDevice(t)
	if got := rd(t, d, chip.RegID); got != chip.IDMagic {
		t.Fatalf("ID %#x", got)
	}
	if got := rd(t, d, chip.RegNumCtxts); got != 4 {
		t.Fatalf("contexts %d", got)
	}
	if got := rd(t, d, chip.CtxtReg(2, chip.CtxtExpBase)); got != 128 {
		t.Fatalf("context 2 expected base %d, want 128", got)
	}
	wr(t, d, chip.RegScratch, 0xfeedface12345678)
	if got := rd(t, d, chip.RegScratch); got != 0xfeedface12345678 {
		t.Fatalf("scratch %#x", got)
	}
	var cfg [4]byte
	if err := d.RegionRead(vfio.PCIConfigRegionIndex, 0, cfg[:]); err != nil {
		t.Fatal(err)
	}
	if binary.LittleEndian.Uint16(cfg[:]) != chip.PCIVendorID || binary.LittleEndian.Uint16(cfg[2:]) != chip.PCIDeviceID {
		t.Fatalf("config ids % x", cfg)
	}
}

func TestBadCSRAccessCounted(t *testing.T) {
	d, _ := newTestDevice(t)
	if err := d.RegionRead(chip.CSRBar, 3, make([]byte, 2)); err == nil {
		t.Fatal("2-byte unaligned CSR read accepted")
	}
	if err := d.RegionWrite(chip.CSRBar, chip.CSRBarSize, make([]byte, 8)); err == nil {
		t.Fatal("write past BAR0 accepted")
	}
	if got := rd(t, d, chip.RegErrCntBadAccess); got != 2 {
		t.Fatalf("bad access counter %d, want 2", got)
	}
}

func TestBARSizing(t *testing.T) {
	d, _ := newTestDevice(t)
	ones := []byte{0xff, 0xff, 0xff, 0xff}
	if err := d.RegionWrite(vfio.PCIConfigRegionIndex, pciBAR0, ones); err != nil {
		t.Fatal(err)
	}
	var b [4]byte
	d.RegionRead(vfio.PCIConfigRegionIndex, pciBAR0, b[:])
	got := binary.LittleEndian.Uint32(b[:])
	if want := uint32(^(uint32(chip.CSRBarSize) - 1)) | pciBARMem64; got != want {
		t.Fatalf("BAR0 sizing read %#x, want %#x", got, want)
	}
}

// testCtxt sets up context n with rings in fake DMA windows.
type testCtxt struct {
	rhq, eager, sq, head []byte
	irq                  int // eventfd of the context's MSI-X vector
}

const (
	rhqIOVA   = 0x100000
	eagerIOVA = 0x200000
	sqIOVA    = 0x400000
	headIOVA  = 0x500000
	ctxtSpan  = 0x1000000
)

func setupCtxt(t *testing.T, d *Device, dma *fakeDMA, n int) *testCtxt {
	t.Helper()
	base := uint64(n+1) * ctxtSpan
	c := &testCtxt{rhq: make([]byte, 16*uapi.SizeofGohfiRHQEntry), eager: make([]byte, 16*4096), sq: make([]byte, 16*chip.SendDescSize), head: make([]byte, 8)}
	dma.mu.Lock()
	dma.wins[base+rhqIOVA], dma.wins[base+eagerIOVA], dma.wins[base+sqIOVA], dma.wins[base+headIOVA] = c.rhq, c.eager, c.sq, c.head
	dma.mu.Unlock()
	for _, r := range []struct{ reg, v uint64 }{
		{chip.CtxtRHQBase, base + rhqIOVA}, {chip.CtxtRHQEntries, 16},
		{chip.CtxtEagerBase, base + eagerIOVA}, {chip.CtxtEagerSize, 4096}, {chip.CtxtEagerCount, 16},
		{chip.CtxtSQBase, base + sqIOVA}, {chip.CtxtSQEntries, 16}, {chip.CtxtSQHeadAddr, base + headIOVA},
		{chip.CtxtControl, chip.CtxtCtrlEnable},
	} {
		wr(t, d, chip.CtxtReg(n, r.reg), r.v)
	}
	if rd(t, d, chip.CtxtReg(n, chip.CtxtStatus))&chip.CtxtStatusEnabled == 0 {
		t.Fatal("context did not enable")
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	c.irq = efd
	if err := d.SetIRQs(vfio.PCIMSIXIRQIndex, uint32(1+n), 1, []*os.File{os.NewFile(uintptr(efd), "irq")}); err != nil {
		t.Fatal(err)
	}
	wr(t, d, chip.RegIntMask, rd(t, d, chip.RegIntMask)|chip.IntSrcCtxt(n))
	return c
}

// post writes a descriptor into context n's queue and rings the doorbell,
// then waits (bounded) for the completion interrupt the descriptor asks for.
func post(t *testing.T, d *Device, c *testCtxt, n int, desc chip.SendDesc) {
	t.Helper()
	tail := rd(t, d, chip.CtxtReg(n, chip.CtxtSQTail))
	desc.Flags |= chip.DescFlagIntr
	desc.Marshal(c.sq[tail*chip.SendDescSize:])
	next := (tail + 1) % 16
	wr(t, d, chip.CtxtReg(n, chip.CtxtSQTail), next)
	for rd(t, d, chip.CtxtReg(n, chip.CtxtSQHead)) != next {
		fds := []unix.PollFd{{Fd: int32(c.irq), Events: unix.POLLIN}}
		if k, err := unix.Poll(fds, 5000); err != nil || k == 0 {
			t.Fatalf("no completion interrupt: %v", err)
		}
		var b [8]byte
		unix.Read(c.irq, b[:])
	}
}

func rhqEntry(c *testCtxt, i int) uapi.GohfiRHQEntry {
	var e uapi.GohfiRHQEntry
	if err := e.UnmarshalBytes(c.rhq[i*uapi.SizeofGohfiRHQEntry:]); err != nil {
		panic(err) // i is outside the test's queue
	}
	return e
}

func TestEagerAndExpectedDelivery(t *testing.T) {
	d, dma := newTestDevice(t)
	sender := setupCtxt(t, d, dma, 0)
	recv := setupCtxt(t, d, dma, 1)
	payload := bytes.Repeat([]byte("hfisim!"), 1000)
	src := uint64(0x7000000)
	dma.wins[src] = payload
	post(t, d, sender, 0, chip.SendDesc{Opcode: chip.OpEager, DstCtxt: 1, Length: 3000, SrcIOVA: src, Tag: 42})
	e := rhqEntry(recv, 0)
	if e.Type != uapi.GOHFI_RHF_EAGER || e.Length != 3000 || e.Tag != 42 || e.Seq != 1 || e.SrcCtxt != 0 {
		t.Fatalf("eager entry %+v", e)
	}
	if !bytes.Equal(recv.eager[:3000], payload[:3000]) {
		t.Fatal("eager payload corrupted")
	}

	// Program entry 3 (pair 1, odd) of context 1 with a 2-page buffer.
	tidBuf := make([]byte, 8192)
	dma.wins[0x9000000] = tidBuf
	var ent [8]byte
	binary.LittleEndian.PutUint64(ent[:], chip.RcvArrayEntry(0x9000000, 2))
	abs := uint64(1*64+3) * 8
	if err := d.RegionWrite(chip.RcvArrayBar, abs, ent[:]); err != nil {
		t.Fatal(err)
	}
	tid := uapi.CreateTid(3, 2)
	post(t, d, sender, 0, chip.SendDesc{Opcode: chip.OpExpected, DstCtxt: 1, Length: 5000, SrcIOVA: src, TID: tid, TIDOffset: 100})
	e = rhqEntry(recv, 1)
	if e.Type != uapi.GOHFI_RHF_EXPECTED || e.TID != tid || e.TIDOffset != 100 || e.Seq != 2 {
		t.Fatalf("expected entry %+v", e)
	}
	if !bytes.Equal(tidBuf[100:5100], payload[:5000]) || tidBuf[99] != 0 || tidBuf[5100] != 0 {
		t.Fatal("expected payload not exactly at TID offset")
	}

	// Too long for the TID, a TID of an unprogrammed entry, a TID outside
	// the context: errors, nothing written.
	before := append([]byte(nil), tidBuf...)
	post(t, d, sender, 0, chip.SendDesc{Opcode: chip.OpExpected, DstCtxt: 1, Length: 8000, SrcIOVA: src, TID: tid, TIDOffset: 1000})
	post(t, d, sender, 0, chip.SendDesc{Opcode: chip.OpExpected, DstCtxt: 1, Length: 10, SrcIOVA: src, TID: uapi.CreateTid(4, 1)})
	post(t, d, sender, 0, chip.SendDesc{Opcode: chip.OpExpected, DstCtxt: 1, Length: 10, SrcIOVA: src, TID: uapi.CreateTid(200, 1)})
	for i := 2; i < 5; i++ {
		if e := rhqEntry(recv, i); e.Type != uapi.GOHFI_RHF_ERROR || e.Err&uapi.GOHFI_RHF_ERR_TID == 0 {
			t.Fatalf("entry %d: %+v, want TID error", i, e)
		}
	}
	if !bytes.Equal(before, tidBuf) {
		t.Fatal("bad TID wrote memory")
	}
	if got := rd(t, d, chip.RegErrCntTID); got != 3 {
		t.Fatalf("TID error counter %d, want 3", got)
	}

	// Payload from an unmapped IOVA: counted IOMMU fault, error entry.
	post(t, d, sender, 0, chip.SendDesc{Opcode: chip.OpEager, DstCtxt: 1, Length: 64, SrcIOVA: 0xdead000})
	if e := rhqEntry(recv, 5); e.Err&uapi.GOHFI_RHF_ERR_DMA == 0 {
		t.Fatalf("entry %+v, want DMA error", e)
	}
	if got := rd(t, d, chip.RegErrCntIOMMUFault); got != 1 {
		t.Fatalf("IOMMU fault counter %d, want 1", got)
	}
}

func TestResetClearsState(t *testing.T) {
	d, dma := newTestDevice(t)
	setupCtxt(t, d, dma, 0)
	wr(t, d, chip.RegScratch, 7)
	var ent [8]byte
	binary.LittleEndian.PutUint64(ent[:], chip.RcvArrayEntry(0x9000000, 1))
	d.RegionWrite(chip.RcvArrayBar, 0, ent[:])
	if err := d.Reset(); err != nil {
		t.Fatal(err)
	}
	if rd(t, d, chip.RegScratch) != 0 || rd(t, d, chip.CtxtReg(0, chip.CtxtStatus)) != 0 {
		t.Fatal("reset left state")
	}
	d.RegionRead(chip.RcvArrayBar, 0, ent[:])
	if binary.LittleEndian.Uint64(ent[:]) != 0 {
		t.Fatal("reset left RcvArray entry")
	}
}

func TestBadGeometryRefused(t *testing.T) {
	d, _ := newTestDevice(t)
	wr(t, d, chip.CtxtReg(0, chip.CtxtRHQEntries), 3) // not a power of two
	wr(t, d, chip.CtxtReg(0, chip.CtxtControl), chip.CtxtCtrlEnable)
	st := rd(t, d, chip.CtxtReg(0, chip.CtxtStatus))
	if st&chip.CtxtStatusEnabled != 0 || st&chip.CtxtStatusHalted == 0 {
		t.Fatalf("status %#x: bad geometry enabled", st)
	}
	if !errors.Is(d.SetIRQs(vfio.PCIMSIXIRQIndex, 10, 100, nil), unix.EINVAL) {
		t.Fatal("out of range MSI-X vectors accepted")
	}
}

func TestConfigRefusesUnaddressableRcvArray(t *testing.T) {
	cfg := DefaultConfig()
	cfg.RcvArrayPerCtxt = chip.MaxRcvArrayPerCtxt + chip.RcvArrayGroupSize
	if d, err := New(cfg); err == nil {
		d.Close()
		t.Fatalf("%d RcvArray entries per context accepted; a TID can name only %d", cfg.RcvArrayPerCtxt, chip.MaxRcvArrayPerCtxt)
	}
}

func TestBARSizesArePowersOfTwo(t *testing.T) {
	cfg := DefaultConfig()
	cfg.NumContexts = 3 // 3 x 2048 x 8 bytes: not a power of two by itself
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	for _, bar := range []uint32{chip.CSRBar, chip.RcvArrayBar, chip.MTTBar} {
		ri, _, err := d.RegionInfo(bar)
		if err != nil {
			t.Fatal(err)
		}
		if ri.Size == 0 || ri.Size&(ri.Size-1) != 0 {
			t.Fatalf("BAR%d size %#x is not a power of two", bar, ri.Size)
		}
	}
}

// TestRegOverride: the test hook makes identity and capability registers
// read as configured (also by 4-byte halves), leaves the model alone, and
// refuses to fake any other register.
func TestRegOverride(t *testing.T) {
	cfg := DefaultConfig()
	cfg.RegOverride = map[uint64]uint64{chip.RegMaxTIDPages: 2048, chip.RegRevision: 0xdead_beef_0001_0000}
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	cfg.RegOverride[chip.RegMaxTIDPages] = 1 // New took a copy
	if got := rd(t, d, chip.RegMaxTIDPages); got != 2048 {
		t.Fatalf("MaxTIDPages reads %d, want the override 2048", got)
	}
	var hi [4]byte
	if err := d.RegionRead(chip.CSRBar, chip.RegRevision+4, hi[:]); err != nil || binary.LittleEndian.Uint32(hi[:]) != 0xdeadbeef {
		t.Fatalf("Revision upper half % x, %v", hi, err)
	}
	if got := rd(t, d, chip.RegNumCtxts); got != uint64(cfg.NumContexts) {
		t.Fatalf("NumCtxts reads %d, want the model's %d", got, cfg.NumContexts)
	}
	if d.Config().MaxTIDPages != 512 {
		t.Fatalf("model's MaxTIDPages changed to %d", d.Config().MaxTIDPages)
	}
	for _, off := range []uint64{chip.RegControl, chip.RegStatus, chip.CtxtReg(0, chip.CtxtStatus), chip.RegRevision + 4} {
		cfg := DefaultConfig()
		cfg.RegOverride = map[uint64]uint64{off: 1}
		if d, err := New(cfg); err == nil {
			d.Close()
			t.Fatalf("override of register %#x accepted", off)
		}
	}
}
