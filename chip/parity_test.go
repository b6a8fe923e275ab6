package chip

import (
	"fmt"
	"go/ast"
	"go/token"
	"regexp"
	"testing"

	"github.com/gohfi/gohfi/internal/ctest"
)

// cRcvArray mirrors what hfi1 defines for the RcvArray entry, in no
// installed header: drivers/infiniband/hw/hfi1/chip_registers.h (the field
// macros), hfi.h (RCV_INCREMENT), user_exp_rcv.c (MAX_EXPECTED_BUFFER) and
// chip.c (hfi1_put_tid, here for a PT_EXPECTED entry).
const cRcvArray = `
#include <stdint.h>
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef uint64_t __u64;

#define RCV_ARRAY_RT_ADDR_SHIFT 0
#define RCV_ARRAY_RT_ADDR_MASK 0xFFFFFFFFFull
#define RCV_ARRAY_RT_BUF_SIZE_SHIFT 36
#define RCV_ARRAY_RT_BUF_SIZE_MASK 0xFull /* gohfi's name: hfi1 has no mask macro */
#define RCV_ARRAY_RT_WRITE_ENABLE_SMASK 0x8000000000000000ull
#define RT_ADDR_SHIFT 12
#define RCV_INCREMENT 8
#define MAX_EXPECTED_BUFFER (2048 * 1024)

static int ilog2_u32(__u32 v)
{
	return 31 - __builtin_clz(v);
}

/* The word hfi1_put_tid writes for a PT_EXPECTED entry. */
static __u64 put_tid_reg(unsigned long pa, __u32 npages)
{
	__u16 order = npages ? ilog2_u32(npages) + 1 : 0;

	if (!npages)
		pa = 0;
	return RCV_ARRAY_RT_WRITE_ENABLE_SMASK
		| (__u64)order << RCV_ARRAY_RT_BUF_SIZE_SHIFT
		| ((pa >> RT_ADDR_SHIFT) & RCV_ARRAY_RT_ADDR_MASK)
			<< RCV_ARRAY_RT_ADDR_SHIFT;
}
`

// cConstants pairs the Go constants with the C expressions they must equal.
// C-style names must all be here (TestConstantTableComplete).
var cConstants = []struct {
	name, c string
	v       uint64
}{
	{"RCV_ARRAY_RT_ADDR_SHIFT", "RCV_ARRAY_RT_ADDR_SHIFT", RCV_ARRAY_RT_ADDR_SHIFT},
	{"RCV_ARRAY_RT_ADDR_MASK", "RCV_ARRAY_RT_ADDR_MASK", RCV_ARRAY_RT_ADDR_MASK},
	{"RCV_ARRAY_RT_BUF_SIZE_SHIFT", "RCV_ARRAY_RT_BUF_SIZE_SHIFT", RCV_ARRAY_RT_BUF_SIZE_SHIFT},
	{"RCV_ARRAY_RT_BUF_SIZE_MASK", "RCV_ARRAY_RT_BUF_SIZE_MASK", RCV_ARRAY_RT_BUF_SIZE_MASK},
	{"RCV_ARRAY_RT_WRITE_ENABLE_SMASK", "RCV_ARRAY_RT_WRITE_ENABLE_SMASK", RCV_ARRAY_RT_WRITE_ENABLE_SMASK},
	{"RcvArrayPageShift", "RT_ADDR_SHIFT", RcvArrayPageShift},
	{"RcvArrayGroupSize", "RCV_INCREMENT", RcvArrayGroupSize},
	{"MAX_EXPECTED_BUFFER", "MAX_EXPECTED_BUFFER", MAX_EXPECTED_BUFFER},
	{"MaxTIDPages", "MAX_EXPECTED_BUFFER >> RT_ADDR_SHIFT", MaxTIDPages},
}

// rcvSamples are buffers whose entry both sides compute.
var rcvSamples = []struct {
	pa     uint64
	npages uint32
}{{0, 0}, {0x1000, 1}, {0x7fff_ffff_f000, 512}, {0x1234_5000, 8}, {0xdead_b000, 3}, {0xffff_ffff_ffff_f000, 16}}

// TestParityRcvArray compiles hfi1's definitions of the RcvArray entry and
// compares its constants, and the entries of rcvSamples, with the Go side.
func TestParityRcvArray(t *testing.T) {
	gcc := ctest.GCC(t)
	var ex []ctest.Expectation
	for _, c := range cConstants {
		ex = append(ex, ctest.Expectation{Key: "const " + c.name, Expr: c.c, Want: c.v})
	}
	for _, s := range rcvSamples {
		ex = append(ex, ctest.Expectation{Key: fmt.Sprintf("put_tid(%#x,%d)", s.pa, s.npages),
			Expr: fmt.Sprintf("put_tid_reg(%#xUL, %d)", s.pa, s.npages), Want: RcvArrayEntry(s.pa, s.npages)})
	}
	ctest.Compare(t, ex, ctest.Run(t, gcc, ctest.Program(cRcvArray, ex)))
	if !t.Failed() {
		t.Logf("%d values agree with C", len(ex))
	}
}

// cStyleName is a name with an underscore in capitals (QPPSN is Go's).
var cStyleName = regexp.MustCompile(`^[A-Z][A-Z0-9]*_[A-Z0-9_]+$`)

// TestConstantTableComplete fails when a constant with a C name (one taken
// from hfi1) is added to the package without being compared with C.
func TestConstantTableComplete(t *testing.T) {
	_, files := ctest.PackageFiles(t)
	inTable := map[string]bool{}
	for _, c := range cConstants {
		inTable[c.name] = true
	}
	for _, f := range files {
		for _, d := range f.Decls {
			if g, ok := d.(*ast.GenDecl); ok && g.Tok == token.CONST {
				for _, sp := range g.Specs {
					for _, n := range sp.(*ast.ValueSpec).Names {
						if cStyleName.MatchString(n.Name) && !inTable[n.Name] {
							t.Errorf("constant %s is not compared with C: add it to cConstants and cRcvArray", n.Name)
						}
					}
				}
			}
		}
	}
}
