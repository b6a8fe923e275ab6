package chip

import "structs"

// The verbs engine (RegCapFlags CapVerbs): a memory protection table (MPT)
// of memory regions, completion queues and reliable-connected queue pairs
// whose work queues and completion queues live in host memory, in the shape
// of an InfiniBand HCA (mlx4/mlx5, rxe). docs/hfisim.md, "Verbs engine", is
// the datasheet of this file.

// Verbs capability and size registers (BAR0, RO).
const (
	RegMPTEntries = 0x080 // RO: MPT entries (memory regions), 0 without CapVerbs
	RegNumQPs     = 0x088 // RO: queue pairs
	RegNumCQs     = 0x090 // RO: completion queues
	RegMaxQPWR    = 0x098 // RO: largest send or receive queue (WQEs, power of two)
	RegMaxCQE     = 0x0a0 // RO: largest completion queue (CQEs, power of two)
	RegMaxSGE     = 0x0a8 // RO: scatter/gather entries per WQE (<= WQEMaxSGE)
	RegMaxMsgSize = 0x0b0 // RO: largest message in bytes

	// Verbs counters, RO, cleared by reset.
	RegCntNAKAccess = 0x140 // responder refused a packet: key, PD, state, rights or bounds
	RegCntNAKInvReq = 0x148 // responder refused a malformed request (opcode, no receive WQE space)
	RegCntVerbsPkts = 0x150 // verbs packets (MTU-sized pieces of messages) moved
	RegCntTLBHits   = 0x158 // translations served from the device TLB
	RegCntTLBMiss   = 0x160 // translations read from the MTT
	RegErrCntVerbs  = 0x168 // what the engine refused from its driver: see below
)

// RegErrCntVerbs counts the verbs engine's refusals of its driver's
// requests (ErrCntBadDesc keeps to send descriptors of contexts): QP
// transitions refused, doorbells and CQ head indices out of range (or in
// RESET), CQ settings refused, malformed send and receive WQEs, and CQEs
// dropped by a CQ that is full (overflow), already overflowed or disabled.

// CapVerbs is the RegCapFlags bit of the verbs engine.
const CapVerbs = 1 << 4

// VerbsMTU is the packet size: a message is moved in pieces of at most
// VerbsMTU bytes, and the responder checks every piece on its own, so a key
// that becomes invalid in the middle of a message stops it there.
const VerbsMTU = 4096

// Device limits a driver may rely on (the model's defaults; a device reports
// its own in the registers above, at most these).
const (
	MaxMPTEntries = 1 << 16
	MaxQPs        = 64
	MaxCQs        = 64
	MaxQPWR       = 1 << 14
	MaxCQE        = 1 << 16
)

// QP numbers on the wire are QPNBase + the QP's index (0 and 1 are
// InfiniBand's special QPs).
const QPNBase = 16

// Memory protection table: MPTEntrySize bytes per entry in BAR4, starting at
// MPTOffset(RegMTTEntries), after the MTT. The driver writes entries with
// 8-byte stores, MPTWord1 (state and access) last when it makes an entry
// valid and first when it invalidates one; the device reads the entry for
// every packet (it caches MTT translations, never MPT entries).
//
//	off  size  field
//	0    4     key: MPT index << 8 | variant byte
//	4    4     protection domain (nonzero)
//	8    4     flags: MPTState* | IB_ACCESS_* << MPTAccessShift | MPTType* << MPTTypeShift
//	12   4     first MTT entry of the region
//	16   8     iova: the address the region starts at, as keys name it
//	24   8     length in bytes
//
// A virtual address va of the region translates to MTT entry
// first + (va - iova&^0xfff) >> 12, offset va & 0xfff in that page.
const (
	MPTEntrySize = 32

	MPTStateMask  = 0x3
	MPTStateFree  = 0 // no region: every access is refused
	MPTStateValid = 1

	MPTAccessShift = 8 // IB_ACCESS_* bits 0-7
	MPTTypeShift   = 16
	MPTTypeMask    = 0xf << MPTTypeShift
	MPTTypePinned  = 0 << MPTTypeShift // REG_MR: every page present while valid
	MPTTypeODP     = 1 << MPTTypeShift // REG_MR with IB_ACCESS_ON_DEMAND (issue: ODP)
	MPTTypeFastReg = 2 << MPTTypeShift // ALLOC_MR, bound by FAST_REG_MR (issue: fast registration)
)

// MPTOffset is the BAR4 offset of the MPT on a device with mttEntries MTT
// entries: the MTT rounded up to a 4 KiB page.
func MPTOffset(mttEntries int) uint64 {
	return (uint64(mttEntries)*MTTEntrySize + 0xfff) &^ 0xfff
}

// MPTEntry is an MPT entry, laid out as the table above.
type MPTEntry struct {
	_        structs.HostLayout
	Key      uint32
	PD       uint32
	Flags    uint32
	MTTFirst uint32
	IOVA     uint64
	Length   uint64
}

func (e *MPTEntry) Marshal(b []byte)   { marshal(b, e) }
func (e *MPTEntry) Unmarshal(b []byte) { unmarshal(b, e) }

// Word 1 of an entry (bytes 8-15: flags and first MTT entry) as one 8-byte
// store, so state and translation change together.
func (e *MPTEntry) Word1() uint64 { return uint64(e.Flags) | uint64(e.MTTFirst)<<32 }

// MPTIndex and MPTVariant split a key.
func MPTIndex(key uint32) uint32   { return key >> 8 }
func MPTVariant(key uint32) uint32 { return key & 0xff }

// Rings. The CQ ring and the send and receive queues are rings of a power
// of two entries in host memory with a producer (tail) and a consumer
// (head) index, each in 0..entries-1 and advanced modulo the size. One slot
// always stays empty: a ring is empty when head == tail and full when
// (tail+1) mod entries == head, so it holds entries-1. The driver produces
// WQEs (SQTail, RQTail doorbells) and the device consumes them (SQHead,
// RQHead); the device produces CQEs (CQTail) and the driver consumes them
// (CQHead). A tail or head index written out of range is refused.

// Per-CQ CSRs: CQ n's block starts at CQBase + n*CQStride.
const (
	CQBase   = 0xc000
	CQStride = 0x40

	CQRingBase = 0x00 // RW: IOVA of the CQE ring (CQESize each)
	CQEntries  = 0x08 // RW: CQEs, power of two; writing it (re)starts the CQ empty
	CQHead     = 0x10 // RW: consumer index written by the driver (for overflow)
	CQTail     = 0x18 // RO: producer index
	CQControl  = 0x20 // RW: CQCtrl* | interrupt context << CQCtrlCtxtShift
	CQStatus   = 0x28 // RO: CQStatus*
	CQHeadAddr = 0x30 // RW (CapCQHeadRec): IOVA of the CQ's consumer-index record (0: none); see below
)

// CQHeadAddr (CapCQHeadRec) is the CQ's consumer-index record, as mlx5's
// set_ci doorbell record: the IOVA (8-byte aligned; 0: none) of an 8-byte
// word in host memory where the driver keeps the consumer index, so it
// need not write CQHead. The driver stores the index there (one 8-byte
// store) whenever it consumed CQEs. The device reads the word only when a
// CQE finds the ring full by the head it holds, (tail+1) mod entries ==
// head: a value below entries becomes the head (as a write to CQHead
// would), and only then does the device decide overflow. A value out of
// range is refused and counted in ErrCntVerbs, a read that faults is
// counted in ErrCntIOMMUFault and ErrCntVerbs; either way the device keeps
// the head it had, and the CQE overflows as without a record. The record
// and CQHead both set the head, whichever came last: a driver uses one or
// the other. The device does not write the word and does not zero it when
// the CQ (re)starts: the driver stores 0 there before it writes
// CQEntries. Writing CQHeadAddr while the CQ is enabled, or an address
// that is not 8-byte aligned, is refused and counted in ErrCntVerbs.
//
// Ordering: the driver stores the index before it posts the work requests
// whose completions need the freed slots, and the device reads the record
// only after it took those requests (from their doorbell, register or
// record), so it never finds the ring falsely full.
const CapCQHeadRec = 1 << 9

// CQReg returns the BAR0 offset of register reg of CQ n.
func CQReg(n int, reg uint64) uint64 { return CQBase + uint64(n)*CQStride + reg }

// CQControl bits. An armed CQ raises the interrupt of its receive context
// (IntSrcCtxt) when it writes a CQE, and disarms; the driver re-arms.
const (
	CQCtrlEnable    = 1 << 0
	CQCtrlArm       = 1 << 1
	CQCtrlCtxtShift = 8 // bits 8-15: the receive context whose interrupt the CQ raises
)

// CQStatus bits.
const (
	CQStatusOverflow = 1 << 0 // a CQE found the ring full; the CQ is in error
)

// Per-QP CSRs: QP n's block starts at QPBase + n*QPStride.
const (
	QPBase   = 0xa000
	QPStride = 0x80

	QPControl    = 0x00 // RW: QPState (bits 0-3, GOHFI_QPS_*) | type << QPTypeShift; see below
	QPSQBase     = 0x08 // RW: IOVA of the send queue (SendWQESize each)
	QPSQEntries  = 0x10 // RW: WQEs, power of two
	QPSQTail     = 0x18 // RW: send doorbell: producer index
	QPSQHead     = 0x20 // RO: consumer index (WQEs completed or flushed)
	QPRQBase     = 0x28 // RW: IOVA of the receive queue (RecvWQESize each)
	QPRQEntries  = 0x30 // RW: WQEs, power of two
	QPRQTail     = 0x38 // RW: receive doorbell: producer index
	QPRQHead     = 0x40 // RO: consumer index
	QPCQs        = 0x48 // RW: send CQ index | receive CQ index << 32
	QPPD         = 0x50 // RW: protection domain
	QPDest       = 0x58 // RW: destination QP number | destination port << 32 (0: this device)
	QPAccess     = 0x60 // RW: IB_ACCESS_REMOTE_* the responder allows
	QPPSN        = 0x68 // RW: send PSN | receive PSN << 32 (24 bits each)
	QPStatus     = 0x70 // RO: the state the device holds (it moves a QP to ERR by itself)
	QPSQHeadAddr = 0x78 // RW: where the device also writes SQHead in host memory (0: nowhere); see below
)

// QPSQHeadAddr, like CtxtSQHeadAddr for contexts, spares the driver a
// register read to learn which send WQEs the device consumed: bits 3-63
// are the IOVA of an 8-byte word (8-byte aligned; 0: none), bits 0-2 a tag.
// Each time SQHead advances (a WQE completed or flushed), the device writes
// the word SQHead | tag << 32 there: for a completed WQE before its CQE (a
// driver that polled the CQE reads a head past its WQE), for a flushed one
// after its flush CQE. The
// register is used as it is at each write (not latched) and kept across
// RESET, in which the device writes nothing. The tag lets a driver that
// changes it at every RESET tell a write of the QP's earlier life (one the
// engine had under way when RESET came) from one of the new.
const (
	QPSQHeadTagMask  = 0x7
	QPSQHeadTagShift = 32
)

// QPReg returns the BAR0 offset of register reg of QP n.
func QPReg(n int, reg uint64) uint64 { return QPBase + uint64(n)*QPStride + reg }

// Doorbell records (RegCapFlags CapDBRec). The QP block is full, so each
// QP has a second block of QPDBStride bytes at QPDBBase + n*QPDBStride.
//
// QPDBRecAddr (RW) is the IOVA of the QP's doorbell record in host memory
// (DBRecSize bytes, DBRecAlign-aligned; 0: none, the QP is rung through
// QPSQTail and QPRQTail only). The register is used as it is at each
// access (not latched); writing it wakes the engine.
//
//	off  size  written by  field
//	0    4     driver      sq_tail: send queue producer index, as QPSQTail
//	4    4     driver      rq_tail: receive queue producer index, as QPRQTail
//	8    4     device      flags: DBRecNotify
//	12   52    -           reserved, 0
//
// The driver stores each new producer index into the record with a plain
// (single-copy atomic) 4-byte store after the WQEs it covers, instead of
// writing the register. While the engine is awake it reads the records of
// every QP not in RESET each pass, and takes an index as if written to
// QPSQTail/QPRQTail when it differs from the one it last read from that
// record (an index out of range is refused and counted in ErrCntVerbs, as
// a register write). A write to QPSQTail or QPRQTail of a QP with a record
// only wakes the engine, which then reads the record: the value written is
// checked (out of range or RESET: refused, counted) but not taken, so a
// posted register write that arrives late never moves a tail back behind
// the record. QPs with and without records mix freely; writing
// QPDBRecAddr on a live QP makes its current tails the indices last read.
//
// Notification suppression, as virtio's VRING_USED_F_NO_NOTIFY: the engine
// keeps polling the records for a while after its last work
// (Config.DBPollIdle in the model, about 50 us), then, before it sleeps,
// sets DBRecNotify in the flags of every record of a QP not in RESET, and
// reads the records once more: if an index changed it clears the flags and
// goes on; otherwise it sleeps until a register write wakes it (any
// doorbell register). When it wakes it clears the flags of the records it
// polls. The driver, after storing an index, reads flags (a full barrier
// between the store and the load: a locked instruction or MFENCE on x86,
// a sequentially consistent atomic in C11 or Go): when DBRecNotify is set
// it also writes the same index to QPSQTail or QPRQTail. Either the
// driver sees the flag or the engine's second read sees the index, so no
// doorbell is lost.
//
// QPDBRing (CapDBRing) is the register doorbell of a QP with a record
// whose value does not matter: a write of any value wakes the engine,
// which reads the record, as a write to QPSQTail or QPRQTail of that QP
// does (without the check of the value written). A write to the QPDBRing
// of a QP without a record or in RESET is refused and counted in
// ErrCntVerbs. Because its value means nothing, a vfio-user server offers
// every QP's QPDBRing as an ioeventfd (DEVICE_GET_REGION_IO_FDS): the
// driver rings a sleeping engine by an 8-byte write to an eventfd, with
// no message on the socket.
//
// At RESET the device forgets the indices it read (as it zeroes its
// heads and tails): the driver zeroes sq_tail and rq_tail and sets
// DBRecNotify when it writes QPDBRecAddr and at every RESET, before the QP
// leaves RESET. The device reads no record of a QP in RESET.
const (
	QPDBBase    = 0xd000
	QPDBStride  = 0x40
	QPDBRecAddr = 0x00 // RW: IOVA of the doorbell record (0: none)
	QPDBRing    = 0x08 // WO (CapDBRing): any value: read the QP's record now

	DBRecSize   = 64
	DBRecAlign  = 64
	DBRecSQTail = 0 // offsets in the record
	DBRecRQTail = 4
	DBRecFlags  = 8
	DBRecNotify = 1 << 0 // device asleep or not yet polling: write the register too
	CapDBRec    = 1 << 5 // RegCapFlags: doorbell records
	CapDBRing   = 1 << 8 // RegCapFlags: QPDBRing, also offered as an ioeventfd
)

// QPDBReg returns the BAR0 offset of doorbell-block register reg of QP n.
func QPDBReg(n int, reg uint64) uint64 { return QPDBBase + uint64(n)*QPDBStride + reg }

// QPControl: a write sets the QP's state and type. RESET empties both
// queues (heads and tails to 0) and forgets the QP's configuration checks;
// INIT, RTR and RTS take the ring and CQ registers as they are (the device
// checks them: a bad one refuses the transition, QPStatus stays); ERR
// flushes every outstanding WQE of both queues with GOHFI_WC_WR_FLUSH_ERR.
// The device processes the send queue in RTS and accepts incoming packets
// in RTR and RTS; in ERR every newly posted WQE is flushed.
const (
	QPStateMask = 0xf
	QPTypeShift = 8
)

// Send WQE: SendWQESize bytes per entry of a QP's send queue.
//
//	off  size  field
//	0    8     wr_id
//	8    1     opcode (GOHFI_WR_*)
//	9    1     flags (GOHFI_SEND_*)
//	10   2     num_sge (<= RegMaxSGE)
//	12   4     imm_data (network order) or invalidate_rkey
//	16   8     remote_addr
//	24   4     rkey
//	28   4     reserved, 0
//	32   8     atomic compare (CMP_AND_SWP) or add (FETCH_AND_ADD)
//	40   8     atomic swap
//	48   16    reserved, 0
//	64   64    fast-registration: iova(8) length(8) page list IOVA(8) page list len(4) page shift(4)
//	           MPT index(4) key(4) access(4) reserved(20)
//	128  128   SGEs: WQEMaxSGE x { addr(8) length(4) lkey(4) }
//
// SGE addresses are the virtual addresses of the lkey's region.
const (
	SendWQESize = 256
	RecvWQESize = 256
	WQEMaxSGE   = 8
	wqeSGEOff   = 128
	SGESize     = 16
)

// SGE is one scatter/gather element of a WQE: addr(8) length(4) lkey(4).
type SGE struct {
	_      structs.HostLayout
	Addr   uint64
	Length uint32
	Lkey   uint32
}

// SendWQE is a send WQE, laid out as the table above.
type SendWQE struct {
	_          structs.HostLayout
	WrID       uint64
	Opcode     uint8
	Flags      uint8
	NumSGE     uint16
	Imm        uint32 // imm_data or invalidate_rkey
	RemoteAddr uint64
	Rkey       uint32
	_          [4]byte // reserved
	CompareAdd uint64
	Swap       uint64
	_          [16]byte // reserved
	// Fast registration.
	FrIOVA        uint64
	FrLength      uint64
	FrPageList    uint64 // IOVA of the page list (u64 IOVAs of the pages)
	FrPageListLen uint32
	FrPageShift   uint32
	FrMPTIndex    uint32
	FrKey         uint32
	FrAccess      uint32
	_             [20]byte // reserved
	SGE           [WQEMaxSGE]SGE
}

func (w *SendWQE) Marshal(b []byte)   { marshal(b, w) }
func (w *SendWQE) Unmarshal(b []byte) { unmarshal(b, w) }

// Receive WQE: RecvWQESize bytes per entry of a QP's receive queue.
//
//	off  size  field
//	0    8     wr_id
//	8    2     num_sge
//	10   118   reserved, 0
//	128  128   SGEs, as in the send WQE
type RecvWQE struct {
	_      structs.HostLayout
	WrID   uint64
	NumSGE uint16
	_      [118]byte // reserved
	SGE    [WQEMaxSGE]SGE
}

func (w *RecvWQE) Marshal(b []byte)   { marshal(b, w) }
func (w *RecvWQE) Unmarshal(b []byte) { unmarshal(b, w) }

// CQE: CQESize bytes per entry of a CQ ring, written by the device. Seq is
// the entry's 1-based sequence number modulo 2^32 with 0 skipped (after
// 0xffffffff comes 1; a restarted CQ starts at 1), so the driver polls the
// ring in memory (as with RHQ entries) and reads no register: the entry at
// its head is new when its seq is the last one seen plus one (0 skipped).
// The device makes seq visible last: it writes bytes 0-39 and 48-63 first,
// then bytes 40-47 (wc_flags and seq, CQESeqWordOff) as one 8-byte write,
// so a driver that sees the expected seq (and reads the rest after it, with
// a read barrier on a weakly ordered CPU) sees the whole entry.
//
//	off  size  field
//	0    8     wr_id
//	8    4     status (GOHFI_WC_SUCCESS or an error status)
//	12   4     opcode (GOHFI_WC_*)
//	16   4     vendor_err (VendorErr*)
//	20   4     byte_len
//	24   4     invalidated_rkey
//	28   4     imm_data
//	32   4     qp_num (local QP number)
//	36   4     src_qp
//	40   4     wc_flags (GOHFI_WC_WITH_IMM, ...)
//	44   4     seq
//	48   16    reserved, 0
const (
	CQESize       = 64
	CQESeqWordOff = 40 // wc_flags | seq << 32, the entry's last write
)

// CQE is a completion queue entry, laid out as the table above.
type CQE struct {
	_               structs.HostLayout
	WrID            uint64
	Status          uint32
	Opcode          uint32
	VendorErr       uint32
	ByteLen         uint32
	InvalidatedRkey uint32
	ImmData         uint32
	QPNum           uint32
	SrcQP           uint32
	WcFlags         uint32
	Seq             uint32
	_               [16]byte // reserved
}

func (e *CQE) Marshal(b []byte)   { marshal(b, e) }
func (e *CQE) Unmarshal(b []byte) { unmarshal(b, e) }

// Vendor error codes in a CQE with an error status: which check failed.
const (
	VendorErrNone       = 0
	VendorErrKey        = 1 // no such key, or its variant byte does not match
	VendorErrPD         = 2 // the region belongs to another protection domain
	VendorErrState      = 3 // the region is not valid
	VendorErrAccess     = 4 // the region does not allow the access
	VendorErrBounds     = 5 // the access runs past the region
	VendorErrDMA        = 6 // the device could not reach the memory (IOMMU fault)
	VendorErrNoRecv     = 7 // SEND with no receive WQE posted (RNR retries exhausted)
	VendorErrLength     = 8 // SEND longer than the receive WQE's buffers
	VendorErrOpcode     = 9 // opcode the QP or device does not support
	VendorErrBadWQE     = 10
	VendorErrRemoteQP   = 11 // the destination QP does not exist or is not in RTR/RTS
	VendorErrCQOverflow = 12
)

// The verbs CSR blocks fit in BAR0 above the MSI-X PBA and below its end
// (compile-time checks: a negative array length does not compile).
var (
	_ [QPBase - (MSIXPBAOffset + 0x1000)]struct{}
	_ [CQBase - (QPBase + MaxQPs*QPStride)]struct{}
	_ [QPDBBase - (CQBase + MaxCQs*CQStride)]struct{}
	_ [CSRBarSize - (QPDBBase + MaxQPs*QPDBStride)]struct{}
	_ [DBRecSize - (DBRecFlags + 4)]struct{}
	_ [QPStride - (QPStatus + 8)]struct{}
	_ [CQStride - (CQStatus + 8)]struct{}
)
