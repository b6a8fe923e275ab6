package userfault

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// ShmemFile returns the shmem file (a memfd, or a tmpfs file) that backs
// [addr, addr+length) through one MAP_SHARED mapping, and the offset in it
// of addr: the file a device can map itself to reach the same pages (a
// vfio-user DMA mapping with an fd), which then stay the file's, whatever
// the process later maps at addr. It opens the mapping's file through
// /proc/self/map_files (CAP_SYS_ADMIN) and checks it is the file the VMA
// maps; write asks for a file the device may write, which the process's
// own mapping must allow too (PROT_WRITE, and no write seal on the file).
// Memory that is not so backed (anonymous, private, another file system,
// read-only for a write), or a kernel without PROCMAP_QUERY, gives
// (nil, 0, nil): the caller pins instead (and a pin for writing fails on
// read-only memory, as it would anyway). The caller
// closes the file; a change of the mapping after the call is an
// invalidation the caller's notifier subscription reports.
func ShmemFile(addr, length uintptr, write bool) (*os.File, uint64, error) {
	if length == 0 || addr+length < addr {
		return nil, 0, fmt.Errorf("userfault: ShmemFile %#x+%d: %w", addr, length, unix.EINVAL)
	}
	maps, err := os.Open("/proc/self/maps")
	if err != nil {
		return nil, 0, fmt.Errorf("userfault: ShmemFile: %w", err)
	}
	v, err := vmaAt(maps, addr)
	_ = maps.Close() // read-only: nothing a close could lose
	switch {
	case errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT):
		return nil, 0, nil // no PROCMAP_QUERY, or nothing mapped: not ours to judge
	case err != nil:
		return nil, 0, fmt.Errorf("userfault: ShmemFile: PROCMAP_QUERY %#x: %w", addr, err)
	case v.start > addr || addr+length > v.end || !v.shared || v.ino == 0 || write && !v.write:
		return nil, 0, nil
	}
	mode := os.O_RDONLY
	if write {
		mode = os.O_RDWR
	}
	f, err := os.OpenFile(fmt.Sprintf("/proc/self/map_files/%x-%x", v.start, v.end), mode|unix.O_CLOEXEC, 0)
	if err != nil {
		// No CAP_SYS_ADMIN, a sealed or read-only file, or the VMA
		// changed meanwhile: pin instead.
		return nil, 0, nil
	}
	var st unix.Stat_t
	var fs unix.Statfs_t
	fd := int(f.Fd())
	seals, serr := unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
	if serr != nil {
		seals = 0 // a tmpfs file not made by memfd_create: no seals
	}
	if err := unix.Fstat(fd, &st); err != nil || st.Ino != v.ino || st.Dev != v.dev ||
		st.Mode&unix.S_IFMT != unix.S_IFREG || unix.Fstatfs(fd, &fs) != nil || fs.Type != unix.TMPFS_MAGIC ||
		write && seals&(unix.F_SEAL_WRITE|unix.F_SEAL_FUTURE_WRITE) != 0 {
		_ = f.Close() // opened read or read-write, never written: nothing to lose
		return nil, 0, nil
	}
	return f, v.off + uint64(addr-v.start), nil
}
