package chip

import "structs"

// On-demand paging (RegCapFlags CapODP): the event queue, page faults and
// their resume command. docs/hfisim.md, "On-demand paging", is the
// datasheet of this file.
//
// An MR of type MPTTypeODP may have MTT entries that are not present. A
// packet that needs such a page (or writes a page whose entry lacks
// MTTWrite) does not fail: the device writes a page-fault EQE to the event
// queue, raises IntSrcEQ, and suspends the requester QP at that packet
// (nothing of the packet is moved; the QP is skipped, like an RNR wait)
// until the driver writes RegPFResume with the fault's id. On success the
// packet is tried again from the MTT as it is then (a page still missing
// faults again, under a new id); on error the operation fails: a requester
// SGE with GOHFI_WC_LOC_PROT_ERR, a responder access with
// GOHFI_WC_REM_ACCESS_ERR at the requester (and, for a SEND, the receive
// WQE with GOHFI_WC_LOC_PROT_ERR), vendor error VendorErrPageFault. Without
// an event queue (RegEQEntries 0) a fault fails at once the same way.

// Event queue and page-fault CSRs (BAR0).
const (
	RegEQBase    = 0x0c0 // RW: IOVA of the event queue (EQESize each, 64-byte aligned)
	RegEQEntries = 0x0c8 // RW: entries, power of two >= 2 (0: no queue); writing it (re)starts the queue empty
	RegEQHead    = 0x0d0 // RW: consumer index written by the driver
	RegEQTail    = 0x0d8 // RO: producer index
	RegPFResume  = 0x0e0 // WO: fault id (bits 0-31) | PFResumeError: resume a suspended operation

	// ODP counters, RO, cleared by reset.
	RegCntPageFaults = 0x1c0 // page faults raised
	RegCntPFResumes  = 0x1c8 // resume commands that named a pending fault
	RegCntEQWaits    = 0x1d0 // faults that waited for room in the event queue
)

// PFResumeError in a RegPFResume write fails the suspended operation.
const PFResumeError = 1 << 32

// Interrupt sources of the event queue and the TLB invalidation, in
// RegIntStatus and RegIntMask beside IntSrcError and the contexts. Both are
// delivered on the error vector (MSI-X vector 0; INTx with the rest):
// IntSrcEQ when the device has written an EQE, IntSrcTLB when a
// TLB-invalidate command completed (RegTLBInvDone moved).
const (
	IntSrcEQ  = 1 << 62
	IntSrcTLB = 1 << 63
	// IntSrcVector0 is every source that MSI-X vector 0 signals.
	IntSrcVector0 = IntSrcError | IntSrcEQ | IntSrcTLB
)

// EQE: EQESize bytes per entry of the event queue, written by the device
// with its seq word last, so the driver polls the ring in memory (as CQEs).
//
//	off  size  field
//	0    1     type (EQEType*)
//	1    1     flags (EQEFlag*)
//	2    2     reserved, 0
//	4    4     fault id: the value to write to RegPFResume
//	8    4     key of the access (the SGE's lkey or the packet's rkey)
//	12   4     QP index of the faulting side (the responder QP for a responder fault)
//	16   8     va: the first address the device could not translate
//	24   4     length: bytes from va the operation still accesses through this key
//	           (the rest of the SGE, or of the RDMA message; 8 for an atomic)
//	28   4     WQE index: send queue index (requester side), receive queue index
//	           (SEND into a receive WQE), EQEWQENone (RDMA and atomic responder)
//	32   4     requester QP index (whose send queue is suspended)
//	36   4     protection domain of the faulting side
//	40   20    reserved, 0
//	60   4     seq: 1-based modulo 2^32, never 0
const (
	EQESize = 64

	EQETypePageFault = 1

	EQEFlagWrite     = 1 << 0 // the access writes memory
	EQEFlagResponder = 1 << 1 // the responder's access (rkey, or the receive WQE's SGEs)

	EQEWQENone = 0xffffffff
)

// EQE is an event queue entry, laid out as the table above.
type EQE struct {
	_       structs.HostLayout
	Type    uint8
	Flags   uint8
	_       [2]byte // reserved
	FaultID uint32
	Key     uint32
	QP      uint32
	VA      uint64
	Length  uint32
	WQE     uint32
	ReqQP   uint32
	PD      uint32
	_       [20]byte // reserved
	Seq     uint32
}

func (e *EQE) Marshal(b []byte)   { marshal(b, e) }
func (e *EQE) Unmarshal(b []byte) { unmarshal(b, e) }

// EQESeqOff is the offset of the seq word, written last.
const EQESeqOff = 60

// VendorErrPageFault is the vendor error of an operation whose page fault
// the driver resumed with PFResumeError (or that faulted with no event
// queue).
const VendorErrPageFault = 13

// The EQ CSRs lie between the verbs size registers and the error counters
// (compile-time check).
var _ [RegErrCntIOMMUFault - (RegPFResume + 8)]struct{}
