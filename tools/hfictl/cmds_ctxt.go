package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/mem"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// Commands on the device and on the current file's context: one per ioctl,
// plus recv and events, which read the regions the context maps to user
// space as a PSM-like library would.

var capNames = map[uint64]string{
	uapi.HFI1_CAP_DMA_RTAIL: "DMA_RTAIL", uapi.HFI1_CAP_SDMA: "SDMA", uapi.HFI1_CAP_SDMA_AHG: "SDMA_AHG",
	uapi.HFI1_CAP_EXTENDED_PSN: "EXTENDED_PSN", uapi.HFI1_CAP_HDRSUPP: "HDRSUPP", uapi.HFI1_CAP_TID_RDMA: "TID_RDMA",
	uapi.HFI1_CAP_USE_SDMA_HEAD: "USE_SDMA_HEAD", uapi.HFI1_CAP_MULTI_PKT_EGR: "MULTI_PKT_EGR",
	uapi.HFI1_CAP_NODROP_RHQ_FULL: "NODROP_RHQ_FULL", uapi.HFI1_CAP_NODROP_EGR_FULL: "NODROP_EGR_FULL",
	uapi.HFI1_CAP_TID_UNMAP: "TID_UNMAP", uapi.HFI1_CAP_PRINT_UNIMPL: "PRINT_UNIMPL",
	uapi.HFI1_CAP_ALLOW_PERM_JKEY: "ALLOW_PERM_JKEY", uapi.HFI1_CAP_NO_INTEGRITY: "NO_INTEGRITY",
	uapi.HFI1_CAP_PKEY_CHECK: "PKEY_CHECK", uapi.HFI1_CAP_STATIC_RATE_CTRL: "STATIC_RATE_CTRL",
	uapi.HFI1_CAP_OPFN: "OPFN", uapi.HFI1_CAP_SDMA_HEAD_CHECK: "SDMA_HEAD_CHECK",
	uapi.HFI1_CAP_EARLY_CREDIT_RETURN: "EARLY_CREDIT_RETURN", uapi.HFI1_CAP_AIP: "AIP",
}

// eventNames are the HFI1_EVENT_* bits, as ack-event accepts them.
var eventNames = map[uint64]string{
	uapi.HFI1_EVENT_FROZEN: "frozen", uapi.HFI1_EVENT_LINKDOWN: "linkdown",
	uapi.HFI1_EVENT_LID_CHANGE: "lid-change", uapi.HFI1_EVENT_LMC_CHANGE: "lmc-change",
	uapi.HFI1_EVENT_SL2VL_CHANGE: "sl2vl-change", uapi.HFI1_EVENT_TID_MMU_NOTIFY: "tid-mmu-notify",
}

var hwCapNames = map[uint64]string{
	chip.CapMemMgtExtensions: "MEM_MGT_EXTENSIONS", chip.CapODP: "ODP", chip.CapMSIX: "MSIX", chip.CapLoopback: "LOOPBACK",
	chip.CapVerbs: "VERBS", chip.CapDBRec: "DBREC", chip.CapImplicitODP: "IMPLICIT_ODP", chip.CapNet: "NET", chip.CapDBRing: "DBRING", chip.CapCQHeadRec: "CQHEADREC", chip.CapCtxtDBRec: "CTXTDBREC", chip.CapRHQHeadRec: "RHQHEADREC",
}

var pollNames = map[uint64]string{
	driver.POLLIN: "POLLIN", driver.POLLPRI: "POLLPRI", driver.POLLERR: "POLLERR", driver.POLLRDNORM: "POLLRDNORM",
}

// set replaces the value of key.
func (o obj) set(key string, val any) {
	for i := range o {
		if o[i].key == key {
			o[i].val = val
		}
	}
}

func cmdInfo(s *session, args []string) (obj, error) {
	of, err := s.parseFile(newFlags("info"), args)
	if err != nil {
		return nil, err
	}
	var attr uapi.GohfiDeviceAttr
	if err := s.ioctl(of, uapi.GOHFI_IOCTL_QUERY_DEVICE, &attr); err != nil {
		return nil, err
	}
	info := s.att.Device.Info()
	dev := structObj(info, "vendor_id", "device_id", "revision")
	dev.set("cap_flags", bitNames(info.CapFlags, hwCapNames))
	at := structObj(&attr, "vendor_id", "vendor_part_id", "hw_ver", "page_size_cap", "device_cap_flags", "odp_general_caps")
	return obj{
		{"spec", s.spec},
		{"device", dev},
		{"attr", at},
		{"params", structObj(s.att.Module.Params())},
	}, nil
}

func cmdGetVers(s *session, args []string) (obj, error) {
	of, err := s.parseFile(newFlags("get-vers"), args)
	if err != nil {
		return nil, err
	}
	b, err := s.argBytes(4)
	if err != nil {
		return nil, err
	}
	if _, err := of.f.Ioctl(uapi.HFI1_IOCTL_GET_VERS, driver.UserAddr(uint64(s.arg.Addr()))); err != nil {
		return nil, err
	}
	v := binary.LittleEndian.Uint32(b)
	return obj{{"version", hex(v)}, {"major", v >> uapi.HFI1_SWMAJOR_SHIFT}, {"minor", v & (1<<uapi.HFI1_SWMAJOR_SHIFT - 1)}}, nil
}

func cmdAssignCtxt(s *session, args []string) (obj, error) {
	fs := newFlags("assign-ctxt")
	version := fs.Uint64("userversion", uapi.HFI1_USER_SWVERSION, "hfi1_user_info.userversion")
	subctxts := fs.Uint("subctxt-cnt", 0, "hfi1_user_info.subctxt_cnt")
	of, err := s.parseFile(fs, args)
	if err != nil {
		return nil, err
	}
	ui := uapi.Hfi1UserInfo{Userversion: uint32(*version), SubctxtCnt: uint16(*subctxts)}
	if err := s.assign(of, ui); err != nil {
		return nil, err
	}
	ci := of.ci
	return obj{
		{"file", of.name}, {"userversion", hex(ui.Userversion)}, {"unit", ci.Unit}, {"ctxt", ci.Ctxt},
		{"rcvtids", ci.Rcvtids}, {"rcvhdrq_cnt", ci.RcvhdrqCnt}, {"rcvegr_size", ci.RcvegrSize},
	}, nil
}

// assign takes a context for of (ASSIGN_CTXT), then does what a library
// does next: learns the geometry and the mmap tokens (CTXT_INFO,
// USER_INFO).
func (s *session) assign(of *openFile, ui uapi.Hfi1UserInfo) error {
	if err := s.ioctl(of, uapi.HFI1_IOCTL_ASSIGN_CTXT, &ui); err != nil {
		return err
	}
	var ci uapi.Hfi1CtxtInfo
	if err := s.ioctl(of, uapi.HFI1_IOCTL_CTXT_INFO, &ci); err != nil {
		return fmt.Errorf("after ASSIGN_CTXT: %w", err)
	}
	var bi uapi.Hfi1BaseInfo
	if err := s.ioctl(of, uapi.HFI1_IOCTL_USER_INFO, &bi); err != nil {
		return fmt.Errorf("after ASSIGN_CTXT: %w", err)
	}
	of.ci, of.bi, of.head, of.seq = &ci, &bi, 0, 1
	return nil
}

func cmdCtxtInfo(s *session, args []string) (obj, error) {
	of, err := s.parseFile(newFlags("ctxt-info"), args)
	if err != nil {
		return nil, err
	}
	var ci uapi.Hfi1CtxtInfo
	if err := s.ioctl(of, uapi.HFI1_IOCTL_CTXT_INFO, &ci); err != nil {
		return nil, err
	}
	of.ci = &ci
	o := structObj(&ci, "rec_cpu")
	o.set("runtime_flags", bitNames(ci.RuntimeFlags, capNames))
	return o, nil
}

func cmdUserInfo(s *session, args []string) (obj, error) {
	of, err := s.parseFile(newFlags("user-info"), args)
	if err != nil {
		return nil, err
	}
	var bi uapi.Hfi1BaseInfo
	if err := s.ioctl(of, uapi.HFI1_IOCTL_USER_INFO, &bi); err != nil {
		return nil, err
	}
	of.bi = &bi
	return structObj(&bi, "hw_version", "sw_version", "jkey", "bthqp", "sc_credits_addr", "pio_bufbase_sop",
		"pio_bufbase", "rcvhdr_bufbase", "rcvegr_bufbase", "sdma_comp_bufbase", "user_regbase", "events_bufbase",
		"status_bufbase", "rcvhdrtail_base", "subctxt_uregbase", "subctxt_rcvegrbuf", "subctxt_rcvhdrbuf"), nil
}

// scalar runs a command without an argument (_IO) or with a scalar one:
// like hfi1, the driver reads the value through a pointer (get_user), so it
// goes into user memory with the size the command number declares (int for
// RECV_CTRL and POLL_TYPE, unsigned long for ACK_EVENT, __u16 for SET_PKEY,
// __u64 for RCVHDR_HEAD).
func (s *session) scalar(cmd uint32, v uint64) (*openFile, error) {
	of, err := s.file()
	if err != nil {
		return nil, err
	}
	return of, s.scalarOn(of, cmd, v)
}

func (s *session) scalarOn(of *openFile, cmd uint32, v uint64) error {
	size := int(uapi.IOC_SIZE(cmd))
	var arg driver.UserPtr
	if size > 0 {
		b, err := s.argBytes(size)
		if err != nil {
			return err
		}
		var le [8]byte
		binary.LittleEndian.PutUint64(le[:], v)
		copy(b, le[:size])
		arg = driver.UserAddr(uint64(s.arg.Addr()))
	}
	_, err := of.f.Ioctl(cmd, arg)
	return err
}

func cmdCtxtReset(s *session, args []string) (obj, error) {
	if _, err := parseArgs(newFlags("ctxt-reset"), args, 0, 0); err != nil {
		return nil, err
	}
	of, err := s.scalar(uapi.HFI1_IOCTL_CTXT_RESET, 0)
	if err != nil {
		return nil, err
	}
	of.head, of.seq = 0, 1 // the rings restart from their first entry
	return nil, nil
}

func cmdCreditUpd(s *session, args []string) (obj, error) {
	if _, err := parseArgs(newFlags("credit-upd"), args, 0, 0); err != nil {
		return nil, err
	}
	_, err := s.scalar(uapi.HFI1_IOCTL_CREDIT_UPD, 0)
	return nil, err
}

func cmdRecvCtrl(s *session, args []string) (obj, error) {
	pos, err := parseArgs(newFlags("recv-ctrl"), args, 1, 1)
	if err != nil {
		return nil, err
	}
	var v uint64
	switch pos[0] {
	case "on", "1":
		v = 1
	case "off", "0":
	default:
		return nil, usageErr("recv-ctrl %q: want on or off", pos[0])
	}
	if _, err := s.scalar(uapi.HFI1_IOCTL_RECV_CTRL, v); err != nil {
		return nil, err
	}
	return obj{{"recv", pos[0] == "on" || pos[0] == "1"}}, nil
}

func cmdPollType(s *session, args []string) (obj, error) {
	pos, err := parseArgs(newFlags("poll-type"), args, 1, 1)
	if err != nil {
		return nil, err
	}
	var v uint64
	switch pos[0] {
	case "anyrcv":
		v = uapi.HFI1_POLL_TYPE_ANYRCV
	case "urgent":
		v = uapi.HFI1_POLL_TYPE_URGENT
	default:
		if v, err = parseUint("poll type", pos[0], 32); err != nil {
			return nil, err
		}
	}
	if _, err := s.scalar(uapi.HFI1_IOCTL_POLL_TYPE, v); err != nil {
		return nil, err
	}
	return obj{{"poll_type", v}}, nil
}

// parseEvents reads event bits as a number or as names joined by , or |.
func parseEvents(s string) (uint64, error) { return parseBits("event", s, eventNames) }

// parseBits reads a bit mask as a number or as names from names joined by
// , or | (case-insensitive).
func parseBits(what, s string, names map[uint64]string) (uint64, error) {
	if v, err := strconv.ParseUint(s, 0, 64); err == nil {
		return v, nil
	}
	var v uint64
	for _, n := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == '|' }) {
		found := false
		for bit, name := range names {
			if strings.EqualFold(n, name) {
				v |= bit
				found = true
			}
		}
		if !found {
			known := make([]string, 0, len(names))
			for _, name := range names {
				known = append(known, name)
			}
			sort.Strings(known)
			return 0, usageErr("%s %q: want a number or one of %s", what, n, strings.Join(known, ", "))
		}
	}
	return v, nil
}

func cmdAckEvent(s *session, args []string) (obj, error) {
	pos, err := parseArgs(newFlags("ack-event"), args, 1, 1)
	if err != nil {
		return nil, err
	}
	v, err := parseEvents(pos[0])
	if err != nil {
		return nil, err
	}
	if _, err := s.scalar(uapi.HFI1_IOCTL_ACK_EVENT, v); err != nil {
		return nil, err
	}
	return obj{{"acked", bitNames(v, eventNames)}}, nil
}

func cmdSetPkey(s *session, args []string) (obj, error) {
	pos, err := parseArgs(newFlags("set-pkey"), args, 1, 1)
	if err != nil {
		return nil, err
	}
	v, err := parseUint("pkey", pos[0], 16)
	if err != nil {
		return nil, err
	}
	if _, err := s.scalar(uapi.HFI1_IOCTL_SET_PKEY, v); err != nil {
		return nil, err
	}
	return obj{{"pkey", hex(v)}}, nil
}

func cmdRcvHdrHead(s *session, args []string) (obj, error) {
	pos, err := parseArgs(newFlags("rcvhdr-head"), args, 1, 1)
	if err != nil {
		return nil, err
	}
	v, err := parseUint("head", pos[0], 64)
	if err != nil {
		return nil, err
	}
	of, err := s.scalar(uapi.GOHFI_IOCTL_RCVHDR_HEAD, v)
	if err != nil {
		return nil, err
	}
	of.head = v
	return obj{{"head", v}}, nil
}

// dstCtxt reads a destination: a context number or the name of an open
// file with a context.
func (s *session) dstCtxt(arg string) (uint16, error) {
	if v, err := strconv.ParseUint(arg, 0, 16); err == nil {
		return uint16(v), nil
	}
	of, ok := s.files[arg]
	if !ok {
		return 0, usageErr("destination %q: not a context number or an open file", arg)
	}
	if of.ci == nil {
		return 0, usageErr("destination %q: the file has no context (assign-ctxt)", arg)
	}
	return of.ci.Ctxt, nil
}

func cmdSend(s *session, args []string) (_ obj, err error) {
	fs := newFlags("send")
	tidArg := fs.String("tid", "0", "expected: TID of the destination, a number or BUF[:I] (the I-th TID programmed for buffer BUF)")
	offset := fs.String("offset", "0", "expected: byte offset within the TID's buffer")
	tag := fs.Uint64("tag", 0, "tag copied to the receiver's header queue entry")
	bufName := fs.String("buf", "", "send from this buffer instead of a fresh one filled with seq")
	bufOff := fs.String("buf-offset", "0", "offset of the payload in --buf")
	pos, err := parseArgs(fs, args, 3, 3)
	if err != nil {
		return nil, err
	}
	snd := uapi.GohfiSend{Tag: *tag}
	switch pos[0] {
	case "eager":
		snd.Opcode = uapi.GOHFI_SEND_EAGER
	case "expected":
		snd.Opcode = uapi.GOHFI_SEND_EXPECTED
	default:
		return nil, usageErr("send %q: want eager or expected", pos[0])
	}
	if snd.DstCtxt, err = s.dstCtxt(pos[1]); err != nil {
		return nil, err
	}
	n, err := parseSize("length", pos[2])
	if err != nil {
		return nil, err
	}
	snd.Length = uint32(n)
	if snd.Opcode == uapi.GOHFI_SEND_EXPECTED {
		if snd.TID, err = s.tidArg(*tidArg, snd.DstCtxt); err != nil {
			return nil, err
		}
		o, err := parseSize("offset", *offset)
		if err != nil {
			return nil, err
		}
		snd.TIDOffset = uint32(o)
	}
	// The payload: a named buffer (mapped or not: the driver decides what
	// an unmapped one gives), or fresh memory with a known pattern.
	var payload []byte
	if *bufName != "" {
		b, err := s.buffer(*bufName)
		if err != nil {
			return nil, err
		}
		off, err := parseSize("buf-offset", *bufOff)
		if err != nil {
			return nil, err
		}
		if off+n > b.b.Len() {
			return nil, usageErr("%d bytes at offset %d of %s: the buffer has %d", n, off, b.name, b.b.Len())
		}
		snd.Vaddr = uint64(b.b.Addr()) + uint64(off)
		if data := b.b.Bytes(); data != nil {
			payload = data[off : off+n]
		}
	} else {
		b, aerr := mem.Alloc(max(n, 1))
		if aerr != nil {
			return nil, aerr
		}
		defer cleanup(&err, "unmapping the payload", b.Close)
		payload = b.Bytes()[:n]
		fillSeq(payload)
		snd.Vaddr = uint64(b.Addr())
	}
	of, err := s.file()
	if err != nil {
		return nil, err
	}
	// One packet at a time, delivered when the command returns (a recv
	// that follows finds it): SEND is posted, FLAG_WAIT waits for it.
	snd.Flags |= uapi.GOHFI_SEND_FLAG_WAIT
	if err := s.ioctl(of, uapi.GOHFI_IOCTL_SEND, &snd); err != nil {
		return nil, err
	}
	o := obj{{"opcode", pos[0]}, {"dst_ctxt", snd.DstCtxt}, {"length", snd.Length}, {"tag", snd.Tag}}
	if snd.Opcode == uapi.GOHFI_SEND_EXPECTED {
		o.add("tid", hex(snd.TID)).add("tid_offset", snd.TIDOffset)
	}
	if payload != nil {
		o.add("checksum", crc(payload))
	}
	return o, nil
}

func cmdPoll(s *session, args []string) (obj, error) {
	fs := newFlags("poll")
	timeout := fs.Duration("timeout", time.Second, "how long to wait; 0 checks without waiting, negative waits forever")
	of, err := s.parseFile(fs, args)
	if err != nil {
		return nil, err
	}
	ctx, cancel := s.ctx, context.CancelFunc(func() {})
	if *timeout >= 0 {
		// A zero timeout still lets Poll look once: a context that has
		// already ended is checked only when nothing is ready.
		ctx, cancel = context.WithTimeout(s.ctx, *timeout)
	}
	defer cancel()
	ev, err := of.f.Poll(ctx)
	timedOut := false
	if err != nil {
		if s.ctx.Err() != nil || ctx.Err() == nil {
			return nil, err
		}
		timedOut, ev = true, 0
	}
	return obj{{"revents", bitNames(uint64(ev), pollNames)}, {"timed_out", timedOut}}, nil
}

// needCtxt returns the current file if it has a context hfictl knows the
// geometry of.
func (s *session) needCtxt() (*openFile, error) {
	of, err := s.file()
	if err != nil {
		return nil, err
	}
	if of.ci == nil || of.bi == nil {
		return nil, fmt.Errorf("file %s has no context (assign-ctxt first): %w", of.name, unix.EINVAL)
	}
	return of, nil
}

func cmdRecv(s *session, args []string) (obj, error) {
	if _, err := parseArgs(newFlags("recv"), args, 0, 0); err != nil {
		return nil, err
	}
	of, err := s.needCtxt()
	if err != nil {
		return nil, err
	}
	ci := of.ci
	if of.rhq == nil {
		if of.rhq, err = of.f.Mmap(of.bi.RcvhdrBufbase, int(ci.RcvhdrqCnt)*int(ci.RcvhdrqEntsize), unix.PROT_READ); err != nil {
			return nil, err
		}
	}
	if of.eager == nil {
		if of.eager, err = of.f.Mmap(of.bi.RcvegrBufbase, int(ci.Egrtids)*int(ci.RcvegrSize), unix.PROT_READ); err != nil {
			return nil, err
		}
	}
	slot := of.head
	if slot >= uint64(ci.RcvhdrqCnt) {
		return nil, fmt.Errorf("head %d outside the queue of %d: %w", slot, ci.RcvhdrqCnt, unix.EINVAL)
	}
	var e uapi.GohfiRHQEntry
	if err := e.UnmarshalBytes(of.rhq[slot*uint64(ci.RcvhdrqEntsize):]); err != nil {
		return nil, err
	}
	if e.Seq != of.seq {
		return nil, fmt.Errorf("no new entry at slot %d (seq %d, want %d): %w", slot, e.Seq, of.seq, unix.EAGAIN)
	}
	// The device writes the seq last: the rest, read after it.
	if err := e.UnmarshalBytes(of.rhq[slot*uint64(ci.RcvhdrqEntsize):]); err != nil {
		return nil, err
	}
	o := obj{{"slot", slot}, {"seq", e.Seq}, {"src_ctxt", e.SrcCtxt}, {"length", e.Length}, {"tag", e.Tag}}
	switch e.Type {
	case uapi.GOHFI_RHF_EAGER:
		o = append(obj{{"type", "eager"}}, o...)
		o.add("eager_idx", e.EagerIdx)
		start := uint64(e.EagerIdx) * uint64(ci.RcvegrSize)
		if end := start + uint64(e.Length); end <= uint64(len(of.eager)) {
			data := of.eager[start:end]
			o.add("checksum", crc(data)).add("data", preview(data))
		}
	case uapi.GOHFI_RHF_EXPECTED:
		o = append(obj{{"type", "expected"}}, o...)
		o.add("tid", hex(e.TID)).add("tid_offset", e.TIDOffset)
		if r, ok := of.findTid(e.TID); ok {
			o.add("buffer", r.buf)
			if b, ok := s.bufs[r.buf]; ok {
				if data := b.b.Bytes(); data != nil {
					start := r.off + int(e.TIDOffset)
					if end := start + int(e.Length); end <= len(data) {
						o.add("checksum", crc(data[start:end]))
					}
				}
			}
		}
	case uapi.GOHFI_RHF_ERROR:
		o = append(obj{{"type", "error"}}, o...)
		o.add("err", bitNames(uint64(e.Err), map[uint64]string{
			uapi.GOHFI_RHF_ERR_TID: "TID", uapi.GOHFI_RHF_ERR_LENGTH: "LENGTH", uapi.GOHFI_RHF_ERR_DMA: "DMA", uapi.GOHFI_RHF_ERR_EAGER: "EAGER"}))
	default:
		o = append(obj{{"type", fmt.Sprint(e.Type)}}, o...)
	}
	// Consume the entry, as a library stores RcvHdrHead.
	next := (slot + 1) % uint64(ci.RcvhdrqCnt)
	if err := s.scalarOn(of, uapi.GOHFI_IOCTL_RCVHDR_HEAD, next); err != nil {
		return nil, err
	}
	of.head = next
	of.seq = uapi.NextSeq(of.seq)
	return o, nil
}

func preview(b []byte) string {
	const n = 16
	if len(b) > n {
		return fmt.Sprintf("%x...", b[:n])
	}
	return fmt.Sprintf("%x", b)
}

func cmdEvents(s *session, args []string) (obj, error) {
	if _, err := parseArgs(newFlags("events"), args, 0, 0); err != nil {
		return nil, err
	}
	of, err := s.needCtxt()
	if err != nil {
		return nil, err
	}
	if of.events == nil {
		if of.events, err = of.f.Mmap(of.bi.EventsBufbase, mem.PageSize(), unix.PROT_READ); err != nil {
			return nil, err
		}
	}
	return obj{{"events", bitNames(binary.LittleEndian.Uint64(of.events), eventNames)}}, nil
}

func cmdStats(s *session, args []string) (obj, error) {
	of, err := s.parseFile(newFlags("stats"), args)
	if err != nil {
		return nil, err
	}
	var st uapi.GohfiDriverStats
	if err := s.ioctl(of, uapi.GOHFI_IOCTL_DRIVER_STATS, &st); err != nil {
		return nil, err
	}
	return structObj(&st), nil
}
