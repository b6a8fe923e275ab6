package driver

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/dma"
	"github.com/gohfi/gohfi/userfault"
	"github.com/gohfi/gohfi/vfio"
	"golang.org/x/sys/unix"
)

// DeviceInfo is what probe learned from the hardware.
type DeviceInfo struct {
	Unit            int    `json:"unit"`
	Name            string `json:"name"`
	VendorID        uint16 `json:"vendor_id"`
	DeviceID        uint16 `json:"device_id"`
	Revision        uint64 `json:"revision"`
	NumContexts     int    `json:"num_contexts"`
	RcvArrayPerCtxt int    `json:"rcvarray_per_ctxt"`
	MaxTIDPages     int    `json:"max_tid_pages"`
	MTTEntries      int    `json:"mtt_entries"`
	RHQMaxEntries   int    `json:"rhq_max_entries"`
	CapFlags        uint64 `json:"cap_flags"`
	IRQMode         string `json:"irq_mode"`
}

// Device is a probed HFI (hfi1's struct hfi1_devdata).
type Device struct {
	m    *Module
	vdev vfio.Device
	info DeviceInfo

	rcvArray []byte    // BAR2 mapped: RcvArray entries are programmed with plain stores
	verbs    *verbsDev // nil without chip.CapVerbs
	iova     *iovaSpace
	irq      *irqState
	acct     *dma.Accountant
	pinner   *dma.Pinner

	mmuNotifierMu sync.Mutex
	mmuNotifier   *userfault.Notifier // started at the first TID_UPDATE or ODP registration
	gens          genPages            // the notifier's generations in every context's events page

	mu      sync.Mutex
	ctxts   []*ctxtData // hardware contexts; nil = free
	files   map[*File]struct{}
	removed bool

	// dead is set by markDead when the device is gone (disconnected,
	// surprise-removed); from then on everything fails with ENXIO. deadCh is
	// closed at the same time and deadErr says why.
	dead     atomic.Bool
	deadOnce sync.Once
	deadErr  error
	deadCh   chan struct{}

	// The monitor goroutine watches for the device's loss (see monitor).
	stopMonitor chan struct{}
	monitorWG   sync.WaitGroup

	stats devStats
}

// Info returns the device's identity and capabilities.
func (d *Device) Info() DeviceInfo { return d.info }

// ioErr turns a lost device into ENXIO for the caller and marks the device
// dead, which wakes everyone waiting on it.
func (d *Device) ioErr(err error) error {
	if errors.Is(err, vfio.ErrDisconnected) || errors.Is(err, vfio.ErrClosed) ||
		errors.Is(err, unix.EPIPE) || errors.Is(err, unix.ECONNRESET) {
		d.markDead(err)
		return fmt.Errorf("%w (%w)", err, unix.ENXIO)
	}
	return err
}

// markDead records that the device is gone, for the reason cause, and wakes
// every waiter: each context's wait queue (Poll, a SEND waiting for its
// descriptor to be consumed) and whoever waits on d.deadCh. Every path that
// sees the device go ends up here: a call failing with a disconnect
// (ioErr), the backend reporting the loss (monitor), a register reading
// all ones (readCSR). Only the first call does anything. It must not be
// called with d.mu held.
func (d *Device) markDead(cause error) {
	first := false
	d.deadOnce.Do(func() {
		first = true
		d.deadErr = cause
		d.dead.Store(true)
		close(d.deadCh)
	})
	if !first {
		return
	}
	d.mu.Lock()
	for _, c := range d.ctxts {
		if c != nil {
			c.wq.wakeAll()
		}
	}
	d.mu.Unlock()
}

// errGone is the error of an operation that found the device dead: it
// wraps unix.ENXIO and the cause markDead was given. Call it only once
// d.dead or d.deadCh said so.
func (d *Device) errGone() error {
	return fmt.Errorf("device gone: %w (%w)", d.deadErr, unix.ENXIO)
}

// watchdogInterval is how often the monitor reads the ID register to catch
// a surprise removal that no call and no backend reports (kernel VFIO).
const watchdogInterval = 250 * time.Millisecond

// startMonitor starts the goroutine that notices the device's loss while
// nobody is talking to it, like the watchdog task of a Linux PCI driver:
// it marks the device dead when the backend reports the loss (vfio.Device
// Done: a vfio-user server hanging up or dying) or when the ID register
// reads all ones (a surprise-removed PCI function).
func (d *Device) startMonitor() {
	d.stopMonitor = make(chan struct{})
	d.monitorWG.Add(1)
	go d.monitor(d.stopMonitor)
}

func (d *Device) monitor(stop <-chan struct{}) {
	defer d.monitorWG.Done()
	lost := d.vdev.Done()
	t := time.NewTicker(watchdogInterval)
	defer t.Stop()
	for !d.dead.Load() {
		select {
		case <-stop:
			return
		case <-d.deadCh:
			return
		case <-lost:
			d.markDead(fmt.Errorf("backend reports the device lost: %w", vfio.ErrDisconnected))
			return
		case <-t.C:
			// All ones or a disconnect marks the device dead in readCSR;
			// any other failure is tried again at the next tick.
			_, _ = d.readCSR(chip.RegID)
		}
	}
}

// stopMonitorAndWait stops the monitor goroutine, if it runs.
func (d *Device) stopMonitorAndWait() {
	if d.stopMonitor == nil {
		return
	}
	close(d.stopMonitor)
	d.monitorWG.Wait()
	d.stopMonitor = nil
}

func probe(ctx context.Context, m *Module, unit int, vdev vfio.Device, name string) (_ *Device, err error) {
	d := &Device{m: m, vdev: vdev, files: map[*File]struct{}{}, deadCh: make(chan struct{})}
	d.info.Unit, d.info.Name = unit, name
	if vdev.Info().Flags&vfio.DeviceFlagsPCI == 0 {
		return nil, fmt.Errorf("not a PCI device: %w", unix.ENODEV)
	}
	var cfg [64]byte
	if err := vdev.ReadRegion(vfio.PCIConfigRegionIndex, 0, cfg[:]); err != nil {
		return nil, fmt.Errorf("read config space: %w", err)
	}
	d.info.VendorID = binary.LittleEndian.Uint16(cfg[0:])
	d.info.DeviceID = binary.LittleEndian.Uint16(cfg[2:])
	if d.info.VendorID != chip.PCIVendorID || d.info.DeviceID != chip.PCIDeviceID {
		return nil, fmt.Errorf("device %04x:%04x is not an hfisim HFI: %w", d.info.VendorID, d.info.DeviceID, unix.ENODEV)
	}
	// Memory space and bus mastering: the device DMAs rings and payloads.
	cmd := binary.LittleEndian.Uint16(cfg[4:]) | 0x0006
	var cb [2]byte
	binary.LittleEndian.PutUint16(cb[:], cmd)
	if err := vdev.WriteRegion(vfio.PCIConfigRegionIndex, 4, cb[:]); err != nil {
		return nil, fmt.Errorf("enable bus master: %w", err)
	}
	if vdev.Info().Flags&vfio.DeviceFlagsReset != 0 {
		if err := vdev.Reset(); err != nil {
			return nil, fmt.Errorf("reset: %w", err)
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	// Raw: an ID of all ones is refused here like any other wrong ID; the
	// surprise-removal check of readCSR is for a device already bound.
	if id, err := d.readCSRRaw(chip.RegID); err != nil {
		return nil, err
	} else if id != chip.IDMagic {
		return nil, fmt.Errorf("ID register %#x, want %#x: %w", id, uint64(chip.IDMagic), unix.EIO)
	}
	if err := d.readCaps(); err != nil {
		return nil, err
	}
	if err := d.mapRcvArray(); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			// Our own mappings of BAR regions, unmapped once: Munmap
			// fails only for an address we did not map (a bug).
			_ = unix.Munmap(d.rcvArray)
			_ = d.verbs.unmap() // the same for BAR4 (nil when probeVerbs failed)
		}
	}()
	if err := d.probeVerbs(); err != nil {
		return nil, err
	}
	if d.iova, err = newIOVASpace(d.vdev.IOVARanges()); err != nil {
		return nil, err
	}
	d.acct = dma.NewAccountant()
	d.acct.HonorCapIPCLock = m.params.HonorCapIPCLock
	if d.pinner, err = dma.NewPinner(d.acct, &dma.PinnerOptions{MaxPins: 16384}); err != nil {
		return nil, err
	}
	d.ctxts = make([]*ctxtData, d.info.NumContexts)
	if err := d.setupInterrupts(); err != nil {
		// Nothing is pinned yet: the pinner's io_uring is all it holds.
		return nil, joinUndo(err, "closing the pinner", d.pinner.Close())
	}
	d.startMonitor()
	return d, nil
}

// capReg is one capability register and the values the driver accepts in
// it: check returns why a value is refused, "" when it is accepted; set
// records an accepted value.
type capReg struct {
	name  string
	off   uint64
	check func(v uint64) string
	set   func(i *DeviceInfo, v uint64)
}

func isPow2(v uint64) bool { return v != 0 && v&(v-1) == 0 }

// capRegs are the capability registers in the order probe reads them. Each
// limit is the encoding the driver puts the value through (see chip and
// rcvarray), so a device cannot make the driver overflow a field, size an
// array from a lie or hand user space a TID it cannot decode.
var capRegs = []capReg{
	{"Revision", chip.RegRevision, func(v uint64) string {
		if v < chip.MinRevision || v > chip.MaxRevision {
			return fmt.Sprintf("want major revision %d (%#x..%#x)", chip.RevisionMajor, chip.MinRevision, chip.MaxRevision)
		}
		return ""
	}, func(i *DeviceInfo, v uint64) { i.Revision = v }},
	{"NumCtxts", chip.RegNumCtxts, func(v uint64) string {
		if v < 1 || v > chip.MaxContexts {
			return fmt.Sprintf("want 1..%d contexts (interrupt source bits, MSI-X vectors, context number fields)", chip.MaxContexts)
		}
		return ""
	}, func(i *DeviceInfo, v uint64) { i.NumContexts = int(v) }},
	{"RcvArrayPerCtxt", chip.RegRcvArrayPerCtxt, func(v uint64) string {
		if v < chip.RcvArrayGroupSize || v%chip.RcvArrayGroupSize != 0 || v > chip.MaxRcvArrayPerCtxt {
			return fmt.Sprintf("want a multiple of %d from %d to %d (10-bit TID pair index)",
				chip.RcvArrayGroupSize, chip.RcvArrayGroupSize, chip.MaxRcvArrayPerCtxt)
		}
		return ""
	}, func(i *DeviceInfo, v uint64) { i.RcvArrayPerCtxt = int(v) }},
	{"MaxTIDPages", chip.RegMaxTIDPages, func(v uint64) string {
		if !isPow2(v) || v > chip.MaxTIDPages {
			return fmt.Sprintf("want a power of two from 1 to %d pages (one TID covers at most 2 MiB; TID LEN field)", chip.MaxTIDPages)
		}
		return ""
	}, func(i *DeviceInfo, v uint64) { i.MaxTIDPages = int(v) }},
	{"MTTEntries", chip.RegMTTEntries, func(v uint64) string {
		if v > chip.MaxMTTEntries {
			return fmt.Sprintf("want at most %d entries", chip.MaxMTTEntries)
		}
		return ""
	}, func(i *DeviceInfo, v uint64) { i.MTTEntries = int(v) }},
	{"CapFlags", chip.RegCapFlags, func(v uint64) string {
		if u := v &^ chip.CapKnown; u != 0 {
			return fmt.Sprintf("unknown bits %#x (known %#x)", u, chip.CapKnown)
		}
		return ""
	}, func(i *DeviceInfo, v uint64) { i.CapFlags = v }},
	{"RHQMaxEntries", chip.RegRHQMaxEntries, func(v uint64) string {
		if v < chip.MinRHQEntries || v > chip.MaxRHQEntries {
			return fmt.Sprintf("want %d..%d entries (CTXT_INFO's 16-bit rcvhdrq_cnt)", chip.MinRHQEntries, chip.MaxRHQEntries)
		}
		return ""
	}, func(i *DeviceInfo, v uint64) { i.RHQMaxEntries = int(v) }},
}

// readCaps reads the capability registers and refuses, with EIO, a device
// that reports a value outside what the driver's encodings can hold: a
// device is not trusted to size the driver's arrays.
func (d *Device) readCaps() error {
	for _, r := range capRegs {
		v, err := d.readCSR(r.off)
		if err != nil {
			return err
		}
		if why := r.check(v); why != "" {
			return fmt.Errorf("capability register %s (%#x) reads %d (%#x): %s: %w", r.name, r.off, v, v, why, unix.EIO)
		}
		r.set(&d.info, v)
	}
	if d.m.params.RcvHdrCnt > d.info.RHQMaxEntries {
		return fmt.Errorf("rcvhdrcnt %d exceeds the device's %d (RHQMaxEntries): %w", d.m.params.RcvHdrCnt, d.info.RHQMaxEntries, unix.EINVAL)
	}
	return nil
}

func (d *Device) mapRcvArray() error {
	ri, err := d.vdev.RegionInfo(chip.RcvArrayBar)
	if err != nil {
		return fmt.Errorf("RcvArray region: %w", err)
	}
	need := uint64(d.info.NumContexts*d.info.RcvArrayPerCtxt) * chip.RcvArrayEntrySize
	if ri.Size < need || !ri.Mappable(0, need) {
		return fmt.Errorf("RcvArray region (BAR%d) %d bytes, mappable %v; NumCtxts %d × RcvArrayPerCtxt %d need %d: %w",
			chip.RcvArrayBar, ri.Size, ri.Mappable(0, need), d.info.NumContexts, d.info.RcvArrayPerCtxt, need, unix.EIO)
	}
	mem, err := d.vdev.MmapRegion(chip.RcvArrayBar, 0, need, unix.PROT_READ|unix.PROT_WRITE)
	if err != nil {
		return fmt.Errorf("mmap RcvArray: %w", err)
	}
	d.rcvArray = mem
	return nil
}

// remove tears the device down: every open file loses its context, the
// interrupts are released and the vfio device is closed.
func (d *Device) remove() error {
	d.mu.Lock()
	if d.removed {
		d.mu.Unlock()
		return nil
	}
	d.removed = true
	files := make([]*File, 0, len(d.files))
	for f := range d.files {
		files = append(files, f)
	}
	d.mu.Unlock()
	d.stopMonitorAndWait()
	var errs []error
	for _, f := range files {
		// What a file fails to release (pins, mappings) is the removal's
		// failure too.
		errs = append(errs, f.release(unix.ENXIO))
	}
	if d.verbs != nil {
		errs = append(errs, d.verbs.odp.shutdown())
	}
	errs = append(errs, d.teardownInterrupts())
	errs = append(errs, d.pinner.Close())
	d.mmuNotifierMu.Lock()
	if d.mmuNotifier != nil {
		errs = append(errs, d.mmuNotifier.Close())
		d.mmuNotifier = nil
	}
	d.mmuNotifierMu.Unlock()
	if d.rcvArray != nil {
		errs = append(errs, unix.Munmap(d.rcvArray))
		d.rcvArray = nil
	}
	errs = append(errs, d.verbs.unmap())
	errs = append(errs, d.vdev.Close())
	return errors.Join(errs...)
}

// dmaMap makes r reachable by the device at a fresh IOVA.
func (d *Device) dmaMap(r *ringMem, flags uint32) error {
	iova, err := d.iova.alloc(uint64(len(r.mem)))
	if err != nil {
		return err
	}
	err = d.vdev.DMAMap(vfio.DMAMapping{IOVA: iova, Vaddr: r.vaddr(), Size: uint64(len(r.mem)), Flags: flags, File: r.file})
	if err != nil {
		d.iova.release(iova, uint64(len(r.mem)))
		return d.ioErr(fmt.Errorf("DMA map: %w", err))
	}
	r.iova = iova
	return nil
}

func (d *Device) dmaUnmap(r *ringMem) error {
	if r == nil || r.iova == 0 {
		return nil
	}
	err := d.vdev.DMAUnmap(r.iova, uint64(len(r.mem)))
	d.iova.release(r.iova, uint64(len(r.mem)))
	r.iova = 0
	if err != nil {
		return d.ioErr(fmt.Errorf("DMA unmap: %w", err))
	}
	return nil
}
