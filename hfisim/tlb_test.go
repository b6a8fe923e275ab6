package hfisim

import "testing"

// TestTLBCache: a direct-mapped slot per index mod tlbMax; an entry of
// another index in the slot replaces it; drops name indices, whatever the
// slots.
func TestTLBCache(t *testing.T) {
	var c tlbCache
	if _, ok := c.get(5); ok || c.len() != 0 {
		t.Fatal("empty TLB hit")
	}
	c.put(5, 0x1001)
	c.put(6, 0x2001)
	if e, ok := c.get(5); !ok || e != 0x1001 || c.len() != 2 {
		t.Fatalf("get(5) = %#x, %v; len %d", e, ok, c.len())
	}
	// Index 5+tlbMax shares 5's slot: it replaces it.
	c.put(5+tlbMax, 0x3001)
	if _, ok := c.get(5); ok {
		t.Fatal("evicted entry still hit")
	}
	if e, ok := c.get(5 + tlbMax); !ok || e != 0x3001 || c.len() != 2 {
		t.Fatalf("get(5+tlbMax) = %#x, %v; len %d", e, ok, c.len())
	}
	// A drop of [5, 6) names index 5, not the slot's 5+tlbMax.
	c.drop(5, 6)
	if _, ok := c.get(5 + tlbMax); !ok || c.len() != 2 {
		t.Fatal("drop of another index removed the slot's entry")
	}
	c.drop(6, 7)
	if _, ok := c.get(6); ok || c.len() != 1 {
		t.Fatal("dropped entry still hit")
	}
	// A wide drop scans the slots.
	c.put(7, 0x4001)
	c.drop(0, 1<<32)
	if c.len() != 0 {
		t.Fatalf("len %d after dropping everything", c.len())
	}
	c.put(9, 0x5001)
	c.reset()
	if _, ok := c.get(9); ok || c.len() != 0 {
		t.Fatal("entry survived reset")
	}
}
