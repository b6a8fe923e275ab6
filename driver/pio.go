package driver

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// sendTimeout bounds how long a send waits for the device to consume
// descriptors (room in the ring, or GOHFI_SEND_FLAG_WAIT) before the
// context is declared hung (hfi1's SDMA/PIO timeouts).
const sendTimeout = 5 * time.Second

// pioRingSize is the context's send buffer: room for two of the largest
// sends, or more smaller ones, in flight at once.
const pioRingSize = 2 * pioBufferSize

// send (GOHFI_IOCTL_SEND) is the PIO-style send path: the payload is copied
// from the caller into the context's send buffer, which the device reads
// through its IOVA, so the sender's own memory is never pinned or mapped.
// The send is posted: the descriptor goes into the context's send queue in
// host memory and the doorbell is a posted register write, so SEND returns
// once the payload is copied (the caller may reuse its buffer at once) and
// several sends are in flight; it waits only while the send queue or the
// send buffer is full, or, with GOHFI_SEND_FLAG_WAIT, until the device has
// consumed the descriptor. Packets complete at the receiver, in its header
// queue.
//
// With GOHFI_SEND_FLAG_SDMA nothing is copied: the descriptor points at
// the caller's buffer, DMA-mapped through the context's SDMA cache
// (user_sdma.go), and SEND writes back the send's completion number, which
// the events page's SDMA_DONE word reaches once the device has read the
// payload.
func (f *File) send(arg UserPtr) error {
	var s uapi.GohfiSend
	if err := readArg(arg, &s, "SEND"); err != nil {
		return err
	}
	c := f.uctxt
	const known = uapi.GOHFI_SEND_FLAG_URGENT | uapi.GOHFI_SEND_FLAG_WAIT | uapi.GOHFI_SEND_FLAG_SDMA
	switch {
	case s.Opcode != uapi.GOHFI_SEND_EAGER && s.Opcode != uapi.GOHFI_SEND_EXPECTED:
		return errnoErr(fmt.Sprintf("SEND: opcode %d", s.Opcode), unix.EINVAL)
	case s.Flags&^known != 0 || s.Reserved != 0:
		return errnoErr("SEND: reserved fields set", unix.EINVAL)
	case int(s.DstCtxt) >= f.d.info.NumContexts:
		return errnoErr(fmt.Sprintf("SEND: destination context %d", s.DstCtxt), unix.EINVAL)
	case s.Length > pioBufferSize:
		return errnoErr(fmt.Sprintf("SEND: %d bytes, at most %d", s.Length, pioBufferSize), unix.EMSGSIZE)
	}
	ctx, cancel := context.WithTimeout(context.Background(), sendTimeout)
	defer cancel()
	desc := chip.SendDesc{
		Opcode: chip.OpEager, DstCtxt: s.DstCtxt, Length: s.Length,
		TID: s.TID, TIDOffset: s.TIDOffset, Tag: s.Tag,
	}
	if s.Flags&uapi.GOHFI_SEND_FLAG_URGENT != 0 {
		desc.Flags |= chip.DescFlagUrgent
	}
	if s.Opcode == uapi.GOHFI_SEND_EXPECTED {
		desc.Opcode = chip.OpExpected
	}
	var err error
	if s.Flags&uapi.GOHFI_SEND_FLAG_SDMA != 0 {
		err = c.sendSDMA(ctx, arg, &s, &desc)
	} else {
		err = c.sendPIO(ctx, &s, &desc)
	}
	if err != nil || s.Flags&uapi.GOHFI_SEND_FLAG_WAIT == 0 {
		return err
	}
	return c.waitSent(ctx, func() bool { return c.sqDone == c.sqTail })
}

// sendPIO copies the payload into the send buffer and posts desc.
func (c *ctxtData) sendPIO(ctx context.Context, s *uapi.GohfiSend, desc *chip.SendDesc) error {
	tail := c.pioTail
	off, err := c.pioAlloc(ctx, int(s.Length))
	if err != nil {
		return err
	}
	if err := copyFromUser(c.pio.mem[off:off+int(s.Length)], UserAddr(s.Vaddr)); err != nil {
		c.sendMu.Lock()
		c.pioTail = max(tail, c.pioHead) // nothing posted: the bytes are free again
		c.sendMu.Unlock()
		return errFault("gohfi: SEND payload")
	}
	desc.SrcIOVA = c.pio.iova + uint64(off)
	c.sendMu.Lock()
	if s.Flags&uapi.GOHFI_SEND_FLAG_WAIT != 0 || c.pioHalfFull() {
		// Someone may wait for this descriptor's consumption: the
		// sender now, or a later send that finds no room (see
		// pioHalfFull).
		desc.Flags |= chip.DescFlagIntr
	}
	c.postLocked(desc, nil)
	c.sendMu.Unlock()
	return c.ring()
}

// sendSDMA maps the caller's buffer (a hit in the SDMA cache costs no
// device access), writes back the completion number and posts desc, which
// asks for the interrupt once the device's send queue runs empty
// (chip.DescFlagIntrIdle; at once when the queue is half full): its
// consumption is reaped there, or by a later SEND, and reaches the events
// page.
func (c *ctxtData) sendSDMA(ctx context.Context, arg UserPtr, s *uapi.GohfiSend, desc *chip.SendDesc) error {
	node := sdmaNoBuffer
	if s.Length > 0 {
		var err error
		if node, desc.SrcIOVA, err = c.sdma.get(ctx, uintptr(s.Vaddr), s.Length); err != nil {
			return err
		}
	}
	if _, err := c.pioAlloc(ctx, 0); err != nil { // a send queue slot, no bytes
		return errors.Join(err, c.sdma.put([]*sdmaNode{node}))
	}
	// Only this file posts to the context, under the file's lock: the
	// number is the next one.
	s.Reserved = c.sdmaPosted + 1
	if err := writeArg(arg, s, "SEND"); err != nil {
		return errors.Join(err, c.sdma.put([]*sdmaNode{node}))
	}
	c.sendMu.Lock()
	// What the device consumed since the last reap reaches the events
	// page now: a stream of sends reports its completions without waiting
	// for the queue to run empty.
	done := c.reapLocked()
	if c.pioHalfFull() {
		desc.Flags |= chip.DescFlagIntr // a later send may wait for room
	} else {
		// Reported with the others when the device runs out of work:
		// an interrupt per send cost the device an eventfd write and
		// woke the interrupt thread each time.
		desc.Flags |= chip.DescFlagIntrIdle
	}
	c.postLocked(desc, node)
	c.sendMu.Unlock()
	err := c.ring()
	if perr := c.sdma.put(done); perr != nil {
		err = errors.Join(err, fmt.Errorf("gohfi: SEND: releasing SDMA mappings: %w", perr))
	}
	return err
}

// The send buffer is a ring of bytes: each descriptor's payload is the
// next n bytes (from the start again when they would not fit before the
// end), freed when the device has consumed the descriptor, in order.
// Positions are byte counts since the context was programmed: pioTail is
// the end of the last payload, pioHead the end of the last consumed one,
// pioEnd[i] the end of send queue slot i's payload.

// pioAlloc waits for a free send queue slot and n contiguous bytes of the
// send buffer, and returns the bytes' offset in it.
func (c *ctxtData) pioAlloc(ctx context.Context, n int) (int, error) {
	slots := uint64(c.d.m.params.SendQueueEntries)
	var start uint64
	fits := func() bool {
		if c.sqDone == c.sqTail {
			// Nothing in flight: the whole ring is free, from its start.
			c.pioTail = (c.pioTail + pioRingSize - 1) / pioRingSize * pioRingSize
			c.pioHead = c.pioTail
		}
		start = c.pioTail
		if off := start % pioRingSize; off+uint64(n) > pioRingSize {
			start += pioRingSize - off // wrap: the rest of the ring stays unused
		}
		return (c.sqTail+1)%slots != c.sqDone && start+uint64(n)-c.pioHead <= pioRingSize
	}
	if err := c.waitSent(ctx, fits); err != nil {
		return 0, err
	}
	c.pioTail = start + uint64(n)
	return int(start % pioRingSize), nil
}

// pioHalfFull reports whether, with the descriptor being posted, the send
// queue or the send buffer is at least half full, or the buffer's next
// free byte lies in its second half. Only such descriptors ask for the
// sender's interrupt once consumed. A send waits for room only when the
// queue is full, or when its bytes (at most half the buffer) do not fit
// before the head: either more than half the buffer is taken, or they do
// not fit before the buffer's end, which needs the next free byte in the
// second half. Either way the last descriptor posted, still outstanding
// (else the ring would be empty and the send would fit), asked for an
// interrupt, and the wait ends. Sends that keep the ring less full raise
// fewer interrupts.
func (c *ctxtData) pioHalfFull() bool {
	slots := uint64(c.d.m.params.SendQueueEntries)
	inFlight := (c.sqTail-c.sqDone+slots)%slots + 1
	return 2*inFlight >= slots || 2*(c.pioTail-c.pioHead) >= pioRingSize || 2*(c.pioTail%pioRingSize) >= pioRingSize
}

// postLocked writes one descriptor whose payload ends the send buffer's
// allocation (PIO, node nil) or is read from node (SDMA), under c.sendMu;
// ring then tells the device.
func (c *ctxtData) postLocked(desc *chip.SendDesc, node *sdmaNode) {
	slots := uint64(c.d.m.params.SendQueueEntries)
	slot := c.sqTail
	desc.Marshal(c.sq.mem[slot*chip.SendDescSize:])
	c.pioEnd[slot] = c.pioTail
	c.sdmaSlot[slot] = node
	if node != nil {
		c.sdmaPosted++
	}
	c.sqTail = (slot + 1) % slots
}

// ring is the doorbell for the descriptors posted. With a doorbell record
// (chip.CapCtxtDBRec) it stores the tail there and writes CtxtSQTail only
// when the device asked to be notified (its engine sleeps): the store, then
// the flag's load, both sequentially consistent atomics, so either this
// load sees the flag or the device's read after setting it sees the tail
// (the QPs' protocol, QP.ringLocked). The register write is posted: the
// device takes it before any later register access, and nothing waits for
// it.
func (c *ctxtData) ring() error {
	c.sendMu.Lock()
	tail := c.sqTail
	if c.dbRec != nil {
		// Under sendMu: two SENDs never store their tails out of order.
		store32(c.dbRec, chip.DBRecSQTail, uint32(tail))
		if c.dbHook != nil {
			c.dbHook()
		}
		if load32(c.dbRec, chip.DBRecFlags)&chip.DBRecNotify == 0 {
			c.sendMu.Unlock()
			c.d.trace(TraceDoorbellRecord, c.ctxt, uint64(c.ctxt), tail, 0)
			return nil
		}
	}
	c.sendMu.Unlock()
	c.d.trace(TraceDoorbell, c.ctxt, uint64(c.ctxt), tail, 0)
	return c.d.writeCSRPosted(chip.CtxtReg(c.ctxt, chip.CtxtSQTail), tail)
}

// reapLocked frees the send buffer of the descriptors the device has
// consumed, as its SQ head (DMA'd to sqHead) says, under c.sendMu. It
// counts the SDMA sends among them in the events page and returns their
// cache entries, whose references the caller drops (sdmaCache.put) once
// c.sendMu is released. A head that names no slot in flight (a device
// writing nonsense) frees nothing.
func (c *ctxtData) reapLocked() []*sdmaNode {
	slots := uint64(c.d.m.params.SendQueueEntries)
	head := load64(c.sqHead.mem, 0)
	if head >= slots || (head-c.sqDone+slots)%slots > (c.sqTail-c.sqDone+slots)%slots {
		return nil
	}
	var done []*sdmaNode
	for c.sqDone != head {
		c.pioHead = c.pioEnd[c.sqDone]
		if n := c.sdmaSlot[c.sqDone]; n != nil {
			c.sdmaSlot[c.sqDone] = nil
			c.sdmaDone++
			done = append(done, n)
		}
		c.sqDone = (c.sqDone + 1) % slots
	}
	if len(done) > 0 {
		store64(c.events.mem, uapi.GOHFI_EVENTS_SDMA_DONE_OFF, c.sdmaDone)
	}
	return done
}

// reapIntr reaps from the interrupt handler, so SDMA completions reach the
// events page while nobody is in SEND. A context whose rings are being
// freed (c.rmu) or that has no SDMA send in flight is left alone.
func (c *ctxtData) reapIntr() {
	c.rmu.RLock()
	if c.gone != 0 {
		c.rmu.RUnlock()
		return
	}
	c.sendMu.Lock()
	var done []*sdmaNode
	if c.sdmaDone != c.sdmaPosted {
		done = c.reapLocked()
	}
	c.sendMu.Unlock()
	c.rmu.RUnlock()
	// A failed release is a lost device (ioErr marks it; the next call
	// gets ENXIO); there is no caller here to tell.
	_ = c.sdma.put(done)
}

// waitSent reaps consumed descriptors until done (called under c.sendMu)
// reports true, sleeping on the context's interrupt (raised by the
// consumption of a descriptor that asked for it, pioHalfFull, or of an
// SDMA send) in between.
func (c *ctxtData) waitSent(ctx context.Context, done func() bool) error {
	for {
		wait := c.wq.wait()
		c.sendMu.Lock()
		reaped := c.reapLocked()
		ok := done()
		c.sendMu.Unlock()
		if err := c.sdma.put(reaped); err != nil {
			return fmt.Errorf("gohfi: SEND: releasing SDMA mappings: %w", err)
		}
		if ok {
			return nil
		}
		if c.d.dead.Load() {
			return fmt.Errorf("gohfi: SEND: descriptors not consumed: %w", c.d.errGone())
		}
		select {
		case <-wait:
		case <-c.d.deadCh:
		case <-ctx.Done():
			st, _ := c.d.readCtxtCSR(c.ctxt, chip.CtxtStatus)
			return fmt.Errorf("gohfi: SEND: descriptors not consumed (context status %#x): %w", st, unix.ETIMEDOUT)
		}
	}
}
