package driver

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/userfault"
	"golang.org/x/sys/unix"
)

// Implicit ODP (chip.CapImplicitODP), in the shape of mlx5's implicit MR
// (drivers/infiniband/hw/mlx5/odp.c): REG_MR of the whole address space
// (address 0, length UINT64_MAX, IB_ACCESS_ON_DEMAND) makes a parent MR
// whose MPT entry (MPTTypeImplicit) names a child directory in the MTT,
// every entry not present. The parent's key is the lkey and rkey work
// requests use. A device access under it where the directory has no child
// faults with the parent's key; the fault handler creates the child (an
// odpMR of 1 GiB at its aligned address, with a run of
// chip.ImplicitChildPages MTT entries, all not present), writes its
// directory entry, and handles the fault in the child as any ODP fault
// (fault-around, pin budget, invalidations, flusher).
//
// Invalidations: each child is tracked over its whole 1 GiB
// (userfault.Notifier.Track) without watching it, because the range holds
// holes, other mappings and perhaps the Go heap, which Subscribe refuses.
// A fault of a child watches the pages it maps (a short-lived Subscribe of
// its fault-around window, else of the pages the access needs, else the
// fault fails) unless they are known watched (below): the VMAs registered
// then stay watched under the child's tracked range, and their UNMAP,
// REMOVE and REMAP events reach the child as an ordinary ODP MR's.
//
// Children are destroyed (directory entry zapped, TLB flushed, MTT run
// given back) when an UNMAP covers all of a child's 1 GiB, when the MTT
// has no room for a new child and a child of the file's implicit MRs maps
// nothing, and at deregistration, which tears them all down before the
// directory is zapped and freed. MR_STATS of the parent sums its children.
//
// A child remembers which of its fault-around windows are watched whole
// (implicitChild.watched) until an UNMAP, REMAP or lost event touches them:
// a fault in such a window watches nothing, and may be handled inline on
// the interrupt goroutine as an ordinary ODP fault; the others watch first
// (a syscall), on a goroutine of their own.
//
// Lock order: odpDev.mu (evict lists children under it), then
// implicitMR.mu, then verbsDev.mu and the notifier's lock (a child's MTT
// run and tracked range are made under implicitMR.mu). implicitMR.mu is
// never taken with an odpMR.mu held, and no flush is awaited under it.

// implicitMR is the parent's part of an implicit ODP MR (odpMR.imr).
type implicitMR struct {
	m *odpMR // the parent

	mu         sync.Mutex
	dead       bool
	children   map[uint64]*odpMR // by child index: va >> chip.ImplicitChildShift
	destroying int               // destroys under way: dereg and a full MTT wait for them
	settled    sync.Cond         // destroying dropped to 0; L is &mu

	// Invalidation counters of destroyed children.
	retiredInvals, retiredInvalsHandled atomic.Uint64
}

// implicitChild is a child's part of its odpMR (odpMR.child).
type implicitChild struct {
	m      *odpMR
	parent *implicitMR

	// watched holds the fault-around windows (page index / window
	// pages) whose VMAs a fault registered whole; gen counts the events
	// that forget some, so that a fault whose watch raced one does not
	// remember a window the event went through.
	wmu     sync.Mutex
	watched map[int]struct{}
	gen     uint64
}

// implicitSupported reports whether the device can take an implicit MR:
// chip.CapImplicitODP and room in the MTT for the directory and a child.
// QUERY_DEVICE advertises IBV_ODP_SUPPORT_IMPLICIT exactly then.
func (v *verbsDev) implicitSupported() bool {
	i := &v.d.info
	return v.odp != nil && i.CapFlags&chip.CapImplicitODP != 0 &&
		i.MTTEntries >= chip.ImplicitDirEntries+chip.ImplicitChildPages
}

// regImplicit is REG_MR of the whole address space: addr 0 and length
// UINT64_MAX together, with IB_ACCESS_ON_DEMAND and iova 0 (as
// ibv_reg_mr(pd, NULL, SIZE_MAX, access) sends them). Errors: EINVAL (one
// of addr and length alone, no IB_ACCESS_ON_DEMAND, iova not 0, a device
// without IBV_ODP_SUPPORT_IMPLICIT, as mlx5), EOPNOTSUPP (no ODP at all,
// as an ODP REG_MR), ENOSPC (no MPT entry or directory run). Nothing is
// pinned or mapped.
func (pd *PD) regImplicit(addr uintptr, length, iova uint64, access uint32) (*MR, error) {
	d, v := pd.d, pd.v
	switch {
	case addr != 0 || length != chip.ImplicitLength:
		return nil, errnoErr(fmt.Sprintf("REG_MR: %#x+%#x: address 0 and length UINT64_MAX name the whole address space only together (implicit ODP)", addr, length), unix.EINVAL)
	case access&uapi.IB_ACCESS_ON_DEMAND == 0:
		return nil, errnoErr("REG_MR: the whole address space needs IB_ACCESS_ON_DEMAND (implicit ODP)", unix.EINVAL)
	case iova != 0:
		return nil, errnoErr(fmt.Sprintf("REG_MR: implicit ODP with iova %#x, want 0", iova), unix.EINVAL)
	case d.info.CapFlags&chip.CapODP == 0 || v.odp == nil:
		return nil, errnoErr("REG_MR: the device has no on-demand paging", unix.EOPNOTSUPP)
	case !v.implicitSupported():
		return nil, errnoErr(fmt.Sprintf("REG_MR: the device has no implicit ODP (IBV_ODP_SUPPORT_IMPLICIT: capability %v, %d MTT entries, %d needed)",
			d.info.CapFlags&chip.CapImplicitODP != 0, d.info.MTTEntries, chip.ImplicitDirEntries+chip.ImplicitChildPages), unix.EINVAL)
	}
	o := v.odp
	if err := o.start(); err != nil {
		return nil, fmt.Errorf("gohfi: REG_MR: %w", err)
	}
	if _, err := d.notifier(); err != nil {
		return nil, fmt.Errorf("gohfi: REG_MR: %w", err)
	}
	mr := &MR{pd: pd, length: length, access: access, npages: chip.ImplicitDirEntries, mttFirst: -1}
	var err error
	if mr.index, mr.key, err = v.allocMPT(); err != nil {
		return nil, fmt.Errorf("gohfi: REG_MR: %w", err)
	}
	// The directory: freed MTT entries are zero, so every child is absent.
	if mr.mttFirst, err = v.allocMTT(chip.ImplicitDirEntries); err != nil {
		mr.mttFirst = -1
		return nil, joinUndo(fmt.Errorf("gohfi: REG_MR: implicit ODP directory: %w", err), "undo", mr.release(true))
	}
	m := &odpMR{o: o, mr: mr}
	m.imr = &implicitMR{m: m, children: map[uint64]*odpMR{}}
	m.imr.settled.L = &m.imr.mu
	mr.odp = m
	o.mu.Lock()
	o.mrs[mr.index] = m
	o.mu.Unlock()
	o.nmr.Add(1)
	return mr, mr.publish(e0(mr, pd, chip.MPTTypeImplicit))
}

// faultTarget is the odpMR whose pages hold va: m itself, or for an
// implicit MR the child of va, created if missing (on the interrupt
// goroutine, inline, a missing child is errWouldWait: creating one may
// wait for a reclaim's flush).
func (m *odpMR) faultTarget(va uint64, inline bool) (*odpMR, error) {
	if m.imr == nil {
		return m, nil
	}
	return m.imr.child(va, inline)
}

// existingTarget is faultTarget without creating: nil if va has no child.
func (m *odpMR) existingTarget(va uint64) *odpMR {
	if m.imr == nil {
		return m
	}
	im := m.imr
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.children[va>>chip.ImplicitChildShift]
}

// child returns the child holding va, creating it if needed: an MTT run
// (reclaiming idle children when the MTT is full), the tracked range, then
// the directory entry, which makes it reachable.
func (im *implicitMR) child(va uint64, inline bool) (*odpMR, error) {
	idx := va >> chip.ImplicitChildShift
	if idx >= chip.ImplicitDirEntries {
		return nil, errnoErr(fmt.Sprintf("implicit ODP: %#x is above the %d-bit address space", va, chip.ImplicitVABits), unix.EFAULT)
	}
	for reclaimed := false; ; reclaimed = true {
		im.mu.Lock()
		if im.dead {
			im.mu.Unlock()
			return nil, errnoErr("implicit ODP: MR deregistered", unix.ENOENT)
		}
		if c := im.children[idx]; c != nil {
			im.mu.Unlock()
			return c, nil
		}
		if inline {
			im.mu.Unlock()
			return nil, errWouldWait
		}
		c, err := im.newChildLocked(idx)
		im.mu.Unlock()
		if err == nil || reclaimed || !errors.Is(err, unix.ENOSPC) {
			return c, err
		}
		im.m.o.reclaimChildren(im.m.mr.pd)
	}
}

// newChildLocked creates child idx, under im.mu.
func (im *implicitMR) newChildLocked(idx uint64) (*odpMR, error) {
	p := im.m
	o, v := p.o, p.o.v
	not := o.d.runningNotifier()
	if not == nil {
		return nil, errnoErr("implicit ODP: the invalidation notifier is gone", unix.EIO)
	}
	first, err := v.allocMTT(chip.ImplicitChildPages)
	if err != nil {
		return nil, fmt.Errorf("implicit ODP: child at %#x: %w", idx<<chip.ImplicitChildShift, err)
	}
	base := uintptr(idx << chip.ImplicitChildShift)
	mr := &MR{pd: p.mr.pd, index: p.mr.index, key: p.mr.key, addr: base, length: chip.ImplicitChildSize,
		iova: uint64(base), access: p.mr.access, mttFirst: first, npages: chip.ImplicitChildPages}
	c := &odpMR{o: o, mr: mr, start: base, end: base + chip.ImplicitChildSize,
		pages: make([]*odpChunk, chip.ImplicitChildPages), chunks: map[*odpChunk]struct{}{}}
	// Nothing of the child is watched yet: every fault watches its pages.
	c.child = &implicitChild{m: c, parent: im, watched: map[int]struct{}{}}
	if c.sub, err = not.Track(c.start, c.end-c.start, childOps{c}); err != nil {
		v.freeMTT(first, chip.ImplicitChildPages)
		return nil, fmt.Errorf("implicit ODP: child at %#x: %w", base, err)
	}
	im.children[idx] = c
	// Present last: the device reaches the child only from here on. An
	// absent entry is never cached, so no flush is needed.
	store64(v.mtt, (p.mr.mttFirst+int(idx))*chip.MTTEntrySize, chip.ImplicitDirEntry(uint32(first)))
	return c, nil
}

// childOps is a child's userfault.IntervalOps: its odpMR's Invalidate, and
// an UNMAP of the child's whole range destroys the child (off the
// dispatcher: the destruction waits for TLB flushes).
type childOps struct{ c *odpMR }

func (ops childOps) Invalidate(s *userfault.Subscription, ev userfault.Event) bool {
	c := ops.c
	switch ev.Kind {
	case userfault.EventUnmap, userfault.EventRemap, userfault.EventOverflow:
		// Before the pages are zapped and the sequence moves: a fault
		// that retries then watches again.
		c.child.forget(ev)
	}
	hit := c.Invalidate(s, ev)
	if ev.Kind == userfault.EventUnmap && ev.Start <= c.start && ev.End >= c.end {
		im := c.child.parent
		im.mu.Lock()
		if !im.dead && im.children[uint64(c.start)>>chip.ImplicitChildShift] == c {
			im.destroying++
			go func() {
				defer im.destroyed()
				// A failed flush leaves the run out of circulation;
				// nothing waits for this error (the device may be gone).
				_ = im.destroy(c)
			}()
		}
		im.mu.Unlock()
	}
	return hit
}

// destroy takes child c out of the directory and apart during the MR's
// life: directory entry zapped, the child's pages zapped, flushed,
// unmapped and unpinned (odpMR.dereg), the directory entry flushed, and the
// MTT run given back (kept out of circulation if a flush failed). A fault
// that held c meanwhile finds it dead (ENOENT) and is resumed; the device
// faults again and gets a new child.
func (im *implicitMR) destroy(c *odpMR) error {
	p := im.m
	v := p.o.v
	idx := uint64(c.start) >> chip.ImplicitChildShift
	im.mu.Lock()
	if im.children[idx] != c {
		im.mu.Unlock()
		return nil
	}
	delete(im.children, idx)
	store64(v.mtt, (p.mr.mttFirst+int(idx))*chip.MTTEntrySize, 0)
	im.mu.Unlock()
	err := c.dereg()
	dead := p.o.d.dead.Load()
	if err == nil && !dead {
		err = v.flushTLB(p.mr.mttFirst+int(idx), 1)
	}
	im.retire(c)
	if err == nil || dead {
		v.freeMTT(c.mr.mttFirst, chip.ImplicitChildPages)
	}
	return err
}

// destroyed ends a destroy counted in destroying.
func (im *implicitMR) destroyed() {
	im.mu.Lock()
	if im.destroying--; im.destroying == 0 {
		im.settled.Broadcast()
	}
	im.mu.Unlock()
}

// waitDestroysLocked waits, under im.mu, until no destroy is under way.
func (im *implicitMR) waitDestroysLocked() {
	for im.destroying > 0 {
		im.settled.Wait()
	}
}

// retire keeps a destroyed child's counters for the parent's MR_STATS.
func (im *implicitMR) retire(c *odpMR) {
	im.retiredInvals.Add(c.invals.Load())
	im.retiredInvalsHandled.Add(c.invalsHandled.Load())
}

// reclaimChildren makes room in a full MTT: it waits for the destroys
// under way of pd's implicit MRs (an munmap of a whole child), then
// destroys their children that map nothing.
func (o *odpDev) reclaimChildren(pd *PD) {
	o.mu.Lock()
	var ims []*implicitMR
	for _, m := range o.mrs {
		if m.imr != nil && m.mr.pd == pd {
			ims = append(ims, m.imr)
		}
	}
	o.mu.Unlock()
	for _, im := range ims {
		im.mu.Lock()
		im.waitDestroysLocked()
		im.mu.Unlock()
		for _, c := range im.list() {
			if c.pagesPinned() != 0 {
				continue
			}
			im.mu.Lock()
			ok := !im.dead
			if ok {
				im.destroying++
			}
			im.mu.Unlock()
			if !ok {
				continue
			}
			// A failed flush leaves the run out of circulation: not
			// reclaimed, and the fault fails with ENOSPC.
			_ = im.destroy(c)
			im.destroyed()
		}
	}
}

// list returns the live children.
func (im *implicitMR) list() []*odpMR {
	im.mu.Lock()
	defer im.mu.Unlock()
	out := make([]*odpMR, 0, len(im.children))
	for _, c := range im.children {
		out = append(out, c)
	}
	return out
}

// children returns the live children of an implicit MR (nil for others),
// for the pin budget's eviction.
func (m *odpMR) children() []*odpMR {
	if m.imr == nil {
		return nil
	}
	return m.imr.list()
}

// dereg tears down an implicit MR after its MPT entry was made free (the
// device refuses its key from then on): no new child, every child taken
// apart (pages zapped, flushed, unmapped, unpinned; MTT run given back).
// The caller then zaps, flushes and frees the directory with the MR.
func (im *implicitMR) dereg() error {
	p := im.m
	o, v := p.o, p.o.v
	o.forget(p)
	im.mu.Lock()
	im.dead = true
	kids := im.children
	im.children = map[uint64]*odpMR{}
	im.waitDestroysLocked()
	im.mu.Unlock()
	var errs []error
	for idx, c := range kids {
		store64(v.mtt, (p.mr.mttFirst+int(idx))*chip.MTTEntrySize, 0)
		err := c.dereg()
		im.retire(c)
		// The MPT entry is free, so no translation reaches the run
		// through a stale directory entry; the run's own entries are
		// flushed by c.dereg.
		if err == nil || o.d.dead.Load() {
			v.freeMTT(c.mr.mttFirst, chip.ImplicitChildPages)
		}
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// pagesPinned is how many pages the children map.
func (im *implicitMR) pagesPinned() int {
	n := 0
	for _, c := range im.list() {
		n += c.pagesPinned()
	}
	return n
}

// stats adds the children's invalidations to the parent's MR_STATS
// (faults and prefetches are counted on the parent itself).
func (im *implicitMR) stats(s *uapi.GohfiMRStats) {
	s.PageInvalidations += im.retiredInvals.Load()
	s.PageInvalidationsHandled += im.retiredInvalsHandled.Load()
	for _, c := range im.list() {
		s.PageInvalidations += c.invals.Load()
		s.PageInvalidationsHandled += c.invalsHandled.Load()
	}
}

// mustWatch reports whether a fault of m must watch pages before it pins
// those of win: an ordinary ODP MR after an UNMAP or REMAP went through it
// (odpMR.rewatch), an implicit MR's child unless every window win touches
// is watched whole.
func (m *odpMR) mustWatch(win pageSpan) bool {
	if m.child == nil {
		return m.rewatch.Load()
	}
	return !m.child.isWatched(win)
}

// windows is the range of window indices [lo, hi) that pages s touch
// (whole: only those s covers entirely).
func (ch *implicitChild) windows(s pageSpan, whole bool) (lo, hi int) {
	wp := int(ch.m.o.window() / pageSize)
	if whole {
		return (s.first + wp - 1) / wp, s.last / wp
	}
	return s.first / wp, (s.last + wp - 1) / wp
}

func (ch *implicitChild) isWatched(win pageSpan) bool {
	if win.empty() {
		return true
	}
	lo, hi := ch.windows(win, false)
	ch.wmu.Lock()
	defer ch.wmu.Unlock()
	for w := lo; w < hi; w++ {
		if _, ok := ch.watched[w]; !ok {
			return false
		}
	}
	return true
}

// watchGen is the generation a watch starts under.
func (ch *implicitChild) watchGen() uint64 {
	ch.wmu.Lock()
	defer ch.wmu.Unlock()
	return ch.gen
}

// remember records the windows s covers whole as watched, unless an
// event forgot windows since gen.
func (ch *implicitChild) remember(s pageSpan, gen uint64) {
	lo, hi := ch.windows(s, true)
	ch.wmu.Lock()
	defer ch.wmu.Unlock()
	if ch.gen != gen {
		return
	}
	for w := lo; w < hi; w++ {
		ch.watched[w] = struct{}{}
	}
}

// forget drops the windows an UNMAP or REMAP touched (all of them for a
// lost event): a new mapping there is not registered yet.
func (ch *implicitChild) forget(ev userfault.Event) {
	ch.wmu.Lock()
	defer ch.wmu.Unlock()
	ch.gen++
	if ev.Kind == userfault.EventOverflow {
		clear(ch.watched)
		return
	}
	s := ch.m.span(ev.Start, ev.End)
	if s.empty() {
		return
	}
	lo, hi := ch.windows(s, false)
	if hi-lo > len(ch.watched) {
		for w := range ch.watched {
			if w >= lo && w < hi {
				delete(ch.watched, w)
			}
		}
		return
	}
	for w := lo; w < hi; w++ {
		delete(ch.watched, w)
	}
}

// rewatchFault watches the pages a fault of m is about to map (see
// mustWatch) and returns the window to map. An ordinary ODP MR rewatches
// as rewatchRange says. A child of an implicit MR watches its fault-around
// window (and remembers it), else only the pages the access needs (the
// window shrinks to them), else the fault fails: a page mapped without
// being watched would outlive its munmap on the device.
func (m *odpMR) rewatchFault(win, need pageSpan) (*userfault.Subscription, pageSpan, error) {
	if m.child == nil {
		return m.rewatchRange(win), win, nil
	}
	gen := m.child.watchGen()
	n := m.o.d.runningNotifier()
	if n == nil {
		return nil, pageSpan{}, errnoErr("implicit ODP: the invalidation notifier is gone", unix.EIO)
	}
	ops := userfault.InvalidateFunc(func(*userfault.Subscription, userfault.Event) bool { return false })
	watch := func(s pageSpan) (*userfault.Subscription, error) {
		return n.Subscribe(m.start+uintptr(s.first)*pageSize, uintptr(s.last-s.first)*pageSize, ops)
	}
	var err error
	if !win.empty() {
		var s *userfault.Subscription
		if s, err = watch(win); err == nil {
			m.child.remember(win, gen)
			return s, win, nil
		}
	}
	if need.empty() {
		// PREFETCH_NO_FAULT: nothing it must map.
		return nil, pageSpan{}, nil
	}
	if need != win {
		var s *userfault.Subscription
		if s, err = watch(need); err == nil {
			return s, need, nil
		}
	}
	return nil, pageSpan{}, fmt.Errorf("implicit ODP: watch %#x+%#x: %w", m.start+uintptr(need.first)*pageSize,
		(need.last-need.first)*pageSize, errors.Join(err, unix.EFAULT))
}
