// Package uapi is the user ABI of gohfi: the hfi1 character-device ioctls,
// exactly as Linux defines them, and gohfi's own commands for what hfi1 has no
// ioctl for (memory regions, queue pairs, statistics).
//
// Names keep their C spelling, as gVisor's pkg/abi/linux does, so that a
// reader can grep the kernel headers for them. Every struct is commented with
// the C header it mirrors and laid out like it (structs.HostLayout, fixed-size
// fields, padding as explicit fields), so that its memory is the ABI:
// SizeBytes/MarshalBytes/UnmarshalBytes, written once for all of them in
// layout_unsafe.go, copy it. That is the little-endian encoding on the
// little-endian hosts gohfi runs on (amd64, arm64); the package does not build
// on a big-endian one (endian_little.go). parity_test.go checks sizes, offsets
// and command numbers against a C compiler.
package uapi

// The generic Linux ioctl number layout (include/uapi/asm-generic/ioctl.h),
// used by x86, arm64 and riscv: nr in bits 0-7, type in 8-15, size in 16-29,
// direction in 30-31.
const (
	_IOC_NRBITS   = 8
	_IOC_TYPEBITS = 8
	_IOC_SIZEBITS = 14
	_IOC_DIRBITS  = 2

	_IOC_NRMASK   = 1<<_IOC_NRBITS - 1
	_IOC_TYPEMASK = 1<<_IOC_TYPEBITS - 1
	_IOC_SIZEMASK = 1<<_IOC_SIZEBITS - 1
	_IOC_DIRMASK  = 1<<_IOC_DIRBITS - 1

	_IOC_NRSHIFT   = 0
	_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
	_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
	_IOC_DIRSHIFT  = _IOC_SIZESHIFT + _IOC_SIZEBITS

	// Direction is seen from user space: _IOC_WRITE means the kernel reads
	// the argument, _IOC_READ means the kernel writes it.
	_IOC_NONE  = 0
	_IOC_WRITE = 1
	_IOC_READ  = 2
)

// Exported copies of the direction bits, for callers that decode commands.
const (
	IOC_NONE  = _IOC_NONE
	IOC_WRITE = _IOC_WRITE
	IOC_READ  = _IOC_READ
)

// IOC is the C macro _IOC(dir, type, nr, size).
func IOC(dir, typ, nr, size uint32) uint32 {
	return dir<<_IOC_DIRSHIFT | size<<_IOC_SIZESHIFT | typ<<_IOC_TYPESHIFT | nr<<_IOC_NRSHIFT
}

// IO is _IO(type, nr): no argument.
func IO(typ, nr uint32) uint32 { return IOC(_IOC_NONE, typ, nr, 0) }

// IOR is _IOR(type, nr, size): the kernel writes size bytes to user space.
func IOR(typ, nr, size uint32) uint32 { return IOC(_IOC_READ, typ, nr, size) }

// IOW is _IOW(type, nr, size): the kernel reads size bytes from user space.
func IOW(typ, nr, size uint32) uint32 { return IOC(_IOC_WRITE, typ, nr, size) }

// IOWR is _IOWR(type, nr, size): both directions.
func IOWR(typ, nr, size uint32) uint32 { return IOC(_IOC_READ|_IOC_WRITE, typ, nr, size) }

// IOC_DIR is _IOC_DIR(cmd).
func IOC_DIR(cmd uint32) uint32 { return cmd >> _IOC_DIRSHIFT & _IOC_DIRMASK }

// IOC_TYPE is _IOC_TYPE(cmd).
func IOC_TYPE(cmd uint32) uint32 { return cmd >> _IOC_TYPESHIFT & _IOC_TYPEMASK }

// IOC_NR is _IOC_NR(cmd).
func IOC_NR(cmd uint32) uint32 { return cmd >> _IOC_NRSHIFT & _IOC_NRMASK }

// IOC_SIZE is _IOC_SIZE(cmd).
func IOC_SIZE(cmd uint32) uint32 { return cmd >> _IOC_SIZESHIFT & _IOC_SIZEMASK }

// RDMA_IOCTL_MAGIC is the ioctl type byte of the whole RDMA subsystem
// (include/uapi/rdma/rdma_user_ioctl.h); IB_IOCTL_MAGIC is its old name.
const (
	RDMA_IOCTL_MAGIC = 0x1b
	IB_IOCTL_MAGIC   = RDMA_IOCTL_MAGIC
)

// Constant-expression forms of the direction field, so that command numbers
// stay Go constants (usable in switch statements).
const (
	iocNone  = _IOC_NONE << _IOC_DIRSHIFT
	iocW     = _IOC_WRITE << _IOC_DIRSHIFT
	iocR     = _IOC_READ << _IOC_DIRSHIFT
	iocRW    = (_IOC_READ | _IOC_WRITE) << _IOC_DIRSHIFT
	rdmaType = RDMA_IOCTL_MAGIC << _IOC_TYPESHIFT
)

// Argument sizes of the scalar hfi1 ioctls on LP64 (int, unsigned long, __u16).
const (
	sizeofInt   = 4
	sizeofULong = 8
	sizeofU16   = 2
)

// HFI1_CMD_BASE: hfi1 numbers its commands from 0xE0 up within the RDMA range.
const HFI1_CMD_BASE = 0xE0

// hfi1 character-device ioctls (include/uapi/rdma/rdma_user_ioctl.h).
//
// CTXT_INFO and USER_INFO are declared _IOW although the kernel writes the
// struct back to user space; the numbers below keep that oddity, since
// existing user space (PSM2, libfabric's opx provider) uses them.
const (
	// _IOWR(RDMA_IOCTL_MAGIC, 0xE1, struct hfi1_user_info): allocate a context.
	HFI1_IOCTL_ASSIGN_CTXT = iocRW | SizeofHfi1UserInfo<<_IOC_SIZESHIFT | rdmaType | 0xE1
	// _IOW(RDMA_IOCTL_MAGIC, 0xE2, struct hfi1_ctxt_info): read context info.
	HFI1_IOCTL_CTXT_INFO = iocW | SizeofHfi1CtxtInfo<<_IOC_SIZESHIFT | rdmaType | 0xE2
	// _IOW(RDMA_IOCTL_MAGIC, 0xE3, struct hfi1_base_info): read mmap tokens.
	HFI1_IOCTL_USER_INFO = iocW | SizeofHfi1BaseInfo<<_IOC_SIZESHIFT | rdmaType | 0xE3
	// _IOWR(RDMA_IOCTL_MAGIC, 0xE4, struct hfi1_tid_info): program TIDs.
	HFI1_IOCTL_TID_UPDATE = iocRW | SizeofHfi1TidInfo<<_IOC_SIZESHIFT | rdmaType | 0xE4
	// _IOWR(RDMA_IOCTL_MAGIC, 0xE5, struct hfi1_tid_info): free TIDs.
	HFI1_IOCTL_TID_FREE = iocRW | SizeofHfi1TidInfo<<_IOC_SIZESHIFT | rdmaType | 0xE5
	// _IO(RDMA_IOCTL_MAGIC, 0xE6): force a PIO credit return.
	HFI1_IOCTL_CREDIT_UPD = iocNone | rdmaType | 0xE6
	// _IOW(RDMA_IOCTL_MAGIC, 0xE8, int): enable (non-zero) or disable receive.
	HFI1_IOCTL_RECV_CTRL = iocW | sizeofInt<<_IOC_SIZESHIFT | rdmaType | 0xE8
	// _IOW(RDMA_IOCTL_MAGIC, 0xE9, int): HFI1_POLL_TYPE_*.
	HFI1_IOCTL_POLL_TYPE = iocW | sizeofInt<<_IOC_SIZESHIFT | rdmaType | 0xE9
	// _IOW(RDMA_IOCTL_MAGIC, 0xEA, unsigned long): acknowledge HFI1_EVENT_* bits.
	HFI1_IOCTL_ACK_EVENT = iocW | sizeofULong<<_IOC_SIZESHIFT | rdmaType | 0xEA
	// _IOW(RDMA_IOCTL_MAGIC, 0xEB, __u16): set the context's partition key.
	HFI1_IOCTL_SET_PKEY = iocW | sizeofU16<<_IOC_SIZESHIFT | rdmaType | 0xEB
	// _IO(RDMA_IOCTL_MAGIC, 0xEC): reset the context's send context.
	HFI1_IOCTL_CTXT_RESET = iocNone | rdmaType | 0xEC
	// _IOWR(RDMA_IOCTL_MAGIC, 0xED, struct hfi1_tid_info): read invalidated TIDs.
	HFI1_IOCTL_TID_INVAL_READ = iocRW | SizeofHfi1TidInfo<<_IOC_SIZESHIFT | rdmaType | 0xED
	// _IOR(RDMA_IOCTL_MAGIC, 0xEE, int): read HFI1_USER_SWVERSION.
	HFI1_IOCTL_GET_VERS = iocR | sizeofInt<<_IOC_SIZESHIFT | rdmaType | 0xEE
)
