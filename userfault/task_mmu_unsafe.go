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
var ErrGoHeap = errors.New("memory belongs to the Go heap (allocate DMA buffers with mem.Alloc or mem.AllocMemfd)")

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

type vma struct {
	start, end uintptr
	file       bool
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
	return vma{start: uintptr(q.VMAStart), end: uintptr(q.VMAEnd), file: q.Inode != 0}, nil
}

// vmasFromMaps parses /proc/self/maps (fallback for old kernels).
func vmasFromMaps() ([]vma, error) {
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		return nil, err
	}
	defer f.Close()
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
		out = append(out, vma{start: uintptr(s), end: uintptr(e), file: fields[4] != "0"})
	}
	return out, sc.Err()
}

// checkMemory refuses ranges that are not fully mapped or that share a VMA
// with the Go heap (found through a fresh heap object, a large one and this
// goroutine's stack, which all live in heap arenas).
func checkMemory(start, end uintptr) error {
	small := make([]byte, 16+os.Getpagesize()%7) // size unknown to the compiler: heap
	large := make([]byte, 64<<10+os.Getpagesize()%7)
	var local byte
	probes := [...]uintptr{
		uintptr(unsafe.Pointer(unsafe.SliceData(small))),
		uintptr(unsafe.Pointer(unsafe.SliceData(large))),
		uintptr(unsafe.Pointer(&local)),
	}
	runtime.KeepAlive(small)
	runtime.KeepAlive(large)

	f, err := os.Open("/proc/self/maps")
	if err != nil {
		return fmt.Errorf("check memory: %w", err)
	}
	defer f.Close()
	var vmas []vma
	useMaps := false
	for addr := start; addr < end; {
		v, err := vmaAt(f, addr)
		if errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EINVAL) && addr == start {
			useMaps = true
			break
		}
		if errors.Is(err, unix.ENOENT) || err == nil && v.start >= end {
			return fmt.Errorf("range not mapped at %#x: %w", addr, unix.ENOMEM)
		}
		if err != nil {
			return fmt.Errorf("check memory: PROCMAP_QUERY %#x: %w", addr, err)
		}
		if v.start > addr {
			return fmt.Errorf("range not mapped at %#x: %w", addr, unix.ENOMEM)
		}
		vmas = append(vmas, v)
		addr = v.end
	}
	if useMaps {
		all, err := vmasFromMaps()
		if err != nil {
			return fmt.Errorf("check memory: %w", err)
		}
		vmas = vmas[:0]
		addr := start
		for _, v := range all {
			if v.end <= addr || v.start >= end {
				continue
			}
			if v.start > addr {
				return fmt.Errorf("range not mapped at %#x: %w", addr, unix.ENOMEM)
			}
			vmas = append(vmas, v)
			addr = v.end
		}
		if addr < end {
			return fmt.Errorf("range not mapped at %#x: %w", addr, unix.ENOMEM)
		}
	}
	for _, v := range vmas {
		for _, p := range probes {
			if p >= v.start && p < v.end {
				return ErrGoHeap
			}
		}
	}
	return nil
}
