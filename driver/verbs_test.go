package driver_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"github.com/gohfi/gohfi/internal/testenv"
	"testing"
	"time"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfisim"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// verbsEnv is a device with the verbs engine: the embedded hfisim, or the
// device GOHFI_TEST_DEVICE names (the QEMU guest), as openDev gives it.
type verbsEnv struct {
	a *attach.Attached
}

func openVerbs(t testing.TB, ctxts int) *verbsEnv {
	t.Helper()
	return &verbsEnv{a: openDev(t, ctxts)}
}

// openWithConfig probes an embedded hfisim of configuration cfg.
func openWithConfig(cfg hfisim.Config) (*attach.Attached, error) {
	o := attach.DefaultOptions()
	o.Sim = cfg
	return attach.Open(context.Background(), "embedded", o)
}

// csr reads a BAR0 register through the driver.
func (e *verbsEnv) csr(t testing.TB, off uint64) uint64 {
	t.Helper()
	v, err := e.a.Device.CSR(off)
	if err != nil {
		t.Fatalf("read CSR %#x: %v", off, err)
	}
	return v
}

// bar4 reads an 8-byte word of BAR4 (MTT and MPT) through the driver's
// mapping.
func (e *verbsEnv) bar4(t testing.TB, off uint64) uint64 {
	t.Helper()
	return e.a.Device.BAR4Word(off)
}

func (e *verbsEnv) mptEntry(t testing.TB, key uint32) chip.MPTEntry {
	t.Helper()
	base := chip.MPTOffset(e.a.Device.Info().MTTEntries) + uint64(chip.MPTIndex(key))*chip.MPTEntrySize
	var b [chip.MPTEntrySize]byte
	for i := 0; i < chip.MPTEntrySize; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], e.bar4(t, base+uint64(i)))
	}
	var m chip.MPTEntry
	m.Unmarshal(b[:])
	return m
}

// requireEngine skips (fails under CI=true) on a device without the verbs
// engine.
func (e *verbsEnv) requireEngine(t testing.TB) {
	t.Helper()
	if !e.a.Device.HardwareHasCap(chip.CapVerbs) {
		testenv.Missing(t, "the device has no verbs engine (CapVerbs)")
	}
}

func verbsFile(t testing.TB, e *verbsEnv) *driver.File {
	t.Helper()
	f := openFile(t, e.a)
	assign(t, f)
	return f
}

func wantErrno(t testing.TB, what string, err error, want unix.Errno) {
	t.Helper()
	var got unix.Errno
	switch {
	case want == 0 && err != nil:
		t.Errorf("%s: %v, want success", what, err)
	case want != 0 && (!errors.As(err, &got) || got != want):
		t.Errorf("%s: %v, want %v", what, err, want)
	}
}

// checkNothingPinned fails t if pages are still pinned or mapped.
func checkNothingPinned(t testing.TB, e *verbsEnv) {
	t.Helper()
	st := e.a.Device.Stats()
	if st.PagesPinned != st.PagesUnpinned || e.a.Device.PinnedNow() != 0 {
		t.Errorf("pinned %d, unpinned %d, pins held %d", st.PagesPinned, st.PagesUnpinned, e.a.Device.PinnedNow())
	}
}

// TestVerbsProbeLimits: a device whose verbs registers lie is refused with
// EIO naming the register; a sane one is accepted.
func TestVerbsProbeLimits(t *testing.T) {
	cfg := hfisim.DefaultConfig()
	cfg.NumContexts = 1
	cfg.MTTEntries = 1 << 17
	sim, err := hfisim.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ri, _, err := sim.RegionInfo(chip.MTTBar)
	sim.Close()
	if err != nil {
		t.Fatal(err)
	}
	mptRoom := (ri.Size - chip.MPTOffset(cfg.MTTEntries)) / chip.MPTEntrySize
	cases := []struct {
		off  uint64
		v    uint64
		want unix.Errno
	}{
		{chip.RegMPTEntries, 0, unix.EIO},
		{chip.RegMPTEntries, chip.MaxMPTEntries + 1, unix.EIO},
		{chip.RegMPTEntries, mptRoom, 0}, // fills BAR4 after the MTT exactly
		{chip.RegMPTEntries, mptRoom + 1, unix.EIO},
		{chip.RegNumQPs, 0, unix.EIO},
		{chip.RegNumQPs, chip.MaxQPs + 1, unix.EIO},
		{chip.RegNumCQs, 0, unix.EIO},
		{chip.RegNumCQs, chip.MaxCQs + 1, unix.EIO},
		{chip.RegMaxQPWR, 1, unix.EIO},
		{chip.RegMaxQPWR, 96, unix.EIO},
		{chip.RegMaxQPWR, chip.MaxQPWR * 2, unix.EIO},
		{chip.RegMaxQPWR, chip.MaxQPWR, 0},
		{chip.RegMaxCQE, 0, unix.EIO},
		{chip.RegMaxCQE, chip.MaxCQE * 2, unix.EIO},
		{chip.RegMaxSGE, 0, unix.EIO},
		{chip.RegMaxSGE, chip.WQEMaxSGE + 1, unix.EIO},
		{chip.RegMaxMsgSize, 0, unix.EIO},
		{chip.RegMaxMsgSize, 1<<32 + 1, unix.EIO},
		{chip.RegMaxMsgSize, ^uint64(0), unix.EIO},
	}
	for _, c := range cases {
		t.Run(fmt.Sprintf("%#x=%d", c.off, c.v), func(t *testing.T) {
			cfg := cfg
			cfg.RegOverride = map[uint64]uint64{c.off: c.v}
			a, err := openWithConfig(cfg)
			if err == nil {
				a.Close()
			}
			wantErrno(t, "probe", err, c.want)
		})
	}
	t.Run("MTT-0", func(t *testing.T) {
		cfg := cfg
		cfg.RegOverride = map[uint64]uint64{chip.RegMTTEntries: 0}
		a, err := openWithConfig(cfg)
		if err != nil {
			t.Fatalf("probe of an engine without MTT: %v", err)
		}
		defer a.Close()
		f := openFile(t, a)
		assign(t, f)
		_, _, err = hfiuser.CreateCQ(f, 4, 0)
		wantErrno(t, "CREATE_CQ on an engine without MTT", err, unix.EOPNOTSUPP)
	})
}

// TestVerbsWithoutEngine: without CapVerbs every verbs command is
// EOPNOTSUPP and QUERY_DEVICE reports no verbs limits.
func TestVerbsWithoutEngine(t *testing.T) {
	cfg := hfisim.DefaultConfig()
	cfg.NumContexts = 1
	cfg.RegOverride = map[uint64]uint64{chip.RegCapFlags: chip.CapMSIX | chip.CapLoopback}
	a, err := openWithConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	f := openFile(t, a)
	assign(t, f)
	_, err = hfiuser.RegMR(f, 0x100000, 4096, 0, 0)
	wantErrno(t, "REG_MR", err, unix.EOPNOTSUPP)
	_, _, err = hfiuser.CreateCQ(f, 4, 0)
	wantErrno(t, "CREATE_CQ", err, unix.EOPNOTSUPP)
	attr, err := hfiuser.QueryDevice(f)
	if err != nil || attr.MaxMR != 0 || attr.MaxQP != 0 || attr.MaxCQ != 0 || attr.DeviceCapFlags != 0 || attr.OdpGeneralCaps != 0 {
		t.Fatalf("QUERY_DEVICE: %+v, %v", attr, err)
	}
}

// TestVerbsQueryDevice: the limits a user can reach, fast registration,
// and no capability bit this driver does not offer.
func TestVerbsQueryDevice(t *testing.T) {
	e := openVerbs(t, 1)
	f := openFile(t, e.a)
	attr, err := hfiuser.QueryDevice(f)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%+v", attr)
	if attr.MaxMR == 0 || attr.MaxQP == 0 || attr.MaxCQ == 0 || attr.MaxQPWR == 0 || attr.MaxCQE == 0 || attr.MaxSge == 0 ||
		attr.MaxMRSize != uint64(attr.MttEntries)*4096 {
		t.Errorf("limits missing: %+v", attr)
	}
	if attr.DeviceCapFlags != uapi.IB_DEVICE_MEM_MGT_EXTENSIONS || attr.MaxFastRegPageListLen != 4096 {
		t.Errorf("fast registration not reported: %+v", attr)
	}
	// ODP, implicit ODP where the MTT has room for it, RC only.
	if attr.OdpGeneralCaps != odpGeneralCaps(e.a) || attr.OdpRCCaps&uapi.IBV_ODP_SUPPORT_WRITE == 0 || attr.OdpUDCaps != 0 {
		t.Errorf("capabilities not offered are reported: %+v", attr)
	}
}

// TestRegMRErrno: every refusal of REG_MR carries docs/abi.md's errno and
// leaves nothing pinned, mapped or written.
func TestRegMRErrno(t *testing.T) {
	requireRoot(t)
	e := openVerbs(t, 2)
	f := verbsFile(t, e)
	noCtxt := openFile(t, e.a)

	gone := allocBuf(t, 64<<10, false)
	goneAddr := gone.Addr()
	if err := gone.Unmap(); err != nil {
		t.Fatal(err)
	}
	noAccess, err := unix.Mmap(-1, 0, 64<<10, unix.PROT_NONE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(noAccess)
	good := allocBuf(t, 64<<10, false)
	big := allocBuf(t, 16<<20, false) // twice the usual RLIMIT_MEMLOCK

	reg := func(f *driver.File, addr uintptr, length, iova uint64, access uint32) error {
		r, err := hfiuser.RegMR(f, addr, length, iova, access)
		if err == nil {
			hfiuser.DeregMR(f, r.Handle)
		}
		return err
	}
	lw := uint32(uapi.IB_ACCESS_LOCAL_WRITE)
	var lim unix.Rlimit
	unix.Getrlimit(unix.RLIMIT_MEMLOCK, &lim)
	for _, c := range []struct {
		name string
		err  error
		want unix.Errno
	}{
		{"ok", reg(f, good.Addr(), 64<<10, uint64(good.Addr()), lw), 0},
		{"ok at an offset, another iova", reg(f, good.Addr()+100, 5000, 0x7000064, 0), 0},
		{"no context", reg(noCtxt, good.Addr(), 4096, 0, 0), unix.EINVAL},
		{"unknown access bit", reg(f, good.Addr(), 4096, 0, 1<<9), unix.EINVAL},
		{"MW_BIND", reg(f, good.Addr(), 4096, 0, uapi.IB_ACCESS_MW_BIND), unix.EINVAL},
		{"ON_DEMAND", reg(f, good.Addr(), 4096, 0, uapi.IB_ACCESS_ON_DEMAND), 0},
		{"ON_DEMAND, not mapped", reg(f, 1<<45, 4096, 0, uapi.IB_ACCESS_ON_DEMAND), unix.EFAULT}, // nothing is mapped at 32 TiB
		{"REMOTE_WRITE without LOCAL_WRITE", reg(f, good.Addr(), 4096, 0, uapi.IB_ACCESS_REMOTE_WRITE), unix.EINVAL},
		{"REMOTE_ATOMIC without LOCAL_WRITE", reg(f, good.Addr(), 4096, 0, uapi.IB_ACCESS_REMOTE_ATOMIC), unix.EINVAL},
		{"zero length", reg(f, good.Addr(), 0, 0, 0), unix.EINVAL},
		{"iova page offset differs", reg(f, good.Addr()+8, 4096, 0x1000, 0), unix.EINVAL},
		{"iova wraps", reg(f, good.Addr(), 8192, ^uint64(0)&^0xfff, 0), unix.EINVAL},
		{"unmapped", reg(f, goneAddr, 64<<10, 0, lw), unix.EFAULT},
		{"PROT_NONE", reg(f, uintptrOf(noAccess), 64<<10, 0, 0), unix.EFAULT},
		{"kernel half", reg(f, 0xffff_8000_0000_0000, 4096, 0, 0), unix.EFAULT},
		{"crosses the top of user space", reg(f, 1<<47-4096, 8192, 0, 0), unix.EFAULT},
		{"RLIMIT_MEMLOCK", reg(f, big.Addr(), 16<<20, 0, lw), unix.ENOMEM},
		{"bad argument pointer", func() error {
			_, err := f.Ioctl(uapi.GOHFI_IOCTL_REG_MR, driver.UserAddr(uint64(goneAddr)))
			return err
		}(), unix.EFAULT},
		{"DEREG of no MR", hfiuser.DeregMR(f, 12345), unix.EINVAL},
		{"DEREG with reserved set", hfiuser.Ioctl(f, uapi.GOHFI_IOCTL_DEREG_MR, &uapi.GohfiHandle{Reserved: 1}), unix.EINVAL},
	} {
		if c.name == "RLIMIT_MEMLOCK" && lim.Cur >= 16<<20 {
			continue
		}
		wantErrno(t, c.name, c.err, c.want)
	}
	checkNothingPinned(t, e)
}

// TestRegMRTables: REG_MR writes one MTT entry per page and the MPT entry
// the datasheet gives; DEREG_MR frees the MPT entry, zaps the MTT and
// flushes the TLB; the next registration at the same index gets a new key
// variant. Another file's handle is not found.
func TestRegMRTables(t *testing.T) {
	requireRoot(t)
	e := openVerbs(t, 2)
	f := verbsFile(t, e)
	other := verbsFile(t, e)
	buf := allocBuf(t, 64<<10, false)
	addr, length := buf.Addr()+100, uint64(3*4096)
	iova := uint64(0x10000064)
	access := uint32(uapi.IB_ACCESS_LOCAL_WRITE | uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ)
	r, err := hfiuser.RegMR(f, addr, length, iova, access)
	if err != nil {
		t.Fatal(err)
	}
	if r.Lkey != r.Rkey || chip.MPTIndex(r.Lkey) == 0 {
		t.Fatalf("keys %#x/%#x", r.Lkey, r.Rkey)
	}
	ci, _ := hfiuser.CtxtInfo(f)
	m := e.mptEntry(t, r.Lkey)
	wantFlags := chip.MPTStateValid | access<<chip.MPTAccessShift | chip.MPTTypePinned
	if m.Key != r.Lkey || m.PD != uint32(ci.Ctxt)+1 || m.Flags != wantFlags || m.IOVA != iova || m.Length != length {
		t.Fatalf("MPT entry %+v, want key %#x PD %d flags %#x iova %#x length %d", m, r.Lkey, ci.Ctxt+1, wantFlags, iova, length)
	}
	// 100 + 3 pages spans 4 pages.
	seen := map[uint64]bool{}
	for p := uint64(0); p < 4; p++ {
		v := e.bar4(t, (uint64(m.MTTFirst)+p)*chip.MTTEntrySize)
		if v&(chip.MTTPresent|chip.MTTRead|chip.MTTWrite) != chip.MTTPresent|chip.MTTRead|chip.MTTWrite || v&chip.MTTAddrMask == 0 || seen[v&chip.MTTAddrMask] {
			t.Fatalf("MTT entry %d = %#x", p, v)
		}
		seen[v&chip.MTTAddrMask] = true
	}
	if v := e.bar4(t, (uint64(m.MTTFirst)+4)*chip.MTTEntrySize); v != 0 {
		t.Fatalf("MTT entry past the region: %#x", v)
	}
	if st, err := hfiuser.MRStats(f, r.Handle); err != nil || st.PagesPinned != 4 {
		t.Fatalf("MR_STATS: %+v, %v", st, err)
	}
	_, err = hfiuser.MRStats(other, r.Handle)
	wantErrno(t, "MR_STATS of another file's handle", err, unix.EINVAL)
	wantErrno(t, "DEREG of another file's handle", hfiuser.DeregMR(other, r.Handle), unix.EINVAL)

	flushes, done := e.a.Device.Stats().TlbFlushes, e.csr(t, chip.RegTLBInvDone)
	if err := hfiuser.DeregMR(f, r.Handle); err != nil {
		t.Fatal(err)
	}
	if got := e.a.Device.Stats().TlbFlushes; got != flushes+1 {
		t.Errorf("TLB flushes %d, want %d", got, flushes+1)
	}
	if got := e.csr(t, chip.RegTLBInvDone); got != done+1 {
		t.Errorf("TLBInvDone %d, want %d", got, done+1)
	}
	if got := e.mptEntry(t, r.Lkey); got.Flags&chip.MPTStateMask != chip.MPTStateFree {
		t.Errorf("MPT entry after DEREG: %+v", got)
	}
	for p := uint64(0); p < 4; p++ {
		if v := e.bar4(t, (uint64(m.MTTFirst)+p)*chip.MTTEntrySize); v != 0 {
			t.Errorf("MTT entry %d after DEREG: %#x", p, v)
		}
	}
	wantErrno(t, "DEREG twice", hfiuser.DeregMR(f, r.Handle), unix.EINVAL)
	r2, err := hfiuser.RegMR(f, addr, length, iova, access)
	if err != nil {
		t.Fatal(err)
	}
	if chip.MPTIndex(r2.Lkey) != chip.MPTIndex(r.Lkey) || r2.Lkey == r.Lkey || r2.Handle == r.Handle {
		t.Errorf("reused index: key %#x then %#x, handle %d then %d", r.Lkey, r2.Lkey, r.Handle, r2.Handle)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if got := e.mptEntry(t, r2.Lkey); got.Flags&chip.MPTStateMask != chip.MPTStateFree {
		t.Errorf("MPT entry after Close: %+v", got)
	}
	checkNothingPinned(t, e)
}

// rcQP is a CQ and an RC QP on it, created through hfiuser.
type rcQP struct {
	f      *driver.File
	cq     uint32
	qp     uint32
	qpn    uint32
	sendWR uint32
}

func newRCQP(t testing.TB, f *driver.File, sendWR, recvWR uint32, sigAll bool) rcQP {
	t.Helper()
	cq, _, err := hfiuser.CreateCQ(f, 64, 0)
	if err != nil {
		t.Fatalf("CREATE_CQ: %v", err)
	}
	sa := uint32(0)
	if sigAll {
		sa = 1
	}
	r, err := hfiuser.CreateQP(f, uapi.GohfiCreateQP{QPType: uapi.GOHFI_QPT_RC, SendCQ: cq, RecvCQ: cq,
		MaxSendWR: sendWR, MaxRecvWR: recvWR, MaxSendSge: 4, MaxRecvSge: 4, SqSigAll: sa})
	if err != nil {
		t.Fatalf("CREATE_QP: %v", err)
	}
	return rcQP{f: f, cq: cq, qp: r.Handle, qpn: r.QPNum, sendWR: sendWR}
}

func (q rcQP) modify(state, dest, port uint32) error {
	return hfiuser.ModifyQP(q.f, uapi.GohfiModifyQP{Handle: q.qp, QPState: state, DestQPNum: dest, DestPort: port,
		AccessFlags: uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ})
}

// connect takes q through INIT and RTR to RTS towards dest.
func (q rcQP) connect(t testing.TB, dest uint32) {
	t.Helper()
	for _, s := range []uint32{uapi.GOHFI_QPS_INIT, uapi.GOHFI_QPS_RTR, uapi.GOHFI_QPS_RTS} {
		if err := q.modify(s, dest, 0); err != nil {
			t.Fatalf("MODIFY_QP to %d: %v", s, err)
		}
	}
}

func (e *verbsEnv) qpState(t testing.TB, qpn uint32) uint64 {
	return e.csr(t, chip.QPReg(int(qpn-chip.QPNBase), chip.QPStatus)) & chip.QPStateMask
}

// TestCQCreateDestroy: CQ sizes, registers, POLL_CQ's checks, EBUSY while
// a QP uses a CQ, foreign handles.
func TestCQCreateDestroy(t *testing.T) {
	e := openVerbs(t, 2)
	f := verbsFile(t, e)
	other := verbsFile(t, e)
	attr, err := hfiuser.QueryDevice(f)
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = hfiuser.CreateCQ(f, 0, 0)
	wantErrno(t, "CREATE_CQ of 0", err, unix.EINVAL)
	_, _, err = hfiuser.CreateCQ(f, attr.MaxCQE+1, 0)
	wantErrno(t, "CREATE_CQ past max_cqe", err, unix.EINVAL)
	if h, n, err := hfiuser.CreateCQ(f, attr.MaxCQE, 0); err != nil || n != attr.MaxCQE {
		t.Fatalf("CREATE_CQ of max_cqe %d: %d, %v", attr.MaxCQE, n, err)
	} else if err := hfiuser.DestroyCQ(f, h); err != nil {
		t.Fatal(err)
	}
	h, n, err := hfiuser.CreateCQ(f, 100, 7)
	if err != nil || n < 100 {
		t.Fatalf("CREATE_CQ: %d entries, %v", n, err)
	}
	ci, _ := hfiuser.CtxtInfo(f)
	// The only CQ of the device now: index 0.
	if got := e.csr(t, chip.CQReg(0, chip.CQEntries)); got < 100 || got&(got-1) != 0 {
		t.Errorf("CQEntries %d", got)
	}
	if got := e.csr(t, chip.CQReg(0, chip.CQControl)); got&chip.CQCtrlEnable == 0 || got>>chip.CQCtrlCtxtShift&0xff != uint64(ci.Ctxt) {
		t.Errorf("CQControl %#x, want enabled for context %d", got, ci.Ctxt)
	}
	if e.csr(t, chip.CQReg(0, chip.CQRingBase)) == 0 {
		t.Error("CQRingBase 0")
	}
	wc := make([]uapi.GohfiWC, 4)
	if n, err := hfiuser.PollCQ(f, h, wc); n != 0 || err != nil {
		t.Errorf("POLL_CQ of an empty CQ: %d, %v", n, err)
	}
	bad := uapi.GohfiPollCQ{CQHandle: h, Ne: 1, WcList: uint64(uintptrOf(make([]byte, 64))), WcSize: 40}
	wantErrno(t, "POLL_CQ with wc_size 40", hfiuser.Ioctl(f, uapi.GOHFI_IOCTL_POLL_CQ, &bad), unix.EINVAL)
	bad.WcSize, bad.Reserved = uapi.SizeofGohfiWC, 1
	wantErrno(t, "POLL_CQ with reserved set", hfiuser.Ioctl(f, uapi.GOHFI_IOCTL_POLL_CQ, &bad), unix.EINVAL)
	_, err = hfiuser.PollCQ(other, h, wc)
	wantErrno(t, "POLL_CQ of another file's CQ", err, unix.EINVAL)
	wantErrno(t, "DESTROY_CQ of another file's CQ", hfiuser.DestroyCQ(other, h), unix.EINVAL)

	qp, err := hfiuser.CreateQP(f, uapi.GohfiCreateQP{QPType: uapi.GOHFI_QPT_RC, SendCQ: h, RecvCQ: h, MaxSendWR: 4, MaxRecvWR: 4})
	if err != nil {
		t.Fatal(err)
	}
	_, err = hfiuser.CreateQP(other, uapi.GohfiCreateQP{QPType: uapi.GOHFI_QPT_RC, SendCQ: h, RecvCQ: h, MaxSendWR: 4, MaxRecvWR: 4})
	wantErrno(t, "CREATE_QP on another file's CQ", err, unix.EINVAL)
	wantErrno(t, "DESTROY_CQ in use", hfiuser.DestroyCQ(f, h), unix.EBUSY)
	if err := hfiuser.DestroyQP(f, qp.Handle); err != nil {
		t.Fatal(err)
	}
	if err := hfiuser.DestroyCQ(f, h); err != nil {
		t.Fatal(err)
	}
	if got := e.csr(t, chip.CQReg(0, chip.CQControl)); got != 0 {
		t.Errorf("CQControl after DESTROY_CQ: %#x", got)
	}
	wantErrno(t, "DESTROY_CQ twice", hfiuser.DestroyCQ(f, h), unix.EINVAL)
	// Every CQ of the device, then one more.
	for i := 0; i < int(attr.MaxCQ); i++ {
		if _, _, err := hfiuser.CreateCQ(f, 1, 0); err != nil {
			t.Fatalf("CQ %d of %d: %v", i, attr.MaxCQ, err)
		}
	}
	_, _, err = hfiuser.CreateCQ(f, 1, 0)
	wantErrno(t, "CREATE_CQ past max_cq", err, unix.ENOSPC)
}

// TestQPStateMachine: CREATE_QP's checks, the QP registers, MODIFY_QP's
// transitions and RTR's destination checks.
func TestQPStateMachine(t *testing.T) {
	e := openVerbs(t, 1)
	f := verbsFile(t, e)
	attr, err := hfiuser.QueryDevice(f)
	if err != nil {
		t.Fatal(err)
	}
	cq, _, err := hfiuser.CreateCQ(f, 16, 0)
	if err != nil {
		t.Fatal(err)
	}
	base := uapi.GohfiCreateQP{QPType: uapi.GOHFI_QPT_RC, SendCQ: cq, RecvCQ: cq, MaxSendWR: 10, MaxRecvWR: 20, MaxSendSge: 2, MaxRecvSge: 1}
	for _, c := range []struct {
		name string
		mod  func(*uapi.GohfiCreateQP)
		want unix.Errno
	}{
		{"UC", func(r *uapi.GohfiCreateQP) { r.QPType = uapi.GOHFI_QPT_UC }, unix.EOPNOTSUPP},
		{"UD", func(r *uapi.GohfiCreateQP) { r.QPType = uapi.GOHFI_QPT_UD }, unix.EOPNOTSUPP},
		{"type 9", func(r *uapi.GohfiCreateQP) { r.QPType = 9 }, unix.EINVAL},
		{"no send WRs", func(r *uapi.GohfiCreateQP) { r.MaxSendWR = 0 }, unix.EINVAL},
		{"too many send WRs", func(r *uapi.GohfiCreateQP) { r.MaxSendWR = attr.MaxQPWR + 1 }, unix.EINVAL},
		{"too many recv WRs", func(r *uapi.GohfiCreateQP) { r.MaxRecvWR = attr.MaxQPWR + 1 }, unix.EINVAL},
		{"too many SGEs", func(r *uapi.GohfiCreateQP) { r.MaxSendSge = attr.MaxSge + 1 }, unix.EINVAL},
		{"no such CQ", func(r *uapi.GohfiCreateQP) { r.RecvCQ = 999 }, unix.EINVAL},
		{"sq_sig_all 2", func(r *uapi.GohfiCreateQP) { r.SqSigAll = 2 }, unix.EINVAL},
	} {
		r := base
		c.mod(&r)
		_, err := hfiuser.CreateQP(f, r)
		wantErrno(t, "CREATE_QP "+c.name, err, c.want)
	}
	r, err := hfiuser.CreateQP(f, base)
	if err != nil {
		t.Fatal(err)
	}
	if r.QPNum < chip.QPNBase {
		t.Fatalf("qp_num %d", r.QPNum)
	}
	n := int(r.QPNum - chip.QPNBase)
	ci, _ := hfiuser.CtxtInfo(f)
	if got := e.csr(t, chip.QPReg(n, chip.QPSQEntries)); got != 16 {
		t.Errorf("QPSQEntries %d, want 16 for 10 WRs", got)
	}
	if got := e.csr(t, chip.QPReg(n, chip.QPRQEntries)); got != 32 {
		t.Errorf("QPRQEntries %d, want 32 for 20 WRs", got)
	}
	if got := e.csr(t, chip.QPReg(n, chip.QPPD)); got != uint64(ci.Ctxt)+1 {
		t.Errorf("QPPD %d", got)
	}
	if e.csr(t, chip.QPReg(n, chip.QPSQBase)) == 0 || e.csr(t, chip.QPReg(n, chip.QPRQBase)) == 0 {
		t.Error("ring bases 0")
	}
	q := rcQP{f: f, cq: cq, qp: r.Handle, qpn: r.QPNum}
	steps := []struct {
		name       string
		state      uint32
		dest, port uint32
		want       unix.Errno
	}{
		{"RESET to RTR", uapi.GOHFI_QPS_RTR, r.QPNum, 0, unix.EINVAL},
		{"RESET to RTS", uapi.GOHFI_QPS_RTS, 0, 0, unix.EINVAL},
		{"RESET to SQD", uapi.GOHFI_QPS_SQD, 0, 0, unix.EINVAL},
		{"state 7", 7, 0, 0, unix.EINVAL},
		{"RESET to INIT", uapi.GOHFI_QPS_INIT, 0, 0, 0},
		{"INIT to INIT", uapi.GOHFI_QPS_INIT, 0, 0, unix.EINVAL},
		{"INIT to RTS", uapi.GOHFI_QPS_RTS, 0, 0, unix.EINVAL},
		{"RTR to no QP", uapi.GOHFI_QPS_RTR, r.QPNum + 1, 0, unix.EINVAL},
		{"RTR to QP 0", uapi.GOHFI_QPS_RTR, 0, 0, unix.EINVAL},
		{"RTR to another port", uapi.GOHFI_QPS_RTR, r.QPNum, 1, unix.EINVAL},
		{"INIT to RTR", uapi.GOHFI_QPS_RTR, r.QPNum, 0, 0},
		{"RTR to RTS", uapi.GOHFI_QPS_RTS, 0, 0, 0},
		{"RTS to RTR", uapi.GOHFI_QPS_RTR, r.QPNum, 0, unix.EINVAL},
		{"RTS to ERR", uapi.GOHFI_QPS_ERR, 0, 0, 0},
		{"ERR to RTS", uapi.GOHFI_QPS_RTS, 0, 0, unix.EINVAL},
		{"ERR to RESET", uapi.GOHFI_QPS_RESET, 0, 0, 0},
		{"RESET to ERR", uapi.GOHFI_QPS_ERR, 0, 0, unix.EINVAL},
		{"RESET to INIT again", uapi.GOHFI_QPS_INIT, 0, 0, 0},
		{"INIT to ERR", uapi.GOHFI_QPS_ERR, 0, 0, 0},
	}
	for _, s := range steps {
		err := q.modify(s.state, s.dest, s.port)
		wantErrno(t, s.name, err, s.want)
		if s.want == 0 && err == nil {
			if got := e.qpState(t, r.QPNum); got != uint64(s.state) {
				t.Errorf("%s: QPStatus %d", s.name, got)
			}
		}
	}
	wantErrno(t, "MODIFY with reserved set", hfiuser.ModifyQP(f, uapi.GohfiModifyQP{Handle: r.Handle, QPState: uapi.GOHFI_QPS_RESET, Reserved: 1}), unix.EINVAL)
	wantErrno(t, "MODIFY of no QP", hfiuser.ModifyQP(f, uapi.GohfiModifyQP{Handle: 4242}), unix.EINVAL)
	if err := hfiuser.DestroyQP(f, r.Handle); err != nil {
		t.Fatal(err)
	}
	if got := e.csr(t, chip.QPReg(n, chip.QPControl)) & chip.QPStateMask; got != uapi.GOHFI_QPS_RESET {
		t.Errorf("QPControl after DESTROY_QP: %d", got)
	}
	wantErrno(t, "DESTROY_QP twice", hfiuser.DestroyQP(f, r.Handle), unix.EINVAL)
	// Every QP of the device, then one more.
	for i := 0; i < int(attr.MaxQP); i++ {
		if _, err := hfiuser.CreateQP(f, base); err != nil {
			t.Fatalf("QP %d of %d: %v", i, attr.MaxQP, err)
		}
	}
	_, err = hfiuser.CreateQP(f, base)
	wantErrno(t, "CREATE_QP past max_qp", err, unix.ENOSPC)
}

// TestPostChecks: POST_SEND and POST_RECV refuse malformed lists with
// EINVAL or EFAULT and report the first WR not posted; a full queue is
// ENOMEM. Keys are not checked at post time.
func TestPostChecks(t *testing.T) {
	requireRoot(t)
	e := openVerbs(t, 1)
	f := verbsFile(t, e)
	q := newRCQP(t, f, 7, 7, false) // rings of 8: 7 WRs each
	send := func(op uint32) hfiuser.SendWR {
		return hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{Opcode: op, Rkey: 0xdead00, RemoteAddr: 0x1000}, SGL: []uapi.GohfiSge{}}
	}
	bad, err := hfiuser.PostSend(f, q.qp, []hfiuser.SendWR{send(uapi.GOHFI_WR_SEND)})
	wantErrno(t, "POST_SEND in RESET", err, unix.EINVAL)
	if bad != 0 {
		t.Errorf("bad_wr %d", bad)
	}
	recv := hfiuser.RecvWR{SGL: []uapi.GohfiSge{{Addr: 0x1000, Length: 8, Lkey: 0x12345}}}
	_, err = hfiuser.PostRecv(f, q.qp, []hfiuser.RecvWR{recv})
	wantErrno(t, "POST_RECV in RESET", err, unix.EINVAL)
	q.connect(t, q.qpn)

	gone := allocBuf(t, 4096, false)
	goneAddr := uint64(gone.Addr())
	gone.Unmap()
	withSGEs := func(n int) hfiuser.SendWR {
		w := send(uapi.GOHFI_WR_SEND)
		w.SGL = make([]uapi.GohfiSge, n)
		return w
	}
	for _, c := range []struct {
		name string
		wr   hfiuser.SendWR
		want unix.Errno
	}{
		{"opcode 99", send(99), unix.EINVAL},
		{"LOCAL_INV with an SGE", func() hfiuser.SendWR { w := withSGEs(1); w.Opcode = uapi.GOHFI_WR_LOCAL_INV; return w }(), unix.EINVAL},
		{"FAST_REG_MR without an MR", send(uapi.GOHFI_WR_FAST_REG_MR), unix.EINVAL},
		{"invalidate_rkey on a SEND", func() hfiuser.SendWR { w := send(uapi.GOHFI_WR_SEND); w.InvalidateRkey = 1; return w }(), unix.EINVAL},
		{"ATOMIC without its 8-byte SGE", send(uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD), unix.EINVAL},
		{"INLINE", func() hfiuser.SendWR {
			w := send(uapi.GOHFI_SEND_SIGNALED)
			w.SendFlags = uapi.GOHFI_SEND_INLINE
			return w
		}(), unix.EINVAL},
		{"unknown send flag", func() hfiuser.SendWR { w := send(uapi.GOHFI_WR_SEND); w.SendFlags = 1 << 7; return w }(), unix.EINVAL},
		{"5 SGEs on a QP of 4", withSGEs(5), unix.EINVAL},
		{"fr_key set", func() hfiuser.SendWR { w := send(uapi.GOHFI_WR_SEND); w.FrKey = 1; return w }(), unix.EINVAL},
		{"remote_qpn set", func() hfiuser.SendWR { w := send(uapi.GOHFI_WR_SEND); w.RemoteQPN = 1; return w }(), unix.EINVAL},
		{"message too long", func() hfiuser.SendWR {
			w := send(uapi.GOHFI_WR_RDMA_WRITE)
			w.SGL = []uapi.GohfiSge{{Length: 1 << 31}, {Length: 1}}
			return w
		}(), unix.EINVAL},
		{"unmapped sg_list", func() hfiuser.SendWR {
			w := send(uapi.GOHFI_WR_SEND)
			w.SGL, w.SgList, w.NumSge = nil, goneAddr, 1
			return w
		}(), unix.EFAULT},
	} {
		// Two good WRs before the bad one: they are posted, the bad one
		// and the one after it are not.
		wrs := []hfiuser.SendWR{send(uapi.GOHFI_WR_RDMA_WRITE), send(uapi.GOHFI_WR_SEND), c.wr, send(uapi.GOHFI_WR_SEND)}
		if err := q.modify(uapi.GOHFI_QPS_RESET, 0, 0); err != nil {
			t.Fatal(err)
		}
		q.connect(t, q.qpn)
		tail := chip.QPReg(int(q.qpn-chip.QPNBase), chip.QPSQTail)
		bad, err := hfiuser.PostSend(f, q.qp, wrs)
		wantErrno(t, c.name, err, c.want)
		if bad != 2 {
			t.Errorf("%s: bad_wr %d, want 2", c.name, bad)
		}
		// The producer index the device was given: in the QP's doorbell
		// record (the register follows when the engine reads it), else in
		// the register.
		got, rec := driver.DBRecSQTail(f, q.qp)
		if !rec {
			got = uint32(e.csr(t, tail))
		}
		if got != 2 {
			t.Errorf("%s: SQ tail %d (doorbell record %v), want 2", c.name, got, rec)
		}
	}
	// wqe_size and the list itself.
	ps := uapi.GohfiPostSend{QPHandle: q.qp, WrCount: 1, WrList: goneAddr, WqeSize: uapi.SizeofGohfiSendWR}
	wantErrno(t, "unmapped wr_list", hfiuser.Ioctl(f, uapi.GOHFI_IOCTL_POST_SEND, &ps), unix.EFAULT)
	ps.WqeSize = 96
	wantErrno(t, "wqe_size 96", hfiuser.Ioctl(f, uapi.GOHFI_IOCTL_POST_SEND, &ps), unix.EINVAL)
	pr := uapi.GohfiPostRecv{QPHandle: q.qp, WrCount: 1, WrList: goneAddr, WqeSize: 16}
	wantErrno(t, "recv wqe_size 16", hfiuser.Ioctl(f, uapi.GOHFI_IOCTL_POST_RECV, &pr), unix.EINVAL)
	pr.WqeSize = uapi.SizeofGohfiRecvWR
	wantErrno(t, "unmapped recv wr_list", hfiuser.Ioctl(f, uapi.GOHFI_IOCTL_POST_RECV, &pr), unix.EFAULT)
	rr := recv
	rr.Reserved = 1
	_, err = hfiuser.PostRecv(f, q.qp, []hfiuser.RecvWR{recv, rr})
	wantErrno(t, "recv reserved set", err, unix.EINVAL)
	_, err = hfiuser.PostSend(f, 999, []hfiuser.SendWR{send(uapi.GOHFI_WR_SEND)})
	wantErrno(t, "POST_SEND to no QP", err, unix.EINVAL)

	// A full send queue: a SEND to a QP with no receive posted stalls at
	// the device (RNR, retried without end), so nothing is consumed and 7
	// fit in a ring of 8.
	if err := q.modify(uapi.GOHFI_QPS_RESET, 0, 0); err != nil {
		t.Fatal(err)
	}
	q.connect(t, q.qpn)
	wrs := make([]hfiuser.SendWR, 9)
	for i := range wrs {
		wrs[i] = send(uapi.GOHFI_WR_SEND)
	}
	bad, err = hfiuser.PostSend(f, q.qp, wrs)
	wantErrno(t, "full send queue", err, unix.ENOMEM)
	if bad != 7 {
		t.Errorf("full send queue: bad_wr %d, want 7", bad)
	}
	// A full receive queue: in INIT nothing arrives to consume it.
	if err := q.modify(uapi.GOHFI_QPS_RESET, 0, 0); err != nil {
		t.Fatal(err)
	}
	if err := q.modify(uapi.GOHFI_QPS_INIT, 0, 0); err != nil {
		t.Fatal(err)
	}
	rwrs := make([]hfiuser.RecvWR, 9)
	for i := range rwrs {
		rwrs[i] = recv
	}
	bad, err = hfiuser.PostRecv(f, q.qp, rwrs)
	wantErrno(t, "full receive queue", err, unix.ENOMEM)
	if bad != 7 {
		t.Errorf("full receive queue: bad_wr %d, want 7", bad)
	}
}

// TestVerbsCloseReleases: Close with MRs, CQs and QPs left tears them all
// down: nothing pinned, QPs in RESET, CQs off, MPT entries free; calls on
// the closed file are EBADF.
func TestVerbsCloseReleases(t *testing.T) {
	requireRoot(t)
	e := openVerbs(t, 2)
	f := verbsFile(t, e)
	buf := allocBuf(t, 1<<20, false)
	var keys []uint32
	for i := 0; i < 4; i++ {
		r, err := hfiuser.RegMR(f, buf.Addr()+uintptr(i)*256<<10, 256<<10, uint64(i)<<30, uapi.IB_ACCESS_LOCAL_WRITE)
		if err != nil {
			t.Fatal(err)
		}
		keys = append(keys, r.Lkey)
	}
	q := newRCQP(t, f, 16, 16, false)
	q.connect(t, q.qpn)
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if m := e.mptEntry(t, k); m.Flags&chip.MPTStateMask != chip.MPTStateFree {
			t.Errorf("MPT entry %#x valid after Close", k)
		}
	}
	if got := e.qpState(t, q.qpn); got != uapi.GOHFI_QPS_RESET {
		t.Errorf("QP state %d after Close", got)
	}
	if got := e.csr(t, chip.CQReg(0, chip.CQControl)); got != 0 {
		t.Errorf("CQControl %#x after Close", got)
	}
	checkNothingPinned(t, e)
	_, err := hfiuser.RegMR(f, buf.Addr(), 4096, 0, 0)
	wantErrno(t, "REG_MR after Close", err, unix.EBADF)
	_, err = hfiuser.PollCQ(f, q.cq, make([]uapi.GohfiWC, 1))
	wantErrno(t, "POLL_CQ after Close", err, unix.EBADF)
}

// TestVerbsRemoveReleases: Remove with verbs objects left releases them
// and every later call is ENXIO.
func TestVerbsRemoveReleases(t *testing.T) {
	requireRoot(t)
	e := openVerbs(t, 1)
	f := verbsFile(t, e)
	buf := allocBuf(t, 64<<10, false)
	if _, err := hfiuser.RegMR(f, buf.Addr(), 64<<10, 0, uapi.IB_ACCESS_LOCAL_WRITE); err != nil {
		t.Fatal(err)
	}
	q := newRCQP(t, f, 4, 4, false)
	q.connect(t, q.qpn)
	st := e.a.Device.Stats()
	if err := e.a.Module.Remove(e.a.Device.Info().Unit); err != nil {
		t.Fatal(err)
	}
	st2 := e.a.Device.Stats()
	if st2.PagesUnpinned-st.PagesUnpinned != 16 || st2.PagesPinned != st2.PagesUnpinned {
		t.Errorf("after Remove: %+v (before %+v)", st2, st)
	}
	_, err := hfiuser.RegMR(f, buf.Addr(), 4096, 0, 0)
	wantErrno(t, "REG_MR after Remove", err, unix.ENXIO)
}

// pollWC polls cq until n completions arrived or the timeout passed,
// sleeping in Poll (which arms the CQs) between tries.
func pollWC(t testing.TB, f *driver.File, cq uint32, n int) []uapi.GohfiWC {
	t.Helper()
	var got []uapi.GohfiWC
	deadline := time.Now().Add(5 * time.Second)
	buf := make([]uapi.GohfiWC, 16)
	for len(got) < n {
		k, err := hfiuser.PollCQ(f, cq, buf[:min(len(buf), n-len(got))])
		if err != nil {
			t.Fatalf("POLL_CQ: %v", err)
		}
		got = append(got, buf[:k]...)
		if k > 0 {
			continue
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d completions after 5s: %+v", len(got), n, got)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		f.Poll(ctx)
		cancel()
	}
	return got
}

// loop is two files on one device, each with an RC QP, connected to each
// other, and a buffer registered in each.
type loop struct {
	e          *verbsEnv
	a, b       rcQP
	bufA, bufB []byte
	mrA, mrB   uapi.GohfiRegMR
}

const loopBuf = 2<<20 + 8192

func newLoop(t *testing.T, e *verbsEnv, accessB uint32) *loop {
	t.Helper()
	fa, fb := verbsFile(t, e), verbsFile(t, e)
	l := &loop{e: e, a: newRCQP(t, fa, 16, 16, false), b: newRCQP(t, fb, 16, 16, false)}
	ba, bb := allocBuf(t, loopBuf, false), allocBuf(t, loopBuf, false)
	l.bufA, l.bufB = unsafeSlice(ba.Addr(), loopBuf), unsafeSlice(bb.Addr(), loopBuf)
	var err error
	if l.mrA, err = hfiuser.RegMR(fa, ba.Addr(), loopBuf, uint64(ba.Addr()), uapi.IB_ACCESS_LOCAL_WRITE); err != nil {
		t.Fatal(err)
	}
	if l.mrB, err = hfiuser.RegMR(fb, bb.Addr(), loopBuf, uint64(bb.Addr()), accessB); err != nil {
		t.Fatal(err)
	}
	l.a.connect(t, l.b.qpn)
	l.b.connect(t, l.a.qpn)
	return l
}

func (l *loop) sgeA(off, n int) []uapi.GohfiSge {
	return []uapi.GohfiSge{{Addr: uint64(uintptrOf(l.bufA)) + uint64(off), Length: uint32(n), Lkey: l.mrA.Lkey}}
}

func (l *loop) sgeB(off, n int) []uapi.GohfiSge {
	return []uapi.GohfiSge{{Addr: uint64(uintptrOf(l.bufB)) + uint64(off), Length: uint32(n), Lkey: l.mrB.Lkey}}
}

func fill(b []byte, seed byte) {
	for i := range b {
		b[i] = byte(i*7) ^ seed
	}
}

func wantWC(t testing.TB, what string, wc uapi.GohfiWC, status, opcode uint32, n int) {
	t.Helper()
	if wc.Status != status || wc.Opcode != opcode || status == uapi.GOHFI_WC_SUCCESS && int(wc.ByteLen) != n && opcode&uapi.GOHFI_WC_RECV != 0 {
		t.Fatalf("%s: completion %+v, want status %d opcode %#x byte_len %d", what, wc, status, opcode, n)
	}
}

// postFailFlush posts wrs to q, all accepted; the first completes with
// status and vendor_err, the others are flushed (the QP went to ERR).
func postFailFlush(t testing.TB, q rcQP, wrs []hfiuser.SendWR, status, vendor uint32) {
	t.Helper()
	if bad, err := hfiuser.PostSend(q.f, q.qp, wrs); err != nil || bad != len(wrs) {
		t.Fatalf("POST_SEND: bad_wr %d, %v", bad, err)
	}
	for i, wc := range pollWC(t, q.f, q.cq, len(wrs)) {
		switch {
		case wc.WrID != wrs[i].WrID:
			t.Errorf("completion %d: %+v, want wr_id %d", i, wc, wrs[i].WrID)
		case i == 0 && (wc.Status != status || wc.VendorErr != vendor):
			t.Errorf("completion %+v, want status %d vendor_err %d", wc, status, vendor)
		case i > 0 && wc.Status != uapi.GOHFI_WC_WR_FLUSH_ERR:
			t.Errorf("completion %d: %+v, want WR_FLUSH_ERR", i, wc)
		}
	}
}

// TestVerbsDataPath: SEND/RECV, RDMA WRITE and RDMA READ between two files
// move the bytes intact at 1 B, 4 KiB, 1 MiB and an unaligned range across
// pages; completions carry the WR ids, opcodes and lengths.
func TestVerbsDataPath(t *testing.T) {
	requireRoot(t)
	e := openVerbs(t, 2)
	e.requireEngine(t)
	l := newLoop(t, e, uapi.IB_ACCESS_LOCAL_WRITE|uapi.IB_ACCESS_REMOTE_WRITE|uapi.IB_ACCESS_REMOTE_READ)
	for _, c := range []struct {
		name    string
		off, n  int
		offDest int
	}{{"1B", 0, 1, 0}, {"4KiB", 0, 4096, 0}, {"1MiB", 0, 1 << 20, 0}, {"unaligned", 4000, 3*4096 + 123, 1001}} {
		t.Run(c.name, func(t *testing.T) {
			src, dst := l.bufA[c.off:c.off+c.n], l.bufB[c.offDest:c.offDest+c.n]
			// SEND into a posted receive.
			fill(src, 1)
			clear(dst)
			if _, err := hfiuser.PostRecv(l.b.f, l.b.qp, []hfiuser.RecvWR{{GohfiRecvWR: uapi.GohfiRecvWR{WrID: 11}, SGL: l.sgeB(c.offDest, c.n)}}); err != nil {
				t.Fatal(err)
			}
			if _, err := hfiuser.PostSend(l.a.f, l.a.qp, []hfiuser.SendWR{{GohfiSendWR: uapi.GohfiSendWR{WrID: 12, Opcode: uapi.GOHFI_WR_SEND, SendFlags: uapi.GOHFI_SEND_SIGNALED}, SGL: l.sgeA(c.off, c.n)}}); err != nil {
				t.Fatal(err)
			}
			wc := pollWC(t, l.a.f, l.a.cq, 1)[0]
			wantWC(t, "SEND", wc, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_SEND, c.n)
			rwc := pollWC(t, l.b.f, l.b.cq, 1)[0]
			wantWC(t, "RECV", rwc, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RECV, c.n)
			if wc.WrID != 12 || rwc.WrID != 11 || rwc.QPNum != l.b.qpn || rwc.SrcQP != l.a.qpn {
				t.Fatalf("completions %+v %+v", wc, rwc)
			}
			if string(src) != string(dst) {
				t.Fatal("SEND: data differs")
			}
			// RDMA WRITE.
			fill(src, 2)
			if _, err := hfiuser.PostSend(l.a.f, l.a.qp, []hfiuser.SendWR{{GohfiSendWR: uapi.GohfiSendWR{WrID: 13, Opcode: uapi.GOHFI_WR_RDMA_WRITE, SendFlags: uapi.GOHFI_SEND_SIGNALED,
				RemoteAddr: uint64(uintptrOf(l.bufB)) + uint64(c.offDest), Rkey: l.mrB.Rkey}, SGL: l.sgeA(c.off, c.n)}}); err != nil {
				t.Fatal(err)
			}
			wantWC(t, "WRITE", pollWC(t, l.a.f, l.a.cq, 1)[0], uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, c.n)
			if string(src) != string(dst) {
				t.Fatal("WRITE: data differs")
			}
			// RDMA READ back into A.
			fill(dst, 3)
			clear(src)
			if _, err := hfiuser.PostSend(l.a.f, l.a.qp, []hfiuser.SendWR{{GohfiSendWR: uapi.GohfiSendWR{WrID: 14, Opcode: uapi.GOHFI_WR_RDMA_READ, SendFlags: uapi.GOHFI_SEND_SIGNALED,
				RemoteAddr: uint64(uintptrOf(l.bufB)) + uint64(c.offDest), Rkey: l.mrB.Rkey}, SGL: l.sgeA(c.off, c.n)}}); err != nil {
				t.Fatal(err)
			}
			wantWC(t, "READ", pollWC(t, l.a.f, l.a.cq, 1)[0], uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_READ, c.n)
			if string(src) != string(dst) {
				t.Fatal("READ: data differs")
			}
		})
	}
}

// TestVerbsAccessErrors: a WRITE the responder must refuse (no such key,
// a stale variant, no remote right, one byte past the region, a key
// deregistered) and a local key of another file complete with the exact
// status and vendor error; the QP goes to ERR, the WR after it is flushed
// and the target memory is unchanged. The WRITEs are one packet
// (chip.VerbsMTU): the responder checks each packet on its own, so the
// packets of a longer message before the bad one land.
func TestVerbsAccessErrors(t *testing.T) {
	requireRoot(t)
	e := openVerbs(t, 2)
	e.requireEngine(t)
	rw := uint32(uapi.IB_ACCESS_LOCAL_WRITE | uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ)
	const n = chip.VerbsMTU
	for _, c := range []struct {
		name    string
		accessB uint32
		// wr returns the remote address, rkey and local SGE of the WRITE.
		wr             func(t *testing.T, l *loop) (uint64, uint32, []uapi.GohfiSge)
		status, vendor uint32
	}{
		{"no such key", rw, func(t *testing.T, l *loop) (uint64, uint32, []uapi.GohfiSge) {
			return uint64(uintptrOf(l.bufB)), 0xfff<<8 | 1, l.sgeA(0, n)
		}, uapi.GOHFI_WC_REM_ACCESS_ERR, chip.VendorErrState}, // a free MPT entry
		{"wrong variant", rw, func(t *testing.T, l *loop) (uint64, uint32, []uapi.GohfiSge) {
			return uint64(uintptrOf(l.bufB)), l.mrB.Rkey ^ 0x80, l.sgeA(0, n)
		}, uapi.GOHFI_WC_REM_ACCESS_ERR, chip.VendorErrKey},
		{"no remote write right", uapi.IB_ACCESS_LOCAL_WRITE | uapi.IB_ACCESS_REMOTE_READ, func(t *testing.T, l *loop) (uint64, uint32, []uapi.GohfiSge) {
			return uint64(uintptrOf(l.bufB)), l.mrB.Rkey, l.sgeA(0, n)
		}, uapi.GOHFI_WC_REM_ACCESS_ERR, chip.VendorErrAccess},
		{"one byte past the end", rw, func(t *testing.T, l *loop) (uint64, uint32, []uapi.GohfiSge) {
			return uint64(uintptrOf(l.bufB)) + loopBuf - n + 1, l.mrB.Rkey, l.sgeA(0, n)
		}, uapi.GOHFI_WC_REM_ACCESS_ERR, chip.VendorErrBounds},
		{"after DEREG", rw, func(t *testing.T, l *loop) (uint64, uint32, []uapi.GohfiSge) {
			if err := hfiuser.DeregMR(l.b.f, l.mrB.Handle); err != nil {
				t.Fatal(err)
			}
			return uint64(uintptrOf(l.bufB)), l.mrB.Rkey, l.sgeA(0, n)
		}, uapi.GOHFI_WC_REM_ACCESS_ERR, chip.VendorErrState},
		{"another file's lkey", rw, func(t *testing.T, l *loop) (uint64, uint32, []uapi.GohfiSge) {
			sge := l.sgeA(0, n)
			sge[0].Lkey = l.mrB.Lkey
			return uint64(uintptrOf(l.bufB)), l.mrB.Rkey, sge
		}, uapi.GOHFI_WC_LOC_PROT_ERR, chip.VendorErrPD},
	} {
		t.Run(c.name, func(t *testing.T) {
			l := newLoop(t, e, c.accessB)
			fill(l.bufA, 5)
			fill(l.bufB, 6)
			want := string(l.bufB)
			raddr, rkey, sge := c.wr(t, l)
			wrs := []hfiuser.SendWR{
				{GohfiSendWR: uapi.GohfiSendWR{WrID: 1, Opcode: uapi.GOHFI_WR_RDMA_WRITE, SendFlags: uapi.GOHFI_SEND_SIGNALED, RemoteAddr: raddr, Rkey: rkey}, SGL: sge},
				{GohfiSendWR: uapi.GohfiSendWR{WrID: 2, Opcode: uapi.GOHFI_WR_RDMA_WRITE, SendFlags: uapi.GOHFI_SEND_SIGNALED,
					RemoteAddr: uint64(uintptrOf(l.bufB)), Rkey: l.mrB.Rkey}, SGL: l.sgeA(0, 16)},
			}
			postFailFlush(t, l.a, wrs, c.status, c.vendor)
			if st := e.qpState(t, l.a.qpn); st != uapi.GOHFI_QPS_ERR {
				t.Errorf("requester QP state %d, want ERR", st)
			}
			if string(l.bufB) != want {
				t.Error("target memory changed")
			}
			// A WR posted in ERR is accepted and flushed.
			if bad, err := hfiuser.PostSend(l.a.f, l.a.qp, wrs[1:]); err != nil || bad != 1 {
				t.Fatalf("POST_SEND in ERR: bad_wr %d, %v", bad, err)
			}
			if wc := pollWC(t, l.a.f, l.a.cq, 1); wc[0].Status != uapi.GOHFI_WC_WR_FLUSH_ERR {
				t.Errorf("WR posted in ERR: %+v", wc[0])
			}
		})
	}
}

// FuzzPostSend posts the fuzzer's bytes as a gohfi_send_wr list (sg_list
// pointing at the fuzzer's SGE bytes when it names one) to a QP in RTS:
// the driver never panics, every error carries an errno, bad_wr never
// exceeds wr_count, and the QP is reset between inputs.
func FuzzPostSend(f *testing.F) {
	requireRoot(f)
	e := openVerbs(f, 1)
	file := verbsFile(f, e)
	q := newRCQP(f, file, 8, 8, true)
	buf := allocBuf(f, 1<<16, false)
	mr, err := hfiuser.RegMR(file, buf.Addr(), 1<<16, uint64(buf.Addr()), uapi.IB_ACCESS_LOCAL_WRITE|uapi.IB_ACCESS_REMOTE_WRITE|uapi.IB_ACCESS_REMOTE_READ)
	if err != nil {
		f.Fatal(err)
	}
	sge := make([]byte, uapi.SizeofGohfiSge)
	(&uapi.GohfiSge{Addr: uint64(buf.Addr()), Length: 64, Lkey: mr.Lkey}).MarshalBytes(sge)
	// Fast registration: fr_mr_handle 1 names the fast-reg MR below,
	// fr_page_list 1 the page list below (the buffer's 16 pages backwards,
	// then one unaligned and one outside every MR), 2 the same from its
	// 15th entry; invalidate_rkey and fr_key 1 the MR's key, 2 the key with
	// its next variant.
	frmr, err := hfiuser.AllocMR(file, 8)
	if err != nil {
		f.Fatal(err)
	}
	pages := make([]byte, 18*8)
	for i := range 16 {
		binary.LittleEndian.PutUint64(pages[i*8:], uint64(buf.Addr())+uint64(15-i)*4096)
	}
	binary.LittleEndian.PutUint64(pages[16*8:], uint64(buf.Addr())+8)
	binary.LittleEndian.PutUint64(pages[17*8:], uint64(uintptrOf(sge))&^0xfff)
	fuzzKey := func(v uint32) uint32 {
		if v == 1 || v == 2 {
			return frmr.Lkey&^0xff | (frmr.Lkey+v-1)&0xff
		}
		return v
	}
	f.Fuzz(func(t *testing.T, wrs []byte) {
		if err := q.modify(uapi.GOHFI_QPS_RESET, 0, 0); err != nil {
			t.Fatal(err)
		}
		q.connect(t, q.qpn)
		count := len(wrs) / uapi.SizeofGohfiSendWR
		list := make([]byte, max(len(wrs), 1))
		copy(list, wrs)
		// sg_list 1 in the input means "the SGE below"; any other value
		// is passed as it is (mostly a bad address: EFAULT).
		for i := 0; i < count; i++ {
			p := list[i*uapi.SizeofGohfiSendWR+24:]
			if binary.LittleEndian.Uint64(p) == 1 {
				binary.LittleEndian.PutUint64(p, uint64(uintptrOf(sge)))
			}
			binary.LittleEndian.PutUint64(list[i*uapi.SizeofGohfiSendWR+32:], uint64(buf.Addr()))
			binary.LittleEndian.PutUint32(list[i*uapi.SizeofGohfiSendWR+40:], mr.Rkey)
			w := list[i*uapi.SizeofGohfiSendWR:]
			switch binary.LittleEndian.Uint64(w[64:]) {
			case 1:
				binary.LittleEndian.PutUint64(w[64:], uint64(uintptrOf(pages)))
			case 2:
				binary.LittleEndian.PutUint64(w[64:], uint64(uintptrOf(pages[14*8:])))
			}
			if binary.LittleEndian.Uint32(w[80:]) == 1 {
				binary.LittleEndian.PutUint32(w[80:], frmr.Handle)
			}
			binary.LittleEndian.PutUint32(w[20:], fuzzKey(binary.LittleEndian.Uint32(w[20:])))
			binary.LittleEndian.PutUint32(w[84:], fuzzKey(binary.LittleEndian.Uint32(w[84:])))
		}
		ps := uapi.GohfiPostSend{QPHandle: q.qp, WrCount: uint32(count), WrList: uint64(uintptrOf(list)), WqeSize: uapi.SizeofGohfiSendWR}
		err := hfiuser.Ioctl(file, uapi.GOHFI_IOCTL_POST_SEND, &ps)
		var errno unix.Errno
		if err != nil && !errors.As(err, &errno) {
			t.Fatalf("error without errno: %v", err)
		}
		if ps.BadWr > uint32(count) || err == nil && ps.BadWr != uint32(count) {
			t.Fatalf("bad_wr %d of %d, %v", ps.BadWr, count, err)
		}
		// Drain what the device completed so the CQ never overflows.
		wc := make([]uapi.GohfiWC, 64)
		for {
			n, err := hfiuser.PollCQ(file, q.cq, wc)
			if err != nil {
				t.Fatal(err)
			}
			if n == 0 {
				break
			}
		}
	})
}
