package driver

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/rcvarray"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/userfault"
	"github.com/gohfi/gohfi/vfio"
	"golang.org/x/sys/unix"
)

// expRcv is a context's expected-receive state (hfi1 user_exp_rcv.c): the
// RcvArray entries it owns, one tidNode per programmed TID, and the list of
// invalidated TIDs waiting for TID_INVAL_READ.
//
// Lock order: e.mu, then the notifier's own locks. The notifier calls
// Invalidate on its dispatch goroutine; Invalidate takes e.mu, so nothing
// that holds e.mu waits for the notifier (no Sync under e.mu).
type expRcv struct {
	f     *File
	c     *ctxtData
	d     *Device
	alloc *rcvarray.Allocator

	mu      sync.Mutex
	nodes   map[int]*tidNode          // by absolute RcvArray entry
	invalid []uint32                  // TIDs invalidated, not yet read (tid_used_list's invalid half)
	unsub   []*userfault.Subscription // to remove once e.mu is dropped
	unmap   []*tidNode                // cleared, to unmap and unpin once e.mu is dropped
	relErrs []error                   // errors of releases under e.mu, reported by unlockAndRelease
	closed  bool                      // the file is closing: no new TIDs
}

// tidNode is one programmed TID (hfi1's struct tid_rb_node): a power-of-two
// run of pages, pinned, DMA-mapped at its own IOVA, written into one
// RcvArray entry and watched by its own notifier subscription.
type tidNode struct {
	e      *expRcv
	entry  int // absolute RcvArray index
	tid    uint32
	vaddr  uintptr
	npages int
	userMapping
	sub     *userfault.Subscription
	invalid bool // the memory went away; reported, kept until TID_FREE
	cleared bool // RcvArray entry cleared and pages unpinned (TIDUnmapOnInvalidate)
}

func newExpRcv(f *File, c *ctxtData) (*expRcv, error) {
	per := f.d.info.RcvArrayPerCtxt
	a, err := rcvarray.New(c.ctxt*per, per)
	if err != nil {
		return nil, err
	}
	return &expRcv{f: f, c: c, d: f.d, alloc: a, nodes: map[int]*tidNode{}}, nil
}

// Invalidate implements userfault.IntervalOps for one TID. With the 2016
// semantics the entry stays programmed and the pages pinned, so a transfer
// in flight still lands in the memory the TID was given; user space learns
// of it through the event bit and TID_INVAL_READ and frees it when idle.
func (n *tidNode) Invalidate(_ *userfault.Subscription, ev userfault.Event) bool {
	e := n.e
	e.mu.Lock()
	// Nothing is queued for release here (the unmap below is inline), so
	// the unlock has nothing to report.
	defer func() { _ = e.unlockAndRelease() }()
	if n.invalid || e.nodes[n.entry] != n {
		return false
	}
	n.invalid = true
	e.invalid = append(e.invalid, n.tid)
	e.d.trace(TraceNotifierEvent, e.c.ctxt, uint64(ev.Start), uint64(ev.End), uint64(ev.Kind)<<8|uint64(ev.Source))
	e.d.trace(TraceTIDInvalidate, e.c.ctxt, uint64(n.vaddr), uint64(n.npages), uint64(n.tid))
	e.d.stats.tidInvalidations.Add(1)
	if e.d.m.params.TIDUnmapOnInvalidate && e.clearNodeLocked(n) {
		// As newer hfi1 does in its notifier: unmapped and unpinned
		// before user space hears of it. There is no caller to tell: a
		// failed unmap is a lost device (ioErr marks it, every later call
		// gets ENXIO) and the pin is dropped regardless.
		_ = n.unmapAndUnpin()
	}
	e.c.setEvent(uapi.HFI1_EVENT_TID_MMU_NOTIFY)
	return true
}

// tidUpdate (HFI1_IOCTL_TID_UPDATE, hfi1_user_exp_rcv_setup). As in hfi1,
// the slow work runs without the expected-receive lock: the pages are
// pinned and DMA-mapped first, e.mu is held only to take RcvArray entries
// and to program and commit them, and the results are copied out after it
// is dropped. An invalidation of another TID of the context (which takes
// e.mu on the notifier's one dispatcher) never waits for a large pin.
func (e *expRcv) tidUpdate(arg UserPtr) error {
	var ti uapi.Hfi1TidInfo
	if err := readArg(arg, &ti, "TID_UPDATE"); err != nil {
		return err
	}
	per := e.d.info.RcvArrayPerCtxt
	vaddr, length := uintptr(ti.Vaddr), uint64(ti.Length)
	npages := int((length + pageSize - 1) / pageSize)
	switch {
	case vaddr%pageSize != 0 || length == 0 || vaddr == 0:
		return errnoErr(fmt.Sprintf("TID_UPDATE: vaddr %#x length %d", vaddr, length), unix.EINVAL)
	case npages > per:
		return errnoErr(fmt.Sprintf("TID_UPDATE: %d pages, context has %d entries", npages, per), unix.EINVAL)
	case ti.Tidlist == 0:
		return errFault("gohfi: TID_UPDATE tidlist")
	case !userRange(vaddr, uintptr(npages*pageSize)):
		// hfi1: access_ok fails, -EFAULT. Never ENOMEM, which means the
		// memlock limit and makes a TID cache evict.
		return errnoErr(fmt.Sprintf("TID_UPDATE: %#x+%d is not a user address range", vaddr, length), unix.EFAULT)
	}
	capacity := int(ti.Tidcnt)
	if capacity == 0 {
		capacity = per // hfi1 assumes room for the context's whole expected count
	}
	not, err := e.d.notifier()
	if err != nil {
		return fmt.Errorf("gohfi: TID_UPDATE: %w", err)
	}
	// The cover subscription (hfi1's 2023 race fix): an invalidation of any
	// part of the buffer while we pin and program fails the call with EBUSY
	// and leaves nothing behind.
	cover, err := not.Subscribe(vaddr, uintptr(npages*pageSize), userfault.InvalidateFunc(func(*userfault.Subscription, userfault.Event) bool { return true }))
	if err != nil {
		return fmt.Errorf("gohfi: TID_UPDATE: watch %#x+%d: %w", vaddr, length, err)
	}
	defer cover.Remove()
	seq := cover.ReadBegin()

	sets := rcvarray.SplitPages(npages, e.d.info.MaxTIDPages)
	if len(sets) > capacity {
		sets = sets[:capacity]
	}
	// Fewer free entries than sets is a partial success, as in hfi1.
	e.mu.Lock()
	entries, err := e.alloc.Alloc(len(sets))
	e.mu.Unlock()
	if err != nil {
		return fmt.Errorf("gohfi: TID_UPDATE: %w", err)
	}
	var made []*tidNode
	// undo gives back everything this call took; the nodes were never
	// visible (not in e.nodes, RcvArray entries not written or cleared).
	undo := func() error {
		e.mu.Lock()
		for _, n := range made {
			e.releaseNodeLocked(n)
		}
		for _, ent := range entries[len(made):] {
			e.freeEntryLocked(ent)
		}
		return e.unlockAndRelease()
	}
	// memfd-backed memory is mapped by the device itself (the DMA mapping
	// carries the file): no pin, no copy through this process.
	shm, shmOff, err := userfault.ShmemFile(vaddr, uintptr(npages*pageSize), true)
	if err != nil {
		return errors.Join(fmt.Errorf("gohfi: TID_UPDATE: %w", err), undo())
	}
	if shm != nil {
		// The device's mappings hold the pages once made: the file is
		// only needed to make them.
		defer func() { _ = shm.Close() }() // never written through: nothing a close could lose
	}
	// Pin and map every page set; the device cannot reach them yet.
	off := uintptr(0)
	for i, ent := range entries {
		n, err := e.pin(ent, vaddr+off, sets[i], shm, shmOff+uint64(off))
		if err != nil {
			return errors.Join(fmt.Errorf("gohfi: TID_UPDATE: %w", err), undo())
		}
		made = append(made, n)
		off += uintptr(sets[i] * pageSize)
	}
	if h := e.d.m.testHookTIDUpdate; h != nil {
		h()
	}
	if cover.ReadRetry(seq) {
		e.d.trace(TraceTIDBusy, e.c.ctxt, uint64(vaddr), length, 0)
		return errors.Join(errnoErr("TID_UPDATE: buffer invalidated during setup", unix.EBUSY), undo())
	}
	// Watch each TID. Until the node is committed its Invalidate does
	// nothing; the cover subscription reports any event meanwhile.
	for _, n := range made {
		if n.sub, err = not.Subscribe(n.vaddr, uintptr(n.npages*pageSize), n); err != nil {
			return errors.Join(fmt.Errorf("gohfi: TID_UPDATE: %w", err), undo())
		}
	}
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return errors.Join(errnoErr("TID_UPDATE: context closed", unix.EBADF), undo())
	}
	if cover.ReadRetry(seq) {
		e.mu.Unlock()
		e.d.trace(TraceTIDBusy, e.c.ctxt, uint64(vaddr), length, 0)
		return errors.Join(errnoErr("TID_UPDATE: buffer invalidated during setup", unix.EBUSY), undo())
	}
	for _, n := range made {
		store64(e.d.rcvArray, n.entry*chip.RcvArrayEntrySize, chip.RcvArrayEntry(n.iova, uint32(n.npages)))
		e.nodes[n.entry] = n
		e.d.trace(TraceTIDRegister, e.c.ctxt, uint64(n.vaddr), uint64(n.npages), uint64(n.tid))
	}
	e.mu.Unlock()
	e.d.stats.tidsProgrammed.Add(uint64(len(made)))

	tids := make([]byte, 4*len(made))
	for i, n := range made {
		binary.LittleEndian.PutUint32(tids[4*i:], n.tid)
	}
	ti.Tidcnt = uint32(len(made))
	ti.Length = uint32(min(uint64(off), length))
	if err := copyToUser(UserAddr(ti.Tidlist), tids); err != nil {
		return errors.Join(errFault("gohfi: TID_UPDATE tidlist"), e.unprogram(made))
	}
	if err := writeArg(arg, &ti, "TID_UPDATE"); err != nil {
		return errors.Join(err, e.unprogram(made))
	}
	return nil
}

// unprogram takes back TIDs that TID_UPDATE programmed but could not report
// (hfi1 unprograms them when the copy to user fails). A TID the caller
// freed meanwhile by guessing its number is skipped.
func (e *expRcv) unprogram(made []*tidNode) error {
	e.mu.Lock()
	for _, n := range made {
		if e.nodes[n.entry] == n {
			e.dropInvalidLocked(n.tid)
			e.releaseNodeLocked(n)
			e.d.stats.tidsFreed.Add(1)
		}
	}
	return e.unlockAndRelease()
}

// userRange reports whether [vaddr, vaddr+length) lies in the user half of
// a canonical x86-64 or arm64 address space (hfi1's access_ok).
func userRange(vaddr, length uintptr) bool {
	const userTop = 1 << 47
	end := vaddr + length
	return end > vaddr && end <= userTop
}

// pin pins and DMA-maps one page set for entry, without e.mu; the caller
// programs the entry once the whole request is known to be intact. With
// shm (the memfd behind the pages, at shmOff) nothing is pinned: the
// device maps the file's pages itself, which stay the file's until the
// unmap (docs/pinning.md, "The memfd alternative").
func (e *expRcv) pin(entry int, vaddr uintptr, npages int, shm *os.File, shmOff uint64) (*tidNode, error) {
	n := &tidNode{e: e, entry: entry, vaddr: vaddr, npages: npages}
	n.tid = e.alloc.TID(entry, npages)
	var err error
	if n.userMapping, err = e.d.mapUser(vaddr, uint64(npages*pageSize), vfio.DMARead|vfio.DMAWrite, shm, shmOff, false); err != nil {
		return nil, err
	}
	return n, nil
}

// clearNodeLocked takes a TID out of the hardware: its RcvArray entry is
// zeroed at once, so the device cannot start a write. It reports whether it
// did (false: cleared before); the caller then has unmapAndUnpin run.
func (e *expRcv) clearNodeLocked(n *tidNode) bool {
	if n.cleared {
		return false
	}
	n.cleared = true
	if e.d.rcvArray != nil {
		store64(e.d.rcvArray, n.entry*chip.RcvArrayEntrySize, 0)
	}
	return true
}

// unmapAndUnpin drops a cleared TID's DMA mapping (a device round trip on
// the vfio-user path) and its pin. It runs without e.mu.
func (n *tidNode) unmapAndUnpin() error { return n.e.d.unmapUser(&n.userMapping) }

// releaseNodeLocked removes a TID from the hardware and frees its RcvArray
// entry; the unmap, the unpin and the removal of its notifier subscription
// are queued and done by unlockAndRelease after e.mu is dropped: Remove
// waits for a running Invalidate, which may be waiting for e.mu (as
// mmu_interval_notifier_remove must not be called under a lock the
// invalidate callback takes). Until then a late Invalidate finds the node
// gone from e.nodes and does nothing. The entry can be reused at once: it
// holds no address any more, and the old IOVA is released only after its
// unmap.
func (e *expRcv) releaseNodeLocked(n *tidNode) {
	if e.clearNodeLocked(n) {
		e.unmap = append(e.unmap, n)
	}
	if n.sub != nil {
		e.unsub = append(e.unsub, n.sub)
		n.sub = nil
	}
	if e.nodes[n.entry] == n {
		delete(e.nodes, n.entry)
		e.d.trace(TraceTIDUnregister, e.c.ctxt, uint64(n.vaddr), uint64(n.npages), uint64(n.tid))
	}
	e.freeEntryLocked(n.entry)
}

// freeEntryLocked gives an RcvArray entry back to the allocator. A refusal
// means the driver's books are wrong (the entry was not taken, or was
// given back twice): it is reported by the next unlockAndRelease, not lost.
func (e *expRcv) freeEntryLocked(entry int) {
	if err := e.alloc.Free(entry); err != nil {
		e.relErrs = append(e.relErrs, fmt.Errorf("RcvArray entry %d: %w", entry, err))
	}
}

// unlockAndRelease drops e.mu, then unmaps and unpins the TIDs cleared
// under it and removes their subscriptions.
func (e *expRcv) unlockAndRelease() error {
	subs, nodes, errs := e.unsub, e.unmap, e.relErrs
	e.unsub, e.unmap, e.relErrs = nil, nil, nil
	e.mu.Unlock()
	for _, n := range nodes {
		errs = append(errs, n.unmapAndUnpin())
	}
	for _, s := range subs {
		s.Remove()
	}
	return errors.Join(errs...)
}

// tidFree (HFI1_IOCTL_TID_FREE): only the context's own programmed TIDs; a
// stale or foreign TID stops the call with EINVAL, after the ones before it
// were freed. tidcnt is written back with how many were, on every return
// after the argument was read, so a caller never counts a TID twice.
func (e *expRcv) tidFree(arg UserPtr) (ferr error) {
	var ti uapi.Hfi1TidInfo
	if err := readArg(arg, &ti, "TID_FREE"); err != nil {
		return err
	}
	freed := 0
	defer func() {
		ti.Tidcnt = uint32(freed)
		writeBack(arg, &ti, "TID_FREE", &ferr)
	}()
	if ti.Tidcnt == 0 || int(ti.Tidcnt) > e.d.info.RcvArrayPerCtxt {
		return errnoErr(fmt.Sprintf("TID_FREE: tidcnt %d", ti.Tidcnt), unix.EINVAL)
	}
	tids := make([]byte, 4*ti.Tidcnt)
	if err := copyFromUser(tids, UserAddr(ti.Tidlist)); err != nil {
		return errFault("gohfi: TID_FREE tidlist")
	}
	e.mu.Lock()
	for i := 0; i < int(ti.Tidcnt); i++ {
		tid := binary.LittleEndian.Uint32(tids[4*i:])
		entry, _, err := e.alloc.TIDEntry(tid)
		n := e.nodes[entry]
		if err != nil || n == nil || n.tid != tid {
			ferr = errnoErr(fmt.Sprintf("TID_FREE: TID %#x is not programmed in this context", tid), unix.EINVAL)
			break
		}
		e.releaseNodeLocked(n)
		e.dropInvalidLocked(tid)
		freed++
	}
	if err := e.unlockAndRelease(); err != nil && ferr == nil {
		ferr = fmt.Errorf("gohfi: TID_FREE: %w", err)
	}
	e.d.stats.tidsFreed.Add(uint64(freed))
	return ferr
}

// dropInvalidLocked forgets a freed TID from the pending invalid list, so a
// later TID_INVAL_READ never reports a TID that may have been reused.
func (e *expRcv) dropInvalidLocked(tid uint32) {
	for i, t := range e.invalid {
		if t == tid {
			e.invalid = append(e.invalid[:i], e.invalid[i+1:]...)
			return
		}
	}
}

// invalWaitTimeout bounds TID_INVAL_READ's wait for invalidations in
// delivery; it is only reached if a notifier callback hangs.
const invalWaitTimeout = 10 * time.Second

// tidInvalRead (HFI1_IOCTL_TID_INVAL_READ): copy the invalidated TIDs and
// clear the event bit under the same lock, so an invalidation that lands
// after the copy sets the bit again and is never missed.
func (e *expRcv) tidInvalRead(arg UserPtr) error {
	var ti uapi.Hfi1TidInfo
	if err := readArg(arg, &ti, "TID_INVAL_READ"); err != nil {
		return err
	}
	// Report every invalidation whose munmap has returned: wait until the
	// ones begun (GOHFI_EVENTS_GEN_OPENED) are delivered.
	ctx, cancel := context.WithTimeout(context.Background(), invalWaitTimeout)
	err := e.d.waitInvalidations(ctx)
	cancel()
	if err != nil {
		return fmt.Errorf("gohfi: TID_INVAL_READ: %w", errors.Join(err, unix.ETIMEDOUT))
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	n := len(e.invalid)
	if ti.Tidcnt != 0 && int(ti.Tidcnt) < n {
		n = int(ti.Tidcnt) // room for fewer: the rest stay queued, the bit stays set
	}
	if n > 0 {
		if ti.Tidlist == 0 {
			return errFault("gohfi: TID_INVAL_READ tidlist")
		}
		b := make([]byte, 4*n)
		for i, t := range e.invalid[:n] {
			binary.LittleEndian.PutUint32(b[4*i:], t)
		}
		if err := copyToUser(UserAddr(ti.Tidlist), b); err != nil {
			return errFault("gohfi: TID_INVAL_READ tidlist")
		}
	}
	ti.Tidcnt = uint32(n)
	if err := writeArg(arg, &ti, "TID_INVAL_READ"); err != nil {
		return err
	}
	e.invalid = e.invalid[n:]
	if len(e.invalid) == 0 {
		e.c.clearEvent(uapi.HFI1_EVENT_TID_MMU_NOTIFY)
	}
	e.d.stats.tidInvalReads.Add(uint64(n))
	return nil
}

// close releases every TID of the context (file close or device removal).
func (e *expRcv) close() error {
	e.mu.Lock()
	e.closed = true
	for _, n := range e.nodes {
		e.releaseNodeLocked(n)
	}
	e.invalid = nil
	return e.unlockAndRelease()
}
