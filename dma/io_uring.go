package dma

import (
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// io_uring ABI (include/uapi/linux/io_uring.h), only what the Pinner and
// the device rings use.
const (
	ioringSetupRDisabled = 1 << 6
	ioringSetupNoSQArray = 1 << 16

	ioringRegisterFiles        = 2
	ioringRegisterRestrictions = 11
	ioringRegisterEnableRings  = 12
	ioringRegisterCloneBuffers = 30

	ioringRestrictionRegisterOp       = 0
	ioringRestrictionSQEOp            = 1
	ioringRestrictionSQEFlagsAllowed  = 2
	ioringRestrictionSQEFlagsRequired = 3

	iosqeFixedFile = 1 << 0

	ioringRegisterDstReplace = 1 << 1 // io_uring_clone_buffers.flags

	ioringSetupClamp       = 1 << 4
	ioringSetupSubmitAll   = 1 << 7
	ioringSetupCoopTaskrun = 1 << 8

	ioringFeatSingleMmap = 1 << 0
	ioringFeatNodrop     = 1 << 1
	ioringFeatExtArg     = 1 << 8
	ioringFeatRsrcTags   = 1 << 10

	ioringEnterGetevents = 1 << 0
	ioringEnterExtArg    = 1 << 3

	ioringOpReadFixed  = 4
	ioringOpWriteFixed = 5

	ioringUnregisterBuffers     = 1
	ioringRegisterBuffers2      = 15
	ioringRegisterFilesUpdate2  = 14
	ioringRegisterBuffersUpdate = 16

	ioringRsrcRegisterSparse = 1 << 0

	ioringOffSQRing = 0
	ioringOffCQRing = 0x8000000
	ioringOffSQEs   = 0x10000000

	// ioringMaxRegBuffers is the kernel's limit on the fixed-buffer table
	// (IORING_MAX_REG_BUFFERS); one registered buffer is at most 1 GiB.
	ioringMaxRegBuffers = 1 << 14
	ioringMaxBufferSize = 1 << 30
)

// ioSqringOffsets mirrors struct io_sqring_offsets.
type ioSqringOffsets struct {
	Head, Tail, RingMask, RingEntries, Flags, Dropped, Array, Resv1 uint32
	UserAddr                                                        uint64
}

// ioCqringOffsets mirrors struct io_cqring_offsets.
type ioCqringOffsets struct {
	Head, Tail, RingMask, RingEntries, Overflow, Cqes, Flags, Resv1 uint32
	UserAddr                                                        uint64
}

// ioUringParams mirrors struct io_uring_params (120 bytes).
type ioUringParams struct {
	SQEntries, CQEntries, Flags, SQThreadCPU, SQThreadIdle, Features, WQFd uint32
	Resv                                                                   [3]uint32
	SQOff                                                                  ioSqringOffsets
	CQOff                                                                  ioCqringOffsets
}

// ioUringSQE mirrors struct io_uring_sqe (64 bytes) for read/write requests.
type ioUringSQE struct {
	Opcode      uint8
	Flags       uint8
	Ioprio      uint16
	Fd          int32
	Off         uint64
	Addr        uint64
	Len         uint32
	RWFlags     uint32
	UserData    uint64
	BufIndex    uint16
	Personality uint16
	SpliceFdIn  int32
	Addr3       uint64
	Pad         uint64
}

// ioUringCQE mirrors struct io_uring_cqe (16 bytes).
type ioUringCQE struct {
	UserData uint64
	Res      int32
	Flags    uint32
}

// ioUringRsrcRegister mirrors struct io_uring_rsrc_register.
type ioUringRsrcRegister struct {
	Nr, Flags uint32
	Resv2     uint64
	Data      uint64
	Tags      uint64
}

// ioUringRsrcUpdate2 mirrors struct io_uring_rsrc_update2.
type ioUringRsrcUpdate2 struct {
	Offset, Resv uint32
	Data         uint64
	Tags         uint64
	Nr, Resv2    uint32
}

// ioUringGeteventsArg mirrors struct io_uring_getevents_arg.
type ioUringGeteventsArg struct {
	Sigmask     uint64
	SigmaskSz   uint32
	MinWaitUsec uint32
	Ts          uint64
}

// ioIovec mirrors struct iovec.
type ioIovec struct {
	Base uint64
	Len  uint64
}

// kernelTimespec mirrors struct __kernel_timespec.
type kernelTimespec struct {
	Sec, Nsec int64
}

// ioArgs holds the arguments the ring passes to the kernel by pointer. It
// lives in the heap-allocated ring so its address is stable during a system
// call; the ring's owner serialises its use.
type ioArgs struct {
	params ioUringParams
	reg    ioUringRsrcRegister
	upd    ioUringRsrcUpdate2
	iov    ioIovec
	tag    uint64
	getev  ioUringGeteventsArg
	ts     kernelTimespec
}

// ring is one io_uring instance with its mapped queues. It is not safe for
// concurrent use: the Pinner holds its mutex around every call.
type ring struct {
	fd       int
	features uint32
	sqMem    []byte // SQ ring (and CQ ring with IORING_FEAT_SINGLE_MMAP)
	cqMem    []byte // CQ ring when mapped separately, else nil
	sqeMem   []byte

	sqHead, sqTail, sqMask, sqDropped  *uint32
	sqArray                            []uint32
	sqes                               []ioUringSQE
	cqHead, cqTail, cqMask, cqOverflow *uint32
	cqes                               []ioUringCQE

	args *ioArgs
}

// newRing sets up an io_uring with entries submission slots.
func newRing(entries uint32) (*ring, error) {
	r := &ring{fd: -1, args: new(ioArgs)}
	p := &r.args.params
	*p = ioUringParams{Flags: ioringSetupClamp | ioringSetupSubmitAll | ioringSetupCoopTaskrun}
	fd, err := ioUringSetup(entries, p)
	if errors.Is(err, unix.EINVAL) {
		// Kernels before 5.19 lack COOP_TASKRUN/SUBMIT_ALL.
		*p = ioUringParams{Flags: ioringSetupClamp}
		fd, err = ioUringSetup(entries, p)
	}
	if err != nil {
		return nil, fmt.Errorf("dma: io_uring_setup: %w", err)
	}
	r.fd = fd
	r.features = p.Features
	if p.Features&ioringFeatNodrop == 0 {
		_ = r.close() // best effort: nothing registered yet, the kernel's refusal is the error
		return nil, fmt.Errorf("dma: io_uring without IORING_FEAT_NODROP (kernel too old): %w", unix.ENOSYS)
	}
	if err := r.mapRings(p); err != nil {
		_ = r.close() // best effort: nothing registered yet, the mmap failure is the error
		return nil, fmt.Errorf("dma: io_uring mmap: %w", err)
	}
	for i := range r.sqArray {
		r.sqArray[i] = uint32(i)
	}
	return r, nil
}

// close releases the rings and the io_uring file. Closing the file makes the
// kernel drop whatever is still registered.
func (r *ring) close() error {
	r.unmapRings()
	if r.fd < 0 {
		return nil
	}
	err := unix.Close(r.fd)
	r.fd = -1
	if err != nil {
		return fmt.Errorf("dma: close io_uring: %w", err)
	}
	return nil
}

// sqSpace returns how many SQEs can be queued now.
func (r *ring) sqSpace() int {
	return len(r.sqes) - int(r.sqTailLocal()-loadAcquire(r.sqHead))
}

// queue copies sqe into the next submission slot and publishes it; the
// kernel sees it at the next io_uring_enter. The caller checked sqSpace.
func (r *ring) queue(sqe *ioUringSQE) {
	tail := r.sqTailLocal()
	r.sqes[tail&*r.sqMask] = *sqe
	storeRelease(r.sqTail, tail+1)
}

func (r *ring) sqTailLocal() uint32 { return *r.sqTail } // only we write it

// submitAndWait submits toSubmit queued SQEs and waits until at least
// minComplete CQEs are available or timeout passes (0: no timeout, only
// when the kernel lacks IORING_FEAT_EXT_ARG). EINTR is retried.
func (r *ring) submitAndWait(toSubmit, minComplete uint32, timeout time.Duration) error {
	for {
		var err error
		if timeout > 0 && r.features&ioringFeatExtArg != 0 {
			a := r.args
			a.ts = kernelTimespec{Sec: int64(timeout / time.Second), Nsec: int64(timeout % time.Second)}
			a.getev = ioUringGeteventsArg{Ts: addrOf(&a.ts)}
			var n int
			n, err = ioUringEnterArg(r.fd, toSubmit, minComplete, ioringEnterGetevents|ioringEnterExtArg, &a.getev)
			toSubmit -= uint32(max(n, 0))
		} else {
			var n int
			n, err = ioUringEnter(r.fd, toSubmit, minComplete, ioringEnterGetevents)
			toSubmit -= uint32(max(n, 0))
		}
		switch {
		case err == nil:
			if toSubmit == 0 {
				return nil
			}
		case errors.Is(err, unix.EINTR):
		case errors.Is(err, unix.ETIME):
			if toSubmit == 0 {
				return fmt.Errorf("dma: io_uring_enter: waiting %v: %w", timeout, unix.ETIME)
			}
		default:
			return fmt.Errorf("dma: io_uring_enter: %w", err)
		}
	}
}

// reap calls fn for every CQE available and consumes them.
func (r *ring) reap(fn func(cqe ioUringCQE)) {
	head := *r.cqHead // only we write it
	tail := loadAcquire(r.cqTail)
	for ; head != tail; head++ {
		fn(r.cqes[head&*r.cqMask])
	}
	storeRelease(r.cqHead, head)
}

// registerSparseBuffers creates an empty fixed-buffer table of n slots.
func (r *ring) registerSparseBuffers(n uint32) error {
	r.args.reg = ioUringRsrcRegister{Nr: n, Flags: ioringRsrcRegisterSparse}
	_, err := ioUringRegister(r.fd, ioringRegisterBuffers2, addrOf(&r.args.reg), uint32(sizeofRsrcRegister))
	if err != nil {
		return fmt.Errorf("dma: IORING_REGISTER_BUFFERS2 sparse %d: %w", n, err)
	}
	return nil
}

// updateBuffer puts [base, base+length) into slot with tag (0 = none), or
// empties the slot when length is 0. The kernel pins the pages of a new
// buffer (FOLL_LONGTERM) before returning and releases the old one's once no
// request uses it, posting a CQE with its tag.
func (r *ring) updateBuffer(slot uint32, base uintptr, length int, tag uint64) error {
	a := r.args
	a.iov = ioIovec{Base: uint64(base), Len: uint64(length)}
	a.tag = tag
	a.upd = ioUringRsrcUpdate2{Offset: slot, Data: addrOf(&a.iov), Tags: addrOf(&a.tag), Nr: 1}
	n, err := ioUringRegister(r.fd, ioringRegisterBuffersUpdate, addrOf(&a.upd), uint32(sizeofRsrcUpdate2))
	if err != nil {
		return fmt.Errorf("dma: IORING_REGISTER_BUFFERS_UPDATE slot %d: %w", slot, err)
	}
	if n != 1 {
		return fmt.Errorf("dma: IORING_REGISTER_BUFFERS_UPDATE slot %d: updated %d: %w", slot, n, unix.EIO)
	}
	return nil
}

// unregisterBuffers drops the whole fixed-buffer table.
func (r *ring) unregisterBuffers() error {
	if _, err := ioUringRegister(r.fd, ioringUnregisterBuffers, 0, 0); err != nil {
		return fmt.Errorf("dma: IORING_UNREGISTER_BUFFERS: %w", err)
	}
	return nil
}
