package abi

import (
	"go/constant"
	"go/importer"
	"go/types"
	"os"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/gohfi/gohfi/internal/ctest"
	"github.com/gohfi/gohfi/internal/testenv"
)

// structTable lists every ABI structure with its C name. TestTablesComplete
// keeps it in step with the package.
var structTable = []struct {
	c string
	v any
}{
	{"vfio_group_status", VFIOGroupStatus{}},
	{"vfio_device_info", VFIODeviceInfo{}},
	{"vfio_region_info", VFIORegionInfo{}},
	{"vfio_info_cap_header", VFIOInfoCapHeader{}},
	{"vfio_region_info_cap_sparse_mmap", VFIORegionInfoCapSparseMmap{}},
	{"vfio_region_sparse_mmap_area", VFIORegionSparseMmapArea{}},
	{"vfio_irq_info", VFIOIrqInfo{}},
	{"vfio_irq_set", VFIOIrqSet{}},
	{"vfio_iommu_type1_info", VFIOIommuType1Info{}},
	{"vfio_iova_range", VFIOIovaRange{}},
	{"vfio_iommu_type1_info_cap_iova_range", VFIOIommuType1InfoCapIovaRange{}},
	{"vfio_iommu_type1_info_dma_avail", VFIOIommuType1InfoDmaAvail{}},
	{"vfio_iommu_type1_dma_map", VFIOIommuType1DmaMap{}},
	{"vfio_iommu_type1_dma_unmap", VFIOIommuType1DmaUnmap{}},
	{"vfio_user_header", VFIOUserHeader{}},
	{"vfio_user_version", VFIOUserVersion{}},
	{"vfio_user_device_info", VFIOUserDeviceInfo{}},
	{"vfio_user_region_io_fds_request", VFIOUserRegionIOFDsRequest{}},
	{"vfio_user_sub_region_ioeventfd", VFIOUserSubRegionIOEventFD{}},
	{"vfio_user_region_access", VFIOUserRegionAccess{}},
	{"vfio_user_dma_region_access", VFIOUserDmaRegionAccess{}},
	{"vfio_user_write_multi", VFIOUserWriteMulti{}},
	{"vfio_user_write_multi_one", VFIOUserWriteMultiOne{}},
}

// cVFIOUser is the C of the vfio-user messages, written from the tables of
// the specification (offsets and sizes) with libvfio-user's names; there is
// no system header for them.
const cVFIOUser = `
#include <stdint.h>
enum vfio_user_command {
	VFIO_USER_VERSION = 1,
	VFIO_USER_DMA_MAP = 2,
	VFIO_USER_DMA_UNMAP = 3,
	VFIO_USER_DEVICE_GET_INFO = 4,
	VFIO_USER_DEVICE_GET_REGION_INFO = 5,
	VFIO_USER_DEVICE_GET_REGION_IO_FDS = 6,
	VFIO_USER_DEVICE_GET_IRQ_INFO = 7,
	VFIO_USER_DEVICE_SET_IRQS = 8,
	VFIO_USER_REGION_READ = 9,
	VFIO_USER_REGION_WRITE = 10,
	VFIO_USER_DMA_READ = 11,
	VFIO_USER_DMA_WRITE = 12,
	VFIO_USER_DEVICE_RESET = 13,
	VFIO_USER_REGION_WRITE_MULTI = 15,
	VFIO_USER_DEVICE_FEATURE = 16,
};
#define VFIO_USER_F_TYPE_MASK 0xf
#define VFIO_USER_F_TYPE_COMMAND 0x0
#define VFIO_USER_F_TYPE_REPLY 0x1
#define VFIO_USER_F_NO_REPLY 0x10
#define VFIO_USER_F_ERROR 0x20
struct vfio_user_header {
	uint16_t msg_id;
	uint16_t cmd;
	uint32_t msg_size;
	uint32_t flags;
	uint32_t error_no;
};
struct vfio_user_version {
	uint16_t major;
	uint16_t minor;
	uint8_t data[];
};
struct vfio_user_device_info {
	uint32_t argsz;
	uint32_t flags;
	uint32_t num_regions;
	uint32_t num_irqs;
};
struct vfio_user_region_io_fds_request {
	uint32_t argsz;
	uint32_t flags;
	uint32_t index;
	uint32_t count;
};
#define VFIO_USER_IO_FD_TYPE_IOEVENTFD 0
#define VFIO_USER_IO_FD_TYPE_IOREGIONFD 1
#define KVM_IOEVENTFD_FLAG_DATAMATCH (1 << 0)
#define KVM_IOEVENTFD_FLAG_PIO (1 << 1)
struct vfio_user_sub_region_ioeventfd {
	uint64_t offset;
	uint64_t size;
	uint32_t fd_index;
	uint32_t type;
	uint32_t flags;
	uint32_t padding;
	uint64_t datamatch;
};
struct vfio_user_region_access {
	uint64_t offset;
	uint32_t region;
	uint32_t count;
	uint8_t data[];
};
struct vfio_user_dma_region_access {
	uint64_t addr;
	uint64_t count;
	uint8_t data[];
};
struct vfio_user_write_multi_one {
	uint64_t offset;
	uint32_t region;
	uint32_t count;
	uint8_t data[8];
};
struct vfio_user_write_multi {
	uint64_t wr_cnt;
	struct vfio_user_write_multi_one wrs[];
};
`

const vfioHeader = "/usr/include/linux/vfio.h"

// typeCheck type-checks the package's own (non-test) files.
func typeCheck(t *testing.T) *types.Package {
	t.Helper()
	fset, files := ctest.PackageFiles(t)
	conf := types.Config{Importer: importer.ForCompiler(fset, "source", nil)}
	pkg, err := conf.Check("abi", fset, files, nil)
	if err != nil {
		t.Fatal(err)
	}
	return pkg
}

// packageConstants returns every constant of the package with its value,
// but the Sizeof ones (sizes of the Go types, checked as those types).
func packageConstants(t *testing.T) map[string]uint64 {
	t.Helper()
	pkg := typeCheck(t)
	consts := map[string]uint64{}
	for _, name := range pkg.Scope().Names() {
		c, ok := pkg.Scope().Lookup(name).(*types.Const)
		if !ok || strings.HasPrefix(name, "Sizeof") {
			continue
		}
		v, exact := constant.Uint64Val(c.Val())
		if !exact {
			t.Fatalf("constant %s = %v is not a uint64", name, c.Val())
		}
		consts[name] = v
	}
	return consts
}

// TestParityCHeaders compiles a C program against <linux/vfio.h> and the
// vfio-user definitions above and compares every structure's size, every
// field's offset and size, and every constant of the package, by name.
func TestParityCHeaders(t *testing.T) {
	gcc := ctest.GCC(t)
	if _, err := os.Stat(vfioHeader); err != nil {
		testenv.Missing(t, "%v (install linux-libc-dev)", err)
	}
	var ex []ctest.Expectation
	for _, s := range structTable {
		ex = append(ex, ctest.StructLayout(s.c, reflect.TypeOf(s.v))...)
	}
	consts := packageConstants(t)
	names := make([]string, 0, len(consts))
	for n := range consts {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		ex = append(ex, ctest.Expectation{Key: "const " + n, Expr: n, Want: consts[n]})
	}
	prelude := "#include <stddef.h>\n#include <linux/vfio.h>\n" + cVFIOUser
	ctest.Compare(t, ex, ctest.Run(t, gcc, ctest.Program(prelude, ex)))
	if !t.Failed() {
		t.Logf("%d values agree with C", len(ex))
	}
}

var cStyleName = regexp.MustCompile(`^[A-Z][A-Z0-9_]*[a-z0-9]*[A-Z0-9_]*$`)

// TestTablesComplete: every exported struct is in structTable and in the
// Struct constraint (so it can be encoded), and every constant but the
// Sizeof ones has a C name (the parity test compares them all).
func TestTablesComplete(t *testing.T) {
	inTable := map[string]bool{}
	for _, s := range structTable {
		inTable[reflect.TypeOf(s.v).Name()] = true
	}
	pkg := typeCheck(t)
	inUnion := map[string]bool{}
	union := pkg.Scope().Lookup("Struct").Type().Underlying().(*types.Interface).EmbeddedType(0).(*types.Union)
	for i := range union.Len() {
		inUnion[union.Term(i).Type().(*types.Named).Obj().Name()] = true
	}
	structs := 0
	for _, name := range pkg.Scope().Names() {
		switch o := pkg.Scope().Lookup(name).(type) {
		case *types.TypeName:
			if _, ok := o.Type().Underlying().(*types.Struct); !ok || !o.Exported() {
				continue
			}
			structs++
			if !inTable[name] {
				t.Errorf("struct %s is not in structTable", name)
			}
			if !inUnion[name] {
				t.Errorf("struct %s is not in the Struct constraint", name)
			}
		case *types.Const:
			if !cStyleName.MatchString(name) && !strings.HasPrefix(name, "Sizeof") {
				t.Errorf("constant %s has no C name", name)
			}
		}
	}
	if structs != len(structTable) || structs != len(inUnion) {
		t.Errorf("%d structs in the package, %d in structTable, %d in Struct", structs, len(structTable), len(inUnion))
	}
}

// TestCodec: Encode and Decode move exactly the C layout, in host order
// (little endian on the hosts gohfi runs on).
func TestCodec(t *testing.T) {
	m := VFIOIommuType1DmaMap{Argsz: 32, Flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
		Vaddr: 0x7f0000001000, IOVA: 0x100000, Size: 0x10000}
	b := make([]byte, 40)
	if n := Encode(b, &m); n != 32 || SizeofVFIOIommuType1DmaMap != 32 {
		t.Fatalf("Encode wrote %d bytes", n)
	}
	want := []byte{
		32, 0, 0, 0, 3, 0, 0, 0,
		0x00, 0x10, 0x00, 0x00, 0x00, 0x7f, 0, 0,
		0x00, 0x00, 0x10, 0, 0, 0, 0, 0,
		0x00, 0x00, 0x01, 0, 0, 0, 0, 0,
		0, 0, 0, 0, 0, 0, 0, 0,
	}
	if string(b) != string(want) {
		t.Fatalf("dma_map = % x\nwant      % x", b, want)
	}
	var back VFIOIommuType1DmaMap
	if !Decode(b, &back) || back != m {
		t.Fatalf("Decode = %+v", back)
	}
	if Decode(b[:31], &back) {
		t.Fatal("Decode of 31 bytes succeeded")
	}
	areas, ok := DecodeSlice[VFIORegionSparseMmapArea](append(make([]byte, 16), 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0), 2)
	if !ok || len(areas) != 2 || areas[1] != (VFIORegionSparseMmapArea{Offset: 1, Size: 2}) {
		t.Fatalf("DecodeSlice = %+v %v", areas, ok)
	}
	if _, ok := DecodeSlice[VFIORegionSparseMmapArea](make([]byte, 31), 2); ok {
		t.Fatal("DecodeSlice past the end succeeded")
	}
	if _, ok := DecodeSlice[VFIORegionSparseMmapArea](nil, 1<<62); ok {
		t.Fatal("DecodeSlice of a huge count succeeded")
	}
}
