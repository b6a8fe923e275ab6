package uapi

import (
	"fmt"
	"unsafe"
)

// abiStruct is every ABI structure of this package: the types whose memory
// is their C layout (structs.HostLayout, fixed-size fields, padding as
// explicit blank fields), and so the only ones marshal and unmarshal take.
type abiStruct interface {
	Hfi1UserInfo | Hfi1CtxtInfo | Hfi1TidInfo | Hfi1BaseInfo |
		GohfiDeviceAttr | GohfiRegMR | GohfiHandle | GohfiAdviseMR |
		GohfiAllocMR | GohfiCreateCQ | GohfiCreateQP | GohfiModifyQP |
		GohfiSge | GohfiSendWR | GohfiRecvWR | GohfiPostSend |
		GohfiPostRecv | GohfiWC | GohfiPollCQ | GohfiMRStats |
		GohfiDriverStats | GohfiSend | GohfiRHQEntry
}

// The memory image is the little-endian ABI only on a little-endian host:
// elsewhere this does not build (endian_little.go).
const _ = hostIsLittleEndian

// memory is the memory of *v: the bytes user space reads and writes
// through a pointer to the C structure. It aliases *v.
func memory[T abiStruct](v *T) []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(v)), unsafe.Sizeof(*v))
}

// marshal is every MarshalBytes: *v's memory, padding and reserved fields
// included, to dst; it panics if dst is shorter.
func marshal[T abiStruct](dst []byte, v *T) {
	copy(dst[:unsafe.Sizeof(*v)], memory(v))
}

// unmarshal is every UnmarshalBytes: src's first bytes into *v's memory,
// or EINVAL (and *v untouched) when src is shorter than the structure.
func unmarshal[T abiStruct](src []byte, v *T) error {
	if uintptr(len(src)) < unsafe.Sizeof(*v) {
		return shortBuffer(fmt.Sprintf("%T", *v), len(src), int(unsafe.Sizeof(*v)))
	}
	copy(memory(v), src)
	return nil
}
