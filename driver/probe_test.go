package driver_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strings"
	"testing"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/rcvarray"
	"golang.org/x/sys/unix"
)

// probeLiar probes an embedded hfisim whose identity and capability
// registers read as regs says (hfisim.Config.RegOverride); the device is
// closed when tb ends. The model behind the registers has the most
// contexts and RcvArray entries probe accepts, so its RcvArray BAR backs
// every geometry probe accepts.
func probeLiar(tb testing.TB, regs map[uint64]uint64) (*attach.Attached, error) {
	tb.Helper()
	o := attach.DefaultOptions()
	// A maximum-size TID_UPDATE pins 8 MiB, all of the usual default
	// RLIMIT_MEMLOCK; root may pass it, as in the kernel.
	o.Params.HonorCapIPCLock = true
	o.Sim.NumContexts = chip.MaxContexts
	o.Sim.RcvArrayPerCtxt = chip.MaxRcvArrayPerCtxt
	o.Sim.MTTEntries = 0 // keep BAR4 small
	// These are the hfi1 part's limits (TestVerbsProbeLimits has the verbs
	// engine's): unless a case sets RegCapFlags, the device does not offer
	// the engine, whose BAR4 would have to hold the MTT the case claims.
	if _, ok := regs[chip.RegCapFlags]; !ok {
		regs = maps.Clone(regs)
		if regs == nil {
			regs = map[uint64]uint64{}
		}
		regs[chip.RegCapFlags] = chip.CapMSIX | chip.CapLoopback
	}
	o.Sim.RegOverride = regs
	a, err := attach.Open(context.Background(), "embedded", o)
	if err != nil {
		return nil, err
	}
	tb.Cleanup(func() {
		if err := a.Close(); err != nil {
			tb.Errorf("close: %v", err)
		}
	})
	return a, nil
}

// capOf returns the DeviceInfo field probe filled from register off.
func capOf(i driver.DeviceInfo, off uint64) uint64 {
	switch off {
	case chip.RegRevision:
		return i.Revision
	case chip.RegNumCtxts:
		return uint64(i.NumContexts)
	case chip.RegRcvArrayPerCtxt:
		return uint64(i.RcvArrayPerCtxt)
	case chip.RegMaxTIDPages:
		return uint64(i.MaxTIDPages)
	case chip.RegMTTEntries:
		return uint64(i.MTTEntries)
	case chip.RegCapFlags:
		return i.CapFlags
	case chip.RegRHQMaxEntries:
		return uint64(i.RHQMaxEntries)
	}
	panic(fmt.Sprintf("no capability register %#x", off))
}

// checkInfoInLimits fails t when an accepted device's info is outside what
// the driver's encodings hold.
func checkInfoInLimits(t *testing.T, i driver.DeviceInfo) {
	t.Helper()
	pow2 := func(v int) bool { return v > 0 && v&(v-1) == 0 }
	switch {
	case i.Revision < chip.MinRevision || i.Revision > chip.MaxRevision,
		i.NumContexts < 1 || i.NumContexts > chip.MaxContexts,
		i.RcvArrayPerCtxt < chip.RcvArrayGroupSize || i.RcvArrayPerCtxt%chip.RcvArrayGroupSize != 0 ||
			i.RcvArrayPerCtxt > chip.MaxRcvArrayPerCtxt || i.RcvArrayPerCtxt > rcvarray.MaxTIDEntries,
		!pow2(i.MaxTIDPages) || i.MaxTIDPages > chip.MaxTIDPages,
		i.MTTEntries < 0 || i.MTTEntries > chip.MaxMTTEntries,
		i.CapFlags&^chip.CapKnown != 0,
		i.RHQMaxEntries < chip.MinRHQEntries || i.RHQMaxEntries > chip.MaxRHQEntries:
		t.Fatalf("accepted device outside the limits: %+v", i)
	}
}

// checkMaxTIDUpdate registers the largest buffer one TID_UPDATE takes (one
// page per RcvArray entry of the context) and checks that every TID it
// returns decodes back to a distinct entry of the context with the page
// count the driver's split gives, then frees them.
func checkMaxTIDUpdate(t *testing.T, a *attach.Attached) {
	t.Helper()
	requireRoot(t)
	info := a.Device.Info()
	f := openFile(t, a)
	if err := hfiuser.AssignCtxt(f); err != nil {
		t.Fatalf("ASSIGN_CTXT: %v", err)
	}
	per := info.RcvArrayPerCtxt
	const page = 1 << chip.RcvArrayPageShift
	length := per * page
	buf := allocBuf(t, length, false)
	// The TID list lives outside the Go heap: the driver writes it through
	// the address in hfi1_tid_info, which would go stale if a small list
	// were allocated on this goroutine's stack and the stack moved.
	lb := allocBuf(t, 4*per, false)
	list := u32sAt(lb.Addr(), per)
	tids, got, err := hfiuser.TIDUpdate(f, buf.Addr(), length, list)
	if err != nil {
		t.Fatalf("TID_UPDATE of %d bytes (MaxTIDPages %d): %v", length, info.MaxTIDPages, err)
	}
	want := rcvarray.SplitPages(per, info.MaxTIDPages)
	if got != length || len(tids) != len(want) {
		t.Fatalf("TID_UPDATE: %d TIDs covering %d bytes, want %d covering %d", len(tids), got, len(want), length)
	}
	seen := map[int]bool{}
	for i, tid := range tids {
		rel, n, err := rcvarray.CheckTID(tid, per)
		if err != nil || n != want[i] || seen[rel] || rcvarray.EncodeTID(rel, n) != tid {
			t.Fatalf("TID %d %#x decodes to entry %d, %d pages, %v (want %d pages, each entry once)", i, tid, rel, n, err, want[i])
		}
		seen[rel] = true
	}
	if n, err := hfiuser.TIDFree(f, tids); err != nil || n != len(tids) {
		t.Fatalf("TID_FREE: %d of %d, %v", n, len(tids), err)
	}
}

// TestProbeCapabilityLimits sets each identity and capability register to
// its boundary values (the smallest and largest valid, one past, 0, all
// ones) on an otherwise sane device. Probe refuses every value outside
// the driver's encodings with an error naming the register; on an
// accepted device the largest TID_UPDATE works and its TIDs decode back.
func TestProbeCapabilityLimits(t *testing.T) {
	const all = ^uint64(0)
	rcvHdrCnt := uint64(driver.DefaultParams().RcvHdrCnt)
	cases := []struct {
		reg  string
		off  uint64
		v    uint64
		want unix.Errno // 0: accepted
	}{
		{"ID", chip.RegID, chip.IDMagic, 0},
		{"ID", chip.RegID, chip.IDMagic + 1, unix.EIO},
		{"ID", chip.RegID, 0, unix.EIO},
		{"ID", chip.RegID, all, unix.EIO},

		{"Revision", chip.RegRevision, chip.MinRevision, 0},
		{"Revision", chip.RegRevision, chip.MaxRevision, 0},
		{"Revision", chip.RegRevision, chip.MaxRevision + 1, unix.EIO},
		{"Revision", chip.RegRevision, chip.MinRevision - 1, unix.EIO},
		{"Revision", chip.RegRevision, 0, unix.EIO},
		{"Revision", chip.RegRevision, all, unix.EIO},

		{"NumCtxts", chip.RegNumCtxts, 1, 0},
		{"NumCtxts", chip.RegNumCtxts, chip.MaxContexts, 0},
		{"NumCtxts", chip.RegNumCtxts, chip.MaxContexts + 1, unix.EIO},
		{"NumCtxts", chip.RegNumCtxts, 0, unix.EIO},
		{"NumCtxts", chip.RegNumCtxts, all, unix.EIO},

		{"RcvArrayPerCtxt", chip.RegRcvArrayPerCtxt, chip.RcvArrayGroupSize, 0},
		{"RcvArrayPerCtxt", chip.RegRcvArrayPerCtxt, chip.MaxRcvArrayPerCtxt, 0},
		{"RcvArrayPerCtxt", chip.RegRcvArrayPerCtxt, chip.MaxRcvArrayPerCtxt + 1, unix.EIO},
		{"RcvArrayPerCtxt", chip.RegRcvArrayPerCtxt, chip.MaxRcvArrayPerCtxt + chip.RcvArrayGroupSize, unix.EIO},
		{"RcvArrayPerCtxt", chip.RegRcvArrayPerCtxt, chip.RcvArrayGroupSize + 4, unix.EIO},
		{"RcvArrayPerCtxt", chip.RegRcvArrayPerCtxt, 0, unix.EIO},
		{"RcvArrayPerCtxt", chip.RegRcvArrayPerCtxt, all, unix.EIO},

		{"MaxTIDPages", chip.RegMaxTIDPages, 1, 0},
		{"MaxTIDPages", chip.RegMaxTIDPages, chip.MaxTIDPages, 0},
		{"MaxTIDPages", chip.RegMaxTIDPages, chip.MaxTIDPages + 1, unix.EIO},
		{"MaxTIDPages", chip.RegMaxTIDPages, 2 * chip.MaxTIDPages, unix.EIO},
		{"MaxTIDPages", chip.RegMaxTIDPages, 2048, unix.EIO}, // issue 8: EncodeTID panicked on the next 8 MiB TID_UPDATE
		{"MaxTIDPages", chip.RegMaxTIDPages, 3, unix.EIO},
		{"MaxTIDPages", chip.RegMaxTIDPages, 0, unix.EIO},
		{"MaxTIDPages", chip.RegMaxTIDPages, all, unix.EIO},

		{"MTTEntries", chip.RegMTTEntries, 0, 0},
		{"MTTEntries", chip.RegMTTEntries, chip.MaxMTTEntries, 0},
		{"MTTEntries", chip.RegMTTEntries, chip.MaxMTTEntries + 1, unix.EIO},
		{"MTTEntries", chip.RegMTTEntries, all, unix.EIO},

		{"CapFlags", chip.RegCapFlags, 0, 0},
		{"CapFlags", chip.RegCapFlags, chip.CapKnown, 0},
		{"CapFlags", chip.RegCapFlags, chip.CapKnown + 1, unix.EIO},
		{"CapFlags", chip.RegCapFlags, 1 << 63, unix.EIO},
		{"CapFlags", chip.RegCapFlags, all, unix.EIO},

		{"RHQMaxEntries", chip.RegRHQMaxEntries, rcvHdrCnt, 0},
		{"RHQMaxEntries", chip.RegRHQMaxEntries, chip.MaxRHQEntries, 0},
		{"RHQMaxEntries", chip.RegRHQMaxEntries, chip.MaxRHQEntries + 1, unix.EIO},
		{"RHQMaxEntries", chip.RegRHQMaxEntries, rcvHdrCnt - 1, unix.EINVAL}, // valid, but below the module's rcvhdrcnt
		{"RHQMaxEntries", chip.RegRHQMaxEntries, chip.MinRHQEntries - 1, unix.EIO},
		{"RHQMaxEntries", chip.RegRHQMaxEntries, 0, unix.EIO},
		{"RHQMaxEntries", chip.RegRHQMaxEntries, all, unix.EIO},
	}
	for _, c := range cases {
		t.Run(fmt.Sprintf("%s=%#x", c.reg, c.v), func(t *testing.T) {
			a, err := probeLiar(t, map[uint64]uint64{c.off: c.v})
			if c.want != 0 {
				if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.reg) {
					t.Fatalf("probe: %v; want a refusal naming %s, wrapping %v", err, c.reg, c.want)
				}
				return
			}
			if err != nil {
				t.Fatalf("probe refused a valid %s: %v", c.reg, err)
			}
			info := a.Device.Info()
			checkInfoInLimits(t, info)
			if c.off != chip.RegID && capOf(info, c.off) != c.v {
				t.Fatalf("info %+v does not hold %s=%#x", info, c.reg, c.v)
			}
			checkMaxTIDUpdate(t, a)
		})
	}
}

// FuzzProbe feeds random identity and capability register values to probe:
// it must not panic, and either refuse the device with an errno or accept
// one whose info is what the registers said and inside the limits, on which
// the largest TID_UPDATE must work and return TIDs that decode back.
func FuzzProbe(f *testing.F) {
	// hfisim's defaults; hand-picked boundary cases (MaxTIDPages 2048 of
	// issue 8, ...) are in testdata/fuzz/FuzzProbe.
	f.Add(uint64(chip.IDMagic), uint64(chip.RevisionMajor<<chip.RevisionMajorShift|chip.RevisionMinor),
		uint64(16), uint64(2048), uint64(512), uint64(1<<16), uint64(chip.CapKnown), uint64(4096))
	f.Fuzz(func(t *testing.T, id, rev, nctxt, per, maxTID, mtt, caps, rhq uint64) {
		regs := map[uint64]uint64{
			chip.RegID: id, chip.RegRevision: rev, chip.RegNumCtxts: nctxt, chip.RegRcvArrayPerCtxt: per,
			chip.RegMaxTIDPages: maxTID, chip.RegMTTEntries: mtt, chip.RegCapFlags: caps, chip.RegRHQMaxEntries: rhq,
		}
		a, err := probeLiar(t, regs)
		if err != nil {
			var errno unix.Errno
			if !errors.As(err, &errno) {
				t.Fatalf("probe refused without an errno: %v", err)
			}
			return
		}
		info := a.Device.Info()
		checkInfoInLimits(t, info)
		for off, v := range regs {
			if off != chip.RegID && capOf(info, off) != v {
				t.Fatalf("info %+v does not hold register %#x = %#x", info, off, v)
			}
		}
		checkMaxTIDUpdate(t, a)
	})
}
