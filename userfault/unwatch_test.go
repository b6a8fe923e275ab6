package userfault

import (
	"testing"
)

// A Remove whose narrowing of the eBPF ranges map fails is counted in
// Stats.UnwatchErrors (Remove itself returns nothing, like
// mmu_interval_notifier_remove), and the programs go on watching a superset:
// the subscription that remains still sees its invalidation.
func TestUnwatchErrorCounted(t *testing.T) {
	n := newNotifier(t, SourceTracepoint)
	var b *bpfSource
	for _, src := range n.sources {
		if x, ok := src.(*bpfSource); ok {
			b = x
		}
	}
	if b == nil {
		t.Fatalf("no eBPF source: %v", n.Sources())
	}
	gone := mmapAnon(t, 1)
	defer munmap(t, gone, 1)
	kept := mmapAnon(t, 1)
	s := subscribe(t, n, gone, pageSize, newRecorder())
	rec := newRecorder()
	subscribe(t, n, kept, pageSize, rec)
	if got := n.Stats().UnwatchErrors; got != 0 {
		t.Fatalf("UnwatchErrors before: %d", got)
	}

	// Break the config map as a failing update would: our fd goes, the
	// programs keep their reference and the ranges they were given.
	n.mu.Lock()
	err := b.core.Config.Close()
	n.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	s.Remove()
	if got := n.Stats().UnwatchErrors; got != 1 {
		t.Fatalf("UnwatchErrors after a failed narrowing: %d, want 1", got)
	}

	munmap(t, kept, 1)
	syncNotifier(t, n)
	evs := rec.take()
	if len(evs) == 0 || evs[0].Kind != EventUnmap || evs[0].Start != kept {
		t.Fatalf("remaining subscription after a failed narrowing: events %v, want an unmap of %#x", evs, kept)
	}
}
