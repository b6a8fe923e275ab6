package driver

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/vfio"
	"golang.org/x/sys/unix"
)

// ctxtData is one hardware receive/send context owned by an open file
// (hfi1's struct hfi1_ctxtdata): its rings in host memory, DMA-mapped for
// the device, and the event page shared with user space.
type ctxtData struct {
	d    *Device
	ctxt int

	rhq    *ringMem // receive header queue
	eager  *ringMem // eager buffers
	sq     *ringMem // send queue
	sqHead *ringMem // the device writes its SQ head here; the send queue's doorbell record (ctxtDBRecOff) and the RHQ's head record (ctxtRHQHeadRecOff) follow
	pio    *ringMem // send buffer the device reads payloads from
	events *ringMem // event bits page, mapped read-only by user space

	wq waitQueue // woken by the context's interrupt

	// rmu guards the rings against free: readers that do not hold the
	// file's lock (Poll, the notifier's generation writer) take it shared
	// and find gone set once the rings are released.
	rmu  sync.RWMutex
	gone unix.Errno // why the rings were released: EBADF (close) or ENXIO (device removed)

	// sendMu guards the send books below: the file's SEND and the
	// interrupt handler (which reaps consumed SDMA descriptors) both reap.
	sendMu sync.Mutex
	sqTail uint64 // driver's producer index
	// dbRec is the send queue's doorbell record in sqHead (nil: the
	// device has no chip.CapCtxtDBRec; ring writes CtxtSQTail).
	dbRec  []byte
	dbHook func() // test hook: runs between a record store and the notify-flag load
	// rhqHeadRec is the RHQ's consumer-index record in sqHead (false:
	// the device has no chip.CapRHQHeadRec; RCVHDR_HEAD writes
	// CtxtRHQHead), with the arm word of the receive interrupt, which
	// Poll moves before it sleeps.
	rhqHeadRec bool
	// rhqNext is, with a record, the head stored there (high 32 bits)
	// and the seq the entry at that slot carries when it is new (low 32
	// bits): read from the entry before it when RCVHDR_HEAD moved the
	// head, before the device could overwrite that entry. One word, so
	// that Poll sees the two together.
	rhqNext atomic.Uint64
	sqDone  uint64 // consumer index last read from sqHead (pio.go's reap)
	// The send buffer's ring (pio.go): byte positions since program.
	pioHead, pioTail uint64
	pioEnd           []uint64 // per send queue slot: where its payload ends

	// User SDMA (user_sdma.go): the mapping cache, the entry each send
	// queue slot's descriptor reads from (nil: a PIO send), and the
	// context's SDMA sends posted and consumed since it was set up
	// (GOHFI_EVENTS_SDMA_DONE_OFF).
	sdma                 *sdmaCache
	sdmaSlot             []*sdmaNode
	sdmaPosted, sdmaDone uint64
}

// The events page's layout is ABI: uapi.GOHFI_EVENTS_*_OFF (hfi1 maps the
// same kind of page through events_bufbase so PSM reads events without a
// system call).

// pioBufferSize is the largest single send: one TID's worth (2 MiB).
const pioBufferSize = 2 << 20

func (d *Device) setupCtxt(n int) (c *ctxtData, err error) {
	p := d.m.params
	// The undo holds its own reference: every failing return sets the
	// result c to nil before it runs.
	nc := &ctxtData{d: d, ctxt: n, sdma: newSDMACache(d)}
	c = nc
	defer func() {
		if err != nil {
			err = joinUndo(err, fmt.Sprintf("freeing context %d", n), nc.free(unix.EBADF))
		}
	}()
	allocs := []struct {
		dst   **ringMem
		name  string
		size  int
		flags uint32
	}{
		{&c.rhq, "rhq", p.RcvHdrCnt * uapi.SizeofGohfiRHQEntry, vfio.DMAWrite},
		{&c.eager, "eager", p.RcvHdrCnt * p.EagerBufferSize, vfio.DMAWrite},
		{&c.sq, "sq", p.SendQueueEntries * chip.SendDescSize, vfio.DMARead},
		{&c.sqHead, "sqhead", pageSize, vfio.DMARead | vfio.DMAWrite}, // DMARead: the doorbell record
		{&c.pio, "pio", pioRingSize, vfio.DMARead},
		{&c.events, "events", pageSize, 0},
	}
	for _, a := range allocs {
		r, err := newRingMem(fmt.Sprintf("%s%d", a.name, n), a.size)
		if err != nil {
			return nil, err
		}
		*a.dst = r
		if a.flags != 0 {
			if err := d.dmaMap(r, a.flags); err != nil {
				return nil, err
			}
		}
	}
	if d.info.CapFlags&chip.CapCtxtDBRec != 0 {
		c.dbRec = c.sqHead.mem[ctxtDBRecOff : ctxtDBRecOff+chip.DBRecSize]
	}
	c.rhqHeadRec = d.info.CapFlags&chip.CapRHQHeadRec != 0
	if err := c.program(); err != nil {
		return nil, err
	}
	d.gens.add(c, d.runningNotifier())
	return c, nil
}

// ctxtDBRecOff is where the send queue's doorbell record lies in the
// sqHead page (the SQ head the device writes is its first 8 bytes).
const ctxtDBRecOff = chip.DBRecAlign

// ctxtRHQHeadRecOff is where the RHQ's consumer-index record lies in the
// sqHead page, after the doorbell record.
const ctxtRHQHeadRecOff = ctxtDBRecOff + chip.DBRecSize

// rcvControl is CtxtControl for an enabled context, with the receive
// interrupt on (intr) or off (RECV_CTRL). With an RHQ record the interrupt
// is armed through it (chip.CtxtCtrlIntArm): entries nobody waits for raise
// nothing.
func (c *ctxtData) rcvControl(intr bool) uint64 {
	v := uint64(chip.CtxtCtrlEnable)
	if intr {
		v |= chip.CtxtCtrlIntEnable
		if c.rhqHeadRec {
			v |= chip.CtxtCtrlIntArm
		}
	}
	return v
}

// armRcv moves the RHQ record's arm word: the device raises the receive
// interrupt for its next entry. The caller looks at the queue after it.
func (c *ctxtData) armRcv() {
	if c.rhqHeadRec {
		add64(c.sqHead.mem, ctxtRHQHeadRecOff+chip.RHQArmOff, 1)
	}
}

// armWord is the arm word for the trace (0 without a record).
func (c *ctxtData) armWord() uint64 {
	c.rmu.RLock()
	defer c.rmu.RUnlock()
	if !c.rhqHeadRec || c.gone != 0 {
		return 0
	}
	return load64(c.sqHead.mem, ctxtRHQHeadRecOff+chip.RHQArmOff)
}

// program writes the ring geometry and enables the context. The doorbell
// record, if any, is set up as the device expects it at enable (chip:
// index 0, notify set, so the first doorbell also goes to the register)
// while the context is disabled.
func (c *ctxtData) program() error {
	d, n, p := c.d, c.ctxt, c.d.m.params
	if err := d.writeCtxtCSR(n, chip.CtxtControl, 0); err != nil {
		return err
	}
	var recAddr uint64
	if c.dbRec != nil {
		store32(c.dbRec, chip.DBRecSQTail, 0)
		store32(c.dbRec, chip.DBRecFlags, chip.DBRecNotify)
		recAddr = c.sqHead.iova + ctxtDBRecOff
	}
	var headAddr uint64
	if c.rhqHeadRec {
		// The device starts from head 0 at enable, and raises for the
		// first arm word other than 0.
		store64(c.sqHead.mem, ctxtRHQHeadRecOff, 0)
		store64(c.sqHead.mem, ctxtRHQHeadRecOff+chip.RHQArmOff, 0)
		c.rhqNext.Store(uint64(uapi.NextSeq(0)))
		headAddr = c.sqHead.iova + ctxtRHQHeadRecOff
	}
	regs := []struct{ reg, val uint64 }{
		{chip.CtxtRHQBase, c.rhq.iova},
		{chip.CtxtRHQEntries, uint64(p.RcvHdrCnt)},
		{chip.CtxtEagerBase, c.eager.iova},
		{chip.CtxtEagerSize, uint64(p.EagerBufferSize)},
		{chip.CtxtEagerCount, uint64(p.RcvHdrCnt)},
		{chip.CtxtSQBase, c.sq.iova},
		{chip.CtxtSQEntries, uint64(p.SendQueueEntries)},
		{chip.CtxtSQHeadAddr, c.sqHead.iova},
		{chip.CtxtDBRecAddr, recAddr},
		{chip.CtxtRHQHeadAddr, headAddr},
		{chip.CtxtControl, c.rcvControl(true)},
	}
	for _, r := range regs {
		if err := d.writeCtxtCSR(n, r.reg, r.val); err != nil {
			return err
		}
	}
	st, err := d.readCtxtCSR(n, chip.CtxtStatus)
	if err != nil {
		return err
	}
	if st&chip.CtxtStatusEnabled == 0 {
		return fmt.Errorf("context %d did not enable (status %#x): %w", n, st, errIO)
	}
	clear(c.rhq.mem)
	c.sendMu.Lock()
	store64(c.sqHead.mem, 0, 0)
	c.sqTail, c.sqDone, c.pioHead, c.pioTail = 0, 0, 0, 0
	c.pioEnd = make([]uint64, p.SendQueueEntries)
	// SDMA sends still in flight are dropped with the queue: their
	// buffers are the caller's again.
	dropped := c.sdmaSlot
	c.sdmaSlot = make([]*sdmaNode, p.SendQueueEntries)
	c.sdmaDone = c.sdmaPosted
	store64(c.events.mem, uapi.GOHFI_EVENTS_SDMA_DONE_OFF, c.sdmaDone)
	c.sendMu.Unlock()
	return c.sdma.put(dropped)
}

// disable stops the context in the device; its rings stay mapped.
func (c *ctxtData) disable() error {
	return c.d.writeCtxtCSR(c.ctxt, chip.CtxtControl, 0)
}

// free disables the context and releases its rings; why (EBADF or ENXIO)
// is what a Poll still waiting on it returns. Safe on a partially set-up
// context and when the device is gone.
func (c *ctxtData) free(why unix.Errno) error {
	c.d.gens.remove(c)
	c.rmu.Lock()
	defer c.wq.wakeAll()
	defer c.rmu.Unlock()
	c.gone = why
	var errs []error
	if !c.d.dead.Load() {
		errs = append(errs, c.disable())
	}
	for _, r := range []*ringMem{c.rhq, c.eager, c.sq, c.sqHead, c.pio} {
		if r != nil && !c.d.dead.Load() {
			errs = append(errs, c.d.dmaUnmap(r))
		}
	}
	for _, r := range []*ringMem{c.rhq, c.eager, c.sq, c.sqHead, c.pio, c.events} {
		r.free()
	}
	return errors.Join(errs...)
}

func (c *ctxtData) eventBits() uint64 { return load64(c.events.mem, uapi.GOHFI_EVENTS_BITS_OFF) }
