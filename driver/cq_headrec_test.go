package driver_test

import (
	"encoding/binary"
	"sync"
	"testing"
	"time"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/internal/testenv"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/vfio"
)

// cqRegCounter is a vfio.Device that counts the driver's writes (posted or
// not) to CQ registers, by register of the CQ block, and keeps the last
// value written to each.
type cqRegCounter struct {
	vfio.Device
	mu     sync.Mutex
	writes map[uint64]int
	last   map[uint64]uint64
}

func (c *cqRegCounter) count(index uint32, off uint64, p []byte) {
	if index != chip.CSRBar || off < chip.CQBase || off >= chip.CQBase+chip.MaxCQs*chip.CQStride || len(p) != 8 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	r := (off - chip.CQBase) % chip.CQStride
	c.writes[r]++
	c.last[r] = binary.LittleEndian.Uint64(p)
}

func (c *cqRegCounter) WriteRegion(index uint32, off uint64, p []byte) error {
	c.count(index, off, p)
	return c.Device.WriteRegion(index, off, p)
}

func (c *cqRegCounter) WriteRegionPosted(index uint32, off uint64, p []byte) error {
	c.count(index, off, p)
	return c.Device.WriteRegionPosted(index, off, p)
}

func (c *cqRegCounter) get(r uint64) (int, uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.writes[r], c.last[r]
}

// TestCQHeadRecord: a CQ of 3 completions filled and drained 100 times (75
// wraps of its 4-entry ring). On a device with consumer-index records the
// driver programs CQHeadAddr and never writes CQHead after CREATE_CQ; on
// one without (an older revision) it writes CQHead as it consumes and never
// touches CQHeadAddr. Either way no completion is lost and nothing
// overflows.
func TestCQHeadRecord(t *testing.T) {
	testenv.RequireRoot(t, "io_uring pins")
	for _, c := range []struct {
		name string
		rec  bool
	}{{"record", true}, {"register", false}} {
		t.Run(c.name, func(t *testing.T) {
			cfg := smallSim(1)
			if !c.rec {
				// A revision 1.3 device: everything but the record.
				caps := chip.CapMSIX | chip.CapLoopback | chip.CapVerbs | chip.CapODP | chip.CapMemMgtExtensions |
					chip.CapDBRec | chip.CapImplicitODP | chip.CapDBRing
				cfg.RegOverride = map[uint64]uint64{chip.RegCapFlags: uint64(caps), chip.RegRevision: chip.MinRevision | 3}
			}
			ctr := &cqRegCounter{writes: map[uint64]int{}, last: map[uint64]uint64{}}
			a, err := openBehind(t, attach.DefaultOptions(), cfg, func(d vfio.Device) vfio.Device {
				ctr.Device = d
				return ctr
			})
			if err != nil {
				t.Fatal(err)
			}
			f := openFile(t, a)
			assign(t, f)
			cq, size, err := hfiuser.CreateCQ(f, 3, 0)
			if err != nil || size != 3 {
				t.Fatalf("CREATE_CQ of 3: size %d, %v", size, err)
			}
			r, err := hfiuser.CreateQP(f, uapi.GohfiCreateQP{QPType: uapi.GOHFI_QPT_RC, SendCQ: cq, RecvCQ: cq,
				MaxSendWR: 3, MaxRecvWR: 1, MaxSendSge: 1, MaxRecvSge: 1})
			if err != nil {
				t.Fatal(err)
			}
			q := rcQP{f: f, cq: cq, qp: r.Handle, qpn: r.QPNum, sendWR: 3}
			q.connect(t, q.qpn)
			buf := allocBuf(t, 1<<13, false)
			b := unsafeSlice(buf.Addr(), 1<<13)
			mr, err := hfiuser.RegMR(f, uintptrOf(b), uint64(len(b)), uint64(uintptrOf(b)), uapi.IB_ACCESS_LOCAL_WRITE|uapi.IB_ACCESS_REMOTE_WRITE)
			if err != nil {
				t.Fatal(err)
			}
			headsAtCreate, _ := ctr.get(chip.CQHead)
			wc := make([]uapi.GohfiWC, 3)
			id := uint64(0)
			for round := range 100 {
				wrs := make([]hfiuser.SendWR, 3)
				for i := range wrs {
					w := &wrs[i]
					w.SGL = []uapi.GohfiSge{{Addr: uint64(uintptrOf(b[64*i:])), Length: 8, Lkey: mr.Lkey}}
					w.WrID, w.Opcode, w.SendFlags = id+uint64(i), uapi.GOHFI_WR_RDMA_WRITE, uapi.GOHFI_SEND_SIGNALED
					w.RemoteAddr, w.Rkey = uint64(uintptrOf(b[4096+64*i:])), mr.Rkey
				}
				if bad, err := hfiuser.PostSend(f, q.qp, wrs); err != nil || bad != len(wrs) {
					t.Fatalf("round %d: POST_SEND: %d, %v", round, bad, err)
				}
				deadline := time.Now().Add(5 * time.Second)
				for got := 0; got < 3; {
					n, err := hfiuser.PollCQ(f, cq, wc[got:])
					if err != nil {
						t.Fatal(err)
					}
					for _, w := range wc[got : got+n] {
						if w.Status != uapi.GOHFI_WC_SUCCESS || w.WrID != id {
							t.Fatalf("round %d: completion %+v, want wr_id %d, success", round, w, id)
						}
						id++
					}
					if got += n; n == 0 && time.Now().After(deadline) {
						t.Fatalf("round %d: %d of 3 completions (ErrCntVerbs %d)", round, got,
							(&verbsEnv{a: a}).csr(t, chip.RegErrCntVerbs))
					}
					if n == 0 {
						time.Sleep(10 * time.Microsecond)
					}
				}
			}
			if n := (&verbsEnv{a: a}).csr(t, chip.RegErrCntVerbs); n != 0 {
				t.Fatalf("ErrCntVerbs %d", n)
			}
			heads, _ := ctr.get(chip.CQHead)
			addrs, addr := ctr.get(chip.CQHeadAddr)
			if c.rec {
				if heads != headsAtCreate || addrs != 1 || addr == 0 {
					t.Fatalf("with records: %d CQHead writes after CREATE_CQ, CQHeadAddr written %d times (last %#x); want 0, once, nonzero",
						heads-headsAtCreate, addrs, addr)
				}
			} else if heads-headsAtCreate < 100 || addrs != 0 {
				t.Fatalf("without records: %d CQHead writes for 300 completions, CQHeadAddr written %d times; want >= 100, 0",
					heads-headsAtCreate, addrs)
			}
		})
	}
}
