package fabric_test

import (
	"bytes"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/internal/testenv"
	"github.com/gohfi/gohfi/uapi"
)

// TestFabricFigures measures the closing figures of issue 13: bandwidth
// and latency of RDMA WRITE, READ and SEND from 4 KiB to 4 MiB between two
// QPs of one device (loopback), between two devices in namespaces on a
// veth pair, and the same at 1% loss (the tc program of lossy_test.go on
// both veth ends), and logs a table. It runs only with
// GOHFI_FABRIC_FIGURES=1 (a minute or more; its numbers are for people):
//
//	GOHFI_FABRIC_FIGURES=1 go test ./test/fabric -run TestFabricFigures -v
//
// Latency is one signaled message at a time, from POST_SEND to its
// completion, the poller sleeping in the file's poll (the p50 of up to 100).
// Bandwidth is a batch of up to 16 messages (16 MiB at most) posted at once,
// from the first post to the last completion (the median of the batches).
// Every message's data is checked after its timing, and the source filled
// anew before the next.
func TestFabricFigures(t *testing.T) {
	if os.Getenv("GOHFI_FABRIC_FIGURES") == "" {
		t.Skip("set GOHFI_FABRIC_FIGURES=1 to measure")
	}
	na, nb := twoNamespaces(t)
	x, y := attachNode(t, na), attachNode(t, nb)
	// The default transport attributes (timeout 14 = 67 ms).
	attr := driver.DefaultNetAttr
	const maxBatch = 16 << 20
	var rows []figure
	load0 := loadavg(t)
	start := time.Now()
	t.Run("loopback", func(t *testing.T) {
		e, o := newEP(t, x, maxBatch), newEP(t, x, maxBatch)
		connectEPs(t, e, o, 0, 0, attr)
		rows = append(rows, measureAll(t, "loopback", e, o, nil)...)
	})
	t.Run("netns", func(t *testing.T) {
		e, o := newEP(t, x, maxBatch), newEP(t, y, maxBatch)
		connectEPs(t, e, o, 1, 1, attr)
		rows = append(rows, measureAll(t, "netns", e, o, []*node{x, y})...)
	})
	t.Run("netns-loss1", func(t *testing.T) {
		for _, n := range []ns{na, nb} {
			l, err := attachLossy(n, 1, 0)
			testenv.Require(t, err, "a tc (TCX) program on "+n.dev)
			t.Cleanup(func() {
				if err := l.Close(); err != nil {
					t.Errorf("detach the lossy program of %s: %v", n.dev, err)
				}
			})
		}
		e, o := newEP(t, x, maxBatch), newEP(t, y, maxBatch)
		connectEPs(t, e, o, 1, 1, attr)
		rows = append(rows, measureAll(t, "netns 1% loss", e, o, []*node{x, y})...)
	})
	var b strings.Builder
	fmt.Fprintf(&b, "load average before: %s, after: %s; %v in all\n", load0, loadavg(t), time.Since(start).Round(time.Second))
	fmt.Fprintf(&b, "| %-13s | %-5s | %7s | %11s | %14s | %11s | %8s |\n", "path", "op", "size", "p50 latency", "bandwidth MB/s",
		"retransmits", "timeouts")
	fmt.Fprintf(&b, "|%s|%s|%s|%s|%s|%s|%s|\n", strings.Repeat("-", 15), strings.Repeat("-", 7), strings.Repeat("-", 9),
		strings.Repeat("-", 13), strings.Repeat("-", 16), strings.Repeat("-", 13), strings.Repeat("-", 10))
	for _, r := range rows {
		re, to := "-", "-"
		if r.net {
			re, to = fmt.Sprint(r.retransmits), fmt.Sprint(r.timeouts)
		}
		fmt.Fprintf(&b, "| %-13s | %-5s | %7s | %11v | %14.0f | %11s | %8s |\n", r.path, r.op, sizeName(r.size), r.p50.Round(time.Microsecond),
			r.mbps, re, to)
	}
	t.Log("\n" + b.String())
}

// figure is one row of the table.
type figure struct {
	path, op    string
	size        int
	p50         time.Duration
	mbps        float64
	net         bool
	retransmits uint64 // of both devices, while measuring
	timeouts    uint64
}

var figureSizes = []int{4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20}

func sizeName(n int) string {
	if n >= 1<<20 {
		return fmt.Sprintf("%d MiB", n>>20)
	}
	return fmt.Sprintf("%d KiB", n>>10)
}

// measureAll measures WRITE, READ and SEND from e to o at each size; devs
// are the devices whose retransmissions count.
func measureAll(t *testing.T, path string, e, o *ep, devs []*node) []figure {
	t.Helper()
	var rows []figure
	for _, op := range []string{"WRITE", "READ", "SEND"} {
		for _, n := range figureSizes {
			var re0, to0 uint64
			for _, d := range devs {
				c := counters(t, d)
				re0, to0 = re0+c["retransmits"], to0+c["timeouts"]
			}
			f := figure{path: path, op: op, size: n, net: devs != nil}
			var err error
			if f.p50, f.mbps, err = measure(e, o, op, n); err != nil {
				t.Fatalf("%s %s %d: %v", path, op, n, err)
			}
			for _, d := range devs {
				c := counters(t, d)
				f.retransmits, f.timeouts = f.retransmits+c["retransmits"], f.timeouts+c["timeouts"]
			}
			f.retransmits, f.timeouts = f.retransmits-re0, f.timeouts-to0
			rows = append(rows, f)
		}
	}
	return rows
}

// measure returns the p50 latency and the median bandwidth (MB/s) of op
// messages of n bytes from e to o.
func measure(e, o *ep, op string, n int) (time.Duration, float64, error) {
	batch := max(1, min(16, (e.sz-4096)/n))
	iters := max(5, min(100, (16<<20)/n))
	rounds := max(5, min(100, (32<<20)/(batch*n)))
	seed := byte(0)
	// one runs k messages of op (slots 0..k-1 of n bytes) and returns the
	// time from the first post to the last send completion.
	one := func(k int) (time.Duration, error) {
		seed++
		// Before the timing: fresh sources, cleared destinations, receives.
		var src, dst func(j int) []byte
		wrs := make([]driver.SendWR, k)
		for j := range k {
			off := j * n
			switch op {
			case "WRITE":
				src = func(j int) []byte { return e.area(areaSrc)[j*n : (j+1)*n] }
				dst = func(j int) []byte { return o.area(areaWrite)[j*n : (j+1)*n] }
				wrs[j] = driver.SendWR{WrID: uint64(j), Opcode: uapi.GOHFI_WR_RDMA_WRITE, SendFlags: sig,
					SGL: e.sge(areaSrc, off, n), RemoteAddr: o.addr(areaWrite, off), Rkey: o.mr.Rkey()}
			case "READ":
				src = func(j int) []byte { return o.area(areaReadSrc)[j*n : (j+1)*n] }
				dst = func(j int) []byte { return e.area(areaReadDst)[j*n : (j+1)*n] }
				wrs[j] = driver.SendWR{WrID: uint64(j), Opcode: uapi.GOHFI_WR_RDMA_READ, SendFlags: sig,
					SGL: e.sge(areaReadDst, off, n), RemoteAddr: o.addr(areaReadSrc, off), Rkey: o.mr.Rkey()}
			case "SEND":
				src = func(j int) []byte { return e.area(areaSrc)[j*n : (j+1)*n] }
				dst = func(j int) []byte { return o.area(areaRecv)[j*n : (j+1)*n] }
				wrs[j] = driver.SendWR{WrID: uint64(j), Opcode: uapi.GOHFI_WR_SEND, SendFlags: sig, SGL: e.sge(areaSrc, off, n)}
				if c, err := o.qp.PostRecv([]driver.RecvWR{{WrID: uint64(j), SGL: o.sge(areaRecv, off, n)}}); err != nil || c != 1 {
					return 0, fmt.Errorf("POST_RECV: %d, %v", c, err)
				}
			}
		}
		for j := range k {
			fill(src(j), seed+byte(j))
			clear(dst(j))
		}
		start := time.Now()
		if err := e.post(wrs...); err != nil {
			return 0, err
		}
		wcs, err := e.wait(k, roundWait)
		took := time.Since(start)
		if err != nil {
			return 0, err
		}
		// After the timing: completions and data.
		for j, wc := range wcs {
			if wc.Status != uapi.GOHFI_WC_SUCCESS || wc.WrID != uint64(j) {
				return 0, fmt.Errorf("completion %d of %d: %+v", j, k, wc)
			}
		}
		if op == "SEND" {
			rwcs, err := o.wait(k, roundWait)
			if err != nil {
				return 0, err
			}
			for j, wc := range rwcs {
				if wc.Status != uapi.GOHFI_WC_SUCCESS || wc.WrID != uint64(j) || int(wc.ByteLen) != n {
					return 0, fmt.Errorf("receive completion %d of %d: %+v", j, k, wc)
				}
			}
		}
		for j := range k {
			if !bytes.Equal(dst(j), src(j)) {
				return 0, fmt.Errorf("message %d of %d: data differs", j, k)
			}
		}
		return took, nil
	}
	lat := make([]time.Duration, 0, iters)
	for range iters {
		d, err := one(1)
		if err != nil {
			return 0, 0, err
		}
		lat = append(lat, d)
	}
	bw := make([]float64, 0, rounds)
	for range rounds {
		d, err := one(batch)
		if err != nil {
			return 0, 0, err
		}
		bw = append(bw, float64(batch*n)/d.Seconds()/1e6)
	}
	slices.Sort(lat)
	slices.Sort(bw)
	return lat[len(lat)/2], bw[len(bw)/2], nil
}

// loadavg is the first three fields of /proc/loadavg.
func loadavg(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b))
	return strings.Join(f[:min(3, len(f))], " ")
}
