package kernel

import (
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/vfio/abi"
)

// vfioFile is an open VFIO character device (container or group) that
// closes once.
type vfioFile struct {
	mu     sync.Mutex
	fd     int
	closed bool
}

func openVFIOFile(path string) (int, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("vfio: %w", &os.PathError{Op: "open", Path: path, Err: err})
	}
	return fd, nil
}

// Close closes the file; a second Close does nothing.
func (f *vfioFile) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil
	}
	f.closed = true
	return unix.Close(f.fd)
}

// Container is an open /dev/vfio/vfio: an IOMMU context that groups are
// attached to and DMA mappings are made in. Each method is one ioctl.
// Close closes the container; groups still attached keep it alive in the
// kernel until they are closed.
type Container struct{ vfioFile }

// OpenContainer opens the VFIO container device (normally /dev/vfio/vfio).
func OpenContainer(path string) (*Container, error) {
	fd, err := openVFIOFile(path)
	if err != nil {
		return nil, err
	}
	return &Container{vfioFile{fd: fd}}, nil
}

// FD returns the container's file descriptor, owned by the Container.
func (c *Container) FD() int { return c.fd }

// APIVersion is VFIO_GET_API_VERSION.
func (c *Container) APIVersion() (int, error) {
	return ioctlValue(c.fd, abi.VFIO_GET_API_VERSION, 0)
}

// CheckExtension is VFIO_CHECK_EXTENSION: whether the container (and, once
// groups are attached, their IOMMU) supports ext.
func (c *Container) CheckExtension(ext int) (bool, error) {
	r, err := ioctlValue(c.fd, abi.VFIO_CHECK_EXTENSION, uintptr(ext))
	return r > 0, err
}

// SetIOMMU is VFIO_SET_IOMMU; it needs at least one group attached.
func (c *Container) SetIOMMU(typ int) error {
	_, err := ioctlValue(c.fd, abi.VFIO_SET_IOMMU, uintptr(typ))
	return err
}

// IOMMUInfo is VFIO_IOMMU_GET_INFO with its capability chain (IOVA ranges,
// DMA mappings available). The first call learns the size the kernel needs
// for the capabilities, the second reads them.
func (c *Container) IOMMUInfo() (IOMMUInfo, error) {
	buf := encodeIOMMUInfo(0)
	for range 2 {
		if _, err := ioctlBuf(c.fd, abi.VFIO_IOMMU_GET_INFO, buf); err != nil {
			return IOMMUInfo{}, err
		}
		info, needed, err := decodeIOMMUInfo(buf)
		if err != nil {
			return IOMMUInfo{}, fmt.Errorf("vfio: VFIO_IOMMU_GET_INFO: %w", err)
		}
		if needed == 0 {
			return info, nil
		}
		buf = encodeIOMMUInfo(needed)
	}
	return IOMMUInfo{}, fmt.Errorf("vfio: VFIO_IOMMU_GET_INFO: capability size keeps growing")
}

// MapDMA is VFIO_IOMMU_MAP_DMA: the kernel pins [vaddr, vaddr+size) of this
// process and maps it at iova with flags (VFIO_DMA_MAP_FLAG_READ|WRITE).
func (c *Container) MapDMA(iova uint64, vaddr uintptr, size uint64, flags uint32) error {
	m := abi.VFIOIommuType1DmaMap{Flags: flags, Vaddr: uint64(vaddr), IOVA: iova, Size: size}
	m.Argsz = uint32(abi.SizeofVFIOIommuType1DmaMap)
	_, err := ioctlBuf(c.fd, abi.VFIO_IOMMU_MAP_DMA, abi.Bytes(&m))
	return err
}

// UnmapDMA is VFIO_IOMMU_UNMAP_DMA and returns how many bytes the kernel
// unmapped (0 if nothing was mapped there).
func (c *Container) UnmapDMA(iova, size uint64) (uint64, error) {
	u := abi.VFIOIommuType1DmaUnmap{IOVA: iova, Size: size}
	u.Argsz = uint32(abi.SizeofVFIOIommuType1DmaUnmap)
	if _, err := ioctlBuf(c.fd, abi.VFIO_IOMMU_UNMAP_DMA, abi.Bytes(&u)); err != nil {
		return 0, err
	}
	return u.Size, nil
}

// Group is an open /dev/vfio/<n>, an IOMMU group. Each method is one ioctl.
// Close closes the group, detaching it from its container.
type Group struct{ vfioFile }

// OpenGroup opens the group device at path (/dev/vfio/<n>).
func OpenGroup(path string) (*Group, error) {
	fd, err := openVFIOFile(path)
	if err != nil {
		return nil, err
	}
	return &Group{vfioFile{fd: fd}}, nil
}

// Status is VFIO_GROUP_GET_STATUS (VFIO_GROUP_FLAGS_*).
func (g *Group) Status() (uint32, error) {
	st := abi.VFIOGroupStatus{Argsz: uint32(abi.SizeofVFIOGroupStatus)}
	if _, err := ioctlBuf(g.fd, abi.VFIO_GROUP_GET_STATUS, abi.Bytes(&st)); err != nil {
		return 0, err
	}
	return st.Flags, nil
}

// SetContainer is VFIO_GROUP_SET_CONTAINER.
func (g *Group) SetContainer(c *Container) error {
	return ioctlIntPtr(g.fd, abi.VFIO_GROUP_SET_CONTAINER, int32(c.fd))
}

// UnsetContainer is VFIO_GROUP_UNSET_CONTAINER.
func (g *Group) UnsetContainer() error {
	_, err := ioctlValue(g.fd, abi.VFIO_GROUP_UNSET_CONTAINER, 0)
	return err
}

// DeviceFD is VFIO_GROUP_GET_DEVICE_FD: a new file descriptor for the
// device called name (its PCI address), owned by the caller.
func (g *Group) DeviceFD(name string) (int, error) {
	return ioctlString(g.fd, abi.VFIO_GROUP_GET_DEVICE_FD, name)
}
