package hfisim

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"testing"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
)

func TestVerbsRegistersAndCaps(t *testing.T) {
	h := newVerbs(t)
	d := h.d
	caps := rd(t, d, chip.RegCapFlags)
	if caps != chip.CapMSIX|chip.CapLoopback|chip.CapVerbs|chip.CapODP|chip.CapMemMgtExtensions|chip.CapDBRec|chip.CapImplicitODP|chip.CapDBRing|chip.CapCQHeadRec|chip.CapCtxtDBRec|chip.CapRHQHeadRec {
		t.Fatalf("CapFlags %#x: want MSI-X, loopback, verbs, ODP and fast registration, doorbell records, implicit ODP, the ring register, CQ head records, context doorbell records", caps)
	}
	for _, r := range []struct {
		reg  uint64
		want uint64
	}{
		{chip.RegMPTEntries, 64}, {chip.RegNumQPs, 8}, {chip.RegNumCQs, 8}, {chip.RegMaxQPWR, 16384},
		{chip.RegMaxCQE, 65536}, {chip.RegMaxSGE, 8}, {chip.RegMaxMsgSize, 1 << 30}, {chip.RegMaxFastRegPages, 4096},
	} {
		if got := rd(t, d, r.reg); got != r.want {
			t.Errorf("register %#x = %d, want %d", r.reg, got, r.want)
		}
	}
	ri, _, err := d.RegionInfo(chip.MTTBar)
	if err != nil {
		t.Fatal(err)
	}
	need := chip.MPTOffset(d.cfg.MTTEntries) + uint64(d.cfg.MPTEntries)*chip.MPTEntrySize
	if ri.Size < need || ri.Size&(ri.Size-1) != 0 {
		t.Fatalf("BAR4 %#x bytes: want a power of two holding MTT and MPT (%#x)", ri.Size, need)
	}
	for _, bad := range []func(*Config){
		func(c *Config) { c.MPTEntries = 0 },
		func(c *Config) { c.MPTEntries = chip.MaxMPTEntries + 1 },
		func(c *Config) { c.NumQPs = chip.MaxQPs + 1 },
		func(c *Config) { c.NumCQs = 0 },
		func(c *Config) { c.MaxQPWR = 1000 },
		func(c *Config) { c.MaxCQE = chip.MaxCQE * 2 },
		func(c *Config) { c.MaxSGE = chip.WQEMaxSGE + 1 },
	} {
		cfg := DefaultConfig()
		bad(&cfg)
		if d, err := New(cfg); err == nil {
			d.Close()
			t.Errorf("config %+v accepted", cfg)
		}
	}
}

// TestVerbsDataPaths moves messages of 1 B, 4 KiB and 1 MiB at unaligned
// region offsets that cross pages with every operation, and checks the
// bytes, the completions and the untouched neighbours.
func TestVerbsDataPaths(t *testing.T) {
	for _, size := range []uint64{1, 4096, 1 << 20} {
		for _, off := range []uint64{0, 0xffe} {
			t.Run(fmt.Sprintf("%d@%#x", size, off), func(t *testing.T) {
				p := newPair(t, size+0x2000)
				h := p.h
				src := h.fill(p.local, 1)
				h.fill(p.remote, 2)
				orig := h.contents(p.remote)
				n := uint32(size)

				// RDMA WRITE.
				w := sendWQE(1, uapi.GOHFI_WR_RDMA_WRITE, sge(p.local, off, n))
				w.RemoteAddr, w.Rkey = p.remote.va+off+1, p.remote.key()
				h.postSend(p.a, w)
				e := h.expectCQE(p.acq, 1, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
				if e.ByteLen != n || e.QPNum != p.a.qpn() {
					t.Fatalf("write CQE %+v", e)
				}
				want := append([]byte(nil), orig...)
				copy(want[off+1:], src[off:off+size])
				if got := h.contents(p.remote); !bytes.Equal(got, want) {
					t.Fatal("RDMA WRITE: remote memory wrong")
				}

				// SEND into two receive SGEs.
				h.fill(p.remote, 3)
				orig = h.contents(p.remote)
				half := n / 2
				h.postRecv(p.b, recvWQE(7, sge(p.remote, 5, half), sge(p.remote, 5+uint64(half)+100, n-half+10)))
				w = sendWQE(2, uapi.GOHFI_WR_SEND_WITH_IMM, sge(p.local, off, n))
				w.Imm = 0xdeadbeef
				h.postSend(p.a, w)
				h.expectCQE(p.acq, 2, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_SEND, 0)
				e = h.expectCQE(p.bcq, 7, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RECV, 0)
				if e.ByteLen != n || e.ImmData != 0xdeadbeef || e.WcFlags != uapi.GOHFI_WC_WITH_IMM || e.SrcQP != p.a.qpn() || e.QPNum != p.b.qpn() {
					t.Fatalf("recv CQE %+v", e)
				}
				want = append([]byte(nil), orig...)
				copy(want[5:], src[off:off+uint64(half)])
				copy(want[5+uint64(half)+100:], src[off+uint64(half):off+size])
				if got := h.contents(p.remote); !bytes.Equal(got, want) {
					t.Fatal("SEND: scattered receive wrong")
				}

				// RDMA WRITE with immediate consumes a receive WQE.
				h.postRecv(p.b, recvWQE(8))
				w = sendWQE(3, uapi.GOHFI_WR_RDMA_WRITE_WITH_IMM, sge(p.local, off, n))
				w.RemoteAddr, w.Rkey, w.Imm = p.remote.va+off, p.remote.key(), 0x01020304
				h.postSend(p.a, w)
				h.expectCQE(p.acq, 3, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_WRITE, 0)
				e = h.expectCQE(p.bcq, 8, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RECV_RDMA_WITH_IMM, 0)
				if e.ImmData != 0x01020304 || e.WcFlags&uapi.GOHFI_WC_WITH_IMM == 0 || e.ByteLen != n {
					t.Fatalf("write-with-imm CQE %+v", e)
				}
				if got := h.read(p.remote.host(p.remote.va+off), int(size)); !bytes.Equal(got, src[off:off+size]) {
					t.Fatal("RDMA WRITE with immediate: data wrong")
				}

				// RDMA READ back into other local bytes.
				rsrc := h.fill(p.remote, 9)
				lorig := h.contents(p.local)
				w = sendWQE(4, uapi.GOHFI_WR_RDMA_READ, sge(p.local, off+3, n))
				w.RemoteAddr, w.Rkey = p.remote.va+off, p.remote.key()
				h.postSend(p.a, w)
				e = h.expectCQE(p.acq, 4, uapi.GOHFI_WC_SUCCESS, uapi.GOHFI_WC_RDMA_READ, 0)
				want = append([]byte(nil), lorig...)
				copy(want[off+3:], rsrc[off:off+size])
				if got := h.contents(p.local); !bytes.Equal(got, want) {
					t.Fatal("RDMA READ: local memory wrong")
				}
				if e.ByteLen != n {
					t.Fatalf("read CQE %+v", e)
				}
			})
		}
	}
}

func TestVerbsAtomics(t *testing.T) {
	p := newPair(t, 0x3000)
	h := p.h
	target := (p.remote.va + 0x1000) &^ 7 // 8-byte aligned, in the second page
	if target%8 != 0 {
		t.Fatalf("target %#x not aligned", target)
	}
	put := func(v uint64) {
		var b [8]byte
		binary.LittleEndian.PutUint64(b[:], v)
		h.write(p.remote.host(target), b[:])
	}
	get := func(m *mr, va uint64) uint64 { return binary.LittleEndian.Uint64(h.read(m.host(va), 8)) }
	put(100)
	res := p.local.va + 0xff8 // result crosses no page: 8-byte aligned va
	atomic := func(id uint64, op uint8, cmp, swap uint64) {
		w := sendWQE(id, op, sge(p.local, res-p.local.va, 8))
		w.RemoteAddr, w.Rkey, w.CompareAdd, w.Swap = target, p.remote.key(), cmp, swap
		h.postSend(p.a, w)
		wc := uint32(uapi.GOHFI_WC_FETCH_ADD)
		if op == uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP {
			wc = uapi.GOHFI_WC_COMP_SWAP
		}
		h.expectCQE(p.acq, id, uapi.GOHFI_WC_SUCCESS, wc, 0)
	}
	atomic(1, uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD, 5, 0)
	if get(p.remote, target) != 105 || get(p.local, res) != 100 {
		t.Fatalf("fetch-add: target %d result %d", get(p.remote, target), get(p.local, res))
	}
	atomic(2, uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP, 7, 999) // no match
	if get(p.remote, target) != 105 || get(p.local, res) != 105 {
		t.Fatal("failed compare-swap changed the target")
	}
	atomic(3, uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP, 105, 999)
	if get(p.remote, target) != 999 || get(p.local, res) != 105 {
		t.Fatal("compare-swap did not swap")
	}
	// Misaligned: invalid request.
	w := sendWQE(4, uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD, sge(p.local, 0, 8))
	w.RemoteAddr, w.Rkey = target+4, p.remote.key()
	h.postSend(p.a, w)
	h.expectCQE(p.acq, 4, uapi.GOHFI_WC_REM_INV_REQ_ERR, 0, chip.VendorErrBadWQE)
	if get(p.remote, target) != 999 {
		t.Fatal("misaligned atomic changed memory")
	}
	if rd(t, h.d, chip.RegCntNAKInvReq) != 1 {
		t.Fatal("NAKInvReq not counted")
	}
}
