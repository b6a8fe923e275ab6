package dma

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// ErrClosed is returned by a Pinner, or a Pin of it, used after Close.
var ErrClosed = errors.New("dma: pinner closed")

const (
	// DefaultMaxPins is the default size of the fixed-buffer table.
	DefaultMaxPins = 4096
	// DefaultScratchSize is the default capacity of the bounce pipe that
	// ReadAt and WriteAt move data through, and so their chunk size (the
	// default fs.pipe-max-size).
	DefaultScratchSize = 1 << 20
	// MaxPinSize is the largest single pin: io_uring registers at most
	// 1 GiB per fixed buffer.
	MaxPinSize = ioringMaxBufferSize

	ringEntries = 8
	// fileBounceMin is the read size from which ReadAt bounces through
	// the memfd rather than the pipe: the measured crossover (pipe 5.3
	// GB/s vs memfd 3.9 GB/s at 128 KiB, even at 256 KiB).
	fileBounceMin = 256 << 10
	// tagBit marks CQE user_data values that are fixed-buffer release
	// tags rather than request ids.
	tagBit = 1 << 63

	opTimeout      = 10 * time.Second
	releaseTimeout = time.Second
)

// PinnerOptions tunes a Pinner; the zero value means defaults.
type PinnerOptions struct {
	// MaxPins is the number of pins that can be held at once (the
	// fixed-buffer table size), at most 16384. Default DefaultMaxPins.
	MaxPins int
	// ScratchSize is the capacity asked for the bounce pipe, a multiple of
	// the page size, and so the chunk size of ReadAt and WriteAt. The
	// kernel may grant less (fs.pipe-max-size, pipe-user-pages-soft).
	// Default DefaultScratchSize.
	ScratchSize int
	// ReadOnlySegment is the size of the pipes of a read-only pin
	// (PinReadOnly), a multiple of the page size up to
	// MaxReadOnlySegment: a read pays for the pages of its segment before
	// its offset, a pin for one pipe per segment. Above 64 KiB it needs
	// F_SETPIPE_SZ, which past fs.pipe-max-size needs CAP_SYS_RESOURCE.
	// Default DefaultReadOnlySegment.
	ReadOnlySegment int
}

// Pinner holds long-term pins of process memory with io_uring fixed buffers
// and moves bytes between Go slices and the pinned pages.
//
// Registering a fixed buffer makes the kernel pin its pages with
// FOLL_LONGTERM (faulting them in first) and keep them until the buffer is
// removed from the table: the pages stay the memory they were even when the
// application unmaps the range or maps something else over it. READ_FIXED
// and WRITE_FIXED requests address the buffer by table slot, and the kernel
// uses the virtual address only as an offset into it, so a Pin reads and
// writes the pinned pages, never whatever is mapped at the address now.
//
// The io_uring instance is set up at the first Pin; when io_uring is
// unavailable (kernel without it, or the io_uring_disabled sysctl) Pin fails
// with an error wrapping unix.ENOSYS or unix.EPERM.
//
// A Pinner is safe for concurrent use; one mutex serialises the ring and its
// bounce buffer. Read-only pins (PinReadOnly) use no ring: each has a lock
// and a bounce pipe of its own.
type Pinner struct {
	acct        *Accountant
	maxPins     int
	scratchSize int
	newRing     func(entries uint32) (*ring, error) // tests replace it
	fileMin     int                                 // fileBounceMin; tests change it

	mu       sync.Mutex
	r        *ring
	setupErr error
	broken   error // a request timed out or the pipe is out of step: unusable
	closed   bool
	pipeR    int    // bounce pipe: READ_FIXED reads from pipeR,
	pipeW    int    // WRITE_FIXED writes to pipeW
	chunk    int    // bytes the pipe holds: the most one request moves
	fileFd   int    // bounce memfd for large reads
	fileMap  []byte // its shared mapping
	free     []uint32
	pins     map[uint32]*Pin
	pending  map[uint64]int // release tag -> pages still charged
	nextTag  uint64
	nextID   uint64
	done     map[uint64]int32 // request id -> result, reaped but not yet claimed

	// Read-only pins (pin_ro.go), which need no ring.
	roSeg    int
	roMu     sync.Mutex
	roPins   map[*Pin]struct{}
	roClosed bool
	null     int // /dev/null, opened at the first read-only pin
}

// NewPinner returns a Pinner charging acct. It does not touch io_uring yet.
func NewPinner(acct *Accountant, opts *PinnerOptions) (*Pinner, error) {
	if acct == nil {
		return nil, fmt.Errorf("dma: pinner without accountant: %w", unix.EINVAL)
	}
	var o PinnerOptions
	if opts != nil {
		o = *opts
	}
	if o.MaxPins == 0 {
		o.MaxPins = DefaultMaxPins
	}
	if o.ScratchSize == 0 {
		o.ScratchSize = DefaultScratchSize
	}
	if o.MaxPins < 1 || o.MaxPins > ioringMaxRegBuffers {
		return nil, fmt.Errorf("dma: MaxPins %d not in [1, %d]: %w", o.MaxPins, ioringMaxRegBuffers, unix.EINVAL)
	}
	if o.ReadOnlySegment == 0 {
		o.ReadOnlySegment = DefaultReadOnlySegment
	}
	if o.ScratchSize < pageSize || o.ScratchSize%pageSize != 0 || o.ScratchSize > 1<<30 {
		return nil, fmt.Errorf("dma: ScratchSize %d: %w", o.ScratchSize, unix.EINVAL)
	}
	if o.ReadOnlySegment < pageSize || o.ReadOnlySegment%pageSize != 0 || o.ReadOnlySegment > MaxReadOnlySegment {
		return nil, fmt.Errorf("dma: ReadOnlySegment %d: %w", o.ReadOnlySegment, unix.EINVAL)
	}
	return &Pinner{
		acct:        acct,
		maxPins:     o.MaxPins,
		scratchSize: o.ScratchSize,
		newRing:     newRing,
		fileMin:     fileBounceMin,
		pipeR:       -1,
		pipeW:       -1,
		fileFd:      -1,
		pins:        map[uint32]*Pin{},
		pending:     map[uint64]int{},
		done:        map[uint64]int32{},
		roSeg:       o.ReadOnlySegment,
		roPins:      map[*Pin]struct{}{},
		null:        -1,
	}, nil
}

// Available sets up io_uring if needed and reports why pinning cannot work,
// or nil.
func (p *Pinner) Available() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.setupLocked()
}

func (p *Pinner) setupLocked() error {
	if p.closed {
		return ErrClosed
	}
	if p.broken != nil {
		return p.broken
	}
	if p.r != nil || p.setupErr != nil {
		return p.setupErr
	}
	p.setupErr = p.setup()
	return p.setupErr
}

func (p *Pinner) setup() error {
	r, err := p.newRing(ringEntries)
	if err != nil {
		return err
	}
	if err := r.registerSparseBuffers(uint32(p.maxPins)); err != nil {
		_ = r.close() // best effort after the failure reported; closing drops whatever was registered
		return err
	}
	// The bounce is a pipe rather than a memfd: pipes support non-blocking
	// I/O, so the kernel runs READ_FIXED/WRITE_FIXED inline; shmem files
	// do not, and every request would be handed to an io-wq thread.
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		_ = r.close() // best effort after the failure reported
		return fmt.Errorf("dma: pipe2: %w", err)
	}
	chunk, err := unix.FcntlInt(uintptr(fds[1]), unix.F_SETPIPE_SZ, p.scratchSize)
	if err != nil {
		// Over the user's pipe quota or fs.pipe-max-size: live with the
		// default capacity.
		chunk, err = unix.FcntlInt(uintptr(fds[1]), unix.F_GETPIPE_SZ, 0)
	}
	if err != nil {
		// Best effort after the failure reported: a fresh pipe and a ring
		// nobody used hold nothing a close could lose.
		_ = unix.Close(fds[0])
		_ = unix.Close(fds[1])
		_ = r.close()
		return fmt.Errorf("dma: bounce pipe size: %w", err)
	}
	mfd, err := unix.MemfdCreate("gohfi-dma-bounce", unix.MFD_CLOEXEC)
	if err == nil {
		err = unix.Ftruncate(mfd, int64(p.scratchSize))
	}
	var m []byte
	if err == nil {
		m, err = unix.Mmap(mfd, 0, p.scratchSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	}
	if err != nil {
		// Best effort after the failure reported, as above; the memfd
		// was never mapped.
		if mfd >= 0 {
			_ = unix.Close(mfd)
		}
		_ = unix.Close(fds[0])
		_ = unix.Close(fds[1])
		_ = r.close()
		return fmt.Errorf("dma: bounce memfd: %w", err)
	}
	p.r, p.pipeR, p.pipeW, p.chunk = r, fds[0], fds[1], min(chunk, p.scratchSize)
	p.fileFd, p.fileMap = mfd, m
	p.free = make([]uint32, p.maxPins)
	for i := range p.free {
		p.free[i] = uint32(p.maxPins - 1 - i) // pop from the end: slot 0 first
	}
	return nil
}

// Pin is a long-term pin of [Addr, Addr+Len) made by a Pinner: a fixed
// buffer (Pin), or page references held by pipes (PinReadOnly). Its ReadAt
// and WriteAt reach the pinned pages (offsets from Addr) and implement
// vfio.DMAAccessor.
type Pin struct {
	p       *Pinner
	slot    uint32
	vaddr   uintptr
	length  int
	tag     uint64
	gone    bool // unpinned; guarded by p.mu
	byClose bool // unpinned by Pinner.Close
	ro      *roPin
}

// Addr returns the pinned range's virtual address at the time of the pin.
func (pin *Pin) Addr() uintptr { return pin.vaddr }

// Len returns the pinned length in bytes.
func (pin *Pin) Len() int { return pin.length }

// Pages returns the number of pinned pages, as charged to the Accountant.
func (pin *Pin) Pages() int { return pin.length / pageSize }

// Pin pins [vaddr, vaddr+length). Both must be page-aligned and length at
// most MaxPinSize (else EINVAL). The pages are charged to the Accountant
// first (ENOMEM past RLIMIT_MEMLOCK), then registered; the kernel faults
// them in and may refuse with EFAULT (not mapped) or EOPNOTSUPP (file-backed
// memory other than shmem/memfd and hugetlbfs).
//
// The range must not be Go heap memory: the runtime may return such pages
// to the kernel (madvise) while the pin keeps the old ones, so the pin and
// the Go objects would silently diverge. Use mmap'd memory (see mem/).
func (p *Pinner) Pin(vaddr uintptr, length int) (*Pin, error) {
	if vaddr%uintptr(pageSize) != 0 || length <= 0 || length%pageSize != 0 ||
		length > MaxPinSize || vaddr+uintptr(length) < vaddr {
		return nil, fmt.Errorf("dma: pin %#x+%#x: unaligned, empty or too large: %w", vaddr, length, unix.EINVAL)
	}
	npages := length / pageSize
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.setupLocked(); err != nil {
		return nil, fmt.Errorf("dma: pin %#x+%#x: %w", vaddr, length, err)
	}
	if len(p.free) == 0 {
		return nil, fmt.Errorf("dma: pin %#x+%#x: all %d fixed buffers in use: %w", vaddr, length, p.maxPins, unix.ENOSPC)
	}
	if err := p.acct.Charge(npages); err != nil {
		return nil, fmt.Errorf("dma: pin %#x+%#x: %w", vaddr, length, err)
	}
	slot := p.free[len(p.free)-1]
	var tag uint64
	if p.r.features&ioringFeatRsrcTags != 0 {
		p.nextTag++
		tag = tagBit | p.nextTag
	}
	if err := p.r.updateBuffer(slot, vaddr, length, tag); err != nil {
		p.acct.Uncharge(npages)
		return nil, fmt.Errorf("dma: pin %#x+%#x: %w", vaddr, length, err)
	}
	p.free = p.free[:len(p.free)-1]
	pin := &Pin{p: p, slot: slot, vaddr: vaddr, length: length, tag: tag}
	p.pins[slot] = pin
	return pin, nil
}

// Unpin removes the pin from the fixed-buffer table; the kernel releases the
// pages once no request uses them, which Unpin waits for (bounded) before
// uncharging them. A read-only pin's pipes are closed, which drops its page
// references at once. Unpinning twice is an error wrapping unix.EINVAL; after
// Pinner.Close, which unpinned everything, Unpin returns nil.
func (pin *Pin) Unpin() error {
	if pin.ro != nil {
		return pin.unpinRO()
	}
	p := pin.p
	p.mu.Lock()
	defer p.mu.Unlock()
	if pin.gone {
		if pin.byClose {
			return nil
		}
		return fmt.Errorf("dma: unpin %#x+%#x: not pinned: %w", pin.vaddr, pin.length, unix.EINVAL)
	}
	return p.unpinLocked(pin)
}

func (p *Pinner) unpinLocked(pin *Pin) error {
	if err := p.r.updateBuffer(pin.slot, 0, 0, 0); err != nil {
		// The buffer is still registered: keep the pin usable.
		return fmt.Errorf("dma: unpin %#x+%#x: %w", pin.vaddr, pin.length, err)
	}
	pin.gone = true
	delete(p.pins, pin.slot)
	p.free = append(p.free, pin.slot)
	if pin.tag == 0 {
		p.acct.Uncharge(pin.Pages())
		return nil
	}
	p.pending[pin.tag] = pin.Pages()
	p.waitLocked(func() bool { _, ok := p.pending[pin.tag]; return !ok }, releaseTimeout)
	// If the release is late (a request still held the buffer), the pages
	// stay charged until its CQE is reaped by a later call.
	return nil
}

// reapLocked consumes all available CQEs: release tags uncharge their pages,
// request results are kept for their waiter.
func (p *Pinner) reapLocked() {
	p.r.reap(func(cqe ioUringCQE) {
		if cqe.UserData&tagBit != 0 {
			if n, ok := p.pending[cqe.UserData]; ok {
				p.acct.Uncharge(n)
				delete(p.pending, cqe.UserData)
			}
			return
		}
		p.done[cqe.UserData] = cqe.Res
	})
}

// waitLocked reaps CQEs until cond holds or timeout passes, and reports
// whether cond holds.
func (p *Pinner) waitLocked(cond func() bool, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for {
		p.reapLocked()
		if cond() {
			return true
		}
		left := time.Until(deadline)
		if left <= 0 {
			return false
		}
		if err := p.r.submitAndWait(0, 1, left); err != nil && !errors.Is(err, unix.ETIME) {
			return false
		}
	}
}

// fixedLocked runs READ_FIXED (device writes memory: pipe -> pinned pages)
// or WRITE_FIXED (pinned pages -> pipe) requests for n bytes at offset off
// of pin and returns once all n bytes moved.
func (p *Pinner) fixedLocked(op uint8, pin *Pin, off, n int) error {
	fd := p.pipeR
	if op == ioringOpWriteFixed {
		fd = p.pipeW
	}
	return p.fixedFdLocked(op, fd, false, pin, off, n)
}

// fixedFdLocked runs fixed requests between fd and n bytes at offset off of
// pin. A seekable fd is used from file offset 0.
func (p *Pinner) fixedFdLocked(op uint8, fd int, seekable bool, pin *Pin, off, n int) error {
	for done := 0; done < n; {
		var fileOff uint64
		if seekable {
			fileOff = uint64(done)
		}
		p.nextID++
		id := p.nextID &^ tagBit
		p.r.queue(&ioUringSQE{
			Opcode:   op,
			Fd:       int32(fd),
			Off:      fileOff,
			Addr:     uint64(pin.vaddr) + uint64(off+done),
			Len:      uint32(n - done),
			BufIndex: uint16(pin.slot),
			UserData: id,
		})
		if err := p.r.submitAndWait(1, 0, 0); err != nil {
			p.broken = fmt.Errorf("dma: io_uring submit failed, pinner unusable: %w", err)
			return err
		}
		if !p.waitLocked(func() bool { _, ok := p.done[id]; return ok }, opTimeout) {
			p.broken = fmt.Errorf("dma: io_uring request did not complete in %v, pinner unusable: %w", opTimeout, unix.ETIME)
			return p.broken
		}
		res := p.done[id]
		delete(p.done, id)
		switch {
		case res < 0:
			return unix.Errno(-res)
		case res == 0:
			return fmt.Errorf("dma: fixed request moved no bytes: %w", unix.EIO)
		}
		done += int(res)
	}
	return nil
}

// access moves len(b) bytes between b and the pinned pages at off, in
// bounce-sized chunks.
func (pin *Pin) access(b []byte, off int64, write bool) (int, error) {
	what := "read"
	if write {
		what = "write"
	}
	if off < 0 || off > int64(pin.length) || int64(len(b)) > int64(pin.length)-off {
		return 0, fmt.Errorf("dma: %s %d bytes at %d of a %d-byte pin: %w", what, len(b), off, pin.length, unix.EFAULT)
	}
	p := pin.p
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.closed:
		return 0, fmt.Errorf("dma: %s pin %#x: %w", what, pin.vaddr, ErrClosed)
	case p.broken != nil:
		return 0, p.broken
	case pin.gone:
		return 0, fmt.Errorf("dma: %s pin %#x: unpinned: %w", what, pin.vaddr, unix.EINVAL)
	}
	n := 0
	for n < len(b) {
		c := min(len(b)-n, p.chunk)
		var err error
		if write {
			// vmsplice references b's pages from the pipe (no copy);
			// READ_FIXED then copies them into the pinned pages. It
			// may take less than c when b's pages outnumber the
			// pipe's slots.
			if c, err = pipeSplice(p.pipeW, b[n:n+c]); err == nil {
				err = p.fixedLocked(ioringOpReadFixed, pin, int(off)+n, c)
			}
		} else if c >= p.fileMin {
			// Large reads go through the memfd: the kernel hands
			// those requests to an io-wq thread (shmem cannot do
			// non-blocking I/O), a few microseconds, but its pages
			// stay allocated while a pipe allocates and frees one
			// page per 4 KiB moved.
			c = min(c, len(p.fileMap))
			if err = p.fixedFdLocked(ioringOpWriteFixed, p.fileFd, true, pin, int(off)+n, c); err == nil {
				copy(b[n:n+c], p.fileMap[:c])
			}
		} else {
			if err = p.fixedLocked(ioringOpWriteFixed, pin, int(off)+n, c); err == nil {
				err = pipeRead(p.pipeR, b[n:n+c])
			}
		}
		if err != nil {
			// Bytes may be left in the pipe: empty it so the next
			// transfer starts in step, or give up on the pinner.
			if derr := pipeDrain(p.pipeR); derr != nil && p.broken == nil {
				p.broken = fmt.Errorf("dma: bounce pipe out of step, pinner unusable: %w", derr)
			}
			return n, fmt.Errorf("dma: %s %d bytes at %d of pin %#x: %w", what, c, int(off)+n, pin.vaddr, err)
		}
		n += c
	}
	return n, nil
}

// ReadAt copies len(b) bytes of the pinned pages at offset off into b: what
// the device reads (DMA_READ). A range outside the pin is an error wrapping
// unix.EFAULT and copies nothing.
func (pin *Pin) ReadAt(b []byte, off int64) (int, error) {
	if pin.ro != nil {
		return pin.readRO(b, off)
	}
	return pin.access(b, off, false)
}

// WriteAt copies b into the pinned pages at offset off: what the device
// writes (DMA_WRITE). A range outside the pin, or any write to a read-only
// pin, is an error wrapping unix.EFAULT and copies nothing.
func (pin *Pin) WriteAt(b []byte, off int64) (int, error) {
	if pin.ro != nil {
		return 0, fmt.Errorf("dma: write %d bytes at %d of read-only pin %#x: %w", len(b), off, pin.vaddr, unix.EFAULT)
	}
	return pin.access(b, off, true)
}

// Pins returns the number of pins held, read-only ones included.
func (p *Pinner) Pins() int {
	p.mu.Lock()
	n := len(p.pins)
	p.mu.Unlock()
	p.roMu.Lock()
	defer p.roMu.Unlock()
	return n + len(p.roPins)
}

// Close unpins everything, uncharges it and releases the io_uring instance.
// Pins become unusable; Close is idempotent.
func (p *Pinner) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil
	}
	errs := []error{p.closeRO()}
	if p.r != nil {
		if p.broken == nil {
			for _, pin := range p.pins {
				if err := p.unpinLocked(pin); err != nil {
					errs = append(errs, err)
				}
				pin.byClose = true
			}
		}
		// Whatever is left (failed or broken) goes with the table and
		// the ring: the kernel drops its pins when the ring is freed.
		if err := p.r.unregisterBuffers(); err != nil && len(p.pins) > 0 {
			errs = append(errs, err)
		}
		p.waitLocked(func() bool { return len(p.pending) == 0 }, releaseTimeout)
		for _, pin := range p.pins {
			pin.gone, pin.byClose = true, true
			p.acct.Uncharge(pin.Pages())
		}
		for tag, n := range p.pending {
			p.acct.Uncharge(n)
			delete(p.pending, tag)
		}
		clear(p.pins)
		if err := p.r.close(); err != nil {
			errs = append(errs, err)
		}
		if err := unix.Munmap(p.fileMap); err != nil {
			errs = append(errs, fmt.Errorf("dma: munmap bounce memfd: %w", err))
		}
		for _, fd := range []int{p.pipeR, p.pipeW, p.fileFd} {
			if err := unix.Close(fd); err != nil {
				errs = append(errs, fmt.Errorf("dma: close bounce: %w", err))
			}
		}
		p.r, p.pipeR, p.pipeW, p.fileFd, p.fileMap = nil, -1, -1, -1, nil
	}
	p.closed = true
	return errors.Join(errs...)
}

// pipeSplice splices as much of b as the empty bounce pipe takes, at least
// one byte, and returns how much. The pages stay referenced by the pipe
// until the request reading them completes, which the caller waits for
// before returning b to its owner.
func pipeSplice(fd int, b []byte) (int, error) {
	iov := []unix.Iovec{{Base: &b[0]}}
	iov[0].SetLen(len(b))
	for {
		n, err := unix.Vmsplice(fd, iov, unix.SPLICE_F_NONBLOCK)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return 0, fmt.Errorf("dma: vmsplice to bounce pipe: %w", err)
		case n == 0:
			return 0, fmt.Errorf("dma: vmsplice to bounce pipe took nothing: %w", unix.EIO)
		}
		return n, nil
	}
}

// pipeRead reads exactly len(b) bytes that a completed request put into the
// bounce pipe.
func pipeRead(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := unix.Read(fd, b)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return fmt.Errorf("dma: read bounce pipe: %w", err)
		case n == 0:
			return fmt.Errorf("dma: read bounce pipe: EOF: %w", unix.EIO)
		}
		b = b[n:]
	}
	return nil
}

// pipeDrain empties the bounce pipe.
func pipeDrain(fd int) error {
	var buf [4096]byte
	for {
		_, err := unix.Read(fd, buf[:])
		switch {
		case err == unix.EAGAIN:
			return nil
		case err == unix.EINTR:
		case err != nil:
			return err
		}
	}
}
