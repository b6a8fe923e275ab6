package driver

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/gohfi/gohfi/userfault"
	"github.com/gohfi/gohfi/vfio"
	"golang.org/x/sys/unix"
)

// User SDMA (hfi1's user_sdma.c with its pin cache, pin_system.c and
// mmu_rb.c): a send with GOHFI_SEND_FLAG_SDMA is not copied into the send
// buffer; its payload is read by the device from the caller's own pages,
// DMA-mapped through a small per-context cache keyed by address range.
//
// A cache entry (sdmaNode) is a page-aligned range mapped by mapUser
// (memfd-backed: with its file; anonymous: pinned) and watched by its own
// notifier subscription. Each descriptor posted from it holds a reference,
// dropped when the device has consumed the descriptor (reap). An
// invalidation (munmap, mremap, madvise of any part of the range) takes
// the entry out of the cache at once, so no later send uses it; its
// mapping and pin are released when its last descriptor is consumed.
// Before a lookup the send waits until every invalidation begun before it
// (an munmap that has returned) is delivered, so memory freed and mapped
// again at the same address is never a hit: a stale entry is never used.

// sdmaCacheMax bounds the entries a context keeps; idle ones beyond it are
// released, least recently used first.
const sdmaCacheMax = 64

// sdmaRetries bounds how often a miss maps a range again when an
// invalidation raced with the mapping, before SEND fails with EBUSY.
const sdmaRetries = 3

type sdmaCache struct {
	d *Device

	mu     sync.Mutex
	nodes  []*sdmaNode // live entries, least recently used first
	closed bool
}

// sdmaNode is one cached mapping (hfi1's sdma_mmu_node).
type sdmaNode struct {
	q          *sdmaCache
	start, end uintptr // page-aligned
	userMapping
	sub *userfault.Subscription

	// under q.mu:
	refs     int  // descriptors in flight reading from it
	live     bool // in q.nodes (committed)
	invalid  bool // the memory went away: no new hits
	released bool // mapping and subscription dropped (or being dropped)
}

// sdmaNoBuffer marks the send queue slot of an SDMA send of no bytes: it
// counts as an SDMA send, and holds nothing (put skips it: released).
var sdmaNoBuffer = &sdmaNode{released: true}

func newSDMACache(d *Device) *sdmaCache { return &sdmaCache{d: d} }

// get returns a cache entry covering [vaddr, vaddr+length), with a
// reference for one descriptor, and the payload's IOVA in it.
func (q *sdmaCache) get(ctx context.Context, vaddr uintptr, length uint32) (*sdmaNode, uint64, error) {
	if vaddr == 0 || !userRange(vaddr, uintptr(length)) {
		return nil, 0, errnoErr(fmt.Sprintf("SEND: %#x+%d is not a user address range", vaddr, length), unix.EFAULT)
	}
	start := vaddr &^ (pageSize - 1)
	end := (vaddr + uintptr(length) + pageSize - 1) &^ (pageSize - 1)
	// An munmap that returned before this send has opened a notifier
	// window: once it is delivered, its entries are out of the cache.
	if err := q.d.waitInvalidations(ctx); err != nil {
		return nil, 0, fmt.Errorf("gohfi: SEND: waiting for invalidations: %w", errors.Join(err, unix.ETIMEDOUT))
	}
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return nil, 0, errnoErr("SEND: context closed", unix.EBADF)
	}
	for i, n := range q.nodes {
		if !n.invalid && n.start <= start && end <= n.end {
			n.refs++
			if i != len(q.nodes)-1 { // most recently used last
				q.nodes = append(append(q.nodes[:i:i], q.nodes[i+1:]...), n)
			}
			q.mu.Unlock()
			return n, n.iova + uint64(vaddr-n.start), nil
		}
	}
	q.mu.Unlock()
	for try := 1; ; try++ {
		n, err := q.insert(start, end)
		if err == nil {
			return n, n.iova + uint64(vaddr-n.start), nil
		}
		if !errors.Is(err, errSDMARaced) || try == sdmaRetries {
			return nil, 0, err
		}
	}
}

var errSDMARaced = errnoErr("SEND: buffer invalidated while it was mapped", unix.EBUSY)

// insert maps [start, end) as a new entry with one reference. As
// TID_UPDATE, it subscribes first and maps with no lock held; an
// invalidation that lands meanwhile gives errSDMARaced and leaves nothing.
func (q *sdmaCache) insert(start, end uintptr) (*sdmaNode, error) {
	d := q.d
	not, err := d.notifier()
	if err != nil {
		return nil, fmt.Errorf("gohfi: SEND: %w", err)
	}
	n := &sdmaNode{q: q, start: start, end: end}
	size := uint64(end - start)
	if n.sub, err = not.Subscribe(start, end-start, n); err != nil {
		if errors.Is(err, userfault.ErrClosed) {
			return nil, fmt.Errorf("gohfi: SEND: %w", errors.Join(err, unix.ENXIO))
		}
		// The range is not (wholly) mapped, or lies in the Go heap.
		return nil, fmt.Errorf("gohfi: SEND: watch %#x+%d: %w", start, size, errors.Join(err, unix.EFAULT))
	}
	seq := n.sub.ReadBegin()
	shm, shmOff, err := userfault.ShmemFile(start, end-start, false)
	if err != nil {
		n.sub.Remove()
		return nil, fmt.Errorf("gohfi: SEND: %w", err)
	}
	n.userMapping, err = d.mapUser(start, size, vfio.DMARead, shm, shmOff, true)
	if err != nil && errors.Is(err, unix.ENOMEM) && shm == nil {
		// The memlock limit: give back the idle entries' pins and try
		// once more (hfi1 evicts from its pin cache the same way).
		if eerr := q.release(q.evictIdle(0)); eerr != nil {
			err = errors.Join(err, eerr)
		} else {
			n.userMapping, err = d.mapUser(start, size, vfio.DMARead, shm, shmOff, true)
		}
	}
	if shm != nil {
		_ = shm.Close() // never written through: nothing a close could lose
	}
	if err != nil {
		n.sub.Remove()
		return nil, fmt.Errorf("gohfi: SEND: map %#x+%d: %w", start, size, err)
	}
	raced := n.sub.ReadRetry(seq)
	q.mu.Lock()
	if raced || n.invalid || q.closed {
		closed := q.closed
		n.released = true
		q.mu.Unlock()
		rerr := q.release([]*sdmaNode{n})
		if closed {
			return nil, errors.Join(errnoErr("SEND: context closed", unix.EBADF), rerr)
		}
		return nil, errors.Join(errSDMARaced, rerr)
	}
	n.refs, n.live = 1, true
	q.nodes = append(q.nodes, n)
	evict := q.evictIdleLocked(sdmaCacheMax)
	q.mu.Unlock()
	// The new entry stands whatever happens to the old ones: a failed
	// release is a lost device (ioErr), which fails the next call anyway.
	_ = q.release(evict)
	return n, nil
}

// evictIdle takes idle entries out of the cache until at most keep are
// left, least recently used first, and returns them for release.
func (q *sdmaCache) evictIdle(keep int) []*sdmaNode {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.evictIdleLocked(keep)
}

func (q *sdmaCache) evictIdleLocked(keep int) []*sdmaNode {
	var out []*sdmaNode
	kept := q.nodes[:0]
	over := len(q.nodes) - keep
	for _, n := range q.nodes {
		if over > 0 && n.refs == 0 {
			n.released, n.live = true, false
			out = append(out, n)
			over--
			continue
		}
		kept = append(kept, n)
	}
	clear(q.nodes[len(kept):])
	q.nodes = kept
	return out
}

// removeLocked takes n out of q.nodes.
func (q *sdmaCache) removeLocked(n *sdmaNode) {
	for i, m := range q.nodes {
		if m == n {
			q.nodes = append(q.nodes[:i], q.nodes[i+1:]...)
			q.nodes = q.nodes[:len(q.nodes):len(q.nodes)]
			break
		}
	}
	n.live = false
}

// Invalidate implements userfault.IntervalOps: the entry leaves the cache
// at once; if no descriptor reads from it, it is unmapped and unpinned now,
// else when the last one is consumed (put).
func (n *sdmaNode) Invalidate(_ *userfault.Subscription, ev userfault.Event) bool {
	q := n.q
	q.mu.Lock()
	if n.invalid || n.released {
		q.mu.Unlock()
		return false
	}
	n.invalid = true
	q.d.trace(TraceNotifierEvent, -1, uint64(ev.Start), uint64(ev.End), uint64(ev.Kind)<<8|uint64(ev.Source))
	if !n.live || n.refs > 0 {
		// Not committed yet (insert sees invalid and drops it), or still
		// read by the device.
		q.mu.Unlock()
		return true
	}
	q.removeLocked(n)
	n.released = true
	q.mu.Unlock()
	// No caller to tell: a failed unmap is a lost device (ioErr marks it,
	// every later call gets ENXIO); the pin is dropped regardless.
	_ = q.release([]*sdmaNode{n})
	return true
}

// put drops one descriptor's reference on each of nodes (nil entries are
// skipped); an invalidated entry whose last reference this was is
// released.
func (q *sdmaCache) put(nodes []*sdmaNode) error {
	if len(nodes) == 0 {
		return nil
	}
	var rel []*sdmaNode
	q.mu.Lock()
	for _, n := range nodes {
		if n == nil || n.released {
			continue
		}
		if n.refs--; n.refs == 0 && n.invalid {
			q.removeLocked(n)
			n.released = true
			rel = append(rel, n)
		}
	}
	q.mu.Unlock()
	return q.release(rel)
}

// release unmaps and unpins entries already taken out of the cache and
// removes their subscriptions; no lock held.
func (q *sdmaCache) release(nodes []*sdmaNode) error {
	var errs []error
	for _, n := range nodes {
		errs = append(errs, q.d.unmapUser(&n.userMapping))
		if n.sub != nil {
			n.sub.Remove()
		}
	}
	return errors.Join(errs...)
}

// close releases every entry, in flight or not: the context is disabled,
// so the device reads none of them any more. Later gets fail with EBADF.
func (q *sdmaCache) close() error {
	q.mu.Lock()
	q.closed = true
	all := q.nodes
	q.nodes = nil
	for _, n := range all {
		n.released, n.live = true, false
	}
	q.mu.Unlock()
	return q.release(all)
}

// len is how many entries the cache holds (with their mappings), for tests.
func (q *sdmaCache) len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.nodes)
}
