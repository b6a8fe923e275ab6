package hfisim

import (
	"testing"
	"time"
)

// The engine's polling window, as the engine drives it: a poll that runs
// out and sleeps (sleeps), a register doorbell that wakes it with work
// (woken), a record caught while it polls (caught). The times are made up:
// what matters is how long after the sleep the doorbell came.
func TestPollWindowStarvedProducer(t *testing.T) {
	const full = 50 * time.Microsecond
	var p pollWindow
	t0 := time.Unix(1000, 0)
	now := t0
	// starve plays one message of a producer that shares the engine's CPU:
	// the engine polls the whole window, sleeps, and the producer's post
	// rings the register after after.
	starve := func(after time.Duration) {
		t.Helper()
		w := p.window(full)
		now = now.Add(w)
		p.sleeps(w > 0, now)
		now = now.Add(after)
		p.woken(now, full)
	}
	if w := p.window(full); w != full {
		t.Fatalf("window at start %v, want %v", w, full)
	}
	for i := 1; i < dbPollStarved; i++ {
		starve(5 * time.Microsecond)
		if w := p.window(full); w != full {
			t.Fatalf("window after %d starved polls %v, want %v", i, w, full)
		}
	}
	starve(5 * time.Microsecond)
	if w := p.window(full); w != dbPollShort {
		t.Fatalf("window after %d starved polls %v, want %v", dbPollStarved, w, dbPollShort)
	}
	// Short: the engine sleeps soon after its work; every dbPollProbe-th
	// sleep polls the whole window again.
	probes := 0
	for range 3 * dbPollProbe {
		if p.window(full) == full {
			probes++
		}
		starve(5 * time.Microsecond)
	}
	if probes < 2 || probes > 4 {
		t.Fatalf("%d probes in %d sleeps, want about 3", probes, 3*dbPollProbe)
	}
	// A probe that catches a record: the threads run apart again.
	for p.window(full) != full {
		starve(5 * time.Microsecond)
	}
	p.caught()
	if w := p.window(full); w != full {
		t.Fatalf("window after a caught record %v, want %v", w, full)
	}
}

func TestPollWindowIdleProducer(t *testing.T) {
	const full = 50 * time.Microsecond
	var p pollWindow
	now := time.Unix(1000, 0)
	// A producer that posts long after the engine slept (it was idle, not
	// starved) never shortens the window, even between starved polls.
	for i := 0; i < 10*dbPollStarved; i++ {
		now = now.Add(full)
		p.sleeps(true, now)
		after := 3 * full // after the window: idle
		if i%dbPollStarved == 0 {
			after = time.Microsecond
		}
		now = now.Add(after)
		p.woken(now, full)
		if w := p.window(full); w != full {
			t.Fatalf("message %d: window %v, want %v", i, w, full)
		}
	}
	// A sleep without a poll that ran out (a wake-up for other work, a CQ
	// armed) says nothing about the producer.
	for i := 0; i < 2*dbPollStarved; i++ {
		p.sleeps(false, now)
		now = now.Add(time.Microsecond)
		p.woken(now, full)
	}
	if w := p.window(full); w != full {
		t.Fatalf("window after sleeps without a poll %v, want %v", w, full)
	}
}
