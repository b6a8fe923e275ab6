package vfiouser

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

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

// IOEventFD is an ioeventfd a model offers for a sub-region of one of its
// regions (DEVICE_GET_REGION_IO_FDS): a client may signal File, an eventfd
// (an 8-byte write of a count), instead of writing Size bytes at Offset
// (with Data, when DataMatch). The device then acts as if the register had
// been written, which the model must make true for any value the client
// could have written there (or Data): so only registers whose write means
// "look" (a doorbell whose value the device reads from memory) qualify.
// Several sub-regions may share one File.
type IOEventFD struct {
	Offset, Size uint64
	DataMatch    bool
	Data         uint64
	File         *os.File
}

// IOFDModel is implemented by a DeviceModel that offers ioeventfds.
// RegionIOFDs is called between Attach and Detach and lists those of
// region index (none: nil). The model owns the files: it closes them at
// Detach at the latest (a client keeps its duplicates, which then wake
// nothing); the server sends duplicates and never closes them.
type IOFDModel interface {
	RegionIOFDs(index uint32) ([]IOEventFD, error)
}

// DMA is the device's access to memory the client DMA-mapped. Addresses are
// IOVAs. An access that is not entirely inside mappings with the needed
// permission fails with an error wrapping ErrIOMMUFault and touches nothing.
type DMA interface {
	Read(iova uint64, p []byte) error
	Write(iova uint64, p []byte) error
}

// Copier is implemented by a DMA that moves bytes between two IOVAs itself:
// where it maps both sides (fd-backed DMA mappings) that is one copy from
// mapping to mapping, with no staging buffer in the device. Use CopyDMA,
// which falls back to Read and Write through a staging buffer.
type Copier interface {
	// Copy copies n bytes from IOVA src (a device read) to IOVA dst (a
	// device write). Both ranges are checked before anything moves, as for
	// Read and Write; an error is a *CopyError that says which side failed.
	// The ranges must not overlap.
	Copy(dst, src uint64, n int) error
}

// CopyError is a failed Copy: Dst says whether the device write (true) or
// the device read failed. It unwraps to the cause (ErrIOMMUFault, EFAULT
// for a truncated file, a disconnected client).
type CopyError struct {
	Dst bool
	Err error
}

func (e *CopyError) Error() string {
	side := "source"
	if e.Dst {
		side = "destination"
	}
	return fmt.Sprintf("DMA copy, %s: %v", side, e.Err)
}

func (e *CopyError) Unwrap() error { return e.Err }

// CopyDMA copies n bytes from src to dst through dma: with Copy when dma is
// a Copier, else through buf (Read, then Write, in chunks of len(buf)).
// Overlapping ranges go through buf too, in one piece, as memmove would
// copy them: they must fit in it (else EINVAL). Errors are *CopyError.
func CopyDMA(dma DMA, dst, src uint64, n int, buf []byte) error {
	if n == 0 {
		return nil
	}
	overlap := dst < src+uint64(n) && src < dst+uint64(n)
	if overlap && n > len(buf) {
		return &CopyError{Dst: true, Err: fmt.Errorf("vfio-user: DMA copy of %d bytes from %#x to overlapping %#x: %w", n, src, dst, unix.EINVAL)}
	}
	if c, ok := dma.(Copier); ok && !overlap {
		return c.Copy(dst, src, n)
	}
	for n > 0 {
		k := min(n, len(buf))
		if err := dma.Read(src, buf[:k]); err != nil {
			return &CopyError{Err: err}
		}
		if err := dma.Write(dst, buf[:k]); err != nil {
			return &CopyError{Dst: true, Err: err}
		}
		dst, src, n = dst+uint64(k), src+uint64(k), n-k
	}
	return nil
}

// ErrIOMMUFault is returned for a DMA through an IOVA that is not mapped, or
// not mapped with the needed permission.
var ErrIOMMUFault = errors.New("vfio-user: IOMMU fault")
