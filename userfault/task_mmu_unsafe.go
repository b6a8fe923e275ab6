package userfault

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// What can be watched is checked against the process's VMAs, the way
// fs/proc/task_mmu.c shows them: PROCMAP_QUERY (Linux 6.11) answers one VMA
// per ioctl; older kernels fall back to reading /proc/self/maps.

// ErrGoHeap refuses memory of the Go heap: the runtime frees, moves and
// madvises it (the scavenger would block in userfaultfd), so a device must
// never see it. Allocate DMA memory with package mem (mem.Alloc,
// mem.AllocMemfd) or mmap.
var ErrGoHeap = fmt.Errorf("memory belongs to the Go heap (allocate DMA buffers with mem.Alloc or mem.AllocMemfd): %w", unix.EFAULT)

// procmapQuery is struct procmap_query (include/uapi/linux/fs.h).
type procmapQuery struct {
	Size        uint64
	QueryFlags  uint64
	QueryAddr   uint64
	VMAStart    uint64
	VMAEnd      uint64
	VMAFlags    uint64
	VMAPageSize uint64
	VMAOffset   uint64
	Inode       uint64
	DevMajor    uint32
	DevMinor    uint32
	NameSize    uint32
	BuildIDSize uint32
	NameAddr    uint64
	BuildIDAddr uint64
}

const (
	procmapQueryIoctl         = 0xC0686611 // _IOWR('f', 17, struct procmap_query)
	procmapCoveringOrNext     = 0x10
	procmapQueryFileBackedVMA = 0x20
)

const (
	procmapQueryVMAWritable = 0x02 // PROCMAP_QUERY_VMA_WRITABLE
	procmapQueryVMAShared   = 0x08 // PROCMAP_QUERY_VMA_SHARED
)

type vma struct {
	start, end uintptr
	file       bool
	// From PROCMAP_QUERY only (zero when parsed from /proc/self/maps):
	shared bool   // MAP_SHARED
	write  bool   // PROT_WRITE
	off    uint64 // offset in the file of start
	ino    uint64
	dev    uint64 // unix.Mkdev(major, minor)
}

// vmaAt returns the VMA holding addr or the next one above it.
func vmaAt(f *os.File, addr uintptr) (vma, error) {
	q := procmapQuery{Size: uint64(unsafe.Sizeof(procmapQuery{})), QueryFlags: procmapCoveringOrNext, QueryAddr: uint64(addr)}
	conn, err := f.SyscallConn()
	if err != nil {
		return vma{}, err
	}
	var errno unix.Errno
	cerr := conn.Control(func(fd uintptr) {
		_, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, procmapQueryIoctl, uintptr(unsafe.Pointer(&q)))
	})
	if cerr != nil {
		return vma{}, cerr
	}
	if errno != 0 {
		return vma{}, errno
	}
	return vma{start: uintptr(q.VMAStart), end: uintptr(q.VMAEnd), file: q.Inode != 0,
		shared: q.VMAFlags&procmapQueryVMAShared != 0, write: q.VMAFlags&procmapQueryVMAWritable != 0, off: q.VMAOffset, ino: q.Inode,
		dev: unix.Mkdev(q.DevMajor, q.DevMinor)}, nil
}

// vmasFromMaps parses /proc/self/maps (fallback for old kernels).
func vmasFromMaps() ([]vma, error) {
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }() // read-only: nothing a close could lose
	var out []vma
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		lo, hi, ok := strings.Cut(fields[0], "-")
		if !ok {
			continue
		}
		s, err1 := strconv.ParseUint(lo, 16, 64)
		e, err2 := strconv.ParseUint(hi, 16, 64)
		if err1 != nil || err2 != nil {
			continue
		}
		v := vma{start: uintptr(s), end: uintptr(e), file: fields[4] != "0"}
		// perms offset major:minor inode, as PROCMAP_QUERY reports them
		// (the kernel writes them in these bases; a field that does not
		// parse reads as 0, which no caller takes for a shmem file).
		perms := fields[1]
		v.write = len(perms) > 1 && perms[1] == 'w'
		v.shared = len(perms) > 3 && perms[3] == 's'
		v.off, _ = strconv.ParseUint(fields[2], 16, 64)
		v.ino, _ = strconv.ParseUint(fields[4], 10, 64)
		if maj, min, ok := strings.Cut(fields[3], ":"); ok {
			ma, _ := strconv.ParseUint(maj, 16, 32)
			mi, _ := strconv.ParseUint(min, 16, 32)
			v.dev = unix.Mkdev(uint32(ma), uint32(mi))
		}
		out = append(out, v)
	}
	return out, sc.Err()
}

// procMaps answers questions about this process's VMAs through one open
// /proc/self/maps (PROCMAP_QUERY needs no reading of the file).
type procMaps struct {
	f       *os.File
	noQuery bool // the kernel lacks PROCMAP_QUERY: parse the file
}

func openProcMaps() (*procMaps, error) {
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		return nil, err
	}
	return &procMaps{f: f}, nil
}

func (p *procMaps) close() error { return p.f.Close() }

// vmas returns the VMAs covering [start, end), or EFAULT if part of it is
// not mapped.
func (p *procMaps) vmas(start, end uintptr) ([]vma, error) {
	var out []vma
	if !p.noQuery {
		for addr := start; addr < end; {
			v, err := vmaAt(p.f, addr)
			if addr == start && (errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EINVAL)) {
				p.noQuery = true
				break
			}
			if errors.Is(err, unix.ENOENT) || err == nil && v.start > addr {
				return nil, fmt.Errorf("range not mapped at %#x: %w", addr, unix.EFAULT)
			}
			if err != nil {
				return nil, fmt.Errorf("PROCMAP_QUERY %#x: %w", addr, err)
			}
			out = append(out, v)
			addr = v.end
		}
		if !p.noQuery {
			return out, nil
		}
	}
	all, err := vmasFromMaps()
	if err != nil {
		return nil, err
	}
	addr := start
	for _, v := range all {
		if v.end <= addr || v.start >= end {
			continue
		}
		if v.start > addr {
			return nil, fmt.Errorf("range not mapped at %#x: %w", addr, unix.EFAULT)
		}
		out = append(out, v)
		addr = v.end
	}
	if addr < end {
		return nil, fmt.Errorf("range not mapped at %#x: %w", addr, unix.EFAULT)
	}
	return out, nil
}

// check refuses ranges that are not fully mapped or that share a VMA with
// the Go heap (found through a fresh heap object and this goroutine's stack,
// which live in heap arenas), and returns the extent of the VMAs covering
// the range.
func (p *procMaps) check(start, end uintptr) (pageRange, error) {
	small := make([]byte, 16+os.Getpagesize()%7) // size unknown to the compiler: heap
	var local byte
	probes := [...]uintptr{
		uintptr(unsafe.Pointer(unsafe.SliceData(small))),
		uintptr(unsafe.Pointer(&local)),
	}
	runtime.KeepAlive(small)
	vmas, err := p.vmas(start, end)
	if err != nil {
		return pageRange{}, err
	}
	for _, v := range vmas {
		for _, a := range probes {
			if a >= v.start && a < v.end {
				return pageRange{}, ErrGoHeap
			}
		}
	}
	return pageRange{vmas[0].start, vmas[len(vmas)-1].end}, nil
}

// vmasOverlapping returns the VMAs that overlap [start, end); holes are
// allowed.
func (p *procMaps) vmasOverlapping(start, end uintptr) ([]vma, error) {
	var out []vma
	if !p.noQuery {
		for addr := start; addr < end; {
			v, err := vmaAt(p.f, addr)
			if errors.Is(err, unix.ENOENT) || err == nil && v.start >= end {
				break
			}
			if err != nil {
				return nil, fmt.Errorf("PROCMAP_QUERY %#x: %w", addr, err)
			}
			out = append(out, v)
			addr = v.end
		}
		return out, nil
	}
	all, err := vmasFromMaps()
	if err != nil {
		return nil, err
	}
	for _, v := range all {
		if v.end > start && v.start < end {
			out = append(out, v)
		}
	}
	return out, nil
}
