package userfault

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// The userfaultfd source (fs/userfaultfd.c, non-cooperative mode). Ranges are
// registered in write-protect mode without ever write-protecting a page, so
// no fault needs servicing: only the events UNMAP, REMOVE, REMAP and FORK
// come. They are synchronous: the thread that unmaps waits in the kernel
// until the monitor has read the event, and no longer.

const (
	uffdAPI = 0xAA

	uffdFeaturePagefaultFlagWP = 1 << 0
	uffdFeatureEventFork       = 1 << 1
	uffdFeatureEventRemap      = 1 << 2
	uffdFeatureEventRemove     = 1 << 3
	uffdFeatureEventUnmap      = 1 << 6

	uffdEventFork   = 0x13
	uffdEventRemap  = 0x14
	uffdEventRemove = 0x15
	uffdEventUnmap  = 0x16

	uffdRegisterModeWP = 1 << 1

	uffdioAPI        = 0xC018AA3F // _IOWR(0xAA, 0x3F, struct uffdio_api)
	uffdioRegister   = 0xC020AA00 // _IOWR(0xAA, 0x00, struct uffdio_register)
	uffdioUnregister = 0x8010AA01 // _IOR(0xAA, 0x01, struct uffdio_range)

	uffdMsgSize = 32
	uffdBatch   = 64 // messages per read
)

const uffdWanted = uffdFeatureEventFork | uffdFeatureEventRemap | uffdFeatureEventRemove | uffdFeatureEventUnmap

type uffdSource struct {
	n        *Notifier
	fd       int // the userfaultfd, O_NONBLOCK
	wake     int // eventfd: tells the monitor to stop
	features uint64
	done     chan struct{}

	closeOnce sync.Once
	closeErr  error
	fdOnce    sync.Once
	dead      error // set under n.mu when the monitor stopped on its own
}

// closeFd closes the userfaultfd once. Closing it unregisters every range
// and wakes every thread still waiting on an event.
func (u *uffdSource) closeFd() (err error) {
	u.fdOnce.Do(func() { err = unix.Close(u.fd) })
	return err
}

func featureNames(f uint64) string {
	var out []string
	for _, x := range []struct {
		bit  uint64
		name string
	}{{uffdFeatureEventFork, "FORK"}, {uffdFeatureEventRemap, "REMAP"}, {uffdFeatureEventRemove, "REMOVE"},
		{uffdFeatureEventUnmap, "UNMAP"}, {uffdFeaturePagefaultFlagWP, "WP"}} {
		if f&x.bit != 0 {
			out = append(out, x.name)
		}
	}
	return strings.Join(out, "|")
}

// openUffd opens a userfaultfd through the syscall (not /dev/userfaultfd),
// without UFFD_USER_MODE_ONLY, and does the UFFDIO_API handshake.
func openUffd(features uint64) (fd int, got uint64, err error) {
	r, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK, 0, 0)
	if errno != 0 {
		if errno == unix.EPERM {
			return -1, 0, fmt.Errorf("userfaultfd: %w (needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1)", errno)
		}
		return -1, 0, fmt.Errorf("userfaultfd: %w", errno)
	}
	fd = int(r)
	got, err = uffdioAPICall(fd, features)
	if err != nil {
		_ = unix.Close(fd) // best effort: nothing registered on it, the handshake error is reported
		return -1, 0, fmt.Errorf("userfaultfd: UFFDIO_API: %w", err)
	}
	return fd, got, nil
}

func newUffd(n *Notifier) (*uffdSource, error) {
	// The handshake can be done once per fd: ask what the kernel offers on
	// a probe fd, then open the real one with what we need.
	probe, avail, err := openUffd(0)
	if err != nil {
		return nil, err
	}
	_ = unix.Close(probe) // only asked what the kernel offers: nothing registered on it
	if missing := uffdWanted &^ avail; missing != 0 {
		return nil, fmt.Errorf("userfaultfd: kernel lacks features %s: %w", featureNames(missing), unix.EOPNOTSUPP)
	}
	want := uint64(uffdWanted)
	if avail&uffdFeaturePagefaultFlagWP != 0 {
		want |= uffdFeaturePagefaultFlagWP
	}
	fd, got, err := openUffd(want)
	if err != nil {
		return nil, err
	}
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		_ = unix.Close(fd) // best effort: nothing registered yet, the eventfd error is reported
		return nil, fmt.Errorf("userfaultfd: eventfd: %w", err)
	}
	u := &uffdSource{n: n, fd: fd, wake: wake, features: got, done: make(chan struct{})}
	go u.monitor()
	return u, nil
}

func (u *uffdSource) kind() Source { return SourceUserfaultfd }

func (u *uffdSource) detail() string {
	return "features " + featureNames(u.features) + ", register mode WP"
}

func (u *uffdSource) watch(start, end uintptr, vmas pageRange) error {
	// Register whole VMAs: registering part of one splits it, and a split
	// VMA changes what the application sees (mremap of the whole mapping
	// fails with EFAULT). Registering a range already registered with this
	// uffd is allowed, so every Subscribe registers: the pages may belong to
	// a new mapping at an old address whose UNMAP is still on its way.
	if u.dead != nil {
		return u.dead
	}
	for try := 0; ; try++ {
		err := uffdioRangeCall(u.fd, uffdioRegister, vmas.start, vmas.end, uffdRegisterModeWP)
		if err == nil {
			return nil
		}
		if errors.Is(err, unix.EINVAL) && u.n.maps != nil && try < maxRewatch {
			// The extent was read before the call, and a neighbour whose
			// VMA had merged with the range's may since have been unmapped
			// and its addresses mapped again by what cannot be watched (a
			// file, an io_uring ring). Read the VMAs again: only the same
			// extent failing again is the range's own fault.
			fresh, cerr := u.n.maps.check(start, end)
			if cerr != nil {
				return cerr
			}
			if fresh != vmas {
				vmas = fresh
				continue
			}
		}
		switch {
		case errors.Is(err, unix.EBUSY):
			return fmt.Errorf("UFFDIO_REGISTER: range already registered with another userfaultfd: %w", err)
		case errors.Is(err, unix.EINVAL):
			return fmt.Errorf("UFFDIO_REGISTER: memory cannot be watched (only anonymous, shmem/memfd and hugetlb mappings can): %w", err)
		}
		return fmt.Errorf("UFFDIO_REGISTER: %w", err)
	}
}

// maxRewatch bounds how often watch reads the VMAs again after their
// extent changed under it: each retry needs another unmap and map beside
// the range by another thread.
const maxRewatch = 8

func (u *uffdSource) unwatch(pieces []pageRange) {
	if u.dead != nil {
		return
	}
	// Unregister whole VMAs that no subscription touches any more (see
	// watch). Best effort: a piece may be unmapped already (the VMA left
	// with its registration) or hold a new mapping that is not registered.
	for _, p := range pieces {
		vmas, err := u.n.maps.vmasOverlapping(p.start, p.end)
		if err != nil {
			continue
		}
		for _, v := range vmas {
			busy := false
			u.n.tree.overlap(v.start, v.end, func(*Subscription) { busy = true })
			if !busy {
				_ = uffdioRangeCall(u.fd, uffdioUnregister, v.start, v.end, 0)
			}
		}
	}
}

func (u *uffdSource) sync(ctx context.Context) error {
	// An event whose syscall returned has been read; wait for the read
	// window that read it to close, which posts it.
	return u.n.waitWindows(ctx)
}

func (u *uffdSource) close() error {
	u.closeOnce.Do(func() {
		var one [8]byte
		one[0] = 1
		if _, err := unix.Write(u.wake, one[:]); err != nil {
			u.closeErr = fmt.Errorf("wake monitor: %w", err)
		}
		<-u.done
		if err := u.closeFd(); err != nil && u.closeErr == nil {
			u.closeErr = fmt.Errorf("close userfaultfd: %w", err)
		}
		_ = unix.Close(u.wake) // the wakeup eventfd, already signalled and its reader gone
	})
	return u.closeErr
}

// monitor reads events on its own locked OS thread. It never touches watched
// memory: it reads messages into its own buffer and posts them. Between poll
// saying readable and the events being posted it holds a read window open
// (Notifier.inflight), because the read itself releases the unmapping
// threads.
func (u *uffdSource) monitor() {
	defer close(u.done)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	stopped := false
	defer func() {
		if stopped {
			return
		}
		// Stopped on its own (an error from poll or read): a userfaultfd
		// without a reader would hang every munmap of watched memory, so
		// close it now and report the source dead.
		u.n.mu.Lock()
		u.dead = fmt.Errorf("userfaultfd monitor stopped: %w", unix.EIO)
		// Closing is what releases the waiters; the source is reported
		// dead either way, and a close error would add nothing to that.
		_ = u.closeFd()
		u.n.markDead(SourceUserfaultfd, u.dead)
		u.n.mu.Unlock()
	}()
	buf := make([]byte, uffdMsgSize*uffdBatch)
	fds := []unix.PollFd{{Fd: int32(u.fd), Events: unix.POLLIN}, {Fd: int32(u.wake), Events: unix.POLLIN}}
	evs := make([]Event, 0, uffdBatch)
	for {
		fds[0].Revents, fds[1].Revents = 0, 0
		if _, err := unix.Poll(fds, -1); err != nil {
			if err == unix.EINTR {
				continue
			}
			return
		}
		if fds[1].Revents != 0 {
			stopped = true
			return
		}
		if fds[0].Revents&(unix.POLLERR|unix.POLLHUP|unix.POLLNVAL) != 0 && fds[0].Revents&unix.POLLIN == 0 {
			return
		}
		gen := u.n.openWindow()
		nr, err := unix.Read(u.fd, buf)
		evs = evs[:0]
		if err == nil {
			for off := 0; off+uffdMsgSize <= nr; off += uffdMsgSize {
				if ev, ok := u.parse(buf[off : off+uffdMsgSize]); ok {
					evs = append(evs, ev)
				}
			}
		}
		u.n.closeWindow(gen, evs)
		if err != nil && err != unix.EAGAIN && err != unix.EINTR {
			return
		}
	}
}

func (u *uffdSource) parse(m []byte) (Event, bool) {
	arg := func(i int) uintptr { return uintptr(binary.LittleEndian.Uint64(m[8+8*i:])) }
	switch m[0] {
	case uffdEventUnmap:
		return Event{Kind: EventUnmap, Start: arg(0), End: arg(1), Source: SourceUserfaultfd}, true
	case uffdEventRemove:
		return Event{Kind: EventRemove, Start: arg(0), End: arg(1), Source: SourceUserfaultfd}, true
	case uffdEventRemap:
		from, to, l := arg(0), arg(1), arg(2)
		return Event{Kind: EventRemap, Start: from, End: from + l, To: to, Source: SourceUserfaultfd}, true
	case uffdEventFork:
		// The child's userfaultfd: close it so that the child never waits
		// on a reader (its ranges lose their registration).
		_ = unix.Close(int(binary.LittleEndian.Uint32(m[8:]))) // the kernel's new fd for us: nothing to flush
		return Event{Kind: EventFork, Start: 0, End: ^uintptr(0), Source: SourceUserfaultfd}, true
	}
	return Event{}, false
}
