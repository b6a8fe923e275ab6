package uapi

import (
	"fmt"
	"go/ast"
	"go/token"
	"os"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"github.com/gohfi/gohfi/internal/ctest"
	"github.com/gohfi/gohfi/internal/testenv"
)

// abiStructs lists every ABI struct with its C name.
var abiStructs = []struct {
	c    string
	v    Marshallable
	hfi1 bool // defined by the kernel headers (else gohfi's own)
}{
	{"hfi1_user_info", &Hfi1UserInfo{}, true},
	{"hfi1_ctxt_info", &Hfi1CtxtInfo{}, true},
	{"hfi1_tid_info", &Hfi1TidInfo{}, true},
	{"hfi1_base_info", &Hfi1BaseInfo{}, true},
	{"gohfi_device_attr", &GohfiDeviceAttr{}, false},
	{"gohfi_reg_mr", &GohfiRegMR{}, false},
	{"gohfi_handle", &GohfiHandle{}, false},
	{"gohfi_advise_mr", &GohfiAdviseMR{}, false},
	{"gohfi_alloc_mr", &GohfiAllocMR{}, false},
	{"gohfi_create_cq", &GohfiCreateCQ{}, false},
	{"gohfi_create_qp", &GohfiCreateQP{}, false},
	{"gohfi_modify_qp", &GohfiModifyQP{}, false},
	{"gohfi_sge", &GohfiSge{}, false},
	{"gohfi_send_wr", &GohfiSendWR{}, false},
	{"gohfi_recv_wr", &GohfiRecvWR{}, false},
	{"gohfi_post_send", &GohfiPostSend{}, false},
	{"gohfi_post_recv", &GohfiPostRecv{}, false},
	{"gohfi_wc", &GohfiWC{}, false},
	{"gohfi_poll_cq", &GohfiPollCQ{}, false},
	{"gohfi_mr_stats", &GohfiMRStats{}, false},
	{"gohfi_driver_stats", &GohfiDriverStats{}, false},
	{"gohfi_send", &GohfiSend{}, false},
	{"gohfi_rhq_entry", &GohfiRHQEntry{}, false},
}

// systemOnly are checks that need the installed uverbs headers: gohfi takes
// these values from Linux's user verbs ABI.
var systemOnly = []struct {
	c string
	v uint64
}{
	{"IB_UVERBS_DEVICE_MEM_MGT_EXTENSIONS", IB_DEVICE_MEM_MGT_EXTENSIONS},
	{"IB_UVERBS_DEVICE_RC_RNR_NAK_GEN", IB_DEVICE_RC_RNR_NAK_GEN},
	{"IB_UVERBS_DEVICE_N_NOTIFY_CQ", IB_DEVICE_N_NOTIFY_CQ},
	{"IB_UVERBS_DEVICE_MEM_WINDOW", IB_DEVICE_MEM_WINDOW},
	{"IB_UVERBS_ACCESS_LOCAL_WRITE", IB_ACCESS_LOCAL_WRITE},
	{"IB_UVERBS_ACCESS_REMOTE_WRITE", IB_ACCESS_REMOTE_WRITE},
	{"IB_UVERBS_ACCESS_REMOTE_READ", IB_ACCESS_REMOTE_READ},
	{"IB_UVERBS_ACCESS_REMOTE_ATOMIC", IB_ACCESS_REMOTE_ATOMIC},
	{"IB_UVERBS_ACCESS_MW_BIND", IB_ACCESS_MW_BIND},
	{"IB_UVERBS_ACCESS_ZERO_BASED", IB_ACCESS_ZERO_BASED},
	{"IB_UVERBS_ACCESS_ON_DEMAND", IB_ACCESS_ON_DEMAND},
	{"IB_UVERBS_ACCESS_HUGETLB", IB_ACCESS_HUGETLB},
	{"IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH", GOHFI_ADVISE_MR_ADVICE_PREFETCH},
	{"IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_WRITE", GOHFI_ADVISE_MR_ADVICE_PREFETCH_WRITE},
	{"IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_NO_FAULT", GOHFI_ADVISE_MR_ADVICE_PREFETCH_NO_FAULT},
	{"IB_UVERBS_ADVISE_MR_FLAG_FLUSH", GOHFI_ADVISE_MR_FLAG_FLUSH},
	{"IB_UVERBS_WR_RDMA_WRITE", GOHFI_WR_RDMA_WRITE},
	{"IB_UVERBS_WR_RDMA_WRITE_WITH_IMM", GOHFI_WR_RDMA_WRITE_WITH_IMM},
	{"IB_UVERBS_WR_SEND", GOHFI_WR_SEND},
	{"IB_UVERBS_WR_SEND_WITH_IMM", GOHFI_WR_SEND_WITH_IMM},
	{"IB_UVERBS_WR_RDMA_READ", GOHFI_WR_RDMA_READ},
	{"IB_UVERBS_WR_ATOMIC_CMP_AND_SWP", GOHFI_WR_ATOMIC_CMP_AND_SWP},
	{"IB_UVERBS_WR_ATOMIC_FETCH_AND_ADD", GOHFI_WR_ATOMIC_FETCH_AND_ADD},
	{"IB_UVERBS_WR_LOCAL_INV", GOHFI_WR_LOCAL_INV},
	{"IB_UVERBS_WR_BIND_MW", GOHFI_WR_BIND_MW},
	{"IB_UVERBS_WR_SEND_WITH_INV", GOHFI_WR_SEND_WITH_INV},
	{"IB_UVERBS_WR_RDMA_READ_WITH_INV", GOHFI_WR_RDMA_READ_WITH_INV},
	{"IB_UVERBS_WC_SEND", GOHFI_WC_SEND},
	{"IB_UVERBS_WC_RDMA_WRITE", GOHFI_WC_RDMA_WRITE},
	{"IB_UVERBS_WC_RDMA_READ", GOHFI_WC_RDMA_READ},
	{"IB_UVERBS_WC_COMP_SWAP", GOHFI_WC_COMP_SWAP},
	{"IB_UVERBS_WC_FETCH_ADD", GOHFI_WC_FETCH_ADD},
	{"IB_UVERBS_WC_BIND_MW", GOHFI_WC_BIND_MW},
	{"IB_UVERBS_WC_LOCAL_INV", GOHFI_WC_LOCAL_INV},
	{"sizeof(struct ib_uverbs_sge)", SizeofGohfiSge},
	{"offsetof(struct ib_uverbs_sge, length)", 8},
	{"offsetof(struct ib_uverbs_sge, lkey)", 12},
}

// Sample inputs for the encoding computed on both sides.
var tidSamples = [][2]uint32{{0, 1}, {1, 1}, {2, 512}, {3, 7}, {1022, 8}, {1023, 2047}, {77, 64}}

// goExpectations builds the checks from the Go side: struct sizes, field
// offsets and sizes (via reflect), constants, encodings.
func goExpectations(system bool) []ctest.Expectation {
	var ex []ctest.Expectation
	for _, s := range abiStructs {
		ex = append(ex, ctest.StructLayout(s.c, reflect.TypeOf(s.v).Elem())...)
	}
	for _, c := range cConstants {
		ex = append(ex, ctest.Expectation{Key: "const " + c.name, Expr: c.c, Want: c.v})
	}
	for _, s := range tidSamples {
		ex = append(ex, ctest.Expectation{Key: fmt.Sprintf("create_tid(%d,%d)", s[0], s[1]),
			Expr: fmt.Sprintf("create_tid(%d, %d)", s[0], s[1]), Want: uint64(CreateTid(s[0], s[1]))})
	}
	if system {
		for _, s := range systemOnly {
			ex = append(ex, ctest.Expectation{Key: "uverbs " + s.c, Expr: s.c, Want: s.v})
		}
	}
	return ex
}

// cProgram writes the C source printing every expectation's value.
func cProgram(system bool, ex []ctest.Expectation) string {
	var b strings.Builder
	if system {
		b.WriteString(cPreludeSystem)
	} else {
		b.WriteString(cPreludeOwn)
		b.WriteString(cHfi1UAPI)
	}
	b.WriteString(cHfi1Private)
	b.WriteString(cGohfi)
	return ctest.Program(b.String(), ex)
}

// TestParityOwnHeaders compiles the C definitions written in cdefs_test.go.
func TestParityOwnHeaders(t *testing.T) {
	gcc := ctest.GCC(t)
	ex := goExpectations(false)
	ctest.Compare(t, ex, ctest.Run(t, gcc, cProgram(false, ex)))
	if !t.Failed() {
		t.Logf("%d values agree with C", len(ex))
	}
}

// TestParitySystemHeaders compiles against the installed kernel uapi headers
// (Debian's linux-libc-dev ships rdma/hfi/hfi1_ioctl.h and hfi1_user.h).
func TestParitySystemHeaders(t *testing.T) {
	gcc := ctest.GCC(t)
	if _, err := os.Stat("/usr/include/rdma/hfi/hfi1_ioctl.h"); err != nil {
		testenv.Missing(t, "no /usr/include/rdma/hfi/hfi1_ioctl.h (install linux-libc-dev); own C definitions are still checked")
	}
	ex := goExpectations(true)
	ctest.Compare(t, ex, ctest.Run(t, gcc, cProgram(true, ex)))
	if !t.Failed() {
		t.Logf("%d values agree with the system headers", len(ex))
	}
}

var cStyleName = regexp.MustCompile(`^_?[A-Z][A-Z0-9_]*$`)

// TestConstantTableComplete fails when a C-style constant is added to the
// package without being added to cConstants (and so to the C comparison),
// or a struct without being added to abiStructs.
func TestConstantTableComplete(t *testing.T) {
	_, files := ctest.PackageFiles(t)
	inTable := map[string]bool{}
	for _, c := range cConstants {
		inTable[c.name] = true
	}
	structs := map[string]bool{}
	for _, s := range abiStructs {
		structs[reflect.TypeOf(s.v).Elem().Name()] = true
	}
	for _, f := range files {
		for _, d := range f.Decls {
			g, ok := d.(*ast.GenDecl)
			if !ok {
				continue
			}
			for _, sp := range g.Specs {
				switch sp := sp.(type) {
				case *ast.ValueSpec:
					if g.Tok != token.CONST {
						continue
					}
					for _, n := range sp.Names {
						if cStyleName.MatchString(n.Name) && !inTable[n.Name] && !goOnlyConstants[n.Name] {
							t.Errorf("constant %s is not compared with C: add it to cConstants and cdefs_test.go", n.Name)
						}
					}
				case *ast.TypeSpec:
					if _, isStruct := sp.Type.(*ast.StructType); isStruct && sp.Name.IsExported() && !structs[sp.Name.Name] {
						t.Errorf("struct %s is not in abiStructs", sp.Name.Name)
					}
				}
			}
		}
	}
}

// TestReferenceNumbers pins the numbers of REFERENCE.md, independent of C.
func TestReferenceNumbers(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, want uint32
	}{
		{"TID_UPDATE", HFI1_IOCTL_TID_UPDATE, 0xC0181BE4},
		{"TID_FREE", HFI1_IOCTL_TID_FREE, 0xC0181BE5},
		{"TID_INVAL_READ", HFI1_IOCTL_TID_INVAL_READ, 0xC0181BED},
		{"ASSIGN_CTXT", HFI1_IOCTL_ASSIGN_CTXT, 0xC01C1BE1},
		{"CTXT_INFO", HFI1_IOCTL_CTXT_INFO, 0x40281BE2},
		{"USER_INFO", HFI1_IOCTL_USER_INFO, 0x40781BE3},
		{"GET_VERS", HFI1_IOCTL_GET_VERS, 0x80041BEE},
		{"CREDIT_UPD", HFI1_IOCTL_CREDIT_UPD, 0x1BE6},
		{"CTXT_RESET", HFI1_IOCTL_CTXT_RESET, 0x1BEC},
		{"ACK_EVENT", HFI1_IOCTL_ACK_EVENT, 0x40081BEA},
		{"SET_PKEY", HFI1_IOCTL_SET_PKEY, 0x40021BEB},
		{"RECV_CTRL", HFI1_IOCTL_RECV_CTRL, 0x40041BE8},
		{"POLL_TYPE", HFI1_IOCTL_POLL_TYPE, 0x40041BE9},
		// The functions agree with the constants.
		{"IOWR(TID_UPDATE)", IOWR(RDMA_IOCTL_MAGIC, 0xE4, SizeofHfi1TidInfo), HFI1_IOCTL_TID_UPDATE},
		{"IOW(CTXT_INFO)", IOW(RDMA_IOCTL_MAGIC, 0xE2, SizeofHfi1CtxtInfo), HFI1_IOCTL_CTXT_INFO},
		{"IOR(GET_VERS)", IOR(RDMA_IOCTL_MAGIC, 0xEE, 4), HFI1_IOCTL_GET_VERS},
		{"IO(CREDIT_UPD)", IO(RDMA_IOCTL_MAGIC, 0xE6), HFI1_IOCTL_CREDIT_UPD},
	} {
		if c.got != c.want {
			t.Errorf("%s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
	for _, c := range []struct {
		name      string
		got, want int
	}{
		{"hfi1_user_info", (&Hfi1UserInfo{}).SizeBytes(), 28},
		{"hfi1_ctxt_info", (&Hfi1CtxtInfo{}).SizeBytes(), 40},
		{"hfi1_tid_info", (&Hfi1TidInfo{}).SizeBytes(), 24},
		{"hfi1_base_info", (&Hfi1BaseInfo{}).SizeBytes(), 120},
	} {
		if c.got != c.want {
			t.Errorf("sizeof %s = %d, want %d", c.name, c.got, c.want)
		}
	}
	if HFI1_USER_SWVERSION != 0x60003 {
		t.Errorf("HFI1_USER_SWVERSION = %#x", HFI1_USER_SWVERSION)
	}
	if HFI1_EVENT_TID_MMU_NOTIFY != 1<<5 || HFI1_CAP_TID_UNMAP != 1<<10 || IB_DEVICE_MEM_MGT_EXTENSIONS != 1<<21 {
		t.Error("event/capability bits differ from REFERENCE.md")
	}
}

// TestCommandNumbersDecode checks every command's fields: magic, direction,
// size equal to its struct, gohfi numbers inside their range, no duplicates.
func TestCommandNumbersDecode(t *testing.T) {
	cmds := []struct {
		name     string
		cmd      uint32
		dir, nr  uint32
		argBytes int
	}{
		{"HFI1_IOCTL_ASSIGN_CTXT", HFI1_IOCTL_ASSIGN_CTXT, IOC_READ | IOC_WRITE, 0xE1, SizeofHfi1UserInfo},
		{"HFI1_IOCTL_CTXT_INFO", HFI1_IOCTL_CTXT_INFO, IOC_WRITE, 0xE2, SizeofHfi1CtxtInfo},
		{"HFI1_IOCTL_USER_INFO", HFI1_IOCTL_USER_INFO, IOC_WRITE, 0xE3, SizeofHfi1BaseInfo},
		{"HFI1_IOCTL_TID_UPDATE", HFI1_IOCTL_TID_UPDATE, IOC_READ | IOC_WRITE, 0xE4, SizeofHfi1TidInfo},
		{"HFI1_IOCTL_TID_FREE", HFI1_IOCTL_TID_FREE, IOC_READ | IOC_WRITE, 0xE5, SizeofHfi1TidInfo},
		{"HFI1_IOCTL_CREDIT_UPD", HFI1_IOCTL_CREDIT_UPD, IOC_NONE, 0xE6, 0},
		{"HFI1_IOCTL_RECV_CTRL", HFI1_IOCTL_RECV_CTRL, IOC_WRITE, 0xE8, 4},
		{"HFI1_IOCTL_POLL_TYPE", HFI1_IOCTL_POLL_TYPE, IOC_WRITE, 0xE9, 4},
		{"HFI1_IOCTL_ACK_EVENT", HFI1_IOCTL_ACK_EVENT, IOC_WRITE, 0xEA, 8},
		{"HFI1_IOCTL_SET_PKEY", HFI1_IOCTL_SET_PKEY, IOC_WRITE, 0xEB, 2},
		{"HFI1_IOCTL_CTXT_RESET", HFI1_IOCTL_CTXT_RESET, IOC_NONE, 0xEC, 0},
		{"HFI1_IOCTL_TID_INVAL_READ", HFI1_IOCTL_TID_INVAL_READ, IOC_READ | IOC_WRITE, 0xED, SizeofHfi1TidInfo},
		{"HFI1_IOCTL_GET_VERS", HFI1_IOCTL_GET_VERS, IOC_READ, 0xEE, 4},
		{"GOHFI_IOCTL_QUERY_DEVICE", GOHFI_IOCTL_QUERY_DEVICE, IOC_READ, 0x40, SizeofGohfiDeviceAttr},
		{"GOHFI_IOCTL_REG_MR", GOHFI_IOCTL_REG_MR, IOC_READ | IOC_WRITE, 0x41, SizeofGohfiRegMR},
		{"GOHFI_IOCTL_DEREG_MR", GOHFI_IOCTL_DEREG_MR, IOC_WRITE, 0x42, SizeofGohfiHandle},
		{"GOHFI_IOCTL_ADVISE_MR", GOHFI_IOCTL_ADVISE_MR, IOC_WRITE, 0x43, SizeofGohfiAdviseMR},
		{"GOHFI_IOCTL_ALLOC_MR", GOHFI_IOCTL_ALLOC_MR, IOC_READ | IOC_WRITE, 0x44, SizeofGohfiAllocMR},
		{"GOHFI_IOCTL_CREATE_CQ", GOHFI_IOCTL_CREATE_CQ, IOC_READ | IOC_WRITE, 0x45, SizeofGohfiCreateCQ},
		{"GOHFI_IOCTL_DESTROY_CQ", GOHFI_IOCTL_DESTROY_CQ, IOC_WRITE, 0x46, SizeofGohfiHandle},
		{"GOHFI_IOCTL_CREATE_QP", GOHFI_IOCTL_CREATE_QP, IOC_READ | IOC_WRITE, 0x47, SizeofGohfiCreateQP},
		{"GOHFI_IOCTL_MODIFY_QP", GOHFI_IOCTL_MODIFY_QP, IOC_WRITE, 0x48, SizeofGohfiModifyQP},
		{"GOHFI_IOCTL_DESTROY_QP", GOHFI_IOCTL_DESTROY_QP, IOC_WRITE, 0x49, SizeofGohfiHandle},
		{"GOHFI_IOCTL_POST_SEND", GOHFI_IOCTL_POST_SEND, IOC_READ | IOC_WRITE, 0x4a, SizeofGohfiPostSend},
		{"GOHFI_IOCTL_POST_RECV", GOHFI_IOCTL_POST_RECV, IOC_READ | IOC_WRITE, 0x4b, SizeofGohfiPostRecv},
		{"GOHFI_IOCTL_POLL_CQ", GOHFI_IOCTL_POLL_CQ, IOC_READ | IOC_WRITE, 0x4c, SizeofGohfiPollCQ},
		{"GOHFI_IOCTL_MR_STATS", GOHFI_IOCTL_MR_STATS, IOC_READ | IOC_WRITE, 0x4d, SizeofGohfiMRStats},
		{"GOHFI_IOCTL_DRIVER_STATS", GOHFI_IOCTL_DRIVER_STATS, IOC_READ, 0x4e, SizeofGohfiDriverStats},
		{"GOHFI_IOCTL_RCVHDR_HEAD", GOHFI_IOCTL_RCVHDR_HEAD, IOC_WRITE, 0x50, 8},
		{"GOHFI_IOCTL_SEND", GOHFI_IOCTL_SEND, IOC_READ | IOC_WRITE, 0x51, SizeofGohfiSend},
	}
	seen := map[uint32]string{}
	for _, c := range cmds {
		if IOC_TYPE(c.cmd) != RDMA_IOCTL_MAGIC || IOC_NR(c.cmd) != c.nr || IOC_DIR(c.cmd) != c.dir || IOC_SIZE(c.cmd) != uint32(c.argBytes) {
			t.Errorf("%s = %#x: type %#x nr %#x dir %d size %d", c.name, c.cmd, IOC_TYPE(c.cmd), IOC_NR(c.cmd), IOC_DIR(c.cmd), IOC_SIZE(c.cmd))
		}
		if strings.HasPrefix(c.name, "GOHFI_") && (c.nr < GOHFI_CMD_FIRST || c.nr > GOHFI_CMD_LAST) {
			t.Errorf("%s: number %#x outside gohfi's range", c.name, c.nr)
		}
		if prev, dup := seen[IOC_NR(c.cmd)]; dup {
			t.Errorf("%s and %s share number %#x", c.name, prev, IOC_NR(c.cmd))
		}
		seen[IOC_NR(c.cmd)] = c.name
	}
}

// TestSendWRLayout pins struct gohfi_send_wr as it grew for atomics: 104 ->
// 120 bytes, compare_add and swap appended at 104 and 112 (naturally
// aligned, no padding; the fields before them keep their offsets).
// POST_SEND's number does not change: its size field is that of its
// argument, struct gohfi_post_send (24 bytes); the element size travels in
// wqe_size, which the driver checks.
func TestSendWRLayout(t *testing.T) {
	rt := reflect.TypeOf(GohfiSendWR{})
	if rt.Size() != 120 || SizeofGohfiSendWR != 120 {
		t.Errorf("sizeof(struct gohfi_send_wr) = %d (const %d), want 120", rt.Size(), SizeofGohfiSendWR)
	}
	for _, c := range []struct {
		field string
		off   uintptr
	}{{"SgList", 24}, {"RemoteAddr", 32}, {"Rkey", 40}, {"FrIova", 48}, {"RemotePort", 100}, {"CompareAdd", 104}, {"Swap", 112}} {
		if f, ok := rt.FieldByName(c.field); !ok || f.Offset != c.off {
			t.Errorf("gohfi_send_wr.%s at %d, want %d", c.field, f.Offset, c.off)
		}
	}
	if GOHFI_IOCTL_POST_SEND != 0xC0181B4A {
		t.Errorf("GOHFI_IOCTL_POST_SEND = %#x, want 0xC0181B4A", GOHFI_IOCTL_POST_SEND)
	}
}
