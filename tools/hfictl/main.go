// Command hfictl drives the gohfi driver the way a C program drives hfi1's
// character device: one subcommand per ioctl, with the argument structs laid
// out as C lays them out (package uapi) in memory outside the Go heap
// (package mem), plus named user buffers to register and send from.
//
//	hfictl [--device SPEC] [--json] COMMAND [ARGS]   one command on a fresh open of the device
//	hfictl [--device SPEC] [--json] shell            commands from stdin, one per line, keeping state
//
// SPEC is "embedded" (hfisim in this process, the default) or
// "vfio-user:PATH" (an hfisim process, tools/hfisim). See docs/hfictl.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"syscall"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfisim"
	"github.com/gohfi/gohfi/mem"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(runContext(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

// run is hfictl's main logic: it returns the exit status (0 when every
// command succeeded, 1 when one failed, 2 for a malformed invocation).
func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	return runContext(context.Background(), args, stdin, stdout, stderr)
}

func runContext(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("hfictl", flag.ContinueOnError)
	fs.SetOutput(stderr)
	device := fs.String("device", "embedded", `device: "embedded" or "vfio-user:PATH"`)
	jsonOut := fs.Bool("json", false, "print one JSON object per command result")
	opts := attach.DefaultOptions()
	fs.IntVar(&opts.Sim.NumContexts, "contexts", opts.Sim.NumContexts, "embedded device: receive contexts")
	fs.IntVar(&opts.Sim.RcvArrayPerCtxt, "rcvarray", opts.Sim.RcvArrayPerCtxt, "embedded device: RcvArray entries per context")
	fs.IntVar(&opts.Sim.MTTEntries, "mtt", opts.Sim.MTTEntries, "embedded device: MTT entries (implicit ODP needs room for a directory of 131072 and a child of 262144)")
	fs.Func("port", "embedded device: network port udp:ADDR[:PORT] (docs/fabric.md)", func(s string) error {
		p, err := hfisim.ParsePort(s)
		opts.Sim.Port = p
		return err
	})
	fs.IntVar(&opts.Params.RcvHdrCnt, "rcvhdrcnt", opts.Params.RcvHdrCnt, "module parameter: receive header queue entries per context")
	fs.IntVar(&opts.Params.EagerBufferSize, "eager-size", opts.Params.EagerBufferSize, "module parameter: bytes per eager buffer")
	fs.BoolVar(&opts.Params.TIDUnmapOnInvalidate, "tid-unmap", opts.Params.TIDUnmapOnInvalidate, "module parameter: unprogram and unpin TIDs at invalidation (HFI1_CAP_TID_UNMAP)")
	// Usage goes to stderr, where a failure to write it would be reported.
	fs.Usage = func() { _, _ = io.WriteString(stderr, usage(fs)) }
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() == 0 {
		_, _ = io.WriteString(stderr, usage(fs)) // stderr: see fs.Usage
		return 2
	}
	p := &printer{out: stdout, errOut: stderr, json: *jsonOut}
	s := newSession(ctx, *device, opts, p)
	var ok bool
	switch name := fs.Arg(0); name {
	case "help", "-h", "--help":
		if _, err := io.WriteString(stdout, usage(fs)); err != nil {
			_, _ = fmt.Fprintf(stderr, "hfictl: writing help: %v\n", err) // the last place to report
			return 1
		}
		return 0
	case "shell":
		ok = s.shell(stdin, stderr, fs.Args()[1:])
	default:
		ok = s.exec(name, fs.Args()[1:])
	}
	if err := s.close(); err != nil {
		p.fail("close", err)
		ok = false
	}
	if err := p.writeErr(); err != nil {
		// Results that were not written must not look like success.
		_, _ = fmt.Fprintf(stderr, "hfictl: writing results: %v\n", err) // the last place to report
		ok = false
	}
	if !ok {
		return 1
	}
	return 0
}

// usage is the text of hfictl help: synopsis, flags and commands.
func usage(fs *flag.FlagSet) string {
	var b strings.Builder
	b.WriteString(`usage: hfictl [flags] COMMAND [ARGS]
       hfictl [flags] shell [--stop-on-error] < script

flags:
`)
	out := fs.Output()
	fs.SetOutput(&b)
	fs.PrintDefaults()
	fs.SetOutput(out)
	b.WriteString("\n")
	b.WriteString(commandList())
	return b.String()
}

// commandList is the list of commands in hfictl help and the shell's help.
func commandList() string {
	var w strings.Builder
	w.WriteString("commands:\n")
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		c := commands[n]
		syn := strings.TrimSpace(n + " " + c.args)
		if len(syn) > 40 {
			fmt.Fprintf(&w, "  %s\n  %-40s %s\n", syn, "", c.help)
			continue
		}
		fmt.Fprintf(&w, "  %-40s %s\n", syn, c.help)
	}
	return w.String()
}

// command is one hfictl command. run parses its own arguments.
type command struct {
	args string // synopsis
	help string
	run  func(s *session, args []string) (obj, error)
}

var commands map[string]command

// The table is filled in init because command functions refer to it (help).
func init() {
	commands = map[string]command{
		// Device and context (cmds_ctxt.go).
		"info":        {"", "device identity, QUERY_DEVICE attributes and module parameters (no context needed)", cmdInfo},
		"get-vers":    {"", "HFI1_IOCTL_GET_VERS", cmdGetVers},
		"assign-ctxt": {"[--userversion V] [--subctxt-cnt N]", "HFI1_IOCTL_ASSIGN_CTXT, then CTXT_INFO and USER_INFO", cmdAssignCtxt},
		"ctxt-info":   {"", "HFI1_IOCTL_CTXT_INFO", cmdCtxtInfo},
		"user-info":   {"", "HFI1_IOCTL_USER_INFO (mmap tokens)", cmdUserInfo},
		"ctxt-reset":  {"", "HFI1_IOCTL_CTXT_RESET", cmdCtxtReset},
		"credit-upd":  {"", "HFI1_IOCTL_CREDIT_UPD", cmdCreditUpd},
		"recv-ctrl":   {"on|off", "HFI1_IOCTL_RECV_CTRL", cmdRecvCtrl},
		"poll-type":   {"anyrcv|urgent", "HFI1_IOCTL_POLL_TYPE", cmdPollType},
		"ack-event":   {"BITS", "HFI1_IOCTL_ACK_EVENT (number or names: tid-mmu-notify,frozen,...)", cmdAckEvent},
		"set-pkey":    {"KEY", "HFI1_IOCTL_SET_PKEY", cmdSetPkey},
		"send":        {"eager|expected DST LEN [--tid T] [--offset O] [--tag X] [--buf NAME] [--buf-offset N]", "GOHFI_IOCTL_SEND to context DST (a number or an open file's name)", cmdSend},
		"poll":        {"[--timeout D]", "File.Poll: wait for a header queue entry (POLLIN) or an event (POLLPRI)", cmdPoll},
		"recv":        {"", "read the next header queue entry through the mmapped queue, then GOHFI_IOCTL_RCVHDR_HEAD", cmdRecv},
		"rcvhdr-head": {"N", "GOHFI_IOCTL_RCVHDR_HEAD", cmdRcvHdrHead},
		"events":      {"", "read the event bits from the mmapped events page", cmdEvents},
		"stats":       {"", "GOHFI_IOCTL_DRIVER_STATS", cmdStats},
		"trace":       {"on [--kinds LIST] | off", "print the driver's decisions as they happen (TID register/invalidate, notifier events, ODP faults, TLB flushes, fast-reg, doorbells, completions)", cmdTrace},
		// Benchmarks (bench*.go).
		"bench": {"write|read|send|expected|all [--lat|--mode bw,lat] [--size LIST|-a] [--iters N] [--runs N] [--qps N] [--tx-depth N] [--signal-every N] [--mem anon,memfd] [--paths SPEC,...] [--plot FILE.svg|.png,...] [--cpuprofile FILE] | tid [--sizes 4k,64k,1m,16m] [--iters N] | reg [--size LIST] [--iters N]",
			"perftest-style RDMA WRITE/READ/SEND and expected-receive bandwidth, message rate and latency vs memcpy, every message checked; TID cache; REG_MR+DEREG_MR cost", cmdBench},
		// Verbs (cmds_verbs.go, cmds_wr.go).
		"mr":         {"reg NAME BUF[:OFF[:LEN]] [--access LIST] [--iova X] [--odp] | reg NAME --implicit [--access LIST] | dereg NAME | show [NAME]", "REG_MR, DEREG_MR, MR_STATS (access: local_write,remote_write,remote_read,remote_atomic; --odp: on_demand; --implicit: the whole address space, on_demand)", cmdMR},
		"advise-mr":  {"MR [--advice prefetch|prefetch_write|prefetch_no_fault] [--flush] [--off N] [--len N]", "GOHFI_IOCTL_ADVISE_MR on an ODP MR (the whole MR by default), then MR_STATS", cmdAdviseMR},
		"cq":         {"create NAME [--cqe N] | destroy NAME | show [NAME]", "CREATE_CQ, DESTROY_CQ", cmdCQ},
		"peer":       {"add N ADDR:PORT | del N | show", "the network port: peer table entry N (MODIFY_QP's dest_port) to the peer device at ADDR:PORT; show: the port's address and GID, the peers, the port's counters", cmdPeer},
		"qp":         {"create NAME --cq CQ|--send-cq CQ --recv-cq CQ [--max-send-wr N] [--max-recv-wr N] [--max-send-sge N] [--max-recv-sge N] [--sig-all] | modify NAME --state reset|init|rtr|rts|err [--dest-qp QPN|QP] [--access LIST] [--sq-psn N] [--rq-psn N] | destroy NAME | show [NAME]", "CREATE_QP (RC), MODIFY_QP, DESTROY_QP", cmdQP},
		"pingpong":   {"[--server | HOST] [-p PORT] [-s SIZE] [-n ITERS] [-r RX_DEPTH] [-g 0] [-m 1024] [-c] [--peer N] [--timeout D]", "ibv_rc_pingpong's exchange (TCP, port 18515) and SEND ping-pong on an RC QP over the network port, every message checked (docs/hfictl.md)", cmdPingpong},
		"rdma-check": {"[--server | HOST] [-p PORT] [-s SIZE] [--peer N] [--timeout D]", "RDMA READ and WRITE with a RoCEv2 peer over the network port (keys exchanged over TCP, port 18516), data checked at both ends (docs/hfictl.md)", cmdRDMACheck},
		"alloc-mr":   {"NAME [--max-num-sg N]", "ALLOC_MR: a fast-registration MR, bound by post-send --op fast-reg", cmdAllocMR},
		"post-send":  {"QP --op write|write-imm|send|send-imm|read|cas|faa|fast-reg|local-inv|send-inv|read-inv [--sge BUF[:OFF[:LEN]]@MR]... [--remote MR[:OFF]|ADDR] [--rkey K] [--imm N] [--compare-add N] [--swap N] [--mr FRMR --pages BUF[:OFF][@MR],... [--page-shift N] [--iova X] [--length N] [--key-variant V] [--access LIST]] [--inv-key K|MR] [--signaled] [--fence] [--wr-id N]", "POST_SEND of one work request", cmdPostSend},
		"post-recv":  {"QP [--sge BUF[:OFF[:LEN]]@MR]... [--wr-id N]", "POST_RECV of one work request", cmdPostRecv},
		"poll-cq":    {"CQ [--wait D] [--min N] [--max N]", "POLL_CQ, waiting in File.Poll up to D for N completions; statuses as ibv_wc_status_str", cmdPollCQ},
		// Expected receive (cmds_tid.go).
		"tid-update":     {"BUF [--offset O] [--len L]", "HFI1_IOCTL_TID_UPDATE on a buffer", cmdTidUpdate},
		"tid-free":       {"BUF|TID[,TID...]...", "HFI1_IOCTL_TID_FREE of a buffer's TIDs or of TIDs given", cmdTidFree},
		"tid-inval-read": {"[--max N]", "HFI1_IOCTL_TID_INVAL_READ", cmdTidInvalRead},
		// Buffers (buffers.go).
		"alloc":    {"NAME SIZE [--memfd]", "map a buffer outside the Go heap (anonymous or memfd)", cmdAlloc},
		"fill":     {"NAME PATTERN [--offset O] [--len L]", "fill: BYTE, seq, zero, rand[:SEED], text:STRING", cmdFill},
		"checksum": {"NAME [--offset O] [--len L]", "CRC-32C of a buffer", cmdChecksum},
		"munmap":   {"NAME", "unmap a buffer, keeping its name and address", cmdMunmap},
		"free":     {"NAME", "unmap a buffer (and close its memfd) and forget it", cmdFree},
		"buffers":  {"", "list buffers", cmdBuffers},
		// Open files (shell.go).
		"open":  {"NAME", "open the device again as NAME and make it current", cmdOpen},
		"use":   {"NAME", "make open file NAME current", cmdUse},
		"close": {"[NAME]", "close an open file (releasing its context)", cmdClose},
		"files": {"", "list open files", cmdFiles},
	}
}

// session is the state one invocation or one shell keeps: the attached
// device, open files, named buffers.
type session struct {
	ctx  context.Context
	spec string
	opts attach.Options
	p    *printer

	att   *attach.Attached
	files map[string]*openFile
	cur   string
	bufs  map[string]*buffer
	verbs verbsObjs // MRs, CQs and QPs by name
	trace *tracing  // a running `trace on`

	// arg holds ioctl argument structs: user memory outside the Go heap,
	// as a C caller's would be.
	arg *mem.Buffer
}

// defaultFile is the name of the file opened on first use.
const defaultFile = "default"

func newSession(ctx context.Context, spec string, opts attach.Options, p *printer) *session {
	return &session{ctx: ctx, spec: spec, opts: opts, p: p,
		files: map[string]*openFile{}, bufs: map[string]*buffer{}, verbs: newVerbsObjs(), cur: defaultFile}
}

// exec runs one command and prints its result; it reports success.
func (s *session) exec(name string, args []string) bool {
	c, ok := commands[name]
	if !ok {
		s.p.fail(name, fmt.Errorf("unknown command %q (hfictl help lists them): %w", name, unix.EINVAL))
		return false
	}
	if subCommands[name] && len(args) > 0 {
		name += " " + args[0] // "mr reg": the result says which
	}
	o, err := c.run(s, args)
	if err != nil {
		s.p.fail(name, err)
		return false
	}
	s.p.result(name, o)
	return true
}

// device attaches to the device on first use.
func (s *session) device() (*attach.Attached, error) {
	if s.att == nil {
		a, err := attach.Open(s.ctx, s.spec, s.opts)
		if err != nil {
			return nil, err
		}
		s.att = a
	}
	return s.att, nil
}

// file returns the current open file, opening the default one on first use.
func (s *session) file() (*openFile, error) {
	if of, ok := s.files[s.cur]; ok {
		return of, nil
	}
	if s.cur != defaultFile {
		return nil, fmt.Errorf("file %q is closed (open or use another): %w", s.cur, unix.EBADF)
	}
	return s.openFile(defaultFile)
}

// parseFile parses a command that takes flags only and works on the
// current file, and returns the file.
func (s *session) parseFile(fs *flag.FlagSet, args []string) (*openFile, error) {
	if _, err := parseArgs(fs, args, 0, 0); err != nil {
		return nil, err
	}
	return s.file()
}

func (s *session) openFile(name string) (*openFile, error) {
	a, err := s.device()
	if err != nil {
		return nil, err
	}
	f, err := a.Device.Open()
	if err != nil {
		return nil, err
	}
	of := &openFile{name: name, f: f}
	s.files[name] = of
	return of, nil
}

// close releases everything: files (and their contexts), the device, buffers.
func (s *session) close() error {
	var errs []error
	s.traceOff()
	for _, name := range sortedKeys(s.files) {
		errs = append(errs, s.files[name].close())
	}
	s.files = map[string]*openFile{}
	s.verbs = newVerbsObjs()
	if s.att != nil {
		errs = append(errs, s.att.Close())
		s.att = nil
	}
	for _, name := range sortedKeys(s.bufs) {
		errs = append(errs, s.bufs[name].b.Close())
	}
	s.bufs = map[string]*buffer{}
	if s.arg != nil {
		errs = append(errs, s.arg.Close())
		s.arg = nil
	}
	return errors.Join(errs...)
}

// argBytes returns n zeroed bytes of the argument page.
func (s *session) argBytes(n int) ([]byte, error) {
	if s.arg == nil {
		b, err := mem.Alloc(mem.PageSize())
		if err != nil {
			return nil, err
		}
		s.arg = b
	}
	b := s.arg.Bytes()[:n]
	clear(b)
	return b, nil
}

// ioctl passes m to cmd as the C caller would: marshalled into user memory,
// by address, and decoded back after the call.
func (s *session) ioctl(of *openFile, cmd uint32, m uapi.Marshallable) error {
	b, err := s.argBytes(m.SizeBytes())
	if err != nil {
		return err
	}
	m.MarshalBytes(b)
	if _, err := of.f.Ioctl(cmd, driver.UserAddr(uint64(s.arg.Addr()))); err != nil {
		return err
	}
	return m.UnmarshalBytes(b)
}

// openFile is one open of the device and what hfictl learned about it.
type openFile struct {
	name string
	f    *driver.File

	ci *uapi.Hfi1CtxtInfo // set by assign-ctxt
	bi *uapi.Hfi1BaseInfo

	rhq, eager, events []byte // mmapped on first use
	head               uint64 // next header queue entry to read
	seq                uint32 // sequence number it must carry

	tids []tidRec // TIDs programmed through this file, by buffer
}

func (of *openFile) close() error {
	return errors.Join(of.unmapRings(), of.f.Close())
}

// unmapRings unmaps what was mmapped of the file. A mapping that fails to
// unmap is forgotten all the same (munmap fails only for a range that is
// not a mapping), and its error returned.
func (of *openFile) unmapRings() error {
	var errs []error
	for _, r := range []struct {
		name string
		m    *[]byte
	}{{"header queue", &of.rhq}, {"eager buffers", &of.eager}, {"events page", &of.events}} {
		if *r.m != nil {
			if err := unix.Munmap(*r.m); err != nil {
				errs = append(errs, fmt.Errorf("%s: munmap %s: %w", of.name, r.name, err))
			}
			*r.m = nil
		}
	}
	return errors.Join(errs...)
}

// closeFiles closes files a command opened for itself (bench), each
// failure named by its file.
func closeFiles(files ...*openFile) error {
	var errs []error
	for _, of := range files {
		if of != nil {
			if err := of.close(); err != nil {
				errs = append(errs, fmt.Errorf("closing %s: %w", of.name, err))
			}
		}
	}
	return errors.Join(errs...)
}

// cleanup runs a deferred cleanup and joins its failure, as "what: error"
// (or as it is when what is ""), after the error the command returns: a
// cleanup that fails leaves state behind, in the shell for the commands
// that follow.
func cleanup(err *error, what string, f func() error) {
	cerr := f()
	if cerr == nil {
		return
	}
	if what != "" {
		cerr = fmt.Errorf("%s: %w", what, cerr)
	}
	*err = errors.Join(*err, cerr)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// newFlags returns a flag set for a command; errors are returned, not
// printed.
func newFlags(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	return fs
}

// parseArgs parses flags anywhere among the arguments ("send eager 1 64
// --tag 7") and checks the number of positional arguments.
func parseArgs(fs *flag.FlagSet, args []string, min, max int) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, usageErr("%v", err)
		}
		args = fs.Args()
		if len(args) == 0 {
			break
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
	if len(pos) < min || (max >= 0 && len(pos) > max) {
		c := commands[fs.Name()]
		return nil, usageErr("usage: %s", strings.TrimSpace(fs.Name()+" "+c.args))
	}
	return pos, nil
}

// usageErr is a malformed command: EINVAL, as the kernel would say.
func usageErr(format string, a ...any) error {
	return fmt.Errorf("%s: %w", fmt.Sprintf(format, a...), unix.EINVAL)
}

// parseUint parses a number in any Go base (0x.., 0b.., 0o..) within bits.
func parseUint(what, s string, bits int) (uint64, error) {
	v, err := strconv.ParseUint(s, 0, bits)
	if err != nil {
		return 0, usageErr("%s %q: not a %d-bit number", what, s, bits)
	}
	return v, nil
}

// parseSize parses a byte count with an optional binary suffix: 4096, 0x1000,
// 64k, 2M, 1G.
func parseSize(what, s string) (int, error) {
	mult := uint64(1)
	if n := len(s); n > 1 {
		switch s[n-1] {
		case 'k', 'K':
			mult = 1 << 10
		case 'm', 'M':
			mult = 1 << 20
		case 'g', 'G':
			mult = 1 << 30
		}
		if mult != 1 {
			s = s[:n-1]
		}
	}
	v, err := strconv.ParseUint(s, 0, 40)
	if err != nil {
		return 0, usageErr("%s %q: not a size", what, s)
	}
	return int(v * mult), nil
}
