package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"github.com/gohfi/gohfi/internal/testenv"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/uapi"
)

// hfictl runs the command in-process with stdin.
func hfictl(t *testing.T, stdin string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = run(args, strings.NewReader(stdin), &out, &errb)
	return code, out.String(), errb.String()
}

// jsonLines decodes one JSON object per output line.
func jsonLines(t *testing.T, out string) []map[string]any {
	t.Helper()
	var objs []map[string]any
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("output line %q is not a JSON object: %v", sc.Text(), err)
		}
		objs = append(objs, m)
	}
	return objs
}

// num reads a JSON number at a dotted path.
func num(t *testing.T, m map[string]any, path string) float64 {
	t.Helper()
	var v any = m
	for _, k := range strings.Split(path, ".") {
		mm, ok := v.(map[string]any)
		if !ok {
			t.Fatalf("%s: not an object at %q in %v", path, k, m)
		}
		v = mm[k]
	}
	f, ok := v.(float64)
	if !ok {
		t.Fatalf("%s = %v (%T), want a number, in %v", path, v, v, m)
	}
	return f
}

func countFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// checkNoLeaks fails if fds or goroutines outlive a test's commands.
func checkNoLeaks(t *testing.T) {
	fds, gs := countFDs(t), runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for (runtime.NumGoroutine() > gs || countFDs(t) > fds) && time.Now().Before(deadline) {
			runtime.Gosched() // closed clients' goroutines may still be returning
		}
		if got := countFDs(t); got > fds {
			t.Errorf("fds %d -> %d", fds, got)
		}
		if got := runtime.NumGoroutine(); got > gs {
			buf := make([]byte, 1<<16)
			t.Errorf("goroutines %d -> %d\n%s", gs, got, buf[:runtime.Stack(buf, true)])
		}
	})
}

func TestInfoJSON(t *testing.T) {
	hfictl(t, "", "info") // warm up state created once per process
	checkNoLeaks(t)
	code, out, errs := hfictl(t, "", "--json", "--contexts", "4", "--rcvarray", "256", "info")
	if code != 0 {
		t.Fatalf("exit %d, stderr %q", code, errs)
	}
	objs := jsonLines(t, out)
	if len(objs) != 1 {
		t.Fatalf("%d JSON objects, want 1: %q", len(objs), out)
	}
	m := objs[0]
	if m["cmd"] != "info" || m["spec"] != "embedded" {
		t.Fatalf("cmd/spec: %v", m)
	}
	for path, want := range map[string]float64{
		"device.num_contexts": 4, "device.rcvarray_per_ctxt": 256, "device.vendor_id": chip.PCIVendorID,
		"device.device_id": chip.PCIDeviceID, "device.max_tid_pages": 512,
		"attr.num_contexts": 4, "attr.vendor_id": chip.PCIVendorID, "attr.vendor_part_id": chip.PCIDeviceID,
		"attr.rcvarray_entries": 256, "params.rcv_hdr_cnt": 256, "params.eager_buffer_size": 16384,
	} {
		if got := num(t, m, path); got != want {
			t.Errorf("%s = %v, want %v", path, got, want)
		}
	}
}

// TestInfoHuman: without --json, "key: value" lines whose values line up
// within a section.
func TestInfoHuman(t *testing.T) {
	code, out, errs := hfictl(t, "", "info")
	if code != 0 {
		t.Fatalf("exit %d, stderr %q", code, errs)
	}
	if strings.Contains(out, "{") {
		t.Fatalf("JSON in human output:\n%s", out)
	}
	col := map[string]int{} // indent -> value column
	for _, line := range strings.Split(strings.TrimRight(out, "\n"), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			t.Fatalf("line %q is not key: value", line)
		}
		if v == "" {
			col = map[string]int{} // a new section
			continue
		}
		indent := k[:len(k)-len(strings.TrimLeft(k, " "))]
		at := len(line) - len(strings.TrimLeft(v, " "))
		if c, seen := col[indent]; seen && c != at {
			t.Fatalf("value of %q at column %d, others at %d:\n%s", k, at, c, out)
		}
		col[indent] = at
	}
	if !strings.Contains(out, "vendor_id:") || !strings.Contains(out, "0x1de5") {
		t.Fatalf("no hexadecimal vendor id:\n%s", out)
	}
}

// TestShellSendPoll: two contexts in one shell, an eager send from the
// first to the second, poll and recv on the second.
func TestShellSendPoll(t *testing.T) {
	checkNoLeaks(t)
	script := `
# the default file gets context 0
assign-ctxt
open rx          # a second open file, now current
assign-ctxt
ctxt-info
alloc payload 8k
fill payload rand:3 --len 5000
use default
send eager rx 5000 --buf payload --tag 0x42
use rx
poll --timeout 5s
recv
`
	code, out, errs := hfictl(t, script, "--json", "--contexts", "2", "shell")
	if code != 0 {
		t.Fatalf("exit %d, stderr %q, stdout:\n%s", code, errs, out)
	}
	objs := jsonLines(t, out)
	var cmds []string
	for _, o := range objs {
		cmds = append(cmds, o["cmd"].(string))
	}
	want := "assign-ctxt open assign-ctxt ctxt-info alloc fill use send use poll recv"
	if got := strings.Join(cmds, " "); got != want {
		t.Fatalf("results %q, want %q", got, want)
	}
	if c0, c1 := num(t, objs[0], "ctxt"), num(t, objs[2], "ctxt"); c0 != 0 || c1 != 1 {
		t.Fatalf("contexts %v and %v, want 0 and 1", c0, c1)
	}
	ci := objs[3]
	if num(t, ci, "ctxt") != 1 || num(t, ci, "rcvhdrq_entsize") != uapi.SizeofGohfiRHQEntry || num(t, ci, "rcvtids") != 2048 {
		t.Fatalf("ctxt-info %v", ci)
	}
	send, poll, recv := objs[7], objs[9], objs[10]
	if num(t, send, "dst_ctxt") != 1 || num(t, send, "length") != 5000 {
		t.Fatalf("send %v", send)
	}
	if ev := uint64(num(t, poll, "revents")); ev&driver.POLLIN == 0 || poll["timed_out"] != false {
		t.Fatalf("poll %v, want POLLIN", poll)
	}
	if recv["type"] != "eager" || num(t, recv, "src_ctxt") != 0 || num(t, recv, "length") != 5000 || num(t, recv, "tag") != 0x42 {
		t.Fatalf("recv %v", recv)
	}
	if num(t, recv, "checksum") != num(t, send, "checksum") || num(t, send, "checksum") != num(t, objs[5], "checksum") {
		t.Fatalf("checksums: filled %v, sent %v, received %v", objs[5]["checksum"], send["checksum"], recv["checksum"])
	}
}

func TestErrorsGiveErrno(t *testing.T) {
	cases := []struct {
		args  []string
		errno string
	}{
		{[]string{"ctxt-info"}, "EINVAL"}, // no context assigned
		{[]string{"assign-ctxt", "--userversion", "0x50000"}, "ENODEV"},
		{[]string{"no-such-command"}, "EINVAL"},
		{[]string{"send", "eager"}, "EINVAL"},
		{[]string{"checksum", "nobuf"}, "ENOENT"},
		{[]string{"recv"}, "EINVAL"},
	}
	for _, c := range cases {
		code, out, errs := hfictl(t, "", append([]string{"--json", "--contexts", "2"}, c.args...)...)
		if code == 0 {
			t.Errorf("%v: exit 0", c.args)
			continue
		}
		objs := jsonLines(t, out)
		if len(objs) != 1 || objs[0]["errno"] != c.errno || objs[0]["error"] == "" {
			t.Errorf("%v: %q (stderr %q), want one error object with errno %s", c.args, out, errs, c.errno)
		}
		code, _, errs = hfictl(t, "", append([]string{"--contexts", "2"}, c.args...)...)
		if code == 0 || !strings.Contains(errs, "("+c.errno+")") {
			t.Errorf("%v without --json: exit %d, stderr %q", c.args, code, errs)
		}
	}
	if code, _, _ := hfictl(t, "", "--no-such-flag", "info"); code != 2 {
		t.Errorf("bad global flag: exit %d, want 2", code)
	}
}

// failWriter fails every write, as a full disk would.
type failWriter struct{}

func (failWriter) Write([]byte) (int, error) { return 0, syscall.ENOSPC }

// TestResultNotWritten: a result that cannot be written fails the run,
// with --json or without, and so does help.
func TestResultNotWritten(t *testing.T) {
	for _, args := range [][]string{{"--json", "get-vers"}, {"get-vers"}, {"help"}} {
		var errb bytes.Buffer
		if code := run(args, strings.NewReader(""), failWriter{}, &errb); code != 1 || !strings.Contains(errb.String(), "no space left") {
			t.Errorf("%v into a failing stdout: exit %d, stderr %q; want 1 and the write error", args, code, errb.String())
		}
	}
}

// TestShellContinuesOrStops: a failed line is reported, later lines still
// run, and the exit status says something failed; --stop-on-error stops.
func TestShellContinuesOrStops(t *testing.T) {
	script := "get-vers\nctxt-reset\nalloc a 4096\n'unterminated\nget-vers\n"
	code, out, _ := hfictl(t, script, "--json", "shell")
	objs := jsonLines(t, out)
	if code != 1 || len(objs) != 5 {
		t.Fatalf("exit %d, %d results, want 1 and 5:\n%s", code, len(objs), out)
	}
	if objs[1]["errno"] != "EINVAL" || num(t, objs[1], "line") != 2 || objs[3]["errno"] != "EINVAL" {
		t.Fatalf("errors %v %v", objs[1], objs[3])
	}
	if num(t, objs[4], "version") != uapi.HFI1_USER_SWVERSION {
		t.Fatalf("last result %v", objs[4])
	}
	code, out, _ = hfictl(t, script, "--json", "shell", "--stop-on-error")
	if objs := jsonLines(t, out); code != 1 || len(objs) != 2 {
		t.Fatalf("--stop-on-error: exit %d, %d results, want 1 and 2:\n%s", code, len(objs), out)
	}
}

// TestBuffers: fill, checksum, munmap keeps the name and makes access fail
// with EFAULT (hfictl's own check and the driver's copy_from_user), free
// forgets it.
func TestBuffers(t *testing.T) {
	checkNoLeaks(t)
	script := `
alloc a 3000
alloc m 8k --memfd
fill a text:abc
checksum a --len 3
fill m 0xff --offset 4096
assign-ctxt
munmap m
checksum m
send eager 0 16 --buf m
buffers
free m
checksum m
`
	code, out, errs := hfictl(t, script, "--json", "--contexts", "1", "shell")
	if code != 1 {
		t.Fatalf("exit %d, want 1; stderr %q", code, errs)
	}
	objs := jsonLines(t, out)
	if len(objs) != 12 {
		t.Fatalf("%d results:\n%s", len(objs), out)
	}
	if num(t, objs[0], "size") != 3000 || num(t, objs[0], "mapped_len") != 4096 || objs[1]["memfd"] != true {
		t.Fatalf("alloc %v %v", objs[0], objs[1])
	}
	// CRC-32C of "abc".
	if num(t, objs[3], "checksum") != 0x364b3fb7 {
		t.Fatalf("checksum of abc: %v", objs[3])
	}
	if objs[6]["mapped"] != false || objs[7]["errno"] != "EFAULT" || objs[8]["errno"] != "EFAULT" {
		t.Fatalf("after munmap: %v / %v / %v", objs[6], objs[7], objs[8])
	}
	if objs[11]["errno"] != "ENOENT" {
		t.Fatalf("after free: %v", objs[11])
	}
}

// TestTidCommands: TID_UPDATE, TID_FREE and TID_INVAL_READ through their
// hfi1_tid_info, with the TID lists in user memory.
func TestTidCommands(t *testing.T) {
	script := `
assign-ctxt
alloc r 96k
tid-update r
tid-inval-read
stats
tid-free r
stats
`
	code, out, errs := hfictl(t, script, "--json", "--contexts", "1", "shell")
	objs := jsonLines(t, out)
	if code != 0 || len(objs) != 7 {
		t.Fatalf("exit %d, stderr %q:\n%s", code, errs, out)
	}
	upd := objs[2]
	// 96 KiB = 24 pages: power-of-two TIDs of 16 and 8 pages when
	// physically contiguous, else smaller ones; 24 pages in all.
	tids, _ := upd["tids"].([]any)
	if num(t, upd, "length") != 96<<10 || num(t, upd, "tidcnt") != float64(len(tids)) || len(tids) == 0 {
		t.Fatalf("tid-update %v", upd)
	}
	pages := 0.0
	for _, x := range tids {
		pages += num(t, x.(map[string]any), "npages")
	}
	if pages != 24 {
		t.Fatalf("TIDs cover %v pages, want 24: %v", pages, upd)
	}
	if num(t, objs[3], "tidcnt") != 0 {
		t.Fatalf("tid-inval-read with nothing invalidated: %v", objs[3])
	}
	if num(t, objs[4], "tids_programmed") != float64(len(tids)) || num(t, objs[4], "pages_pinned") != 24 {
		t.Fatalf("stats after update: %v", objs[4])
	}
	if num(t, objs[5], "tidcnt") != float64(len(tids)) || num(t, objs[6], "tids_freed") != float64(len(tids)) ||
		num(t, objs[6], "pages_unpinned") != 24 {
		t.Fatalf("tid-free %v, stats %v", objs[5], objs[6])
	}
}

func TestSplitLine(t *testing.T) {
	for in, want := range map[string]string{
		"  send eager 1 64  ":      "send|eager|1|64",
		"fill a 'text:a b' # note": "fill|a|text:a b",
		"# only a comment":         "",
		`fill a "text:x#y"`:        "fill|a|text:x#y",
		"fill a text:x#y":          "fill|a|text:x#y",
		"poll\t--timeout=1s":       "poll|--timeout=1s",
	} {
		got, err := splitLine(in)
		if err != nil || strings.Join(got, "|") != want {
			t.Errorf("splitLine(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := splitLine(`fill a "open`); err == nil {
		t.Error("unterminated quote accepted")
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int{"4096": 4096, "0x1000": 4096, "64k": 64 << 10, "2M": 2 << 20, "1G": 1 << 30} {
		if got, err := parseSize("size", in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "k", "-1", "12q"} {
		if _, err := parseSize("size", in); err == nil {
			t.Errorf("parseSize(%q) accepted", in)
		}
	}
}

// TestExternalHfisim: hfictl against a separately started hfisim process,
// which stops cleanly on SIGTERM and removes its socket.
func TestExternalHfisim(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
		_, err = os.Stat(goTool)
	}
	testenv.Require(t, err, "go tool")
	dir := t.TempDir()
	bin := filepath.Join(dir, "hfisim")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if out, err := exec.CommandContext(ctx, goTool, "build", "-o", bin, "github.com/gohfi/gohfi/tools/hfisim").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	sock := filepath.Join(dir, "hfi.sock")
	var simErr bytes.Buffer
	sim := exec.Command(bin, "--socket", sock, "--contexts", "3")
	sim.Stderr = &simErr
	if err := sim.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- sim.Wait() }()
	stopped := false
	defer func() {
		if !stopped {
			sim.Process.Kill()
			<-exited
		}
	}()

	deadline := time.Now().Add(10 * time.Second)
	for {
		if fi, err := os.Stat(sock); err == nil && fi.Mode()&os.ModeSocket != 0 {
			break
		}
		select {
		case err := <-exited:
			stopped = true
			t.Fatalf("hfisim exited early: %v\n%s", err, simErr.String())
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("no socket after 10 s\n%s", simErr.String())
		}
	}

	// Twice: the device process serves one client after another.
	for i := 0; i < 2; i++ {
		code, out, errs := hfictl(t, "", "--device", "vfio-user:"+sock, "--json", "info")
		if code != 0 {
			t.Fatalf("run %d: exit %d, stdout %q, stderr %q\nhfisim: %s", i, code, out, errs, simErr.String())
		}
		m := jsonLines(t, out)[0]
		if m["spec"] != "vfio-user:"+sock || num(t, m, "device.num_contexts") != 3 || num(t, m, "attr.vendor_id") != chip.PCIVendorID {
			t.Fatalf("info over vfio-user: %v", m)
		}
	}
	code, out, errs := hfictl(t, "assign-ctxt\nopen b\nassign-ctxt\nuse default\nsend eager b 64\nuse b\npoll --timeout 5s\nrecv\n",
		"--device", "vfio-user:"+sock, "--json", "shell")
	if code != 0 {
		t.Fatalf("shell over vfio-user: exit %d, stderr %q\n%s", code, errs, out)
	}

	if os.Geteuid() == 0 { // REG_MR pins through io_uring
		code, out, errs = hfictl(t, docScript(t, "TestDocRDMAWrite"), "--device", "vfio-user:"+sock, "--json", "shell")
		objs := jsonLines(t, out)
		if code != 0 || num(t, last(t, objs, "checksum"), "checksum") != num(t, last(t, objs, "fill"), "checksum") {
			t.Fatalf("RDMA WRITE script over vfio-user: exit %d, stderr %q\n%s", code, errs, out)
		}
	}

	if os.Geteuid() == 0 { // REG_MR and TID_UPDATE pin through io_uring
		// The bench's rows for both devices side by side.
		paths := []string{"embedded", "vfio-user:" + sock}
		m := benchRun(t, "all", "--paths", strings.Join(paths, ","), "--size", "4k", "--iters", "2", "--runs", "1", "--mem", "anon")
		checkPerfRows(t, objects(t, m, "bw"), paths, benchOps, []string{"anon"}, []string{"4KiB"}, bwFields, 2)
		checkPerfRows(t, objects(t, m, "lat"), paths, benchOps, []string{"anon"}, []string{"4KiB"}, latFields, 2)
	}

	if err := sim.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		stopped = true
		if err != nil {
			t.Fatalf("hfisim after SIGTERM: %v\n%s", err, simErr.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("hfisim did not stop within 10 s of SIGTERM\n%s", simErr.String())
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket left behind: %v", err)
	}
}

// TestTidInvalidation: munmap of a registered buffer shows as POLLPRI and
// the TID_MMU_NOTIFY event bit; TID_INVAL_READ reports the TID and clears
// the bit; TID_FREE releases it. Bounded: a hang in the driver fails the
// test instead of stalling it.
func TestTidInvalidation(t *testing.T) {
	script := `
assign-ctxt
alloc r 64k
tid-update r
munmap r
poll --timeout 10s
events
tid-inval-read
events
tid-free r
`
	type result struct {
		code     int
		out, err string
	}
	done := make(chan result, 1)
	go func() {
		var out, errb bytes.Buffer
		code := run([]string{"--json", "--contexts", "1", "shell"}, strings.NewReader(script), &out, &errb)
		done <- result{code, out.String(), errb.String()}
	}()
	var r result
	select {
	case r = <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("the script did not finish within 30 s (driver hang?)")
	}
	objs := jsonLines(t, r.out)
	if r.code != 0 || len(objs) != 9 {
		t.Fatalf("exit %d, stderr %q:\n%s", r.code, r.err, r.out)
	}
	tid := objs[2]["tids"].([]any)[0].(map[string]any)["tid"]
	if ev := uint64(num(t, objs[4], "revents")); ev&driver.POLLPRI == 0 {
		t.Fatalf("poll after munmap: %v, want POLLPRI", objs[4])
	}
	if ev := uint64(num(t, objs[5], "events")); ev&uapi.HFI1_EVENT_TID_MMU_NOTIFY == 0 {
		t.Fatalf("events after munmap: %v", objs[5])
	}
	inv := objs[6]["tids"].([]any)
	if num(t, objs[6], "tidcnt") != 1 || inv[0].(map[string]any)["tid"] != tid || inv[0].(map[string]any)["buffer"] != "r" {
		t.Fatalf("tid-inval-read %v, want TID %v of r", objs[6], tid)
	}
	if ev := uint64(num(t, objs[7], "events")); ev&uapi.HFI1_EVENT_TID_MMU_NOTIFY != 0 {
		t.Fatalf("event bit still set after TID_INVAL_READ: %v", objs[7])
	}
	if num(t, objs[8], "tidcnt") != 1 {
		t.Fatalf("tid-free %v", objs[8])
	}
}

// TestPeer: the network port of an embedded device with --port: its
// address and GID, a peer added, shown and removed, the counters; and
// EOPNOTSUPP without a port.
func TestPeer(t *testing.T) {
	checkNoLeaks(t)
	code, out, errs := hfictl(t, "peer add 3 127.0.0.9:4791\npeer show\npeer del 3\npeer show\npeer add 0 127.0.0.9:4791\npeer add 1 [::1]:4791\n",
		"--json", "--port", "udp:127.0.0.1:0", "shell")
	if code != 1 {
		t.Fatalf("exit %d, want 1 (the last two commands fail): %s %s", code, out, errs)
	}
	objs := jsonLines(t, out)
	if len(objs) != 6 {
		t.Fatalf("%d results: %s", len(objs), out)
	}
	if objs[0]["gid"] != "0000:0000:0000:0000:0000:ffff:7f00:0009" {
		t.Errorf("peer add: %v", objs[0])
	}
	show := objs[1]
	if show["gid"] != "0000:0000:0000:0000:0000:ffff:7f00:0001" || !strings.HasPrefix(show["addr"].(string), "127.0.0.1:") {
		t.Errorf("own address: %v", show)
	}
	peers, _ := show["peers"].([]any)
	if len(peers) != 1 || peers[0].(map[string]any)["addr"] != "127.0.0.9:4791" || num(t, peers[0].(map[string]any), "peer") != 3 {
		t.Errorf("peers: %v", show["peers"])
	}
	if num(t, show, "counters.rx_packets") != 0 {
		t.Errorf("counters: %v", show["counters"])
	}
	if objs[3]["peers"] != nil {
		t.Errorf("peer del left %v", objs[3]["peers"])
	}
	for _, o := range objs[4:] {
		if o["errno"] != "EINVAL" {
			t.Errorf("bad peer: %v, want EINVAL", o)
		}
	}
	code, out, _ = hfictl(t, "", "--json", "peer", "show")
	if code != 1 || !strings.Contains(out, `"errno":"ENOTSUP"`) { // EOPNOTSUPP, as Linux names it too
		t.Errorf("peer show without a port: exit %d, %s", code, out)
	}
}
