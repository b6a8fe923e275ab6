//go:build gohfiguest

package guestprobe

import (
	"encoding/binary"
	"fmt"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/vfio"
	"github.com/gohfi/gohfi/vfio/kernel"
)

// EnvVFIOUserDevice is set by the harness when the guest has a
// vfio-user-pci device (hfisim) attached.
const EnvVFIOUserDevice = "GOHFI_VFIO_USER_DEVICE"

// TestHFISmoke reaches hfisim through QEMU's vfio-user-pci and the guest's
// vfio-pci with the kernel backend: identity registers, a trapped
// read-write register, the mmappable RcvArray BAR, MSI-X vectors and a DMA
// mapping through the emulated IOMMU.
func TestHFISmoke(t *testing.T) {
	inGuest(t)
	if os.Getenv(EnvVFIOUserDevice) != "1" {
		t.Skip("no vfio-user device in this guest")
	}
	start := time.Now()
	d, err := kernel.Open(kernel.Options{Vendor: chip.PCIVendorID, Device: chip.PCIDeviceID, Bind: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	fact("hfi_open_ms", time.Since(start).Milliseconds())
	fact("hfi_bdf", d.BDF())
	fact("hfi_device_info", fmt.Sprintf("%+v", d.Info()))

	var cmd [2]byte
	if err := d.ReadRegion(vfio.PCIConfigRegionIndex, 4, cmd[:]); err != nil {
		t.Fatal(err)
	}
	binary.LittleEndian.PutUint16(cmd[:], binary.LittleEndian.Uint16(cmd[:])|0x6)
	if err := d.WriteRegion(vfio.PCIConfigRegionIndex, 4, cmd[:]); err != nil {
		t.Fatal(err)
	}

	rd := func(off uint64) uint64 {
		var b [8]byte
		if err := d.ReadRegion(chip.CSRBar, off, b[:]); err != nil {
			t.Fatal(err)
		}
		return binary.LittleEndian.Uint64(b[:])
	}
	if id := rd(chip.RegID); id != chip.IDMagic {
		t.Fatalf("ID register %#x, want %#x", id, uint64(chip.IDMagic))
	}
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], 0x0123456789abcdef)
	start = time.Now()
	if err := d.WriteRegion(chip.CSRBar, chip.RegScratch, b[:]); err != nil {
		t.Fatal(err)
	}
	if v := rd(chip.RegScratch); v != 0x0123456789abcdef {
		t.Fatalf("scratch read back %#x", v)
	}
	fact("hfi_csr_write_read_us", time.Since(start).Microseconds())

	for _, idx := range []uint32{chip.CSRBar, chip.RcvArrayBar, chip.MTTBar} {
		ri, err := d.RegionInfo(idx)
		if err != nil {
			t.Fatal(err)
		}
		fact(fmt.Sprintf("hfi_bar%d", idx), fmt.Sprintf("%+v", ri))
	}
	ri, _ := d.RegionInfo(chip.RcvArrayBar)
	if ri.Flags&vfio.RegionFlagMmap != 0 {
		m, err := d.MmapRegion(chip.RcvArrayBar, 0, 4096, unix.PROT_READ)
		fact("hfi_rcvarray_mmap", result(err))
		if err == nil {
			unix.Munmap(m)
		}
	}

	idx, n, err := kernel.PreferredIRQ(d)
	if err != nil {
		t.Fatal(err)
	}
	fact("hfi_irq", fmt.Sprintf("index %d x%d", idx, n))

	mem, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	start = time.Now()
	err = d.DMAMap(vfio.DMAMapping{IOVA: 0x100000, Vaddr: addrOf(mem), Size: 4096, Flags: vfio.DMARead | vfio.DMAWrite})
	fact("hfi_dma_map_4k_us", time.Since(start).Microseconds())
	if err != nil {
		t.Fatal(err)
	}
	if err := d.DMAUnmap(0x100000, 4096); err != nil {
		t.Fatal(err)
	}
}
