// Package driver is gohfi's "kernel module": it probes HFI devices reached
// through a vfio.Device, owns their hardware contexts, and offers per-open
// file operations (Open, Ioctl, Poll, Mmap, Close) with the hfi1 character
// device's ABI (package uapi) plus gohfi's own commands.
//
// The file layout follows drivers/infiniband/hw/hfi1: file_ops.go (the
// character device), init.go (probe and device data), chip.go (CSR access),
// intr.go (interrupts), user_exp_rcv.go (expected receive and the TID cache).
package driver

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/gohfi/gohfi/userfault"
	"github.com/gohfi/gohfi/vfio"
	"golang.org/x/sys/unix"
)

// Params are the module parameters, fixed at Init like a kernel module's.
type Params struct {
	// RcvHdrCnt is the number of receive header queue entries per context
	// (hfi1's rcvhdrcnt).
	RcvHdrCnt int
	// EagerBufferSize is the size of one eager buffer; each context has
	// RcvHdrCnt of them.
	EagerBufferSize int
	// SendQueueEntries is the number of send descriptors per context.
	SendQueueEntries int
	// TIDUnmapOnInvalidate selects the newer kernels' behaviour: an
	// invalidated TID is cleared from the RcvArray and unpinned at once,
	// instead of staying programmed until TID_FREE (the 2016 design).
	TIDUnmapOnInvalidate bool
	// HonorCapIPCLock lets a process with CAP_IPC_LOCK pin past
	// RLIMIT_MEMLOCK, as the kernel does. Off by default so the limit is
	// always enforced, root included.
	HonorCapIPCLock bool
	// PKeys is the port's partition key table: SET_PKEY accepts only
	// these (hfi1 checks ppd->pkeys). With none, SET_PKEY is EPERM and
	// HFI1_CAP_PKEY_CHECK is not reported, as in hfi1 without PKEY_CHECK.
	PKeys []uint16
	// ODPFaultAround is the window in bytes a page fault of an ODP MR
	// maps around the faulting address (aligned to it, within the MR):
	// a power of two from 4 KiB to 1 GiB; 0 means
	// DefaultODPFaultAround (1 MiB). mlx5 prefetches up to 4 MiB.
	ODPFaultAround int
	// ODPNoBatch turns off the batching of ODP invalidations: each one
	// gets its own TLB flush instead of sharing one with every
	// invalidation that arrived while the previous flush ran.
	ODPNoBatch bool
	// NoDBRec turns off doorbell records. By default QPs get them where
	// the device offers them (chip.CapDBRec): producer indices stored in
	// host memory, a register doorbell only when the device sleeps. Off,
	// every doorbell is a posted QPSQTail/QPRQTail write (on this machine
	// a fast-registration cycle through the send queue costs about 5x
	// more that way: a socket message and the device's wake-up per post).
	NoDBRec bool
}

// DefaultPKey is PSM's default partition key (full membership of
// partition 1).
const DefaultPKey = 0x8001

// Management partition keys, which a user context may not take (hfi1's
// LIM_MGMT_P_KEY and FULL_MGMT_P_KEY).
const (
	limMgmtPKey  = 0x7fff
	fullMgmtPKey = 0xffff
)

// DefaultParams returns the defaults.
func DefaultParams() Params {
	return Params{RcvHdrCnt: 256, EagerBufferSize: 16 << 10, SendQueueEntries: 256,
		PKeys: []uint16{fullMgmtPKey, DefaultPKey}}
}

func (p Params) validate() error {
	pow2 := func(v int) bool { return v > 0 && v&(v-1) == 0 }
	if !pow2(p.RcvHdrCnt) || p.RcvHdrCnt < 2 || !pow2(p.EagerBufferSize) || p.EagerBufferSize < 4096 ||
		!pow2(p.SendQueueEntries) || p.SendQueueEntries < 2 ||
		p.ODPFaultAround != 0 && (!pow2(p.ODPFaultAround) || p.ODPFaultAround < 4096 || p.ODPFaultAround > 1<<30) {
		return fmt.Errorf("gohfi: module parameters %+v: %w", p, unix.EINVAL)
	}
	return nil
}

// Module is the loaded driver: its parameters and the registry of probed
// devices (units). It is the only global-like state of the driver and is
// created by Init and torn down by Exit.
type Module struct {
	params Params
	tracer tracer // trace points of every device (Trace)

	// testHookTIDUpdate runs inside TID_UPDATE between pinning and the
	// race check (tests only).
	testHookTIDUpdate func()
	// testHookODPFault runs inside an ODP fault between pinning and the
	// race check (tests only).
	testHookODPFault atomic.Pointer[func()]
	// testHookODPInvalidate runs at the end of an ODP MR's Invalidate, on
	// the notifier's dispatcher (tests only; set while it may run).
	testHookODPInvalidate atomic.Pointer[func(userfault.Event)]

	mu      sync.Mutex
	devices map[int]*Device
	next    int
	exited  bool
}

// Init loads the module with params.
func Init(params Params) (*Module, error) {
	if err := params.validate(); err != nil {
		return nil, err
	}
	return &Module{params: params, devices: map[int]*Device{}}, nil
}

// Params returns the module parameters.
func (m *Module) Params() Params { return m.params }

// Probe binds the driver to vdev and registers it as the next unit. The
// module owns vdev from then on and closes it on Remove or Exit, also when
// Probe fails.
func (m *Module) Probe(ctx context.Context, vdev vfio.Device, name string) (*Device, error) {
	m.mu.Lock()
	if m.exited {
		m.mu.Unlock()
		return nil, errors.Join(fmt.Errorf("gohfi: probe %s: module exited: %w", name, unix.ENODEV), vdev.Close())
	}
	unit := m.next
	m.next++
	m.mu.Unlock()

	d, err := probe(ctx, m, unit, vdev, name)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("gohfi: probe %s: %w", name, err), vdev.Close())
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.exited {
		return nil, errors.Join(fmt.Errorf("gohfi: probe %s: module exited: %w", name, unix.ENODEV), d.remove())
	}
	m.devices[unit] = d
	return d, nil
}

// Device returns unit, or ENODEV.
func (m *Module) Device(unit int) (*Device, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if d, ok := m.devices[unit]; ok {
		return d, nil
	}
	return nil, fmt.Errorf("gohfi: unit %d: %w", unit, unix.ENODEV)
}

// Remove unbinds unit: open files see ENXIO from then on, their contexts are
// torn down and the vfio device is closed.
func (m *Module) Remove(unit int) error {
	m.mu.Lock()
	d, ok := m.devices[unit]
	delete(m.devices, unit)
	m.mu.Unlock()
	if !ok {
		return fmt.Errorf("gohfi: remove unit %d: %w", unit, unix.ENODEV)
	}
	return d.remove()
}

// Exit removes every device; the module cannot be used afterwards.
func (m *Module) Exit() error {
	m.mu.Lock()
	m.exited = true
	devs := m.devices
	m.devices = map[int]*Device{}
	m.mu.Unlock()
	var errs []error
	for _, d := range devs {
		errs = append(errs, d.remove())
	}
	return errors.Join(errs...)
}
