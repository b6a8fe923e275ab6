package dma

import (
	"github.com/gohfi/gohfi/internal/testenv"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// benchPinner returns a Pinner whose Accountant lets the benchmark pin up to
// need bytes: CAP_IPC_LOCK is honoured, so root is not held to the 8 MiB
// default RLIMIT_MEMLOCK.
func benchPinner(b *testing.B, need int) *Pinner {
	return newTestPinner(b, benchAccountant(b, need), nil)
}

// benchAccountant returns an Accountant that lets the benchmark pin up to
// need bytes, or skips.
func benchAccountant(b *testing.B, need int) *Accountant {
	acct := NewAccountant()
	acct.HonorCapIPCLock = true
	if lim, err := acct.LimitPages(); err != nil || (lim >= 0 && lim < need/PageSize()) {
		testenv.Missing(b, "RLIMIT_MEMLOCK %d pages < %d needed and no CAP_IPC_LOCK (%v)", lim, need/PageSize(), err)
	}
	return acct
}

func sizeName(n int) string {
	switch {
	case n >= 1<<20:
		return strconv.Itoa(n>>20) + "MiB"
	default:
		return strconv.Itoa(n>>10) + "KiB"
	}
}

func BenchmarkPinUnpin(b *testing.B) {
	for _, size := range []int{4 << 10, 64 << 10, 1 << 20, 16 << 20} {
		b.Run(sizeName(size), func(b *testing.B) {
			p := benchPinner(b, size)
			buf, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE,
				unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
			if err != nil {
				b.Fatal(err)
			}
			defer unix.Munmap(buf)
			addr := sliceAddr(buf)
			b.SetBytes(int64(size))
			for b.Loop() {
				pin, err := p.Pin(addr, size)
				if err != nil {
					b.Fatal(err)
				}
				if err := pin.Unpin(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkTransfer compares WriteAt/ReadAt through a pin with a plain copy
// into the same mapped memory, for 4 KiB and 1 MiB.
func BenchmarkTransfer(b *testing.B) {
	for _, size := range []int{4 << 10, 1 << 20} {
		buf, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE,
			unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
		if err != nil {
			b.Fatal(err)
		}
		defer unix.Munmap(buf)
		src := make([]byte, size)
		for i := range src {
			src[i] = byte(i)
		}
		b.Run("copy/"+sizeName(size), func(b *testing.B) {
			b.SetBytes(int64(size))
			for b.Loop() {
				copy(buf, src)
			}
		})
		b.Run("WriteAt/"+sizeName(size), func(b *testing.B) {
			p := benchPinner(b, size)
			pin, err := p.Pin(sliceAddr(buf), size)
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(int64(size))
			for b.Loop() {
				if _, err := pin.WriteAt(src, 0); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("ReadAt/"+sizeName(size), func(b *testing.B) {
			p := benchPinner(b, size)
			pin, err := p.Pin(sliceAddr(buf), size)
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(int64(size))
			for b.Loop() {
				if _, err := pin.ReadAt(src, 0); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkWriteAtParallel measures 64 KiB writes from several goroutines
// into their own pins, all serialised by the Pinner's mutex.
func BenchmarkWriteAtParallel(b *testing.B) {
	const size = 64 << 10
	p := benchPinner(b, 64*size)
	b.SetBytes(size)
	b.RunParallel(func(pb *testing.PB) {
		buf, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE,
			unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
		if err != nil {
			b.Error(err)
			return
		}
		defer unix.Munmap(buf)
		pin, err := p.Pin(sliceAddr(buf), size)
		if err != nil {
			b.Error(err)
			return
		}
		defer pin.Unpin()
		src := make([]byte, size)
		for pb.Next() {
			if _, err := pin.WriteAt(src, 0); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// roBenchBuf maps size bytes of PROT_READ memory with its pages present.
func roBenchBuf(b *testing.B, size int) []byte {
	buf, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = unix.Munmap(buf) })
	for i := range buf {
		buf[i] = byte(i)
	}
	if err := unix.Mprotect(buf, unix.PROT_READ); err != nil {
		b.Fatal(err)
	}
	return buf
}

var roSegments = []int{0, 256 << 10, 1 << 20}

func segName(seg int) string {
	if seg == 0 {
		seg = DefaultReadOnlySegment
	}
	return "seg" + sizeName(seg)
}

// BenchmarkPinUnpinReadOnly is BenchmarkPinUnpin for PinReadOnly of
// PROT_READ memory.
func BenchmarkPinUnpinReadOnly(b *testing.B) {
	for _, seg := range roSegments {
		for _, size := range []int{4 << 10, 64 << 10, 1 << 20} {
			b.Run(segName(seg)+"/"+sizeName(size), func(b *testing.B) {
				p := newROPinner(b, benchAccountant(b, size), seg)
				addr := sliceAddr(roBenchBuf(b, size))
				b.SetBytes(int64(size))
				for b.Loop() {
					pin, err := p.PinReadOnly(addr, size)
					if err != nil {
						b.Fatal(err)
					}
					if err := pin.Unpin(); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// BenchmarkReadAtReadOnly measures device reads of a 1 MiB read-only pin:
// 4 KiB at the start of a segment and at its last page (the most references
// to skip), the whole MiB, and the whole MiB in 4 KiB reads in order (a
// device reading packet by packet).
func BenchmarkReadAtReadOnly(b *testing.B) {
	const size = 1 << 20
	for _, seg := range roSegments {
		p := newROPinner(b, benchAccountant(b, size), seg)
		pin, err := p.PinReadOnly(sliceAddr(roBenchBuf(b, size)), size)
		if err != nil {
			b.Fatal(err)
		}
		s := seg
		if s == 0 {
			s = DefaultReadOnlySegment
		}
		dst := make([]byte, size)
		for _, c := range []struct {
			name    string
			off, n  int
			stepped bool
		}{
			{"4KiB-first", 0, 4 << 10, false},
			{"4KiB-last", s - 4<<10, 4 << 10, false},
			{"1MiB", 0, size, false},
			{"1MiB-by-4KiB", 0, size, true},
		} {
			b.Run(segName(seg)+"/"+c.name, func(b *testing.B) {
				b.SetBytes(int64(c.n))
				for b.Loop() {
					step := c.n
					if c.stepped {
						step = 4 << 10
					}
					for o := 0; o < c.n; o += step {
						if _, err := pin.ReadAt(dst[o:o+step], int64(c.off+o)); err != nil {
							b.Fatal(err)
						}
					}
				}
			})
		}
	}
}

// BenchmarkDeviceRingCopy: a device model's copy between two device rings
// (two kernel copies through the source ring's pipe), within one ring (the
// first half to the second: no buffer lent), next to a plain copy of the
// same buffers.
func BenchmarkDeviceRingCopy(b *testing.B) {
	for _, size := range []int{64 << 10, 1 << 20, 16 << 20} {
		b.Run(sizeName(size), func(b *testing.B) {
			p := benchPinner(b, 2*size)
			var rings [2]*DeviceRingBuffer
			var bufs [2][]byte
			for i := range rings {
				buf, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE,
					unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
				if err != nil {
					b.Fatal(err)
				}
				defer unix.Munmap(buf)
				bufs[i] = buf
				pin, err := p.Pin(sliceAddr(buf), size)
				if err != nil {
					b.Fatal(err)
				}
				defer pin.Unpin()
				f, addr, err := pin.DeviceRing()
				if err != nil {
					testenv.Missing(b, "device ring: %v", err)
				}
				fd, err := unix.Dup(int(f.Fd()))
				f.Close()
				if err != nil {
					b.Fatal(err)
				}
				if rings[i], err = OpenDeviceRing(fd, uint64(addr), uint64(size), false); err != nil {
					b.Fatal(err)
				}
				defer rings[i].Close()
			}
			b.Run("ring", func(b *testing.B) {
				b.SetBytes(int64(size))
				for b.Loop() {
					if _, err := rings[0].CopyTo(rings[1], 0, 0, size); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run("within", func(b *testing.B) {
				b.SetBytes(int64(size / 2))
				for b.Loop() {
					if _, err := rings[0].CopyTo(rings[0], int64(size/2), 0, size/2); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run("memcpy", func(b *testing.B) {
				b.SetBytes(int64(size))
				for b.Loop() {
					copy(bufs[1], bufs[0])
				}
			})
		})
	}
}
