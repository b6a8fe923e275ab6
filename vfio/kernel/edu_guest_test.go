//go:build gohfiguest

package kernel

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/vfio"
)

// These tests run inside the QEMU guest of test/qemu, which adds QEMU's
// "edu" teaching device (docs/specs/edu.rst: an id register, a liveness
// register, a DMA engine with a 4 KiB buffer at 0x40000, MSI and INTx).
// They drive it through the kernel backend exactly as the driver will
// drive the HFI: bind to vfio-pci, BAR access trapped and mmapped, DMA
// through the emulated Intel IOMMU, interrupts on eventfds.
const (
	eduVendor = 0x1234
	eduDevice = 0x11e8

	eduID        = 0x00
	eduLiveness  = 0x04
	eduIRQStatus = 0x24
	eduIRQRaise  = 0x60
	eduIRQAck    = 0x64
	eduDMASrc    = 0x80
	eduDMADst    = 0x88
	eduDMACount  = 0x90
	eduDMACmd    = 0x98
	eduBuffer    = 0x40000

	eduDMARun   = 1
	eduDMAToRAM = 2
)

func guestOnly(t *testing.T) {
	t.Helper()
	if os.Getenv("GOHFI_GUEST") != "1" {
		t.Skip("runs only inside the gohfi QEMU guest (GOHFI_GUEST=1)")
	}
}

func fact(key string, value any) { fmt.Printf("GOHFI-FACT %s=%v\n", key, value) }

func rd32(t *testing.T, d *Device, off uint64) uint32 {
	t.Helper()
	var b [4]byte
	if err := d.ReadRegion(vfio.PCIBAR0RegionIndex, off, b[:]); err != nil {
		t.Fatal(err)
	}
	return binary.LittleEndian.Uint32(b[:])
}

func wr32(t *testing.T, d *Device, off uint64, v uint32) {
	t.Helper()
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	if err := d.WriteRegion(vfio.PCIBAR0RegionIndex, off, b[:]); err != nil {
		t.Fatal(err)
	}
}

func openEdu(t *testing.T) *Device {
	t.Helper()
	d, err := Open(Options{Vendor: eduVendor, Device: eduDevice, Bind: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	// Memory decoding and bus mastering: vfio-pci leaves the command
	// register to the user, as QEMU's vfio does.
	var cmd [2]byte
	if err := d.ReadRegion(vfio.PCIConfigRegionIndex, 4, cmd[:]); err != nil {
		t.Fatal(err)
	}
	binary.LittleEndian.PutUint16(cmd[:], binary.LittleEndian.Uint16(cmd[:])|0x6)
	if err := d.WriteRegion(vfio.PCIConfigRegionIndex, 4, cmd[:]); err != nil {
		t.Fatal(err)
	}
	return d
}

func TestGuestEduOpen(t *testing.T) {
	guestOnly(t)
	d := openEdu(t)
	info := d.Info()
	fact("edu_bdf", d.BDF())
	fact("edu_device_info", fmt.Sprintf("%+v", info))
	if info.Flags&vfio.DeviceFlagsPCI == 0 || info.NumRegions < vfio.PCINumRegions {
		t.Fatalf("device info %+v", info)
	}
	io := d.IOMMU()
	fact("iommu_pgsizes", fmt.Sprintf("%#x", io.PageSizes))
	fact("iommu_iova_ranges", fmt.Sprint(io.IOVARanges))
	fact("iommu_dma_avail", io.DMAAvail)
	if len(io.IOVARanges) == 0 || io.PageSizes&0x1000 == 0 {
		t.Errorf("IOMMU info %+v: want IOVA ranges and 4 KiB pages", io)
	}
	// What the driver allocates in: the IOMMU's ranges, which leave out
	// the x86 MSI window.
	ranges := d.IOVARanges()
	fact("device_iova_ranges", fmt.Sprint(ranges))
	if !reflect.DeepEqual(ranges, io.IOVARanges) {
		t.Errorf("IOVARanges %v, IOMMU reported %v", ranges, io.IOVARanges)
	}
	for _, r := range ranges {
		if r.Start <= 0xfeefffff && r.End >= 0xfee00000 {
			t.Errorf("IOVA range %v overlaps the MSI window [0xfee00000, 0xfeefffff]", r)
		}
	}

	var id [4]byte
	if err := d.ReadRegion(vfio.PCIConfigRegionIndex, 0, id[:]); err != nil {
		t.Fatal(err)
	}
	if got := binary.LittleEndian.Uint32(id[:]); got != eduDevice<<16|eduVendor {
		t.Fatalf("config space id %#x", got)
	}
	ri, err := d.RegionInfo(vfio.PCIBAR0RegionIndex)
	if err != nil {
		t.Fatal(err)
	}
	fact("edu_bar0", fmt.Sprintf("%+v", ri))
	if ri.Size != 1<<20 || ri.Flags&vfio.RegionFlagMmap == 0 {
		t.Fatalf("BAR0 %+v: want 1 MiB, mmappable", ri)
	}
	if v := rd32(t, d, eduID); v&0xff != 0xed {
		t.Fatalf("edu id register %#x", v)
	}
	wr32(t, d, eduLiveness, 0x12345678)
	if v := rd32(t, d, eduLiveness); v != ^uint32(0x12345678) {
		t.Fatalf("liveness read %#x, want the inverse of what was written", v)
	}
	if err := d.ReadRegion(vfio.PCIBAR0RegionIndex, 1<<20-2, id[:]); !errors.Is(err, unix.EINVAL) {
		t.Errorf("read past the BAR = %v, want EINVAL", err)
	}
}

func TestGuestEduMmap(t *testing.T) {
	guestOnly(t)
	d := openEdu(t)
	bar, err := d.MmapRegion(vfio.PCIBAR0RegionIndex, 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(bar)
	if v := load32(bar, eduID); v&0xff != 0xed {
		t.Fatalf("id through mmap %#x", v)
	}
	store32(bar, eduLiveness, 0xa5a5f00f)
	if v := load32(bar, eduLiveness); v != ^uint32(0xa5a5f00f) {
		t.Fatalf("liveness through mmap %#x", v)
	}
	// Trapped and mapped paths see the same register.
	if v := rd32(t, d, eduLiveness); v != ^uint32(0xa5a5f00f) {
		t.Fatalf("liveness through pread after a store through mmap: %#x", v)
	}
	if _, err := d.MmapRegion(vfio.PCIBAR0RegionIndex, 0x800, 0x1000, unix.PROT_READ); !errors.Is(err, unix.EINVAL) {
		t.Errorf("unaligned mmap = %v, want EINVAL", err)
	}
}

// eduDMA runs one DMA and waits for the engine to finish (it completes on a
// 100 ms virtual-time timer).
func eduDMA(t *testing.T, d *Device, src, dst uint64, n uint32, cmd uint32) {
	t.Helper()
	wr32(t, d, eduDMASrc, uint32(src))
	wr32(t, d, eduDMADst, uint32(dst))
	wr32(t, d, eduDMACount, n)
	wr32(t, d, eduDMACmd, cmd|eduDMARun)
	deadline := time.Now().Add(10 * time.Second)
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	for rd32(t, d, eduDMACmd)&eduDMARun != 0 {
		if time.Now().After(deadline) {
			t.Fatal("edu DMA did not complete in 10 s")
		}
		<-tick.C
	}
}

func TestGuestEduDMA(t *testing.T) {
	guestOnly(t)
	d := openEdu(t)
	const page = 4096
	mem, err := unix.Mmap(-1, 0, 2*page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	src, dst := mem[:page], mem[page:]
	for i := range src {
		src[i] = byte(i*7 + 3)
	}
	const iovaSrc, iovaDst = 0x100000, 0x200000
	start := time.Now()
	if err := d.DMAMap(vfio.DMAMapping{IOVA: iovaSrc, Vaddr: addrOf(src), Size: page, Flags: vfio.DMARead}); err != nil {
		t.Fatal(err)
	}
	fact("dma_map_4k_us", time.Since(start).Microseconds())
	if err := d.DMAMap(vfio.DMAMapping{IOVA: iovaDst, Vaddr: addrOf(dst), Size: page, Flags: vfio.DMAWrite}); err != nil {
		t.Fatal(err)
	}
	eduDMA(t, d, iovaSrc, eduBuffer, page, 0)
	eduDMA(t, d, eduBuffer, iovaDst, page, eduDMAToRAM)
	if !bytes.Equal(src, dst) {
		t.Fatalf("DMA round trip through the IOMMU corrupted data: first bytes % x vs % x", src[:16], dst[:16])
	}

	// After unmap, the device's write must be blocked by the IOMMU.
	start = time.Now()
	if err := d.DMAUnmap(iovaDst, page); err != nil {
		t.Fatal(err)
	}
	fact("dma_unmap_4k_us", time.Since(start).Microseconds())
	clear(dst)
	eduDMA(t, d, eduBuffer, iovaDst, page, eduDMAToRAM)
	if !bytes.Equal(dst, make([]byte, page)) {
		t.Fatal("the device wrote through an unmapped IOVA")
	}
	fault := kmsgContains("fault addr")
	fact("iommu_fault_logged", fault)

	if err := d.DMAUnmap(iovaDst, page); !errors.Is(err, unix.ENOENT) {
		t.Errorf("second unmap = %v, want ENOENT (nothing mapped)", err)
	}
	if err := d.DMAMap(vfio.DMAMapping{IOVA: 0xfee00000, Vaddr: addrOf(src), Size: page, Flags: vfio.DMARead}); !errors.Is(err, unix.EINVAL) {
		t.Errorf("map in the MSI window = %v, want EINVAL", err)
	}
	if err := d.DMAUnmap(iovaSrc, page); err != nil {
		t.Fatal(err)
	}
}

func TestGuestEduIRQ(t *testing.T) {
	guestOnly(t)
	d := openEdu(t)
	idx, n, err := PreferredIRQ(d)
	if err != nil {
		t.Fatal(err)
	}
	fact("edu_irq_index", idx)
	if idx != vfio.PCIMSIIRQIndex || n != 1 {
		t.Fatalf("preferred IRQ %d x%d, want MSI x1 (edu has no MSI-X)", idx, n)
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	if err := d.SetIRQs(idx, 0, []int{efd}); err != nil {
		t.Fatal(err)
	}
	defer d.SetIRQs(idx, 0, nil)
	start := time.Now()
	wr32(t, d, eduIRQRaise, 0x5)
	pfd := []unix.PollFd{{Fd: int32(efd), Events: unix.POLLIN}}
	if _, err := unix.Poll(pfd, 5000); err != nil {
		t.Fatal(err)
	}
	if pfd[0].Revents&unix.POLLIN == 0 {
		t.Fatal("no interrupt on the eventfd within 5 s")
	}
	fact("edu_msi_latency_us", time.Since(start).Microseconds())
	var cnt [8]byte
	if _, err := unix.Read(efd, cnt[:]); err != nil {
		t.Fatal(err)
	}
	if st := rd32(t, d, eduIRQStatus); st != 0x5 {
		t.Errorf("interrupt status %#x", st)
	}
	wr32(t, d, eduIRQAck, 0x5)

	// INTx as well, the fallback for devices without MSI(-X).
	if err := d.SetIRQs(idx, 0, nil); err != nil {
		t.Fatal(err)
	}
	if err := d.SetIRQs(vfio.PCIINTxIRQIndex, 0, []int{efd}); err != nil {
		t.Fatal(err)
	}
	wr32(t, d, eduIRQRaise, 0x2)
	if _, err := unix.Poll(pfd, 5000); err != nil || pfd[0].Revents&unix.POLLIN == 0 {
		t.Fatalf("no INTx interrupt on the eventfd within 5 s (%v)", err)
	}
	unix.Read(efd, cnt[:])
	wr32(t, d, eduIRQAck, 0x2)
	if err := d.UnmaskIRQ(vfio.PCIINTxIRQIndex, 0, 1); err != nil {
		t.Fatal(err)
	}
	if err := d.SetIRQs(vfio.PCIINTxIRQIndex, 0, nil); err != nil {
		t.Fatal(err)
	}
}

func TestGuestEduReset(t *testing.T) {
	guestOnly(t)
	d := openEdu(t)
	err := d.Reset()
	fact("edu_reset", func() string {
		if err == nil {
			return "ok"
		}
		return err.Error()
	}())
	if d.Info().Flags&vfio.DeviceFlagsReset == 0 && !errors.Is(err, unix.ENOTTY) {
		t.Errorf("Reset without the reset flag = %v, want ENOTTY", err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); !errors.Is(err, vfio.ErrClosed) {
		t.Errorf("second Close = %v", err)
	}
}

// kmsgContains reads the kernel log without blocking and reports whether a
// line contains s. Raw syscalls: an *os.File would wait in the poller on
// EAGAIN at the end of the log.
func kmsgContains(s string) bool {
	fd, err := unix.Open("/dev/kmsg", unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	buf := make([]byte, 8192)
	for {
		n, err := unix.Read(fd, buf)
		if errors.Is(err, unix.EPIPE) {
			continue
		}
		if err != nil || n <= 0 {
			return false
		}
		if strings.Contains(string(buf[:n]), s) {
			return true
		}
	}
}
