package hfisim

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
)

// Fast-registration tests: the harness plays the driver's part (an MPT
// entry of type fast-reg, FREE, with its MTT run) and posts FAST_REG_MR,
// LOCAL_INV, SEND_WITH_INV and RDMA_READ_WITH_INV WQEs.

// frMR is a fast-reg MR as the driver allocates it.
type frMR struct {
	idx      uint32
	pd       uint32
	mttFirst uint32
	logMTT   uint32
}

func (h *vh) allocFR(idx, pd, logMTT uint32) *frMR {
	m := &frMR{idx: idx, pd: pd, mttFirst: h.mttNext, logMTT: logMTT}
	h.mttNext += 1 << logMTT
	h.writeMPT(idx, chip.MPTEntry{Key: idx << 8, PD: pd, MTTFirst: m.mttFirst,
		Flags: chip.MPTStateFree | chip.MPTTypeFastReg | logMTT<<chip.MPTLogMTTShift})
	return m
}

func (h *vh) mpt(idx uint32) chip.MPTEntry {
	h.d.mu.Lock()
	defer h.d.mu.Unlock()
	return h.d.mptEntry(idx)
}

// pageList writes a page list of the given page IOVAs to host memory.
func (h *vh) pageList(pages ...uint64) uint64 {
	a := h.alloc(uint64(len(pages)) * 8)
	b := make([]byte, len(pages)*8)
	for i, p := range pages {
		binary.LittleEndian.PutUint64(b[i*8:], p)
	}
	h.write(a, b)
	return a
}

func regWQE(id uint64, m *frMR, variant uint32, pl uint64, n int, shift uint32, iova, length uint64, access uint32) chip.SendWQE {
	return chip.SendWQE{WrID: id, Opcode: uapi.GOHFI_WR_FAST_REG_MR, Flags: uapi.GOHFI_SEND_SIGNALED,
		FrIOVA: iova, FrLength: length, FrPageList: pl, FrPageListLen: uint32(n), FrPageShift: shift,
		FrMPTIndex: m.idx, FrKey: m.idx<<8 | variant, FrAccess: access}
}

func invWQE(id uint64, op uint8, key uint32) chip.SendWQE {
	return chip.SendWQE{WrID: id, Opcode: op, Flags: uapi.GOHFI_SEND_SIGNALED | uapi.GOHFI_SEND_FENCE, Imm: key}
}

const frVA = 0x6000_0000_0000

// bound is a fast-reg MR bound to four separate host pages in the order
// C, A, D, B, at iova frVA+0x100.
type bound struct {
	m     *frMR
	pages []uint64 // host pages in page-list order
	key   uint32
}

func bindFour(p *pair, variant uint32) *bound {
	h := p.h
	a, b, c, dd := h.alloc(4096), h.alloc(4096), h.alloc(4096), h.alloc(4096)
	bd := &bound{m: h.allocFR(3, 1, 3), pages: []uint64{c, a, dd, b}, key: 3<<8 | variant}
	pl := h.pageList(bd.pages...)
	h.postSend(p.b, regWQE(7, bd.m, variant, pl, 4, 12, frVA+0x100, 4*4096-0x100, allAccess))
	h.expectCQE(p.bcq, 7, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_REG_MR, chip.VendorErrNone)
	return bd
}

// hostBytes reads n bytes of the bound MR's address va from its pages.
func (bd *bound) hostBytes(h *vh, va uint64, n int) []byte {
	out := make([]byte, 0, n)
	for n > 0 {
		off := va - frVA
		pg, in := off/4096, off%4096
		k := min(n, int(4096-in))
		out = append(out, h.read(bd.pages[pg]+in, k)...)
		va += uint64(k)
		n -= k
	}
	return out
}

// TestFastRegBind: a bound MR is reached through its pages in page-list
// order from its first byte offset, by WRITE and READ, across the binding's
// page boundaries; the MPT entry holds the new key, iova, length, access and
// page shift; the old variant is refused.
func TestFastRegBind(t *testing.T) {
	p := newPair(t, 64<<10)
	h := p.h
	bd := bindFour(p, 0x21)
	e := h.mpt(3)
	if e.Key != bd.key || e.IOVA != frVA+0x100 || e.Length != 4*4096-0x100 || e.Flags&chip.MPTStateMask != chip.MPTStateValid ||
		e.PageShift() != 12 || e.Flags>>chip.MPTAccessShift&0xff != allAccess {
		t.Fatalf("MPT after FAST_REG_MR: %+v", e)
	}
	src := h.fill(p.local, 9)
	// An unaligned WRITE across every page boundary of the binding.
	va := uint64(frVA + 0x100 + 3000)
	n := 3*4096 - 0x100 - 3000 + 1000
	w := sendWQE(1, uapi.GOHFI_WR_RDMA_WRITE, sge(p.local, 0, uint32(n)))
	w.RemoteAddr, w.Rkey = va, bd.key
	h.postSend(p.a, w)
	h.expectCQE(p.acq, 1, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, chip.VendorErrNone)
	if !bytes.Equal(bd.hostBytes(h, va, n), src[:n]) {
		t.Fatal("WRITE through the fast-reg key: data not in page-list order")
	}
	// READ it back into another place of the local MR.
	r := sendWQE(2, uapi.GOHFI_WR_RDMA_READ, sge(p.local, 32<<10, uint32(n)))
	r.RemoteAddr, r.Rkey = va, bd.key
	h.postSend(p.a, r)
	h.expectCQE(p.acq, 2, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_READ, chip.VendorErrNone)
	if got := h.contents(p.local)[32<<10 : 32<<10+n]; !bytes.Equal(got, src[:n]) {
		t.Fatal("READ through the fast-reg key differs")
	}
	// One byte past the binding's length.
	w = sendWQE(3, uapi.GOHFI_WR_RDMA_WRITE, sge(p.local, 0, 2))
	w.RemoteAddr, w.Rkey = frVA+4*4096-1, bd.key
	h.postSend(p.a, w)
	h.expectCQE(p.acq, 3, uapi.GOHFI_WC_REM_ACCESS_ERR, 0, chip.VendorErrBounds)

	// The old variant (the allocation's key) is refused.
	p = newPair(t, 64<<10)
	bd = bindFour(p, 0x22)
	w = sendWQE(4, uapi.GOHFI_WR_RDMA_WRITE, sge(p.local, 0, 16))
	w.RemoteAddr, w.Rkey = frVA+0x100, 3<<8
	p.h.postSend(p.a, w)
	p.h.expectCQE(p.acq, 4, uapi.GOHFI_WC_REM_ACCESS_ERR, 0, chip.VendorErrKey)
}

// TestFastRegPageShift: 8 KiB pages, the second before the first.
func TestFastRegPageShift(t *testing.T) {
	p := newPair(t, 64<<10)
	h := p.h
	m := h.allocFR(3, 1, 1)
	x, y := h.alloc(8192), h.alloc(8192)
	h.postSend(p.b, regWQE(1, m, 5, h.pageList(y, x), 2, 13, frVA, 16384, allAccess))
	h.expectCQE(p.bcq, 1, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_REG_MR, chip.VendorErrNone)
	src := h.fill(p.local, 3)
	w := sendWQE(2, uapi.GOHFI_WR_RDMA_WRITE, sge(p.local, 0, 16384))
	w.RemoteAddr, w.Rkey = frVA, 3<<8|5
	h.postSend(p.a, w)
	h.expectCQE(p.acq, 2, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, chip.VendorErrNone)
	if !bytes.Equal(h.read(y, 8192), src[:8192]) || !bytes.Equal(h.read(x, 8192), src[8192:16384]) {
		t.Fatal("8 KiB pages: data not in page-list order")
	}
}

// TestFastRegRefused: FAST_REG_MR refusals complete with the status and
// vendor_err of the check and move the QP to ERR; the MR is left as it was.
func TestFastRegRefused(t *testing.T) {
	cases := map[string]struct {
		wqe            func(p *pair) chip.SendWQE
		status, vendor uint32
	}{
		"MR already VALID": {func(p *pair) chip.SendWQE {
			bindFour(p, 1)
			return regWQE(1, &frMR{idx: 3}, 2, p.h.pageList(p.h.alloc(4096)), 1, 12, frVA, 4096, allAccess)
		}, uapi.GOHFI_WC_LOC_QP_OP_ERR, chip.VendorErrState},
		"another PD": {func(p *pair) chip.SendWQE {
			m := p.h.allocFR(3, 2, 2)
			return regWQE(1, m, 1, p.h.pageList(p.h.alloc(4096)), 1, 12, frVA, 4096, allAccess)
		}, uapi.GOHFI_WC_LOC_QP_OP_ERR, chip.VendorErrPD},
		"key names another MR": {func(p *pair) chip.SendWQE {
			m := p.h.allocFR(3, 1, 2)
			w := regWQE(1, m, 1, p.h.pageList(p.h.alloc(4096)), 1, 12, frVA, 4096, allAccess)
			w.FrKey = 4<<8 | 1
			return w
		}, uapi.GOHFI_WC_LOC_QP_OP_ERR, chip.VendorErrKey},
		"pinned MR": {func(p *pair) chip.SendWQE {
			return regWQE(1, &frMR{idx: p.remote.idx}, 1, p.h.pageList(p.h.alloc(4096)), 1, 12, frVA, 4096, allAccess)
		}, uapi.GOHFI_WC_LOC_QP_OP_ERR, chip.VendorErrMRType},
		"page list longer than the MR": {func(p *pair) chip.SendWQE {
			m := p.h.allocFR(3, 1, 1)
			h := p.h
			return regWQE(1, m, 1, h.pageList(h.alloc(4096), h.alloc(4096), h.alloc(4096)), 3, 12, frVA, 4096, allAccess)
		}, uapi.GOHFI_WC_LOC_PROT_ERR, chip.VendorErrBounds},
		"length past the pages": {func(p *pair) chip.SendWQE {
			m := p.h.allocFR(3, 1, 1)
			return regWQE(1, m, 1, p.h.pageList(p.h.alloc(4096)), 1, 12, frVA+1, 4096, allAccess)
		}, uapi.GOHFI_WC_LOC_PROT_ERR, chip.VendorErrBounds},
		"page list unreadable": {func(p *pair) chip.SendWQE {
			m := p.h.allocFR(3, 1, 1)
			return regWQE(1, m, 1, 0x1000, 1, 12, frVA, 4096, allAccess)
		}, uapi.GOHFI_WC_LOC_PROT_ERR, chip.VendorErrDMA},
		"unaligned page": {func(p *pair) chip.SendWQE {
			m := p.h.allocFR(3, 1, 1)
			return regWQE(1, m, 1, p.h.pageList(p.h.alloc(4096)+8), 1, 12, frVA, 4096, allAccess)
		}, uapi.GOHFI_WC_LOC_PROT_ERR, chip.VendorErrBadWQE},
		"page shift": {func(p *pair) chip.SendWQE {
			m := p.h.allocFR(3, 1, 1)
			return regWQE(1, m, 1, p.h.pageList(p.h.alloc(4096)), 1, 11, frVA, 2048, allAccess)
		}, uapi.GOHFI_WC_LOC_QP_OP_ERR, chip.VendorErrBadWQE},
		"reserved bytes": {func(p *pair) chip.SendWQE {
			m := p.h.allocFR(3, 1, 1)
			w := regWQE(1, m, 1, p.h.pageList(p.h.alloc(4096)), 1, 12, frVA, 4096, allAccess)
			w.FrAccess = 1 << 4 // MW_BIND
			return w
		}, uapi.GOHFI_WC_LOC_QP_OP_ERR, chip.VendorErrBadWQE},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			p := newPair(t, 64<<10)
			w := c.wqe(p)
			before := p.h.mpt(w.FrMPTIndex)
			p.h.postSend(p.b, w)
			p.h.expectCQE(p.bcq, 1, c.status, 0, c.vendor)
			p.h.expectErr(p.b)
			if after := p.h.mpt(w.FrMPTIndex); after != before {
				t.Fatalf("MPT entry changed by a refused FAST_REG_MR: %+v -> %+v", before, after)
			}
		})
	}
}

// TestFastRegLocalInv: LOCAL_INV makes the MR FREE (later accesses are
// refused with vendor_err state), keeps its key, and can be followed by a
// rebind with a new variant; LOCAL_INV of a pinned MR, with a stale variant
// or of another PD's MR is refused.
func TestFastRegLocalInv(t *testing.T) {
	p := newPair(t, 64<<10)
	h := p.h
	bd := bindFour(p, 1)
	h.postSend(p.b, invWQE(8, uapi.GOHFI_WR_LOCAL_INV, bd.key))
	h.expectCQE(p.bcq, 8, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_LOCAL_INV, chip.VendorErrNone)
	if e := h.mpt(3); e.Flags&chip.MPTStateMask != chip.MPTStateFree || e.Key != bd.key {
		t.Fatalf("MPT after LOCAL_INV: %+v", e)
	}
	// Rebind with a new variant to other pages: the new key reaches them.
	x := h.alloc(4096)
	h.postSend(p.b, regWQE(9, bd.m, 2, h.pageList(x), 1, 12, frVA, 4096, allAccess))
	h.expectCQE(p.bcq, 9, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_REG_MR, chip.VendorErrNone)
	src := h.fill(p.local, 4)
	w := sendWQE(1, uapi.GOHFI_WR_RDMA_WRITE, sge(p.local, 0, 4096))
	w.RemoteAddr, w.Rkey = frVA, 3<<8|2
	h.postSend(p.a, w)
	h.expectCQE(p.acq, 1, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, chip.VendorErrNone)
	if !bytes.Equal(h.read(x, 4096), src[:4096]) {
		t.Fatal("rebind: data not in the new page")
	}
	// The previous variant is refused now.
	w.WrID, w.Rkey = 2, bd.key
	h.postSend(p.a, w)
	h.expectCQE(p.acq, 2, uapi.GOHFI_WC_REM_ACCESS_ERR, 0, chip.VendorErrKey)

	for name, c := range map[string]struct {
		key    func(p *pair) uint32
		vendor uint32
	}{
		"pinned MR":     {func(p *pair) uint32 { return p.remote.key() }, chip.VendorErrMRType},
		"stale variant": {func(p *pair) uint32 { return bindFour(p, 3).key ^ 1 }, chip.VendorErrKey},
		"another PD":    {func(p *pair) uint32 { p.h.allocFR(3, 2, 1); return 3 << 8 }, chip.VendorErrPD},
		"no such MR":    {func(p *pair) uint32 { return 0xffff << 8 }, chip.VendorErrKey},
	} {
		t.Run(name, func(t *testing.T) {
			p := newPair(t, 64<<10)
			p.h.postSend(p.b, invWQE(1, uapi.GOHFI_WR_LOCAL_INV, c.key(p)))
			p.h.expectCQE(p.bcq, 1, uapi.GOHFI_WC_LOC_QP_OP_ERR, 0, c.vendor)
			p.h.expectErr(p.b)
		})
	}
	// After LOCAL_INV the key is refused (state).
	p = newPair(t, 64<<10)
	bd = bindFour(p, 4)
	p.h.postSend(p.b, invWQE(1, uapi.GOHFI_WR_LOCAL_INV, bd.key))
	p.h.expectCQE(p.bcq, 1, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_LOCAL_INV, chip.VendorErrNone)
	w = sendWQE(2, uapi.GOHFI_WR_RDMA_READ, sge(p.local, 0, 16))
	w.RemoteAddr, w.Rkey = frVA+0x100, bd.key
	p.h.postSend(p.a, w)
	p.h.expectCQE(p.acq, 2, uapi.GOHFI_WC_REM_ACCESS_ERR, 0, chip.VendorErrState)
}

// TestFastRegSendWithInv: SEND_WITH_INV places its data, then invalidates
// the receiver's MR and says so in the receive CQE; a failed invalidation
// is REM_INV_REQ_ERR at both ends and leaves the MR valid.
func TestFastRegSendWithInv(t *testing.T) {
	p := newPair(t, 64<<10)
	h := p.h
	bd := bindFour(p, 6)
	src := h.fill(p.local, 1)
	h.postRecv(p.b, recvWQE(50, sge(p.remote, 0, 9000)))
	w := sendWQE(5, uapi.GOHFI_WR_SEND_WITH_INV, sge(p.local, 0, 9000))
	w.Imm = bd.key
	h.postSend(p.a, w)
	h.expectCQE(p.acq, 5, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_SEND, chip.VendorErrNone)
	rc := h.expectCQE(p.bcq, 50, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RECV, chip.VendorErrNone)
	if rc.WcFlags != uapi.GOHFI_WC_WITH_INVALIDATE || rc.InvalidatedRkey != bd.key || rc.ImmData != 0 || rc.ByteLen != 9000 {
		t.Fatalf("receive CQE %+v, want WITH_INVALIDATE of %#x", rc, bd.key)
	}
	if !bytes.Equal(h.contents(p.remote)[:9000], src[:9000]) {
		t.Fatal("SEND_WITH_INV: data differs")
	}
	if e := h.mpt(3); e.Flags&chip.MPTStateMask != chip.MPTStateFree {
		t.Fatalf("MR not invalidated: %+v", e)
	}

	// A stale key: the data is placed, the invalidation fails.
	p = newPair(t, 64<<10)
	h = p.h
	bd = bindFour(p, 7)
	h.postRecv(p.b, recvWQE(51, sge(p.remote, 0, 100)))
	w = sendWQE(6, uapi.GOHFI_WR_SEND_WITH_INV, sge(p.local, 0, 100))
	w.Imm = bd.key ^ 0x10
	h.postSend(p.a, w)
	h.expectCQE(p.acq, 6, uapi.GOHFI_WC_REM_INV_REQ_ERR, 0, chip.VendorErrKey)
	h.expectCQE(p.bcq, 51, uapi.GOHFI_WC_REM_INV_REQ_ERR, 0, chip.VendorErrKey)
	h.expectErr(p.a, p.b)
	if e := h.mpt(3); e.Flags&chip.MPTStateMask != chip.MPTStateValid {
		t.Fatalf("MR invalidated by a failed SEND_WITH_INV: %+v", e)
	}
}

// TestFastRegReadWithInv: RDMA_READ_WITH_INV reads into a fast-reg MR of
// the requester and invalidates it once the data is placed.
func TestFastRegReadWithInv(t *testing.T) {
	p := newPair(t, 64<<10)
	h := p.h
	// The requester's own fast-reg MR, bound on its own QP.
	m := h.allocFR(4, 1, 2)
	x, y := h.alloc(4096), h.alloc(4096)
	h.postSend(p.a, regWQE(1, m, 9, h.pageList(y, x), 2, 12, frVA, 8192, uapi.IB_ACCESS_LOCAL_WRITE))
	h.expectCQE(p.acq, 1, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_REG_MR, chip.VendorErrNone)
	src := h.fill(p.remote, 2)
	w := sendWQE(2, uapi.GOHFI_WR_RDMA_READ_WITH_INV, chip.SGE{Addr: frVA, Length: 8192, Lkey: 4<<8 | 9})
	w.RemoteAddr, w.Rkey, w.Imm = p.remote.va, p.remote.key(), 4<<8|9
	h.postSend(p.a, w)
	h.expectCQE(p.acq, 2, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_READ, chip.VendorErrNone)
	if !bytes.Equal(h.read(y, 4096), src[:4096]) || !bytes.Equal(h.read(x, 4096), src[4096:8192]) {
		t.Fatal("READ_WITH_INV: data differs")
	}
	if e := h.mpt(4); e.Flags&chip.MPTStateMask != chip.MPTStateFree {
		t.Fatalf("READ_WITH_INV did not invalidate: %+v", e)
	}
	// A READ_WITH_INV naming a pinned MR reads, then fails.
	w = sendWQE(3, uapi.GOHFI_WR_RDMA_READ_WITH_INV, sge(p.local, 0, 64))
	w.RemoteAddr, w.Rkey, w.Imm = p.remote.va, p.remote.key(), p.local.key()
	h.postSend(p.a, w)
	h.expectCQE(p.acq, 3, uapi.GOHFI_WC_LOC_QP_OP_ERR, 0, chip.VendorErrMRType)
}

// TestFastRegInvalidateMidMessage: a LOCAL_INV that runs while a 1 MiB
// WRITE through the key is in flight stops the WRITE at its next packet
// (REM_ACCESS_ERR, state); the packets before it stay written.
func TestFastRegInvalidateMidMessage(t *testing.T) {
	p := newPair(t, 1<<20)
	h := p.h
	m := h.allocFR(3, 1, 8)
	base := h.alloc(1 << 20)
	pages := make([]uint64, 256)
	for i := range pages {
		pages[i] = base + uint64(i)*4096
	}
	h.postSend(p.b, regWQE(1, m, 1, h.pageList(pages...), 256, 12, frVA, 1<<20, allAccess))
	h.expectCQE(p.bcq, 1, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_REG_MR, chip.VendorErrNone)
	src := h.fill(p.local, 8)
	written := 0
	h.dma.mu.Lock()
	h.dma.onWrite = func(iova uint64, n int) {
		if iova < base || iova >= base+1<<20 {
			return
		}
		if written += n; written == chip.VerbsMTU {
			h.postSend(p.b, invWQE(2, uapi.GOHFI_WR_LOCAL_INV, 3<<8|1))
		}
	}
	h.dma.mu.Unlock()
	w := sendWQE(3, uapi.GOHFI_WR_RDMA_WRITE, sge(p.local, 0, 1<<20))
	w.RemoteAddr, w.Rkey = frVA, 3<<8|1
	h.postSend(p.a, w)
	h.expectCQE(p.acq, 3, uapi.GOHFI_WC_REM_ACCESS_ERR, 0, chip.VendorErrState)
	h.expectCQE(p.bcq, 2, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_LOCAL_INV, chip.VendorErrNone)
	got := h.read(base, 1<<20)
	if written >= 1<<20 || !bytes.Equal(got[:written], src[:written]) {
		t.Fatalf("%d bytes written before the invalidation, or they differ", written)
	}
	if !bytes.Equal(got[written:], make([]byte, 1<<20-written)) {
		t.Fatal("packets after the invalidation were written")
	}
}

// TestFastRegReadsPageListInOrder: the device reads the page list when it
// reaches the FAST_REG_MR, not when it is posted: a list changed while the
// WQE waits behind a SEND stalled on RNR binds the changed pages.
func TestFastRegReadsPageListInOrder(t *testing.T) {
	p := newPair(t, 64<<10)
	h := p.h
	m := h.allocFR(3, 1, 1)
	x, y := h.alloc(4096), h.alloc(4096)
	pl := h.pageList(x)
	h.postSend(p.a, sendWQE(1, uapi.GOHFI_WR_SEND, sge(p.local, 0, 8)))
	h.postSend(p.a, regWQE(2, m, 1, pl, 1, 12, frVA, 4096, allAccess))
	h.d.waitIdle()
	if e := h.mpt(3); e.Flags&chip.MPTStateMask != chip.MPTStateFree {
		t.Fatal("FAST_REG_MR ran before the SEND ahead of it")
	}
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], y)
	h.write(pl, b[:])
	h.postRecv(p.b, recvWQE(9, sge(p.remote, 0, 8)))
	h.expectCQE(p.acq, 1, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_SEND, chip.VendorErrNone)
	h.expectCQE(p.acq, 2, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_REG_MR, chip.VendorErrNone)
	ent := h.d.mtt.load64(uint64(m.mttFirst) * chip.MTTEntrySize)
	if ent&chip.MTTAddrMask != y {
		t.Fatalf("MTT entry %#x, want page %#x", ent, y)
	}
}
