// Package mem allocates memory that may be handed to a device for DMA and
// watched by the userfault notifier: page-aligned, outside the Go heap (the
// runtime moves nothing there, never frees it behind your back and never
// madvises it), prefaulted, and released only by an explicit Unmap or Close.
//
// Two kinds exist:
//
//   - Alloc: a private anonymous mapping (MAP_PRIVATE|MAP_ANONYMOUS).
//   - AllocMemfd: a shared mapping of a memfd; the *os.File is exposed so the
//     memory can be passed to another process (a vfio-user DMA_MAP carries the
//     fd) and outlives the mapping until the file is closed.
//
// MapMemfd is the memfd and shared mapping under AllocMemfd without a
// Buffer, for owners that keep and release the file and the mapping
// themselves (the driver's rings, hfisim's BAR memory).
//
// Memory from make() or new() must never be given to a device: the garbage
// collector may free it, the scavenger returns its pages to the kernel, and
// userfault refuses to watch it.
package mem

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// ErrClosed is returned when a Buffer is used after Unmap or Close.
var ErrClosed = errors.New("mem: buffer unmapped")

// Buffer is one mapping. Its methods are safe for concurrent use, but the
// caller must not use Bytes after Unmap.
type Buffer struct {
	mu   sync.Mutex
	b    []byte // the whole mapping, page-rounded; nil after Unmap
	addr uintptr
	size int // requested size
	f    *os.File
}

// PageSize is the system page size.
func PageSize() int { return os.Getpagesize() }

func roundUp(size int) (int, error) {
	if size <= 0 {
		return 0, fmt.Errorf("mem: size %d: %w", size, unix.EINVAL)
	}
	ps := PageSize()
	if size > int(^uint(0)>>1)-ps {
		return 0, fmt.Errorf("mem: size %d: %w", size, unix.ENOMEM)
	}
	return (size + ps - 1) &^ (ps - 1), nil
}

// Alloc maps size bytes (rounded up to whole pages) of private anonymous
// memory, prefaulted so that every page is present when Alloc returns.
func Alloc(size int) (*Buffer, error) {
	n, err := roundUp(size)
	if err != nil {
		return nil, err
	}
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
	if err != nil {
		return nil, fmt.Errorf("mem: mmap %d bytes: %w", n, err)
	}
	return &Buffer{b: b, addr: sliceAddr(b), size: size}, nil
}

// AllocMemfd creates a memfd of size bytes (rounded up to whole pages) and
// maps it shared, prefaulted. File returns the memfd; it stays open until
// Close, so the pages survive Unmap.
func AllocMemfd(size int) (*Buffer, error) {
	f, b, err := MapMemfd("gohfi-dma", size, true)
	if err != nil {
		return nil, err
	}
	return &Buffer{b: b, addr: sliceAddr(b), size: size, f: f}, nil
}

// MapMemfd creates a memfd called name of size bytes (rounded up to whole
// pages) and maps it shared and read-write, prefaulted if populate. The
// caller owns both the file and the mapping. It is the memory under
// AllocMemfd, and under the driver's rings and the device model's BARs,
// which share their pages by fd and keep no Buffer.
func MapMemfd(name string, size int, populate bool) (*os.File, []byte, error) {
	n, err := roundUp(size)
	if err != nil {
		return nil, nil, err
	}
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC)
	if err != nil {
		return nil, nil, fmt.Errorf("mem: memfd_create %s: %w", name, err)
	}
	f := os.NewFile(uintptr(fd), "memfd:"+name)
	if err := unix.Ftruncate(fd, int64(n)); err != nil {
		_ = f.Close() // best effort: an empty memfd nobody mapped
		return nil, nil, fmt.Errorf("mem: ftruncate memfd %s to %d: %w", name, n, err)
	}
	flags := unix.MAP_SHARED
	if populate {
		flags |= unix.MAP_POPULATE
	}
	b, err := unix.Mmap(fd, 0, n, unix.PROT_READ|unix.PROT_WRITE, flags)
	if err != nil {
		_ = f.Close() // best effort: the memfd was never mapped
		return nil, nil, fmt.Errorf("mem: mmap memfd %s of %d bytes: %w", name, n, err)
	}
	return f, b, nil
}

// Bytes returns the requested size of the mapping (not the page-rounded
// length), or nil after Unmap.
func (b *Buffer) Bytes() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.b == nil {
		return nil
	}
	return b.b[:b.size:b.size]
}

// Addr is the virtual address of the first byte. It stays valid as a number
// after Unmap (for tests that re-map the same address).
func (b *Buffer) Addr() uintptr { return b.addr }

// Len is the requested size in bytes.
func (b *Buffer) Len() int { return b.size }

// MappedLen is the page-rounded size of the mapping.
func (b *Buffer) MappedLen() int {
	n, _ := roundUp(b.size) // cannot fail: Alloc and AllocMemfd accepted b.size
	return n
}

// File returns the memfd behind the buffer, or nil for Alloc buffers.
func (b *Buffer) File() *os.File {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.f
}

// Unmap removes the mapping. For a memfd buffer the file, and so the memory,
// stays until Close. Unmap is idempotent.
func (b *Buffer) Unmap() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.b == nil {
		return nil
	}
	if err := unix.Munmap(b.b); err != nil {
		return fmt.Errorf("mem: munmap %#x: %w", b.addr, err)
	}
	b.b = nil
	return nil
}

// Close unmaps the buffer and closes its memfd, if any. Close is idempotent.
func (b *Buffer) Close() error {
	err := b.Unmap()
	b.mu.Lock()
	f := b.f
	b.f = nil
	b.mu.Unlock()
	if f != nil {
		if cerr := f.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("mem: close memfd: %w", cerr)
		}
	}
	return err
}
