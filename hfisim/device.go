// Package hfisim is the emulated host fabric interface: a PCI function with
// trapped control registers (BAR0), an mmappable RcvArray (BAR2) and MTT
// (BAR4), receive contexts whose header queues and eager buffers live in host
// memory, a send engine that moves payloads between contexts through the
// IOVAs the driver DMA-mapped, and interrupts through eventfds. It implements
// vfiouser.DeviceModel, so it is served over vfio-user to the driver on the
// host or to QEMU's vfio-user-pci.
//
// The model never trusts the driver: every DMA goes through the IOVA mappings
// (anything else is a counted IOMMU fault), every ring index and TID is
// checked, and malformed requests are counted, never followed. The register
// map is package chip; the datasheet is docs/hfisim.md.
package hfisim

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/vfio"
	"github.com/gohfi/gohfi/vfio/vfiouser"
	"golang.org/x/sys/unix"
)

// Config sizes a device.
type Config struct {
	NumContexts     int // receive contexts, 1..chip.MaxContexts
	RcvArrayPerCtxt int // RcvArray entries per context, multiple of chip.RcvArrayGroupSize
	MaxTIDPages     int // pages one RcvArray entry may cover
	MTTEntries      int // memory translation table entries
	RHQMaxEntries   int // largest receive header queue

	// The verbs engine (chip/verbs.go).
	MPTEntries int // memory protection table entries, 1..chip.MaxMPTEntries
	NumQPs     int // queue pairs, 1..chip.MaxQPs
	NumCQs     int // completion queues, 1..chip.MaxCQs
	MaxQPWR    int // largest send or receive queue, power of two up to chip.MaxQPWR
	MaxCQE     int // largest completion queue, power of two from 2 up to chip.MaxCQE
	MaxSGE     int // scatter/gather entries per WQE, 1..chip.WQEMaxSGE

	// TLBInvLatency is how long a TLB-invalidate command takes to
	// complete (0: as soon as the engine is between packets), at most
	// MaxTLBInvLatency.
	TLBInvLatency time.Duration
	// MaxFastRegPages is the longest FAST_REG_MR page list
	// (chip.RegMaxFastRegPages), a power of two up to chip.MaxFastRegPages.
	MaxFastRegPages int
	// DBPollIdle is how long the engine keeps polling the QPs' doorbell
	// records (chip.QPDBRecAddr) after its last work before it sets their
	// notify flags and sleeps until a register doorbell: 0 is
	// DefaultDBPollIdle, negative sleeps at the first pass without work.
	DBPollIdle time.Duration

	// RegOverride is a test hook for a device that lies about itself:
	// reads of the identity and capability registers it names (chip.RegID
	// through chip.RegRHQMaxEntries) return the given value instead of the
	// model's. The model itself still works by the fields above. New takes
	// a copy; other registers are refused.
	RegOverride map[uint64]uint64

	// Port is the address of the device's network port (RoCEv2 over UDP,
	// docs/fabric.md; ParsePort reads hfisim's --port); the zero value is
	// no port: the device reaches its own QPs only.
	Port netip.AddrPort
}

// DefaultConfig is the configuration of the embedded device.
func DefaultConfig() Config {
	return Config{
		NumContexts:     16,
		RcvArrayPerCtxt: 2048,
		MaxTIDPages:     512,
		MTTEntries:      1 << 21,
		RHQMaxEntries:   4096,
		MPTEntries:      4096,
		NumQPs:          64,
		NumCQs:          64,
		MaxQPWR:         16384,
		MaxCQE:          65536,
		MaxSGE:          8,
		MaxFastRegPages: 4096,
	}
}

func (c Config) validate() error {
	switch {
	case c.NumContexts < 1 || c.NumContexts > chip.MaxContexts:
		return fmt.Errorf("hfisim: %d contexts, want 1..%d", c.NumContexts, chip.MaxContexts)
	case c.RcvArrayPerCtxt < chip.RcvArrayGroupSize || c.RcvArrayPerCtxt%chip.RcvArrayGroupSize != 0 ||
		c.RcvArrayPerCtxt > chip.MaxRcvArrayPerCtxt:
		return fmt.Errorf("hfisim: %d RcvArray entries per context, want a multiple of %d up to %d",
			c.RcvArrayPerCtxt, chip.RcvArrayGroupSize, chip.MaxRcvArrayPerCtxt)
	case c.MaxTIDPages < 1 || c.MaxTIDPages&(c.MaxTIDPages-1) != 0 || c.MaxTIDPages > chip.MaxTIDPages:
		return fmt.Errorf("hfisim: max TID pages %d, want a power of two", c.MaxTIDPages)
	case c.MTTEntries < 0 || c.MTTEntries > chip.MaxMTTEntries || c.RHQMaxEntries < 2:
		return errors.New("hfisim: bad MTT or RHQ size")
	}
	if err := c.validateVerbs(); err != nil {
		return err
	}
	if c.TLBInvLatency < 0 || c.TLBInvLatency > MaxTLBInvLatency {
		return fmt.Errorf("hfisim: TLB invalidation latency %v, want 0..%v", c.TLBInvLatency, MaxTLBInvLatency)
	}
	for off := range c.RegOverride {
		if !overridable(off) {
			return fmt.Errorf("hfisim: override of register %#x: only identity and capability registers", off)
		}
	}
	return nil
}

// overridable reports whether RegOverride may fake register off: the
// identity and capability registers, and the verbs size registers.
func overridable(off uint64) bool {
	if off%8 != 0 {
		return false
	}
	return off <= chip.RegRHQMaxEntries || (off >= chip.RegMPTEntries && off <= chip.RegMaxFastRegPages)
}

func (c Config) validateVerbs() error {
	pow2 := func(v, lo, hi int) bool { return v >= lo && v <= hi && v&(v-1) == 0 }
	switch {
	case c.MPTEntries < 1 || c.MPTEntries > chip.MaxMPTEntries:
		return fmt.Errorf("hfisim: %d MPT entries, want 1..%d", c.MPTEntries, chip.MaxMPTEntries)
	case c.NumQPs < 1 || c.NumQPs > chip.MaxQPs:
		return fmt.Errorf("hfisim: %d QPs, want 1..%d", c.NumQPs, chip.MaxQPs)
	case c.NumCQs < 1 || c.NumCQs > chip.MaxCQs:
		return fmt.Errorf("hfisim: %d CQs, want 1..%d", c.NumCQs, chip.MaxCQs)
	case !pow2(c.MaxQPWR, 1, chip.MaxQPWR):
		return fmt.Errorf("hfisim: max QP WRs %d, want a power of two up to %d", c.MaxQPWR, chip.MaxQPWR)
	case !pow2(c.MaxCQE, 2, chip.MaxCQE):
		return fmt.Errorf("hfisim: max CQEs %d, want a power of two from 2 to %d", c.MaxCQE, chip.MaxCQE)
	case c.MaxSGE < 1 || c.MaxSGE > chip.WQEMaxSGE:
		return fmt.Errorf("hfisim: max SGEs %d, want 1..%d", c.MaxSGE, chip.WQEMaxSGE)
	case !pow2(c.MaxFastRegPages, 1, chip.MaxFastRegPages):
		return fmt.Errorf("hfisim: max fast-reg pages %d, want a power of two up to %d", c.MaxFastRegPages, chip.MaxFastRegPages)
	}
	return nil
}

// Device is one emulated HFI. It is safe for concurrent use.
type Device struct {
	cfg Config

	rcvArray *memRegion
	mtt      *memRegion // BAR4: the MTT, then the MPT at mptOff
	mptOff   uint64

	mu       sync.Mutex // guards everything below
	pci      *config
	scratch  uint64
	intMask  uint64
	intState uint64
	tlbDone  uint64
	tlbStart uint64
	gen      uint64 // bumped by reset, so the engine drops work begun before it
	errs     counters
	ctxts    []ctxtState
	dma      vfiouser.DMA
	intx     *os.File
	msix     []*os.File
	qps      []qpState
	// tlbQueued is len(odp.tlbQ), kept under mu and read without it.
	tlbQueued atomic.Int32
	// stepList is the engine goroutine's list of QPs with work in a pass.
	stepList []int
	cqs      []cqState
	tlb      tlbCache      // device TLB: MTT index -> cached MTT entry
	odp      odpState      // event queue, page faults, TLB commands in flight
	tlbSig   chan struct{} // wakes the TLB worker (not under mu)

	kick     chan struct{} // doorbell: wakes the engine
	ringFD   *ringFD       // the attached client's QPDBRing eventfd (dbring.go), under mu
	sleepReq chan chan struct{}
	armed    atomic.Bool  // a CQ was armed since the engine last woke (dbrec.go)
	lastArm  atomic.Int64 // when a CQ was last armed, Unix ns (dbrec.go)
	tracer   traceHook    // trace.go
	dbPoll   []dbRecRef   // the engine's scratch list of doorbell records
	dbQPs    []int        // the QPs with a doorbell record address, under mu (dbrec.go)
	dbBuf    [8]byte      // the engine's buffer for reading a record's indices
	idleReq  chan chan struct{}
	done     chan struct{}
	wg       sync.WaitGroup
	closeMu  sync.Once

	net *netPort // the network port (net.go), nil without one; set before the engine starts
}

// counters are the device's error and traffic counters (RegErrCnt*, RegCnt*).
type counters struct {
	iommuFault, badAccess, tid, badDesc, rhqFull, eagerFull, packets, bytes uint64
	nakAccess, nakInvReq, verbsPkts, tlbHits, tlbMiss, verbs                uint64
}

// New creates a device and starts its send engine.
func New(cfg Config) (*Device, error) { return newDevice(cfg, nil) }

// newDevice is New with the network port on l instead of a UDP socket
// (tests; nil: cfg.Port's socket, if cfg.Port is set).
func newDevice(cfg Config, l link) (*Device, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	cfg.RegOverride = maps.Clone(cfg.RegOverride)
	d := &Device{
		cfg:      cfg,
		ctxts:    make([]ctxtState, cfg.NumContexts),
		qps:      make([]qpState, cfg.NumQPs),
		cqs:      make([]cqState, cfg.NumCQs),
		mptOff:   chip.MPTOffset(cfg.MTTEntries),
		kick:     make(chan struct{}, 1),
		sleepReq: make(chan chan struct{}),
		idleReq:  make(chan chan struct{}),
		done:     make(chan struct{}),
	}
	var err error
	// PCI BARs are powers of two in size (QEMU asserts it when it maps them).
	if d.rcvArray, err = newMemRegion("rcvarray", barSize(cfg.NumContexts*cfg.RcvArrayPerCtxt*chip.RcvArrayEntrySize)); err != nil {
		return nil, err
	}
	if d.mtt, err = newMemRegion("mtt", barSize(int(d.mptOff)+cfg.MPTEntries*chip.MPTEntrySize)); err != nil {
		d.rcvArray.close()
		return nil, err
	}
	d.pci = newConfig(d.barSizes(), d.msixVectors())
	d.tlbSig = make(chan struct{}, 1)
	if cfg.Port.IsValid() {
		if err := d.startNet(l); err != nil {
			d.rcvArray.close()
			d.mtt.close()
			return nil, err
		}
	}
	d.resetLocked()
	d.wg.Add(2)
	go d.engine()
	go d.tlbWorker()
	return d, nil
}

// barSize rounds a region up to a power of two of at least a page.
func barSize(n int) int {
	size := 4096
	for size < n {
		size <<= 1
	}
	return size
}

// Close stops the engine and releases the device's memory and eventfds.
func (d *Device) Close() (err error) {
	d.closeMu.Do(func() {
		close(d.done)
		d.wg.Wait()
		d.stopRing()
		d.mu.Lock()
		d.closeIRQsLocked()
		d.mu.Unlock()
		d.rcvArray.close()
		d.mtt.close()
		err = d.stopNet()
	})
	return err
}

// Config returns the device's configuration.
func (d *Device) Config() Config { return d.cfg }

func (d *Device) msixVectors() int { return 1 + d.cfg.NumContexts }

func (d *Device) barSizes() map[int]uint64 {
	return map[int]uint64{
		chip.CSRBar:      chip.CSRBarSize,
		chip.RcvArrayBar: uint64(len(d.rcvArray.mem)),
		chip.MTTBar:      uint64(len(d.mtt.mem)),
	}
}

// resetLocked puts the device in its power-on state: contexts disabled,
// interrupts masked, counters cleared, RcvArray, MTT and MPT invalid, QPs in
// RESET, CQs disabled, the TLB empty.
func (d *Device) resetLocked() {
	d.scratch, d.intMask, d.intState, d.tlbDone, d.tlbStart = 0, 0, 0, 0, 0
	d.gen++
	d.errs = counters{}
	for i := range d.ctxts {
		d.ctxts[i] = ctxtState{}
	}
	for i := range d.qps {
		d.qps[i] = qpState{epoch: d.qps[i].epoch + 1}
	}
	d.dbQPsChangedLocked()
	for i := range d.cqs {
		d.cqs[i] = cqState{epoch: d.cqs[i].epoch + 1}
	}
	d.tlb.reset()
	d.odp.reset()
	d.tlbQueued.Store(0)
	d.resetNetLocked()
	d.rcvArray.clear()
	d.mtt.clear()
	d.pci.reset(d.barSizes(), d.msixVectors())
}

// --- vfiouser.DeviceModel ---

// DeviceInfo implements vfiouser.DeviceModel.
func (d *Device) DeviceInfo() vfio.DeviceInfo {
	return vfio.DeviceInfo{Flags: vfio.DeviceFlagsPCI | vfio.DeviceFlagsReset, NumRegions: vfio.PCINumRegions, NumIRQs: vfio.PCINumIRQs}
}

// RegionInfo implements vfiouser.DeviceModel.
func (d *Device) RegionInfo(index uint32) (vfio.RegionInfo, *os.File, error) {
	rw := uint32(vfio.RegionFlagRead | vfio.RegionFlagWrite)
	switch index {
	case chip.CSRBar:
		return vfio.RegionInfo{Index: index, Flags: rw, Size: chip.CSRBarSize}, nil, nil
	case chip.RcvArrayBar:
		return vfio.RegionInfo{Index: index, Flags: rw | vfio.RegionFlagMmap, Size: uint64(len(d.rcvArray.mem))}, d.rcvArray.file, nil
	case chip.MTTBar:
		return vfio.RegionInfo{Index: index, Flags: rw | vfio.RegionFlagMmap, Size: uint64(len(d.mtt.mem))}, d.mtt.file, nil
	case vfio.PCIConfigRegionIndex:
		return vfio.RegionInfo{Index: index, Flags: rw, Size: cfgSpaceSize}, nil, nil
	case 1, 3, 5, vfio.PCIROMRegionIndex, vfio.PCIVGARegionIndex:
		return vfio.RegionInfo{Index: index}, nil, nil
	}
	return vfio.RegionInfo{}, nil, fmt.Errorf("hfisim: region %d: %w", index, unix.EINVAL)
}

// RegionRead implements vfiouser.DeviceModel.
func (d *Device) RegionRead(index uint32, off uint64, p []byte) error {
	return d.regionAccess(index, off, p, false)
}

// RegionWrite implements vfiouser.DeviceModel.
func (d *Device) RegionWrite(index uint32, off uint64, p []byte) error {
	return d.regionAccess(index, off, p, true)
}

func (d *Device) regionAccess(index uint32, off uint64, p []byte, write bool) error {
	dir := "read"
	if write {
		dir = "write"
	}
	switch index {
	case chip.CSRBar:
		if write {
			return d.csrWrite(off, p)
		}
		return d.csrRead(off, p)
	case chip.RcvArrayBar:
		return memAccess(d.rcvArray, off, p, write)
	case chip.MTTBar:
		return memAccess(d.mtt, off, p, write)
	case vfio.PCIConfigRegionIndex:
		if off >= cfgSpaceSize || uint64(len(p)) > cfgSpaceSize-off {
			return fmt.Errorf("hfisim: config %s %#x+%d: %w", dir, off, len(p), unix.EINVAL)
		}
		d.mu.Lock()
		if write {
			d.pci.write(off, p)
		} else {
			d.pci.read(off, p)
		}
		d.mu.Unlock()
		return nil
	}
	return fmt.Errorf("hfisim: %s of region %d: %w", dir, index, unix.EINVAL)
}

// memAccess is a trapped access to an mmappable region: whole 8-byte entries
// only, so the device never sees a torn entry.
func memAccess(r *memRegion, off uint64, p []byte, write bool) error {
	n := uint64(len(p))
	if off%8 != 0 || n%8 != 0 || n == 0 || off >= uint64(len(r.mem)) || n > uint64(len(r.mem))-off {
		return fmt.Errorf("hfisim: region access %#x+%d: %w", off, n, unix.EINVAL)
	}
	for i := uint64(0); i < n; i += 8 {
		if write {
			r.store64(off+i, le64(p[i:]))
		} else {
			put64(p[i:], r.load64(off+i))
		}
	}
	return nil
}

// IRQInfo implements vfiouser.DeviceModel.
func (d *Device) IRQInfo(index uint32) (vfio.IRQInfo, error) {
	switch index {
	case vfio.PCIINTxIRQIndex:
		return vfio.IRQInfo{Index: index, Flags: vfio.IRQInfoEventfd | vfio.IRQInfoMaskable | vfio.IRQInfoAutomasked, Count: 1}, nil
	case vfio.PCIMSIXIRQIndex:
		return vfio.IRQInfo{Index: index, Flags: vfio.IRQInfoEventfd | vfio.IRQInfoNoresize, Count: uint32(d.msixVectors())}, nil
	case vfio.PCIMSIIRQIndex, vfio.PCIErrIRQIndex, vfio.PCIReqIRQIndex:
		return vfio.IRQInfo{Index: index, Flags: vfio.IRQInfoEventfd}, nil
	}
	return vfio.IRQInfo{}, fmt.Errorf("hfisim: irq index %d: %w", index, unix.EINVAL)
}

// SetIRQs implements vfiouser.DeviceModel.
func (d *Device) SetIRQs(index, start, count uint32, fds []*os.File) error {
	// Eventfds: nothing buffered a close could lose, and a refused
	// SET_IRQS reports its own error.
	closeAll := func() {
		for _, f := range fds {
			_ = f.Close()
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	switch index {
	case vfio.PCIINTxIRQIndex:
		if start+count > 1 || (fds != nil && len(fds) != int(count)) {
			closeAll()
			return fmt.Errorf("hfisim: INTx vectors %d+%d: %w", start, count, unix.EINVAL)
		}
		if d.intx != nil && (fds == nil || count == 1) {
			_ = d.intx.Close() // an eventfd the driver replaced or withdrew
			d.intx = nil
		}
		if count == 1 && fds != nil {
			d.intx = fds[0]
		}
		return nil
	case vfio.PCIMSIXIRQIndex:
		n := uint32(d.msixVectors())
		if start > n || count > n-start || (fds != nil && len(fds) != int(count)) {
			closeAll()
			return fmt.Errorf("hfisim: MSI-X vectors %d+%d of %d: %w", start, count, n, unix.EINVAL)
		}
		if d.msix == nil {
			d.msix = make([]*os.File, n)
		}
		if fds == nil && count == 0 {
			for i, f := range d.msix {
				if f != nil {
					_ = f.Close() // withdrawn eventfds
					d.msix[i] = nil
				}
			}
			return nil
		}
		for i := uint32(0); i < count; i++ {
			if old := d.msix[start+i]; old != nil {
				_ = old.Close() // replaced eventfd
			}
			d.msix[start+i] = nil
			if fds != nil {
				d.msix[start+i] = fds[i]
			}
		}
		return nil
	}
	closeAll()
	return fmt.Errorf("hfisim: irq index %d has no vectors: %w", index, unix.EINVAL)
}

// closeIRQsLocked drops the interrupt eventfds (reset, close): closing an
// eventfd cannot lose anything, so there is nothing to report.
func (d *Device) closeIRQsLocked() {
	if d.intx != nil {
		_ = d.intx.Close()
		d.intx = nil
	}
	for i, f := range d.msix {
		if f != nil {
			_ = f.Close()
			d.msix[i] = nil
		}
	}
}

// Reset implements vfiouser.DeviceModel (DEVICE_RESET): a function-level
// reset. Interrupt wiring set through SET_IRQS is the host's, not the
// device's, and survives.
func (d *Device) Reset() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.resetLocked()
	return nil
}

// Attach implements vfiouser.DeviceModel.
func (d *Device) Attach(dma vfiouser.DMA) {
	d.stopRing() // a previous client's, had it not detached
	// Without an eventfd (nil) no ioeventfd is offered: the client
	// writes the registers.
	r, _ := startRing()
	d.mu.Lock()
	d.dma = dma
	d.ringFD = r
	d.mu.Unlock()
	if r != nil {
		go r.wait(d.kickEngine)
	}
}

// stopRing closes the attached client's ioeventfd and waits for its waiter.
func (d *Device) stopRing() {
	d.mu.Lock()
	r := d.ringFD
	d.ringFD = nil
	d.mu.Unlock()
	if r != nil {
		r.stop()
	}
}

// Detach implements vfiouser.DeviceModel: the client is gone, so is every
// mapping and interrupt route; the device resets as on a hot unplug.
func (d *Device) Detach() {
	d.stopRing()
	d.mu.Lock()
	defer d.mu.Unlock()
	d.dma = nil
	d.closeIRQsLocked()
	d.resetLocked()
}

// raiseLocked sets interrupt source bits and signals the vectors whose
// sources are enabled. Signalling an eventfd never blocks (the counter
// saturates only after 2^64-2 unread events).
func (d *Device) raiseLocked(src uint64) {
	d.intState |= src
	pending := src & d.intMask
	if pending == 0 {
		return
	}
	d.trace(TraceInterrupt, pending, 0, 0)
	if d.pci.msixEnabled() || d.intx == nil {
		if pending&chip.IntSrcVector0 != 0 {
			pending |= 1 // the EQ and TLB sources share vector 0
		}
		for v := 0; v < d.msixVectors() && v < len(d.msix); v++ {
			if pending&(1<<uint(v)) != 0 && d.msix[v] != nil {
				signal(d.msix[v])
			}
		}
		return
	}
	if d.pci.command()&pciCommandIntxDis == 0 {
		d.pci.setIntxStatus(true)
		signal(d.intx)
	}
}

var one = []byte{1, 0, 0, 0, 0, 0, 0, 0}

// signal raises an interrupt. A full counter (EAGAIN) means one is pending
// already, which is all an interrupt says; the driver's fd is its to keep.
func signal(f *os.File) { _, _ = unix.Write(int(f.Fd()), one) }

// RcvArraySnapshot returns a copy of the RcvArray entries, for tests and
// diagnostics (a logic analyser on the device's memory).
func (d *Device) RcvArraySnapshot() []uint64 {
	n := d.cfg.NumContexts * d.cfg.RcvArrayPerCtxt
	out := make([]uint64, n)
	for i := range out {
		out[i] = d.rcvArray.load64(uint64(i) * chip.RcvArrayEntrySize)
	}
	return out
}
