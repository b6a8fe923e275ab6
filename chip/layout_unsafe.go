package chip

import "unsafe"

// format is every in-memory format of this package: the structures whose
// memory is the format, and so the only ones marshal and unmarshal take.
type format interface {
	SendDesc | MPTEntry | SendWQE | RecvWQE | CQE | EQE
}

// memory is the memory of *v; it aliases *v. It is the little-endian
// format on the little-endian hosts that package uapi, imported here, builds
// on (uapi/endian_little.go).
func memory[T format](v *T) []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(v)), unsafe.Sizeof(*v))
}

// marshal is every Marshal: all of *v's memory to b, reserved bytes
// included (zero in a value built in Go: blank fields cannot be set), so
// what was in b before is overwritten. It panics if b is shorter than the
// format.
func marshal[T format](b []byte, v *T) { copy(b[:unsafe.Sizeof(*v)], memory(v)) }

// unmarshal is every Unmarshal: b's first bytes to *v, reserved bytes
// included. It panics if b is shorter than the format.
func unmarshal[T format](b []byte, v *T) { copy(memory(v), b[:unsafe.Sizeof(*v)]) }

// The layout tables of the comments, checked when the package builds: each
// line fails to compile (a non-empty array, or a negative uintptr constant)
// unless the size or offset is the table's.
var (
	_ [0]struct{} = [unsafe.Sizeof(SendDesc{}) - SendDescSize]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SendDesc{}.Opcode) - 0]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SendDesc{}.Flags) - 1]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SendDesc{}.DstCtxt) - 2]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SendDesc{}.Length) - 4]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SendDesc{}.SrcIOVA) - 8]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SendDesc{}.TID) - 16]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SendDesc{}.TIDOffset) - 20]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SendDesc{}.Tag) - 24]struct{}{}

	_ [0]struct{} = [unsafe.Sizeof(MPTEntry{}) - MPTEntrySize]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(MPTEntry{}.Key) - 0]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(MPTEntry{}.PD) - 4]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(MPTEntry{}.Flags) - 8]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(MPTEntry{}.MTTFirst) - 12]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(MPTEntry{}.IOVA) - 16]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(MPTEntry{}.Length) - 24]struct{}{}

	_ [0]struct{} = [unsafe.Sizeof(SGE{}) - SGESize]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SGE{}.Addr) - 0]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SGE{}.Length) - 8]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SGE{}.Lkey) - 12]struct{}{}

	_ [0]struct{} = [unsafe.Sizeof(SendWQE{}) - SendWQESize]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SendWQE{}.WrID) - 0]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SendWQE{}.Opcode) - 8]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SendWQE{}.Flags) - 9]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SendWQE{}.NumSGE) - 10]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SendWQE{}.Imm) - 12]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SendWQE{}.RemoteAddr) - 16]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SendWQE{}.Rkey) - 24]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SendWQE{}.CompareAdd) - 32]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SendWQE{}.Swap) - 40]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SendWQE{}.FrIOVA) - 64]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SendWQE{}.FrLength) - 72]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SendWQE{}.FrPageList) - 80]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SendWQE{}.FrPageListLen) - 88]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SendWQE{}.FrPageShift) - 92]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SendWQE{}.FrMPTIndex) - 96]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SendWQE{}.FrKey) - 100]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SendWQE{}.FrAccess) - 104]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(SendWQE{}.SGE) - wqeSGEOff]struct{}{}

	_ [0]struct{} = [unsafe.Sizeof(RecvWQE{}) - RecvWQESize]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(RecvWQE{}.WrID) - 0]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(RecvWQE{}.NumSGE) - 8]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(RecvWQE{}.SGE) - wqeSGEOff]struct{}{}

	_ [0]struct{} = [unsafe.Sizeof(CQE{}) - CQESize]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(CQE{}.WrID) - 0]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(CQE{}.Status) - 8]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(CQE{}.Opcode) - 12]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(CQE{}.VendorErr) - 16]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(CQE{}.ByteLen) - 20]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(CQE{}.InvalidatedRkey) - 24]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(CQE{}.ImmData) - 28]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(CQE{}.QPNum) - 32]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(CQE{}.SrcQP) - 36]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(CQE{}.WcFlags) - CQESeqWordOff]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(CQE{}.Seq) - 44]struct{}{}

	_ [0]struct{} = [unsafe.Sizeof(EQE{}) - EQESize]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(EQE{}.Type) - 0]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(EQE{}.Flags) - 1]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(EQE{}.FaultID) - 4]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(EQE{}.Key) - 8]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(EQE{}.QP) - 12]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(EQE{}.VA) - 16]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(EQE{}.Length) - 24]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(EQE{}.WQE) - 28]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(EQE{}.ReqQP) - 32]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(EQE{}.PD) - 36]struct{}{}
	_ [0]struct{} = [unsafe.Offsetof(EQE{}.Seq) - EQESeqOff]struct{}{}
)
