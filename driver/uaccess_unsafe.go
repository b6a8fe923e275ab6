package driver

import (
	"fmt"
	"runtime"
	"runtime/debug"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/uapi"
)

// UserPtr is an ioctl argument's address in the caller's memory, the
// driver's `void __user *`. A Go caller's pointer is kept as an
// unsafe.Pointer (as cilium/ebpf keeps kernel pointers until the syscall),
// never turned into a number: the object it points to stays alive, and if
// it is on a goroutine stack that grows during the call, the runtime
// adjusts the pointer with the stack. An address that is only a number (a
// field of an argument struct, an mmap'd region, a deliberately bad
// pointer) is kept as one.
type UserPtr struct {
	p    unsafe.Pointer
	addr uintptr
}

// UserPtrOf is the address of *p as an ioctl argument.
func UserPtrOf[T any](p *T) UserPtr { return UserPtr{p: unsafe.Pointer(p)} }

// NewUserPtr wraps a pointer to memory outside or inside the Go heap.
func NewUserPtr(p unsafe.Pointer) UserPtr { return UserPtr{p: p} }

// UserAddr is a raw address from the ABI (hfi1_tid_info.tidlist and
// .vaddr, gohfi_send.vaddr) or outside Go's memory (mmap'd, or invalid for
// a test of EFAULT). Whoever wrote the address keeps what it names in place
// (hfiuser pins Go memory it passes this way).
func UserAddr(a uint64) UserPtr { return UserPtr{addr: uintptr(a)} }

// IsNil reports whether u is the null pointer.
func (u UserPtr) IsNil() bool { return u.p == nil && u.addr == 0 }

func (u UserPtr) String() string {
	if u.p != nil {
		return fmt.Sprintf("%p", u.p)
	}
	return fmt.Sprintf("%#x", u.addr)
}

// copyFromUser and copyToUser move ioctl arguments between the caller's
// memory and the driver, as the kernel's copy_from_user/copy_to_user do: a
// bad user pointer is EFAULT, never a crash. Like the kernel's, they are a
// plain copy whose fault is caught: the kernel finds the faulting
// instruction in its exception table, here runtime/debug.SetPanicOnFault
// turns the fault into a panic that uaccess recovers. (A system call per
// copy, process_vm_readv/writev, cost about 1 us each and was most of a
// small POLL_CQ or POST_SEND.) Part of the bytes may have been copied when
// the fault hits, as in the kernel.
func copyFromUser(dst []byte, src UserPtr) error {
	b, err := userBytes(src, len(dst))
	if err != nil || b == nil {
		return err
	}
	return uaccess(func() { copy(dst, b) })
}

func copyToUser(dst UserPtr, src []byte) error {
	b, err := userBytes(dst, len(src))
	if err != nil || b == nil {
		return err
	}
	return uaccess(func() { copy(b, src) })
}

// userBytes is the n bytes of user memory at u that a copy touches: nil
// for n == 0 (nothing to copy), EFAULT for a nil pointer or a range that
// does not fit the address space. A raw address becomes a pointer without
// the uintptr conversion vet rejects: it names memory outside the Go heap
// (or Go memory its owner pinned).
func userBytes(u UserPtr, n int) ([]byte, error) {
	switch {
	case n == 0:
		return nil, nil
	case u.IsNil():
		return nil, unix.EFAULT
	case u.p != nil:
		return unsafe.Slice((*byte)(u.p), n), nil
	case u.addr+uintptr(n) < u.addr: // past the top of the address space
		return nil, unix.EFAULT
	}
	a := u.addr
	return unsafe.Slice((*byte)(*(*unsafe.Pointer)(unsafe.Pointer(&a))), n), nil
}

// uaccess runs a copy that may touch unmapped or protected user memory and
// returns EFAULT if it faulted. Only a memory fault is recovered: any other
// panic is a bug and goes on.
func uaccess(do func()) (err error) {
	old := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(old)
		if r := recover(); r != nil {
			if _, ok := r.(runtime.Error); !ok {
				panic(r)
			}
			err = unix.EFAULT
		}
	}()
	do()
	return nil
}

func errFault(what string) error { return fmt.Errorf("%s: %w", what, unix.EFAULT) }

// abiStruct is a pointer to a struct of the ABI (package uapi), whose Go
// layout is the C one: structs.HostLayout, sizes checked at compile time
// and fields against the C headers by uapi's parity test.
type abiStruct[T any] interface {
	*T
	uapi.Marshallable
}

// argBytes is the memory of ABI struct *v, for copying it to or from user
// memory as the bytes of the C struct.
func argBytes[T any, P abiStruct[T]](v P) []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(v)), unsafe.Sizeof(*v))
}
