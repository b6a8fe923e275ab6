package vfiouser

import (
	"errors"
	"os"

	"github.com/gohfi/gohfi/vfio"
)

// DeviceModel is the device a Server serves: an emulated PCI function. The
// server decodes and validates every message before it calls the model, so a
// model sees only well-formed requests with in-range indices; it must still
// check offsets and sizes against its own regions.
//
// One client is served at a time. Calls come from the server's goroutine for
// that client, except that the model may use the DMA it was attached to from
// its own goroutines.
type DeviceModel interface {
	// DeviceInfo returns the device flags and the number of regions and IRQ
	// indices.
	DeviceInfo() vfio.DeviceInfo
	// RegionInfo describes region index. If the region has mappable areas,
	// mmapFile is the file the client maps (Offset in the info is the offset
	// in that file); the server duplicates it into the reply and never
	// closes it.
	RegionInfo(index uint32) (info vfio.RegionInfo, mmapFile *os.File, err error)
	// RegionRead and RegionWrite access region index through the trapped
	// path (config space, BAR registers).
	RegionRead(index uint32, off uint64, p []byte) error
	RegionWrite(index uint32, off uint64, p []byte) error
	// IRQInfo describes IRQ index.
	IRQInfo(index uint32) (vfio.IRQInfo, error)
	// SetIRQs sets the eventfds of vectors [start, start+count) of index.
	// fds is nil to disable those vectors (count 0 and start 0 disables the
	// whole index); otherwise len(fds) == count and the model owns the files.
	SetIRQs(index, start, count uint32, fds []*os.File) error
	// Reset resets the device.
	Reset() error
	// Attach is called when a client has negotiated the protocol; dma is the
	// way to the client's DMA-mapped memory until Detach.
	Attach(dma DMA)
	// Detach is called when the client is gone. The server has dropped all
	// DMA mappings before it calls Detach.
	Detach()
}

// DMA is the device's access to memory the client DMA-mapped. Addresses are
// IOVAs. An access that is not entirely inside mappings with the needed
// permission fails with an error wrapping ErrIOMMUFault and touches nothing.
type DMA interface {
	Read(iova uint64, p []byte) error
	Write(iova uint64, p []byte) error
}

// ErrIOMMUFault is returned for a DMA through an IOVA that is not mapped, or
// not mapped with the needed permission.
var ErrIOMMUFault = errors.New("vfio-user: IOMMU fault")
