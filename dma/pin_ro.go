package dma

import (
	"errors"
	"fmt"
	"sync"

	"golang.org/x/sys/unix"
)

// Read-only pins: page references held by pipes.
//
// io_uring registers a fixed buffer for writing whatever the requests will do
// with it (FOLL_WRITE | FOLL_LONGTERM), so it refuses memory the process maps
// without PROT_WRITE. PinReadOnly holds such memory the other way the kernel
// lets a process hold pages: vmsplice(2) without SPLICE_F_GIFT puts a
// reference to each page of the range into a pipe (a GUP without FOLL_WRITE:
// read-only memory is fine, nothing is copied, the application's mapping is
// not touched). The pin keeps the read ends of those pipes; the pages they
// reference are the pages that were mapped at the time of the pin, whatever
// the application maps at the address later. A device read is served by
// tee(2), which duplicates the references into a bounce pipe, a splice(2) of
// the bytes before the offset into /dev/null (which drops those references)
// and a read(2) of the rest: one copy. A device write is refused.
//
// A pipe can only be read from its head, so a read at an offset pays for
// duplicating and dropping the references before it (about 60 ns a page,
// measured): the range is split into segments of ReadOnlySegment bytes, one
// pipe each, which bounds that cost at a segment and costs one descriptor per
// segment. docs/pinning.md, "Read-only memory", has the figures and what the
// references do not promise that a kernel FOLL_PIN does.

const (
	// DefaultReadOnlySegment is the default ReadOnlySegment: 16 pages, a
	// pipe's default capacity, so no F_SETPIPE_SZ is needed.
	DefaultReadOnlySegment = 64 << 10
	// MaxReadOnlySegment bounds ReadOnlySegment, as MaxPinSize bounds a
	// pin. A segment past fs.pipe-max-size (1 MiB by default) needs
	// CAP_SYS_RESOURCE.
	MaxReadOnlySegment = MaxPinSize
)

// roPin is the state of a read-only pin: the pipes holding its pages and the
// bounce pipe its reads go through, created at the first read. mu serialises
// the reads of the pin and its release.
type roPin struct {
	seg  int // bytes per segment (the last may hold less)
	null int // the Pinner's /dev/null, open while the pin is

	mu      sync.Mutex
	segs    []int // read ends, one per segment; the write ends are closed
	bounceR int   // -1 until the first read
	bounceW int
	// The bounce may hold the rest of a segment after a read in order:
	// held bytes of the pin from offset cur. last is where the last read
	// ended (-1: none).
	cur, held, last int
	gone            bool
	byClose         bool
}

// ReadOnly reports whether the pin is a read-only pin (PinReadOnly).
func (pin *Pin) ReadOnly() bool { return pin.ro != nil }

// PinReadOnly holds the pages of [vaddr, vaddr+length) for device reads, for
// memory that Pin refuses because the process maps it without PROT_WRITE (it
// works on writable memory too, but Pin is the pin to use there). vaddr and
// length must be page-aligned, length at most MaxPinSize (else EINVAL). The
// pages are charged to the Accountant first (ENOMEM past RLIMIT_MEMLOCK);
// the kernel faults them in for reading and fails with EFAULT when part of
// the range is not mapped or not readable. Running out of file descriptors
// or of pipe quota (pipe-user-pages-soft, for a user without
// CAP_SYS_RESOURCE) is an error wrapping ENOMEM.
//
// The pin's ReadAt reads the pages held at the time of the pin; its WriteAt
// fails with EFAULT and writes nothing. Unpin releases the pages at once.
// The rules of Pin about Go heap memory apply.
func (p *Pinner) PinReadOnly(vaddr uintptr, length int) (*Pin, error) {
	if vaddr%uintptr(pageSize) != 0 || length <= 0 || length%pageSize != 0 ||
		length > MaxPinSize || vaddr+uintptr(length) < vaddr {
		return nil, fmt.Errorf("dma: read-only pin %#x+%#x: unaligned, empty or too large: %w", vaddr, length, unix.EINVAL)
	}
	if err := p.roReady(); err != nil {
		return nil, fmt.Errorf("dma: read-only pin %#x+%#x: %w", vaddr, length, err)
	}
	npages := length / pageSize
	if err := p.acct.Charge(npages); err != nil {
		return nil, fmt.Errorf("dma: read-only pin %#x+%#x: %w", vaddr, length, err)
	}
	ro := &roPin{seg: p.roSeg, bounceR: -1, bounceW: -1, last: -1}
	for off := 0; off < length; off += ro.seg {
		fd, err := spliceSegment(vaddr+uintptr(off), min(ro.seg, length-off))
		if err != nil {
			p.acct.Uncharge(npages)
			return nil, errors.Join(fmt.Errorf("dma: read-only pin %#x+%#x: %w", vaddr, length, err), ro.releaseLocked())
		}
		ro.segs = append(ro.segs, fd)
	}
	pin := &Pin{p: p, vaddr: vaddr, length: length, ro: ro}
	p.roMu.Lock()
	defer p.roMu.Unlock()
	if p.roClosed {
		p.acct.Uncharge(npages)
		return nil, errors.Join(fmt.Errorf("dma: read-only pin %#x+%#x: %w", vaddr, length, ErrClosed), ro.releaseLocked())
	}
	ro.null = p.null
	p.roPins[pin] = struct{}{}
	return pin, nil
}

// roReady opens /dev/null, where reads drop the bytes before their offset,
// at the first read-only pin.
func (p *Pinner) roReady() error {
	p.roMu.Lock()
	defer p.roMu.Unlock()
	if p.roClosed {
		return ErrClosed
	}
	if p.null >= 0 {
		return nil
	}
	fd, err := unix.Open("/dev/null", unix.O_WRONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open /dev/null: %w", err)
	}
	p.null = fd
	return nil
}

// spliceSegment references the n bytes of pages at vaddr from a new pipe and
// returns its read end.
func spliceSegment(vaddr uintptr, n int) (int, error) {
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return -1, pipeErr(err)
	}
	err := fillSegment(fds[1], vaddr, n)
	if cerr := unix.Close(fds[1]); cerr != nil && err == nil {
		err = fmt.Errorf("close pipe: %w", cerr)
	}
	if err != nil {
		_ = unix.Close(fds[0]) // best effort after the failure reported: closing drops what it holds
		return -1, err
	}
	return fds[0], nil
}

// fillSegment vmsplices [vaddr, vaddr+n) into the empty pipe w, growing the
// pipe to n bytes if it holds less.
func fillSegment(w int, vaddr uintptr, n int) error {
	if n > DefaultReadOnlySegment {
		if _, err := unix.FcntlInt(uintptr(w), unix.F_SETPIPE_SZ, n); err != nil {
			return pipeErr(fmt.Errorf("F_SETPIPE_SZ %d: %w", n, err))
		}
	}
	grown := n > DefaultReadOnlySegment
	for done := 0; done < n; {
		got, err := vmspliceRange(w, vaddr+uintptr(done), n-done)
		switch {
		case err == unix.EINTR:
		case err == unix.EAGAIN && !grown:
			// A pipe of fewer slots than pages: the user is over
			// pipe-user-pages-soft, where new pipes get 2 slots.
			grown = true
			if _, err := unix.FcntlInt(uintptr(w), unix.F_SETPIPE_SZ, n); err != nil {
				return pipeErr(fmt.Errorf("F_SETPIPE_SZ %d: %w", n, err))
			}
		case err == unix.EAGAIN:
			return fmt.Errorf("vmsplice: pipe full after %d of %d bytes: %w", done, n, unix.ENOMEM)
		case err != nil:
			return fmt.Errorf("vmsplice %#x+%#x: %w", vaddr+uintptr(done), n-done, err)
		case got == 0:
			return fmt.Errorf("vmsplice %#x+%#x took nothing: %w", vaddr+uintptr(done), n-done, unix.EFAULT)
		default:
			done += got
		}
	}
	return nil
}

// pipeErr makes running out of descriptors or pipe quota an ENOMEM, the
// errno of a pin over the limit (the driver evicts and tries again).
func pipeErr(err error) error {
	if errors.Is(err, unix.EMFILE) || errors.Is(err, unix.ENFILE) || errors.Is(err, unix.EPERM) {
		return fmt.Errorf("%w: %w", err, unix.ENOMEM)
	}
	return err
}

// releaseLocked closes the pin's pipes, which drops its page references.
func (ro *roPin) releaseLocked() error {
	var errs []error
	for _, fd := range ro.segs {
		if err := unix.Close(fd); err != nil {
			errs = append(errs, fmt.Errorf("close segment pipe: %w", err))
		}
	}
	ro.segs = nil
	errs = append(errs, ro.dropBounceLocked())
	return errors.Join(errs...)
}

// dropBounceLocked closes the bounce pipe.
func (ro *roPin) dropBounceLocked() error {
	if ro.bounceR < 0 {
		return nil
	}
	err := errors.Join(unix.Close(ro.bounceR), unix.Close(ro.bounceW))
	ro.bounceR, ro.bounceW, ro.held, ro.last = -1, -1, 0, -1
	if err != nil {
		return fmt.Errorf("close bounce pipe: %w", err)
	}
	return nil
}

// unpinRO releases a read-only pin.
func (pin *Pin) unpinRO() error {
	ro, p := pin.ro, pin.p
	ro.mu.Lock()
	if ro.gone {
		byClose := ro.byClose
		ro.mu.Unlock()
		if byClose {
			return nil
		}
		return fmt.Errorf("dma: unpin read-only %#x+%#x: not pinned: %w", pin.vaddr, pin.length, unix.EINVAL)
	}
	ro.gone = true
	err := ro.releaseLocked()
	ro.mu.Unlock()
	p.roMu.Lock()
	delete(p.roPins, pin)
	p.roMu.Unlock()
	// Closing the last descriptor of a pipe drops its references at
	// once: nothing of the pin is held any more, even if a close failed
	// (the descriptor is gone either way on Linux).
	p.acct.Uncharge(pin.Pages())
	if err != nil {
		return fmt.Errorf("dma: unpin read-only %#x+%#x: %w", pin.vaddr, pin.length, err)
	}
	return nil
}

// closeRO releases every read-only pin and /dev/null (Pinner.Close).
func (p *Pinner) closeRO() error {
	p.roMu.Lock()
	p.roClosed = true
	pins := make([]*Pin, 0, len(p.roPins))
	for pin := range p.roPins {
		pins = append(pins, pin)
	}
	clear(p.roPins)
	null := p.null
	p.null = -1
	p.roMu.Unlock()
	var errs []error
	for _, pin := range pins {
		ro := pin.ro
		ro.mu.Lock()
		if !ro.gone {
			ro.gone, ro.byClose = true, true
			errs = append(errs, ro.releaseLocked())
			p.acct.Uncharge(pin.Pages())
		}
		ro.mu.Unlock()
	}
	if null >= 0 {
		if err := unix.Close(null); err != nil {
			errs = append(errs, fmt.Errorf("dma: close /dev/null: %w", err))
		}
	}
	return errors.Join(errs...)
}

// readRO copies len(b) bytes of the held pages at off into b.
func (pin *Pin) readRO(b []byte, off int64) (int, error) {
	if off < 0 || off > int64(pin.length) || int64(len(b)) > int64(pin.length)-off {
		return 0, fmt.Errorf("dma: read %d bytes at %d of a %d-byte read-only pin: %w", len(b), off, pin.length, unix.EFAULT)
	}
	ro := pin.ro
	ro.mu.Lock()
	defer ro.mu.Unlock()
	if ro.gone {
		if ro.byClose {
			return 0, fmt.Errorf("dma: read read-only pin %#x: %w", pin.vaddr, ErrClosed)
		}
		return 0, fmt.Errorf("dma: read read-only pin %#x: unpinned: %w", pin.vaddr, unix.EINVAL)
	}
	if len(b) == 0 {
		return 0, nil
	}
	if ro.bounceR < 0 {
		if err := ro.newBounceLocked(); err != nil {
			return 0, fmt.Errorf("dma: read read-only pin %#x: %w", pin.vaddr, err)
		}
	}
	n := 0
	for n < len(b) {
		pos := int(off) + n
		c := min(len(b)-n, ro.seg-pos%ro.seg)
		if err := ro.readSegLocked(pin.length, pos, b[n:n+c]); err != nil {
			// The bounce may hold references: close it (the next
			// read makes a new one).
			return n, errors.Join(fmt.Errorf("dma: read %d bytes at %d of read-only pin %#x: %w", c, pos, pin.vaddr, err), ro.dropBounceLocked())
		}
		n += c
	}
	return n, nil
}

// newBounceLocked makes the bounce pipe, as large as a segment.
func (ro *roPin) newBounceLocked() error {
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return fmt.Errorf("bounce pipe: %w", pipeErr(err))
	}
	ro.bounceR, ro.bounceW = fds[0], fds[1]
	if got, err := unix.FcntlInt(uintptr(fds[1]), unix.F_GETPIPE_SZ, 0); err != nil || got < ro.seg {
		if _, err := unix.FcntlInt(uintptr(fds[1]), unix.F_SETPIPE_SZ, ro.seg); err != nil {
			return errors.Join(fmt.Errorf("bounce pipe: F_SETPIPE_SZ %d: %w", ro.seg, pipeErr(err)), ro.dropBounceLocked())
		}
	}
	return nil
}

// readSegLocked reads len(b) bytes of the pin at pos, all in one segment.
// When the bounce holds the pin's bytes from pos (the rest of the segment,
// left by the read before), they are read from it. Else the bounce is
// emptied, the segment's bytes up to the end of the read are duplicated
// into it with tee (up to the end of the segment when the read continues
// the last one: the next read in order finds them there), those before pos
// are dropped into /dev/null and len(b) are read.
func (ro *roPin) readSegLocked(length, pos int, b []byte) error {
	if ro.held > 0 && ro.cur == pos {
		if err := pipeRead(ro.bounceR, b); err != nil {
			return err
		}
		ro.cur, ro.held, ro.last = pos+len(b), ro.held-len(b), pos+len(b)
		return nil
	}
	if ro.held > 0 {
		if err := spliceNull(ro.bounceR, ro.null, ro.held); err != nil {
			return err
		}
		ro.held = 0
	}
	s, in := pos/ro.seg, pos%ro.seg
	want := in + len(b)
	if ro.last == pos {
		want = min(ro.seg, length-s*ro.seg)
	}
	for {
		got, err := unix.Tee(ro.segs[s], ro.bounceW, want, unix.SPLICE_F_NONBLOCK)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("tee: %w", err)
		}
		if int(got) != want {
			// tee starts at the head every time: a short one cannot
			// be continued.
			return fmt.Errorf("tee moved %d of %d bytes: %w", got, want, unix.EIO)
		}
		break
	}
	if err := spliceNull(ro.bounceR, ro.null, in); err != nil {
		return err
	}
	if err := pipeRead(ro.bounceR, b); err != nil {
		return err
	}
	ro.cur, ro.held, ro.last = pos+len(b), want-in-len(b), pos+len(b)
	return nil
}

// spliceNull drops the first n bytes of pipe r into /dev/null.
func spliceNull(r, null, n int) error {
	for n > 0 {
		got, err := unix.Splice(r, nil, null, nil, n, unix.SPLICE_F_NONBLOCK)
		switch {
		case err == unix.EINTR:
		case err != nil:
			return fmt.Errorf("splice to /dev/null: %w", err)
		case got == 0:
			return fmt.Errorf("splice to /dev/null moved nothing: %w", unix.EIO)
		default:
			n -= int(got)
		}
	}
	return nil
}
