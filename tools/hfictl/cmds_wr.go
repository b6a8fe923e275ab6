package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"hash/crc32"
	"slices"
	"strings"
	"time"

	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/uapi"
)

// Work requests and completions: post-send, post-recv (POST_SEND,
// POST_RECV with one WR) and poll-cq (POLL_CQ, waiting in File.Poll).

var sendOps = map[string]uint32{
	"write": uapi.GOHFI_WR_RDMA_WRITE, "write-imm": uapi.GOHFI_WR_RDMA_WRITE_WITH_IMM,
	"send": uapi.GOHFI_WR_SEND, "send-imm": uapi.GOHFI_WR_SEND_WITH_IMM, "read": uapi.GOHFI_WR_RDMA_READ,
	"cas": uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP, "faa": uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD,
	"fast-reg": uapi.GOHFI_WR_FAST_REG_MR, "local-inv": uapi.GOHFI_WR_LOCAL_INV,
	"send-inv": uapi.GOHFI_WR_SEND_WITH_INV, "read-inv": uapi.GOHFI_WR_RDMA_READ_WITH_INV,
}

const sendOpNames = "write, write-imm, send, send-imm, read, cas, faa, fast-reg, local-inv, send-inv or read-inv"

// wcStatusStr is rdma-core's ibv_wc_status_str.
func wcStatusStr(st uint32) string {
	names := [...]string{
		"success", "local length error", "local QP operation error", "local EE context operation error",
		"local protection error", "Work Request Flushed Error", "memory management operation error",
		"bad response error", "local access error", "remote invalid request error", "remote access error",
		"remote operation error", "transport retry counter exceeded", "RNR retry counter exceeded",
		"local RDD violation error", "remote invalid RD request", "aborted error", "invalid EE context number",
		"invalid EE context state", "fatal error", "response timeout error", "general error", "TM error",
		"TM software rendezvous",
	}
	if int(st) < len(names) {
		return names[st]
	}
	return "unknown"
}

var wcOpcodeNames = map[uint32]string{
	uapi.GOHFI_WC_SEND: "send", uapi.GOHFI_WC_RDMA_WRITE: "rdma_write", uapi.GOHFI_WC_RDMA_READ: "rdma_read",
	uapi.GOHFI_WC_COMP_SWAP: "comp_swap", uapi.GOHFI_WC_FETCH_ADD: "fetch_add", uapi.GOHFI_WC_BIND_MW: "bind_mw",
	uapi.GOHFI_WC_LOCAL_INV: "local_inv", uapi.GOHFI_WC_REG_MR: "reg_mr", uapi.GOHFI_WC_RECV: "recv",
	uapi.GOHFI_WC_RECV_RDMA_WITH_IMM: "recv_rdma_with_imm",
}

var wcFlagNames = map[uint64]string{
	uapi.GOHFI_WC_GRH: "GRH", uapi.GOHFI_WC_WITH_IMM: "WITH_IMM", uapi.GOHFI_WC_WITH_INVALIDATE: "WITH_INV",
}

// listFlag is a repeatable string flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, " ") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

// wrFlags adds a work request's --sge and --wr-id to fs.
func wrFlags(fs *flag.FlagSet) (*listFlag, *string) {
	sges := &listFlag{}
	fs.Var(sges, "sge", "BUF[:OFF[:LEN]]@MR, repeatable")
	return sges, fs.String("wr-id", "", "work request id (default: counts up in the session)")
}

// key reads a key: a number, or the name of an MR for its rkey (remote)
// or lkey.
func (s *session) key(arg string, remote bool) (uint32, error) {
	if m, ok := s.verbs.mrs[arg]; ok && remote {
		return m.r.Rkey, nil
	} else if ok {
		return m.r.Lkey, nil
	}
	v, err := parseUint("key", arg, 32)
	return uint32(v), err
}

// sgl reads --sge BUF[:OFF[:LEN]]@MR values into a scatter/gather list and
// the CRC-32C of the bytes it covers (nil when a buffer is unmapped).
func (s *session) sgl(specs []string) ([]uapi.GohfiSge, any, error) {
	sgl := make([]uapi.GohfiSge, 0, len(specs))
	var sum uint32
	mapped := true
	for _, spec := range specs {
		i := strings.LastIndexByte(spec, '@')
		if i < 0 {
			return nil, nil, usageErr("--sge %q: want BUF[:OFF[:LEN]]@MR", spec)
		}
		b, off, n, err := s.bufSpan(spec[:i])
		if err != nil {
			return nil, nil, err
		}
		lkey, err := s.key(spec[i+1:], false)
		if err != nil {
			return nil, nil, err
		}
		sgl = append(sgl, uapi.GohfiSge{Addr: uint64(b.b.Addr()) + uint64(off), Length: uint32(n), Lkey: lkey})
		if data := b.b.Bytes(); data != nil {
			sum = crc32.Update(sum, crcTable, data[off:off+n])
		} else {
			mapped = false
		}
	}
	if !mapped {
		return sgl, nil, nil
	}
	return sgl, hex(sum), nil
}

func sglLength(sgl []uapi.GohfiSge) uint64 {
	var n uint64
	for _, e := range sgl {
		n += uint64(e.Length)
	}
	return n
}

// wrID is the --wr-id given, or the next of the session's counter.
func (s *session) wrID(arg string) (uint64, error) {
	if arg != "" {
		return parseUint("wr-id", arg, 64)
	}
	s.verbs.wrID++
	return s.verbs.wrID, nil
}

func cmdPostSend(s *session, args []string) (obj, error) {
	fs := newFlags("post-send")
	opArg := fs.String("op", "", sendOpNames)
	sges, wrIDArg := wrFlags(fs)
	remote := fs.String("remote", "", "RDMA: MR[:OFF] (its iova and rkey) or an address")
	rkeyArg := fs.String("rkey", "", "RDMA: remote key, a number or an MR's name (default: the --remote MR's)")
	immArg := fs.String("imm", "0", "immediate data (imm ops), as given")
	signaled := fs.Bool("signaled", false, "request a completion")
	compareAdd := fs.String("compare-add", "0", "atomics: the value to compare (cas) or add (faa)")
	swap := fs.String("swap", "0", "cas: the value to store when the compare matches")
	fence := fs.Bool("fence", false, "GOHFI_SEND_FENCE: wait for the earlier work requests")
	fr := addFastRegFlags(fs)
	_, q, err := parseNamed(fs, args, s.verbs.qps, "QP")
	if err != nil {
		return nil, err
	}
	op, ok := sendOps[*opArg]
	if !ok {
		return nil, usageErr("--op %q: want %s", *opArg, sendOpNames)
	}
	var misplaced []string
	fs.Visit(func(f *flag.Flag) {
		if slices.Contains(fastRegOnly, f.Name) && op != uapi.GOHFI_WR_FAST_REG_MR ||
			f.Name == "inv-key" && !invalidating[op] {
			misplaced = append(misplaced, "--"+f.Name)
		}
	})
	if misplaced != nil {
		return nil, usageErr("--op %s does not take %s", *opArg, strings.Join(misplaced, " "))
	}
	sgl, sum, err := s.sgl(*sges)
	if err != nil {
		return nil, err
	}
	wr := hfiuser.SendWR{SGL: sgl}
	if wr.WrID, err = s.wrID(*wrIDArg); err != nil {
		return nil, err
	}
	wr.Opcode = op
	if *signaled {
		wr.SendFlags |= uapi.GOHFI_SEND_SIGNALED
	}
	if *fence {
		wr.SendFlags |= uapi.GOHFI_SEND_FENCE
	}
	imm, err := parseUint("imm", *immArg, 32)
	if err != nil {
		return nil, err
	}
	wr.ImmData = uint32(imm)
	atomic := op == uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP || op == uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD
	if atomic {
		if wr.CompareAdd, err = parseUint("compare-add", *compareAdd, 64); err != nil {
			return nil, err
		}
		if op == uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP {
			if wr.Swap, err = parseUint("swap", *swap, 64); err != nil {
				return nil, err
			}
		}
	}
	o := obj{{"qp", q.name}, {"op", *opArg}, {"wr_id", wr.WrID}, {"signaled", *signaled}}
	if *fence {
		o.add("fence", true)
	}
	var bound func()
	switch op {
	case uapi.GOHFI_WR_FAST_REG_MR:
		if bound, err = s.fastRegWR(fr, &wr, &o); err != nil {
			return nil, err
		}
	case uapi.GOHFI_WR_LOCAL_INV:
	default:
		o.add("num_sge", len(sgl)).add("length", sglLength(sgl))
	}
	if invalidating[op] {
		if *fr.invKey == "" {
			return nil, usageErr("--op %s needs --inv-key K|MR", *opArg)
		}
		if wr.InvalidateRkey, err = s.key(*fr.invKey, true); err != nil {
			return nil, err
		}
		o.add("inv_key", hex(wr.InvalidateRkey))
	}
	if rdmaOps[op] {
		if wr.RemoteAddr, wr.Rkey, err = s.remote(*remote, *rkeyArg); err != nil {
			return nil, err
		}
		o.add("remote_addr", hex(wr.RemoteAddr)).add("rkey", hex(wr.Rkey))
	}
	if op == uapi.GOHFI_WR_RDMA_WRITE_WITH_IMM || op == uapi.GOHFI_WR_SEND_WITH_IMM {
		o.add("imm_data", hex(wr.ImmData))
	}
	if atomic {
		o.add("compare_add", hex(wr.CompareAdd)).add("swap", hex(wr.Swap))
	}
	if _, err := hfiuser.PostSend(q.of.f, q.attr.Handle, []hfiuser.SendWR{wr}); err != nil {
		return nil, err
	}
	if bound != nil {
		bound()
	}
	if sum != nil && (op == uapi.GOHFI_WR_SEND || op == uapi.GOHFI_WR_SEND_WITH_IMM || op == uapi.GOHFI_WR_SEND_WITH_INV ||
		op == uapi.GOHFI_WR_RDMA_WRITE || op == uapi.GOHFI_WR_RDMA_WRITE_WITH_IMM) {
		o.add("checksum", sum)
	}
	return o, nil
}

// rdmaOps are the opcodes with a remote address and key; invalidating the
// ones with invalidate_rkey.
var (
	rdmaOps = map[uint32]bool{uapi.GOHFI_WR_RDMA_WRITE: true, uapi.GOHFI_WR_RDMA_WRITE_WITH_IMM: true,
		uapi.GOHFI_WR_RDMA_READ: true, uapi.GOHFI_WR_RDMA_READ_WITH_INV: true,
		uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP: true, uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD: true}
	invalidating = map[uint32]bool{uapi.GOHFI_WR_LOCAL_INV: true, uapi.GOHFI_WR_SEND_WITH_INV: true,
		uapi.GOHFI_WR_RDMA_READ_WITH_INV: true}
)

// remote reads an RDMA target: MR[:OFF] (the MR's iova plus OFF, and its
// rkey), or BUF[:OFF] (a buffer's address plus OFF) or an address with
// --rkey; an --rkey given always wins.
func (s *session) remote(arg, rkeyArg string) (addr uint64, rkey uint32, err error) {
	if arg == "" {
		return 0, 0, usageErr("RDMA needs --remote MR[:OFF] or --remote ADDR --rkey K")
	}
	name, offArg, _ := strings.Cut(arg, ":")
	if m, ok := s.verbs.mrs[name]; ok {
		addr, rkey = m.r.Iova, m.r.Rkey
		if offArg != "" {
			off, err := parseSize("offset", offArg)
			if err != nil {
				return 0, 0, err
			}
			addr += uint64(off)
		}
	} else {
		if b, berr := s.buffer(name); berr == nil {
			// A buffer's address (for an implicit MR's rkey).
			addr = uint64(b.b.Addr())
			if offArg != "" {
				off, err := parseSize("offset", offArg)
				if err != nil {
					return 0, 0, err
				}
				addr += uint64(off)
			}
		} else if addr, err = parseUint("remote address", arg, 64); err != nil {
			return 0, 0, usageErr("--remote %q: not an MR's or a buffer's name, nor an address", arg)
		}
		if rkeyArg == "" {
			return 0, 0, usageErr("--remote %s: an address needs --rkey", arg)
		}
	}
	if rkeyArg != "" {
		rkey, err = s.key(rkeyArg, true)
	}
	return addr, rkey, err
}

func cmdPostRecv(s *session, args []string) (obj, error) {
	fs := newFlags("post-recv")
	sges, wrIDArg := wrFlags(fs)
	_, q, err := parseNamed(fs, args, s.verbs.qps, "QP")
	if err != nil {
		return nil, err
	}
	sgl, _, err := s.sgl(*sges)
	if err != nil {
		return nil, err
	}
	wr := hfiuser.RecvWR{SGL: sgl}
	if wr.WrID, err = s.wrID(*wrIDArg); err != nil {
		return nil, err
	}
	if _, err := hfiuser.PostRecv(q.of.f, q.attr.Handle, []hfiuser.RecvWR{wr}); err != nil {
		return nil, err
	}
	return obj{{"qp", q.name}, {"wr_id", wr.WrID}, {"num_sge", len(sgl)}, {"length", sglLength(sgl)}}, nil
}

func cmdPollCQ(s *session, args []string) (obj, error) {
	fs := newFlags("poll-cq")
	wait := fs.Duration("wait", 0, "wait up to this long for --min completions (File.Poll); 0 takes what is there")
	minN := fs.Int("min", 1, "with --wait: completions to wait for")
	maxN := fs.Int("max", 16, "completions to take at most")
	_, c, err := parseNamed(fs, args, s.verbs.cqs, "CQ")
	if err != nil {
		return nil, err
	}
	if *maxN < 1 || *minN > *maxN {
		return nil, usageErr("want 1 <= --max and --min <= --max")
	}
	wcs, err := s.pollCQ(c, *wait, *minN, *maxN)
	if err != nil {
		return nil, err
	}
	list := make([]obj, len(wcs))
	for i, wc := range wcs {
		list[i] = s.describeWC(wc)
	}
	return obj{{"cq", c.name}, {"polled", len(wcs)}, {"timed_out", *wait > 0 && len(wcs) < *minN}, {"wcs", list}}, nil
}

// pollCQ takes up to maxN completions (POLL_CQ, which never blocks); while
// fewer than minN arrived it sleeps in File.Poll, which arms the file's
// CQs, until wait has passed.
func (s *session) pollCQ(c *cqRec, wait time.Duration, minN, maxN int) ([]uapi.GohfiWC, error) {
	ctx, cancel := context.WithTimeout(s.ctx, wait)
	defer cancel()
	wc := make([]uapi.GohfiWC, maxN)
	n := 0
	for {
		k, err := hfiuser.PollCQ(c.of.f, c.handle, wc[n:])
		n += k
		if err != nil {
			return wc[:n], err
		}
		switch {
		case n == maxN:
			return wc[:n], nil
		case k > 0:
			continue
		case n >= minN || wait <= 0:
			return wc[:n], nil
		}
		if _, err := c.of.f.Poll(ctx); err != nil {
			if s.ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
				return wc[:n], nil
			}
			return wc[:n], fmt.Errorf("waiting for completions: %w", err)
		}
		// Poll also reports the context's header queue and events, and
		// another CQ of the file: do not spin on those.
		time.Sleep(20 * time.Microsecond)
	}
}

// describeWC shows a completion with ibv_wc_status_str's status and the
// QP's name; an error completion means the device moved the QP to ERR.
func (s *session) describeWC(wc uapi.GohfiWC) obj {
	var qp any
	for _, q := range s.verbs.qps {
		if q.attr.QPNum == wc.QPNum {
			qp = q.name
			if wc.Status != uapi.GOHFI_WC_SUCCESS {
				q.state = uapi.GOHFI_QPS_ERR
			}
		}
	}
	op, ok := wcOpcodeNames[wc.Opcode]
	if !ok {
		op = fmt.Sprintf("opcode %#x", wc.Opcode)
	}
	o := obj{{"wr_id", wc.WrID}, {"status", wcStatusStr(wc.Status)}, {"status_code", wc.Status},
		{"opcode", op}, {"vendor_err", wc.VendorErr}, {"byte_len", wc.ByteLen},
		{"qp", qp}, {"qp_num", wc.QPNum}, {"src_qp", wc.SrcQP}, {"wc_flags", bitNames(uint64(wc.WcFlags), wcFlagNames)}}
	if wc.WcFlags&uapi.GOHFI_WC_WITH_IMM != 0 {
		o.add("imm_data", hex(wc.ImmData))
	}
	if wc.WcFlags&uapi.GOHFI_WC_WITH_INVALIDATE != 0 {
		o.add("invalidated_rkey", hex(wc.InvalidatedRkey))
	}
	return o
}
