package main

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"image/color"
	"image/png"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/gohfi/gohfi/internal/testenv"
)

// TestBenchTIDJSON runs bench tid with tiny counts and checks that the one
// JSON result has every row: it asserts shape, never speed.
func TestBenchTIDJSON(t *testing.T) {
	testenv.RequireRoot(t, "bench tid needs userfaultfd and io_uring pins")
	hfictl(t, "", "info") // warm up state created once per process
	checkNoLeaks(t)
	code, out, errs := hfictl(t, "", "--json", "bench", "tid", "--iters", "3")
	if code != 0 {
		t.Fatalf("exit %d, stderr %q, stdout %q", code, errs, out)
	}
	objs := jsonLines(t, out)
	if len(objs) != 1 {
		t.Fatalf("%d JSON objects, want 1: %q", len(objs), out)
	}
	m := objs[0]
	if m["cmd"] != "bench" || m["device"] != "embedded" {
		t.Fatalf("cmd/device: %v", m)
	}
	if got := num(t, m, "rcvarray_per_ctxt"); got != 2048 {
		t.Errorf("rcvarray_per_ctxt %v, want 2048", got)
	}
	num(t, m, "timer_overhead_ns")
	rows := func(key string) []map[string]any { t.Helper(); return objects(t, m, key) }
	sizes := []string{"4KiB", "64KiB", "1MiB", "16MiB"}
	seen := map[string]bool{}
	for _, r := range rows("latency") {
		key := fmt.Sprint(r["op"], "/", r["size"])
		if seen[key] {
			t.Errorf("latency row %s twice", key)
		}
		seen[key] = true
		if num(t, r, "n") != 3 {
			t.Errorf("latency %s: n %v, want 3", key, r["n"])
		}
		med, p90 := num(t, r, "median_ns"), num(t, r, "p90_ns")
		if med <= 0 || p90 < med {
			t.Errorf("latency %s: median %v, p90 %v", key, med, p90)
		}
		wantWin := 1.0
		if r["size"] == "16MiB" {
			wantWin = 2 // 4096 pages in windows of the context's 2048 entries
		}
		if num(t, r, "windows") != wantWin {
			t.Errorf("latency %s: windows %v, want %v", key, r["windows"], wantWin)
		}
	}
	for _, op := range []string{"hit", "miss", "free", "nocache"} {
		for _, s := range sizes {
			if !seen[op+"/"+s] {
				t.Errorf("no latency row %s/%s", op, s)
			}
		}
	}
	if len(seen) != 16 {
		t.Errorf("%d latency rows, want 16", len(seen))
	}
	ratios := rows("ratios")
	if len(ratios) != len(sizes) {
		t.Fatalf("%d ratio rows, want %d", len(ratios), len(sizes))
	}
	for i, r := range ratios {
		if r["size"] != sizes[i] || num(t, r, "miss_per_hit") <= 0 || num(t, r, "nocache_per_hit") <= 0 {
			t.Errorf("ratio row %v", r)
		}
	}
	targets := rows("targets")
	if len(targets) != len(sizes)+2 {
		t.Errorf("%d targets, want %d: %v", len(targets), len(sizes)+2, targets)
	}
	all := true
	for _, r := range targets {
		p, ok := r["pass"].(bool)
		if !ok {
			t.Errorf("target %v: pass is not a bool", r)
		}
		all = all && p
	}
	if m["pass"] != all {
		t.Errorf("pass %v, targets say %v", m["pass"], all)
	}
}

// TestBenchUsage: malformed bench invocations fail with EINVAL and attach
// nothing.
func TestBenchUsage(t *testing.T) {
	for _, args := range [][]string{
		{"bench"},
		{"bench", "mr"},
		{"bench", "write", "--tx-depth", "4", "--signal-every", "8"},
		{"bench", "write", "--qps", "0"},
		{"bench", "read", "-a", "--size", "4k"},
		{"bench", "send", "--mem", "hugetlb"},
		{"bench", "expected", "--mode", "pingpong"},
		{"bench", "all", "--lat", "--mode", "bw"},
		{"bench", "write", "--plot", "out.pdf"},
		{"bench", "write", "--wait", "spin"},
		{"bench", "write", "-e", "--wait", "poll,event"},
		{"bench", "reg", "--size", "0"},
		{"bench", "tid", "--sizes", "4k,3000"},
		{"bench", "tid", "--iters", "0"},
		{"--rcvarray", "4096", "bench", "tid"},
	} {
		code, out, _ := hfictl(t, "", append([]string{"--json"}, args...)...)
		objs := jsonLines(t, out)
		if code != 1 || len(objs) != 1 || objs[0]["errno"] != "EINVAL" {
			t.Errorf("%q: exit %d, output %q: want exit 1 and EINVAL", args, code, out)
		}
	}
}

// benchRun runs hfictl --json bench ARGS and returns its one result.
func benchRun(t *testing.T, args ...string) map[string]any {
	t.Helper()
	code, out, errs := hfictl(t, "", append([]string{"--json", "bench"}, args...)...)
	if code != 0 {
		t.Fatalf("bench %q: exit %d, stderr %q, stdout %q", args, code, errs, out)
	}
	objs := jsonLines(t, out)
	if len(objs) != 1 || objs[0]["cmd"] != "bench" {
		t.Fatalf("bench %q: %q", args, out)
	}
	return objs[0]
}

// objects reads a JSON array of objects.
func objects(t *testing.T, m map[string]any, key string) []map[string]any {
	t.Helper()
	list, ok := m[key].([]any)
	if !ok {
		t.Fatalf("%s: %T, want a list, in %v", key, m[key], m)
	}
	var r []map[string]any
	for _, e := range list {
		o, ok := e.(map[string]any)
		if !ok {
			t.Fatalf("%s element %v is not an object", key, e)
		}
		r = append(r, o)
	}
	return r
}

// checkPerfRows checks that rows hold one row per path, op, buffer kind
// and size, in that order, each with positive figures and every message
// checked: the shape, never the speed.
func checkPerfRows(t *testing.T, rows []map[string]any, paths, ops, mems, sizes []string, fields []string, checked float64) {
	t.Helper()
	var want, got []string
	for _, p := range paths {
		for _, op := range ops {
			for _, m := range mems {
				for _, s := range sizes {
					want = append(want, strings.Join([]string{p, op, m, s}, " "))
				}
			}
		}
	}
	for _, r := range rows {
		got = append(got, fmt.Sprint(r["path"], " ", r["op"], " ", r["mem"], " ", r["size"]))
		if num(t, r, "bytes") <= 0 || num(t, r, "checked") != checked {
			t.Errorf("row %v: want %v messages checked", r, checked)
		}
		for _, f := range fields {
			if num(t, r, f) <= 0 {
				t.Errorf("row %v: %s not positive", r, f)
			}
		}
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("rows\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

var (
	benchOps    = []string{"write", "read", "send", "expected"}
	bwFields    = []string{"qps", "iters", "bw", "msg_rate", "memcpy_bw", "vs_memcpy"}
	latFields   = []string{"n", "p50_ns", "p99_ns", "p999_ns", "memcpy_p50_ns"}
	bothMems    = []string{"anon", "memfd"}
	embeddedDev = []string{"embedded"}
)

// TestBenchAllJSON runs bench all with tiny counts on the embedded device,
// both modes and buffer kinds, several QPs and context pairs, and checks
// the rows and that the plot is a well-formed SVG and PNG.
func TestBenchAllJSON(t *testing.T) {
	testenv.RequireRoot(t, "REG_MR and TID_UPDATE pin through io_uring")
	hfictl(t, "", "info") // warm up state created once per process
	checkNoLeaks(t)
	dir := t.TempDir()
	svg, png := filepath.Join(dir, "perf.svg"), filepath.Join(dir, "perf.png")
	{
		m := benchRun(t, "all", "--size", "8,4k,64k", "--iters", "3", "--runs", "2", "--qps", "2",
			"--tx-depth", "4", "--signal-every", "2", "--plot", svg+","+png)
		if m["device"] != "embedded" || fmt.Sprint(m["plots"]) != fmt.Sprint([]any{svg, png}) || num(t, m, "qps") != 2 || num(t, m, "tx_depth") != 4 {
			t.Errorf("header %v", m)
		}
		sizes := []string{"8B", "4KiB", "64KiB"}
		checkPerfRows(t, objects(t, m, "bw"), embeddedDev, benchOps, bothMems, sizes, bwFields, 6)
		checkPerfRows(t, objects(t, m, "lat"), embeddedDev, benchOps, bothMems, sizes, latFields, 3)
		for _, r := range objects(t, m, "lat") {
			if num(t, r, "p99_ns") < num(t, r, "p50_ns") || num(t, r, "p999_ns") < num(t, r, "p99_ns") {
				t.Errorf("latency row %v: quantiles out of order", r)
			}
		}
		checkPlot(t, svg)
		checkPlot(t, png)
	}
}

// checkPlot decodes a plot file: an SVG document with drawing in it, or a
// PNG image of the canvas's size that is not blank.
func checkPlot(t *testing.T, file string) {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	switch filepath.Ext(file) {
	case ".svg":
		var doc struct {
			XMLName xml.Name
			Inner   []byte `xml:",innerxml"`
		}
		if err := xml.Unmarshal(data, &doc); err != nil {
			t.Fatalf("%s: not XML: %v", file, err)
		}
		if doc.XMLName.Local != "svg" || !bytes.Contains(doc.Inner, []byte("<path")) || !bytes.Contains(doc.Inner, []byte("memcpy")) {
			t.Fatalf("%s: root <%s>, %d bytes: want an svg with paths and a memcpy legend", file, doc.XMLName.Local, len(data))
		}
	case ".png":
		img, err := png.Decode(bytes.NewReader(data))
		if err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		b := img.Bounds()
		if b.Dx() < 400 || b.Dy() < 200 {
			t.Fatalf("%s: %v, too small", file, b)
		}
		colors := map[color.Color]bool{}
		for y := b.Min.Y; y < b.Max.Y; y += 4 {
			for x := b.Min.X; x < b.Max.X; x += 4 {
				colors[color.RGBAModel.Convert(img.At(x, y))] = true
			}
		}
		if len(colors) < 5 {
			t.Fatalf("%s: %d colours: blank", file, len(colors))
		}
	}
}

// TestBenchSizes: -a is every power of two from 8 B to 16 MiB; --lat and
// the default sizes.
func TestBenchSizes(t *testing.T) {
	testenv.RequireRoot(t, "REG_MR pins through io_uring")
	hfictl(t, "", "info")
	checkNoLeaks(t)
	var all []string
	for n := 8; n <= 16<<20; n *= 2 {
		all = append(all, sizeLabel(n))
	}
	m := benchRun(t, "write", "-a", "--iters", "2", "--runs", "1", "--mem", "memfd")
	if _, ok := m["lat"]; ok {
		t.Errorf("bench write printed latency rows: %v", m)
	}
	checkPerfRows(t, objects(t, m, "bw"), embeddedDev, []string{"write"}, []string{"memfd"}, all, bwFields, 2)
	m = benchRun(t, "send", "--lat", "--iters", "2", "--mem", "anon")
	checkPerfRows(t, objects(t, m, "lat"), embeddedDev, []string{"send"}, []string{"anon"},
		[]string{"8B", "4KiB", "64KiB", "1MiB", "16MiB"}, latFields, 2)
}

// TestBenchWait: --wait poll,event measures every row both ways, polling
// first; -e alone is event; every message checked either way.
func TestBenchWait(t *testing.T) {
	testenv.RequireRoot(t, "REG_MR pins through io_uring")
	hfictl(t, "", "info")
	checkNoLeaks(t)
	m := benchRun(t, "write", "--mode", "bw,lat", "--size", "8", "--iters", "3", "--runs", "1", "--wait", "poll,event")
	if fmt.Sprint(m["wait"]) != "[poll event]" {
		t.Errorf("wait %v, want [poll event]", m["wait"])
	}
	for _, mode := range []string{"bw", "lat"} {
		var got []string
		for _, r := range objects(t, m, mode) {
			got = append(got, fmt.Sprint(r["wait"], " ", r["mem"]))
			if num(t, r, "checked") != 3 {
				t.Errorf("%s row %v: want 3 messages checked", mode, r)
			}
		}
		if want := "poll anon,poll memfd,event anon,event memfd"; strings.Join(got, ",") != want {
			t.Errorf("%s rows %q, want %q", mode, got, want)
		}
	}
	m = benchRun(t, "send", "-e", "--lat", "--size", "8", "--iters", "3", "--mem", "memfd")
	for _, r := range objects(t, m, "lat") {
		if r["wait"] != "event" || num(t, r, "checked") != 3 {
			t.Errorf("-e: row %v, want wait event and 3 messages checked", r)
		}
	}
}

// TestBenchDataCheck: a message whose data differs from what was sent,
// is missing, or overruns its length fails the bench with EIO naming it,
// on every path. The device is made faulty through benchTamper, which
// sees the destination region after a round, before its check.
func TestBenchDataCheck(t *testing.T) {
	testenv.RequireRoot(t, "REG_MR and TID_UPDATE pin through io_uring")
	hfictl(t, "", "info")
	checkNoLeaks(t)
	const size = 100 // a slot is 128 bytes (verbs) or a page (expected) apart
	faults := map[string]func(dst []byte, stride int){
		"flip":    func(dst []byte, stride int) { dst[2*stride+size/2] ^= 0x40 },
		"drop":    func(dst []byte, stride int) { clear(dst[2*stride : 2*stride+size]) },
		"overrun": func(dst []byte, stride int) { dst[2*stride+size] = 1 },
	}
	for _, op := range benchOps {
		for name, fault := range faults {
			for _, mode := range []string{"bw", "lat"} {
				tampered := 0
				benchTamper = func(o string, dst []byte) {
					if o == op && tampered == 0 {
						tampered++
						fault(dst, len(dst)/4)
					}
				}
				code, out, _ := hfictl(t, "", "--json", "bench", op, "--mode", mode, "--size", "100", "--iters", "4",
					"--runs", "1", "--mem", "anon")
				benchTamper = nil
				objs := jsonLines(t, out)
				if code != 1 || len(objs) != 1 || objs[0]["errno"] != "EIO" || !strings.Contains(fmt.Sprint(objs[0]["error"]), "message 2 of a round of 4") {
					t.Errorf("%s %s %s: exit %d, %q: want EIO for message 2", op, mode, name, code, out)
				}
			}
		}
	}
	// Untampered, the same runs pass: the check itself is not what fails.
	for _, op := range benchOps {
		benchRun(t, op, "--mode", "bw,lat", "--size", "100", "--iters", "4", "--runs", "1", "--mem", "anon")
	}
}

// TestBenchExpectedRounds: a round of expected receives holds as many
// slots as the receiver's RcvArray entries allow with TIDs of up to
// max_tid_pages pages (a 1 MiB slot is one TID of 256 pages), not one
// entry per page: 16 messages of 1 MiB are one round, each checked.
func TestBenchExpectedRounds(t *testing.T) {
	testenv.RequireRoot(t, "TID_UPDATE pins through io_uring")
	var rounds []int
	benchTamper = func(op string, dst []byte) {
		if op == "expected" {
			rounds = append(rounds, len(dst))
		}
	}
	defer func() { benchTamper = nil }()
	m := benchRun(t, "expected", "--size", "1m", "--iters", "16", "--runs", "1", "--mem", "memfd")
	checkPerfRows(t, objects(t, m, "bw"), embeddedDev, []string{"expected"}, []string{"memfd"}, []string{"1MiB"}, bwFields, 16)
	if want := []int{16 << 20}; !slices.Equal(rounds, want) {
		t.Errorf("rounds of %v bytes, want %v", rounds, want)
	}
}

// TestBenchExpectedSmallMessages: thousands of 8 B expected receives in one
// round, busy polled, keep the receiver's header queue as full as the bench's
// flow control allows (RcvHdrHead is a posted register write): no message is
// lost or misplaced on its way, on either kind of buffer. Context doorbell
// records that let a SEND overtake the receiver's posted RcvHdrHead write
// failed this (packets dropped at a header queue the device thought full).
func TestBenchExpectedSmallMessages(t *testing.T) {
	testenv.RequireRoot(t, "TID_UPDATE pins through io_uring")
	checkNoLeaks(t)
	m := benchRun(t, "expected", "--size", "8", "--iters", "5000", "--runs", "2", "--wait", "poll", "--mem", "anon,memfd")
	checkPerfRows(t, objects(t, m, "bw"), embeddedDev, []string{"expected"}, []string{"anon", "memfd"}, []string{"8B"}, bwFields, 10000)
}
