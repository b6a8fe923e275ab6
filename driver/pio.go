package driver

import (
	"context"
	"fmt"
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// sendTimeout bounds how long a send waits for the device to consume its
// descriptor before the context is declared hung (hfi1's SDMA/PIO timeouts).
const sendTimeout = 5 * time.Second

// send (GOHFI_IOCTL_SEND) is the PIO-style send path: the payload is copied
// from the caller into the context's send buffer, which the device reads
// through its IOVA, so the sender's own memory is never pinned or mapped.
// It returns once the device has consumed the descriptor, so the caller may
// reuse its buffer at once.
func (f *File) send(arg UserPtr) error {
	var s uapi.GohfiSend
	if err := readArg(arg, &s, "SEND"); err != nil {
		return err
	}
	c := f.uctxt
	switch {
	case s.Opcode != uapi.GOHFI_SEND_EAGER && s.Opcode != uapi.GOHFI_SEND_EXPECTED:
		return errnoErr(fmt.Sprintf("SEND: opcode %d", s.Opcode), unix.EINVAL)
	case s.Flags&^uapi.GOHFI_SEND_FLAG_URGENT != 0 || s.Reserved != 0:
		return errnoErr("SEND: reserved fields set", unix.EINVAL)
	case int(s.DstCtxt) >= f.d.info.NumContexts:
		return errnoErr(fmt.Sprintf("SEND: destination context %d", s.DstCtxt), unix.EINVAL)
	case int(s.Length) > len(c.pio.mem):
		return errnoErr(fmt.Sprintf("SEND: %d bytes, at most %d", s.Length, len(c.pio.mem)), unix.EMSGSIZE)
	}
	if err := copyFromUser(c.pio.mem[:s.Length], UserAddr(s.Vaddr)); err != nil {
		return errFault("gohfi: SEND payload")
	}
	desc := chip.SendDesc{
		Opcode: chip.OpEager, Flags: chip.DescFlagIntr, DstCtxt: s.DstCtxt, Length: s.Length,
		SrcIOVA: c.pio.iova, TID: s.TID, TIDOffset: s.TIDOffset, Tag: s.Tag,
	}
	if s.Flags&uapi.GOHFI_SEND_FLAG_URGENT != 0 {
		desc.Flags |= chip.DescFlagUrgent
	}
	if s.Opcode == uapi.GOHFI_SEND_EXPECTED {
		desc.Opcode = chip.OpExpected
	}
	ctx, cancel := context.WithTimeout(context.Background(), sendTimeout)
	defer cancel()
	return c.postSend(ctx, &desc)
}

// postSend writes one descriptor, rings the doorbell and waits until the
// device has consumed it (its SQ head, DMA'd to sqHead, passes it).
func (c *ctxtData) postSend(ctx context.Context, desc *chip.SendDesc) error {
	n := uint64(c.d.m.params.SendQueueEntries)
	slot := c.sqTail
	desc.Marshal(c.sq.mem[slot*chip.SendDescSize:])
	c.sqTail = (slot + 1) % n
	if err := c.d.writeCtxtCSR(c.ctxt, chip.CtxtSQTail, c.sqTail); err != nil {
		return err
	}
	for {
		wait := c.wq.wait()
		if load64(c.sqHead.mem, 0) == c.sqTail {
			return nil
		}
		if c.d.dead.Load() {
			return fmt.Errorf("gohfi: SEND: descriptor not consumed: %w", c.d.errGone())
		}
		select {
		case <-wait:
		case <-c.d.deadCh:
		case <-ctx.Done():
			st, _ := c.d.readCtxtCSR(c.ctxt, chip.CtxtStatus)
			return fmt.Errorf("gohfi: SEND: descriptor not consumed (context status %#x): %w", st, unix.ETIMEDOUT)
		}
	}
}
