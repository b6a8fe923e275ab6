package driver

import (
	"context"
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
func (f *File) send(arg UserPtr) error {
	var s uapi.GohfiSend
	if err := readArg(arg, &s, "SEND"); err != nil {
		return err
	}
	c := f.uctxt
	switch {
	case s.Opcode != uapi.GOHFI_SEND_EAGER && s.Opcode != uapi.GOHFI_SEND_EXPECTED:
		return errnoErr(fmt.Sprintf("SEND: opcode %d", s.Opcode), unix.EINVAL)
	case s.Flags&^(uapi.GOHFI_SEND_FLAG_URGENT|uapi.GOHFI_SEND_FLAG_WAIT) != 0 || s.Reserved != 0:
		return errnoErr("SEND: reserved fields set", unix.EINVAL)
	case int(s.DstCtxt) >= f.d.info.NumContexts:
		return errnoErr(fmt.Sprintf("SEND: destination context %d", s.DstCtxt), unix.EINVAL)
	case s.Length > pioBufferSize:
		return errnoErr(fmt.Sprintf("SEND: %d bytes, at most %d", s.Length, pioBufferSize), unix.EMSGSIZE)
	}
	ctx, cancel := context.WithTimeout(context.Background(), sendTimeout)
	defer cancel()
	tail := c.pioTail
	off, err := c.pioAlloc(ctx, int(s.Length))
	if err != nil {
		return err
	}
	if err := copyFromUser(c.pio.mem[off:off+int(s.Length)], UserAddr(s.Vaddr)); err != nil {
		c.pioTail = max(tail, c.pioHead) // nothing posted: the bytes are free again
		return errFault("gohfi: SEND payload")
	}
	desc := chip.SendDesc{
		Opcode: chip.OpEager, DstCtxt: s.DstCtxt, Length: s.Length,
		SrcIOVA: c.pio.iova + uint64(off), TID: s.TID, TIDOffset: s.TIDOffset, Tag: s.Tag,
	}
	if s.Flags&uapi.GOHFI_SEND_FLAG_URGENT != 0 {
		desc.Flags |= chip.DescFlagUrgent
	}
	if s.Opcode == uapi.GOHFI_SEND_EXPECTED {
		desc.Opcode = chip.OpExpected
	}
	if s.Flags&uapi.GOHFI_SEND_FLAG_WAIT != 0 || c.pioHalfFull() {
		// Someone may wait for this descriptor's consumption: the
		// sender now, or a later send that finds no room (see
		// pioHalfFull).
		desc.Flags |= chip.DescFlagIntr
	}
	if err := c.postSend(&desc); err != nil {
		return err
	}
	if s.Flags&uapi.GOHFI_SEND_FLAG_WAIT != 0 {
		return c.waitSent(ctx, func() bool { return c.sqDone == c.sqTail })
	}
	return nil
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

// postSend writes one descriptor whose payload ends the send buffer's
// allocation and rings the doorbell, a posted write: the device takes it
// before any later register access, and nothing waits for it.
func (c *ctxtData) postSend(desc *chip.SendDesc) error {
	slots := uint64(c.d.m.params.SendQueueEntries)
	slot := c.sqTail
	desc.Marshal(c.sq.mem[slot*chip.SendDescSize:])
	c.pioEnd[slot] = c.pioTail
	c.sqTail = (slot + 1) % slots
	c.d.trace(TraceDoorbell, c.ctxt, uint64(c.ctxt), c.sqTail, 0)
	return c.d.writeCSRPosted(chip.CtxtReg(c.ctxt, chip.CtxtSQTail), c.sqTail)
}

// reap frees the send buffer of the descriptors the device has consumed,
// as its SQ head (DMA'd to sqHead) says. A head that names no slot in
// flight (a device writing nonsense) frees nothing.
func (c *ctxtData) reap() {
	slots := uint64(c.d.m.params.SendQueueEntries)
	head := load64(c.sqHead.mem, 0)
	if head >= slots || (head-c.sqDone+slots)%slots > (c.sqTail-c.sqDone+slots)%slots {
		return
	}
	for c.sqDone != head {
		c.pioHead = c.pioEnd[c.sqDone]
		c.sqDone = (c.sqDone + 1) % slots
	}
}

// waitSent reaps consumed descriptors until done reports true, sleeping
// on the context's interrupt (raised by the consumption of a descriptor
// that asked for it, pioHalfFull) in between.
func (c *ctxtData) waitSent(ctx context.Context, done func() bool) error {
	for {
		wait := c.wq.wait()
		c.reap()
		if done() {
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
