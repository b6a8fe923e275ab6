// Package chip is the register map of hfisim, the emulated host fabric
// interface: BAR layout, CSR offsets, bit fields and the in-memory formats the
// driver and the device share (send descriptors, RcvArray, MPT and verbs
// entries; the receive header queue entry, which user space reads, is
// uapi.GohfiRHQEntry). It is the one
// place both the driver and the device model take these numbers from, in the
// way drivers/infiniband/hw/hfi1/chip_registers.h serves hfi1. The datasheet
// in docs/hfisim.md describes the same map for a reader.
//
// All CSRs are 64 bits wide, little-endian, at 8-byte aligned offsets, and
// must be accessed with 8-byte reads and writes; other accesses are rejected
// by the device and counted in ErrCntBadAccess.
//
// The in-memory formats are structures laid out as their tables
// (structs.HostLayout, reserved bytes as blank fields), so that their memory
// is the format on a little-endian host: Marshal and Unmarshal copy it
// (layout_unsafe.go, which also checks every offset when the package
// builds).
package chip

// PCI identity. Deliberately not an Intel/Cornelis hfi1 id, so no real
// driver binds the emulated function.
const (
	PCIVendorID    = 0x1de5 // unassigned experimental id
	PCIDeviceID    = 0x4f31 // "O1"
	PCISubVendorID = 0x1de5
	PCISubDeviceID = 0x0001
	PCIRevision    = 0x01
	PCIClassCode   = 0x020700 // network controller, InfiniBand
)

// Device identity register value: ASCII "HFISIM01" read as a little-endian u64.
const IDMagic = 0x31304d4953494648

// BAR numbers and sizes.
const (
	CSRBar      = 0 // trapped control/status registers
	RcvArrayBar = 2 // mmappable RcvArray, 8 bytes per entry
	MTTBar      = 4 // mmappable memory translation table, 8 bytes per entry

	CSRBarSize = 0x10000
	// The MSI-X table and PBA live in the CSR BAR; the MSI-X capability in
	// config space points here.
	MSIXTableOffset = 0x8000
	MSIXPBAOffset   = 0x9000
)

// Global CSRs (BAR0).
const (
	RegID              = 0x000 // RO: IDMagic
	RegRevision        = 0x008 // RO: major<<16 | minor
	RegNumCtxts        = 0x010 // RO: receive contexts
	RegRcvArrayPerCtxt = 0x018 // RO: RcvArray entries per context (multiple of RcvArrayGroupSize)
	RegMaxTIDPages     = 0x020 // RO: pages one RcvArray entry may cover
	RegMTTEntries      = 0x028 // RO: MTT entries (pages)
	RegCapFlags        = 0x030 // RO: Cap* bits
	RegRHQMaxEntries   = 0x038 // RO: largest receive header queue
	RegControl         = 0x040 // RW: Ctrl* bits
	RegStatus          = 0x048 // RO: Status* bits
	RegIntStatus       = 0x050 // RW1C: IntSrc* bits, set when the device raises an interrupt
	RegIntMask         = 0x058 // RW: IntSrc* bits enabled (1 = enabled)
	RegTLBInvStart     = 0x060 // RW: first MTT entry of an invalidation
	RegTLBInvCount     = 0x068 // RW: number of entries; writing it starts the flush
	RegTLBInvDone      = 0x070 // RO: sequence of the last completed flush
	RegScratch         = 0x078 // RW: no side effects, for bus tests

	// Error counters, RO, cleared by reset.
	RegErrCntIOMMUFault = 0x100 // DMA through an IOVA that was not mapped
	RegErrCntBadAccess  = 0x108 // CSR access of wrong size or offset
	RegErrCntTID        = 0x110 // expected receive through an invalid TID
	RegErrCntBadDesc    = 0x118 // malformed send descriptor
	RegErrCntRHQFull    = 0x120 // packet dropped, receive header queue full
	RegErrCntEagerFull  = 0x128 // packet dropped, no eager buffer
	RegCntPackets       = 0x130 // packets delivered
	RegCntBytes         = 0x138 // payload bytes delivered
)

// RegRevision value of this model: major<<RevisionMajorShift | minor.
const (
	RevisionMajor = 1
	RevisionMinor = 5 // 1: doorbell records (CapDBRec); 2: implicit ODP (CapImplicitODP); 3: QPDBRing (CapDBRing); 4: CQHeadAddr (CapCQHeadRec); 5: context doorbell records (CapCtxtDBRec), RHQ head records (CapRHQHeadRec)

	RevisionMajorShift = 16
	RevisionMinorMask  = 1<<RevisionMajorShift - 1
	// The driver accepts revision RevisionMajor.x, any minor: minors
	// are compatible. That also keeps the value within the 32 bits of
	// hw_version (USER_INFO) and hw_ver (QUERY_DEVICE).
	MinRevision = RevisionMajor << RevisionMajorShift
	MaxRevision = MinRevision | RevisionMinorMask
)

// RegCapFlags bits.
const (
	CapMemMgtExtensions = 1 << 0 // fast-registration work requests
	CapODP              = 1 << 1 // MTT entries may be not-present; faults go to the event queue
	CapMSIX             = 1 << 2
	CapLoopback         = 1 << 3 // packets between contexts of this device

	// CapKnown is every bit defined above; the driver refuses a device
	// that reports any other.
	CapKnown = CapMemMgtExtensions | CapODP | CapMSIX | CapLoopback | CapVerbs | CapDBRec | CapImplicitODP | CapNet | CapDBRing | CapCQHeadRec | CapCtxtDBRec | CapRHQHeadRec
)

// RegControl bits.
const (
	CtrlReset = 1 << 0 // write 1: reset all state; reads back 0 once done
)

// RegStatus bits.
const (
	StatusReady = 1 << 0
)

// Interrupt sources in RegIntStatus/RegIntMask: bit 0 is the device's error
// interrupt, bit 1+n is receive context n. Each source has its own MSI-X
// vector (vector 0 for errors, 1+n for context n); with INTx all share one.
//
// MaxContexts is the most contexts a device may report (RegNumCtxts). Every
// field that holds a context number or source has room for it: the 64-bit
// interrupt registers (bit 1+n), MSI-X vectors 1+n, the per-context CSR
// blocks below MSIXTableOffset (112 of them), the 8-bit context of the
// driver's mmap tokens and the 16-bit context fields of send descriptors,
// header queue entries and CTXT_INFO.
const (
	IntSrcError    = 1 << 0
	IntSrcCtxtBase = 1
	MaxContexts    = 32
)

// The context limit fits the encodings above (compile-time checks: a
// negative array length does not compile).
var (
	_ [64 - (IntSrcCtxtBase + MaxContexts)]struct{}
	_ [(MSIXTableOffset-CtxtBase)/CtxtStride - MaxContexts]struct{}
)

// IntSrcCtxt is the interrupt source bit of receive context n.
func IntSrcCtxt(n int) uint64 { return 1 << (IntSrcCtxtBase + uint(n)) }

// Per-context CSRs: context n's block starts at CtxtBase + n*CtxtStride.
const (
	CtxtBase   = 0x1000
	CtxtStride = 0x100

	CtxtControl     = 0x00 // RW: CtxtCtrl* bits
	CtxtRHQBase     = 0x08 // RW: IOVA of the receive header queue (uapi.SizeofGohfiRHQEntry each)
	CtxtRHQEntries  = 0x10 // RW: number of entries, power of two
	CtxtRHQHead     = 0x18 // RW: driver's consumer index
	CtxtRHQTail     = 0x20 // RO: device's producer index
	CtxtEagerBase   = 0x28 // RW: IOVA of the eager buffers, contiguous
	CtxtEagerSize   = 0x30 // RW: bytes per eager buffer, power of two >= 4096
	CtxtEagerCount  = 0x38 // RW: number of eager buffers
	CtxtSQBase      = 0x40 // RW: IOVA of the send queue (SendDescSize each)
	CtxtSQEntries   = 0x48 // RW: number of entries, power of two
	CtxtSQTail      = 0x50 // RW: doorbell: producer index written by the driver
	CtxtSQHead      = 0x58 // RO: device's consumer index
	CtxtSQHeadAddr  = 0x60 // RW: IOVA where the device also writes SQHead (0 = none)
	CtxtExpBase     = 0x68 // RO: first RcvArray entry of the context
	CtxtExpCount    = 0x70 // RO: RcvArray entries of the context
	CtxtStatus      = 0x78 // RO: CtxtStatus* bits
	CtxtErrCnt      = 0x80 // RO: errors charged to this context
	CtxtUrgentCnt   = 0x88 // RO: urgent packets delivered to this context (DescFlagUrgent), cleared at enable
	CtxtDBRecAddr   = 0x90 // RW (CapCtxtDBRec): IOVA of the send queue's doorbell record (0 = none), latched at enable
	CtxtRHQHeadAddr = 0x98 // RW (CapRHQHeadRec): IOVA of the RHQ's consumer-index record (0 = none), latched at enable
)

// A context's doorbell record (CapCtxtDBRec) is a QP's (DBRecSize bytes,
// DBRecAlign-aligned, chip/verbs.go) of which the context uses sq_tail,
// its send queue's producer index as written to CtxtSQTail, and flags
// (DBRecNotify); rq_tail is reserved. CtxtDBRecAddr is ring geometry:
// written while the context is disabled, latched at enable (a record not
// DBRecAlign-aligned fails the enable, as bad geometry does); the device
// starts from index 0 at each enable. The protocol is the QPs': the engine
// polls the record of every enabled context while it polls QP records,
// sets DBRecNotify before it sleeps and reads the records once more, and
// clears it when it wakes; the driver stores sq_tail after the descriptors
// and writes CtxtSQTail only when it then reads DBRecNotify set. A write to
// CtxtSQTail of a context with a record wakes the engine, which reads the
// record: the value is checked (out of range: refused, counted in
// CtxtErrCnt) but not taken. A record the device cannot read or write
// halts the context (CtxtStatusHalted, ErrCntIOMMUFault), as a descriptor
// it cannot read does.
const CapCtxtDBRec = 1 << 10 // RegCapFlags: CtxtDBRecAddr

// A context's RHQ consumer-index record (CapRHQHeadRec) is a little-endian
// uint64 in host memory, RHQHeadRecAlign-aligned, where the driver stores
// what it would write to CtxtRHQHead, as a CQ's record (CQHeadAddr) holds
// the CQ's head. CtxtRHQHeadAddr is ring geometry: written while the
// context is disabled, latched at enable (a record not aligned fails the
// enable). The device reads the record only when a packet finds the RHQ
// full by the head it holds, once per such packet; a value out of range is
// refused and counted in CtxtErrCnt, and a record it cannot read counts an
// IOMMU fault and CtxtErrCnt; either way the packet is dropped as at a
// full RHQ (ErrCntRHQFull). Writes to CtxtRHQHead are still taken, and
// CtxtRHQHead reads the head the device last took from either.
//
// The record's second word (RHQArmOff) arms the receive interrupt when
// CtxtControl has CtxtCtrlIntArm with CtxtCtrlIntEnable: after each entry
// the device updates CtxtRHQTail, then (a full barrier) reads the arm word,
// and raises the interrupt only if the word differs from the value it last
// raised for, which it then remembers (0 at enable). The driver arms by
// storing a new value (incrementing the word) and then looks at the queue
// again before it sleeps: either that look sees the entry or the device's
// read sees the new value. The device never writes the word; one it cannot
// read raises the interrupt anyway (counted in ErrCntIOMMUFault and
// CtxtErrCnt). Without a record, CtxtCtrlIntArm is ignored: every entry
// raises.
const (
	CapRHQHeadRec   = 1 << 11 // RegCapFlags: CtxtRHQHeadAddr, CtxtCtrlIntArm
	RHQHeadRecAlign = 8
	RHQArmOff       = 8  // offset of the arm word in the record
	RHQHeadRecSize  = 16 // the consumer index, then the arm word
)

// CtxtReg returns the BAR0 offset of per-context register reg of context n.
func CtxtReg(n int, reg uint64) uint64 { return CtxtBase + uint64(n)*CtxtStride + reg }

// CtxtControl bits.
const (
	CtxtCtrlEnable         = 1 << 0 // context receives and sends
	CtxtCtrlIntEnable      = 1 << 1 // raise the context's interrupt on new RHQ entries
	CtxtCtrlTIDFlowDisable = 1 << 2
	CtxtCtrlIntArm         = 1 << 3 // CapRHQHeadRec: the receive interrupt only when the RHQ record's arm word changed
)

// CtxtStatus bits.
const (
	CtxtStatusEnabled = 1 << 0
	CtxtStatusHalted  = 1 << 1 // a fatal ring error stopped the context
)

// MTT: one 64-bit entry per page: IOVA page frame in bits 12-63, flags in
// bits 0-2.
const (
	MTTEntrySize = 8
	MTTPresent   = 1 << 0
	MTTRead      = 1 << 1
	MTTWrite     = 1 << 2
	MTTAddrMask  = ^uint64(0xfff)

	// MaxMTTEntries is the most MTT entries the driver accepts in
	// RegMTTEntries (0 is allowed: no MTT): 1 TiB of 4 KiB pages, a BAR4
	// of 2 GiB, well within QUERY_DEVICE's 32-bit mtt_entries.
	MaxMTTEntries = 1 << 28
)
