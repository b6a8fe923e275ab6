package hfisim

import (
	"fmt"
	"os"
	"sync/atomic"
	"unsafe"

	"github.com/gohfi/gohfi/mem"
	"golang.org/x/sys/unix"
)

// memRegion is device memory the driver may mmap: a memfd shared by the
// model and every mapping the client makes, like a BAR backed by on-chip RAM.
type memRegion struct {
	file *os.File
	mem  []byte
}

func newMemRegion(name string, size int) (*memRegion, error) {
	f, b, err := mem.MapMemfd("hfisim-"+name, size, false)
	if err != nil {
		return nil, fmt.Errorf("hfisim: %w", err)
	}
	return &memRegion{file: f, mem: b}, nil
}

// load64 reads the 8-byte entry at off atomically, as hardware sees a store
// from the CPU either whole or not at all.
func (r *memRegion) load64(off uint64) uint64 {
	return atomic.LoadUint64((*uint64)(unsafe.Pointer(&r.mem[off])))
}

func (r *memRegion) store64(off uint64, v uint64) {
	atomic.StoreUint64((*uint64)(unsafe.Pointer(&r.mem[off])), v)
}

// clear zeroes the region by punching its pages out of the memfd (every
// mapping then reads zeros): a large, mostly untouched MTT costs nothing to
// reset, where writing zeros would allocate all of it. A memfd always
// supports the punch; if it did not, the zeros are written.
func (r *memRegion) clear() {
	if err := unix.Fallocate(int(r.file.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, int64(len(r.mem))); err != nil {
		clear(r.mem)
	}
}

// close unmaps and closes the region at the device's teardown. Munmap of
// our own mapping fails only for an address we did not map (a bug), and
// closing a memfd writes nothing back (its pages are the memory), so both
// errors are dropped; a client's mapping of it lives on until it unmaps.
func (r *memRegion) close() {
	if r.mem != nil {
		_ = unix.Munmap(r.mem) // see above
		r.mem = nil
	}
	_ = r.file.Close() // see above
}
