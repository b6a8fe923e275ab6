package driver

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/dma"
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
}

// tidNode is one programmed TID (hfi1's struct tid_rb_node): a power-of-two
// run of pages, pinned, DMA-mapped at its own IOVA, written into one
// RcvArray entry and watched by its own notifier subscription.
type tidNode struct {
	e       *expRcv
	entry   int // absolute RcvArray index
	tid     uint32
	vaddr   uintptr
	npages  int
	iova    uint64
	pin     *dma.Pin
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
	defer e.mu.Unlock()
	if n.invalid || e.nodes[n.entry] != n {
		return false
	}
	n.invalid = true
	e.invalid = append(e.invalid, n.tid)
	e.d.stats.tidInvalidations.Add(1)
	if e.d.m.params.TIDUnmapOnInvalidate {
		e.clearNodeLocked(n)
	}
	e.c.setEvent(uapi.HFI1_EVENT_TID_MMU_NOTIFY)
	return true
}

// tidUpdate (HFI1_IOCTL_TID_UPDATE, hfi1_user_exp_rcv_setup).
func (e *expRcv) tidUpdate(arg uintptr) error {
	var raw [uapi.SizeofHfi1TidInfo]byte
	if err := copyFromUser(raw[:], arg); err != nil {
		return errFault("gohfi: TID_UPDATE")
	}
	var ti uapi.Hfi1TidInfo
	ti.UnmarshalBytes(raw[:])
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

	e.mu.Lock()
	defer e.unlockAndUnsubscribe()
	sets := rcvarray.SplitPages(npages, e.d.info.MaxTIDPages)
	if len(sets) > capacity {
		sets = sets[:capacity]
	}
	// Fewer free entries than sets is a partial success, as in hfi1.
	entries, err := e.alloc.Alloc(len(sets))
	if err != nil {
		return fmt.Errorf("gohfi: TID_UPDATE: %w", err)
	}
	var made []*tidNode
	undo := func() {
		for _, n := range made {
			e.releaseNodeLocked(n)
		}
		for _, ent := range entries[len(made):] {
			e.alloc.Free(ent)
		}
	}
	// Pin and map every page set first; the device cannot reach them yet.
	off := uintptr(0)
	for i, ent := range entries {
		n, err := e.pinLocked(ent, vaddr+off, sets[i])
		if err != nil {
			undo()
			return fmt.Errorf("gohfi: TID_UPDATE: %w", err)
		}
		made = append(made, n)
		off += uintptr(sets[i] * pageSize)
	}
	if h := e.d.m.testHookTIDUpdate; h != nil {
		h()
	}
	if cover.ReadRetry(seq) {
		undo()
		return errnoErr("TID_UPDATE: buffer invalidated during setup", unix.EBUSY)
	}
	// Then watch each TID and make it visible to the device.
	for _, n := range made {
		if n.sub, err = not.Subscribe(n.vaddr, uintptr(n.npages*pageSize), n); err != nil {
			undo()
			return fmt.Errorf("gohfi: TID_UPDATE: %w", err)
		}
		store64(e.d.rcvArray, n.entry*chip.RcvArrayEntrySize, uapi.RcvArrayEntry(n.iova, uint32(n.npages)))
	}
	if cover.ReadRetry(seq) {
		undo()
		return errnoErr("TID_UPDATE: buffer invalidated during setup", unix.EBUSY)
	}
	tids := make([]byte, 4*len(made))
	for i, n := range made {
		binary.LittleEndian.PutUint32(tids[4*i:], n.tid)
	}
	if err := copyToUser(uintptr(ti.Tidlist), tids); err != nil {
		undo()
		return errFault("gohfi: TID_UPDATE tidlist")
	}
	ti.Tidcnt = uint32(len(made))
	ti.Length = uint32(min(uint64(off), length))
	ti.MarshalBytes(raw[:])
	if err := copyToUser(arg, raw[:]); err != nil {
		undo()
		return errFault("gohfi: TID_UPDATE")
	}
	for _, n := range made {
		e.nodes[n.entry] = n
	}
	e.d.stats.tidsProgrammed.Add(uint64(len(made)))
	return nil
}

// pinLocked pins and DMA-maps one page set for entry; the caller programs
// the entry once the whole request is known to be intact.
func (e *expRcv) pinLocked(entry int, vaddr uintptr, npages int) (n *tidNode, err error) {
	d := e.d
	n = &tidNode{e: e, entry: entry, vaddr: vaddr, npages: npages}
	n.tid = e.alloc.TID(entry, npages)
	size := uint64(npages * pageSize)
	defer func() {
		if err != nil {
			e.releaseNodeLocked(n)
		}
	}()
	if n.pin, err = d.pinner.Pin(vaddr, int(size)); err != nil {
		return n, err
	}
	d.stats.pagesPinned.Add(uint64(npages))
	if n.iova, err = d.iova.alloc(size); err != nil {
		return n, err
	}
	m := vfio.DMAMapping{IOVA: n.iova, Vaddr: vaddr, Size: size, Flags: vfio.DMARead | vfio.DMAWrite, Access: n.pin}
	if err = d.vdev.DMAMap(m); err != nil {
		d.iova.release(n.iova, size)
		n.iova = 0
		return n, d.ioErr(fmt.Errorf("DMA map: %w", err))
	}
	return n, nil
}

// clearNodeLocked takes a TID out of the hardware and unpins it: RcvArray
// entry zeroed first, so the device cannot start a write, then the mapping
// and pin dropped.
func (e *expRcv) clearNodeLocked(n *tidNode) error {
	if n.cleared {
		return nil
	}
	n.cleared = true
	d := e.d
	var errs []error
	if d.rcvArray != nil {
		store64(d.rcvArray, n.entry*chip.RcvArrayEntrySize, 0)
	}
	size := uint64(n.npages * pageSize)
	if n.iova != 0 {
		if !d.dead.Load() {
			if err := d.vdev.DMAUnmap(n.iova, size); err != nil {
				errs = append(errs, d.ioErr(err))
			}
		}
		d.iova.release(n.iova, size)
		n.iova = 0
	}
	if n.pin != nil {
		errs = append(errs, n.pin.Unpin())
		n.pin = nil
		d.stats.pagesUnpinned.Add(uint64(n.npages))
	}
	return errors.Join(errs...)
}

// releaseNodeLocked removes a TID from the hardware, unpins it and frees
// its RcvArray entry. Its notifier subscription is queued on e.unsub and
// removed by unsubscribe after e.mu is dropped: Remove waits for a running
// Invalidate, which may be waiting for e.mu (as mmu_interval_notifier_remove
// must not be called under a lock the invalidate callback takes). Until
// then a late Invalidate finds the node gone from e.nodes and does nothing.
func (e *expRcv) releaseNodeLocked(n *tidNode) error {
	err := e.clearNodeLocked(n)
	if n.sub != nil {
		e.unsub = append(e.unsub, n.sub)
		n.sub = nil
	}
	delete(e.nodes, n.entry)
	e.alloc.Free(n.entry)
	return err
}

// unlockAndUnsubscribe drops e.mu and then removes the subscriptions of the
// TIDs released under it.
func (e *expRcv) unlockAndUnsubscribe() {
	subs := e.unsub
	e.unsub = nil
	e.mu.Unlock()
	for _, s := range subs {
		s.Remove()
	}
}

// tidFree (HFI1_IOCTL_TID_FREE): only the context's own programmed TIDs; a
// stale or foreign TID stops the call with EINVAL, after the ones before it
// were freed (tidcnt is written back with how many were).
func (e *expRcv) tidFree(arg uintptr) error {
	var raw [uapi.SizeofHfi1TidInfo]byte
	if err := copyFromUser(raw[:], arg); err != nil {
		return errFault("gohfi: TID_FREE")
	}
	var ti uapi.Hfi1TidInfo
	ti.UnmarshalBytes(raw[:])
	if ti.Tidcnt == 0 || int(ti.Tidcnt) > e.d.info.RcvArrayPerCtxt {
		return errnoErr(fmt.Sprintf("TID_FREE: tidcnt %d", ti.Tidcnt), unix.EINVAL)
	}
	tids := make([]byte, 4*ti.Tidcnt)
	if err := copyFromUser(tids, uintptr(ti.Tidlist)); err != nil {
		return errFault("gohfi: TID_FREE tidlist")
	}
	e.mu.Lock()
	freed := 0
	var ferr error
	for i := 0; i < int(ti.Tidcnt); i++ {
		tid := binary.LittleEndian.Uint32(tids[4*i:])
		entry, _, err := e.alloc.TIDEntry(tid)
		n := e.nodes[entry]
		if err != nil || n == nil || n.tid != tid {
			ferr = errnoErr(fmt.Sprintf("TID_FREE: TID %#x is not programmed in this context", tid), unix.EINVAL)
			break
		}
		if err := e.releaseNodeLocked(n); err != nil && ferr == nil {
			ferr = fmt.Errorf("gohfi: TID_FREE: %w", err)
		}
		e.dropInvalidLocked(tid)
		freed++
	}
	e.unlockAndUnsubscribe()
	e.d.stats.tidsFreed.Add(uint64(freed))
	ti.Tidcnt = uint32(freed)
	ti.MarshalBytes(raw[:])
	if err := copyToUser(arg, raw[:]); err != nil && ferr == nil {
		ferr = errFault("gohfi: TID_FREE")
	}
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

// tidInvalRead (HFI1_IOCTL_TID_INVAL_READ): copy the invalidated TIDs and
// clear the event bit under the same lock, so an invalidation that lands
// after the copy sets the bit again and is never missed.
func (e *expRcv) tidInvalRead(arg uintptr) error {
	var raw [uapi.SizeofHfi1TidInfo]byte
	if err := copyFromUser(raw[:], arg); err != nil {
		return errFault("gohfi: TID_INVAL_READ")
	}
	var ti uapi.Hfi1TidInfo
	ti.UnmarshalBytes(raw[:])
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
		if err := copyToUser(uintptr(ti.Tidlist), b); err != nil {
			return errFault("gohfi: TID_INVAL_READ tidlist")
		}
	}
	ti.Tidcnt = uint32(n)
	ti.MarshalBytes(raw[:])
	if err := copyToUser(arg, raw[:]); err != nil {
		return errFault("gohfi: TID_INVAL_READ")
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
	defer e.unlockAndUnsubscribe()
	var errs []error
	for _, n := range e.nodes {
		errs = append(errs, e.releaseNodeLocked(n))
	}
	e.invalid = nil
	return errors.Join(errs...)
}

// notifier returns the device's invalidation notifier, starting it at first
// use (userfaultfd and eBPF tracepoint sources; at least one must start).
func (d *Device) notifier() (*userfault.Notifier, error) {
	d.notMu.Lock()
	defer d.notMu.Unlock()
	if d.not != nil {
		return d.not, nil
	}
	n, err := userfault.New(context.Background(), userfault.Options{})
	if err != nil {
		return nil, fmt.Errorf("start invalidation notifier: %w", err)
	}
	d.not = n
	return n, nil
}
