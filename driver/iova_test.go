package driver

import "testing"

func TestIOVASpaceSkipsMSIWindow(t *testing.T) {
	s := newIOVASpace()
	low, err := s.alloc(iovaMSIWindow - iovaBase - pageSize)
	if err != nil || low != iovaBase {
		t.Fatalf("first allocation %#x %v", low, err)
	}
	a, _ := s.alloc(pageSize) // the last page below the window
	b, _ := s.alloc(2 * pageSize)
	if a != iovaMSIWindow-pageSize || b != iovaMSIEnd {
		t.Fatalf("allocations %#x, %#x: want %#x and %#x (window skipped)", a, b, uint64(iovaMSIWindow-pageSize), uint64(iovaMSIEnd))
	}
	s.release(a, pageSize)
	s.release(low, iovaMSIWindow-iovaBase-pageSize)
	if c, _ := s.alloc(iovaMSIWindow - iovaBase); c != iovaBase {
		t.Fatalf("freed ranges did not coalesce: %#x", c)
	}
}
