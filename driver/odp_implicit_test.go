package driver_test

import (
	"bytes"
	"encoding/binary"
	"math"
	"math/rand"
	"os"
	"slices"
	"testing"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/vfio"
	"golang.org/x/sys/unix"
)

// The implicit ODP tests, in the spirit of rdma-core's tests/test_odp.py
// (test_odp_implicit_*): one MR of the whole address space per side,
// ibv_reg_mr(pd, NULL, SIZE_MAX, ON_DEMAND), and traffic through its keys
// into separate mmaps more than 1 GiB apart, so that each side has several
// 1 GiB children. They run on the embedded device (an MTT large enough for
// the directories and children: implicitSim) or on GOHFI_TEST_DEVICE (the
// QEMU guest's device has the same MTT).

// implicitMTT is the MTT of the implicit tests' device: two directories
// and six children.
const implicitMTT = 1 << 21 // hfisim's default

// implicitAccess is the access of the tests' implicit MRs.
const implicitAccess = odpAccess | uapi.IB_ACCESS_REMOTE_ATOMIC

// openImplicit opens a device with room for implicit ODP (as root) and a
// connected loop on it.
func openImplicit(t *testing.T) (*attach.Attached, *odpLoop) {
	t.Helper()
	requireRoot(t)
	a := openEnvDevice(t, 2)
	if a == nil {
		o := embeddedOptions(2)
		o.Sim.MTTEntries = implicitMTT
		a = openEmbedded(t, o)
	}
	return a, newODPLoop(t, a)
}

// odpGeneralCaps is the odp_general_caps QUERY_DEVICE must report for the
// device of a: IBV_ODP_SUPPORT, with IBV_ODP_SUPPORT_IMPLICIT when the
// device has implicit ODP and an MTT with room for a directory and a child.
func odpGeneralCaps(a *attach.Attached) uint64 {
	i := a.Device.Info()
	if i.CapFlags&chip.CapImplicitODP != 0 && i.MTTEntries >= chip.ImplicitDirEntries+chip.ImplicitChildPages {
		return uapi.IBV_ODP_SUPPORT | uapi.IBV_ODP_SUPPORT_IMPLICIT
	}
	return uapi.IBV_ODP_SUPPORT
}

// regImplicit registers the whole address space in the file of q.
func regImplicit(t testing.TB, q rcQP) uapi.GohfiRegMR {
	t.Helper()
	r, err := hfiuser.RegMR(q.f, 0, math.MaxUint64, 0, implicitAccess)
	if err != nil {
		t.Fatalf("implicit REG_MR: %v", err)
	}
	return r
}

// farBufs maps n buffers of size bytes, each in its own 1 GiB child and
// more than 1 GiB from the next, inside a PROT_NONE reservation that is
// unmapped when t ends.
func farBufs(t testing.TB, n, size int) []uintptr {
	t.Helper()
	const gib = 1 << 30
	span := (n*5/4 + 2) * gib
	res, err := unix.Mmap(-1, 0, span, unix.PROT_NONE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unix.Munmap(res); err != nil {
			t.Error(err)
		}
	})
	base := (uintptrOf(res) + gib - 1) &^ (gib - 1)
	var out []uintptr
	for i := range n {
		a := base + uintptr(i)*(gib+gib/4)
		if err := mmapFixed(a, size, unix.PROT_READ|unix.PROT_WRITE); err != nil {
			t.Fatal(err)
		}
		out = append(out, a)
	}
	return out
}

// bar4MTT reads MTT entry i through the driver's mapping of BAR4 (the
// device's own table, on any device).
func bar4MTT(a *attach.Attached, i int) uint64 {
	return a.Device.BAR4Word(uint64(i) * chip.MTTEntrySize)
}

// bar4MPT reads the MPT entry of key through the driver's mapping of BAR4.
func bar4MPT(a *attach.Attached, key uint32) chip.MPTEntry {
	off := chip.MPTOffset(a.Device.Info().MTTEntries) + uint64(chip.MPTIndex(key))*chip.MPTEntrySize
	var b [chip.MPTEntrySize]byte
	for i := 0; i < chip.MPTEntrySize; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], a.Device.BAR4Word(off+uint64(i)))
	}
	var e chip.MPTEntry
	e.Unmarshal(b[:])
	return e
}

// implicitChildren counts the children in the directory of implicit MR
// key.
func implicitChildren(a *attach.Attached, key uint32) int {
	e := bar4MPT(a, key)
	n := 0
	for c := 0; c < chip.ImplicitDirEntries; c++ {
		if bar4MTT(a, int(e.MTTFirst)+c)&chip.MTTPresent != 0 {
			n++
		}
	}
	return n
}

// TestImplicitODPRegister: QUERY_DEVICE advertises IBV_ODP_SUPPORT_IMPLICIT;
// REG_MR of the whole address space pins and maps nothing and writes an
// implicit MPT entry over an empty directory; the requests that are not
// exactly "the whole address space, on demand" are EINVAL; a device
// without room for implicit ODP does not advertise it and refuses it.
func TestImplicitODPRegister(t *testing.T) {
	a, l := openImplicit(t)
	f := l.qa.f
	attr, err := hfiuser.QueryDevice(f)
	if err != nil {
		t.Fatal(err)
	}
	if attr.OdpGeneralCaps != uapi.IBV_ODP_SUPPORT|uapi.IBV_ODP_SUPPORT_IMPLICIT || odpGeneralCaps(a) != attr.OdpGeneralCaps {
		t.Fatalf("odp_general_caps %#x, want SUPPORT|SUPPORT_IMPLICIT (device MTT %d entries)", attr.OdpGeneralCaps, a.Device.Info().MTTEntries)
	}
	before := a.Device.Stats()
	r := regImplicit(t, l.qa)
	if s := l.stats(f, r); s != (uapi.GohfiMRStats{Handle: r.Handle}) {
		t.Fatalf("MR_STATS of a fresh implicit MR: %+v", s)
	}
	if st := a.Device.Stats(); st.PagesPinned != before.PagesPinned {
		t.Fatalf("implicit REG_MR pinned %d pages", st.PagesPinned-before.PagesPinned)
	}
	if r.Lkey != r.Rkey {
		t.Fatalf("lkey %#x rkey %#x", r.Lkey, r.Rkey)
	}
	e := bar4MPT(a, r.Lkey)
	if e.Flags&chip.MPTTypeMask != chip.MPTTypeImplicit || e.Flags&chip.MPTStateMask != chip.MPTStateValid ||
		e.IOVA != 0 || e.Length != math.MaxUint64 {
		t.Fatalf("MPT entry %+v", e)
	}
	if n := implicitChildren(a, r.Lkey); n != 0 {
		t.Fatalf("%d children before any access", n)
	}
	buf := allocBuf(t, 1<<16, false)
	for _, c := range []struct {
		name         string
		addr         uintptr
		length, iova uint64
		access       uint32
		want         unix.Errno
	}{
		{"whole address space without ON_DEMAND", 0, math.MaxUint64, 0, pinAccess, unix.EINVAL},
		{"address 0, 1 GiB", 0, 1 << 30, 0, odpAccess, unix.EINVAL},
		{"a buffer, length UINT64_MAX", buf.Addr(), math.MaxUint64, uint64(buf.Addr()), odpAccess, unix.EINVAL},
		{"iova not 0", 0, math.MaxUint64, 1 << 20, odpAccess, unix.EINVAL},
		{"REMOTE_WRITE without LOCAL_WRITE", 0, math.MaxUint64, 0, uapi.IB_ACCESS_ON_DEMAND | uapi.IB_ACCESS_REMOTE_WRITE, unix.EINVAL},
	} {
		_, err := hfiuser.RegMR(f, c.addr, c.length, c.iova, c.access)
		wantErrno(t, c.name, err, c.want)
	}
	if err := hfiuser.DeregMR(f, r.Handle); err != nil {
		t.Fatal(err)
	}
	nothingPinned(t, a)

	if a.Sim == nil {
		return // the rest needs a device of another MTT size
	}
	// A device whose MTT (64 Ki entries) cannot hold the directory (128 Ki
	// entries): not advertised, refused with EINVAL (as mlx5).
	o := embeddedOptions(1)
	o.Sim.MTTEntries = 1 << 16
	small := openEmbedded(t, o)
	sf := openFile(t, small)
	assign(t, sf)
	if attr, err := hfiuser.QueryDevice(sf); err != nil || attr.OdpGeneralCaps != uapi.IBV_ODP_SUPPORT || odpGeneralCaps(small) != uapi.IBV_ODP_SUPPORT {
		t.Fatalf("QUERY_DEVICE without room for implicit ODP: odp_general_caps %#x, %v", attr.OdpGeneralCaps, err)
	}
	_, err = hfiuser.RegMR(sf, 0, math.MaxUint64, 0, odpAccess)
	wantErrno(t, "implicit REG_MR, not advertised", err, unix.EINVAL)
}

// TestImplicitODPTraffic: RDMA WRITE, RDMA READ and SEND/RECV with the
// implicit MRs' keys on both sides, between three buffers per side more
// than 1 GiB apart: the data lands, each side has a child per buffer, the
// device's view matches the process's, and the counters apply to the
// implicit MR.
func TestImplicitODPTraffic(t *testing.T) {
	a, l := openImplicit(t)
	const n = 256 << 10
	ma, mb := regImplicit(t, l.qa), regImplicit(t, l.qb)
	as, bs := farBufs(t, 3, n), farBufs(t, 3, n)
	for i := range as {
		src, dst := unsafeSlice(as[i], n), unsafeSlice(bs[i], n)
		fill(src, byte(1+i))
		wantOK(t, "WRITE", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(as[i], n, ma), bs[i], mb.Rkey))
		if !bytes.Equal(src, dst) {
			t.Fatalf("buffer %d: WRITE data differs", i)
		}
		// READ back into the next buffer of A.
		j := (i + 1) % len(as)
		fill(dst, byte(10+i))
		wantOK(t, "READ", l.op(uapi.GOHFI_WR_RDMA_READ, sg(as[j], n, ma), bs[i], mb.Rkey))
		if !bytes.Equal(unsafeSlice(as[j], n), dst) {
			t.Fatalf("buffer %d: READ data differs", i)
		}
		// SEND from A's buffer into a receive buffer of B two along.
		k := (i + 2) % len(bs)
		fill(src, byte(20+i))
		l.recv(sg(bs[k], n, mb))
		wantOK(t, "SEND", l.op(uapi.GOHFI_WR_SEND, sg(as[i], n, ma), 0, 0))
		wantOK(t, "RECV", pollWC(t, l.qb.f, l.qb.cq, 1)[0])
		if !bytes.Equal(src, unsafeSlice(bs[k], n)) {
			t.Fatalf("buffer %d: SEND data differs", i)
		}
	}
	// An SGE list spanning two children of A in one WRITE.
	fill(unsafeSlice(as[0], n), 31)
	fill(unsafeSlice(as[2], n), 32)
	sgl := []uapi.GohfiSge{{Addr: uint64(as[0]), Length: n / 2, Lkey: ma.Lkey}, {Addr: uint64(as[2]), Length: n / 2, Lkey: ma.Lkey}}
	wantOK(t, "WRITE of two children", l.op(uapi.GOHFI_WR_RDMA_WRITE, sgl, bs[1], mb.Rkey))
	want := append(append([]byte{}, unsafeSlice(as[0], n/2)...), unsafeSlice(as[2], n/2)...)
	if !bytes.Equal(unsafeSlice(bs[1], n), want) {
		t.Fatal("WRITE from two children: data differs")
	}
	for _, c := range []struct {
		name string
		q    rcQP
		mr   uapi.GohfiRegMR
		bufs []uintptr
	}{{"A", l.qa, ma, as}, {"B", l.qb, mb, bs}} {
		s := l.stats(c.q.f, c.mr)
		if s.PageFaults < 3 || s.PageFaultsHandled != s.PageFaults || s.PagesPinned < 3*n/4096 {
			t.Errorf("%s: MR_STATS %+v", c.name, s)
		}
		if k := implicitChildren(a, c.mr.Lkey); k != 3 {
			t.Errorf("%s: %d children, want 3", c.name, k)
		}
		if a.Sim != nil {
			for _, b := range c.bufs {
				dev := make([]byte, n)
				if ok, err := a.Sim.Device.PeekMR(c.mr.Lkey, uint64(b), dev); err != nil || !ok || !bytes.Equal(dev, unsafeSlice(b, n)) {
					t.Errorf("%s: the device's view of %#x differs from the process's (present %v, %v)", c.name, b, ok, err)
				}
			}
		}
	}
	if st := a.Device.Stats(); st.OdpPageFaults == 0 || st.OdpFaultsHandled != st.OdpPageFaults {
		t.Fatalf("DRIVER_STATS: %+v", st)
	}
}

// TestImplicitODPFollowsAddress: munmap and a new mapping at the same
// address: the next access through the implicit keys faults in the new
// pages; munmap alone fails the access, REM_ACCESS_ERR on the responder
// side and LOC_PROT_ERR on the requester side.
func TestImplicitODPFollowsAddress(t *testing.T) {
	_, l := openImplicit(t)
	const n = 128 << 10
	ma, mb := regImplicit(t, l.qa), regImplicit(t, l.qb)
	as, bs := farBufs(t, 2, n), farBufs(t, 2, n)
	src, addr := as[0], bs[1]
	fill(unsafeSlice(src, n), 1)
	wantOK(t, "WRITE", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(src, n, ma), addr, mb.Rkey))
	for i := range 3 {
		if err := munmapRaw(addr, n); err != nil {
			t.Fatal(err)
		}
		if err := mmapFixed(addr, n, unix.PROT_READ|unix.PROT_WRITE); err != nil {
			t.Fatal(err)
		}
		fill(unsafeSlice(src, n), byte(10+i))
		wantOK(t, "WRITE after remap", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(src, n, ma), addr, mb.Rkey))
		if !bytes.Equal(unsafeSlice(addr, n), unsafeSlice(src, n)) {
			t.Fatalf("round %d: WRITE did not land in the new mapping", i)
		}
		fill(unsafeSlice(addr, n), byte(20+i))
		wantOK(t, "READ after remap", l.op(uapi.GOHFI_WR_RDMA_READ, sg(src, n, ma), addr, mb.Rkey))
		if !bytes.Equal(unsafeSlice(addr, n), unsafeSlice(src, n)) {
			t.Fatalf("round %d: READ did not read the new mapping", i)
		}
	}
	// munmap alone: the responder's fault fails.
	if err := munmapRaw(addr, n); err != nil {
		t.Fatal(err)
	}
	wc := l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(src, 4096, ma), addr, mb.Rkey)
	if wc.Status != uapi.GOHFI_WC_REM_ACCESS_ERR || wc.VendorErr != chip.VendorErrPageFault {
		t.Fatalf("WRITE into unmapped memory through the implicit rkey: %+v, want REM_ACCESS_ERR/%d", wc, chip.VendorErrPageFault)
	}
	// Requester side: an SGE of A's implicit MR over unmapped memory.
	l.reconnect()
	if err := munmapRaw(as[1], n); err != nil {
		t.Fatal(err)
	}
	wc = l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(as[1], 4096, ma), bs[0], mb.Rkey)
	if wc.Status != uapi.GOHFI_WC_LOC_PROT_ERR || wc.VendorErr != chip.VendorErrPageFault {
		t.Fatalf("WRITE from unmapped memory through the implicit lkey: %+v, want LOC_PROT_ERR/%d", wc, chip.VendorErrPageFault)
	}
	// Mapped again, a new connection works through the same MRs.
	if err := mmapFixed(addr, n, unix.PROT_READ|unix.PROT_WRITE); err != nil {
		t.Fatal(err)
	}
	l.reconnect()
	fill(unsafeSlice(src, n), 42)
	wantOK(t, "WRITE after mapping again", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(src, n, ma), addr, mb.Rkey))
	if !bytes.Equal(unsafeSlice(addr, n), unsafeSlice(src, n)) {
		t.Fatal("data differs after mapping again")
	}
}

// TestImplicitODPDontneed: MADV_DONTNEED of every buffer before every
// operation (WRITE, READ, SEND/RECV through the implicit keys, buffers in
// different children): the data is always intact and the invalidations
// are counted on the implicit MRs and handled.
func TestImplicitODPDontneed(t *testing.T) {
	a, l := openImplicit(t)
	const n = 128 << 10
	ma, mb := regImplicit(t, l.qa), regImplicit(t, l.qb)
	as, bs := farBufs(t, 2, n), farBufs(t, 2, n)
	rng := rand.New(rand.NewSource(1))
	iters := 45
	if testing.Short() {
		iters = 12
	}
	for i := range iters {
		for _, b := range append(append([]uintptr{}, as...), bs...) {
			if err := madvise(b, n, unix.MADV_DONTNEED); err != nil {
				t.Fatal(err)
			}
		}
		pa, pb := as[i%2], bs[(i/2)%2]
		off, size := rng.Intn(n/2), 1+rng.Intn(n/2)
		sa, sb := unsafeSlice(pa+uintptr(off), size), unsafeSlice(pb+uintptr(off), size)
		switch i % 3 {
		case 0:
			fill(sa, byte(i))
			wantOK(t, "WRITE", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(pa+uintptr(off), size, ma), pb+uintptr(off), mb.Rkey))
		case 1:
			fill(sb, byte(i))
			wantOK(t, "READ", l.op(uapi.GOHFI_WR_RDMA_READ, sg(pa+uintptr(off), size, ma), pb+uintptr(off), mb.Rkey))
		case 2:
			fill(sa, byte(i))
			l.recv(sg(pb+uintptr(off), size, mb))
			wantOK(t, "SEND", l.op(uapi.GOHFI_WR_SEND, sg(pa+uintptr(off), size, ma), 0, 0))
			wantOK(t, "RECV", pollWC(t, l.qb.f, l.qb.cq, 1)[0])
		}
		if !bytes.Equal(sa, sb) {
			t.Fatalf("iteration %d: data differs", i)
		}
	}
	if err := a.Device.ODPFence(); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		q  rcQP
		mr uapi.GohfiRegMR
	}{{l.qa, ma}, {l.qb, mb}} {
		s := l.stats(c.q.f, c.mr)
		if s.PageInvalidations == 0 || s.PageInvalidationsHandled != s.PageInvalidations || s.PageFaults < uint64(iters/2) {
			t.Fatalf("after %d iterations: %+v", iters, s)
		}
	}
}

// TestImplicitODPDeregCleansUp: after traffic through several children,
// DEREG_MR of the implicit MRs leaves nothing pinned and no DMA mapping of
// theirs (the embedded device, behind a wrapper that counts mappings), the
// MPT entries free, the directories and children's MTT runs zero, and
// the keys refused; the file's release after a new implicit MR with
// children cleans up the same way.
func TestImplicitODPDeregCleansUp(t *testing.T) {
	requireRoot(t)
	if os.Getenv(envTestDevice) != "" {
		t.Skip("counts the DMA mappings of an embedded device behind a wrapper")
	}
	maps := &failingMaps{mapped: map[uint64]uint64{}}
	cfg := smallSim(3)
	cfg.RcvArrayPerCtxt = 2048
	cfg.MTTEntries = implicitMTT
	a, err := openBehind(t, attach.DefaultOptions(), cfg, func(d vfio.Device) vfio.Device {
		maps.Device = d
		return maps
	})
	if err != nil {
		t.Fatal(err)
	}
	l := newODPLoop(t, a)
	const n = 256 << 10
	ma, mb := regImplicit(t, l.qa), regImplicit(t, l.qb)
	before := maps.held() // the event queue, mapped at the first ODP REG_MR, and the rings
	as, bs := farBufs(t, 3, n), farBufs(t, 3, n)
	for i := range as {
		fill(unsafeSlice(as[i], n), byte(i))
		wantOK(t, "WRITE", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(as[i], n, ma), bs[i], mb.Rkey))
	}
	if maps.held() <= before || implicitChildren(a, ma.Lkey) != 3 || implicitChildren(a, mb.Lkey) != 3 {
		t.Fatalf("after the traffic: %d DMA mappings (%d before), children %d and %d",
			maps.held(), before, implicitChildren(a, ma.Lkey), implicitChildren(a, mb.Lkey))
	}
	type run struct{ first, n int }
	var runs []run // the directories and the children's MTT runs
	for _, key := range []uint32{ma.Lkey, mb.Lkey} {
		e := bar4MPT(a, key)
		runs = append(runs, run{int(e.MTTFirst), chip.ImplicitDirEntries})
		for c := 0; c < chip.ImplicitDirEntries; c++ {
			if de := bar4MTT(a, int(e.MTTFirst)+c); de&chip.MTTPresent != 0 {
				runs = append(runs, run{int(chip.ImplicitChildMTT(de)), chip.ImplicitChildPages})
			}
		}
	}
	if err := hfiuser.DeregMR(l.qa.f, ma.Handle); err != nil {
		t.Fatal(err)
	}
	if err := hfiuser.DeregMR(l.qb.f, mb.Handle); err != nil {
		t.Fatal(err)
	}
	nothingPinned(t, a)
	if got := maps.held(); got != before {
		t.Errorf("DMA mappings %d after DEREG_MR, %d before the implicit MRs", got, before)
	}
	for _, key := range []uint32{ma.Lkey, mb.Lkey} {
		if e := bar4MPT(a, key); e.Flags&chip.MPTStateMask != chip.MPTStateFree {
			t.Errorf("MPT entry of %#x after DEREG_MR: %+v", key, e)
		}
	}
	for _, r := range runs {
		for i := 0; i < r.n; i++ {
			if v := bar4MTT(a, r.first+i); v != 0 {
				t.Fatalf("MTT entry %d of the run at %d after DEREG_MR: %#x", i, r.first, v)
			}
		}
	}
	wc := l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(as[0], 4096, ma), bs[0], mb.Rkey)
	if wc.Status != uapi.GOHFI_WC_LOC_PROT_ERR {
		t.Errorf("WRITE through deregistered implicit keys: %+v, want LOC_PROT_ERR", wc)
	}

	// Closing the file tears down an implicit MR with children too.
	f := openFile(t, a)
	assign(t, f)
	q := newRCQP(t, f, 4, 4, false)
	m := regImplicit(t, q)
	if err := hfiuser.AdviseMR(f, uapi.GOHFI_ADVISE_MR_ADVICE_PREFETCH_WRITE, uapi.GOHFI_ADVISE_MR_FLAG_FLUSH,
		m.Lkey, uint64(as[1]), n); err != nil {
		t.Fatalf("ADVISE_MR PREFETCH_WRITE of an implicit MR: %v", err)
	}
	if s := l.stats(f, m); s.PagesPinned != n/4096 || s.PagePrefetch != n/4096 {
		t.Fatalf("after the prefetch: %+v", s)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	nothingPinned(t, a)
	if got := maps.held(); got != before {
		t.Errorf("DMA mappings %d after the file's release, %d before", got, before)
	}
}

// TestImplicitODPChildrenReclaimed: on a device whose MTT holds the
// directory and two children, a third buffer's child is made by destroying
// a child that maps nothing (its buffer DONTNEED'd); with both children
// busy a new child cannot be made and the access fails; an munmap of a
// whole child's 1 GiB destroys it, and its room serves the next buffer.
func TestImplicitODPChildrenReclaimed(t *testing.T) {
	requireRoot(t)
	if os.Getenv(envTestDevice) != "" {
		t.Skip("needs an embedded device with a small MTT")
	}
	o := embeddedOptions(2)
	o.Sim.MTTEntries = chip.ImplicitDirEntries + 2*chip.ImplicitChildPages + 1024
	a := openEmbedded(t, o)
	l := newODPLoop(t, a)
	const n = 64 << 10
	src := allocBuf(t, n, false)
	ms := l.reg(l.qa.f, src.Addr(), n, pinAccess)
	mb := regImplicit(t, l.qb)
	bs := farBufs(t, 3, n)
	dir := int(bar4MPT(a, mb.Lkey).MTTFirst)
	child := func(b uintptr) bool { return bar4MTT(a, dir+int(b>>chip.ImplicitChildShift))&chip.MTTPresent != 0 }
	write := func(what string, b uintptr, seed byte) uapi.GohfiWC {
		t.Helper()
		fill(src.Bytes(), seed)
		wc := l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(src.Addr(), n, ms), b, mb.Rkey)
		if wc.Status == uapi.GOHFI_WC_SUCCESS && !bytes.Equal(unsafeSlice(b, n), src.Bytes()) {
			t.Fatalf("%s: data differs", what)
		}
		return wc
	}
	wantOK(t, "WRITE 0", write("WRITE 0", bs[0], 1))
	wantOK(t, "WRITE 1", write("WRITE 1", bs[1], 2))
	if !child(bs[0]) || !child(bs[1]) {
		t.Fatal("no child for the first two buffers")
	}
	// Buffer 0's child maps nothing after the DONTNEED: it makes room.
	if err := madvise(bs[0], n, unix.MADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	wantOK(t, "WRITE 2", write("WRITE 2", bs[2], 3))
	if child(bs[0]) || !child(bs[1]) || !child(bs[2]) {
		t.Fatalf("children after the reclaim: %v %v %v, want false true true", child(bs[0]), child(bs[1]), child(bs[2]))
	}
	// Both children map pages: no room for buffer 0's.
	wc := write("WRITE 0 again", bs[0], 4)
	if wc.Status != uapi.GOHFI_WC_REM_ACCESS_ERR || wc.VendorErr != chip.VendorErrPageFault {
		t.Fatalf("WRITE with the MTT full of busy children: %+v, want REM_ACCESS_ERR/%d", wc, chip.VendorErrPageFault)
	}
	l.reconnect()
	// An munmap of buffer 1's whole child destroys it.
	if err := munmapRaw(bs[1]&^(chip.ImplicitChildSize-1), chip.ImplicitChildSize); err != nil {
		t.Fatal(err)
	}
	wantOK(t, "WRITE 0 after the munmap", write("WRITE 0 after the munmap", bs[0], 5))
	if !child(bs[0]) || child(bs[1]) || !child(bs[2]) {
		t.Fatalf("children after the munmap: %v %v %v, want true false true", child(bs[0]), child(bs[1]), child(bs[2]))
	}
	s := l.stats(l.qb.f, mb)
	if s.PagesPinned != 2*n/4096 || s.PageInvalidations == 0 || s.PageInvalidationsHandled != s.PageInvalidations {
		t.Fatalf("MR_STATS: %+v", s)
	}
}

// BenchmarkImplicitODPFault: one 4 KiB RDMA WRITE into a 1 MiB target
// whose pages were just dropped (MADV_DONTNEED), so every WRITE faults:
// the invalidation, the fault and the WRITE, into an ODP MR of the target
// and into an implicit MR (whose child exists: its faults also watch the
// window they map).
func BenchmarkImplicitODPFault(b *testing.B) {
	requireRoot(b)
	o := embeddedOptions(2)
	o.Sim.MTTEntries = implicitMTT
	a := openEmbedded(b, o)
	fa, fb := openFile(b, a), openFile(b, a)
	assign(b, fa)
	assign(b, fb)
	qa, qb := newRCQP(b, fa, 16, 16, false), newRCQP(b, fb, 16, 16, false)
	qa.connect(b, qb.qpn)
	qb.connect(b, qa.qpn)
	src := allocBuf(b, 4096, false)
	ms, err := hfiuser.RegMR(fa, src.Addr(), 4096, uint64(src.Addr()), pinAccess)
	if err != nil {
		b.Fatal(err)
	}
	const n = 1 << 20
	for _, kind := range []string{"odp", "implicit"} {
		b.Run(kind, func(b *testing.B) {
			dst := allocBuf(b, n, false)
			var r uapi.GohfiRegMR
			if kind == "odp" {
				r, err = hfiuser.RegMR(fb, dst.Addr(), n, uint64(dst.Addr()), odpAccess)
			} else {
				r, err = hfiuser.RegMR(fb, 0, math.MaxUint64, 0, implicitAccess)
			}
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { _ = hfiuser.DeregMR(fb, r.Handle) })
			write := func(i int) {
				w := hfiuser.SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: 1, Opcode: uapi.GOHFI_WR_RDMA_WRITE,
					SendFlags: uapi.GOHFI_SEND_SIGNALED, RemoteAddr: uint64(dst.Addr()) + uint64(i%(n/4096))*4096, Rkey: r.Rkey},
					SGL: []uapi.GohfiSge{{Addr: uint64(src.Addr()), Length: 4096, Lkey: ms.Lkey}}}
				if _, err := hfiuser.PostSend(fa, qa.qp, []hfiuser.SendWR{w}); err != nil {
					b.Fatal(err)
				}
				wantOK(b, "WRITE", pollWC(b, fa, qa.cq, 1)[0])
			}
			write(0) // the implicit MR's child
			a.Sim.Device.ODPFaultLatencies()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if err := madvise(dst.Addr(), n, unix.MADV_DONTNEED); err != nil {
					b.Fatal(err)
				}
				write(i)
			}
			b.StopTimer()
			// The device's view: fault raised to resumed.
			lat := a.Sim.Device.ODPFaultLatencies()
			slices.Sort(lat)
			if len(lat) > 0 {
				b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "fault-p50-us")
				b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "fault-p99-us")
			}
		})
	}
}

// TestImplicitODPPrefetch: ADVISE_MR on the implicit MRs (as test_odp.py's
// implicit prefetch tests): an asynchronous PREFETCH_WRITE of the source
// is accepted and the WRITE from it lands (faulting what the prefetch has
// not mapped yet); a synchronous PREFETCH and PREFETCH_NO_FAULT map the
// target's buffers in two more children, counted in page_prefetch; a range
// that is not mapped, or above the 47-bit address space, is EFAULT.
func TestImplicitODPPrefetch(t *testing.T) {
	_, l := openImplicit(t)
	const n = 256 << 10
	ma, mb := regImplicit(t, l.qa), regImplicit(t, l.qb)
	as, bs := farBufs(t, 1, n), farBufs(t, 3, n)
	f := l.qb.f
	if err := hfiuser.AdviseMR(l.qa.f, uapi.GOHFI_ADVISE_MR_ADVICE_PREFETCH_WRITE, 0, ma.Lkey, uint64(as[0]), n); err != nil {
		t.Fatalf("asynchronous PREFETCH_WRITE: %v", err)
	}
	fill(unsafeSlice(as[0], n), 1)
	wantOK(t, "WRITE", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(as[0], n, ma), bs[0], mb.Rkey))
	if !bytes.Equal(unsafeSlice(bs[0], n), unsafeSlice(as[0], n)) {
		t.Fatal("WRITE after the prefetch: data differs")
	}
	before := l.stats(f, mb)
	if err := hfiuser.AdviseMR(f, uapi.GOHFI_ADVISE_MR_ADVICE_PREFETCH, uapi.GOHFI_ADVISE_MR_FLAG_FLUSH, mb.Lkey, uint64(bs[1]), n); err != nil {
		t.Fatalf("PREFETCH: %v", err)
	}
	unsafeSlice(bs[2], n)[0] = 1 // one resident page
	if err := hfiuser.AdviseMR(f, uapi.GOHFI_ADVISE_MR_ADVICE_PREFETCH_NO_FAULT, uapi.GOHFI_ADVISE_MR_FLAG_FLUSH, mb.Lkey, uint64(bs[2]), n); err != nil {
		t.Fatalf("PREFETCH_NO_FAULT: %v", err)
	}
	s := l.stats(f, mb)
	if got := s.PagePrefetch - before.PagePrefetch; got != n/4096+1 || s.PagesPinned < before.PagesPinned+n/4096+1 {
		t.Fatalf("prefetched %d pages (want %d), MR_STATS %+v", got, n/4096+1, s)
	}
	hole := farBufs(t, 1, n)[0]
	if err := munmapRaw(hole, n); err != nil {
		t.Fatal(err)
	}
	err := hfiuser.AdviseMR(f, uapi.GOHFI_ADVISE_MR_ADVICE_PREFETCH, uapi.GOHFI_ADVISE_MR_FLAG_FLUSH, mb.Lkey, uint64(hole), n)
	wantErrno(t, "PREFETCH of unmapped memory", err, unix.EFAULT)
	err = hfiuser.AdviseMR(f, uapi.GOHFI_ADVISE_MR_ADVICE_PREFETCH, uapi.GOHFI_ADVISE_MR_FLAG_FLUSH, mb.Lkey, 1<<chip.ImplicitVABits, 4096)
	wantErrno(t, "PREFETCH above 2^47", err, unix.EFAULT)
}
