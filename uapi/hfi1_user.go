package uapi

import "structs"

// Version of the hfi1 user interface (include/uapi/rdma/hfi/hfi1_user.h).
// User space passes HFI1_USER_SWVERSION in hfi1_user_info.userversion; the
// driver refuses a different major.
const (
	HFI1_USER_SWMAJOR   = 6
	HFI1_USER_SWMINOR   = 3
	HFI1_SWMAJOR_SHIFT  = 16
	HFI1_USER_SWVERSION = HFI1_USER_SWMAJOR<<HFI1_SWMAJOR_SHIFT | HFI1_USER_SWMINOR
)

// Capability and feature bits (hfi1_ctxt_info.runtime_flags), hfi1_user.h.
const (
	HFI1_CAP_DMA_RTAIL           = 1 << 0  // Use DMA'ed RTail value
	HFI1_CAP_SDMA                = 1 << 1  // Enable SDMA support
	HFI1_CAP_SDMA_AHG            = 1 << 2  // Enable SDMA AHG support
	HFI1_CAP_EXTENDED_PSN        = 1 << 3  // Enable Extended PSN support
	HFI1_CAP_HDRSUPP             = 1 << 4  // Enable Header Suppression
	HFI1_CAP_TID_RDMA            = 1 << 5  // Enable TID RDMA operations
	HFI1_CAP_USE_SDMA_HEAD       = 1 << 6  // DMA Hdr Q tail vs. use CSR
	HFI1_CAP_MULTI_PKT_EGR       = 1 << 7  // Enable multi-packet Egr buffs
	HFI1_CAP_NODROP_RHQ_FULL     = 1 << 8  // Don't drop on Hdr Q full
	HFI1_CAP_NODROP_EGR_FULL     = 1 << 9  // Don't drop on EGR buffs full
	HFI1_CAP_TID_UNMAP           = 1 << 10 // Disable Expected TID caching
	HFI1_CAP_PRINT_UNIMPL        = 1 << 11 // Show for unimplemented feats
	HFI1_CAP_ALLOW_PERM_JKEY     = 1 << 12 // Allow use of permissive JKEY
	HFI1_CAP_NO_INTEGRITY        = 1 << 13 // Enable ctxt integrity checks
	HFI1_CAP_PKEY_CHECK          = 1 << 14 // Enable ctxt PKey checking
	HFI1_CAP_STATIC_RATE_CTRL    = 1 << 15 // Allow PBC.StaticRateControl
	HFI1_CAP_OPFN                = 1 << 16 // Enable the OPFN protocol
	HFI1_CAP_SDMA_HEAD_CHECK     = 1 << 17 // SDMA head checking
	HFI1_CAP_EARLY_CREDIT_RETURN = 1 << 18 // early credit return
	HFI1_CAP_AIP                 = 1 << 19 // Enable accelerated IP
)

// Receive header queue entry sizes, hfi1_user.h (the typo in 32 is the kernel's).
const (
	HFI1_RCVHDR_ENTSIZE_2  = 1 << 0
	HFI1_RCVHDR_ENTSIZE_16 = 1 << 1
	HFI1_RCVDHR_ENTSIZE_32 = 1 << 2
)

// Event bits in the per-context events page, acknowledged by
// HFI1_IOCTL_ACK_EVENT, hfi1_user.h.
const (
	_HFI1_EVENT_FROZEN_BIT         = 0
	_HFI1_EVENT_LINKDOWN_BIT       = 1
	_HFI1_EVENT_LID_CHANGE_BIT     = 2
	_HFI1_EVENT_LMC_CHANGE_BIT     = 3
	_HFI1_EVENT_SL2VL_CHANGE_BIT   = 4
	_HFI1_EVENT_TID_MMU_NOTIFY_BIT = 5
	_HFI1_MAX_EVENT_BIT            = _HFI1_EVENT_TID_MMU_NOTIFY_BIT

	HFI1_EVENT_FROZEN         = 1 << _HFI1_EVENT_FROZEN_BIT
	HFI1_EVENT_LINKDOWN       = 1 << _HFI1_EVENT_LINKDOWN_BIT
	HFI1_EVENT_LID_CHANGE     = 1 << _HFI1_EVENT_LID_CHANGE_BIT
	HFI1_EVENT_LMC_CHANGE     = 1 << _HFI1_EVENT_LMC_CHANGE_BIT
	HFI1_EVENT_SL2VL_CHANGE   = 1 << _HFI1_EVENT_SL2VL_CHANGE_BIT
	HFI1_EVENT_TID_MMU_NOTIFY = 1 << _HFI1_EVENT_TID_MMU_NOTIFY_BIT
)

// Exported names for the event bit numbers (the C names begin with '_').
const (
	HFI1_EVENT_FROZEN_BIT         = _HFI1_EVENT_FROZEN_BIT
	HFI1_EVENT_LINKDOWN_BIT       = _HFI1_EVENT_LINKDOWN_BIT
	HFI1_EVENT_LID_CHANGE_BIT     = _HFI1_EVENT_LID_CHANGE_BIT
	HFI1_EVENT_LMC_CHANGE_BIT     = _HFI1_EVENT_LMC_CHANGE_BIT
	HFI1_EVENT_SL2VL_CHANGE_BIT   = _HFI1_EVENT_SL2VL_CHANGE_BIT
	HFI1_EVENT_TID_MMU_NOTIFY_BIT = _HFI1_EVENT_TID_MMU_NOTIFY_BIT
	HFI1_MAX_EVENT_BIT            = _HFI1_MAX_EVENT_BIT
)

// Device status bits (status page and sysfs), hfi1_user.h.
const (
	HFI1_STATUS_INITTED      = 0x1
	HFI1_STATUS_CHIP_PRESENT = 0x20
	HFI1_STATUS_IB_READY     = 0x40
	HFI1_STATUS_IB_CONF      = 0x80
	HFI1_STATUS_HWERROR      = 0x200
)

// HFI1_MAX_SHARED_CTXTS is the most software contexts sharing one hardware
// context, hfi1_user.h.
const HFI1_MAX_SHARED_CTXTS = 8

// Poll types for HFI1_IOCTL_POLL_TYPE, hfi1_user.h.
const (
	HFI1_POLL_TYPE_ANYRCV = 0x0
	HFI1_POLL_TYPE_URGENT = 0x1
)

// Receive-control operations (drivers/infiniband/hw/hfi1/hfi.h, the
// argument of the chip's rcvctrl). HFI1_IOCTL_RECV_CTRL takes an int:
// non-zero means HFI1_RCVCTRL_CTXT_ENB, zero HFI1_RCVCTRL_CTXT_DIS.
const (
	HFI1_RCVCTRL_TAILUPD_ENB     = 0x01
	HFI1_RCVCTRL_TAILUPD_DIS     = 0x02
	HFI1_RCVCTRL_CTXT_ENB        = 0x04
	HFI1_RCVCTRL_CTXT_DIS        = 0x08
	HFI1_RCVCTRL_INTRAVAIL_ENB   = 0x10
	HFI1_RCVCTRL_INTRAVAIL_DIS   = 0x20
	HFI1_RCVCTRL_PKEY_ENB        = 0x40 // default is enabled
	HFI1_RCVCTRL_PKEY_DIS        = 0x80
	HFI1_RCVCTRL_TIDFLOW_ENB     = 0x0400
	HFI1_RCVCTRL_TIDFLOW_DIS     = 0x0800
	HFI1_RCVCTRL_ONE_PKT_EGR_ENB = 0x1000
	HFI1_RCVCTRL_ONE_PKT_EGR_DIS = 0x2000
	HFI1_RCVCTRL_NO_RHQ_DROP_ENB = 0x4000
	HFI1_RCVCTRL_NO_RHQ_DROP_DIS = 0x8000
	HFI1_RCVCTRL_NO_EGR_DROP_ENB = 0x10000
	HFI1_RCVCTRL_NO_EGR_DROP_DIS = 0x20000
	HFI1_RCVCTRL_URGENT_ENB      = 0x40000
	HFI1_RCVCTRL_URGENT_DIS      = 0x80000
)

// Struct sizes (sizeof in C, x86-64 and every LP64 target).
const (
	SizeofHfi1UserInfo = 28
	SizeofHfi1CtxtInfo = 40
	SizeofHfi1TidInfo  = 24
	SizeofHfi1BaseInfo = 120
)

// Hfi1UserInfo is struct hfi1_user_info (include/uapi/rdma/hfi/hfi1_ioctl.h),
// the argument of HFI1_IOCTL_ASSIGN_CTXT.
type Hfi1UserInfo struct {
	_           structs.HostLayout
	Userversion uint32   `c:"userversion"` // HFI1_USER_SWVERSION
	Pad         uint32   `c:"pad"`
	SubctxtCnt  uint16   `c:"subctxt_cnt"` // processes sharing the context
	SubctxtID   uint16   `c:"subctxt_id"`  // node-unique id of the sharing group
	UUID        [16]byte `c:"uuid"`        // job UUID from PSM
}

func (*Hfi1UserInfo) SizeBytes() int                    { return SizeofHfi1UserInfo }
func (h *Hfi1UserInfo) MarshalBytes(dst []byte)         { marshal(dst, h) }
func (h *Hfi1UserInfo) UnmarshalBytes(src []byte) error { return unmarshal(src, h) }

// Hfi1CtxtInfo is struct hfi1_ctxt_info (include/uapi/rdma/hfi/hfi1_ioctl.h),
// written by HFI1_IOCTL_CTXT_INFO.
type Hfi1CtxtInfo struct {
	_              structs.HostLayout
	RuntimeFlags   uint64  `c:"runtime_flags"`   // HFI1_CAP_*
	RcvegrSize     uint32  `c:"rcvegr_size"`     // size of each eager buffer
	NumActive      uint16  `c:"num_active"`      // number of active units
	Unit           uint16  `c:"unit"`            // unit (chip) assigned
	Ctxt           uint16  `c:"ctxt"`            // context on the unit
	Subctxt        uint16  `c:"subctxt"`         // subcontext
	Rcvtids        uint16  `c:"rcvtids"`         // RcvArray entries for expected receive
	Credits        uint16  `c:"credits"`         // PIO credits
	NumaNode       uint16  `c:"numa_node"`       // NUMA node of the device
	RecCPU         uint16  `c:"rec_cpu"`         // CPU for affinity, 0xffff if none
	SendCtxt       uint16  `c:"send_ctxt"`       // send context in use
	Egrtids        uint16  `c:"egrtids"`         // RcvArray entries for eager receive
	RcvhdrqCnt     uint16  `c:"rcvhdrq_cnt"`     // RcvHdrQ entries
	RcvhdrqEntsize uint16  `c:"rcvhdrq_entsize"` // bytes per RcvHdrQ entry
	SdmaRingSize   uint16  `c:"sdma_ring_size"`  // SDMA request ring entries
	_              [2]byte // C tail padding to 8-byte alignment
}

func (*Hfi1CtxtInfo) SizeBytes() int                    { return SizeofHfi1CtxtInfo }
func (h *Hfi1CtxtInfo) MarshalBytes(dst []byte)         { marshal(dst, h) }
func (h *Hfi1CtxtInfo) UnmarshalBytes(src []byte) error { return unmarshal(src, h) }

// Hfi1TidInfo is struct hfi1_tid_info (include/uapi/rdma/hfi/hfi1_ioctl.h),
// the argument of TID_UPDATE, TID_FREE and TID_INVAL_READ.
type Hfi1TidInfo struct {
	_       structs.HostLayout
	Vaddr   uint64 `c:"vaddr"`   // first byte of the buffer (page aligned)
	Tidlist uint64 `c:"tidlist"` // user pointer to __u32[], TID encoding below
	Tidcnt  uint32 `c:"tidcnt"`  // TIDs in tidlist (in for FREE, out otherwise)
	Length  uint32 `c:"length"`  // bytes of the buffer programmed
}

func (*Hfi1TidInfo) SizeBytes() int                    { return SizeofHfi1TidInfo }
func (h *Hfi1TidInfo) MarshalBytes(dst []byte)         { marshal(dst, h) }
func (h *Hfi1TidInfo) UnmarshalBytes(src []byte) error { return unmarshal(src, h) }

// Hfi1BaseInfo is struct hfi1_base_info (include/uapi/rdma/hfi/hfi1_ioctl.h),
// written by HFI1_IOCTL_USER_INFO: mmap tokens of the context's regions.
type Hfi1BaseInfo struct {
	_                structs.HostLayout
	HwVersion        uint32 `c:"hw_version"`
	SwVersion        uint32 `c:"sw_version"`
	Jkey             uint16 `c:"jkey"`
	Padding1         uint16 `c:"padding1"`
	Bthqp            uint32 `c:"bthqp"`
	ScCreditsAddr    uint64 `c:"sc_credits_addr"`
	PioBufbaseSop    uint64 `c:"pio_bufbase_sop"`
	PioBufbase       uint64 `c:"pio_bufbase"`
	RcvhdrBufbase    uint64 `c:"rcvhdr_bufbase"`
	RcvegrBufbase    uint64 `c:"rcvegr_bufbase"`
	SdmaCompBufbase  uint64 `c:"sdma_comp_bufbase"`
	UserRegbase      uint64 `c:"user_regbase"`
	EventsBufbase    uint64 `c:"events_bufbase"`
	StatusBufbase    uint64 `c:"status_bufbase"`
	RcvhdrtailBase   uint64 `c:"rcvhdrtail_base"`
	SubctxtUregbase  uint64 `c:"subctxt_uregbase"`
	SubctxtRcvegrbuf uint64 `c:"subctxt_rcvegrbuf"`
	SubctxtRcvhdrbuf uint64 `c:"subctxt_rcvhdrbuf"`
}

func (*Hfi1BaseInfo) SizeBytes() int                    { return SizeofHfi1BaseInfo }
func (h *Hfi1BaseInfo) MarshalBytes(dst []byte)         { marshal(dst, h) }
func (h *Hfi1BaseInfo) UnmarshalBytes(src []byte) error { return unmarshal(src, h) }
