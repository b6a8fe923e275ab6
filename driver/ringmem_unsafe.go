package driver

import (
	"os"
	"sync/atomic"
	"unsafe"

	"github.com/gohfi/gohfi/mem"
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
	f, b, err := mem.MapMemfd("gohfi-"+name, size, true)
	if err != nil {
		return nil, err
	}
	return &ringMem{file: f, mem: b}, nil
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

func add64(b []byte, off int, v uint64) uint64 {
	return atomic.AddUint64((*uint64)(unsafe.Pointer(&b[off])), v)
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

// rhqSeq loads the seq of header queue entry slot (struct gohfi_rhq_entry),
// which the device writes last.
func rhqSeq(rhq []byte, slot uint64) uint32 {
	off := int(slot)*uapi.SizeofGohfiRHQEntry + int(unsafe.Offsetof(uapi.GohfiRHQEntry{}.Seq))
	return load32(rhq, off)
}

// eventsPtr is the events page's bits word, updated with compare-and-swap.
func eventsPtr(b []byte) *uint64 {
	return (*uint64)(unsafe.Pointer(&b[uapi.GOHFI_EVENTS_BITS_OFF]))
}
