package dma

import (
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// pageSize is the size of the pages pins are counted in; fixed for the
// life of the process.
var pageSize = os.Getpagesize()

// PageSize returns the system page size.
func PageSize() int { return pageSize }

// Accountant counts the pages one driver instance holds pinned and refuses
// pins beyond RLIMIT_MEMLOCK, read at every charge as hfi1_can_pin_pages
// reads rlimit(RLIMIT_MEMLOCK). Everything in the instance that pins (the
// Pinner, the TID cache, MRs) charges the same Accountant.
//
// The kernel lets a task with CAP_IPC_LOCK pin without limit. The Accountant
// enforces the limit even then, unless HonorCapIPCLock is set: the tests
// run as root and must still see ENOMEM.
//
// An Accountant is safe for concurrent use.
type Accountant struct {
	// HonorCapIPCLock lets a task with CAP_IPC_LOCK pin beyond the limit,
	// as the kernel does. Set it before the first Charge.
	HonorCapIPCLock bool

	mu     sync.Mutex
	pinned int
}

// NewAccountant returns an Accountant with nothing charged that enforces
// RLIMIT_MEMLOCK for every caller.
func NewAccountant() *Accountant { return &Accountant{} }

// LimitPages returns RLIMIT_MEMLOCK in pages, or -1 when it is unlimited (or
// CAP_IPC_LOCK lifts it and HonorCapIPCLock is set).
func (a *Accountant) LimitPages() (int, error) {
	if a.HonorCapIPCLock {
		ok, err := HasCapability(unix.CAP_IPC_LOCK)
		if err != nil {
			return 0, err
		}
		if ok {
			return -1, nil
		}
	}
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_MEMLOCK, &rl); err != nil {
		return 0, fmt.Errorf("dma: getrlimit(RLIMIT_MEMLOCK): %w", err)
	}
	if rl.Cur == unix.RLIM_INFINITY || rl.Cur/uint64(pageSize) > uint64(maxInt) {
		return -1, nil
	}
	return int(rl.Cur / uint64(pageSize)), nil
}

const maxInt = int(^uint(0) >> 1)

// Charge accounts npages more pinned pages. It fails with an error wrapping
// unix.ENOMEM, and charges nothing, when the total would exceed the limit.
// npages < 0 is an error wrapping unix.EINVAL.
func (a *Accountant) Charge(npages int) error {
	if npages < 0 {
		return fmt.Errorf("dma: charge %d pages: %w", npages, unix.EINVAL)
	}
	limit, err := a.LimitPages()
	if err != nil {
		return err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if limit >= 0 && (npages > limit || a.pinned > limit-npages) {
		return fmt.Errorf("dma: pin %d pages with %d pinned: RLIMIT_MEMLOCK is %d pages: %w",
			npages, a.pinned, limit, unix.ENOMEM)
	}
	a.pinned += npages
	return nil
}

// Uncharge returns npages charged earlier. Uncharging more than is charged
// is a bug in the caller's bookkeeping and panics rather than letting the
// count drift below what is really pinned.
func (a *Accountant) Uncharge(npages int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if npages < 0 || npages > a.pinned {
		panic(fmt.Sprintf("dma: uncharge %d pages with %d charged", npages, a.pinned))
	}
	a.pinned -= npages
}

// Pinned returns the number of pages charged.
func (a *Accountant) Pinned() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.pinned
}

// HasCapability reports whether the calling thread has capability c (unix.CAP_*) in its
// effective set. All threads of a Go program share capabilities unless the
// program changes them per thread.
func HasCapability(c uint) (bool, error) {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return false, fmt.Errorf("dma: capget: %w", err)
	}
	return data[c/32].Effective&(1<<(c%32)) != 0, nil
}
