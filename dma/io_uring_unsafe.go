package dma

import (
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	sizeofParams       = unsafe.Sizeof(ioUringParams{})
	sizeofSQE          = unsafe.Sizeof(ioUringSQE{})
	sizeofCQE          = unsafe.Sizeof(ioUringCQE{})
	sizeofRsrcRegister = unsafe.Sizeof(ioUringRsrcRegister{})
	sizeofRsrcUpdate2  = unsafe.Sizeof(ioUringRsrcUpdate2{})
	sizeofGeteventsArg = unsafe.Sizeof(ioUringGeteventsArg{})
)

// The layouts must match the kernel's exactly.
var _ = [1]struct{}{}[sizeofParams-120]
var _ = [1]struct{}{}[sizeofSQE-64]
var _ = [1]struct{}{}[sizeofCQE-16]
var _ = [1]struct{}{}[sizeofRsrcRegister-32]
var _ = [1]struct{}{}[sizeofRsrcUpdate2-32]
var _ = [1]struct{}{}[sizeofGeteventsArg-24]

// addrOf returns the address of an argument struct as the kernel ABI wants
// it. The structs live in the heap (ring.args), which does not move.
func addrOf[T any](p *T) uint64 { return uint64(uintptr(unsafe.Pointer(p))) }

func ioUringSetup(entries uint32, p *ioUringParams) (int, error) {
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(p)), 0)
	if errno != 0 {
		return -1, errno
	}
	return int(fd), nil
}

func ioUringEnter(fd int, toSubmit, minComplete, flags uint32) (int, error) {
	n, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(fd), uintptr(toSubmit),
		uintptr(minComplete), uintptr(flags), 0, 0)
	if errno != 0 {
		return -1, errno
	}
	return int(n), nil
}

func ioUringEnterArg(fd int, toSubmit, minComplete, flags uint32, arg *ioUringGeteventsArg) (int, error) {
	n, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(fd), uintptr(toSubmit),
		uintptr(minComplete), uintptr(flags), uintptr(unsafe.Pointer(arg)), sizeofGeteventsArg)
	if errno != 0 {
		return -1, errno
	}
	return int(n), nil
}

func ioUringRegister(fd int, opcode uint32, arg uint64, nrArgs uint32) (int, error) {
	n, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(fd), uintptr(opcode),
		uintptr(arg), uintptr(nrArgs), 0, 0)
	if errno != 0 {
		return -1, errno
	}
	return int(n), nil
}

func loadAcquire(p *uint32) uint32     { return atomic.LoadUint32(p) }
func storeRelease(p *uint32, v uint32) { atomic.StoreUint32(p, v) }

func u32At(mem []byte, off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&mem[off])) }

// mapRings maps the SQ ring, CQ ring and SQE array and points the ring's
// fields into them.
func (r *ring) mapRings(p *ioUringParams) error {
	sqSize := p.SQOff.Array + p.SQEntries*4
	cqSize := p.CQOff.Cqes + p.CQEntries*uint32(sizeofCQE)
	single := p.Features&ioringFeatSingleMmap != 0
	if single {
		sqSize = max(sqSize, cqSize)
	}
	var err error
	r.sqMem, err = unix.Mmap(r.fd, ioringOffSQRing, int(sqSize), unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return err
	}
	cqMem := r.sqMem
	if !single {
		r.cqMem, err = unix.Mmap(r.fd, ioringOffCQRing, int(cqSize), unix.PROT_READ|unix.PROT_WRITE,
			unix.MAP_SHARED|unix.MAP_POPULATE)
		if err != nil {
			return err
		}
		cqMem = r.cqMem
	}
	r.sqeMem, err = unix.Mmap(r.fd, ioringOffSQEs, int(p.SQEntries*uint32(sizeofSQE)),
		unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return err
	}
	r.sqHead = u32At(r.sqMem, p.SQOff.Head)
	r.sqTail = u32At(r.sqMem, p.SQOff.Tail)
	r.sqMask = u32At(r.sqMem, p.SQOff.RingMask)
	r.sqDropped = u32At(r.sqMem, p.SQOff.Dropped)
	r.sqArray = unsafe.Slice(u32At(r.sqMem, p.SQOff.Array), p.SQEntries)
	r.sqes = unsafe.Slice((*ioUringSQE)(unsafe.Pointer(&r.sqeMem[0])), p.SQEntries)
	r.cqHead = u32At(cqMem, p.CQOff.Head)
	r.cqTail = u32At(cqMem, p.CQOff.Tail)
	r.cqMask = u32At(cqMem, p.CQOff.RingMask)
	r.cqOverflow = u32At(cqMem, p.CQOff.Overflow)
	r.cqes = unsafe.Slice((*ioUringCQE)(unsafe.Pointer(&cqMem[p.CQOff.Cqes])), p.CQEntries)
	return nil
}

func (r *ring) unmapRings() {
	r.sqHead, r.sqTail, r.sqMask, r.sqDropped, r.sqArray, r.sqes = nil, nil, nil, nil, nil, nil
	r.cqHead, r.cqTail, r.cqMask, r.cqOverflow, r.cqes = nil, nil, nil, nil, nil
	for _, m := range []*[]byte{&r.sqeMem, &r.cqMem, &r.sqMem} {
		if *m != nil {
			_ = unix.Munmap(*m) // our own ring mapping: a failure would be a bug, and the fd is closed next
			*m = nil
		}
	}
}

// sliceAddr is the address of b's first byte.
func sliceAddr(b []byte) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(b))) }
