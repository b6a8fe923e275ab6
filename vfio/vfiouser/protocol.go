package vfiouser

import (
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// Commands (enum vfio_user_command).
const (
	cmdVersion          = 1
	cmdDMAMap           = 2
	cmdDMAUnmap         = 3
	cmdDeviceGetInfo    = 4
	cmdGetRegionInfo    = 5
	cmdGetRegionIOFDs   = 6
	cmdGetIRQInfo       = 7
	cmdSetIRQs          = 8
	cmdRegionRead       = 9
	cmdRegionWrite      = 10
	cmdDMARead          = 11
	cmdDMAWrite         = 12
	cmdDeviceReset      = 13
	cmdRegionWriteMulti = 15
	cmdDeviceFeature    = 16
)

var cmdNames = [...]string{
	cmdVersion:          "VERSION",
	cmdDMAMap:           "DMA_MAP",
	cmdDMAUnmap:         "DMA_UNMAP",
	cmdDeviceGetInfo:    "DEVICE_GET_INFO",
	cmdGetRegionInfo:    "GET_REGION_INFO",
	cmdGetRegionIOFDs:   "GET_REGION_IO_FDS",
	cmdGetIRQInfo:       "GET_IRQ_INFO",
	cmdSetIRQs:          "SET_IRQS",
	cmdRegionRead:       "REGION_READ",
	cmdRegionWrite:      "REGION_WRITE",
	cmdDMARead:          "DMA_READ",
	cmdDMAWrite:         "DMA_WRITE",
	cmdDeviceReset:      "DEVICE_RESET",
	14:                  "",
	cmdRegionWriteMulti: "REGION_WRITE_MULTI",
	cmdDeviceFeature:    "DEVICE_FEATURE",
}

func cmdName(cmd uint16) string {
	if int(cmd) < len(cmdNames) && cmdNames[cmd] != "" {
		return cmdNames[cmd]
	}
	return fmt.Sprintf("command %d", cmd)
}

// Header flags.
const (
	flagTypeMask = 0xf
	flagCommand  = 0x0
	flagReply    = 0x1
	flagNoReply  = 0x10
	flagError    = 0x20
)

// Sizes of the fixed parts of messages.
const (
	headerSize        = 16
	versionSize       = 4
	dmaMapSize        = 32
	dmaUnmapSize      = 24
	deviceInfoSize    = 16
	regionInfoSize    = 32
	regionIOFDsSize   = 16
	irqInfoSize       = 16
	irqSetSize        = 20
	regionAccessSize  = 16
	dmaAccessSize     = 16
	writeMultiHdrSize = 8
	writeMultiOneSize = 24
	capHeaderSize     = 8
	sparseHeaderSize  = 8 // nr_areas, reserved
	sparseAreaSize    = 16

	// writeMultiMax is the most writes QEMU coalesces into one
	// REGION_WRITE_MULTI (VFIO_USER_MULTI_MAX); more is refused.
	writeMultiMax = 200
	// writeMultiData is the data room of one coalesced write.
	writeMultiData = 8
)

// DMA_MAP / DMA_UNMAP flags (VFIO_DMA_MAP_FLAG_*, VFIO_DMA_UNMAP_FLAG_*).
const (
	dmaMapFlagRead         = 1 << 0
	dmaMapFlagWrite        = 1 << 1
	dmaUnmapFlagDirtyBitmp = 1 << 0
	dmaUnmapFlagAll        = 1 << 1
)

// SET_IRQS flags (VFIO_IRQ_SET_*).
const (
	irqSetDataNone      = 1 << 0
	irqSetDataBool      = 1 << 1
	irqSetDataEventfd   = 1 << 2
	irqSetActionMask    = 1 << 3
	irqSetActionUnmask  = 1 << 4
	irqSetActionTrigger = 1 << 5
	irqSetDataMask      = irqSetDataNone | irqSetDataBool | irqSetDataEventfd
	irqSetActionMaskAll = irqSetActionMask | irqSetActionUnmask | irqSetActionTrigger
)

// Region info capability ids (VFIO_REGION_INFO_CAP_*).
const (
	capSparseMmap        = 1
	capSparseMmapVersion = 1
)

// Defaults and hard limits.
const (
	defaultMaxDataXferSize = 1 << 20
	minMaxDataXferSize     = 512
	// msgHeadroom is what a message may carry beyond max_data_xfer_size:
	// the header and the fixed part of any payload, with room for region
	// info capabilities.
	msgHeadroom      = 4096
	defaultMaxMsgFDs = 16
	// maxFDsLimit is SCM_MAX_FD: the kernel never passes more in one message.
	maxFDsLimit        = 253
	defaultMaxDMAMaps  = 65535
	pageSize           = 4096
	maxVersionJSONSize = 4096
)

// header is the 16-byte message header.
type header struct {
	MsgID uint16
	Cmd   uint16
	Size  uint32
	Flags uint32
	Errno uint32
}

func (h *header) encode(b []byte) {
	_ = b[15]
	binary.LittleEndian.PutUint16(b[0:], h.MsgID)
	binary.LittleEndian.PutUint16(b[2:], h.Cmd)
	binary.LittleEndian.PutUint32(b[4:], h.Size)
	binary.LittleEndian.PutUint32(b[8:], h.Flags)
	binary.LittleEndian.PutUint32(b[12:], h.Errno)
}

func decodeHeader(b []byte) (header, error) {
	if len(b) < headerSize {
		return header{}, fmt.Errorf("vfio-user: short header (%d bytes): %w", len(b), unix.EINVAL)
	}
	h := header{
		MsgID: binary.LittleEndian.Uint16(b[0:]),
		Cmd:   binary.LittleEndian.Uint16(b[2:]),
		Size:  binary.LittleEndian.Uint32(b[4:]),
		Flags: binary.LittleEndian.Uint32(b[8:]),
		Errno: binary.LittleEndian.Uint32(b[12:]),
	}
	if h.Size < headerSize {
		return h, fmt.Errorf("vfio-user: message size %d smaller than its header: %w", h.Size, unix.EINVAL)
	}
	return h, nil
}

func (h *header) isReply() bool { return h.Flags&flagTypeMask == flagReply }

// dmaMap is the DMA_MAP payload.
type dmaMap struct {
	Argsz  uint32
	Flags  uint32
	Offset uint64
	Addr   uint64
	Size   uint64
}

func (m *dmaMap) encode(b []byte) {
	_ = b[dmaMapSize-1]
	binary.LittleEndian.PutUint32(b[0:], m.Argsz)
	binary.LittleEndian.PutUint32(b[4:], m.Flags)
	binary.LittleEndian.PutUint64(b[8:], m.Offset)
	binary.LittleEndian.PutUint64(b[16:], m.Addr)
	binary.LittleEndian.PutUint64(b[24:], m.Size)
}

func decodeDMAMap(b []byte) (dmaMap, error) {
	if len(b) < dmaMapSize {
		return dmaMap{}, errShort("DMA_MAP", len(b), dmaMapSize)
	}
	return dmaMap{
		Argsz:  binary.LittleEndian.Uint32(b[0:]),
		Flags:  binary.LittleEndian.Uint32(b[4:]),
		Offset: binary.LittleEndian.Uint64(b[8:]),
		Addr:   binary.LittleEndian.Uint64(b[16:]),
		Size:   binary.LittleEndian.Uint64(b[24:]),
	}, nil
}

// dmaUnmap is the DMA_UNMAP payload.
type dmaUnmap struct {
	Argsz uint32
	Flags uint32
	Addr  uint64
	Size  uint64
}

func (m *dmaUnmap) encode(b []byte) {
	_ = b[dmaUnmapSize-1]
	binary.LittleEndian.PutUint32(b[0:], m.Argsz)
	binary.LittleEndian.PutUint32(b[4:], m.Flags)
	binary.LittleEndian.PutUint64(b[8:], m.Addr)
	binary.LittleEndian.PutUint64(b[16:], m.Size)
}

func decodeDMAUnmap(b []byte) (dmaUnmap, error) {
	if len(b) < dmaUnmapSize {
		return dmaUnmap{}, errShort("DMA_UNMAP", len(b), dmaUnmapSize)
	}
	return dmaUnmap{
		Argsz: binary.LittleEndian.Uint32(b[0:]),
		Flags: binary.LittleEndian.Uint32(b[4:]),
		Addr:  binary.LittleEndian.Uint64(b[8:]),
		Size:  binary.LittleEndian.Uint64(b[16:]),
	}, nil
}

// info4 is the shape shared by DEVICE_GET_INFO, GET_IRQ_INFO and
// GET_REGION_IO_FDS: four 32-bit words.
type info4 struct {
	Argsz, Flags, A, B uint32
}

func (m *info4) encode(b []byte) {
	_ = b[15]
	binary.LittleEndian.PutUint32(b[0:], m.Argsz)
	binary.LittleEndian.PutUint32(b[4:], m.Flags)
	binary.LittleEndian.PutUint32(b[8:], m.A)
	binary.LittleEndian.PutUint32(b[12:], m.B)
}

func decodeInfo4(what string, b []byte) (info4, error) {
	if len(b) < 16 {
		return info4{}, errShort(what, len(b), 16)
	}
	return info4{
		Argsz: binary.LittleEndian.Uint32(b[0:]),
		Flags: binary.LittleEndian.Uint32(b[4:]),
		A:     binary.LittleEndian.Uint32(b[8:]),
		B:     binary.LittleEndian.Uint32(b[12:]),
	}, nil
}

// regionInfo is the fixed part of the GET_REGION_INFO payload.
type regionInfo struct {
	Argsz     uint32
	Flags     uint32
	Index     uint32
	CapOffset uint32
	Size      uint64
	Offset    uint64
}

func (m *regionInfo) encode(b []byte) {
	_ = b[regionInfoSize-1]
	binary.LittleEndian.PutUint32(b[0:], m.Argsz)
	binary.LittleEndian.PutUint32(b[4:], m.Flags)
	binary.LittleEndian.PutUint32(b[8:], m.Index)
	binary.LittleEndian.PutUint32(b[12:], m.CapOffset)
	binary.LittleEndian.PutUint64(b[16:], m.Size)
	binary.LittleEndian.PutUint64(b[24:], m.Offset)
}

func decodeRegionInfo(b []byte) (regionInfo, error) {
	if len(b) < regionInfoSize {
		return regionInfo{}, errShort("GET_REGION_INFO", len(b), regionInfoSize)
	}
	return regionInfo{
		Argsz:     binary.LittleEndian.Uint32(b[0:]),
		Flags:     binary.LittleEndian.Uint32(b[4:]),
		Index:     binary.LittleEndian.Uint32(b[8:]),
		CapOffset: binary.LittleEndian.Uint32(b[12:]),
		Size:      binary.LittleEndian.Uint64(b[16:]),
		Offset:    binary.LittleEndian.Uint64(b[24:]),
	}, nil
}

// irqSet is the fixed part of the SET_IRQS payload.
type irqSet struct {
	Argsz, Flags, Index, Start, Count uint32
}

func (m *irqSet) encode(b []byte) {
	_ = b[irqSetSize-1]
	binary.LittleEndian.PutUint32(b[0:], m.Argsz)
	binary.LittleEndian.PutUint32(b[4:], m.Flags)
	binary.LittleEndian.PutUint32(b[8:], m.Index)
	binary.LittleEndian.PutUint32(b[12:], m.Start)
	binary.LittleEndian.PutUint32(b[16:], m.Count)
}

func decodeIRQSet(b []byte) (irqSet, error) {
	if len(b) < irqSetSize {
		return irqSet{}, errShort("SET_IRQS", len(b), irqSetSize)
	}
	return irqSet{
		Argsz: binary.LittleEndian.Uint32(b[0:]),
		Flags: binary.LittleEndian.Uint32(b[4:]),
		Index: binary.LittleEndian.Uint32(b[8:]),
		Start: binary.LittleEndian.Uint32(b[12:]),
		Count: binary.LittleEndian.Uint32(b[16:]),
	}, nil
}

// regionAccess is the fixed part of REGION_READ/REGION_WRITE (and of each
// REGION_WRITE_MULTI entry).
type regionAccess struct {
	Offset uint64
	Region uint32
	Count  uint32
}

func (m *regionAccess) encode(b []byte) {
	_ = b[regionAccessSize-1]
	binary.LittleEndian.PutUint64(b[0:], m.Offset)
	binary.LittleEndian.PutUint32(b[8:], m.Region)
	binary.LittleEndian.PutUint32(b[12:], m.Count)
}

func decodeRegionAccess(what string, b []byte) (regionAccess, error) {
	if len(b) < regionAccessSize {
		return regionAccess{}, errShort(what, len(b), regionAccessSize)
	}
	return regionAccess{
		Offset: binary.LittleEndian.Uint64(b[0:]),
		Region: binary.LittleEndian.Uint32(b[8:]),
		Count:  binary.LittleEndian.Uint32(b[12:]),
	}, nil
}

// dmaAccess is the fixed part of DMA_READ/DMA_WRITE. The specification
// gives count 8 bytes in requests; the DMA_WRITE reply is accepted with a
// 4- or 8-byte count.
type dmaAccess struct {
	Addr  uint64
	Count uint64
}

func (m *dmaAccess) encode(b []byte) {
	_ = b[dmaAccessSize-1]
	binary.LittleEndian.PutUint64(b[0:], m.Addr)
	binary.LittleEndian.PutUint64(b[8:], m.Count)
}

func decodeDMAAccess(what string, b []byte) (dmaAccess, error) {
	if len(b) < dmaAccessSize {
		return dmaAccess{}, errShort(what, len(b), dmaAccessSize)
	}
	return dmaAccess{
		Addr:  binary.LittleEndian.Uint64(b[0:]),
		Count: binary.LittleEndian.Uint64(b[8:]),
	}, nil
}

// versionCaps is the JSON of a VERSION message. Pointers tell "absent" from
// zero; unknown keys are ignored.
type versionJSON struct {
	Capabilities *versionCaps `json:"capabilities,omitempty"`
}

type versionCaps struct {
	MaxMsgFDs       *uint32 `json:"max_msg_fds,omitempty"`
	MaxDataXferSize *uint64 `json:"max_data_xfer_size,omitempty"`
	MaxDMAMaps      *uint32 `json:"max_dma_maps,omitempty"`
	PgSizes         *uint64 `json:"pgsizes,omitempty"`
	WriteMultiple   *bool   `json:"write_multiple,omitempty"`
}

func errShort(what string, got, want int) error {
	return fmt.Errorf("vfio-user: %s: payload of %d bytes, need %d: %w", what, got, want, unix.EINVAL)
}

// errnoOf gives the errno to put in an error reply for err.
func errnoOf(err error) unix.Errno {
	var e unix.Errno
	switch {
	case err == nil:
		return 0
	case errors.As(err, &e) && e != 0:
		return e
	case errors.Is(err, ErrIOMMUFault):
		return unix.EFAULT
	default:
		return unix.EIO
	}
}

// replyError turns the errno of an error reply into an error.
func replyError(cmd uint16, errno uint32) error {
	if errno == 0 {
		// The specification allows an error reply without an errno.
		return fmt.Errorf("vfio-user: %s: error reply without errno: %w", cmdName(cmd), unix.EIO)
	}
	return fmt.Errorf("vfio-user: %s: %w", cmdName(cmd), unix.Errno(errno))
}

func protoErr(format string, args ...any) error {
	return fmt.Errorf("vfio-user: "+format+": %w", append(args, unix.EPROTO)...)
}

// addOverflows reports whether a+b overflows 64 bits.
func addOverflows(a, b uint64) bool { return a+b < a }
