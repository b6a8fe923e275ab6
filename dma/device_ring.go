package dma

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Device rings: the pages of a Pin, handed to a device model in another
// process (vfio-user's gohfi_dma_ring, docs/pinning.md "Device rings").
//
// The driver side (Pin.DeviceRing) makes a new io_uring instance, disabled
// (IORING_SETUP_R_DISABLED), and clones the pin's fixed buffer into its
// buffer 0 (IORING_REGISTER_CLONE_BUFFERS): the same pinned pages, no new
// pin, no page-table lookup at use. The device side (OpenDeviceRing) is the
// only party that enables it, after registering its restrictions (only
// READ_FIXED and WRITE_FIXED, only on registered files; of the register
// operations only buffer cloning and buffer updates) and its own two bounce
// pipes as the ring's only files; a ring already enabled, restricted or
// with files is refused. From then on nobody can change the ring's files,
// and every request it runs moves bytes between one of its buffers and the
// device's pipes, whoever submits it. Its buffers can only be the client's
// memory: an update pins the memory of the process that asks (the device
// asks only to empty a slot), and the kernel clones buffers only between
// rings made by the same process (the same mm), which is how CopyTo lends
// the destination's buffer to the source's ring. So the client, which
// still holds the ring's memory and may keep its fd, can spoil only its own
// data, never make the device's requests touch the device's other files or
// memory.

// keptRings counts the rings of this process whose queue addresses an
// embedded device left taken (OpenDeviceRing): the count is the
// process's, not a device's.
var keptRings atomic.Int64

// keptCheck is how many more kept rings make OpenDeviceRing count the
// process's mappings again. A kept ring's covers merge with their
// neighbours (thousands of closed rings of a benchmark left 45 mappings),
// so the rings themselves are no measure of what they cost: the mappings
// are, against vm.max_map_count.
const keptCheck = 4096

// kept is what OpenDeviceRing last found of the process's mappings.
var kept struct {
	mu        sync.Mutex
	nextCheck int64 // keptRings at which to count again
	full      error // the mappings passed half of vm.max_map_count: no more kept rings
}

// mapCount returns the process's mappings and vm.max_map_count (a test
// hook).
var mapCount = func() (n, limit int, err error) {
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		return 0, 0, err
	}
	lim, err := os.ReadFile("/proc/sys/vm/max_map_count")
	if err != nil {
		return 0, 0, err
	}
	if limit, err = strconv.Atoi(strings.TrimSpace(string(lim))); err != nil {
		return 0, 0, err
	}
	return bytes.Count(maps, []byte{'\n'}), limit, nil
}

// keptRoom reports whether an embedded device may leave one more ring's
// addresses taken: every keptCheck kept rings it counts the process's
// mappings, and while they are more than half of vm.max_map_count it
// refuses (ENOSPC), counting again at each refusal.
func keptRoom() error {
	kept.mu.Lock()
	defer kept.mu.Unlock()
	n := keptRings.Load()
	if kept.full == nil && n < kept.nextCheck {
		return nil
	}
	maps, limit, err := mapCount()
	switch {
	case err != nil:
		kept.full = fmt.Errorf("%d rings of this process left their addresses taken, and its mappings cannot be counted: %w", n, errors.Join(err, unix.ENOSPC))
	case maps > limit/2:
		kept.full = fmt.Errorf("%d rings of this process left their addresses taken, %d mappings of vm.max_map_count %d: %w", n, maps, limit, unix.ENOSPC)
	default:
		kept.full, kept.nextCheck = nil, n+keptCheck
	}
	return kept.full
}

const (
	// deviceRingEntries is the size of a device ring's submission queue:
	// CopyTo submits up to half as many WRITE_FIXED and READ_FIXED pairs
	// with one io_uring_enter. The queues fit a page each.
	deviceRingEntries = 16
	// deviceRingPipe is the capacity of a device ring's pipe, so the most
	// one request moves: a 64 KiB pipe (the default size) moved 1 MiB
	// faster than a 1 MiB one in BenchmarkDeviceRingCopy (5.3 against 3.7
	// GB/s, noisy), its pages staying in the caches.
	deviceRingPipe = 64 << 10

	// deviceRingCopyChunk is the most a WRITE_FIXED and READ_FIXED pair
	// of CopyTo moves through the pipe: two pages, as many as a pipe keeps
	// for reuse when they are read (Linux 6.16), so a copy allocates no
	// pipe pages and the bytes it bounces stay in the L1 cache. In
	// BenchmarkDeviceRingCopy (16 MiB, medians of 5, alternating builds)
	// 8 KiB pairs, 8 per io_uring_enter, ran at 6.8 GB/s; 16 KiB at 6.1,
	// 32 KiB at 5.5, 64 KiB at 5.4; 4 KiB pairs were slower than 64 KiB
	// ones (the requests' cost dominates), 16 pairs per enter no faster.
	deviceRingCopyChunk = 8 << 10

	// deviceRingTimeout bounds the wait for one request of a device ring:
	// the ring's queues are shared with the client, which may consume or
	// spoil the device's completions.
	deviceRingTimeout = 5 * time.Second

	// deviceRingFDName is what /proc/self/fd/N links to for an io_uring.
	deviceRingFDName = "anon_inode:[io_uring]"
)

// ioUringCloneBuffers mirrors struct io_uring_clone_buffers.
type ioUringCloneBuffers struct {
	SrcFd, Flags, SrcOff, DstOff, Nr uint32
	Pad                              [3]uint32
}

// ioUringRestriction mirrors struct io_uring_restriction.
type ioUringRestriction struct {
	Opcode uint16
	Arg    uint8 // register_op, sqe_op or sqe_flags
	Resv   uint8
	Resv2  [3]uint32
}

// deviceRingFlags are the setup flags of a device ring, the same on both
// sides: the device learns the ring's layout from a ring of its own made
// with them. SUBMIT_ALL and COOP_TASKRUN as the Pinner's ring: without
// them a 64 KiB copy between two rings took 24 us instead of 8.5.
const deviceRingFlags = ioringSetupClamp | ioringSetupRDisabled | ioringSetupNoSQArray | ioringSetupSubmitAll | ioringSetupCoopTaskrun

// DeviceRing returns a new io_uring instance, not yet enabled, whose buffer
// 0 is the pin's pages, and the address the ring knows them at (Addr: a
// request names the bytes at off as Addr+off). The caller passes the file
// to the device and closes its copy; the pages stay pinned for the ring
// until its last user closes it, whatever happens to the pin. Read-only
// pins have no fixed buffer: ENOTSUP, as is a kernel without buffer
// cloning (before 6.12) or IORING_SETUP_NO_SQARRAY (before 6.6).
func (pin *Pin) DeviceRing() (*os.File, uintptr, error) {
	if pin.ro != nil {
		return nil, 0, fmt.Errorf("dma: device ring of read-only pin %#x+%#x: %w", pin.vaddr, pin.length, unix.ENOTSUP)
	}
	p := pin.p
	p.mu.Lock()
	defer p.mu.Unlock()
	if pin.gone || p.r == nil {
		return nil, 0, fmt.Errorf("dma: device ring of %#x+%#x: not pinned: %w", pin.vaddr, pin.length, unix.EINVAL)
	}
	var params ioUringParams
	params.Flags = deviceRingFlags
	fd, err := ioUringSetup(deviceRingEntries, &params)
	if err != nil {
		if errors.Is(err, unix.EINVAL) {
			err = errors.Join(err, unix.ENOTSUP)
		}
		return nil, 0, fmt.Errorf("dma: device ring: io_uring_setup: %w", err)
	}
	clone := ioUringCloneBuffers{SrcFd: uint32(p.r.fd), SrcOff: pin.slot, Nr: 1}
	if _, err := ioUringRegister(fd, ioringRegisterCloneBuffers, addrOf(&clone), 1); err != nil {
		_ = unix.Close(fd) // our own new ring, nothing in it: the clone's failure is the story
		if errors.Is(err, unix.EINVAL) {
			err = errors.Join(err, unix.ENOTSUP)
		}
		return nil, 0, fmt.Errorf("dma: device ring of %#x+%#x: IORING_REGISTER_CLONE_BUFFERS: %w", pin.vaddr, pin.length, err)
	}
	return os.NewFile(uintptr(fd), "gohfi-dma-ring"), pin.vaddr, nil
}

// DeviceRingBuffer is the device side of a device ring: size bytes of
// client memory that the ring knows at addr, reached through the ring and
// two bounce pipes of the device's own: pipe (its ring files 0 and 1) for
// the ring's WRITE_FIXED requests and the READ_FIXED requests of copies,
// vpipe (the read end is file 2) for the bytes WriteAt vmsplices. vmsplice
// and splice clear FMODE_NOWAIT on the pipe they write to, and a request
// with RWF_NOWAIT on such a pipe fails with EOPNOTSUPP: so pipe never sees
// one. Safe for concurrent use.
type DeviceRingBuffer struct {
	mu    sync.Mutex
	r     *sharedRing
	addr  uint64
	size  uint64
	pipe  [2]int // read and write end
	vpipe [2]int
	chunk int  // bytes a pipe holds: the most one request moves
	dirty bool // a failure may have left bytes in a pipe
	// broken is set when the ring stopped answering: a request may still
	// be queued, so the ring is not used again.
	broken error
	seq    uint64
	// closed is set by Close; guarded by mu.
	closed bool
}

// ErrCallerMemory marks a failure of a DeviceRingBuffer's ReadAt or WriteAt
// in the caller's buffer (say a shared mapping the device model reads
// from), not in the ring's pages.
var ErrCallerMemory = errors.New("dma: device ring: the caller's buffer faulted")

// copyMu serialises CopyTo, which holds two rings' locks.
var copyMu sync.Mutex

// IsDeviceRing reports whether fd is an io_uring instance, the only kind
// of file OpenDeviceRing accepts.
func IsDeviceRing(fd int) bool {
	name, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	return err == nil && name == deviceRingFDName
}

// OpenDeviceRing takes over fd, the device ring of a client mapping of size
// bytes whose first byte the ring knows at addr: it registers the device's
// restrictions and bounce pipe, enables the ring and maps its queues. fd is
// closed on failure. A ring the client already enabled, restricted or gave
// files is refused (the kernel's EBADFD or EBUSY).
//
// sameProcess says the client is this process (an embedded device): then
// Close leaves the queues' addresses taken (PROT_NONE, no memory) instead
// of unmapping them. The driver's notifier sees every munmap of the
// process, late; an munmap of an address the application's next buffer got
// meanwhile would look like an invalidation of that buffer (a spurious
// EBUSY from TID_UPDATE), and io_uring maps its queues only where the
// kernel chooses, so the addresses cannot be reused for the next ring
// either: 8 KiB of address space per ring (two pages), for the process's life,
// and no memory. While the process's mappings are more than half of
// vm.max_map_count an embedded device refuses new rings (ENOSPC, keptRoom;
// the client then maps without one and the device's accesses go over the
// socket), so that a process mapping and unmapping without end does not
// run into the limit.
func OpenDeviceRing(fd int, addr, size uint64, sameProcess bool) (_ *DeviceRingBuffer, err error) {
	b := &DeviceRingBuffer{addr: addr, size: size, pipe: [2]int{-1, -1}, vpipe: [2]int{-1, -1}, r: &sharedRing{fd: fd, keepVA: sameProcess}}
	defer func() {
		if err != nil {
			_ = b.Close() // undoing our own half-made setup: the first failure is the story
		}
	}()
	if sameProcess {
		if err := keptRoom(); err != nil {
			return nil, fmt.Errorf("dma: device ring: %w", err)
		}
	}
	if size == 0 || addr+size < addr {
		return nil, fmt.Errorf("dma: device ring at %#x+%#x: %w", addr, size, unix.EINVAL)
	}
	if !IsDeviceRing(fd) {
		return nil, fmt.Errorf("dma: device ring: fd %d is not an io_uring: %w", fd, unix.EINVAL)
	}
	b.chunk = deviceRingPipe
	for _, pfd := range []*[2]int{&b.pipe, &b.vpipe} {
		var fds [2]int
		if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
			return nil, fmt.Errorf("dma: device ring: pipe: %w", err)
		}
		*pfd = fds
		size, err := unix.FcntlInt(uintptr(fds[1]), unix.F_SETPIPE_SZ, deviceRingPipe)
		if err != nil {
			// Over the user's pipe quota or fs.pipe-max-size: live with
			// the default capacity.
			size, err = unix.FcntlInt(uintptr(fds[1]), unix.F_GETPIPE_SZ, 0)
		}
		if err != nil {
			return nil, fmt.Errorf("dma: device ring: pipe size: %w", err)
		}
		b.chunk = min(b.chunk, size)
	}
	if b.chunk < 2*pageSize {
		// WriteAt moves a page less than the pipe holds per request.
		return nil, fmt.Errorf("dma: device ring: pipe of %d bytes: %w", b.chunk, unix.ENOBUFS)
	}
	res := [6]ioUringRestriction{
		{Opcode: ioringRestrictionSQEOp, Arg: ioringOpReadFixed},
		{Opcode: ioringRestrictionSQEOp, Arg: ioringOpWriteFixed},
		{Opcode: ioringRestrictionSQEFlagsAllowed, Arg: iosqeFixedFile},
		{Opcode: ioringRestrictionSQEFlagsRequired, Arg: iosqeFixedFile},
		// CopyTo lends the destination's buffer to the source's ring as
		// buffer 1 and takes it back (see there).
		{Opcode: ioringRestrictionRegisterOp, Arg: ioringRegisterCloneBuffers},
		{Opcode: ioringRestrictionRegisterOp, Arg: ioringRegisterBuffersUpdate},
	}
	if _, err := ioUringRegister(fd, ioringRegisterRestrictions, addrOf(&res), uint32(len(res))); err != nil {
		return nil, fmt.Errorf("dma: device ring: IORING_REGISTER_RESTRICTIONS: %w", err)
	}
	files := [3]int32{int32(b.pipe[0]), int32(b.pipe[1]), int32(b.vpipe[0])}
	if _, err := ioUringRegister(fd, ioringRegisterFiles, addrOf(&files), uint32(len(files))); err != nil {
		return nil, fmt.Errorf("dma: device ring: IORING_REGISTER_FILES: %w", err)
	}
	if _, err := ioUringRegister(fd, ioringRegisterEnableRings, 0, 0); err != nil {
		return nil, fmt.Errorf("dma: device ring: IORING_REGISTER_ENABLE_RINGS: %w", err)
	}
	if err := b.r.attach(); err != nil {
		return nil, fmt.Errorf("dma: device ring: %w", err)
	}
	return b, nil
}

// Close unmaps and closes the device's side of the ring and its pipe. The
// client's pages are released once the client's copy of the ring is
// closed too.
func (b *DeviceRingBuffer) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil
	}
	b.closed = true
	errs := []error{b.r.close()}
	for _, fd := range []int{b.pipe[0], b.pipe[1], b.vpipe[0], b.vpipe[1]} {
		if fd >= 0 {
			if err := unix.Close(fd); err != nil {
				errs = append(errs, fmt.Errorf("dma: device ring: close pipe: %w", err))
			}
		}
	}
	return errors.Join(errs...)
}

// ReadAt reads len(p) bytes at off of the client mapping into p: the ring
// copies them into the pipe (WRITE_FIXED), then a read copies them out.
func (b *DeviceRingBuffer) ReadAt(p []byte, off int64) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.transferLocked(len(p), off, false, func(done, k int) error {
		if err := pipeRead(b.pipe[0], p[done:done+k]); err != nil {
			return fmt.Errorf("%w: %w", ErrCallerMemory, err)
		}
		return nil
	})
}

// WriteAt writes p at off of the client mapping: vmsplice puts references
// to p's pages into the pipe (no copy), then the ring copies them into the
// pinned pages (READ_FIXED), before WriteAt returns p to its owner.
func (b *DeviceRingBuffer) WriteAt(p []byte, off int64) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.transferLocked(len(p), off, true, func(done, k int) error {
		for c := p[done : done+k]; len(c) > 0; {
			n, err := pipeSplice(b.vpipe[1], c)
			if err != nil {
				return fmt.Errorf("%w: %w", ErrCallerMemory, err)
			}
			c = c[n:]
		}
		return nil
	})
}

// CopyTo copies n bytes at off of b to dst at dstOff (dst may be b: then
// the ranges must not overlap). b's ring moves them: dst's buffer is lent to
// it as buffer 1 (IORING_REGISTER_CLONE_BUFFERS from dst's ring: the kernel
// lends only between rings of the same process, the client's), then per
// deviceRingCopyChunk a WRITE_FIXED from buffer 0 into b's pipe and a
// READ_FIXED from the pipe into buffer 1, several per io_uring_enter;
// buffer 1 is emptied again before CopyTo returns, so dst's pages are held
// by dst's ring alone. Two kernel copies, no staging buffer. dstSide tells
// which side an error belongs to.
func (b *DeviceRingBuffer) CopyTo(dst *DeviceRingBuffer, dstOff, off int64, n int) (dstSide bool, err error) {
	if dstOff < 0 || uint64(dstOff) > dst.size || uint64(n) > dst.size-uint64(dstOff) {
		return true, fmt.Errorf("dma: device ring: %d bytes at %#x of %#x: %w", n, dstOff, dst.size, unix.EFAULT)
	}
	if off < 0 || uint64(off) > b.size || uint64(n) > b.size-uint64(off) {
		return false, fmt.Errorf("dma: device ring: %d bytes at %#x of %#x: %w", n, off, b.size, unix.EFAULT)
	}
	if dst == b {
		if off < dstOff+int64(n) && dstOff < off+int64(n) {
			return true, fmt.Errorf("dma: device ring: copy of %d bytes from %#x to overlapping %#x: %w", n, off, dstOff, unix.EINVAL)
		}
		b.mu.Lock()
		defer b.mu.Unlock()
		if err := b.usableLocked(); err != nil {
			return false, err
		}
		return b.copyLocked(0, b.addr+uint64(dstOff), b.addr+uint64(off), n)
	}
	copyMu.Lock()
	defer copyMu.Unlock()
	b.mu.Lock()
	defer b.mu.Unlock()
	dst.mu.Lock()
	defer dst.mu.Unlock()
	if err := b.usableLocked(); err != nil {
		return false, err
	}
	if err := dst.usableLocked(); err != nil {
		return true, err
	}
	if n == 0 {
		return false, nil
	}
	if err := b.lendLocked(dst); err != nil {
		return true, err
	}
	dstSide, err = b.copyLocked(lentBuffer, dst.addr+uint64(dstOff), b.addr+uint64(off), n)
	if rerr := b.unlendLocked(); rerr != nil {
		b.broken = rerr // dst's pages would stay in b's ring: not used again
		err = errors.Join(err, rerr)
	}
	return dstSide, err
}

// lentBuffer is the slot of b's ring that holds dst's buffer during CopyTo.
const lentBuffer = 1

// lendLocked clones dst's buffer 0 into b's ring as lentBuffer.
func (b *DeviceRingBuffer) lendLocked(dst *DeviceRingBuffer) error {
	clone := ioUringCloneBuffers{SrcFd: uint32(dst.r.fd), Flags: ioringRegisterDstReplace, DstOff: lentBuffer, Nr: 1}
	if _, err := ioUringRegister(b.r.fd, ioringRegisterCloneBuffers, addrOf(&clone), 1); err != nil {
		return fmt.Errorf("dma: device ring: lend the destination's buffer (IORING_REGISTER_CLONE_BUFFERS): %w", err)
	}
	return nil
}

// unlendLocked empties lentBuffer of b's ring.
func (b *DeviceRingBuffer) unlendLocked() error {
	var iov ioIovec // no address: remove the buffer, install none
	upd := ioUringRsrcUpdate2{Offset: lentBuffer, Data: addrOf(&iov), Nr: 1}
	if n, err := ioUringRegister(b.r.fd, ioringRegisterBuffersUpdate, addrOf(&upd), uint32(sizeofRsrcUpdate2)); err != nil || n != 1 {
		return fmt.Errorf("dma: device ring: take back the lent buffer (%d): %w", n, errors.Join(err, unix.EIO))
	}
	return nil
}

// copyLocked copies n bytes at addr of b's buffer 0 to dstAddr of its
// buffer dstBuf through b's pipe: pairs of a WRITE_FIXED of up to
// deviceRingCopyChunk into the pipe and a READ_FIXED of it out, up to
// deviceRingEntries/2 pairs per io_uring_enter. The pairs are not linked (a link costs a task-work round
// trip per request: half the speed in BenchmarkDeviceRingCopy); with
// RWF_NOWAIT the kernel runs each request at submission, in order, or fails
// it with EAGAIN (on a full or empty pipe) instead of leaving it to wait
// for the pipe, so nothing is left in flight. After a failed request the
// rest of the batch still runs: a READ_FIXED may then move bytes of the
// copy's source left in the pipe to another place of its destination, so
// a failed copy leaves the destination range holding unspecified bytes of
// the source range (or of the client, which can feed the pipe through its
// ring), never the device's.
func (b *DeviceRingBuffer) copyLocked(dstBuf uint16, dstAddr, addr uint64, n int) (dstSide bool, err error) {
	if err := b.drainLocked(); err != nil {
		return false, err
	}
	var sqes [deviceRingEntries]ioUringSQE
	var res [deviceRingEntries]int32
	for done := 0; done < n; {
		q, ks := 0, [deviceRingEntries / 2]int{}
		for at := done; q < len(sqes) && at < n; q += 2 {
			k := min(n-at, deviceRingCopyChunk)
			b.seq += 2
			sqes[q] = ioUringSQE{Opcode: ioringOpWriteFixed, Flags: iosqeFixedFile, RWFlags: unix.RWF_NOWAIT, Fd: 1, Addr: addr + uint64(at), Len: uint32(k), UserData: b.seq - 1}
			sqes[q+1] = ioUringSQE{Opcode: ioringOpReadFixed, Flags: iosqeFixedFile, RWFlags: unix.RWF_NOWAIT, Fd: 0, Addr: dstAddr + uint64(at), Len: uint32(k), UserData: b.seq, BufIndex: dstBuf}
			ks[q/2] = k
			at += k
		}
		if err := b.r.run(sqes[:q], res[:q], deviceRingTimeout); err != nil {
			b.broken = fmt.Errorf("dma: device ring: copy of %d bytes from %#x: %w", n-done, addr+uint64(done), err)
			return false, b.broken
		}
		for i := 0; i < q; i += 2 {
			k := ks[i/2]
			if res[i] != int32(k) || res[i+1] != int32(k) {
				b.dirty = true
				w, r := moved(res[i], k), moved(res[i+1], k)
				// After a failed or short WRITE_FIXED the READ_FIXED
				// fails or is short too: the source's; anything else the
				// destination's.
				return w == nil, fmt.Errorf("dma: device ring: copy of %d bytes from %#x to %#x: %w",
					k, addr+uint64(done), dstAddr+uint64(done), errors.Join(w, r))
			}
			done += k
		}
	}
	return false, nil
}

// moved is the error of a request of k bytes that returned res.
func moved(res int32, k int) error {
	switch {
	case res < 0:
		return unix.Errno(-res)
	case int(res) != k:
		return fmt.Errorf("moved %d of %d bytes: %w", res, k, unix.EIO)
	}
	return nil
}

func (b *DeviceRingBuffer) usableLocked() error {
	if b.closed {
		return fmt.Errorf("dma: device ring: closed: %w", unix.EBADF)
	}
	if b.broken != nil {
		return fmt.Errorf("dma: device ring: unusable since %w", b.broken)
	}
	return nil
}

// drainLocked empties the pipes after a failure left bytes in them.
func (b *DeviceRingBuffer) drainLocked() error {
	if !b.dirty {
		return nil
	}
	for _, fd := range []int{b.pipe[0], b.vpipe[0]} {
		if err := pipeDrain(fd); err != nil {
			return fmt.Errorf("dma: device ring: drain pipe: %w", err)
		}
	}
	b.dirty = false
	return nil
}

// transferLocked moves n bytes at off through a pipe, chunk by chunk: for
// a write, fill vmsplices a chunk into vpipe and READ_FIXED moves it into
// the pages; for a read, WRITE_FIXED moves the chunk into pipe and fill
// takes it out.
func (b *DeviceRingBuffer) transferLocked(n int, off int64, write bool, fill func(done, k int) error) (int, error) {
	if n == 0 {
		return 0, nil
	}
	if off < 0 || uint64(off) > b.size || uint64(n) > b.size-uint64(off) {
		return 0, fmt.Errorf("dma: device ring: %d bytes at %#x of %#x: %w", n, off, b.size, unix.EFAULT)
	}
	if err := b.usableLocked(); err != nil {
		return 0, err
	}
	if err := b.drainLocked(); err != nil {
		return 0, err
	}
	step := b.chunk
	if write {
		// fill vmsplices: a pipe slot per page piece, and an unaligned
		// chunk of the pipe's size would span one page more than it has.
		step -= pageSize
	}
	for done := 0; done < n; {
		k := min(n-done, step)
		if write {
			if err := fill(done, k); err != nil {
				b.dirty = true
				return done, err
			}
		}
		op, file := uint8(ioringOpWriteFixed), int32(1) // pages -> pipe
		if write {
			op, file = ioringOpReadFixed, 2 // vpipe -> pages
		}
		if err := b.requestLocked(op, file, b.addr+uint64(off)+uint64(done), k); err != nil {
			b.dirty = true
			return done, err
		}
		if !write {
			if err := fill(done, k); err != nil {
				b.dirty = true
				return done, err
			}
		}
		done += k
	}
	return n, nil
}

// requestLocked runs fixed-buffer requests on the ring until all k bytes
// at addr moved (a pipe may take part of them at a time).
func (b *DeviceRingBuffer) requestLocked(op uint8, file int32, addr uint64, k int) error {
	for k > 0 {
		b.seq++
		sqe := [1]ioUringSQE{{Opcode: op, Flags: iosqeFixedFile, RWFlags: unix.RWF_NOWAIT, Fd: file, Addr: addr, Len: uint32(k), UserData: b.seq}}
		var r [1]int32
		err := b.r.run(sqe[:], r[:], deviceRingTimeout)
		res := r[0]
		if err != nil {
			b.broken = fmt.Errorf("dma: device ring: request of %d bytes at %#x: %w", k, addr, err)
			return b.broken
		}
		switch {
		case res < 0:
			return fmt.Errorf("dma: device ring: request of %d bytes at %#x: %w", k, addr, unix.Errno(-res))
		case res == 0 || int(res) > k:
			return fmt.Errorf("dma: device ring: request of %d bytes at %#x moved %d: %w", k, addr, res, unix.EIO)
		}
		addr += uint64(res)
		k -= int(res)
	}
	return nil
}
