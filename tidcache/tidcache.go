// Package tidcache is the user-space side of hfi1's TID caching, the role
// PSM's ips_tidcache plays: it keeps buffers registered with TID_UPDATE
// across receives, so a receive into a buffer used before costs a lookup, not
// a pin and a device update.
//
// Entries are found by address range and reference counted; idle entries
// (refcount 0) sit on an LRU list and are evicted when TID_UPDATE reports
// ENOSPC (RcvArray full) or ENOMEM (memlock limit), then the update is
// retried. Before every lookup the cache reads the context's events page
// (two atomic loads, no system call): the invalidation generation that the
// driver moves before an munmap, mremap or madvise of registered memory
// returns, and the TID_MMU_NOTIFY bit. When either says something changed,
// it reads the invalidated TIDs with TID_INVAL_READ (which waits until the
// invalidations begun are delivered), drops their entries from the index,
// and frees them with TID_FREE once idle. So a buffer freed and replaced at
// the same address is never a hit. The hit path makes no system call and
// touches no device register.
package tidcache

import (
	"cmp"
	"container/list"
	"errors"
	"fmt"
	"slices"

	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// Entry is a registered buffer: its TIDs cover [Addr, Addr+Length).
type Entry struct {
	Addr   uintptr
	Length int
	TIDs   []uint32

	refs    int
	invalid bool          // memory went away: no new hits, free when idle
	lru     *list.Element // on the idle list while refs == 0
}

// Stats counts what the cache did.
type Stats struct {
	Hits, Misses, Evictions, Invalidations, Frees uint64
}

// Options bound the cache.
type Options struct {
	// MaxTIDs caps the TIDs the cache holds (PSM: 2048). 0: no cap beyond
	// the RcvArray.
	MaxTIDs int
}

// Cache is a TID cache for one context. It is not safe for concurrent use,
// like PSM's per-endpoint cache.
type Cache struct {
	f      *driver.File
	events []byte // the context's event page, mapped read-only
	opts   Options

	gen    uint64               // GOHFI_EVENTS_GEN_OPENED value taken in
	index  map[uintptr][]*Entry // by start address: the common exact hit
	byAddr []*Entry             // every indexed entry, sorted by Addr: a hit inside a buffer
	maxLen int                  // longest Length ever indexed: bounds the search back in byAddr
	idle   *list.List           // *Entry, least recently used first
	tids   int
	stats  Stats

	tidBuf []uint32 // scratch tidlist for the ioctls, outside hot paths
}

// New creates a cache on f, which must have a context.
func New(f *driver.File, opts Options) (*Cache, error) {
	bi, err := hfiuser.UserInfo(f)
	if err != nil {
		return nil, fmt.Errorf("tidcache: %w", err)
	}
	ev, err := f.Mmap(bi.EventsBufbase, 4096, unix.PROT_READ)
	if err != nil {
		return nil, fmt.Errorf("tidcache: map event page: %w", err)
	}
	ci, err := hfiuser.CtxtInfo(f)
	if err != nil {
		// Our own mapping of a moment ago: failing to unmap it would be a
		// bug, and the CTXT_INFO error is the one to report.
		_ = unix.Munmap(ev)
		return nil, fmt.Errorf("tidcache: %w", err)
	}
	return &Cache{f: f, events: ev, opts: opts, index: map[uintptr][]*Entry{}, idle: list.New(),
		tidBuf: make([]uint32, ci.Rcvtids)}, nil
}

// Stats returns the counters.
func (c *Cache) Stats() Stats { return c.stats }

// TIDs returns how many TIDs the cache holds.
func (c *Cache) TIDs() int { return c.tids }

// syncInvalidations brings the index up to date with every invalidation
// whose unmapping call has returned. The common case is two loads.
func (c *Cache) syncInvalidations() error {
	gen := loadEventWord(c.events, uapi.GOHFI_EVENTS_GEN_OPENED_OFF)
	if gen == c.gen && loadEventWord(c.events, uapi.GOHFI_EVENTS_BITS_OFF)&uapi.HFI1_EVENT_TID_MMU_NOTIFY == 0 {
		return nil
	}
	// Something was unmapped since the last look. If it was delivered and
	// touched none of our TIDs, the bit says so without a system call.
	if gen != c.gen && loadEventWord(c.events, uapi.GOHFI_EVENTS_GEN_DELIVERED_OFF) >= gen &&
		loadEventWord(c.events, uapi.GOHFI_EVENTS_BITS_OFF)&uapi.HFI1_EVENT_TID_MMU_NOTIFY == 0 {
		c.gen = gen
		return nil
	}
	if err := c.processInvalidations(); err != nil {
		return err
	}
	c.gen = gen
	return nil
}

// Acquire returns an entry whose TIDs cover [addr, addr+length), taking a
// reference. A hit is a lookup; a miss registers the buffer.
func (c *Cache) Acquire(addr uintptr, length int) (*Entry, error) {
	if err := c.syncInvalidations(); err != nil {
		return nil, err
	}
	if e := c.lookup(addr, length); e != nil {
		if e.refs == 0 {
			c.idle.Remove(e.lru)
			e.lru = nil
		}
		e.refs++
		c.stats.Hits++
		return e, nil
	}
	c.stats.Misses++
	e, err := c.register(addr, length)
	if err != nil {
		return nil, err
	}
	e.refs = 1
	c.insert(e)
	return e, nil
}

// lookup finds an entry whose buffer covers [addr, addr+length): first one
// that starts at addr, else one that starts before it (a receive into part
// of a registered buffer, as PSM's cache finds by range). The caller uses
// the entry's TIDs at offset addr - e.Addr.
func (c *Cache) lookup(addr uintptr, length int) *Entry {
	for _, e := range c.index[addr] {
		if e.Length >= length {
			return e
		}
	}
	end := addr + uintptr(length)
	i, _ := slices.BinarySearchFunc(c.byAddr, addr, func(e *Entry, a uintptr) int { return cmp.Compare(e.Addr, a+1) })
	for j := i - 1; j >= 0 && c.byAddr[j].Addr+uintptr(c.maxLen) >= end; j-- {
		if e := c.byAddr[j]; e.Addr+uintptr(e.Length) >= end {
			return e
		}
	}
	return nil
}

func (c *Cache) insert(e *Entry) {
	c.index[e.Addr] = append(c.index[e.Addr], e)
	i, _ := slices.BinarySearchFunc(c.byAddr, e.Addr, func(x *Entry, a uintptr) int { return cmp.Compare(x.Addr, a) })
	c.byAddr = slices.Insert(c.byAddr, i, e)
	c.maxLen = max(c.maxLen, e.Length)
}

// Release drops a reference. An idle valid entry stays registered for the
// next hit; an idle invalidated one is freed.
func (c *Cache) Release(e *Entry) error {
	if e.refs <= 0 {
		return fmt.Errorf("tidcache: release of an idle entry at %#x: %w", e.Addr, unix.EINVAL)
	}
	e.refs--
	if e.refs > 0 {
		return nil
	}
	if e.invalid {
		return c.free(e)
	}
	e.lru = c.idle.PushBack(e)
	return nil
}

// register calls TID_UPDATE, evicting idle entries and retrying on ENOSPC
// and ENOMEM, and on a partial update, until the buffer is covered or
// nothing idle is left.
func (c *Cache) register(addr uintptr, length int) (*Entry, error) {
	for {
		if c.opts.MaxTIDs > 0 && c.tids >= c.opts.MaxTIDs {
			evicted, err := c.evictOne()
			if err != nil {
				return nil, fmt.Errorf("tidcache: register %#x+%d: %w", addr, length, err)
			}
			if evicted {
				continue
			}
		}
		tids, got, err := hfiuser.TIDUpdate(c.f, addr, length, c.tidBuf)
		tids = append([]uint32(nil), tids...)
		if err == nil && got >= length {
			c.tids += len(tids)
			return &Entry{Addr: addr, Length: got, TIDs: tids}, nil
		}
		if err == nil {
			// Partial: give the TIDs back and make room.
			if ferr := c.tidFree(tids); ferr != nil {
				return nil, fmt.Errorf("tidcache: register %#x+%d: give back a partial update: %w", addr, length, ferr)
			}
			err = unix.ENOSPC
		}
		if !errors.Is(err, unix.ENOSPC) && !errors.Is(err, unix.ENOMEM) {
			return nil, fmt.Errorf("tidcache: register %#x+%d: %w", addr, length, err)
		}
		evicted, eerr := c.evictOne()
		if eerr != nil {
			return nil, fmt.Errorf("tidcache: register %#x+%d: %w (evicting: %w)", addr, length, err, eerr)
		}
		if !evicted {
			return nil, fmt.Errorf("tidcache: register %#x+%d: %w", addr, length, err)
		}
	}
}

// evictOne frees the least recently used idle entry and reports whether
// there was one.
func (c *Cache) evictOne() (bool, error) {
	front := c.idle.Front()
	if front == nil {
		return false, nil
	}
	e := front.Value.(*Entry)
	c.idle.Remove(front)
	e.lru = nil
	c.unindex(e)
	c.stats.Evictions++
	return true, c.free(e)
}

func (c *Cache) unindex(e *Entry) {
	if i := slices.Index(c.byAddr, e); i >= 0 {
		c.byAddr = slices.Delete(c.byAddr, i, i+1)
	}
	list := c.index[e.Addr]
	for i, x := range list {
		if x == e {
			list = append(list[:i], list[i+1:]...)
			break
		}
	}
	if len(list) == 0 {
		delete(c.index, e.Addr)
	} else {
		c.index[e.Addr] = list
	}
}

func (c *Cache) free(e *Entry) error {
	c.tids -= len(e.TIDs)
	c.stats.Frees++
	return c.tidFree(e.TIDs)
}

// processInvalidations reads the invalidated TIDs and retires their
// entries: out of the index at once, freed now if idle, else at Release.
func (c *Cache) processInvalidations() error {
	list, err := hfiuser.TIDInvalRead(c.f, c.tidBuf)
	if err != nil {
		return fmt.Errorf("tidcache: %w", err)
	}
	bad := make(map[uint32]bool, len(list))
	for _, t := range list {
		bad[t] = true
	}
	for _, e := range c.byAddr {
		for _, t := range e.TIDs {
			if bad[t] {
				e.invalid = true
				break
			}
		}
	}
	var errs []error
	for _, e := range slices.Clone(c.byAddr) {
		if !e.invalid {
			continue
		}
		c.stats.Invalidations++
		c.unindex(e)
		if e.refs == 0 {
			c.idle.Remove(e.lru)
			e.lru = nil
			errs = append(errs, c.free(e))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("tidcache: free invalidated entries: %w", err)
	}
	return nil
}

// Flush frees every idle entry.
func (c *Cache) Flush() error {
	var errs []error
	for {
		evicted, err := c.evictOne()
		errs = append(errs, err)
		if !evicted {
			return errors.Join(errs...)
		}
	}
}

// Close frees every idle entry and unmaps the event page. Entries still
// referenced are freed by the driver when the file closes.
func (c *Cache) Close() error {
	return errors.Join(c.Flush(), unix.Munmap(c.events))
}

func (c *Cache) tidFree(tids []uint32) error {
	_, err := hfiuser.TIDFree(c.f, tids)
	return err
}
