package hfisim

// tlbMax is the number of TLB slots; MTT entry idx can only be cached in
// slot idx % tlbMax, replacing what that slot held.
const tlbMax = 1 << 16

// tlbSlot is one slot of the device TLB: the cached MTT entry of MTT index
// idx, or nothing when ent has no MTTPresent bit (absent entries are never
// cached).
type tlbSlot struct {
	idx uint32
	ent uint64
}

// tlbCache is the device TLB: direct-mapped, so a lookup is one array
// access (an MTT walked page by page walks the slots in order) instead of
// a map lookup per page. Guarded by Device.mu.
type tlbCache struct {
	slots []tlbSlot // tlbMax slots, allocated on first insert
	n     int       // slots holding an entry
}

// get returns the cached entry of MTT index idx.
func (t *tlbCache) get(idx uint32) (uint64, bool) {
	if t.slots == nil {
		return 0, false
	}
	s := &t.slots[idx%tlbMax]
	if s.ent == 0 || s.idx != idx {
		return 0, false
	}
	return s.ent, true
}

// put caches ent (which has MTTPresent) for MTT index idx, evicting the
// entry of another index that used the same slot.
func (t *tlbCache) put(idx uint32, ent uint64) {
	if t.slots == nil {
		t.slots = make([]tlbSlot, tlbMax)
	}
	s := &t.slots[idx%tlbMax]
	if s.ent == 0 {
		t.n++
	}
	*s = tlbSlot{idx: idx, ent: ent}
}

// drop forgets the entries of MTT indices [start, end).
func (t *tlbCache) drop(start, end uint64) {
	if t.n == 0 {
		return
	}
	if end-start >= tlbMax {
		for i := range t.slots {
			if s := &t.slots[i]; s.ent != 0 && uint64(s.idx) >= start && uint64(s.idx) < end {
				*s = tlbSlot{}
				t.n--
			}
		}
		return
	}
	for i := start; i < end; i++ {
		if s := &t.slots[i%tlbMax]; s.ent != 0 && uint64(s.idx) == i {
			*s = tlbSlot{}
			t.n--
		}
	}
}

// reset empties the TLB.
func (t *tlbCache) reset() {
	clear(t.slots)
	t.n = 0
}

// len is the number of cached entries.
func (t *tlbCache) len() int { return t.n }
