package hfisim

import (
	"bytes"
	"encoding/binary"
	"slices"
	"testing"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/vfio/vfiouser"
)

// copierDMA is the harness's host memory as a DMA that copies by itself,
// as the vfio-user server does between fd mappings: both ranges checked,
// then one copy. It records the copies.
type copierDMA struct {
	*hookDMA
	sizes []int
}

func (c *copierDMA) Copy(dst, src uint64, n int) error {
	f := c.fakeDMA
	f.mu.Lock()
	defer f.mu.Unlock()
	s, err := f.findLocked(src, n)
	if err != nil {
		return &vfiouser.CopyError{Err: err}
	}
	d, err := f.findLocked(dst, n)
	if err != nil {
		return &vfiouser.CopyError{Dst: true, Err: err}
	}
	copy(d, s)
	c.sizes = append(c.sizes, n)
	return nil
}

func (c *copierDMA) copies() []int {
	c.fakeDMA.mu.Lock()
	defer c.fakeDMA.mu.Unlock()
	return append([]int(nil), c.sizes...)
}

// TestVerbsMoverRuns: with a DMA that copies by itself, an RDMA WRITE of
// unaligned buffers moves each turn's packets (verbsBurst) in one copy, and the
// bytes arrive.
func TestVerbsMoverRuns(t *testing.T) {
	const pkts = verbsBurst + 4
	p := newPair(t, pkts*chip.VerbsMTU)
	h := p.h
	c := &copierDMA{hookDMA: h.dma}
	h.d.Attach(c)
	src := h.fill(p.local, 1)
	h.fill(p.remote, 2)
	w := sendWQE(1, uapi.GOHFI_WR_RDMA_WRITE, sge(p.local, 0, pkts*chip.VerbsMTU))
	w.RemoteAddr, w.Rkey = p.remote.va, p.remote.key()
	h.postSend(p.a, w)
	h.expectCQE(p.acq, 1, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
	if got := h.contents(p.remote); !bytes.Equal(got, src) {
		t.Fatal("RDMA WRITE: data differs")
	}
	want := []int{verbsBurst * chip.VerbsMTU, 4 * chip.VerbsMTU}
	if got := c.copies(); len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("copies %v, want %v (one per turn)", got, want)
	}
}

// TestVerbsMoverFault: a DMA that fails under packet k of an RDMA WRITE
// (its page maps to an IOVA the IOMMU refuses) is the failure of packet k,
// whichever side and whether the device copies by itself or stages: the
// packets before it are written, nothing from it on, and the requester
// completes with the error of that side.
func TestVerbsMoverFault(t *testing.T) {
	const pkts, k = verbsBurst + 4, verbsBurst + 2 // the fault is in the second turn
	for _, c := range []struct {
		name    string
		copier  bool
		remote  bool // the fault is in the responder's memory
		status  uint32
		bothErr bool
	}{
		{"staged/responder", false, true, uapi.GOHFI_WC_REM_ACCESS_ERR, true},
		{"staged/requester", false, false, uapi.GOHFI_WC_LOC_PROT_ERR, false},
		{"copier/responder", true, true, uapi.GOHFI_WC_REM_ACCESS_ERR, true},
		{"copier/requester", true, false, uapi.GOHFI_WC_LOC_PROT_ERR, false},
		{"copier/responder-first-turn", true, true, uapi.GOHFI_WC_REM_ACCESS_ERR, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			h := newVerbs(t)
			acq, bcq := h.newCQ(0, 64), h.newCQ(1, 64)
			a, b := h.newQP(0, 1, remoteAll, acq, acq), h.newQP(1, 1, remoteAll, bcq, bcq)
			h.connect(a, b)
			local := h.regMR(1, 1, allAccess, 0x7f00_0000_0000, pkts*chip.VerbsMTU)
			remote := h.regMR(2, 1, allAccess, 0x7e00_0000_0000, pkts*chip.VerbsMTU)
			if c.copier {
				h.d.Attach(&copierDMA{hookDMA: h.dma})
			}
			bad := uint64(k)
			if c.name == "copier/responder-first-turn" {
				bad = 5
			}
			src := h.fill(local, 1)
			before := h.fill(remote, 2)
			m := local
			if c.remote {
				m = remote
			}
			// Page bad of m: present in the MTT, unmapped in the IOMMU.
			h.bar4(uint64(m.entry.MTTFirst+uint32(bad))*chip.MTTEntrySize, 0x1_0000_0000|chip.MTTPresent|chip.MTTRead|chip.MTTWrite)
			faults := rd(t, h.d, chip.RegErrCntIOMMUFault)
			w := sendWQE(1, uapi.GOHFI_WR_RDMA_WRITE, sge(local, 0, pkts*chip.VerbsMTU))
			w.RemoteAddr, w.Rkey = remote.va, remote.key()
			h.postSend(a, w)
			h.expectCQE(acq, 1, c.status, 0, chip.VendorErrDMA)
			got := h.contents(remote)
			n := int(bad) * chip.VerbsMTU
			if !bytes.Equal(got[:n], src[:n]) {
				t.Errorf("the %d packets before the fault are not all written", bad)
			}
			from := n
			if c.remote {
				from += chip.VerbsMTU // the faulting page itself is elsewhere
			}
			if !bytes.Equal(got[from:], before[from:]) {
				t.Errorf("bytes from the faulting packet on were written")
			}
			if d := rd(t, h.d, chip.RegErrCntIOMMUFault) - faults; d != 1 {
				t.Errorf("ErrCntIOMMUFault +%d, want +1", d)
			}
			if c.bothErr {
				h.expectErr(a, b)
			} else {
				h.expectErr(a)
			}
		})
	}
}

// TestRHQSeqOffset: postRHQ writes the seq last at rhqSeqOff, which must be
// where struct gohfi_rhq_entry keeps it.
func TestRHQSeqOffset(t *testing.T) {
	var raw [uapi.SizeofGohfiRHQEntry]byte
	e := uapi.GohfiRHQEntry{Seq: 0xa1b2c3d4, Tag: ^uint64(0), TIDOffset: ^uint32(0)}
	e.MarshalBytes(raw[:])
	if got := binary.LittleEndian.Uint32(raw[rhqSeqOff:]); got != e.Seq {
		t.Fatalf("bytes at rhqSeqOff %#x, want the seq %#x", got, e.Seq)
	}
}

// TestVerbsBurstFairness: QPs take turns of at most verbsBurst packets, so
// 8 B RDMA WRITEs posted on one QP while another QP moves a 16 MiB RDMA
// WRITE all complete before the large one does (both QPs complete to one
// CQ, whose order says which finished first).
func TestVerbsBurstFairness(t *testing.T) {
	const size, host, smalls = 16 << 20, 1 << 20, 8
	h := newVerbs(t)
	cq, rcq := h.newCQ(0, 64), h.newCQ(1, 64)
	big, bigDst := h.newQP(0, 1, remoteAll, cq, rcq), h.newQP(1, 1, remoteAll, rcq, rcq)
	small, smallDst := h.newQP(2, 1, remoteAll, cq, rcq), h.newQP(3, 1, remoteAll, rcq, rcq)
	h.connect(big, bigDst)
	h.connect(small, smallDst)
	// The large WRITE's region: 16 MiB over 1 MiB of host memory mapped 16
	// times (the harness has 16 MiB in all), source and destination alike.
	iova, va := h.alloc(host), uint64(0x7f00_0000_0000)
	first := h.mttNext
	for i := uint64(0); i < size>>12; i++ {
		h.bar4(uint64(first+uint32(i))*chip.MTTEntrySize, (iova+i%(host>>12)<<12)|chip.MTTPresent|chip.MTTRead|chip.MTTWrite)
	}
	h.mttNext += size >> 12
	bigMR := &mr{idx: 1, va: va, length: size, iova: iova, entry: chip.MPTEntry{Key: 1<<8 | 0x5a, PD: 1,
		Flags: chip.MPTStateValid | allAccess<<chip.MPTAccessShift, MTTFirst: first, IOVA: va, Length: size}}
	h.writeMPT(bigMR.idx, bigMR.entry)
	local := h.regMR(2, 1, allAccess, 0x7e00_0000_0000, smalls*8)
	remote := h.regMR(3, 1, allAccess, 0x7d00_0000_0000, smalls*8)
	src := h.fill(local, 1)
	h.fill(remote, 2)

	// The small WRITEs are posted from the engine's first read of the
	// large WRITE's payload: the large one is in progress then.
	posted := make(chan struct{})
	fired := false // the engine's goroutine only
	h.dma.mu.Lock()
	h.dma.onRead = func(a uint64, _ int) {
		if fired || a < iova || a >= iova+host {
			return
		}
		fired = true
		for i := uint64(0); i < smalls; i++ {
			w := sendWQE(100+i, uapi.GOHFI_WR_RDMA_WRITE, sge(local, i*8, 8))
			w.RemoteAddr, w.Rkey = remote.va+i*8, remote.key()
			h.postSend(small, w)
		}
		close(posted)
	}
	h.dma.mu.Unlock()
	w := sendWQE(1, uapi.GOHFI_WR_RDMA_WRITE, sge(bigMR, 0, size))
	w.RemoteAddr, w.Rkey = bigMR.va, bigMR.key()
	h.postSend(big, w)
	<-posted
	for i := uint64(0); i < smalls; i++ {
		h.expectCQE(cq, 100+i, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
	}
	h.expectCQE(cq, 1, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
	if got := h.contents(remote); !bytes.Equal(got, src) {
		t.Fatal("8 B RDMA WRITEs: data differs")
	}
}

// TestPacketPieces: a move of several packets is cut where each packet
// begins in the message, whatever its IOVAs.
func TestPacketPieces(t *testing.T) {
	mv := move{dst: 0x10_0100, src: 0x20_0200, off: chip.VerbsMTU - 16, n: 2*chip.VerbsMTU + 32}
	var got []move
	for p := range packetPieces(mv) {
		got = append(got, p)
	}
	want := []move{
		{dst: 0x10_0100, src: 0x20_0200, off: chip.VerbsMTU - 16, n: 16},
		{dst: 0x10_0110, src: 0x20_0210, off: chip.VerbsMTU, n: chip.VerbsMTU},
		{dst: 0x10_0110 + chip.VerbsMTU, src: 0x20_0210 + chip.VerbsMTU, off: 2 * chip.VerbsMTU, n: chip.VerbsMTU},
		{dst: 0x10_0110 + 2*chip.VerbsMTU, src: 0x20_0210 + 2*chip.VerbsMTU, off: 3 * chip.VerbsMTU, n: 16},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("pieces %+v, want %+v", got, want)
	}
}
