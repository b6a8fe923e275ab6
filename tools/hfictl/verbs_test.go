package main

import (
	"os"
	"strings"
	"testing"

	"github.com/gohfi/gohfi/internal/testenv"
)

// docScript returns the shell input of the heredoc that follows the marker
// <!-- test: NAME --> in docs/hfictl.md.
func docScript(t *testing.T, name string) string {
	t.Helper()
	doc, err := os.ReadFile("../../docs/hfictl.md")
	if err != nil {
		t.Fatal(err)
	}
	_, after, ok := strings.Cut(string(doc), "<!-- test: "+name+" -->")
	if !ok {
		t.Fatalf("docs/hfictl.md has no <!-- test: %s --> marker", name)
	}
	_, body, ok := strings.Cut(after, " shell <<'EOF'\n") // hfictl [flags] shell
	if !ok {
		t.Fatalf("no hfictl shell <<'EOF' after the %s marker", name)
	}
	script, _, ok := strings.Cut(body, "\nEOF\n")
	if !ok {
		t.Fatalf("the %s heredoc has no EOF line", name)
	}
	return script + "\n"
}

// runScript runs a shell script with --json and returns the results by
// line, failing on any error unless wantFail.
func runScript(t *testing.T, script string, wantFail bool) []map[string]any {
	t.Helper()
	code, out, errs := hfictl(t, script, "--json", "shell")
	if (code != 0) != wantFail {
		t.Fatalf("exit %d, stderr %q, output:\n%s", code, errs, out)
	}
	return jsonLines(t, out)
}

// last returns the last result of command cmd.
func last(t *testing.T, objs []map[string]any, cmd string) map[string]any {
	t.Helper()
	for i := len(objs) - 1; i >= 0; i-- {
		if objs[i]["cmd"] == cmd {
			return objs[i]
		}
	}
	t.Fatalf("no %s result in %v", cmd, objs)
	return nil
}

// wcs returns poll-cq's completions.
func wcs(t *testing.T, poll map[string]any) []map[string]any {
	t.Helper()
	list, _ := poll["wcs"].([]any)
	var r []map[string]any
	for _, e := range list {
		r = append(r, e.(map[string]any))
	}
	if num(t, poll, "polled") != float64(len(r)) {
		t.Fatalf("poll-cq %v: polled and wcs differ", poll)
	}
	return r
}

// TestDocRDMAWrite runs the RDMA WRITE script of docs/hfictl.md as it
// stands there: the WRITE completes with success and the target's checksum
// is the source's.
func TestDocRDMAWrite(t *testing.T) {
	testenv.RequireRoot(t, "REG_MR pins through io_uring")
	checkNoLeaks(t)
	objs := runScript(t, docScript(t, "TestDocRDMAWrite"), false)
	send := last(t, objs, "post-send")
	wc := wcs(t, last(t, objs, "poll-cq"))
	if len(wc) != 1 || wc[0]["status"] != "success" || wc[0]["opcode"] != "rdma_write" ||
		num(t, wc[0], "byte_len") != 65536 || wc[0]["qp"] != "a" || num(t, wc[0], "wr_id") != num(t, send, "wr_id") {
		t.Fatalf("completions %v after %v", wc, send)
	}
	if got, want := num(t, last(t, objs, "checksum"), "checksum"), num(t, last(t, objs, "fill"), "checksum"); got != want || num(t, send, "checksum") != want {
		t.Fatalf("target checksum %#x, source %#x, post-send %v", uint64(got), uint64(want), send["checksum"])
	}
	for _, o := range objs {
		if o["cmd"] == "mr reg" && num(t, o, "pages_pinned") != 16 {
			t.Errorf("mr reg %v: want 16 pages pinned", o)
		}
	}
}

// connected is the doc script's setup without its WRITE: QPs a (default
// file) and b (file resp) connected, src_mr and dst_mr (remote write and
// read) registered.
const connected = `
alloc src 64k
alloc dst 64k
fill src rand:7
open resp
mr reg dst_mr dst --access local_write,remote_write,remote_read
cq create resp_cq
qp create b --cq resp_cq
use default
mr reg src_mr src
cq create cq
qp create a --cq cq
qp modify a --state init --access remote_write
qp modify a --state rtr --dest-qp b
qp modify a --state rts
qp modify b --state init --access remote_write,remote_read
qp modify b --state rtr --dest-qp a
qp modify b --state rts
`

// TestVerbsOps: RDMA READ into an offset of the source, SEND with
// immediate into a posted receive, WRITE with immediate consuming one, each
// with the completion fields and checksums a script compares.
func TestVerbsOps(t *testing.T) {
	testenv.RequireRoot(t, "REG_MR pins through io_uring")
	checkNoLeaks(t)
	objs := runScript(t, connected+`
fill dst rand:9 --offset 4096 --len 5000
post-send a --op read --sge src:1000:5000@src_mr --remote dst_mr:4096 --signaled --wr-id 77
poll-cq cq --wait 5s
checksum src --offset 1000 --len 5000
post-recv b --sge dst:0:100@dst_mr
post-send a --op send-imm --sge src:0:100@src_mr --imm 0x1234 --signaled
poll-cq cq --wait 5s
poll-cq resp_cq --wait 5s
post-recv b
post-send a --op write-imm --sge src:0:64@src_mr --remote dst_mr:8192 --imm 7
poll-cq resp_cq --wait 5s
qp show
cq show cq
`, false)
	var fills, sums, polls []map[string]any
	for _, o := range objs {
		switch o["cmd"] {
		case "fill":
			fills = append(fills, o)
		case "checksum":
			sums = append(sums, o)
		case "poll-cq":
			polls = append(polls, o)
		}
	}
	read := wcs(t, polls[0])
	if len(read) != 1 || read[0]["status"] != "success" || read[0]["opcode"] != "rdma_read" || num(t, read[0], "wr_id") != 77 {
		t.Fatalf("READ completion %v", read)
	}
	if num(t, sums[0], "checksum") != num(t, fills[1], "checksum") {
		t.Fatalf("READ: read %v, remote %v", sums[0], fills[1])
	}
	send, recv := wcs(t, polls[1]), wcs(t, polls[2])
	if len(send) != 1 || send[0]["opcode"] != "send" || len(recv) != 1 || recv[0]["opcode"] != "recv" ||
		num(t, recv[0], "byte_len") != 100 || num(t, recv[0], "imm_data") != 0x1234 || recv[0]["qp"] != "b" {
		t.Fatalf("SEND %v, RECV %v", send, recv)
	}
	if flags := uint64(num(t, recv[0], "wc_flags")); flags&2 == 0 {
		t.Fatalf("RECV with immediate: wc_flags %#x", flags)
	}
	wimm := wcs(t, polls[3])
	if len(wimm) != 1 || wimm[0]["opcode"] != "recv_rdma_with_imm" || num(t, wimm[0], "imm_data") != 7 {
		t.Fatalf("WRITE with immediate at the responder: %v", wimm)
	}
	qps, _ := last(t, objs, "qp show")["qps"].([]any)
	if len(qps) != 2 || qps[0].(map[string]any)["state"] != "rts" || num(t, qps[1].(map[string]any), "dest_qp") != num(t, qps[0].(map[string]any), "qpn") {
		t.Fatalf("qp show %v", qps)
	}
	if cq := last(t, objs, "cq show"); cq["name"] != "cq" || num(t, cq, "cqe") < 64 {
		t.Fatalf("cq show %v", cq)
	}
}

// TestVerbsErrors: a refused key completes with "remote access error" and
// flushes the next WR, the QP shows err and comes back through reset; a
// deregistered rkey is refused; the driver's and hfictl's errnos; close
// forgets the file's objects.
func TestVerbsErrors(t *testing.T) {
	testenv.RequireRoot(t, "REG_MR pins through io_uring")
	checkNoLeaks(t)
	objs := runScript(t, connected+`
post-send a --op write --sge src@src_mr --remote dst_mr --rkey 0x1234 --signaled
post-send a --op write --sge src@src_mr --remote dst_mr --signaled
poll-cq cq --wait 5s --min 2
qp show a
qp modify a --state reset
qp modify b --state reset
qp modify a --state init
qp modify b --state init
qp modify a --state rtr
qp modify b --state rtr
qp modify a --state rts
qp modify b --state rts
mr dereg dst_mr
post-send a --op write --sge src@src_mr --remote 0x1000 --rkey 0x101 --signaled
poll-cq cq --wait 5s
poll-cq cq --wait 10ms
mr reg bad src --access remote_write
mr reg src_mr src
mr show nosuch
qp modify a --state rtr
post-send b --op write
post-send nosuch --op send
cq destroy resp_cq
close resp
mr show
qp show
`, true)
	byLine := func(cmd string, n int) map[string]any { // the n-th result of cmd
		t.Helper()
		for _, o := range objs {
			if o["cmd"] == cmd {
				if n == 0 {
					return o
				}
				n--
			}
		}
		t.Fatalf("no result %d of %s", n, cmd)
		return nil
	}
	wc := wcs(t, byLine("poll-cq", 0))
	if len(wc) != 2 || wc[0]["status"] != "remote access error" || num(t, wc[0], "status_code") != 10 ||
		num(t, wc[0], "vendor_err") != 3 || wc[1]["status"] != "Work Request Flushed Error" {
		t.Fatalf("completions after a bad rkey: %v", wc)
	}
	if st := byLine("qp show", 0)["state"]; st != "err" {
		t.Fatalf("qp show after the error: state %v", st)
	}
	// After both ends are reset (the NAK moved the responder's QP to ERR
	// too) and reconnected, with dest_qp and access remembered, the
	// deregistered rkey is refused.
	wc = wcs(t, byLine("poll-cq", 1))
	if len(wc) != 1 || wc[0]["status"] != "remote access error" {
		t.Fatalf("WRITE to a deregistered rkey: %v", wc)
	}
	if p := byLine("poll-cq", 2); num(t, p, "polled") != 0 || p["timed_out"] != true {
		t.Fatalf("poll-cq with nothing to poll: %v", p)
	}
	errs := errnos(objs)
	want := []string{
		"mr reg EINVAL", // remote write without local write
		"mr reg EEXIST",
		"mr show ENOENT",
		"qp modify EINVAL", // RTS to RTR
		"post-send EINVAL", // a WRITE without --remote
		"post-send ENOENT",
		"cq destroy EBUSY", // b uses it
	}
	if strings.Join(errs, ", ") != strings.Join(want, ", ") {
		t.Errorf("errors %q, want %q", errs, want)
	}
	cl := last(t, objs, "close")
	if num(t, cl, "verbs_objects_released") != 2 {
		t.Fatalf("close resp: %v, want 2 released (resp_cq and b; dst_mr was deregistered)", cl)
	}
	mrs, _ := last(t, objs, "mr show")["mrs"].([]any)
	qps, _ := last(t, objs, "qp show")["qps"].([]any)
	if len(mrs) != 1 || len(qps) != 1 {
		t.Fatalf("after close: mrs %v, qps %v", mrs, qps)
	}
}

func TestWCStatusStr(t *testing.T) {
	for st, want := range map[uint32]string{
		0: "success", 4: "local protection error", 5: "Work Request Flushed Error", 10: "remote access error",
		12: "transport retry counter exceeded", 21: "general error", 99: "unknown",
	} {
		if got := wcStatusStr(st); got != want {
			t.Errorf("wcStatusStr(%d) = %q, want %q", st, got, want)
		}
	}
}

// TestVerbsAtomicOps: fetch-and-add and compare-and-swap by hand: the
// remote word changes as the verbs say and the original values land in the
// local SGEs (byte patterns so that fill and checksum can compare them).
func TestVerbsAtomicOps(t *testing.T) {
	testenv.RequireRoot(t, "REG_MR pins through io_uring")
	checkNoLeaks(t)
	objs := runScript(t, `
alloc src 4k
alloc dst 4k
alloc ones 4k
alloc twos 4k
fill src 0xee
fill ones 1
fill twos 2
open resp
mr reg dst_mr dst --access local_write,remote_atomic
cq create resp_cq
qp create b --cq resp_cq
use default
mr reg src_mr src
cq create cq
qp create a --cq cq
qp modify a --state init
qp modify a --state rtr --dest-qp b
qp modify a --state rts
qp modify b --state init --access remote_atomic
qp modify b --state rtr --dest-qp a
qp modify b --state rts
post-send a --op faa --sge src:0:8@src_mr --remote dst_mr --compare-add 0x0101010101010101 --signaled
poll-cq cq --wait 5s
post-send a --op cas --sge src:8:8@src_mr --remote dst_mr --compare-add 0x0101010101010101 --swap 0x0202020202020202 --signaled
poll-cq cq --wait 5s
checksum dst --len 8
checksum twos --len 8
checksum src --offset 8 --len 8
checksum ones --len 8
`, false)
	var polls, sums []map[string]any
	for _, o := range objs {
		switch o["cmd"] {
		case "poll-cq":
			polls = append(polls, o)
		case "checksum":
			sums = append(sums, o)
		}
	}
	faa, cas := wcs(t, polls[0]), wcs(t, polls[1])
	if len(faa) != 1 || faa[0]["status"] != "success" || faa[0]["opcode"] != "fetch_add" ||
		len(cas) != 1 || cas[0]["status"] != "success" || cas[0]["opcode"] != "comp_swap" {
		t.Fatalf("completions: faa %v, cas %v", faa, cas)
	}
	if num(t, sums[0], "checksum") != num(t, sums[1], "checksum") {
		t.Fatalf("remote word after FAA and CAS is not 0x0202...: %v", sums[0])
	}
	if num(t, sums[2], "checksum") != num(t, sums[3], "checksum") {
		t.Fatalf("CAS fetched %v, want the value FAA left (0x0101...)", sums[2])
	}
}

// TestDocODP runs the ODP script of docs/hfictl.md: register with --odp,
// a WRITE faults, advise-mr prefetches, munmap invalidates, the WRITE
// after it fails; mr show's counters say so.
func TestDocODP(t *testing.T) {
	testenv.RequireRoot(t, "ODP needs userfaultfd and io_uring pins")
	objs := runScript(t, docScript(t, "TestDocODP"), false)
	by := byCmd(objs)
	shows, polls := by["mr show"], by["poll-cq"]
	if len(shows) != 3 || len(polls) != 2 {
		t.Fatalf("%d mr show, %d poll-cq results", len(shows), len(polls))
	}
	if num(t, shows[0], "pages_pinned") != 0 || num(t, shows[0], "page_faults") != 0 {
		t.Fatalf("fresh ODP MR: %v", shows[0])
	}
	if w := wcs(t, polls[0]); len(w) != 1 || w[0]["status"] != "success" {
		t.Fatalf("WRITE into the ODP MR: %v", w)
	}
	if num(t, last(t, objs, "checksum"), "checksum") != num(t, objs[indexOf(objs, "post-send")], "checksum") {
		t.Fatal("WRITE into the ODP MR: checksums differ")
	}
	if s := shows[1]; num(t, s, "page_faults") != 1 || num(t, s, "page_faults_handled") != 1 || num(t, s, "pages_pinned") != 256 {
		t.Fatalf("after the first WRITE: %v", s)
	}
	if a := last(t, objs, "advise-mr"); num(t, a, "page_prefetch") != 256 || num(t, a, "pages_pinned") != 512 {
		t.Fatalf("advise-mr: %v", a)
	}
	if w := wcs(t, polls[1]); len(w) != 1 || w[0]["status"] != "remote access error" {
		t.Fatalf("WRITE after munmap: %v", w)
	}
	if s := shows[2]; num(t, s, "pages_pinned") != 0 || num(t, s, "page_invalidations") != 512 ||
		num(t, s, "page_invalidations_handled") != 512 || num(t, s, "page_faults_handled") != 1 {
		t.Fatalf("after munmap: %v", s)
	}
}

// TestDocImplicitODP runs the implicit ODP script of docs/hfictl.md (with
// its --mtt): an implicit MR pins nothing, a WRITE through its rkey into a
// buffer faults and lands, the WRITE after an munmap fails, and mr show
// sums the child's counters.
func TestDocImplicitODP(t *testing.T) {
	testenv.RequireRoot(t, "ODP needs userfaultfd and io_uring pins")
	code, out, errs := hfictl(t, docScript(t, "TestDocImplicitODP"), "--json", "--mtt", "1048576", "shell")
	if code != 0 {
		t.Fatalf("exit %d, stderr %q, output:\n%s", code, errs, out)
	}
	objs := jsonLines(t, out)
	by := byCmd(objs)
	shows, polls := by["mr show"], by["poll-cq"]
	if len(shows) != 3 || len(polls) != 2 {
		t.Fatalf("%d mr show, %d poll-cq results", len(shows), len(polls))
	}
	if s := shows[0]; s["kind"] != "implicit" || num(t, s, "pages_pinned") != 0 || num(t, s, "page_faults") != 0 {
		t.Fatalf("fresh implicit MR: %v", s)
	}
	if w := wcs(t, polls[0]); len(w) != 1 || w[0]["status"] != "success" {
		t.Fatalf("WRITE through the implicit rkey: %v", w)
	}
	if num(t, last(t, objs, "checksum"), "checksum") != num(t, objs[indexOf(objs, "post-send")], "checksum") {
		t.Fatal("WRITE through the implicit rkey: checksums differ")
	}
	if s := shows[1]; num(t, s, "page_faults") != 1 || num(t, s, "page_faults_handled") != 1 || num(t, s, "pages_pinned") < 64 {
		t.Fatalf("after the first WRITE: %v", s)
	}
	// The fault-around window of dst's fault may have mapped some of src
	// (the implicit MR reaches every buffer): the prefetch maps the rest.
	if a := last(t, objs, "advise-mr"); num(t, a, "page_prefetch") > 64 || num(t, a, "pages_pinned") < 128 {
		t.Fatalf("advise-mr --buf src: %v", a)
	}
	if w := wcs(t, polls[1]); len(w) != 1 || w[0]["status"] != "remote access error" {
		t.Fatalf("WRITE after munmap: %v", w)
	}
	if s := shows[2]; num(t, s, "page_invalidations") < 64 ||
		num(t, s, "page_invalidations_handled") != num(t, s, "page_invalidations") || num(t, s, "page_faults_handled") != 1 {
		t.Fatalf("after munmap: %v", s)
	}
}

// errnos lists the failed commands of a script as "CMD ERRNO", in order.
func errnos(objs []map[string]any) []string {
	var errs []string
	for _, o := range objs {
		if o["errno"] != nil {
			errs = append(errs, o["cmd"].(string)+" "+o["errno"].(string))
		}
	}
	return errs
}

// byCmd groups the results by command, in order.
func byCmd(objs []map[string]any) map[string][]map[string]any {
	m := map[string][]map[string]any{}
	for _, o := range objs {
		c, _ := o["cmd"].(string)
		m[c] = append(m[c], o)
	}
	return m
}

// indexOf returns the index of the first result of command cmd.
func indexOf(objs []map[string]any, cmd string) int {
	for i, o := range objs {
		if o["cmd"] == cmd {
			return i
		}
	}
	return -1
}

// TestTraceTID: `trace on` streams the driver's decisions of a TID cycle
// by hand, in order, with the TID; `trace off` ends it.
func TestTraceTID(t *testing.T) {
	testenv.RequireRoot(t, "TID_UPDATE pins through io_uring")
	checkNoLeaks(t)
	objs := runScript(t, `
assign-ctxt
alloc r 64k
trace on --kinds tid_register,tid_invalidate,tid_unregister
tid-update r
munmap r
tid-inval-read
tid-free r
trace off
`, false)
	var kinds []string
	var tid string
	for _, o := range objs {
		if o["cmd"] == "trace" && o["kind"] != nil {
			kinds = append(kinds, o["kind"].(string))
			if tid == "" {
				tid, _ = o["tid"].(string)
			} else if o["tid"] != tid {
				t.Fatalf("trace names TID %v, then %v", tid, o["tid"])
			}
		}
	}
	want := []string{"tid_register", "tid_invalidate", "tid_unregister"}
	if strings.Join(kinds, " ") != strings.Join(want, " ") {
		t.Fatalf("trace kinds %v, want %v", kinds, want)
	}
	if off := last(t, objs, "trace"); off["trace"] != "off" {
		t.Fatalf("last trace result %v", off)
	}
}

// TestQPModifyNetAttr: qp modify's --timeout, --retry-cnt, --rnr-retry and
// --min-rnr-timer reach the device through MODIFY_QP: a WRITE to a peer
// that never answers is retransmitted --retry-cnt times (0 is none) before
// RETRY_EXC_ERR; values out of range are EINVAL.
func TestQPModifyNetAttr(t *testing.T) {
	testenv.RequireRoot(t, "REG_MR pins through io_uring")
	checkNoLeaks(t)
	code, out, errs := hfictl(t, `alloc src 64k
mr reg src_mr src
cq create cq
peer add 1 127.0.0.9:4791
qp create a --cq cq
qp modify a --state init
qp modify a --state rtr --dest-port 1 --dest-qp 99 --retry-cnt 8
qp modify a --state rtr --dest-port 1 --dest-qp 99 --min-rnr-timer 32
qp modify a --state rtr --dest-port 1 --dest-qp 99 --timeout 256
qp modify a --state rtr --dest-port 1 --dest-qp 99 --timeout 6 --retry-cnt 0
qp modify a --state rts
post-send a --op write --sge src:0:64@src_mr --remote 0x1000 --rkey 0x101 --signaled
poll-cq cq --wait 5s
peer show
qp create b --cq cq
qp modify b --state init
qp modify b --state rtr --dest-port 1 --dest-qp 99 --timeout 6 --retry-cnt 3 --rnr-retry 0 --min-rnr-timer 31
qp modify b --state rts
post-send b --op write --sge src:0:64@src_mr --remote 0x1000 --rkey 0x101 --signaled
poll-cq cq --wait 5s
peer show
`, "--json", "--port", "udp:127.0.0.1:0", "shell")
	if code != 1 {
		t.Fatalf("exit %d, want 1 (three modifies fail): %s %s", code, out, errs)
	}
	objs := jsonLines(t, out)
	want := []string{"qp modify EINVAL", "qp modify EINVAL", "qp modify EINVAL"} // the last one hfictl's own
	if got := errnos(objs); strings.Join(got, ", ") != strings.Join(want, ", ") {
		t.Errorf("errors %q, want %q", got, want)
	}
	polls, shows := byCmd(objs)["poll-cq"], byCmd(objs)["peer show"]
	if len(polls) != 2 || len(shows) != 2 {
		t.Fatalf("results: %s", out)
	}
	for i, p := range polls {
		if wc := wcs(t, p); len(wc) != 1 || num(t, wc[0], "status_code") != 12 { // GOHFI_WC_RETRY_EXC_ERR
			t.Fatalf("QP %d: completions %v, want RETRY_EXC_ERR", i, wc)
		}
	}
	// One WRITE packet each, sent again 0 and 3 times.
	for i, c := range []struct{ retrans, timeouts float64 }{{0, 1}, {3, 5}} {
		if r, to := num(t, shows[i], "counters.retransmits"), num(t, shows[i], "counters.timeouts"); r != c.retrans || to != c.timeouts {
			t.Errorf("QP %d: %v retransmits, %v timeouts, want %v and %v", i, r, to, c.retrans, c.timeouts)
		}
	}
}
