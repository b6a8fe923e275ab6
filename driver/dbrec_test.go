package driver_test

import (
	"context"
	"testing"
	"time"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/internal/testenv"
	"github.com/gohfi/gohfi/uapi"
)

// TestDBRecSleepBetweenStoreAndFlag forces the device through its way to
// sleep (set the notify flags, read the records again) exactly between
// POST_SEND's store of the producer index in the doorbell record and its
// load of the notify flag, on every post: no doorbell may be lost (the
// device's second read finds the index, or the driver sees the flag and
// rings the register), and every WRITE lands.
func TestDBRecSleepBetweenStoreAndFlag(t *testing.T) {
	testenv.RequireRoot(t, "io_uring pins")
	o := attach.DefaultOptions()
	o.Sim.NumContexts = 1
	a, err := attach.Open(context.Background(), "embedded", o)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	f := openFile(t, a)
	assign(t, f)
	q := newRCQP(t, f, 8, 1, false)
	q.connect(t, q.qpn)
	buf := allocBuf(t, 1<<16, false)
	b := unsafeSlice(buf.Addr(), 1<<16)
	mr, err := hfiuser.RegMR(f, uintptrOf(b), uint64(len(b)), uint64(uintptrOf(b)), uapi.IB_ACCESS_LOCAL_WRITE|uapi.IB_ACCESS_REMOTE_WRITE)
	if err != nil {
		t.Fatal(err)
	}
	if !driver.SetDBRecHook(f, q.qp, a.Sim.Device.SleepNow) {
		t.Fatal("the QP has no doorbell record")
	}
	wc := make([]uapi.GohfiWC, 1)
	for i := range 200 {
		src, dst := 64*(i%256), 32<<10+64*(i%256)
		for j := range 64 {
			b[src+j], b[dst+j] = byte(i+j), 0
		}
		w := hfiuser.SendWR{SGL: []uapi.GohfiSge{{Addr: uint64(uintptrOf(b[src:])), Length: 64, Lkey: mr.Lkey}}}
		w.WrID, w.Opcode, w.SendFlags = uint64(i), uapi.GOHFI_WR_RDMA_WRITE, uapi.GOHFI_SEND_SIGNALED
		w.RemoteAddr, w.Rkey = uint64(uintptrOf(b[dst:])), mr.Rkey
		if bad, err := hfiuser.PostSend(f, q.qp, []hfiuser.SendWR{w}); err != nil || bad != 1 {
			t.Fatalf("POST_SEND %d: %d, %v", i, bad, err)
		}
		deadline := time.Now().Add(5 * time.Second)
		for {
			n, err := hfiuser.PollCQ(f, q.cq, wc)
			if err != nil {
				t.Fatal(err)
			}
			if n == 1 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("WR %d: no completion: a doorbell was lost", i)
			}
			time.Sleep(10 * time.Microsecond)
		}
		if wc[0].Status != uapi.GOHFI_WC_SUCCESS || wc[0].WrID != uint64(i) {
			t.Fatalf("WR %d: %+v", i, wc[0])
		}
		for j := range 64 {
			if b[dst+j] != byte(i+j) {
				t.Fatalf("WR %d: byte %d is %d, want %d", i, j, b[dst+j], byte(i+j))
			}
		}
	}
}
