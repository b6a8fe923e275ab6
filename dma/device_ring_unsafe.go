package dma

import (
	"errors"
	"fmt"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// sharedRing is a device ring's queues as the device maps them. The client
// maps the same memory and may write any of it, so nothing read from it is
// trusted: the masks are the device's own, indices are masked before use,
// and a completion is recognised by its user_data only.
type sharedRing struct {
	fd             int
	features       uint32
	mem, sqeMem    []byte
	sqTail         *uint32
	cqHead, cqTail *uint32
	sqMask, cqMask uint32
	sqes           []ioUringSQE
	cqes           []ioUringCQE
	args           *ioArgs
	keepVA         bool // close covers the queues' addresses instead of unmapping them
}

// attach maps the queues of r.fd, whose layout is that of a ring made with
// deviceRingFlags and deviceRingEntries on this kernel: the device makes
// one to learn it (io_uring has no call that tells another ring's).
func (r *sharedRing) attach() error {
	r.args = new(ioArgs)
	p := &r.args.params
	*p = ioUringParams{Flags: deviceRingFlags}
	probe, err := ioUringSetup(deviceRingEntries, p)
	if err != nil {
		return fmt.Errorf("io_uring_setup of the layout probe: %w", err)
	}
	_ = unix.Close(probe) // our own empty ring, only its parameters were wanted
	if p.Features&ioringFeatSingleMmap == 0 || p.Features&ioringFeatExtArg == 0 {
		return fmt.Errorf("io_uring without SINGLE_MMAP or EXT_ARG: %w", unix.ENOTSUP)
	}
	r.features = p.Features
	size := int(p.CQOff.Cqes + p.CQEntries*uint32(sizeofCQE))
	if r.mem, err = unix.Mmap(r.fd, ioringOffSQRing, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return fmt.Errorf("mmap rings: %w", err)
	}
	if r.sqeMem, err = unix.Mmap(r.fd, ioringOffSQEs, int(p.SQEntries*uint32(sizeofSQE)),
		unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return fmt.Errorf("mmap SQEs: %w", err)
	}
	r.sqTail = u32At(r.mem, p.SQOff.Tail)
	r.cqHead = u32At(r.mem, p.CQOff.Head)
	r.cqTail = u32At(r.mem, p.CQOff.Tail)
	r.sqMask, r.cqMask = p.SQEntries-1, p.CQEntries-1
	r.sqes = unsafe.Slice((*ioUringSQE)(unsafe.Pointer(&r.sqeMem[0])), p.SQEntries)
	r.cqes = unsafe.Slice((*ioUringCQE)(unsafe.Pointer(&r.mem[p.CQOff.Cqes])), p.CQEntries)
	return nil
}

// run submits sqes (at most deviceRingEntries) and waits up to timeout for the completion of each,
// recognised by its user_data, whose results it puts into res. Completions
// with other user_data (the client's, or stale ones) are consumed and
// ignored.
func (r *sharedRing) run(sqes []ioUringSQE, res []int32, timeout time.Duration) error {
	tail := loadAcquire(r.sqTail)
	for i := range sqes {
		r.sqes[(tail+uint32(i))&r.sqMask] = sqes[i]
	}
	storeRelease(r.sqTail, tail+uint32(len(sqes)))
	deadline := time.Now().Add(timeout)
	toSubmit := uint32(len(sqes))
	var found uint32 // bit i: sqes[i] completed
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return fmt.Errorf("no completion in %v: %w", timeout, unix.ETIME)
		}
		a := r.args
		a.ts = kernelTimespec{Sec: int64(left / time.Second), Nsec: int64(left % time.Second)}
		a.getev = ioUringGeteventsArg{Ts: addrOf(&a.ts)}
		n, err := ioUringEnterArg(r.fd, toSubmit, 1, ioringEnterGetevents|ioringEnterExtArg, &a.getev)
		if n > 0 {
			toSubmit -= min(uint32(n), toSubmit)
		}
		switch {
		case err == nil, errors.Is(err, unix.EINTR), errors.Is(err, unix.ETIME):
		default:
			return fmt.Errorf("io_uring_enter: %w", err)
		}
		head, ctail := loadAcquire(r.cqHead), loadAcquire(r.cqTail)
		for ; head != ctail; head++ {
			c := r.cqes[head&r.cqMask]
			for i := range sqes {
				if found&(1<<i) == 0 && c.UserData == sqes[i].UserData {
					res[i], found = c.Res, found|1<<i
					break
				}
			}
		}
		storeRelease(r.cqHead, head)
		if found == 1<<len(sqes)-1 {
			return nil
		}
	}
}

// close unmaps the queues and closes the device's copy of the ring. With
// r.keepVA the queues' addresses are covered with PROT_NONE memory instead
// of unmapped, and stay taken (see OpenDeviceRing).
func (r *sharedRing) close() error {
	if r.keepVA && (r.sqeMem != nil || r.mem != nil) {
		keptRings.Add(1)
	}
	for _, m := range []*[]byte{&r.sqeMem, &r.mem} {
		if *m == nil {
			continue
		}
		if r.keepVA {
			// Replaces the mapping, which drops the ring's pages; a
			// failure leaves the mapping, and the ring with it.
			_, _, _ = unix.Syscall6(unix.SYS_MMAP, uintptr(unsafe.Pointer(unsafe.SliceData(*m))), uintptr(len(*m)), unix.PROT_NONE,
				unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE|unix.MAP_FIXED, ^uintptr(0), 0)
		} else {
			_ = unix.Munmap(*m) // our own mapping of the ring: a failure would be a bug
		}
		*m = nil
	}
	r.sqes, r.cqes, r.sqTail, r.cqHead, r.cqTail = nil, nil, nil, nil, nil
	if r.fd < 0 {
		return nil
	}
	err := unix.Close(r.fd)
	r.fd = -1
	if err != nil {
		return fmt.Errorf("dma: device ring: close: %w", err)
	}
	return nil
}
