//go:build gohfiguest

package guestprobe

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// From include/uapi/linux/userfaultfd.h.
const (
	uffdAPI           = 0xaa
	uffdioAPI         = 0xc018aa3f // _IOWR(0xAA, 0x3F, struct uffdio_api)
	uffdioRegister    = 0xc020aa00 // _IOWR(0xAA, 0x00, struct uffdio_register)
	uffdFeatureWP     = 1 << 0     // UFFD_FEATURE_PAGEFAULT_FLAG_WP
	uffdFeatureFork   = 1 << 1
	uffdFeatureRemap  = 1 << 2
	uffdFeatureRemove = 1 << 3
	uffdFeatureUnmap  = 1 << 6
	uffdModeMissing   = 1 << 0
	uffdModeWP        = 1 << 1
)

type uffdioAPIArg struct{ API, Features, Ioctls uint64 }

type uffdioRegisterArg struct {
	Start, Len, Mode, Ioctls uint64
}

func uffdOpen(features uint64) (int, uint64, error) {
	fd, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK, 0, 0)
	if errno != 0 {
		return -1, 0, fmt.Errorf("userfaultfd: %w", errno)
	}
	api := uffdioAPIArg{API: uffdAPI, Features: features}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, uffdioAPI, uintptr(unsafe.Pointer(&api))); errno != 0 {
		unix.Close(int(fd))
		return -1, 0, fmt.Errorf("UFFDIO_API: %w", errno)
	}
	return int(fd), api.Features, nil
}

// uffdProbe opens a userfaultfd with no features requested: the kernel
// answers with every feature it supports.
func uffdProbe() (uint64, error) {
	fd, features, err := uffdOpen(0)
	if err != nil {
		return 0, err
	}
	unix.Close(fd)
	return features, nil
}

// uffdRegisterWP registers anonymous memory in MISSING|WP mode with the
// non-cooperative events the design uses.
func uffdRegisterWP() error {
	fd, _, err := uffdOpen(uffdFeatureWP | uffdFeatureFork | uffdFeatureRemap | uffdFeatureRemove | uffdFeatureUnmap)
	if err != nil {
		return err
	}
	mem, err := unix.Mmap(-1, 0, 1<<16, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		unix.Close(fd)
		return err
	}
	// With the UNMAP event requested, munmap of a registered range blocks
	// until the event is read: close the userfaultfd first.
	defer unix.Munmap(mem)
	defer unix.Close(fd)
	reg := uffdioRegisterArg{Start: uint64(uintptr(unsafe.Pointer(&mem[0]))), Len: uint64(len(mem)),
		Mode: uffdModeMissing | uffdModeWP}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uffdioRegister, uintptr(unsafe.Pointer(&reg))); errno != 0 {
		return fmt.Errorf("UFFDIO_REGISTER: %w", errno)
	}
	return nil
}

func addrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }
