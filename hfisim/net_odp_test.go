package hfisim

import (
	"bytes"
	"testing"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
)

// TestNetODPFault: ODP over the wire. B's region is ODP with nothing
// present; A's WRITE, READ and SEND (into a receive buffer in the region)
// fault at B's responder: EQEs naming B's key, QP and side, the access and
// what is left of the message; B answers RNR NAK until the fault is
// resumed, and the operations complete with the data in place. A's QP has
// rnr_retry 0: RNR NAKs for packets that take no receive WQE do not count
// against it. A fault resumed with an error ends the next retry with
// REM_ACCESS_ERR at A.
func TestNetODPFault(t *testing.T) {
	const size = 0x3000
	p := newNetPairAttr(t, 1, size, chip.QPNetAttrValue(12, 7, 0, 1))
	o := newODP(t, &pair{h: p.b}, 16)
	o.pages = 1 // one page per fault: a message faults page by page
	o.odp(p.mb)

	// The first fault is held until B has answered RNR NAK three times
	// (B's RNR timer: 10 us).
	release := make(chan struct{})
	o.fail = func(chip.EQE) bool {
		<-release
		return false
	}
	rnr0 := p.b.d.NetCounter(chip.NetCntRNRNAKs)
	src := p.a.fill(p.ma, 3)
	w := sendWQE(1, uapi.GOHFI_WR_RDMA_WRITE, sge(p.ma, 0, size))
	w.RemoteAddr, w.Rkey = p.mb.va, p.mb.key()
	p.a.postSend(p.qa, w)
	waitFor(t, "three RNR NAKs while the fault is pending", func() bool { return p.b.d.NetCounter(chip.NetCntRNRNAKs) >= rnr0+3 })
	close(release) // this fault and the later ones are resumed
	p.a.expectCQE(p.ca, 1, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
	if !bytes.Equal(p.b.contents(p.mb), src) {
		t.Fatal("WRITE into an ODP region across devices: data differs")
	}
	check := func(op string, write bool, wqe uint32, end uint64, pages int) {
		t.Helper()
		evs := o.taken()
		if len(evs) < pages {
			t.Fatalf("%s: %d faults for %d pages not present, want at least %d", op, len(evs), pages, pages)
		}
		for _, e := range evs {
			flags := uint8(chip.EQEFlagResponder)
			if write {
				flags |= chip.EQEFlagWrite
			}
			if e.Type != chip.EQETypePageFault || e.Flags != flags || e.Key != p.mb.key() || e.QP != uint32(p.qb.n) ||
				e.ReqQP != uint32(p.qb.n) || e.PD != 1 || e.WQE != wqe || e.VA < p.mb.va || e.VA >= end || e.FaultID == 0 {
				t.Fatalf("%s: EQE %+v, want responder fault of key %#x QP %d WQE %#x", op, e, p.mb.key(), p.qb.n, wqe)
			}
			if wqe == chip.EQEWQENone && uint64(e.Length) != end-e.VA {
				t.Fatalf("%s: EQE length %d at %#x, want the rest of the message %d", op, e.Length, e.VA, end-e.VA)
			}
		}
	}
	check("WRITE", true, chip.EQEWQENone, p.mb.va+size, 3)

	// READ: B's pages go again, A reads them back.
	o.zap(p.mb, p.mb.va, size)
	dst := p.b.fill(p.mb, 4)
	r := sendWQE(2, uapi.GOHFI_WR_RDMA_READ, sge(p.ma, 0, size))
	r.RemoteAddr, r.Rkey = p.mb.va, p.mb.key()
	p.a.postSend(p.qa, r)
	p.a.expectCQE(p.ca, 2, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_READ, 0)
	if !bytes.Equal(p.a.contents(p.ma), dst) {
		t.Fatal("READ from an ODP region across devices: data differs")
	}
	check("READ", false, chip.EQEWQENone, p.mb.va+size, 3)

	// SEND into a receive buffer in the region. The pages of its first
	// packet are present: an RNR NAK for a SEND's first packet is, on the
	// wire, the same as "no receive posted" and counts against rnr_retry
	// (0 here).
	o.zap(p.mb, p.mb.va, size)
	for va := p.mb.va &^ 0xfff; va < p.mb.va+netPMTU; va += 0x1000 {
		o.mapPage(p.mb, va, chip.MTTPresent|chip.MTTRead|chip.MTTWrite)
	}
	src = p.a.fill(p.ma, 5)
	p.b.postRecv(p.qb, recvWQE(9, sge(p.mb, 0, size)))
	p.a.postSend(p.qa, sendWQE(3, uapi.GOHFI_WR_SEND, sge(p.ma, 0, size)))
	p.a.expectCQE(p.ca, 3, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_SEND, 0)
	p.b.expectCQE(p.cb, 9, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RECV, 0)
	if !bytes.Equal(p.b.contents(p.mb), src) {
		t.Fatal("SEND into an ODP receive buffer across devices: data differs")
	}
	check("SEND", true, 0, p.mb.va+size, 2)
	if got := rd(t, p.b.d, chip.RegCntPageFaults); got == 0 || rd(t, p.b.d, chip.RegCntPFResumes) != got {
		t.Fatalf("B's counters: %d faults, %d resumes", got, rd(t, p.b.d, chip.RegCntPFResumes))
	}

	// A fault resumed with an error: REM_ACCESS_ERR at A, B's QP to ERR,
	// B's memory unchanged.
	o.zap(p.mb, p.mb.va, size)
	before := p.b.contents(p.mb)
	o.mu.Lock()
	o.fail = func(chip.EQE) bool { return true }
	o.mu.Unlock()
	p.a.fill(p.ma, 6)
	w.WrID = 4
	p.a.postSend(p.qa, w)
	p.a.expectCQE(p.ca, 4, uapi.GOHFI_WC_REM_ACCESS_ERR, 0, 0)
	if p.b.state(p.qb) != uapi.GOHFI_QPS_ERR {
		t.Fatal("B's QP not in ERR after its fault failed")
	}
	if !bytes.Equal(p.b.contents(p.mb), before) {
		t.Fatal("a WRITE whose fault failed changed memory")
	}
}
