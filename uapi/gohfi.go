package uapi

import "structs"

// gohfi's own commands, for what hfi1 has no ioctl for: memory regions
// (pinned, on-demand paging, fast registration), completion queues, queue
// pairs, work requests and statistics. They share the RDMA ioctl type byte
// (0x1b) and use numbers 0x40-0x7f, which no Linux RDMA driver uses (the
// user MAD ioctls take 0x01-0x04, RDMA_VERBS_IOCTL 0x01, hfi1 0xE1-0xEE).
//
// Layout rules: every struct is naturally aligned with explicit padding
// (named reserved: user space must zero it and handlers reject anything
// else with EINVAL, so it can gain a meaning later), user pointers are
// __u64, and sizes are multiples of 8 so that arrays of them line up on
// 32- and 64-bit user space alike. The C definitions are in cdefs_test.go,
// compiled by parity_test.go; docs/abi.md lists the commands.
//
// The constants for verbs concepts (access flags, opcodes, ODP capability
// bits) take their values from Linux's uverbs ABI and rdma-core so that
// nothing needs translating; where Linux has no user ABI value (REG_MR work
// requests and completions) the value is gohfi's own, chosen to match the
// kernel's enum where one exists.

// GOHFI_IOCTL_MAGIC is the ioctl type byte of gohfi's own commands.
const GOHFI_IOCTL_MAGIC = RDMA_IOCTL_MAGIC

// Command number range reserved for gohfi.
const (
	GOHFI_CMD_FIRST = 0x40
	GOHFI_CMD_LAST  = 0x7f
)

const gohfiType = GOHFI_IOCTL_MAGIC << _IOC_TYPESHIFT

// gohfi commands.
const (
	// _IOR(0x1b, 0x40, struct gohfi_device_attr)
	GOHFI_IOCTL_QUERY_DEVICE = iocR | SizeofGohfiDeviceAttr<<_IOC_SIZESHIFT | gohfiType | 0x40
	// _IOWR(0x1b, 0x41, struct gohfi_reg_mr)
	GOHFI_IOCTL_REG_MR = iocRW | SizeofGohfiRegMR<<_IOC_SIZESHIFT | gohfiType | 0x41
	// _IOW(0x1b, 0x42, struct gohfi_handle)
	GOHFI_IOCTL_DEREG_MR = iocW | SizeofGohfiHandle<<_IOC_SIZESHIFT | gohfiType | 0x42
	// _IOW(0x1b, 0x43, struct gohfi_advise_mr)
	GOHFI_IOCTL_ADVISE_MR = iocW | SizeofGohfiAdviseMR<<_IOC_SIZESHIFT | gohfiType | 0x43
	// _IOWR(0x1b, 0x44, struct gohfi_alloc_mr)
	GOHFI_IOCTL_ALLOC_MR = iocRW | SizeofGohfiAllocMR<<_IOC_SIZESHIFT | gohfiType | 0x44
	// _IOWR(0x1b, 0x45, struct gohfi_create_cq)
	GOHFI_IOCTL_CREATE_CQ = iocRW | SizeofGohfiCreateCQ<<_IOC_SIZESHIFT | gohfiType | 0x45
	// _IOW(0x1b, 0x46, struct gohfi_handle)
	GOHFI_IOCTL_DESTROY_CQ = iocW | SizeofGohfiHandle<<_IOC_SIZESHIFT | gohfiType | 0x46
	// _IOWR(0x1b, 0x47, struct gohfi_create_qp)
	GOHFI_IOCTL_CREATE_QP = iocRW | SizeofGohfiCreateQP<<_IOC_SIZESHIFT | gohfiType | 0x47
	// _IOW(0x1b, 0x48, struct gohfi_modify_qp)
	GOHFI_IOCTL_MODIFY_QP = iocW | SizeofGohfiModifyQP<<_IOC_SIZESHIFT | gohfiType | 0x48
	// _IOW(0x1b, 0x49, struct gohfi_handle)
	GOHFI_IOCTL_DESTROY_QP = iocW | SizeofGohfiHandle<<_IOC_SIZESHIFT | gohfiType | 0x49
	// _IOWR(0x1b, 0x4a, struct gohfi_post_send)
	GOHFI_IOCTL_POST_SEND = iocRW | SizeofGohfiPostSend<<_IOC_SIZESHIFT | gohfiType | 0x4a
	// _IOWR(0x1b, 0x4b, struct gohfi_post_recv)
	GOHFI_IOCTL_POST_RECV = iocRW | SizeofGohfiPostRecv<<_IOC_SIZESHIFT | gohfiType | 0x4b
	// _IOWR(0x1b, 0x4c, struct gohfi_poll_cq)
	GOHFI_IOCTL_POLL_CQ = iocRW | SizeofGohfiPollCQ<<_IOC_SIZESHIFT | gohfiType | 0x4c
	// _IOWR(0x1b, 0x4d, struct gohfi_mr_stats)
	GOHFI_IOCTL_MR_STATS = iocRW | SizeofGohfiMRStats<<_IOC_SIZESHIFT | gohfiType | 0x4d
	// _IOR(0x1b, 0x4e, struct gohfi_driver_stats)
	GOHFI_IOCTL_DRIVER_STATS = iocR | SizeofGohfiDriverStats<<_IOC_SIZESHIFT | gohfiType | 0x4e
)

// Device capability flags (gohfi_device_attr.device_cap_flags), values of
// enum ib_uverbs_device_cap_flags (include/uapi/rdma/ib_user_verbs.h). ODP
// has no bit here: it is reported by odp_general_caps & IBV_ODP_SUPPORT, as
// rdma-core does.
const (
	IB_DEVICE_RC_RNR_NAK_GEN     = 1 << 12
	IB_DEVICE_N_NOTIFY_CQ        = 1 << 14
	IB_DEVICE_MEM_WINDOW         = 1 << 17
	IB_DEVICE_MEM_MGT_EXTENSIONS = 1 << 21 // fast registration: REG_MR, LOCAL_INV, READ_WITH_INV
)

// ODP capabilities (rdma-core's struct ibv_odp_caps): general caps and, per
// transport (rc, uc, ud), the operations that may fault.
const (
	IBV_ODP_SUPPORT          = 1 << 0
	IBV_ODP_SUPPORT_IMPLICIT = 1 << 1

	IBV_ODP_SUPPORT_SEND     = 1 << 0
	IBV_ODP_SUPPORT_RECV     = 1 << 1
	IBV_ODP_SUPPORT_WRITE    = 1 << 2
	IBV_ODP_SUPPORT_READ     = 1 << 3
	IBV_ODP_SUPPORT_ATOMIC   = 1 << 4
	IBV_ODP_SUPPORT_SRQ_RECV = 1 << 5
)

// Memory region access flags (enum ib_uverbs_access_flags / ib_access_flags).
const (
	IB_ACCESS_LOCAL_WRITE   = 1 << 0
	IB_ACCESS_REMOTE_WRITE  = 1 << 1
	IB_ACCESS_REMOTE_READ   = 1 << 2
	IB_ACCESS_REMOTE_ATOMIC = 1 << 3
	IB_ACCESS_MW_BIND       = 1 << 4
	IB_ACCESS_ZERO_BASED    = 1 << 5
	IB_ACCESS_ON_DEMAND     = 1 << 6 // ODP: register without pinning
	IB_ACCESS_HUGETLB       = 1 << 7
)

// ADVISE_MR advice and flags (enum ib_uverbs_advise_mr_advice / _flag).
const (
	GOHFI_ADVISE_MR_ADVICE_PREFETCH          = 0      // fault in for read
	GOHFI_ADVISE_MR_ADVICE_PREFETCH_WRITE    = 1      // fault in for write
	GOHFI_ADVISE_MR_ADVICE_PREFETCH_NO_FAULT = 2      // map only pages already present
	GOHFI_ADVISE_MR_FLAG_FLUSH               = 1 << 0 // synchronous: return when done
)

// The context's events page (hfi1_base_info.events_bufbase, mapped
// read-only): byte offsets of its __u64 words. Word 0 holds the
// HFI1_EVENT_* bits, as in hfi1. gohfi adds the invalidation generations
// (kdreg2's scheme): GEN_OPENED moves before an munmap, mremap or madvise
// of watched memory returns; once GEN_DELIVERED has caught up with a value
// read from GEN_OPENED, HFI1_EVENT_TID_MMU_NOTIFY reflects every such
// invalidation up to it. TID_INVAL_READ waits for that itself.
// SDMA_DONE counts the context's GOHFI_SEND_FLAG_SDMA sends the device has
// consumed (read their payload) or CTXT_RESET dropped: the send whose
// GOHFI_IOCTL_SEND returned completion number n in gohfi_send.reserved
// has left its buffer once SDMA_DONE >= n.
const (
	GOHFI_EVENTS_BITS_OFF          = 0
	GOHFI_EVENTS_GEN_OPENED_OFF    = 8
	GOHFI_EVENTS_GEN_DELIVERED_OFF = 16
	GOHFI_EVENTS_SDMA_DONE_OFF     = 24
)

// MR types for ALLOC_MR (enum ib_mr_type).
const (
	GOHFI_MR_TYPE_MEM_REG = 0 // fast-registration MR, bound by REG_MR work requests
)

// Queue pair types (enum ib_qp_type) and states (enum ib_qp_state).
const (
	GOHFI_QPT_RC = 2
	GOHFI_QPT_UC = 3
	GOHFI_QPT_UD = 4

	GOHFI_QPS_RESET = 0
	GOHFI_QPS_INIT  = 1
	GOHFI_QPS_RTR   = 2
	GOHFI_QPS_RTS   = 3
	GOHFI_QPS_SQD   = 4
	GOHFI_QPS_SQE   = 5
	GOHFI_QPS_ERR   = 6

	// gohfi_modify_qp.flags: the transport attributes (timeout,
	// retry_cnt, rnr_retry, min_rnr_timer) are set (RTR only).
	GOHFI_MODIFY_QP_NET = 1 << 0
)

// Send work request opcodes. 0-13 are enum ib_uverbs_wr_opcode; FAST_REG_MR
// is the kernel's IB_WR_REG_MR (0x20, formerly IB_WR_FAST_REG_MR), which
// has no user ABI value in Linux.
const (
	GOHFI_WR_RDMA_WRITE           = 0
	GOHFI_WR_RDMA_WRITE_WITH_IMM  = 1
	GOHFI_WR_SEND                 = 2
	GOHFI_WR_SEND_WITH_IMM        = 3
	GOHFI_WR_RDMA_READ            = 4
	GOHFI_WR_ATOMIC_CMP_AND_SWP   = 5
	GOHFI_WR_ATOMIC_FETCH_AND_ADD = 6
	GOHFI_WR_LOCAL_INV            = 7
	GOHFI_WR_BIND_MW              = 8
	GOHFI_WR_SEND_WITH_INV        = 9
	GOHFI_WR_RDMA_READ_WITH_INV   = 11
	GOHFI_WR_FAST_REG_MR          = 0x20
	GOHFI_WR_REG_MR               = GOHFI_WR_FAST_REG_MR
)

// Send flags (enum ib_send_flags).
const (
	GOHFI_SEND_FENCE     = 1 << 0
	GOHFI_SEND_SIGNALED  = 1 << 1
	GOHFI_SEND_SOLICITED = 1 << 2
	GOHFI_SEND_INLINE    = 1 << 3
)

// Work completion opcodes. 0-6 are enum ib_uverbs_wc_opcode, RECV values are
// the kernel's IB_WC_RECV (1<<7); FAST_REG_MR is gohfi's own. A
// RDMA_READ_WITH_INV completes as GOHFI_WC_RDMA_READ, as in Linux.
const (
	GOHFI_WC_SEND               = 0
	GOHFI_WC_RDMA_WRITE         = 1
	GOHFI_WC_RDMA_READ          = 2
	GOHFI_WC_COMP_SWAP          = 3
	GOHFI_WC_FETCH_ADD          = 4
	GOHFI_WC_BIND_MW            = 5
	GOHFI_WC_LOCAL_INV          = 6
	GOHFI_WC_FAST_REG_MR        = 0x20
	GOHFI_WC_REG_MR             = GOHFI_WC_FAST_REG_MR
	GOHFI_WC_RECV               = 1 << 7
	GOHFI_WC_RECV_RDMA_WITH_IMM = GOHFI_WC_RECV + 1
)

// Work completion status (enum ib_wc_status).
const (
	GOHFI_WC_SUCCESS            = 0
	GOHFI_WC_LOC_LEN_ERR        = 1
	GOHFI_WC_LOC_QP_OP_ERR      = 2
	GOHFI_WC_LOC_PROT_ERR       = 4
	GOHFI_WC_WR_FLUSH_ERR       = 5
	GOHFI_WC_MW_BIND_ERR        = 6
	GOHFI_WC_BAD_RESP_ERR       = 7
	GOHFI_WC_LOC_ACCESS_ERR     = 8
	GOHFI_WC_REM_INV_REQ_ERR    = 9
	GOHFI_WC_REM_ACCESS_ERR     = 10
	GOHFI_WC_REM_OP_ERR         = 11
	GOHFI_WC_RETRY_EXC_ERR      = 12
	GOHFI_WC_RNR_RETRY_EXC_ERR  = 13
	GOHFI_WC_REM_INV_RD_REQ_ERR = 15
	GOHFI_WC_FATAL_ERR          = 19
	GOHFI_WC_RESP_TIMEOUT_ERR   = 20
	GOHFI_WC_GENERAL_ERR        = 21
)

// Work completion flags (enum ib_wc_flags).
const (
	GOHFI_WC_GRH             = 1 << 0
	GOHFI_WC_WITH_IMM        = 1 << 1
	GOHFI_WC_WITH_INVALIDATE = 1 << 2
)

// Struct sizes.
const (
	SizeofGohfiDeviceAttr  = 104
	SizeofGohfiRegMR       = 40
	SizeofGohfiHandle      = 8
	SizeofGohfiAdviseMR    = 32
	SizeofGohfiAllocMR     = 24
	SizeofGohfiCreateCQ    = 16
	SizeofGohfiCreateQP    = 40
	SizeofGohfiModifyQP    = 40
	SizeofGohfiSge         = 16
	SizeofGohfiSendWR      = 120
	SizeofGohfiRecvWR      = 24
	SizeofGohfiPostSend    = 24
	SizeofGohfiPostRecv    = 24
	SizeofGohfiWC          = 48
	SizeofGohfiPollCQ      = 24
	SizeofGohfiMRStats     = 56
	SizeofGohfiDriverStats = 128
)

// GohfiDeviceAttr is struct gohfi_device_attr, written by QUERY_DEVICE.
// The odp_* fields are rdma-core's struct ibv_odp_caps, flattened.
type GohfiDeviceAttr struct {
	_                     structs.HostLayout
	VendorID              uint32 `c:"vendor_id"`        // PCI vendor id
	VendorPartID          uint32 `c:"vendor_part_id"`   // PCI device id
	HwVer                 uint32 `c:"hw_ver"`           // PCI revision
	NumContexts           uint32 `c:"num_contexts"`     // user receive contexts
	RcvArrayEntries       uint32 `c:"rcvarray_entries"` // expected RcvArray entries per context
	MaxTidPages           uint32 `c:"max_tid_pages"`    // pages one TID may cover
	MttEntries            uint32 `c:"mtt_entries"`      // device translation table pages
	MaxMR                 uint32 `c:"max_mr"`           //
	MaxQP                 uint32 `c:"max_qp"`           //
	MaxQPWR               uint32 `c:"max_qp_wr"`        // work requests per queue
	MaxSge                uint32 `c:"max_sge"`          // scatter/gather entries per WR
	MaxCQ                 uint32 `c:"max_cq"`           //
	MaxCQE                uint32 `c:"max_cqe"`          // entries per CQ
	MaxFastRegPageListLen uint32 `c:"max_fast_reg_page_list_len"`
	MaxMRSize             uint64 `c:"max_mr_size"`
	PageSizeCap           uint64 `c:"page_size_cap"`    // supported page sizes, bit per size
	DeviceCapFlags        uint64 `c:"device_cap_flags"` // IB_DEVICE_*
	OdpGeneralCaps        uint64 `c:"odp_general_caps"` // IBV_ODP_SUPPORT*
	OdpRCCaps             uint32 `c:"odp_rc_caps"`      // IBV_ODP_SUPPORT_SEND...
	OdpUCCaps             uint32 `c:"odp_uc_caps"`
	OdpUDCaps             uint32 `c:"odp_ud_caps"`
	Reserved              uint32 `c:"reserved"`
}

func (*GohfiDeviceAttr) SizeBytes() int                    { return SizeofGohfiDeviceAttr }
func (g *GohfiDeviceAttr) MarshalBytes(dst []byte)         { marshal(dst, g) }
func (g *GohfiDeviceAttr) UnmarshalBytes(src []byte) error { return unmarshal(src, g) }

// GohfiRegMR is struct gohfi_reg_mr, the argument of REG_MR. With
// IB_ACCESS_ON_DEMAND in access_flags the MR is an ODP MR (nothing pinned at
// registration); otherwise every page is pinned and mapped now.
type GohfiRegMR struct {
	_           structs.HostLayout
	Addr        uint64 `c:"addr"`         // in: start of the user range
	Length      uint64 `c:"length"`       // in: bytes
	Iova        uint64 `c:"iova"`         // in: device address of addr
	AccessFlags uint32 `c:"access_flags"` // in: IB_ACCESS_*
	Handle      uint32 `c:"handle"`       // out
	Lkey        uint32 `c:"lkey"`         // out
	Rkey        uint32 `c:"rkey"`         // out
}

func (*GohfiRegMR) SizeBytes() int                    { return SizeofGohfiRegMR }
func (g *GohfiRegMR) MarshalBytes(dst []byte)         { marshal(dst, g) }
func (g *GohfiRegMR) UnmarshalBytes(src []byte) error { return unmarshal(src, g) }

// GohfiHandle is struct gohfi_handle: the argument of DEREG_MR, DESTROY_CQ
// and DESTROY_QP.
type GohfiHandle struct {
	_        structs.HostLayout
	Handle   uint32 `c:"handle"`
	Reserved uint32 `c:"reserved"`
}

func (*GohfiHandle) SizeBytes() int                    { return SizeofGohfiHandle }
func (g *GohfiHandle) MarshalBytes(dst []byte)         { marshal(dst, g) }
func (g *GohfiHandle) UnmarshalBytes(src []byte) error { return unmarshal(src, g) }

// GohfiAdviseMR is struct gohfi_advise_mr, the argument of ADVISE_MR
// (ibv_advise_mr with one scatter/gather element).
type GohfiAdviseMR struct {
	_        structs.HostLayout
	Advice   uint32 `c:"advice"` // GOHFI_ADVISE_MR_ADVICE_*
	Flags    uint32 `c:"flags"`  // GOHFI_ADVISE_MR_FLAG_*
	Lkey     uint32 `c:"lkey"`
	Reserved uint32 `c:"reserved"`
	Addr     uint64 `c:"addr"`
	Length   uint64 `c:"length"`
}

func (*GohfiAdviseMR) SizeBytes() int                    { return SizeofGohfiAdviseMR }
func (g *GohfiAdviseMR) MarshalBytes(dst []byte)         { marshal(dst, g) }
func (g *GohfiAdviseMR) UnmarshalBytes(src []byte) error { return unmarshal(src, g) }

// GohfiAllocMR is struct gohfi_alloc_mr, the argument of ALLOC_MR: a
// fast-registration MR with room for max_num_sg pages, bound later by
// GOHFI_WR_FAST_REG_MR work requests.
type GohfiAllocMR struct {
	_        structs.HostLayout
	MRType   uint32 `c:"mr_type"`    // in: GOHFI_MR_TYPE_MEM_REG
	MaxNumSg uint32 `c:"max_num_sg"` // in: page-list capacity
	Handle   uint32 `c:"handle"`     // out
	Lkey     uint32 `c:"lkey"`       // out: key with variant byte 0
	Rkey     uint32 `c:"rkey"`       // out
	Reserved uint32 `c:"reserved"`
}

func (*GohfiAllocMR) SizeBytes() int                    { return SizeofGohfiAllocMR }
func (g *GohfiAllocMR) MarshalBytes(dst []byte)         { marshal(dst, g) }
func (g *GohfiAllocMR) UnmarshalBytes(src []byte) error { return unmarshal(src, g) }

// GohfiCreateCQ is struct gohfi_create_cq, the argument of CREATE_CQ.
type GohfiCreateCQ struct {
	_          structs.HostLayout
	Cqe        uint32 `c:"cqe"`         // in: entries wanted; out: entries given
	Handle     uint32 `c:"handle"`      // out
	UserHandle uint64 `c:"user_handle"` // in: opaque cookie for the caller
}

func (*GohfiCreateCQ) SizeBytes() int                    { return SizeofGohfiCreateCQ }
func (g *GohfiCreateCQ) MarshalBytes(dst []byte)         { marshal(dst, g) }
func (g *GohfiCreateCQ) UnmarshalBytes(src []byte) error { return unmarshal(src, g) }

// GohfiCreateQP is struct gohfi_create_qp, the argument of CREATE_QP.
type GohfiCreateQP struct {
	_          structs.HostLayout
	QPType     uint32 `c:"qp_type"`      // GOHFI_QPT_*
	SendCQ     uint32 `c:"send_cq"`      // CQ handle
	RecvCQ     uint32 `c:"recv_cq"`      // CQ handle
	MaxSendWR  uint32 `c:"max_send_wr"`  //
	MaxRecvWR  uint32 `c:"max_recv_wr"`  //
	MaxSendSge uint32 `c:"max_send_sge"` //
	MaxRecvSge uint32 `c:"max_recv_sge"` //
	SqSigAll   uint32 `c:"sq_sig_all"`   // every send WR completes signaled
	Handle     uint32 `c:"handle"`       // out
	QPNum      uint32 `c:"qp_num"`       // out: number on the wire
}

func (*GohfiCreateQP) SizeBytes() int                    { return SizeofGohfiCreateQP }
func (g *GohfiCreateQP) MarshalBytes(dst []byte)         { marshal(dst, g) }
func (g *GohfiCreateQP) UnmarshalBytes(src []byte) error { return unmarshal(src, g) }

// GohfiModifyQP is struct gohfi_modify_qp, the argument of MODIFY_QP: the
// state transition and, for RTR, the remote end (RC/UC).
type GohfiModifyQP struct {
	_           structs.HostLayout
	Handle      uint32 `c:"handle"`
	QPState     uint32 `c:"qp_state"`     // GOHFI_QPS_*
	DestQPNum   uint32 `c:"dest_qp_num"`  // RTR: remote QP number
	DestPort    uint32 `c:"dest_port"`    // RTR: remote device on the fabric, 0 = this device
	SqPsn       uint32 `c:"sq_psn"`       // RTS
	RqPsn       uint32 `c:"rq_psn"`       // RTR
	AccessFlags uint32 `c:"access_flags"` // IB_ACCESS_REMOTE_* allowed on this QP
	Flags       uint32 `c:"flags"`        // GOHFI_MODIFY_QP_*: which optional fields are set
	// RTR with GOHFI_MODIFY_QP_NET: the transport attributes of a QP
	// connected to a peer (ib_qp_attr's timeout, retry_cnt, rnr_retry,
	// min_rnr_timer); without the flag the defaults.
	Timeout     uint8  `c:"timeout"`       // 0..31: 4.096 us << timeout
	RetryCnt    uint8  `c:"retry_cnt"`     // 0..7
	RnrRetry    uint8  `c:"rnr_retry"`     // 0..7 (7: without limit)
	MinRnrTimer uint8  `c:"min_rnr_timer"` // 0..31
	Reserved    uint32 `c:"reserved"`
}

func (*GohfiModifyQP) SizeBytes() int                    { return SizeofGohfiModifyQP }
func (g *GohfiModifyQP) MarshalBytes(dst []byte)         { marshal(dst, g) }
func (g *GohfiModifyQP) UnmarshalBytes(src []byte) error { return unmarshal(src, g) }

// GohfiSge is struct gohfi_sge, laid out as struct ibv_sge.
type GohfiSge struct {
	_      structs.HostLayout
	Addr   uint64 `c:"addr"`
	Length uint32 `c:"length"`
	Lkey   uint32 `c:"lkey"`
}

func (*GohfiSge) SizeBytes() int                    { return SizeofGohfiSge }
func (g *GohfiSge) MarshalBytes(dst []byte)         { marshal(dst, g) }
func (g *GohfiSge) UnmarshalBytes(src []byte) error { return unmarshal(src, g) }

// GohfiSendWR is struct gohfi_send_wr, one element of POST_SEND's wr_list.
// The unions of ibv_send_wr are flattened into separate fields.
type GohfiSendWR struct {
	_              structs.HostLayout
	WrID           uint64 `c:"wr_id"`
	Opcode         uint32 `c:"opcode"`          // GOHFI_WR_*
	SendFlags      uint32 `c:"send_flags"`      // GOHFI_SEND_*
	NumSge         uint32 `c:"num_sge"`         //
	InvalidateRkey uint32 `c:"invalidate_rkey"` // LOCAL_INV, SEND_WITH_INV, RDMA_READ_WITH_INV
	SgList         uint64 `c:"sg_list"`         // user pointer to gohfi_sge[num_sge]
	RemoteAddr     uint64 `c:"remote_addr"`     // RDMA: remote iova
	Rkey           uint32 `c:"rkey"`            // RDMA: remote key
	ImmData        uint32 `c:"imm_data"`        // *_WITH_IMM, network order
	// FAST_REG_MR: bind MR fr_mr_handle to a page list under key fr_key.
	FrIova        uint64 `c:"fr_iova"`
	FrLength      uint64 `c:"fr_length"`
	FrPageList    uint64 `c:"fr_page_list"`     // user pointer to __u64[fr_page_list_len] page addresses
	FrPageListLen uint32 `c:"fr_page_list_len"` //
	FrPageShift   uint32 `c:"fr_page_shift"`    // 12 for 4 KiB pages
	FrMRHandle    uint32 `c:"fr_mr_handle"`     // from ALLOC_MR
	FrKey         uint32 `c:"fr_key"`           // new key: MR index | variant byte
	FrAccess      uint32 `c:"fr_access"`        // IB_ACCESS_*
	// UD: destination.
	RemoteQPN  uint32 `c:"remote_qpn"`
	RemoteQkey uint32 `c:"remote_qkey"`
	RemotePort uint32 `c:"remote_port"`
	// ATOMIC_CMP_AND_SWP, ATOMIC_FETCH_AND_ADD (ibv_send_wr.wr.atomic): the
	// 8-byte target is remote_addr through rkey (above), the value it held
	// lands in the WR's one 8-byte SGE. Appended when the struct grew from
	// 104 to 120 bytes; POST_SEND refuses wqe_size 104 (EINVAL).
	CompareAdd uint64 `c:"compare_add"` // CMP_AND_SWP: compare; FETCH_AND_ADD: add
	Swap       uint64 `c:"swap"`        // CMP_AND_SWP: the value written when equal
}

func (*GohfiSendWR) SizeBytes() int                    { return SizeofGohfiSendWR }
func (g *GohfiSendWR) MarshalBytes(dst []byte)         { marshal(dst, g) }
func (g *GohfiSendWR) UnmarshalBytes(src []byte) error { return unmarshal(src, g) }

// GohfiRecvWR is struct gohfi_recv_wr, one element of POST_RECV's wr_list.
type GohfiRecvWR struct {
	_        structs.HostLayout
	WrID     uint64 `c:"wr_id"`
	NumSge   uint32 `c:"num_sge"`
	Reserved uint32 `c:"reserved"`
	SgList   uint64 `c:"sg_list"` // user pointer to gohfi_sge[num_sge]
}

func (*GohfiRecvWR) SizeBytes() int                    { return SizeofGohfiRecvWR }
func (g *GohfiRecvWR) MarshalBytes(dst []byte)         { marshal(dst, g) }
func (g *GohfiRecvWR) UnmarshalBytes(src []byte) error { return unmarshal(src, g) }

// GohfiPostSend is struct gohfi_post_send, the argument of POST_SEND.
type GohfiPostSend struct {
	_        structs.HostLayout
	QPHandle uint32 `c:"qp_handle"`
	WrCount  uint32 `c:"wr_count"`
	WrList   uint64 `c:"wr_list"`  // user pointer to gohfi_send_wr[wr_count]
	BadWr    uint32 `c:"bad_wr"`   // out: index of the first WR not posted (wr_count if all were)
	WqeSize  uint32 `c:"wqe_size"` // in: sizeof(struct gohfi_send_wr) as the caller knows it
}

func (*GohfiPostSend) SizeBytes() int                    { return SizeofGohfiPostSend }
func (g *GohfiPostSend) MarshalBytes(dst []byte)         { marshal(dst, g) }
func (g *GohfiPostSend) UnmarshalBytes(src []byte) error { return unmarshal(src, g) }

// GohfiPostRecv is struct gohfi_post_recv, the argument of POST_RECV; the
// same shape as gohfi_post_send over gohfi_recv_wr.
type GohfiPostRecv struct {
	_        structs.HostLayout
	QPHandle uint32 `c:"qp_handle"`
	WrCount  uint32 `c:"wr_count"`
	WrList   uint64 `c:"wr_list"` // user pointer to gohfi_recv_wr[wr_count]
	BadWr    uint32 `c:"bad_wr"`
	WqeSize  uint32 `c:"wqe_size"`
}

func (*GohfiPostRecv) SizeBytes() int                    { return SizeofGohfiPostRecv }
func (g *GohfiPostRecv) MarshalBytes(dst []byte)         { marshal(dst, g) }
func (g *GohfiPostRecv) UnmarshalBytes(src []byte) error { return unmarshal(src, g) }

// GohfiWC is struct gohfi_wc, one work completion (cf. struct ib_uverbs_wc).
type GohfiWC struct {
	_               structs.HostLayout
	WrID            uint64 `c:"wr_id"`
	Status          uint32 `c:"status"` // GOHFI_WC_SUCCESS or an error status
	Opcode          uint32 `c:"opcode"` // GOHFI_WC_*
	VendorErr       uint32 `c:"vendor_err"`
	ByteLen         uint32 `c:"byte_len"`
	InvalidatedRkey uint32 `c:"invalidated_rkey"` // with GOHFI_WC_WITH_INVALIDATE
	ImmData         uint32 `c:"imm_data"`         // with GOHFI_WC_WITH_IMM
	QPNum           uint32 `c:"qp_num"`
	SrcQP           uint32 `c:"src_qp"`
	WcFlags         uint32 `c:"wc_flags"` // GOHFI_WC_GRH...
	Reserved        uint32 `c:"reserved"`
}

func (*GohfiWC) SizeBytes() int                    { return SizeofGohfiWC }
func (g *GohfiWC) MarshalBytes(dst []byte)         { marshal(dst, g) }
func (g *GohfiWC) UnmarshalBytes(src []byte) error { return unmarshal(src, g) }

// GohfiPollCQ is struct gohfi_poll_cq, the argument of POLL_CQ.
type GohfiPollCQ struct {
	_        structs.HostLayout
	CQHandle uint32 `c:"cq_handle"`
	Ne       uint32 `c:"ne"`      // in: room in wc_list; out: completions written
	WcList   uint64 `c:"wc_list"` // user pointer to gohfi_wc[ne]
	WcSize   uint32 `c:"wc_size"` // in: sizeof(struct gohfi_wc) as the caller knows it
	Reserved uint32 `c:"reserved"`
}

func (*GohfiPollCQ) SizeBytes() int                    { return SizeofGohfiPollCQ }
func (g *GohfiPollCQ) MarshalBytes(dst []byte)         { marshal(dst, g) }
func (g *GohfiPollCQ) UnmarshalBytes(src []byte) error { return unmarshal(src, g) }

// GohfiMRStats is struct gohfi_mr_stats, the argument of MR_STATS: the ODP
// counters of one MR (as rdma-core's per-MR counters) and its pinned pages.
type GohfiMRStats struct {
	_                        structs.HostLayout
	Handle                   uint32 `c:"handle"` // in
	Reserved                 uint32 `c:"reserved"`
	PageFaults               uint64 `c:"page_faults"`                // device faults raised
	PageFaultsHandled        uint64 `c:"page_faults_handled"`        // faults resolved and resumed
	PageInvalidations        uint64 `c:"page_invalidations"`         // invalidation callbacks
	PageInvalidationsHandled uint64 `c:"page_invalidations_handled"` // completed (zap + flush + unmap)
	PagePrefetch             uint64 `c:"page_prefetch"`              // pages mapped by ADVISE_MR
	PagesPinned              uint64 `c:"pages_pinned"`               // now
}

func (*GohfiMRStats) SizeBytes() int                    { return SizeofGohfiMRStats }
func (g *GohfiMRStats) MarshalBytes(dst []byte)         { marshal(dst, g) }
func (g *GohfiMRStats) UnmarshalBytes(src []byte) error { return unmarshal(src, g) }

// GohfiDriverStats is struct gohfi_driver_stats, written by DRIVER_STATS:
// the driver's counters of the whole device since the driver bound it,
// the same for every open file (not per file, not reset by open).
type GohfiDriverStats struct {
	_                structs.HostLayout
	TidsProgrammed   uint64    `c:"tids_programmed"`           // RcvArray entries written by TID_UPDATE
	TidsFreed        uint64    `c:"tids_freed"`                // entries cleared by TID_FREE
	TidInvalidations uint64    `c:"tid_invalidations"`         // TIDs marked invalid by a notifier
	TidInvalReads    uint64    `c:"tid_inval_reads"`           // TIDs reported by TID_INVAL_READ
	PagesPinned      uint64    `c:"pages_pinned"`              // pages pinned (cumulative)
	PagesUnpinned    uint64    `c:"pages_unpinned"`            // pages unpinned (cumulative)
	OdpPageFaults    uint64    `c:"odp_page_faults"`           // summed over MRs
	OdpInvalidations uint64    `c:"odp_invalidations"`         // summed over MRs
	TlbFlushes       uint64    `c:"tlb_flushes"`               // device translation-cache flushes
	FastRegs         uint64    `c:"fast_regs"`                 // FAST_REG_MR work requests completed
	LocalInvs        uint64    `c:"local_invs"`                // LOCAL_INV and READ_WITH_INV invalidations
	OdpFaultsHandled uint64    `c:"odp_page_faults_handled"`   // summed over MRs
	OdpInvalsHandled uint64    `c:"odp_invalidations_handled"` // summed over MRs
	OdpPagePrefetch  uint64    `c:"odp_page_prefetch"`         // summed over MRs
	Reserved         [2]uint64 `c:"reserved"`
}

func (*GohfiDriverStats) SizeBytes() int                    { return SizeofGohfiDriverStats }
func (g *GohfiDriverStats) MarshalBytes(dst []byte)         { marshal(dst, g) }
func (g *GohfiDriverStats) UnmarshalBytes(src []byte) error { return unmarshal(src, g) }
