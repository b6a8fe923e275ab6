package dma

import (
	"errors"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

func TestAccountant(t *testing.T) {
	withMemlockLimit(t, uint64(10*PageSize()))
	a := NewAccountant()
	if err := a.Charge(4); err != nil {
		t.Fatal(err)
	}
	if err := a.Charge(7); !errors.Is(err, unix.ENOMEM) {
		t.Fatalf("Charge past the limit = %v, want ENOMEM", err)
	}
	if a.Pinned() != 4 {
		t.Fatalf("failed Charge changed Pinned to %d", a.Pinned())
	}
	if err := a.Charge(6); err != nil {
		t.Fatalf("Charge up to the limit: %v", err)
	}
	if err := a.Charge(1); !errors.Is(err, unix.ENOMEM) {
		t.Fatalf("Charge at the limit = %v, want ENOMEM", err)
	}
	if err := a.Charge(0); err != nil {
		t.Fatalf("Charge(0) at the limit: %v", err)
	}
	if err := a.Charge(-1); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("Charge(-1) = %v, want EINVAL", err)
	}
	a.Uncharge(10)
	if a.Pinned() != 0 {
		t.Fatalf("Pinned = %d", a.Pinned())
	}
	func() {
		defer func() {
			if recover() == nil {
				t.Error("Uncharge below zero did not panic")
			}
		}()
		a.Uncharge(1)
	}()
}

// TestAccountantReadsLimitEachCharge: the limit is read at charge time, so
// lowering it affects the next charge, not the pages already charged.
func TestAccountantReadsLimitEachCharge(t *testing.T) {
	withMemlockLimit(t, uint64(100*PageSize()))
	a := NewAccountant()
	if err := a.Charge(50); err != nil {
		t.Fatal(err)
	}
	withMemlockLimit(t, uint64(40*PageSize()))
	if err := a.Charge(1); !errors.Is(err, unix.ENOMEM) {
		t.Fatalf("Charge after lowering the limit = %v, want ENOMEM", err)
	}
	if n, err := a.LimitPages(); err != nil || n != 40 {
		t.Fatalf("LimitPages = %d, %v", n, err)
	}
	if err := trySetMemlock(t, unix.RLIM_INFINITY); err != nil {
		t.Logf("unlimited case not tested: %v", err)
		return
	}
	if n, _ := a.LimitPages(); n != -1 {
		t.Fatalf("LimitPages unlimited = %d, want -1", n)
	}
	if err := a.Charge(1 << 40); err != nil {
		t.Fatalf("Charge under RLIM_INFINITY: %v", err)
	}
}

func TestAccountantCapIPCLock(t *testing.T) {
	withMemlockLimit(t, uint64(PageSize()))
	has, err := HasCapability(unix.CAP_IPC_LOCK)
	if err != nil {
		t.Fatal(err)
	}
	a := NewAccountant()
	if err := a.Charge(2); !errors.Is(err, unix.ENOMEM) {
		t.Fatalf("default Accountant with CAP_IPC_LOCK=%v: Charge = %v, want ENOMEM", has, err)
	}
	a.HonorCapIPCLock = true
	err = a.Charge(2)
	if has && err != nil {
		t.Fatalf("HonorCapIPCLock with CAP_IPC_LOCK: %v", err)
	}
	if !has && !errors.Is(err, unix.ENOMEM) {
		t.Fatalf("HonorCapIPCLock without CAP_IPC_LOCK: %v, want ENOMEM", err)
	}
}

func TestAccountantConcurrent(t *testing.T) {
	withMemlockLimit(t, uint64(1000*PageSize()))
	a := NewAccountant()
	var wg sync.WaitGroup
	var mu sync.Mutex
	ok := 0
	for range 8 {
		wg.Go(func() {
			for range 200 {
				if a.Charge(1) == nil {
					mu.Lock()
					ok++
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	if ok != 1000 || a.Pinned() != 1000 {
		t.Fatalf("%d charges succeeded, Pinned %d; want 1000, 1000", ok, a.Pinned())
	}
}
