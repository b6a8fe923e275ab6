package main

import (
	"strings"
	"testing"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/internal/testenv"
)

// TestDocFastReg runs the fast-registration script of docs/hfictl.md as it
// stands there: two non-contiguous pages bound in reverse order under
// variant 5 receive a WRITE through the new rkey in page-list order;
// LOCAL_INV makes the MR FREE and a WRITE with the old rkey is refused;
// the MR is bound again under variant 9 and a WRITE through it lands.
func TestDocFastReg(t *testing.T) {
	testenv.RequireRoot(t, "REG_MR pins through io_uring")
	checkNoLeaks(t)
	by := byCmd(runScript(t, docScript(t, "TestDocFastReg"), false))
	posts, polls, shows, sums := by["post-send"], by["poll-cq"], by["mr show"], by["checksum"]
	if len(posts) != 6 || len(polls) != 6 || len(shows) != 3 || len(sums) != 6 {
		t.Fatalf("%d post-send, %d poll-cq, %d mr show, %d checksum results", len(posts), len(polls), len(shows), len(sums))
	}
	alloc := last(t, by["alloc-mr"], "alloc-mr")
	if alloc["kind"] != "fast_reg" || alloc["state"] != "FREE" || num(t, alloc, "key_variant") != 0 || num(t, alloc, "max_num_sg") != 4 {
		t.Fatalf("alloc-mr: %v", alloc)
	}
	index := uint32(num(t, alloc, "lkey")) >> 8
	bind, write := posts[0], posts[1]
	pages, _ := bind["pages"].([]any)
	if num(t, bind, "key") != float64(index<<8|5) || num(t, bind, "key_variant") != 5 || len(pages) != 2 ||
		pages[0].(float64)-pages[1].(float64) != 0x2000 || num(t, bind, "iova") != pages[0].(float64) || num(t, bind, "length") != 8192 {
		t.Fatalf("first bind: %v", bind)
	}
	if num(t, write, "rkey") != num(t, bind, "key") || num(t, write, "remote_addr") != num(t, bind, "iova") {
		t.Fatalf("WRITE through the binding: %v", write)
	}
	want := []struct {
		status, opcode string
		vendorErr      float64
	}{
		{"success", "reg_mr", 0}, {"success", "rdma_write", 0}, {"success", "local_inv", 0},
		{"remote access error", "rdma_write", chip.VendorErrState}, {"success", "reg_mr", 0}, {"success", "rdma_write", 0},
	}
	for i, w := range want {
		wc := wcs(t, polls[i])
		if len(wc) != 1 || wc[0]["status"] != w.status || wc[0]["opcode"] != w.opcode || num(t, wc[0], "vendor_err") != w.vendorErr {
			t.Fatalf("completion %d: %v, want %s %s vendor error %v", i, wc, w.status, w.opcode, w.vendorErr)
		}
	}
	// src's first 4 KiB in the first page of the list (dst 0x3000), its
	// second in the second (dst 0x1000); after the rebind, dst 0x8000.
	for i := 0; i < 6; i += 2 {
		if num(t, sums[i], "checksum") != num(t, sums[i+1], "checksum") {
			t.Fatalf("checksums %v and %v differ", sums[i], sums[i+1])
		}
	}
	if num(t, sums[0], "checksum") == num(t, sums[2], "checksum") {
		t.Fatal("the two source pages hold the same bytes: the order is not checked")
	}
	for i, w := range []struct {
		state   string
		variant float64
	}{{"VALID", 5}, {"FREE", 5}, {"VALID", 9}} {
		s := shows[i]
		if s["state"] != w.state || num(t, s, "key_variant") != w.variant || uint32(num(t, s, "rkey"))>>8 != index ||
			num(t, s, "pages_pinned") != 0 {
			t.Fatalf("mr show %d: %v, want %s variant %v", i, s, w.state, w.variant)
		}
	}
}

// TestFastRegOps: SEND_WITH_INV invalidates the receiver's MR and says so
// in the receive completion; RDMA_READ_WITH_INV reads into a bound MR and
// invalidates it; DEREG_MR of a VALID MR is EBUSY; the refusals of hfictl,
// the driver (pages outside the file's MRs, a list too long) and the
// device (a bind of a VALID MR).
func TestFastRegOps(t *testing.T) {
	testenv.RequireRoot(t, "REG_MR pins through io_uring")
	checkNoLeaks(t)
	objs := runScript(t, connected+`
fill dst rand:9 --offset 0x2000 --len 4k
alloc other 8k
use resp
alloc-mr frb --max-num-sg 2
use default
alloc-mr fra --max-num-sg 2
alloc-mr fra
alloc-mr huge --max-num-sg 0x100000
post-send b --op fast-reg --mr frb --pages dst:0x4000@dst_mr --access local_write,remote_write --signaled
poll-cq resp_cq --wait 5s
mr dereg frb
post-recv b --sge dst:0x8000:100@dst_mr
post-send a --op send-inv --sge src:0:100@src_mr --inv-key frb --signaled
poll-cq cq --wait 5s
poll-cq resp_cq --wait 5s
mr show frb
mr dereg frb
post-send a --op fast-reg --mr fra --pages src:0x1000@src_mr --access local_write --signaled
poll-cq cq --wait 5s
post-send a --op read-inv --sge src:0x1000:4k@fra --remote dst_mr:0x2000 --inv-key fra --signaled
poll-cq cq --wait 5s
mr show fra
checksum src --offset 0x1000 --len 4k
checksum dst --offset 0x2000 --len 4k
post-send a --op fast-reg --mr fra --pages other:0
post-send a --op fast-reg --mr fra --pages src:0,src:0x1000,src:0x2000
post-send a --op fast-reg --mr fra --pages src:0@dst_mr
post-send a --op fast-reg --mr src_mr --pages src:0
post-send a --op write --sge src@src_mr --remote dst_mr --inv-key 5
post-send a --op local-inv
post-send a --op fast-reg --mr fra --pages src:0@src_mr --signaled
post-send a --op fast-reg --mr fra --pages src:0@src_mr --signaled
poll-cq cq --wait 5s --min 2
mr show
`, true)
	by := byCmd(objs)
	polls := by["poll-cq"]
	if len(polls) != 6 {
		t.Fatalf("%d poll-cq results", len(polls))
	}
	frbKey := num(t, by["post-send"][0], "key")
	send, recv := wcs(t, polls[1]), wcs(t, polls[2])
	if len(send) != 1 || send[0]["status"] != "success" || len(recv) != 1 || recv[0]["opcode"] != "recv" ||
		num(t, recv[0], "byte_len") != 100 || num(t, recv[0], "invalidated_rkey") != frbKey ||
		uint64(num(t, recv[0], "wc_flags"))&4 == 0 {
		t.Fatalf("SEND_WITH_INV of %#x: send %v, receive %v", uint64(frbKey), send, recv)
	}
	shows := by["mr show"]
	if shows[0]["state"] != "FREE" || shows[1]["state"] != "FREE" {
		t.Fatalf("after SEND_WITH_INV %v, after READ_WITH_INV %v: want FREE", shows[0], shows[1])
	}
	if r := wcs(t, polls[4]); len(r) != 1 || r[0]["status"] != "success" || r[0]["opcode"] != "rdma_read" || num(t, r[0], "byte_len") != 4096 {
		t.Fatalf("RDMA_READ_WITH_INV: %v", r)
	}
	sums := by["checksum"]
	if num(t, sums[0], "checksum") != num(t, sums[1], "checksum") {
		t.Fatalf("READ_WITH_INV read %v, remote %v", sums[0], sums[1])
	}
	if w := wcs(t, polls[5]); len(w) != 2 || w[0]["status"] != "success" || w[0]["opcode"] != "reg_mr" ||
		w[1]["status"] != "local QP operation error" {
		t.Fatalf("a bind of a VALID MR: %v", w)
	}
	errs := errnos(objs)
	wantErrs := []string{
		"alloc-mr EEXIST",
		"alloc-mr EINVAL",  // more than max_fast_reg_page_list_len
		"mr dereg EBUSY",   // frb is VALID
		"post-send EINVAL", // the driver: a page of no MR of the file
		"post-send EINVAL", // the driver: 3 pages, max_num_sg 2
		"post-send EINVAL", // hfictl: the page is not dst_mr's
		"post-send EINVAL", // hfictl: src_mr is not a fast-reg MR
		"post-send EINVAL", // hfictl: --inv-key on a WRITE
		"post-send EINVAL", // hfictl: local-inv without --inv-key
	}
	if strings.Join(errs, ", ") != strings.Join(wantErrs, ", ") {
		t.Errorf("errors %q, want %q", errs, wantErrs)
	}
	mrs, _ := last(t, objs, "mr show")["mrs"].([]any)
	kinds := map[string]string{}
	for _, m := range mrs {
		kinds[m.(map[string]any)["name"].(string)] = m.(map[string]any)["kind"].(string)
	}
	if len(kinds) != 3 || kinds["fra"] != "fast_reg" || kinds["src_mr"] != "pinned" || kinds["dst_mr"] != "pinned" {
		t.Fatalf("mr show after dereg frb: %v", kinds)
	}
}
