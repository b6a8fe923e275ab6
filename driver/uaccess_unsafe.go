package driver

import (
	"fmt"
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// UserPtr is an ioctl argument's address in the caller's memory, the
// driver's `void __user *`. A Go caller's pointer is kept as an
// unsafe.Pointer (as cilium/ebpf keeps kernel pointers until the syscall),
// so the object it points to is alive and, because File.Ioctl pins it, on
// the heap: a goroutine stack that grows during the call cannot move it.
// An address that is only a number (a field of an argument struct, an
// mmap'd region, a deliberately bad pointer) is kept as one.
type UserPtr struct {
	p    unsafe.Pointer
	addr uintptr
}

// UserPtrOf is the address of *p as an ioctl argument. The object escapes
// to the heap; the caller keeps it alive until Ioctl returns (it does, as
// long as the UserPtr is in use).
func UserPtrOf[T any](p *T) UserPtr { return UserPtr{p: unsafe.Pointer(p)} }

// NewUserPtr wraps a pointer to memory outside or inside the Go heap.
func NewUserPtr(p unsafe.Pointer) UserPtr { return UserPtr{p: p} }

// UserAddr is a raw address from the ABI (hfi1_tid_info.tidlist and
// .vaddr, gohfi_send.vaddr) or outside Go's memory (mmap'd, or invalid for
// a test of EFAULT). Whoever wrote the address keeps what it names in place.
func UserAddr(a uint64) UserPtr { return UserPtr{addr: uintptr(a)} }

// IsNil reports whether u is the null pointer.
func (u UserPtr) IsNil() bool { return u.p == nil && u.addr == 0 }

func (u UserPtr) String() string { return fmt.Sprintf("%#x", u.uaddr()) }

// uaddr is the numeric address, used only at the copy itself.
func (u UserPtr) uaddr() uintptr {
	if u.p != nil {
		return uintptr(u.p)
	}
	return u.addr
}

// pin keeps a Go object named by u where it is for the call (Pin of a
// non-Go pointer does nothing). It also makes every caller's argument
// escape to the heap at compile time, which is what protects stack
// objects: the heap never moves.
func (u UserPtr) pin(p *runtime.Pinner) {
	if u.p != nil {
		p.Pin(u.p)
	}
}

// copyFromUser and copyToUser move ioctl arguments between the caller's
// memory and the driver, as the kernel's copy_from_user/copy_to_user do: a
// bad user pointer is EFAULT, never a crash. process_vm_readv/writev on our
// own process give exactly that check.
func copyFromUser(dst []byte, src UserPtr) error {
	if len(dst) == 0 {
		return nil
	}
	if src.IsNil() {
		return unix.EFAULT
	}
	local := []unix.Iovec{{Base: &dst[0], Len: uint64(len(dst))}}
	remote := []unix.RemoteIovec{{Base: src.uaddr(), Len: len(dst)}}
	n, err := unix.ProcessVMReadv(os.Getpid(), local, remote, 0)
	runtime.KeepAlive(src.p)
	if err != nil || n != len(dst) {
		return unix.EFAULT
	}
	return nil
}

func copyToUser(dst UserPtr, src []byte) error {
	if len(src) == 0 {
		return nil
	}
	if dst.IsNil() {
		return unix.EFAULT
	}
	local := []unix.Iovec{{Base: &src[0], Len: uint64(len(src))}}
	remote := []unix.RemoteIovec{{Base: dst.uaddr(), Len: len(src)}}
	n, err := unix.ProcessVMWritev(os.Getpid(), local, remote, 0)
	runtime.KeepAlive(dst.p)
	if err != nil || n != len(src) {
		return unix.EFAULT
	}
	return nil
}

func errFault(what string) error { return fmt.Errorf("%s: %w", what, unix.EFAULT) }
