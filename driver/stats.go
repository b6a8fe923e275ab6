package driver

import (
	"fmt"
	"sync/atomic"

	"github.com/gohfi/gohfi/uapi"
)

// devStats are the driver's counters, exposed like the kernel's per-device
// debugfs/sysfs counters through GOHFI_IOCTL_DRIVER_STATS.
type devStats struct {
	tidsProgrammed, tidsFreed, tidInvalidations, tidInvalReads atomic.Uint64
	pagesPinned, pagesUnpinned                                 atomic.Uint64
	tlbFlushes                                                 atomic.Uint64
	odpFaults, odpFaultsHandled, odpInvals, odpInvalsHandled   atomic.Uint64
	odpPrefetch                                                atomic.Uint64
	fastRegs, localInvs                                        atomic.Uint64
}

// Stats returns the device's driver counters.
func (d *Device) Stats() uapi.GohfiDriverStats {
	s := &d.stats
	return uapi.GohfiDriverStats{
		TidsProgrammed:   s.tidsProgrammed.Load(),
		TidsFreed:        s.tidsFreed.Load(),
		TidInvalidations: s.tidInvalidations.Load(),
		TidInvalReads:    s.tidInvalReads.Load(),
		PagesPinned:      s.pagesPinned.Load(),
		PagesUnpinned:    s.pagesUnpinned.Load(),
		TlbFlushes:       s.tlbFlushes.Load(),
		OdpPageFaults:    s.odpFaults.Load(),
		OdpInvalidations: s.odpInvals.Load(),
		OdpFaultsHandled: s.odpFaultsHandled.Load(),
		OdpInvalsHandled: s.odpInvalsHandled.Load(),
		OdpPagePrefetch:  s.odpPrefetch.Load(),
		FastRegs:         s.fastRegs.Load(),
		LocalInvs:        s.localInvs.Load(),
	}
}

func (f *File) driverStats(arg UserPtr) error {
	if f.pd != nil {
		// Retire what the device consumed, so fast_regs and local_invs
		// count it.
		if err := f.pd.reclaimFastReg(); err != nil {
			return fmt.Errorf("gohfi: DRIVER_STATS: %w", err)
		}
	}
	st := f.d.Stats()
	b := make([]byte, st.SizeBytes())
	st.MarshalBytes(b)
	return wrapFault("DRIVER_STATS", copyToUser(arg, b))
}

// queryDevice (GOHFI_IOCTL_QUERY_DEVICE) reports what this driver offers on
// this device: the verbs limits as a user can reach them (one ring slot
// stays empty; a CQ holds cqUsable of its entries). ODP is advertised on
// a device with chip.CapODP (odpCaps), fast registration where the device
// has it (IB_DEVICE_MEM_MGT_EXTENSIONS and the longest page list). Atomics
// have no field (ib_device_attr's atomic_cap is not in gohfi_device_attr):
// CMP_AND_SWP and FETCH_AND_ADD work wherever the verbs engine does, atomic
// among the device's own atomics (IB_ATOMIC_HCA), as docs/abi.md says.
func (f *File) queryDevice(arg UserPtr) error {
	i := f.d.info
	a := uapi.GohfiDeviceAttr{
		VendorID:        uint32(i.VendorID),
		VendorPartID:    uint32(i.DeviceID),
		HwVer:           uint32(i.Revision),
		NumContexts:     uint32(i.NumContexts),
		RcvArrayEntries: uint32(i.RcvArrayPerCtxt),
		MaxTidPages:     uint32(i.MaxTIDPages),
		MttEntries:      uint32(i.MTTEntries),
		PageSizeCap:     pageSize,
	}
	if v := f.d.verbs; v != nil {
		a.MaxMR = uint32(v.maxMR())
		a.MaxQP = uint32(v.attr.NumQPs)
		a.MaxQPWR = uint32(v.maxQPWR())
		a.MaxSge = uint32(v.attr.MaxSGE)
		a.MaxCQ = uint32(v.attr.NumCQs)
		a.MaxCQE = uint32(v.maxCQE())
		a.MaxMRSize = uint64(i.MTTEntries) * pageSize
		a.OdpGeneralCaps, a.OdpRCCaps = v.odpCaps()
		if v.maxFRPages > 0 {
			a.DeviceCapFlags |= uapi.IB_DEVICE_MEM_MGT_EXTENSIONS
			a.MaxFastRegPageListLen = uint32(v.maxFRPages)
		}
	}
	b := make([]byte, a.SizeBytes())
	a.MarshalBytes(b)
	return wrapFault("QUERY_DEVICE", copyToUser(arg, b))
}

// HardwareHasCap reports a RegCapFlags bit of the device.
func (d *Device) HardwareHasCap(bit uint64) bool { return d.info.CapFlags&bit != 0 }
