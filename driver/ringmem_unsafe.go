package driver

import (
	"fmt"
	"os"
	"sync/atomic"
	"unsafe"

	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// ringMem is driver-owned host memory the device DMAs (header queues, eager
// buffers, send queues): memfd-backed, so a vfio-user device maps the same
// pages by fd, and so user space can mmap it too, as with hfi1's rcvhdrq.
type ringMem struct {
	file *os.File
	mem  []byte
	iova uint64
}

func newRingMem(name string, size int) (*ringMem, error) {
	size = (size + os.Getpagesize() - 1) &^ (os.Getpagesize() - 1)
	fd, err := unix.MemfdCreate("gohfi-"+name, unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("memfd %s: %w", name, err)
	}
	f := os.NewFile(uintptr(fd), "gohfi-"+name)
	if err := f.Truncate(int64(size)); err != nil {
		_ = f.Close() // the memfd was never used: the truncate's error is the one to report
		return nil, fmt.Errorf("size %s: %w", name, err)
	}
	mem, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		_ = f.Close() // as above
		return nil, fmt.Errorf("mmap %s: %w", name, err)
	}
	return &ringMem{file: f, mem: mem}, nil
}

func (r *ringMem) vaddr() uintptr { return uintptr(unsafe.Pointer(&r.mem[0])) }

func (r *ringMem) free() {
	if r == nil {
		return
	}
	if r.mem != nil {
		// Our own mapping of our own memfd: munmap fails only for a bad
		// address, a driver bug, and the memory is gone with the fd anyway.
		_ = unix.Munmap(r.mem)
		r.mem = nil
	}
	_ = r.file.Close() // a memfd: nothing buffered that a close could lose
}

// userMap maps the ring into "user space" (the caller) read-write or
// read-only: a separate mapping of the same pages, which the caller unmaps.
func (r *ringMem) userMap(prot int) ([]byte, error) {
	return unix.Mmap(int(r.file.Fd()), 0, len(r.mem), prot, unix.MAP_SHARED)
}

// load64 and store64 access 8-byte words shared with the device (RcvArray
// entries, DMA'd ring indices) whole, as the device expects.
func load64(b []byte, off int) uint64 {
	return atomic.LoadUint64((*uint64)(unsafe.Pointer(&b[off])))
}

func store64(b []byte, off int, v uint64) {
	atomic.StoreUint64((*uint64)(unsafe.Pointer(&b[off])), v)
}

// load32 and store32 access the 4-byte words of a doorbell record whole
// (sequentially consistent: a store followed by a load of another word is
// the full barrier the doorbell-record protocol needs).
func load32(b []byte, off int) uint32 {
	return atomic.LoadUint32((*uint32)(unsafe.Pointer(&b[off])))
}

func store32(b []byte, off int, v uint32) {
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&b[off])), v)
}

// eventsPtr is the events page's bits word, updated with compare-and-swap.
func eventsPtr(b []byte) *uint64 {
	return (*uint64)(unsafe.Pointer(&b[uapi.GOHFI_EVENTS_BITS_OFF]))
}
