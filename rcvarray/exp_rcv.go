package rcvarray

import (
	"fmt"
	"math/bits"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/chip"
)

// Which list a group is on.
const (
	listEmpty = iota
	listPartial
	listFull
	numLists
)

var listNames = [numLists]string{"empty", "partial", "full"}

// tidGroup is one group of consecutive entries (struct tid_group), of
// chip.RcvArrayGroupSize (hfi1's RCV_INCREMENT).
// Groups are linked into their list by index, so moving a group is O(1)
// without pointers the garbage collector has to chase.
type tidGroup struct {
	base       int   // absolute index of the first entry
	used       uint8 // entries handed out
	bitmap     uint8 // bit i set: entry base+i handed out (compile-time check below)
	list       uint8
	prev, next int32 // neighbours on the list, -1 at the ends
}

// A group's entries fit tidGroup.bitmap (a negative array length does not
// compile).
var _ [8 - chip.RcvArrayGroupSize]struct{}

// tidList is a list of groups with its length (struct exp_tid_set).
type tidList struct {
	head, tail int32
	count      int
}

// Allocator hands out the RcvArray entries of one receive context. Groups
// (chip.RcvArrayGroupSize entries) sit on one of three lists, as hfi1 keeps them
// (tid_group_list, tid_used_list, tid_full_list): empty, partially used and
// full. Allocation takes whole empty groups for every group's worth of entries
// requested, then fills partially used groups, then starts new ones; Free
// moves a group back as it empties.
//
// An Allocator is not safe for concurrent use: the caller serialises, as hfi1
// does with the context's exp_lock.
type Allocator struct {
	base, count int
	groups      []tidGroup
	lists       [numLists]tidList
	used        int
}

// Stats is a snapshot of an Allocator's counters.
type Stats struct {
	Free, Used                             int // entries
	EmptyGroups, PartialGroups, FullGroups int
}

// New returns an allocator of the count entries starting at absolute entry
// base. count must be a positive multiple of chip.RcvArrayGroupSize.
func New(base, count int) (*Allocator, error) {
	if base < 0 || count <= 0 || count%chip.RcvArrayGroupSize != 0 {
		return nil, fmt.Errorf("rcvarray: base %d count %d: count must be a positive multiple of %d: %w",
			base, count, chip.RcvArrayGroupSize, unix.EINVAL)
	}
	a := &Allocator{base: base, count: count, groups: make([]tidGroup, count/chip.RcvArrayGroupSize)}
	a.Reset()
	return a, nil
}

// Base returns the first entry of the context.
func (a *Allocator) Base() int { return a.base }

// Count returns the number of entries of the context.
func (a *Allocator) Count() int { return a.count }

// Reset frees every entry and puts all groups on the empty list in entry
// order, as after context setup.
func (a *Allocator) Reset() {
	for i := range a.lists {
		a.lists[i] = tidList{head: -1, tail: -1}
	}
	for i := range a.groups {
		a.groups[i] = tidGroup{base: a.base + i*chip.RcvArrayGroupSize}
		a.addTail(int32(i), listEmpty)
	}
	a.used = 0
}

// Alloc hands out up to n entries (absolute indices) in hfi1's order: first,
// while at least a group's worth of entries remains to be found, whole empty groups;
// then the free entries of partially used groups, oldest group first; then
// new groups taken from the empty list.
//
// Like TID_UPDATE, Alloc may succeed partially: when fewer than n entries are
// free it returns all of them and a nil error, so the caller compares
// len(entries) with n. When none is free it returns an error wrapping
// unix.ENOSPC. n < 1 or n > Count() is an error wrapping unix.EINVAL.
func (a *Allocator) Alloc(n int) ([]int, error) {
	if n < 1 || n > a.count {
		return nil, fmt.Errorf("rcvarray: alloc %d of %d entries: %w", n, a.count, unix.EINVAL)
	}
	if a.used == a.count {
		return nil, fmt.Errorf("rcvarray: alloc %d entries: all %d in use: %w", n, a.count, unix.ENOSPC)
	}
	out := make([]int, 0, min(n, a.count-a.used))
	for n-len(out) >= chip.RcvArrayGroupSize && a.lists[listEmpty].count > 0 {
		g := a.pop(listEmpty)
		out = a.take(g, chip.RcvArrayGroupSize, out)
		a.addTail(g, listFull)
	}
	for len(out) < n {
		if a.lists[listPartial].count == 0 {
			if a.lists[listEmpty].count == 0 {
				break
			}
			a.addTail(a.pop(listEmpty), listPartial)
		}
		for g := a.lists[listPartial].head; g >= 0 && len(out) < n; {
			next := a.groups[g].next
			out = a.take(g, n-len(out), out)
			if a.groups[g].used == chip.RcvArrayGroupSize {
				a.move(g, listFull)
			}
			g = next
		}
	}
	a.used += len(out)
	return out, nil
}

// take hands out up to max free entries of group g, lowest first, appending
// them to out.
func (a *Allocator) take(g int32, max int, out []int) []int {
	grp := &a.groups[g]
	for i := 0; i < chip.RcvArrayGroupSize && max > 0; i++ {
		if grp.bitmap&(1<<i) != 0 {
			continue
		}
		grp.bitmap |= 1 << i
		grp.used++
		out = append(out, grp.base+i)
		max--
	}
	return out
}

// Free returns entry (absolute) to the allocator. An entry outside the
// context or not handed out is an error wrapping unix.EINVAL and changes
// nothing, so a double free can never corrupt the lists.
func (a *Allocator) Free(entry int) error {
	if entry < a.base || entry >= a.base+a.count {
		return fmt.Errorf("rcvarray: free entry %d: outside [%d, %d): %w",
			entry, a.base, a.base+a.count, unix.EINVAL)
	}
	rel := entry - a.base
	g := int32(rel / chip.RcvArrayGroupSize)
	grp := &a.groups[g]
	bit := uint8(1) << (rel % chip.RcvArrayGroupSize)
	if grp.bitmap&bit == 0 {
		return fmt.Errorf("rcvarray: free entry %d: not allocated: %w", entry, unix.EINVAL)
	}
	grp.bitmap &^= bit
	grp.used--
	a.used--
	switch grp.used {
	case chip.RcvArrayGroupSize - 1:
		a.move(g, listPartial)
	case 0:
		a.move(g, listEmpty)
	}
	return nil
}

// InUse reports whether entry (absolute) is handed out.
func (a *Allocator) InUse(entry int) bool {
	if entry < a.base || entry >= a.base+a.count {
		return false
	}
	rel := entry - a.base
	return a.groups[rel/chip.RcvArrayGroupSize].bitmap&(1<<(rel%chip.RcvArrayGroupSize)) != 0
}

// Stats returns the entry and group counters.
func (a *Allocator) Stats() Stats {
	return Stats{
		Free:          a.count - a.used,
		Used:          a.used,
		EmptyGroups:   a.lists[listEmpty].count,
		PartialGroups: a.lists[listPartial].count,
		FullGroups:    a.lists[listFull].count,
	}
}

// TIDEntry checks tid against the context and returns the absolute entry
// and page count it names.
func (a *Allocator) TIDEntry(tid uint32) (entry, npages int, err error) {
	rel, npages, err := CheckTID(tid, a.count)
	if err != nil {
		return 0, 0, err
	}
	return a.base + rel, npages, nil
}

// TID returns the TID of entry (absolute) covering npages pages.
func (a *Allocator) TID(entry, npages int) uint32 {
	return EncodeTID(entry-a.base, npages)
}

// List operations (tid_group_add_tail, tid_group_pop, tid_group_move).

func (a *Allocator) addTail(g int32, l uint8) {
	lst := &a.lists[l]
	grp := &a.groups[g]
	grp.list, grp.prev, grp.next = l, lst.tail, -1
	if lst.tail >= 0 {
		a.groups[lst.tail].next = g
	} else {
		lst.head = g
	}
	lst.tail = g
	lst.count++
}

func (a *Allocator) remove(g int32) {
	grp := &a.groups[g]
	lst := &a.lists[grp.list]
	if grp.prev >= 0 {
		a.groups[grp.prev].next = grp.next
	} else {
		lst.head = grp.next
	}
	if grp.next >= 0 {
		a.groups[grp.next].prev = grp.prev
	} else {
		lst.tail = grp.prev
	}
	grp.prev, grp.next = -1, -1
	lst.count--
}

func (a *Allocator) pop(l uint8) int32 {
	g := a.lists[l].head
	a.remove(g)
	return g
}

func (a *Allocator) move(g int32, l uint8) {
	a.remove(g)
	a.addTail(g, l)
}

// check verifies the allocator's invariants: every group on exactly the list
// its use count says, list links and counts consistent, counters matching
// the bitmaps. Tests call it after every operation.
func (a *Allocator) check() error {
	seen := make([]bool, len(a.groups))
	used := 0
	for l := range a.lists {
		lst := a.lists[l]
		n := 0
		prev := int32(-1)
		for g := lst.head; g >= 0; g = a.groups[g].next {
			if n > len(a.groups) {
				return fmt.Errorf("%s list: cycle", listNames[l])
			}
			grp := a.groups[g]
			if seen[g] {
				return fmt.Errorf("group %d on two lists", g)
			}
			seen[g] = true
			if grp.prev != prev {
				return fmt.Errorf("group %d: prev %d, want %d", g, grp.prev, prev)
			}
			if int(grp.list) != l {
				return fmt.Errorf("group %d on %s list says %s", g, listNames[l], listNames[grp.list])
			}
			var want int
			switch {
			case grp.used == 0:
				want = listEmpty
			case grp.used == chip.RcvArrayGroupSize:
				want = listFull
			default:
				want = listPartial
			}
			if want != l {
				return fmt.Errorf("group %d with %d used on %s list", g, grp.used, listNames[l])
			}
			if pc := bits.OnesCount8(grp.bitmap); pc != int(grp.used) {
				return fmt.Errorf("group %d: used %d, bitmap %08b", g, grp.used, grp.bitmap)
			}
			used += int(grp.used)
			prev = g
			n++
		}
		if prev != lst.tail {
			return fmt.Errorf("%s list: tail %d, want %d", listNames[l], lst.tail, prev)
		}
		if n != lst.count {
			return fmt.Errorf("%s list: count %d, walked %d", listNames[l], lst.count, n)
		}
	}
	for g, ok := range seen {
		if !ok {
			return fmt.Errorf("group %d on no list", g)
		}
	}
	if used != a.used {
		return fmt.Errorf("used %d, groups say %d", a.used, used)
	}
	return nil
}
