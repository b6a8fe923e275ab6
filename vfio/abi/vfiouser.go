package abi

import "structs"

// The messages of the vfio-user protocol (QEMU's docs/interop/vfio-user.rst,
// version 0.0) that are not kernel structures. DMA_MAP, DMA_UNMAP,
// DEVICE_GET_REGION_INFO, DEVICE_GET_IRQ_INFO and DEVICE_SET_IRQS carry the
// kernel's VFIOIommuType1DmaMap, VFIOIommuType1DmaUnmap, VFIORegionInfo,
// VFIOIrqInfo and VFIOIrqSet. The C names are libvfio-user's.

// Commands (enum vfio_user_command).
const (
	VFIO_USER_VERSION                  = 1
	VFIO_USER_DMA_MAP                  = 2
	VFIO_USER_DMA_UNMAP                = 3
	VFIO_USER_DEVICE_GET_INFO          = 4
	VFIO_USER_DEVICE_GET_REGION_INFO   = 5
	VFIO_USER_DEVICE_GET_REGION_IO_FDS = 6
	VFIO_USER_DEVICE_GET_IRQ_INFO      = 7
	VFIO_USER_DEVICE_SET_IRQS          = 8
	VFIO_USER_REGION_READ              = 9
	VFIO_USER_REGION_WRITE             = 10
	VFIO_USER_DMA_READ                 = 11
	VFIO_USER_DMA_WRITE                = 12
	VFIO_USER_DEVICE_RESET             = 13
	VFIO_USER_REGION_WRITE_MULTI       = 15
	VFIO_USER_DEVICE_FEATURE           = 16
)

// Header flags: the message type in the low four bits, then no-reply and
// error.
const (
	VFIO_USER_F_TYPE_MASK    = 0xf
	VFIO_USER_F_TYPE_COMMAND = 0x0
	VFIO_USER_F_TYPE_REPLY   = 0x1
	VFIO_USER_F_NO_REPLY     = 0x10
	VFIO_USER_F_ERROR        = 0x20
)

// Sizes of the vfio-user structures (fixed parts), checked at compile time.
const (
	SizeofVFIOUserHeader             = 16
	SizeofVFIOUserVersion            = 4
	SizeofVFIOUserDeviceInfo         = 16
	SizeofVFIOUserRegionIOFDsRequest = 16
	SizeofVFIOUserSubRegionIOEventFD = 40
	SizeofVFIOUserRegionAccess       = 16
	SizeofVFIOUserDmaRegionAccess    = 16
	SizeofVFIOUserWriteMulti         = 8
	SizeofVFIOUserWriteMultiOne      = 24
)

// VFIOUserHeader is the 16-byte header of every message (struct
// vfio_user_header); Size counts the header too.
type VFIOUserHeader struct {
	_     structs.HostLayout
	MsgID uint16
	Cmd   uint16
	Size  uint32 `c:"msg_size"`
	Flags uint32
	Errno uint32 `c:"error_no"`
}

// VFIOUserVersion is the fixed part of VERSION (struct vfio_user_version):
// NUL-terminated JSON capabilities follow.
type VFIOUserVersion struct {
	_     structs.HostLayout
	Major uint16
	Minor uint16
}

// VFIOUserDeviceInfo is DEVICE_GET_INFO (struct vfio_user_device_info):
// struct vfio_device_info up to num_irqs.
type VFIOUserDeviceInfo struct {
	_          structs.HostLayout
	Argsz      uint32
	Flags      uint32
	NumRegions uint32
	NumIRQs    uint32 `c:"num_irqs"`
}

// VFIOUserRegionIOFDsRequest is the fixed part of DEVICE_GET_REGION_IO_FDS
// (struct vfio_user_region_io_fds_request); sub-regions follow in a reply.
type VFIOUserRegionIOFDsRequest struct {
	_     structs.HostLayout
	Argsz uint32
	Flags uint32
	Index uint32
	Count uint32
}

// Sub-region types of a DEVICE_GET_REGION_IO_FDS reply, and the flags of
// an ioeventfd sub-region (KVM_IOEVENTFD_FLAG_*, linux/kvm.h).
const (
	VFIO_USER_IO_FD_TYPE_IOEVENTFD  = 0
	VFIO_USER_IO_FD_TYPE_IOREGIONFD = 1

	KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
	KVM_IOEVENTFD_FLAG_PIO       = 1 << 1
)

// VFIOUserSubRegionIOEventFD is one sub-region of a DEVICE_GET_REGION_IO_FDS
// reply (struct vfio_user_sub_region_ioeventfd): a write of Size bytes at
// Offset of the region (with Datamatch, when Flags has
// KVM_IOEVENTFD_FLAG_DATAMATCH) may be made by signalling the reply's fd
// number FDIndex instead. An ioregionfd sub-region has the same layout,
// with user data where Datamatch is.
type VFIOUserSubRegionIOEventFD struct {
	_         structs.HostLayout
	Offset    uint64
	Size      uint64
	FDIndex   uint32 `c:"fd_index"`
	Type      uint32
	Flags     uint32
	Padding   uint32
	Datamatch uint64
}

// VFIOUserRegionAccess is the fixed part of REGION_READ and REGION_WRITE
// (struct vfio_user_region_access); Count bytes of data follow.
type VFIOUserRegionAccess struct {
	_      structs.HostLayout
	Offset uint64
	Region uint32
	Count  uint32
}

// VFIOUserDmaRegionAccess is the fixed part of DMA_READ and DMA_WRITE
// (struct vfio_user_dma_region_access); Count bytes of data follow.
type VFIOUserDmaRegionAccess struct {
	_     structs.HostLayout
	Addr  uint64
	Count uint64
}

// VFIOUserWriteMulti is the fixed part of REGION_WRITE_MULTI (struct
// vfio_user_write_multi): WrCnt VFIOUserWriteMultiOne follow.
type VFIOUserWriteMulti struct {
	_     structs.HostLayout
	WrCnt uint64
}

// VFIOUserWriteMultiOne is one write of REGION_WRITE_MULTI (struct
// vfio_user_write_multi_one): a region access with room for 8 bytes.
type VFIOUserWriteMultiOne struct {
	_      structs.HostLayout
	Offset uint64
	Region uint32
	Count  uint32
	Data   [8]byte
}
