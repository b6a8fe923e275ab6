package main

import (
	"fmt"
	"github.com/gohfi/gohfi/internal/testenv"
	"strings"
	"testing"
)

// TestBenchTIDJSON runs bench tid with tiny counts and checks that the one
// JSON result has every row: it asserts shape, never speed.
func TestBenchTIDJSON(t *testing.T) {
	testenv.RequireRoot(t, "bench tid needs userfaultfd and io_uring pins")
	hfictl(t, "", "info") // warm up state created once per process
	checkNoLeaks(t)
	code, out, errs := hfictl(t, "", "--json", "bench", "tid", "--iters", "3", "--bw-msgs", "3", "--bw-buffers", "2")
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
	rows := func(key string) []map[string]any {
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
	bw := rows("bandwidth")
	var paths []string
	for _, r := range bw {
		paths = append(paths, r["path"].(string))
		if r["verified"] != true || num(t, r, "msgs") != 3 || num(t, r, "median_bw") <= 0 || num(t, r, "vs_memcpy") <= 0 {
			t.Errorf("bandwidth row %v", r)
		}
	}
	if got := strings.Join(paths, " "); got != "memcpy expected/memfd expected/anon" {
		t.Errorf("bandwidth paths %q", got)
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
		{"bench", "write", "--signal-every", "32"},
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

// TestBenchVerbsJSON runs bench write, read (bandwidth and latency) and
// reg with tiny counts and checks the rows' shape, never their speed.
func TestBenchVerbsJSON(t *testing.T) {
	testenv.RequireRoot(t, "REG_MR pins through io_uring")
	hfictl(t, "", "info") // warm up state created once per process
	checkNoLeaks(t)
	bwSizes := []string{"4KiB", "8KiB", "16KiB", "32KiB", "64KiB", "128KiB", "256KiB", "512KiB", "1MiB", "2MiB", "4MiB"}
	latSizes := []string{"8B", "16B", "32B", "64B", "128B", "256B", "512B", "1KiB", "2KiB", "4KiB", "8KiB", "16KiB", "32KiB", "64KiB"}
	for _, c := range []struct {
		args   []string
		sizes  []string
		fields []string
	}{
		{[]string{"write", "--iters", "2", "--runs", "1"}, bwSizes, []string{"bw", "msg_rate", "memcpy_bw", "vs_memcpy"}},
		{[]string{"read", "--iters", "2", "--runs", "1"}, bwSizes, []string{"bw", "msg_rate", "memcpy_bw", "vs_memcpy"}},
		{[]string{"write", "--lat", "--iters", "3"}, latSizes, []string{"p50_ns", "p99_ns", "memcpy_p50_ns"}},
		{[]string{"read", "--lat", "--iters", "3"}, latSizes, []string{"p50_ns", "p99_ns", "memcpy_p50_ns"}},
		{[]string{"reg", "--iters", "3"}, []string{"4KiB", "64KiB", "1MiB"}, []string{"reg_ns", "dereg_ns", "reg_dereg_ns", "reg_dereg_p90_ns"}},
	} {
		code, out, errs := hfictl(t, "", append([]string{"--json", "bench"}, c.args...)...)
		if code != 0 {
			t.Fatalf("%q: exit %d, stderr %q, stdout %q", c.args, code, errs, out)
		}
		objs := jsonLines(t, out)
		if len(objs) != 1 || objs[0]["cmd"] != "bench" || objs[0]["device"] != "embedded" {
			t.Fatalf("%q: %q", c.args, out)
		}
		m := objs[0]
		if c.args[0] != "reg" {
			mode := "bw"
			if c.args[1] == "--lat" {
				mode = "lat"
			}
			if m["op"] != c.args[0] || m["mode"] != mode {
				t.Errorf("%q: op %v mode %v", c.args, m["op"], m["mode"])
			}
		}
		rows, _ := m["rows"].([]any)
		if len(rows) != len(c.sizes) {
			t.Fatalf("%q: %d rows, want %d: %v", c.args, len(rows), len(c.sizes), m)
		}
		for i, e := range rows {
			r := e.(map[string]any)
			if r["size"] != c.sizes[i] || num(t, r, "bytes") <= 0 {
				t.Errorf("%q row %d: %v, want size %s", c.args, i, r, c.sizes[i])
			}
			if v, ok := r["verified"]; ok && v != true {
				t.Errorf("%q row %v: not verified", c.args, r)
			}
			for _, f := range c.fields {
				if num(t, r, f) <= 0 {
					t.Errorf("%q row %v: %s not positive", c.args, r, f)
				}
			}
		}
	}
}
