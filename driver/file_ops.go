package driver

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// File is one open of the device (hfi1's struct hfi1_filedata). Ioctls on a
// file are serialised, as hfi1 serialises them with its per-file mutex.
type File struct {
	d *Device

	mu        sync.Mutex
	uctxt     *ctxtData
	closed    bool
	closedErr unix.Errno    // EBADF after Close, ENXIO after the device was removed
	pollType  atomic.Int32  // HFI1_POLL_TYPE_*
	urgent    atomic.Uint64 // CtxtUrgentCnt as the last urgent Poll saw it
	pkey      uint16
	exp       *expRcv // expected receive state, set with the context
	pd        *PD     // verbs objects, made at the first verbs call
}

// Poll events (POLLIN etc. from poll.h).
const (
	POLLIN     = unix.POLLIN
	POLLPRI    = unix.POLLPRI
	POLLERR    = unix.POLLERR
	POLLRDNORM = 0x40
)

// Mmap token types (hfi1 encodes the same kind of tokens in hfi1_base_info;
// HFI1_MMAP_TOKEN).
const (
	mmapRcvHdrQ = 1
	mmapEager   = 2
	mmapEvents  = 3
)

func mmapToken(typ, unit, ctxt int) uint64 {
	return uint64(typ)<<56 | uint64(unit)<<40 | uint64(ctxt)<<32
}

// Open opens the device (hfi1_file_open).
func (d *Device) Open() (*File, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.removed || d.dead.Load() {
		return nil, fmt.Errorf("gohfi: open unit %d: %w", d.info.Unit, unix.ENXIO)
	}
	f := &File{d: d}
	d.files[f] = struct{}{}
	return f, nil
}

// errnoErr wraps an errno with the command's name.
func errnoErr(what string, e unix.Errno) error { return fmt.Errorf("gohfi: %s: %w", what, e) }

// joinUndo returns err, the failure an undo runs for, joined with the undo's
// own failure as "what: undoErr" (first cause first): an undo that leaves
// pins, mappings or device state behind is reported with the error that
// made it run, not hidden by it. A nil undoErr leaves err as it is.
func joinUndo(err error, what string, undoErr error) error {
	if undoErr == nil {
		return err
	}
	return errors.Join(err, fmt.Errorf("%s: %w", what, undoErr))
}

var errIO = unix.EIO

// Ioctl executes cmd with the user-space argument arg, always a pointer to
// the command's argument in the caller's memory, as in hfi1 (RECV_CTRL and
// POLL_TYPE read an int, ACK_EVENT an unsigned long, SET_PKEY a __u16,
// RCVHDR_HEAD a __u64 through it). Errors wrap a unix.Errno with the meaning
// the kernel gives it.
func (f *File) Ioctl(cmd uint32, arg UserPtr) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return -1, errnoErr("ioctl on closed file", f.closedErr)
	}
	if f.d.dead.Load() {
		return -1, fmt.Errorf("gohfi: ioctl %#x: %w", cmd, f.d.errGone())
	}
	if uapi.IOC_TYPE(cmd) != uapi.RDMA_IOCTL_MAGIC {
		return -1, errnoErr(fmt.Sprintf("ioctl %#x", cmd), unix.ENOTTY)
	}
	switch cmd {
	case uapi.HFI1_IOCTL_GET_VERS:
		var b [4]byte
		binary.LittleEndian.PutUint32(b[:], uapi.HFI1_USER_SWVERSION)
		return 0, wrapFault("GET_VERS", copyToUser(arg, b[:]))
	case uapi.HFI1_IOCTL_ASSIGN_CTXT:
		return 0, f.assignCtxt(arg)
	case uapi.GOHFI_IOCTL_QUERY_DEVICE:
		return 0, f.queryDevice(arg)
	}
	// Everything else needs a context (hfi1: "if (!fd->uctxt) return -EINVAL").
	if f.uctxt == nil {
		return -1, errnoErr(fmt.Sprintf("ioctl %#x without a context", cmd), unix.EINVAL)
	}
	switch cmd {
	case uapi.HFI1_IOCTL_CTXT_INFO:
		return 0, f.ctxtInfo(arg)
	case uapi.HFI1_IOCTL_USER_INFO:
		return 0, f.userInfo(arg)
	case uapi.HFI1_IOCTL_CTXT_RESET:
		return 0, f.ctxtReset()
	case uapi.HFI1_IOCTL_CREDIT_UPD:
		return 0, nil // credits are returned by the device on every descriptor
	case uapi.HFI1_IOCTL_RECV_CTRL:
		v, err := getUser(arg, 4, "RECV_CTRL")
		if err != nil {
			return -1, err
		}
		return 0, f.recvCtrl(int32(v) != 0)
	case uapi.HFI1_IOCTL_POLL_TYPE:
		v, err := getUser(arg, 4, "POLL_TYPE")
		if err != nil {
			return -1, err
		}
		if v != uapi.HFI1_POLL_TYPE_ANYRCV && v != uapi.HFI1_POLL_TYPE_URGENT {
			return -1, errnoErr("POLL_TYPE", unix.EINVAL)
		}
		f.pollType.Store(int32(v))
		return 0, nil
	case uapi.HFI1_IOCTL_SET_PKEY:
		v, err := getUser(arg, 2, "SET_PKEY")
		if err != nil {
			return -1, err
		}
		return 0, f.setPKey(uint16(v))
	case uapi.HFI1_IOCTL_ACK_EVENT:
		v, err := getUser(arg, 8, "ACK_EVENT")
		if err != nil {
			return -1, err
		}
		f.ackEvent(v)
		return 0, nil
	case uapi.HFI1_IOCTL_TID_UPDATE:
		return 0, f.exp.tidUpdate(arg)
	case uapi.HFI1_IOCTL_TID_FREE:
		return 0, f.exp.tidFree(arg)
	case uapi.HFI1_IOCTL_TID_INVAL_READ:
		return 0, f.exp.tidInvalRead(arg)
	case uapi.GOHFI_IOCTL_RCVHDR_HEAD:
		v, err := getUser(arg, 8, "RCVHDR_HEAD")
		if err != nil {
			return -1, err
		}
		return 0, f.setRcvHdrHead(v)
	case uapi.GOHFI_IOCTL_SEND:
		return 0, f.send(arg)
	case uapi.GOHFI_IOCTL_DRIVER_STATS:
		return 0, f.driverStats(arg)
	}
	if ok, err := f.verbsIoctl(cmd, arg); ok {
		if err != nil {
			return -1, err
		}
		return 0, nil
	}
	return -1, errnoErr(fmt.Sprintf("ioctl %#x", cmd), unix.ENOTTY)
}

// getUser reads a little-endian scalar of size bytes (get_user).
func getUser(arg UserPtr, size int, what string) (uint64, error) {
	var b [8]byte
	if err := copyFromUser(b[:size], arg); err != nil {
		return 0, errFault("gohfi: " + what)
	}
	return binary.LittleEndian.Uint64(b[:]), nil
}

func wrapFault(what string, err error) error {
	if err != nil {
		return errFault("gohfi: " + what)
	}
	return nil
}

// assignCtxt (hfi1 assign_ctxt): one context per file, taken from the
// device's free hardware contexts.
func (f *File) assignCtxt(arg UserPtr) error {
	var ui uapi.Hfi1UserInfo
	if err := readArg(arg, &ui, "ASSIGN_CTXT"); err != nil {
		return err
	}
	if f.uctxt != nil {
		return errnoErr("ASSIGN_CTXT: file already has a context", unix.EINVAL)
	}
	if ui.Userversion>>uapi.HFI1_SWMAJOR_SHIFT != uapi.HFI1_USER_SWMAJOR {
		return errnoErr(fmt.Sprintf("ASSIGN_CTXT: user version %#x, driver major %d", ui.Userversion, uapi.HFI1_USER_SWMAJOR), unix.ENODEV)
	}
	if ui.SubctxtCnt != 0 || ui.SubctxtID != 0 {
		return errnoErr("ASSIGN_CTXT: context sharing is not supported", unix.EINVAL)
	}
	d := f.d
	d.mu.Lock()
	n := -1
	for i, c := range d.ctxts {
		if c == nil {
			n = i
			break
		}
	}
	if n < 0 {
		d.mu.Unlock()
		return errnoErr("ASSIGN_CTXT: no free context", unix.EBUSY)
	}
	d.ctxts[n] = &ctxtData{ctxt: n} // reserve while setting up
	d.mu.Unlock()

	c, err := d.setupCtxt(n)
	if err == nil {
		f.exp, err = newExpRcv(f, c)
		if err != nil {
			err = joinUndo(err, fmt.Sprintf("freeing context %d", n), c.free(unix.EBADF))
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err != nil {
		d.ctxts[n] = nil
		return fmt.Errorf("gohfi: ASSIGN_CTXT: %w", err)
	}
	d.ctxts[n] = c
	f.uctxt = c
	return nil
}

func (f *File) ctxtInfo(arg UserPtr) error {
	d, c, p := f.d, f.uctxt, f.d.m.params
	ci := uapi.Hfi1CtxtInfo{
		RuntimeFlags:   f.runtimeFlags(),
		RcvegrSize:     uint32(p.EagerBufferSize),
		NumActive:      uint16(d.m.numUnits()),
		Unit:           uint16(d.info.Unit),
		Ctxt:           uint16(c.ctxt),
		Rcvtids:        uint16(d.info.RcvArrayPerCtxt),
		Credits:        uint16(p.SendQueueEntries),
		RecCPU:         0xffff,
		SendCtxt:       uint16(c.ctxt),
		Egrtids:        uint16(p.RcvHdrCnt),
		RcvhdrqCnt:     uint16(p.RcvHdrCnt),
		RcvhdrqEntsize: uapi.SizeofGohfiRHQEntry,
		SdmaRingSize:   uint16(p.SendQueueEntries),
	}
	var b [uapi.SizeofHfi1CtxtInfo]byte
	ci.MarshalBytes(b[:])
	return wrapFault("CTXT_INFO", copyToUser(arg, b[:]))
}

// setPKey (hfi1 set_ctxt_pkey): only a key of the port's table, never a
// management key, and only where the module checks keys at all.
func (f *File) setPKey(pkey uint16) error {
	keys := f.d.m.params.PKeys
	switch {
	case len(keys) == 0:
		return errnoErr("SET_PKEY: partition keys are not checked (no PKEY_CHECK)", unix.EPERM)
	case pkey == limMgmtPKey || pkey == fullMgmtPKey:
		return errnoErr(fmt.Sprintf("SET_PKEY: %#x is a management key", pkey), unix.EINVAL)
	case !slices.Contains(keys, pkey):
		return errnoErr(fmt.Sprintf("SET_PKEY: %#x is not in the port's table", pkey), unix.ENOENT)
	}
	f.pkey = pkey
	return nil
}

func (f *File) runtimeFlags() uint64 {
	fl := uint64(uapi.HFI1_CAP_SDMA | uapi.HFI1_CAP_MULTI_PKT_EGR)
	if len(f.d.m.params.PKeys) > 0 {
		fl |= uapi.HFI1_CAP_PKEY_CHECK
	}
	if f.d.m.params.TIDUnmapOnInvalidate {
		fl |= uapi.HFI1_CAP_TID_UNMAP
	}
	return fl
}

func (f *File) userInfo(arg UserPtr) error {
	d, c := f.d, f.uctxt
	bi := uapi.Hfi1BaseInfo{
		HwVersion:     uint32(d.info.Revision),
		SwVersion:     uapi.HFI1_USER_SWVERSION,
		RcvhdrBufbase: mmapToken(mmapRcvHdrQ, d.info.Unit, c.ctxt),
		RcvegrBufbase: mmapToken(mmapEager, d.info.Unit, c.ctxt),
		EventsBufbase: mmapToken(mmapEvents, d.info.Unit, c.ctxt),
	}
	var b [uapi.SizeofHfi1BaseInfo]byte
	bi.MarshalBytes(b[:])
	return wrapFault("USER_INFO", copyToUser(arg, b[:]))
}

// ctxtReset (hfi1 ctxt_reset): restart the context's rings after an error;
// programmed TIDs stay.
func (f *File) ctxtReset() error {
	c := f.uctxt
	if err := c.disable(); err != nil {
		return fmt.Errorf("gohfi: CTXT_RESET: %w", err)
	}
	if err := c.program(); err != nil {
		return fmt.Errorf("gohfi: CTXT_RESET: %w", err)
	}
	f.urgent.Store(0) // the device clears its count when the context is enabled
	return nil
}

func (f *File) recvCtrl(enable bool) error {
	c := f.uctxt
	// The context keeps running (sends, TIDs); only interrupts on receive
	// are switched, as hfi1 switches RcvCtrl's interrupt enable.
	return f.d.writeCtxtCSR(c.ctxt, chip.CtxtControl, c.rcvControl(enable))
}

func (f *File) setRcvHdrHead(head uint64) error {
	if head >= uint64(f.d.m.params.RcvHdrCnt) {
		return errnoErr("RCVHDR_HEAD out of range", unix.EINVAL)
	}
	c := f.uctxt
	if c.rhqHeadRec {
		// The entry before the new head was consumed and cannot have
		// been overwritten yet: the device learns the head from the
		// record below. Its seq names the next entry (a ring never
		// written holds seq 0 there, and the first entry has seq 1).
		n := uint64(f.d.m.params.RcvHdrCnt)
		next := uapi.NextSeq(rhqSeq(c.rhq.mem, (head+n-1)%n))
		c.rhqNext.Store(head<<32 | uint64(next))
		// A store the device reads when it finds the queue full: no
		// register access at all. Ordered before any later doorbell
		// record store, so a SEND the device takes after it never finds
		// the queue fuller than this head says.
		store64(c.sqHead.mem, ctxtRHQHeadRecOff, head)
		return nil
	}
	// A posted write, as hfi1's store to the mapped RcvHdrHead register:
	// the device takes it before any later register access, and nothing
	// here waits for it.
	return f.d.writeCSRPosted(chip.CtxtReg(c.ctxt, chip.CtxtRHQHead), head)
}

// setEvent sets event bits in the context's event page and wakes pollers.
func (c *ctxtData) setEvent(bits uint64) {
	p := eventsPtr(c.events.mem)
	for {
		old := atomic.LoadUint64(p)
		if old&bits == bits || atomic.CompareAndSwapUint64(p, old, old|bits) {
			break
		}
	}
	c.wq.wakeAll()
}

func (c *ctxtData) clearEvent(bits uint64) {
	p := eventsPtr(c.events.mem)
	for {
		old := atomic.LoadUint64(p)
		if old&bits == 0 || atomic.CompareAndSwapUint64(p, old, old&^bits) {
			return
		}
	}
}

// ackEvent (hfi1 user_event_ack) clears acknowledged event bits. The
// TID_MMU_NOTIFY bit is cleared by TID_INVAL_READ, under the TID lock.
func (f *File) ackEvent(bits uint64) {
	f.uctxt.clearEvent(bits &^ uapi.HFI1_EVENT_TID_MMU_NOTIFY)
}

// Poll waits until the context has an unread header queue entry (POLLIN)
// or a pending event (POLLPRI), or ctx ends. A Close or a device removal
// racing it ends it with EBADF or ENXIO.
func (f *File) Poll(ctx context.Context) (uint32, error) {
	f.mu.Lock()
	c, closed, why := f.uctxt, f.closed, f.closedErr
	if c != nil && !closed && f.d.verbs != nil {
		// CQs created later are seen by the next Poll. It cannot fail:
		// its two errors are no context and no verbs, both checked here.
		_, _ = f.pdLocked("poll")
	}
	pd := f.pd
	f.mu.Unlock()
	if closed {
		return POLLERR, errnoErr("poll on closed file", why)
	}
	if c == nil {
		return POLLERR, errnoErr("poll without a context", unix.EINVAL)
	}
	for {
		wait := c.wq.wait()
		ev, err := f.pollOnce(c, pd, false)
		if err == nil && ev == 0 {
			// Arm the header queue and the CQs before sleeping and look
			// again: an entry or completion written before the arm is
			// seen here, one after it raises the context's interrupt,
			// which ends the wait.
			ev, err = f.pollOnce(c, pd, true)
		}
		if err != nil || ev != 0 {
			return ev, err
		}
		if f.d.tracing() {
			f.d.trace(TracePollSleep, c.ctxt, c.armWord(), 0, 0)
		}
		select {
		case <-wait:
		case <-f.d.deadCh: // markDead also wakes wait; this does not depend on it
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}

// pollOnce reads the context's state for Poll, holding its rings in place;
// with arm it first arms the interrupts of the header queue and the CQs.
func (f *File) pollOnce(c *ctxtData, pd *PD, arm bool) (uint32, error) {
	c.rmu.RLock()
	defer c.rmu.RUnlock()
	if c.gone != 0 {
		return POLLERR, errnoErr("poll: file closed", c.gone)
	}
	if f.d.dead.Load() {
		return POLLERR, fmt.Errorf("gohfi: poll: %w", f.d.errGone())
	}
	if arm {
		c.armRcv()
	}
	var ev uint32
	if c.eventBits() != 0 {
		ev |= POLLPRI
	}
	rcv, err := f.receiveReady(c)
	if err != nil {
		return POLLERR, err
	}
	if rcv {
		ev |= POLLIN | POLLRDNORM
	}
	if pd != nil && ev&POLLIN == 0 {
		cev, err := pd.pollCQs(arm)
		if err != nil {
			return POLLERR, err
		}
		ev |= cev
	}
	return ev, nil
}

// receiveReady is Poll's receive condition, by POLL_TYPE: any unread header
// queue entry, or (HFI1_POLL_TYPE_URGENT, hfi1's poll_urgent) urgent packets
// arrived since the last Poll that reported them.
func (f *File) receiveReady(c *ctxtData) (bool, error) {
	if f.pollType.Load() == uapi.HFI1_POLL_TYPE_URGENT {
		n, err := f.d.readCtxtCSR(c.ctxt, chip.CtxtUrgentCnt)
		if err != nil {
			return false, err
		}
		seen := f.urgent.Load()
		return n != seen && f.urgent.CompareAndSwap(seen, n), nil
	}
	if c.rhqHeadRec {
		// From host memory, no register access: the entry at the head
		// is new when it carries the seq that follows the one consumed
		// before it (the device writes seq last).
		hn := c.rhqNext.Load()
		return rhqSeq(c.rhq.mem, hn>>32) == uint32(hn), nil
	}
	head, err := f.d.readCtxtCSR(c.ctxt, chip.CtxtRHQHead)
	if err != nil {
		return false, err
	}
	tail, err := f.d.readCtxtCSR(c.ctxt, chip.CtxtRHQTail)
	if err != nil {
		return false, err
	}
	return head != tail, nil
}

// Mmap maps a context region named by a token from USER_INFO into the
// caller: the header queue and eager buffers read-only, as hfi1 maps them,
// and the event page read-only. Unmap with unix.Munmap.
func (f *File) Mmap(token uint64, length int, prot int) ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.uctxt
	if f.closed {
		return nil, errnoErr("mmap on closed file", f.closedErr)
	}
	if c == nil {
		return nil, errnoErr("mmap without a context", unix.EINVAL)
	}
	var r *ringMem
	for _, t := range []struct {
		typ int
		r   *ringMem
	}{{mmapRcvHdrQ, c.rhq}, {mmapEager, c.eager}, {mmapEvents, c.events}} {
		if token == mmapToken(t.typ, f.d.info.Unit, c.ctxt) {
			r = t.r
		}
	}
	if r == nil {
		return nil, errnoErr(fmt.Sprintf("mmap token %#x", token), unix.EINVAL)
	}
	if prot&unix.PROT_WRITE != 0 || prot&unix.PROT_EXEC != 0 {
		return nil, errnoErr("mmap: region is read-only", unix.EPERM)
	}
	if length <= 0 || length > len(r.mem) {
		return nil, errnoErr(fmt.Sprintf("mmap length %d of %d", length, len(r.mem)), unix.EINVAL)
	}
	m, err := r.userMap(unix.PROT_READ)
	if err != nil {
		return nil, fmt.Errorf("gohfi: mmap: %w", err)
	}
	return m[:length], nil
}

// Close releases the file's context: TIDs unprogrammed, unmapped and
// unpinned, notifier subscriptions removed, rings freed (hfi1_file_close).
func (f *File) Close() error {
	err := f.release(unix.EBADF)
	f.d.mu.Lock()
	delete(f.d.files, f)
	f.d.mu.Unlock()
	return err
}

// release frees the file's context; why is what later calls return.
func (f *File) release(why unix.Errno) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil
	}
	f.closed, f.closedErr = true, why
	c := f.uctxt
	if c == nil {
		return nil
	}
	var err error
	if f.pd != nil {
		err = f.pd.close(why)
	}
	if f.exp != nil {
		err = errors.Join(err, f.exp.close())
	}
	err = errors.Join(err, c.free(why))
	// The context is disabled: the device reads no SDMA buffer any more.
	err = errors.Join(err, c.sdma.close())
	f.d.mu.Lock()
	f.d.ctxts[c.ctxt] = nil
	f.d.mu.Unlock()
	f.uctxt = nil
	runtime.KeepAlive(c)
	return err
}

func (m *Module) numUnits() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.devices)
}
