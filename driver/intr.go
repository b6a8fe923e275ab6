package driver

import (
	"fmt"
	"sync"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/vfio"
	"golang.org/x/sys/unix"
)

// irqState is the device's interrupt wiring: one eventfd per vector and a
// goroutine that waits on all of them (the "interrupt handler").
type irqState struct {
	index uint32 // vfio IRQ index in use (MSI-X or INTx)
	fds   []int  // eventfd per vector
	stop  int    // eventfd that stops the loop
	epfd  int
	wg    sync.WaitGroup
	count uint64 // interrupts handled, for tests and stats
	mu    sync.Mutex
}

// waitQueue wakes every waiter at once, like a kernel wait_queue_head with
// wake_up_all: waiters take the channel, wakers close it.
type waitQueue struct {
	mu sync.Mutex
	ch chan struct{}
}

func (q *waitQueue) wait() <-chan struct{} {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.ch == nil {
		q.ch = make(chan struct{})
	}
	return q.ch
}

func (q *waitQueue) wakeAll() {
	q.mu.Lock()
	if q.ch != nil {
		close(q.ch)
		q.ch = nil
	}
	q.mu.Unlock()
}

func (d *Device) setupInterrupts() (err error) {
	s := &irqState{stop: -1, epfd: -1}
	defer func() {
		if err != nil {
			s.closeFDs()
		}
	}()
	vectors := 1 + d.info.NumContexts
	s.index = vfio.PCIMSIXIRQIndex
	info, ierr := d.vdev.IRQInfo(vfio.PCIMSIXIRQIndex)
	if ierr != nil || info.Count < uint32(vectors) || info.Flags&vfio.IRQInfoEventfd == 0 {
		s.index, vectors = vfio.PCIINTxIRQIndex, 1
		if info, ierr = d.vdev.IRQInfo(vfio.PCIINTxIRQIndex); ierr != nil || info.Count < 1 {
			return fmt.Errorf("no usable interrupts (MSI-X or INTx): %w", unix.ENODEV)
		}
	}
	if s.epfd, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC); err != nil {
		return fmt.Errorf("epoll_create1: %w", err)
	}
	if s.stop, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		return fmt.Errorf("eventfd: %w", err)
	}
	if err = unix.EpollCtl(s.epfd, unix.EPOLL_CTL_ADD, s.stop, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: -1}); err != nil {
		return fmt.Errorf("epoll_ctl: %w", err)
	}
	for v := 0; v < vectors; v++ {
		fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		if err != nil {
			return fmt.Errorf("eventfd: %w", err)
		}
		s.fds = append(s.fds, fd)
		if err = unix.EpollCtl(s.epfd, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(v)}); err != nil {
			return fmt.Errorf("epoll_ctl: %w", err)
		}
	}
	if err = d.vdev.SetIRQs(s.index, 0, s.fds); err != nil {
		return fmt.Errorf("SET_IRQS: %w", err)
	}
	if s.index == vfio.PCIMSIXIRQIndex {
		d.info.IRQMode = "msix"
	} else {
		d.info.IRQMode = "intx"
	}
	// Unmask before the handler starts, so that a failure leaves nothing
	// running (the deferred closeFDs releases the eventfds); an interrupt
	// raised meanwhile waits in its eventfd.
	mask := uint64(1)<<uint(1+d.info.NumContexts) - 1
	if d.info.CapFlags&chip.CapODP != 0 {
		mask |= chip.IntSrcEQ | chip.IntSrcTLB // on vector 0 with the error source
	}
	if err = d.writeCSR(chip.RegIntMask, mask); err != nil {
		if !d.dead.Load() {
			// Best effort after the failure returned: the caller closes
			// the vfio device next, which disables them anyway.
			_ = d.vdev.SetIRQs(s.index, 0, nil)
		}
		return err
	}
	d.irq = s
	s.wg.Add(1)
	go d.irqLoop(s)
	return nil
}

// closeFDs closes our own eventfds and epoll fd, at teardown: closing
// them loses nothing (VFIO holds its own reference to an eventfd it
// signals), so an error, which only a bad fd (a bug) could cause, is
// dropped.
func (s *irqState) closeFDs() {
	for _, fd := range s.fds {
		_ = unix.Close(fd) // see above
	}
	s.fds = nil
	if s.stop >= 0 {
		_ = unix.Close(s.stop) // see above
	}
	if s.epfd >= 0 {
		_ = unix.Close(s.epfd) // see above
	}
}

// teardownInterrupts stops the handler, disables the device's interrupts
// (unless the device is gone) and closes the eventfds. A live device that
// refuses to disable them is reported: it would go on signalling eventfds
// nobody reads.
func (d *Device) teardownInterrupts() error {
	s := d.irq
	if s == nil {
		return nil
	}
	var one = [8]byte{1}
	// A wake-up: an eventfd write fails only when the counter would
	// overflow, and then the loop is woken already.
	_, _ = unix.Write(s.stop, one[:])
	s.wg.Wait()
	var err error
	if !d.dead.Load() {
		if serr := d.vdev.SetIRQs(s.index, 0, nil); serr != nil {
			err = d.ioErr(fmt.Errorf("disable interrupts: %w", serr))
			if d.dead.Load() {
				err = nil // gone meanwhile: nothing left to disable
			}
		}
	}
	s.closeFDs()
	d.irq = nil
	return err
}

// irqLoop is the interrupt handler. With MSI-X the vector names the source;
// with INTx the handler reads and acknowledges RegIntStatus.
func (d *Device) irqLoop(s *irqState) {
	defer s.wg.Done()
	events := make([]unix.EpollEvent, 8)
	var buf [8]byte
	for {
		n, err := unix.EpollWait(s.epfd, events, -1)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return
		}
		for _, ev := range events[:n] {
			if ev.Fd == -1 {
				return
			}
			v := int(ev.Fd)
			// Drained, so a dead device cannot make the loop spin; EAGAIN
			// (a wake-up with nothing counted) leaves nothing to drain.
			_, _ = unix.Read(s.fds[v], buf[:])
			s.mu.Lock()
			s.count++
			s.mu.Unlock()
			if d.dead.Load() {
				continue // markDead woke everyone; no registers to read
			}
			if s.index == vfio.PCIMSIXIRQIndex {
				d.handleSources(1 << uint(v))
				continue
			}
			st, err := d.readCSR(chip.RegIntStatus)
			if err != nil {
				continue
			}
			// The acknowledgement: writeCSR marks a lost device dead
			// (ioErr); one that does not land leaves the sources set, so
			// the interrupt comes again. Handled either way.
			_ = d.writeCSR(chip.RegIntStatus, st)
			d.handleSources(st)
		}
	}
}

// handleSources wakes the contexts whose interrupt sources fired, and the
// ODP event-queue reader and TLB-flush waiters for vector 0.
func (d *Device) handleSources(src uint64) {
	d.trace(TraceInterrupt, -1, src, 0, 0)
	if src&chip.IntSrcVector0 != 0 && d.verbs != nil && d.verbs.odp != nil {
		d.verbs.odp.interrupt(src)
	}
	var fired []*ctxtData
	d.mu.Lock()
	for n, c := range d.ctxts {
		if c != nil && src&chip.IntSrcCtxt(n) != 0 {
			fired = append(fired, c)
		}
	}
	d.mu.Unlock()
	for _, c := range fired {
		c.reapIntr() // SDMA completions reach the events page without a system call
		c.wq.wakeAll()
	}
}

// Interrupts returns how many interrupts the handler has taken.
func (d *Device) Interrupts() uint64 {
	if d.irq == nil {
		return 0
	}
	d.irq.mu.Lock()
	defer d.irq.mu.Unlock()
	return d.irq.count
}
