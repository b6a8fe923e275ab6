// Package kernel is the kernel VFIO backend of vfio.Device: it drives
// /dev/vfio (the legacy container/group interface with the type1 v2 IOMMU)
// from user space, as in a QEMU guest whose vfio-pci owns the HFI.
//
// The shape follows the kernel's objects: a Container (/dev/vfio/vfio),
// a Group (/dev/vfio/<n>) and the device fd, with one method per ioctl;
// Device ties them together behind vfio.Device. The ioctl calls themselves
// are in ioctl_unsafe.go; the structures are vfio/abi's (uapi.go builds
// those the kernel extends with capabilities or data).
package kernel

import (
	"errors"
	"fmt"
	"io"
	"math"
	"path/filepath"
	"slices"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/vfio"
	"github.com/gohfi/gohfi/vfio/abi"
)

// Options selects and prepares the device Open opens.
type Options struct {
	// BDF is the device's PCI address ("0000:00:03.0"). When empty, the
	// device is found by Vendor and Device; exactly one must match.
	BDF            string
	Vendor, Device uint16
	// Bind binds the device to vfio-pci first if another driver (or none)
	// has it.
	Bind bool
	// Sysfs and DevDir locate /sys and /dev/vfio; zero values mean the
	// real ones.
	Sysfs  Sysfs
	DevDir string
}

// Device is a PCI device opened through kernel VFIO. It implements
// vfio.Device.
type Device struct {
	bdf       string
	container *Container
	group     *Group
	iommu     IOMMUInfo

	mu      sync.Mutex
	fd      int // -1 once closed
	info    vfio.DeviceInfo
	regions map[uint32]vfio.RegionInfo
	done    chan struct{} // made on first use, closed by release
}

var _ vfio.Device = (*Device)(nil)

// Open finds the device, binds it to vfio-pci if asked, opens a container
// with the type1 v2 IOMMU, attaches the device's group and gets the device
// fd. Every step's failure names the step.
func Open(opts Options) (*Device, error) {
	sys := opts.Sysfs
	bdf := opts.BDF
	if bdf == "" {
		found, err := sys.Find(opts.Vendor, opts.Device)
		if err != nil {
			return nil, err
		}
		if len(found) != 1 {
			return nil, fmt.Errorf("vfio: %d PCI devices %04x:%04x, want exactly one: %w",
				len(found), opts.Vendor, opts.Device, unix.ENODEV)
		}
		bdf = found[0]
	}
	if opts.Bind {
		if err := sys.Bind(bdf); err != nil {
			return nil, err
		}
	}
	groupNo, err := sys.IOMMUGroup(bdf)
	if err != nil {
		return nil, err
	}
	devDir := opts.DevDir
	if devDir == "" {
		devDir = "/dev/vfio"
	}

	d := &Device{bdf: bdf, fd: -1, regions: map[uint32]vfio.RegionInfo{}}
	if err := d.open(devDir, groupNo); err != nil {
		return nil, errors.Join(err, d.release())
	}
	return d, nil
}

func (d *Device) open(devDir string, groupNo int) (err error) {
	if d.container, err = OpenContainer(filepath.Join(devDir, "vfio")); err != nil {
		return err
	}
	v, err := d.container.APIVersion()
	if err != nil {
		return err
	}
	if v != abi.VFIO_API_VERSION {
		return fmt.Errorf("vfio: API version %d, want %d", v, abi.VFIO_API_VERSION)
	}
	if ok, err := d.container.CheckExtension(abi.VFIO_TYPE1v2_IOMMU); err != nil {
		return err
	} else if !ok {
		return fmt.Errorf("vfio: container lacks the type1 v2 IOMMU: %w", unix.ENOTSUP)
	}
	if d.group, err = OpenGroup(filepath.Join(devDir, strconv.Itoa(groupNo))); err != nil {
		return err
	}
	st, err := d.group.Status()
	if err != nil {
		return err
	}
	if st&abi.VFIO_GROUP_FLAGS_VIABLE == 0 {
		// Another device of the group is bound to a host driver.
		return fmt.Errorf("vfio: group %d is not viable (bind all its devices to vfio-pci): %w", groupNo, unix.EBUSY)
	}
	if err := d.group.SetContainer(d.container); err != nil {
		return err
	}
	if err := d.container.SetIOMMU(abi.VFIO_TYPE1v2_IOMMU); err != nil {
		return err
	}
	if d.iommu, err = d.container.IOMMUInfo(); err != nil {
		return err
	}
	if d.fd, err = d.group.DeviceFD(d.bdf); err != nil {
		return err
	}
	di := abi.VFIODeviceInfo{Argsz: uint32(abi.SizeofVFIODeviceInfo)}
	if _, err := ioctlBuf(d.fd, abi.VFIO_DEVICE_GET_INFO, abi.Bytes(&di)); err != nil {
		return err
	}
	d.info = vfio.DeviceInfo{Flags: di.Flags, NumRegions: di.NumRegions, NumIRQs: di.NumIRQs}
	return nil
}

// BDF returns the device's PCI address.
func (d *Device) BDF() string { return d.bdf }

// IOMMU returns what the container's IOMMU reported: page sizes, the IOVA
// ranges DMAMap accepts, and how many more mappings it allows.
func (d *Device) IOMMU() IOMMUInfo { return d.iommu }

// Container and Group give access to the per-ioctl objects.
func (d *Device) Container() *Container { return d.container }
func (d *Device) Group() *Group         { return d.group }

func (d *Device) devFD() (int, error) {
	fd, _, err := d.live()
	return fd, err
}

// live returns the device fd and the container, or ErrClosed.
func (d *Device) live() (int, *Container, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.fd < 0 || d.container == nil {
		return -1, nil, vfio.ErrClosed
	}
	return d.fd, d.container, nil
}

// Info implements vfio.Device (VFIO_DEVICE_GET_INFO, read at Open).
func (d *Device) Info() vfio.DeviceInfo { return d.info }

// RegionInfo implements vfio.Device: VFIO_DEVICE_GET_REGION_INFO, again
// with a larger buffer when the region has capabilities (sparse mmap).
// Region layouts do not change while the device is open, so they are cached.
func (d *Device) RegionInfo(index uint32) (vfio.RegionInfo, error) {
	d.mu.Lock()
	if ri, ok := d.regions[index]; ok {
		d.mu.Unlock()
		return ri, nil
	}
	d.mu.Unlock()
	fd, err := d.devFD()
	if err != nil {
		return vfio.RegionInfo{}, err
	}
	buf := encodeRegionInfo(index, 0)
	for range 2 {
		if _, err := ioctlBuf(fd, abi.VFIO_DEVICE_GET_REGION_INFO, buf); err != nil {
			return vfio.RegionInfo{}, fmt.Errorf("%w (region %d)", err, index)
		}
		ri, needed, err := decodeRegionInfo(buf)
		if err != nil {
			return vfio.RegionInfo{}, fmt.Errorf("vfio: VFIO_DEVICE_GET_REGION_INFO (region %d): %w", index, err)
		}
		if needed == 0 {
			d.mu.Lock()
			d.regions[index] = ri
			d.mu.Unlock()
			return ri, nil
		}
		buf = encodeRegionInfo(index, needed)
	}
	return vfio.RegionInfo{}, fmt.Errorf("vfio: VFIO_DEVICE_GET_REGION_INFO (region %d): capability size keeps growing", index)
}

// regionRange checks [off, off+n) against region index and returns the
// position in the device fd.
func (d *Device) regionRange(index uint32, off uint64, n int) (int64, error) {
	ri, err := d.RegionInfo(index)
	if err != nil {
		return 0, err
	}
	if uint64(n) > ri.Size || off > ri.Size-uint64(n) {
		return 0, fmt.Errorf("vfio: region %d: [%#x, +%d) outside %d bytes: %w", index, off, n, ri.Size, unix.EINVAL)
	}
	return int64(ri.Offset + off), nil
}

// ReadRegion implements vfio.Device with pread(2) on the device fd; the
// kernel splits the access into the widest naturally aligned loads.
func (d *Device) ReadRegion(index uint32, off uint64, p []byte) error {
	return d.regionIO("read", unix.Pread, io.ErrUnexpectedEOF, index, off, p)
}

// WriteRegionPosted implements vfio.Device: pwrite(2) on a BAR of the
// device fd is an MMIO store in the kernel (vfio_pci_core_do_io_rw), posted
// by PCI already, so it is WriteRegion.
func (d *Device) WriteRegionPosted(index uint32, off uint64, p []byte) error {
	return d.WriteRegion(index, off, p)
}

// WriteRegion implements vfio.Device with pwrite(2) on the device fd.
func (d *Device) WriteRegion(index uint32, off uint64, p []byte) error {
	return d.regionIO("write", unix.Pwrite, io.ErrShortWrite, index, off, p)
}

// regionIO moves p at off of region index with op (pread or pwrite); a
// transfer of fewer bytes is short.
func (d *Device) regionIO(dir string, op func(fd int, p []byte, pos int64) (int, error), short error, index uint32, off uint64, p []byte) error {
	pos, err := d.regionRange(index, off, len(p))
	if err != nil {
		return err
	}
	fd, err := d.devFD()
	if err != nil {
		return err
	}
	n, err := op(fd, p, pos)
	if err != nil {
		return fmt.Errorf("vfio: %s region %d at %#x: %w", dir, index, off, err)
	}
	if n != len(p) {
		return fmt.Errorf("vfio: %s region %d at %#x: %d of %d bytes: %w", dir, index, off, n, len(p), short)
	}
	return nil
}

// MmapRegion implements vfio.Device: a shared mapping of the device fd at
// the region's offset. The range must be inside a mappable (sparse) area
// and page aligned.
func (d *Device) MmapRegion(index uint32, off, size uint64, prot int) ([]byte, error) {
	ri, err := d.RegionInfo(index)
	if err != nil {
		return nil, err
	}
	if !ri.Mappable(off, size) {
		return nil, fmt.Errorf("vfio: region %d: [%#x, +%#x) is not mappable: %w", index, off, size, unix.EINVAL)
	}
	page := uint64(unix.Getpagesize())
	if (ri.Offset+off)%page != 0 {
		return nil, fmt.Errorf("vfio: region %d: offset %#x not page aligned: %w", index, off, unix.EINVAL)
	}
	fd, err := d.devFD()
	if err != nil {
		return nil, err
	}
	b, err := unix.Mmap(fd, int64(ri.Offset+off), int(size), prot, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("vfio: mmap region %d at %#x: %w", index, off, err)
	}
	return b, nil
}

// DMAMap implements vfio.Device with VFIO_IOMMU_MAP_DMA. The kernel pins
// the pages of m.Vaddr; m.File and m.Access are not needed here. The
// range must lie inside one of the IOVA ranges the IOMMU reported and be
// aligned to its smallest page size.
func (d *Device) DMAMap(m vfio.DMAMapping) error {
	if m.Vaddr == 0 || m.Size == 0 {
		return fmt.Errorf("vfio: DMA map at %#x: no memory (vaddr %#x, size %#x): %w", m.IOVA, m.Vaddr, m.Size, unix.EINVAL)
	}
	if err := d.checkIOVA(m.IOVA, m.Size); err != nil {
		return err
	}
	_, c, err := d.live()
	if err != nil {
		return err
	}
	if err := c.MapDMA(m.IOVA, m.Vaddr, m.Size, m.Flags&(vfio.DMARead|vfio.DMAWrite)); err != nil {
		return fmt.Errorf("%w (iova %#x size %#x)", err, m.IOVA, m.Size)
	}
	return nil
}

// IOVARanges implements vfio.Device: the usable IOVA ranges the type1
// IOMMU reported (VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, which already
// leaves out reserved regions such as x86's MSI window), as they are. An
// IOMMU that reports none (kernels before 5.4) restricts nothing that
// DMAMap can check: the whole 64-bit space.
func (d *Device) IOVARanges() []vfio.IOVARange {
	if len(d.iommu.IOVARanges) == 0 {
		return []vfio.IOVARange{{Start: 0, End: math.MaxUint64}}
	}
	return slices.Clone(d.iommu.IOVARanges)
}

// checkIOVA applies the IOMMU's reported limits, so a bad mapping fails
// here with a clear message rather than as a bare EINVAL from the kernel.
func (d *Device) checkIOVA(iova, size uint64) error {
	if pg := d.iommu.PageSizes; pg != 0 {
		smallest := pg & -pg
		if iova%smallest != 0 || size%smallest != 0 {
			return fmt.Errorf("vfio: DMA map [%#x, +%#x): not aligned to the IOMMU page size %#x: %w", iova, size, smallest, unix.EINVAL)
		}
	}
	if len(d.iommu.IOVARanges) == 0 {
		return nil
	}
	last := iova + size - 1
	if last < iova {
		return fmt.Errorf("vfio: DMA map [%#x, +%#x): wraps: %w", iova, size, unix.EINVAL)
	}
	for _, r := range d.iommu.IOVARanges {
		if iova >= r.Start && last <= r.End {
			return nil
		}
	}
	return fmt.Errorf("vfio: DMA map [%#x, %#x]: outside the IOMMU's IOVA ranges %v: %w", iova, last, d.iommu.IOVARanges, unix.EINVAL)
}

// ErrNotMapped is returned (wrapped with unix.ENOENT) by DMAUnmap when the
// kernel unmapped less than asked: nothing, or a different extent.
var ErrNotMapped = fmt.Errorf("vfio: DMA unmap: not mapped: %w", unix.ENOENT)

// DMAUnmap implements vfio.Device with VFIO_IOMMU_UNMAP_DMA. Type1 v2
// unmaps only whole mappings, and reports how much it unmapped; anything
// but exactly size is an error.
func (d *Device) DMAUnmap(iova, size uint64) error {
	_, c, err := d.live()
	if err != nil {
		return err
	}
	n, err := c.UnmapDMA(iova, size)
	if err != nil {
		return fmt.Errorf("%w (iova %#x size %#x)", err, iova, size)
	}
	if n != size {
		return fmt.Errorf("vfio: DMA unmap [%#x, +%#x): kernel unmapped %#x bytes: %w", iova, size, n, ErrNotMapped)
	}
	return nil
}

// IRQInfo implements vfio.Device (VFIO_DEVICE_GET_IRQ_INFO).
func (d *Device) IRQInfo(index uint32) (vfio.IRQInfo, error) {
	fd, err := d.devFD()
	if err != nil {
		return vfio.IRQInfo{}, err
	}
	ii := abi.VFIOIrqInfo{Argsz: uint32(abi.SizeofVFIOIrqInfo), Index: index}
	if _, err := ioctlBuf(fd, abi.VFIO_DEVICE_GET_IRQ_INFO, abi.Bytes(&ii)); err != nil {
		return vfio.IRQInfo{}, fmt.Errorf("%w (index %d)", err, index)
	}
	return vfio.IRQInfo{Flags: ii.Flags, Index: ii.Index, Count: ii.Count}, nil
}

// SetIRQs implements vfio.Device: VFIO_DEVICE_SET_IRQS with
// DATA_EVENTFD|ACTION_TRIGGER, or DATA_NONE|ACTION_TRIGGER with count 0 to
// disable the index when fds is nil.
func (d *Device) SetIRQs(index, start uint32, fds []int) error {
	fd, err := d.devFD()
	if err != nil {
		return err
	}
	if fds == nil {
		start = 0
	}
	_, err = ioctlBuf(fd, abi.VFIO_DEVICE_SET_IRQS, encodeIRQSet(abi.VFIO_IRQ_SET_ACTION_TRIGGER, index, start, 0, fds))
	if err != nil {
		return fmt.Errorf("%w (index %d, start %d, %d fds)", err, index, start, len(fds))
	}
	return nil
}

// UnmaskIRQ unmasks vectors [start, start+count) of index
// (DATA_NONE|ACTION_UNMASK). INTx is automasked by vfio-pci when it fires:
// the driver unmasks it after handling the interrupt.
func (d *Device) UnmaskIRQ(index, start, count uint32) error {
	fd, err := d.devFD()
	if err != nil {
		return err
	}
	_, err = ioctlBuf(fd, abi.VFIO_DEVICE_SET_IRQS, encodeIRQSet(abi.VFIO_IRQ_SET_ACTION_UNMASK, index, start, count, nil))
	if err != nil {
		return fmt.Errorf("%w (unmask index %d)", err, index)
	}
	return nil
}

// Reset implements vfio.Device (VFIO_DEVICE_RESET).
func (d *Device) Reset() error {
	fd, err := d.devFD()
	if err != nil {
		return err
	}
	if d.info.Flags&vfio.DeviceFlagsReset == 0 {
		return fmt.Errorf("vfio: VFIO_DEVICE_RESET: device %s has no reset: %w", d.bdf, unix.ENOTTY)
	}
	_, err = ioctlValue(fd, abi.VFIO_DEVICE_RESET, 0)
	return err
}

// Done implements vfio.Device. The channel is closed by Close only: the
// device fd does not report a surprise-removed function, whose BARs and
// config space then read all ones, which the driver checks for.
func (d *Device) Done() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.doneLocked()
}

func (d *Device) doneLocked() chan struct{} {
	if d.done == nil {
		d.done = make(chan struct{})
	}
	return d.done
}

func (d *Device) closeDoneLocked() {
	select {
	case <-d.doneLocked():
	default:
		close(d.done)
	}
}

// Close implements vfio.Device: it closes the device fd, the group and the
// container. The kernel drops the DMA mappings with the container.
func (d *Device) Close() error {
	d.mu.Lock()
	if d.fd < 0 && d.group == nil && d.container == nil {
		d.closeDoneLocked()
		d.mu.Unlock()
		return vfio.ErrClosed
	}
	d.mu.Unlock()
	return d.release()
}

func (d *Device) release() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var errs []error
	if d.fd >= 0 {
		errs = append(errs, unix.Close(d.fd))
		d.fd = -1
	}
	if d.group != nil {
		errs = append(errs, d.group.Close())
		d.group = nil
	}
	if d.container != nil {
		errs = append(errs, d.container.Close())
		d.container = nil
	}
	d.closeDoneLocked()
	return errors.Join(errs...)
}

// PreferredIRQ returns the interrupt index the driver should use: MSI-X
// when the device offers vectors there, INTx otherwise, and the number of
// vectors.
func PreferredIRQ(d vfio.Device) (index, count uint32, err error) {
	for _, idx := range []uint32{vfio.PCIMSIXIRQIndex, vfio.PCIMSIIRQIndex, vfio.PCIINTxIRQIndex} {
		if idx >= d.Info().NumIRQs {
			continue
		}
		info, err := d.IRQInfo(idx)
		if err != nil {
			return 0, 0, err
		}
		if info.Count > 0 && info.Flags&vfio.IRQInfoEventfd != 0 {
			return idx, info.Count, nil
		}
	}
	return 0, 0, fmt.Errorf("vfio: device has no interrupt with eventfd support: %w", unix.ENODEV)
}
