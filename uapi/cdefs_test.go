package uapi

// C descriptions of the ABI, written for this test from the kernel headers
// named in the Go comments. parity_test.go compiles them with gcc and
// compares every size, offset and constant with the Go side.

// cPreludeOwn stands in for <linux/types.h> and <linux/ioctl.h> when the
// test does not use the system headers.
const cPreludeOwn = `
#include <stddef.h>
#include <stdint.h>
typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef uint64_t __u64;
#define __aligned_u64 __u64 __attribute__((aligned(8)))

#define _IOC_NRBITS 8
#define _IOC_TYPEBITS 8
#define _IOC_SIZEBITS 14
#define _IOC_DIRBITS 2
#define _IOC_NRMASK ((1 << _IOC_NRBITS) - 1)
#define _IOC_TYPEMASK ((1 << _IOC_TYPEBITS) - 1)
#define _IOC_SIZEMASK ((1 << _IOC_SIZEBITS) - 1)
#define _IOC_DIRMASK ((1 << _IOC_DIRBITS) - 1)
#define _IOC_NRSHIFT 0
#define _IOC_TYPESHIFT (_IOC_NRSHIFT + _IOC_NRBITS)
#define _IOC_SIZESHIFT (_IOC_TYPESHIFT + _IOC_TYPEBITS)
#define _IOC_DIRSHIFT (_IOC_SIZESHIFT + _IOC_SIZEBITS)
#define _IOC_NONE 0U
#define _IOC_WRITE 1U
#define _IOC_READ 2U
#define _IOC(dir, type, nr, size) \
	(((dir) << _IOC_DIRSHIFT) | ((type) << _IOC_TYPESHIFT) | \
	 ((nr) << _IOC_NRSHIFT) | ((size) << _IOC_SIZESHIFT))
#define _IO(type, nr) _IOC(_IOC_NONE, (type), (nr), 0)
#define _IOR(type, nr, t) _IOC(_IOC_READ, (type), (nr), sizeof(t))
#define _IOW(type, nr, t) _IOC(_IOC_WRITE, (type), (nr), sizeof(t))
#define _IOWR(type, nr, t) _IOC(_IOC_READ | _IOC_WRITE, (type), (nr), sizeof(t))
`

// cPreludeSystem uses the installed kernel headers (Debian: linux-libc-dev).
const cPreludeSystem = `
#include <stddef.h>
#include <stdint.h>
#include <linux/types.h>
#include <linux/ioctl.h>
#include <rdma/rdma_user_ioctl.h>
#include <rdma/hfi/hfi1_user.h>
#include <rdma/hfi/hfi1_ioctl.h>
#include <rdma/ib_user_verbs.h>
#include <rdma/ib_user_ioctl_verbs.h>
`

// cHfi1UAPI mirrors include/uapi/rdma/hfi/hfi1_user.h, hfi1_ioctl.h and the
// hfi1 part of rdma_user_ioctl.h (ABI version 6.3).
const cHfi1UAPI = `
#define RDMA_IOCTL_MAGIC 0x1b
#define IB_IOCTL_MAGIC RDMA_IOCTL_MAGIC

#define HFI1_USER_SWMAJOR 6
#define HFI1_USER_SWMINOR 3
#define HFI1_SWMAJOR_SHIFT 16

#define HFI1_CAP_DMA_RTAIL (1UL << 0)
#define HFI1_CAP_SDMA (1UL << 1)
#define HFI1_CAP_SDMA_AHG (1UL << 2)
#define HFI1_CAP_EXTENDED_PSN (1UL << 3)
#define HFI1_CAP_HDRSUPP (1UL << 4)
#define HFI1_CAP_TID_RDMA (1UL << 5)
#define HFI1_CAP_USE_SDMA_HEAD (1UL << 6)
#define HFI1_CAP_MULTI_PKT_EGR (1UL << 7)
#define HFI1_CAP_NODROP_RHQ_FULL (1UL << 8)
#define HFI1_CAP_NODROP_EGR_FULL (1UL << 9)
#define HFI1_CAP_TID_UNMAP (1UL << 10)
#define HFI1_CAP_PRINT_UNIMPL (1UL << 11)
#define HFI1_CAP_ALLOW_PERM_JKEY (1UL << 12)
#define HFI1_CAP_NO_INTEGRITY (1UL << 13)
#define HFI1_CAP_PKEY_CHECK (1UL << 14)
#define HFI1_CAP_STATIC_RATE_CTRL (1UL << 15)
#define HFI1_CAP_OPFN (1UL << 16)
#define HFI1_CAP_SDMA_HEAD_CHECK (1UL << 17)
#define HFI1_CAP_EARLY_CREDIT_RETURN (1UL << 18)
#define HFI1_CAP_AIP (1UL << 19)

#define HFI1_RCVHDR_ENTSIZE_2 (1UL << 0)
#define HFI1_RCVHDR_ENTSIZE_16 (1UL << 1)
#define HFI1_RCVDHR_ENTSIZE_32 (1UL << 2)

#define _HFI1_EVENT_FROZEN_BIT 0
#define _HFI1_EVENT_LINKDOWN_BIT 1
#define _HFI1_EVENT_LID_CHANGE_BIT 2
#define _HFI1_EVENT_LMC_CHANGE_BIT 3
#define _HFI1_EVENT_SL2VL_CHANGE_BIT 4
#define _HFI1_EVENT_TID_MMU_NOTIFY_BIT 5
#define _HFI1_MAX_EVENT_BIT _HFI1_EVENT_TID_MMU_NOTIFY_BIT
#define HFI1_EVENT_FROZEN (1UL << _HFI1_EVENT_FROZEN_BIT)
#define HFI1_EVENT_LINKDOWN (1UL << _HFI1_EVENT_LINKDOWN_BIT)
#define HFI1_EVENT_LID_CHANGE (1UL << _HFI1_EVENT_LID_CHANGE_BIT)
#define HFI1_EVENT_LMC_CHANGE (1UL << _HFI1_EVENT_LMC_CHANGE_BIT)
#define HFI1_EVENT_SL2VL_CHANGE (1UL << _HFI1_EVENT_SL2VL_CHANGE_BIT)
#define HFI1_EVENT_TID_MMU_NOTIFY (1UL << _HFI1_EVENT_TID_MMU_NOTIFY_BIT)

#define HFI1_STATUS_INITTED 0x1
#define HFI1_STATUS_CHIP_PRESENT 0x20
#define HFI1_STATUS_IB_READY 0x40
#define HFI1_STATUS_IB_CONF 0x80
#define HFI1_STATUS_HWERROR 0x200
#define HFI1_MAX_SHARED_CTXTS 8
#define HFI1_POLL_TYPE_ANYRCV 0x0
#define HFI1_POLL_TYPE_URGENT 0x1

struct hfi1_user_info {
	__u32 userversion;
	__u32 pad;
	__u16 subctxt_cnt;
	__u16 subctxt_id;
	__u8 uuid[16];
};

struct hfi1_ctxt_info {
	__aligned_u64 runtime_flags;
	__u32 rcvegr_size;
	__u16 num_active;
	__u16 unit;
	__u16 ctxt;
	__u16 subctxt;
	__u16 rcvtids;
	__u16 credits;
	__u16 numa_node;
	__u16 rec_cpu;
	__u16 send_ctxt;
	__u16 egrtids;
	__u16 rcvhdrq_cnt;
	__u16 rcvhdrq_entsize;
	__u16 sdma_ring_size;
};

struct hfi1_tid_info {
	__aligned_u64 vaddr;
	__aligned_u64 tidlist;
	__u32 tidcnt;
	__u32 length;
};

struct hfi1_base_info {
	__u32 hw_version;
	__u32 sw_version;
	__u16 jkey;
	__u16 padding1;
	__u32 bthqp;
	__aligned_u64 sc_credits_addr;
	__aligned_u64 pio_bufbase_sop;
	__aligned_u64 pio_bufbase;
	__aligned_u64 rcvhdr_bufbase;
	__aligned_u64 rcvegr_bufbase;
	__aligned_u64 sdma_comp_bufbase;
	__aligned_u64 user_regbase;
	__aligned_u64 events_bufbase;
	__aligned_u64 status_bufbase;
	__aligned_u64 rcvhdrtail_base;
	__aligned_u64 subctxt_uregbase;
	__aligned_u64 subctxt_rcvegrbuf;
	__aligned_u64 subctxt_rcvhdrbuf;
};

#define HFI1_IOCTL_ASSIGN_CTXT _IOWR(RDMA_IOCTL_MAGIC, 0xE1, struct hfi1_user_info)
#define HFI1_IOCTL_CTXT_INFO _IOW(RDMA_IOCTL_MAGIC, 0xE2, struct hfi1_ctxt_info)
#define HFI1_IOCTL_USER_INFO _IOW(RDMA_IOCTL_MAGIC, 0xE3, struct hfi1_base_info)
#define HFI1_IOCTL_TID_UPDATE _IOWR(RDMA_IOCTL_MAGIC, 0xE4, struct hfi1_tid_info)
#define HFI1_IOCTL_TID_FREE _IOWR(RDMA_IOCTL_MAGIC, 0xE5, struct hfi1_tid_info)
#define HFI1_IOCTL_CREDIT_UPD _IO(RDMA_IOCTL_MAGIC, 0xE6)
#define HFI1_IOCTL_RECV_CTRL _IOW(RDMA_IOCTL_MAGIC, 0xE8, int)
#define HFI1_IOCTL_POLL_TYPE _IOW(RDMA_IOCTL_MAGIC, 0xE9, int)
#define HFI1_IOCTL_ACK_EVENT _IOW(RDMA_IOCTL_MAGIC, 0xEA, unsigned long)
#define HFI1_IOCTL_SET_PKEY _IOW(RDMA_IOCTL_MAGIC, 0xEB, __u16)
#define HFI1_IOCTL_CTXT_RESET _IO(RDMA_IOCTL_MAGIC, 0xEC)
#define HFI1_IOCTL_TID_INVAL_READ _IOWR(RDMA_IOCTL_MAGIC, 0xED, struct hfi1_tid_info)
#define HFI1_IOCTL_GET_VERS _IOR(RDMA_IOCTL_MAGIC, 0xEE, int)
`

// cHfi1Private mirrors the driver-internal definitions the Go package also
// carries: drivers/infiniband/hw/hfi1/{common.h,hfi.h,user_exp_rcv.h}. They
// are in no installed header. (The RcvArray entry, which only the driver and
// the device read, is package chip's, checked by its own parity test.)
const cHfi1Private = `
#define HFI1_CMD_BASE 0xE0
#define HFI1_USER_SWVERSION ((HFI1_USER_SWMAJOR << HFI1_SWMAJOR_SHIFT) | HFI1_USER_SWMINOR)

#define HFI1_RCVCTRL_TAILUPD_ENB 0x01
#define HFI1_RCVCTRL_TAILUPD_DIS 0x02
#define HFI1_RCVCTRL_CTXT_ENB 0x04
#define HFI1_RCVCTRL_CTXT_DIS 0x08
#define HFI1_RCVCTRL_INTRAVAIL_ENB 0x10
#define HFI1_RCVCTRL_INTRAVAIL_DIS 0x20
#define HFI1_RCVCTRL_PKEY_ENB 0x40
#define HFI1_RCVCTRL_PKEY_DIS 0x80
#define HFI1_RCVCTRL_TIDFLOW_ENB 0x0400
#define HFI1_RCVCTRL_TIDFLOW_DIS 0x0800
#define HFI1_RCVCTRL_ONE_PKT_EGR_ENB 0x1000
#define HFI1_RCVCTRL_ONE_PKT_EGR_DIS 0x2000
#define HFI1_RCVCTRL_NO_RHQ_DROP_ENB 0x4000
#define HFI1_RCVCTRL_NO_RHQ_DROP_DIS 0x8000
#define HFI1_RCVCTRL_NO_EGR_DROP_ENB 0x10000
#define HFI1_RCVCTRL_NO_EGR_DROP_DIS 0x20000
#define HFI1_RCVCTRL_URGENT_ENB 0x40000
#define HFI1_RCVCTRL_URGENT_DIS 0x80000

#define EXP_TID_TIDLEN_MASK 0x7FFULL
#define EXP_TID_TIDLEN_SHIFT 0
#define EXP_TID_TIDCTRL_MASK 0x3ULL
#define EXP_TID_TIDCTRL_SHIFT 20
#define EXP_TID_TIDIDX_MASK 0x3FFULL
#define EXP_TID_TIDIDX_SHIFT 22
#define EXP_TID_GET(tid, field) \
	(((tid) >> EXP_TID_TID##field##_SHIFT) & EXP_TID_TID##field##_MASK)
#define EXP_TID_SET(field, value) \
	(((value) & EXP_TID_TID##field##_MASK) << EXP_TID_TID##field##_SHIFT)

/* The TID of RcvArray entry rcventry covering npages (hfi1's create_tid). */
static __u32 create_tid(__u32 rcventry, __u32 npages)
{
	__u32 pair = rcventry & ~0x1;

	return EXP_TID_SET(IDX, pair >> 1) |
		EXP_TID_SET(CTRL, 1 << (rcventry - pair)) |
		EXP_TID_SET(LEN, npages);
}
`

// cGohfi is gohfi's own ABI in C, as a C user would include it.
const cGohfi = `
#define GOHFI_IOCTL_MAGIC 0x1b
#define GOHFI_CMD_FIRST 0x40
#define GOHFI_CMD_LAST 0x7f

#define IB_DEVICE_RC_RNR_NAK_GEN (1 << 12)
#define IB_DEVICE_N_NOTIFY_CQ (1 << 14)
#define IB_DEVICE_MEM_WINDOW (1 << 17)
#define IB_DEVICE_MEM_MGT_EXTENSIONS (1 << 21)

#define IBV_ODP_SUPPORT (1 << 0)
#define IBV_ODP_SUPPORT_IMPLICIT (1 << 1)
#define IBV_ODP_SUPPORT_SEND (1 << 0)
#define IBV_ODP_SUPPORT_RECV (1 << 1)
#define IBV_ODP_SUPPORT_WRITE (1 << 2)
#define IBV_ODP_SUPPORT_READ (1 << 3)
#define IBV_ODP_SUPPORT_ATOMIC (1 << 4)
#define IBV_ODP_SUPPORT_SRQ_RECV (1 << 5)

#define IB_ACCESS_LOCAL_WRITE (1 << 0)
#define IB_ACCESS_REMOTE_WRITE (1 << 1)
#define IB_ACCESS_REMOTE_READ (1 << 2)
#define IB_ACCESS_REMOTE_ATOMIC (1 << 3)
#define IB_ACCESS_MW_BIND (1 << 4)
#define IB_ACCESS_ZERO_BASED (1 << 5)
#define IB_ACCESS_ON_DEMAND (1 << 6)
#define IB_ACCESS_HUGETLB (1 << 7)

#define GOHFI_ADVISE_MR_ADVICE_PREFETCH 0
#define GOHFI_ADVISE_MR_ADVICE_PREFETCH_WRITE 1
#define GOHFI_ADVISE_MR_ADVICE_PREFETCH_NO_FAULT 2
#define GOHFI_ADVISE_MR_FLAG_FLUSH (1 << 0)

#define GOHFI_EVENTS_BITS_OFF 0
#define GOHFI_EVENTS_GEN_OPENED_OFF 8
#define GOHFI_EVENTS_GEN_DELIVERED_OFF 16
#define GOHFI_EVENTS_SDMA_DONE_OFF 24

#define GOHFI_MR_TYPE_MEM_REG 0

#define GOHFI_QPT_RC 2
#define GOHFI_QPT_UC 3
#define GOHFI_QPT_UD 4
#define GOHFI_QPS_RESET 0
#define GOHFI_QPS_INIT 1
#define GOHFI_QPS_RTR 2
#define GOHFI_QPS_RTS 3
#define GOHFI_QPS_SQD 4
#define GOHFI_QPS_SQE 5
#define GOHFI_QPS_ERR 6
#define GOHFI_MODIFY_QP_NET (1 << 0)

#define GOHFI_WR_RDMA_WRITE 0
#define GOHFI_WR_RDMA_WRITE_WITH_IMM 1
#define GOHFI_WR_SEND 2
#define GOHFI_WR_SEND_WITH_IMM 3
#define GOHFI_WR_RDMA_READ 4
#define GOHFI_WR_ATOMIC_CMP_AND_SWP 5
#define GOHFI_WR_ATOMIC_FETCH_AND_ADD 6
#define GOHFI_WR_LOCAL_INV 7
#define GOHFI_WR_BIND_MW 8
#define GOHFI_WR_SEND_WITH_INV 9
#define GOHFI_WR_RDMA_READ_WITH_INV 11
#define GOHFI_WR_FAST_REG_MR 0x20
#define GOHFI_WR_REG_MR GOHFI_WR_FAST_REG_MR

#define GOHFI_SEND_FENCE (1 << 0)
#define GOHFI_SEND_SIGNALED (1 << 1)
#define GOHFI_SEND_SOLICITED (1 << 2)
#define GOHFI_SEND_INLINE (1 << 3)

#define GOHFI_WC_SEND 0
#define GOHFI_WC_RDMA_WRITE 1
#define GOHFI_WC_RDMA_READ 2
#define GOHFI_WC_COMP_SWAP 3
#define GOHFI_WC_FETCH_ADD 4
#define GOHFI_WC_BIND_MW 5
#define GOHFI_WC_LOCAL_INV 6
#define GOHFI_WC_FAST_REG_MR 0x20
#define GOHFI_WC_REG_MR GOHFI_WC_FAST_REG_MR
#define GOHFI_WC_RECV (1 << 7)
#define GOHFI_WC_RECV_RDMA_WITH_IMM (GOHFI_WC_RECV + 1)

#define GOHFI_WC_SUCCESS 0
#define GOHFI_WC_LOC_LEN_ERR 1
#define GOHFI_WC_LOC_QP_OP_ERR 2
#define GOHFI_WC_LOC_PROT_ERR 4
#define GOHFI_WC_WR_FLUSH_ERR 5
#define GOHFI_WC_MW_BIND_ERR 6
#define GOHFI_WC_BAD_RESP_ERR 7
#define GOHFI_WC_LOC_ACCESS_ERR 8
#define GOHFI_WC_REM_INV_REQ_ERR 9
#define GOHFI_WC_REM_ACCESS_ERR 10
#define GOHFI_WC_REM_OP_ERR 11
#define GOHFI_WC_RETRY_EXC_ERR 12
#define GOHFI_WC_RNR_RETRY_EXC_ERR 13
#define GOHFI_WC_REM_INV_RD_REQ_ERR 15
#define GOHFI_WC_FATAL_ERR 19
#define GOHFI_WC_RESP_TIMEOUT_ERR 20
#define GOHFI_WC_GENERAL_ERR 21

#define GOHFI_WC_GRH (1 << 0)
#define GOHFI_WC_WITH_IMM (1 << 1)
#define GOHFI_WC_WITH_INVALIDATE (1 << 2)

struct gohfi_device_attr {
	__u32 vendor_id;
	__u32 vendor_part_id;
	__u32 hw_ver;
	__u32 num_contexts;
	__u32 rcvarray_entries;
	__u32 max_tid_pages;
	__u32 mtt_entries;
	__u32 max_mr;
	__u32 max_qp;
	__u32 max_qp_wr;
	__u32 max_sge;
	__u32 max_cq;
	__u32 max_cqe;
	__u32 max_fast_reg_page_list_len;
	__aligned_u64 max_mr_size;
	__aligned_u64 page_size_cap;
	__aligned_u64 device_cap_flags;
	__aligned_u64 odp_general_caps;
	__u32 odp_rc_caps;
	__u32 odp_uc_caps;
	__u32 odp_ud_caps;
	__u32 reserved;
};

struct gohfi_reg_mr {
	__aligned_u64 addr;
	__aligned_u64 length;
	__aligned_u64 iova;
	__u32 access_flags;
	__u32 handle;
	__u32 lkey;
	__u32 rkey;
};

struct gohfi_handle {
	__u32 handle;
	__u32 reserved;
};

struct gohfi_advise_mr {
	__u32 advice;
	__u32 flags;
	__u32 lkey;
	__u32 reserved;
	__aligned_u64 addr;
	__aligned_u64 length;
};

struct gohfi_alloc_mr {
	__u32 mr_type;
	__u32 max_num_sg;
	__u32 handle;
	__u32 lkey;
	__u32 rkey;
	__u32 reserved;
};

struct gohfi_create_cq {
	__u32 cqe;
	__u32 handle;
	__aligned_u64 user_handle;
};

struct gohfi_create_qp {
	__u32 qp_type;
	__u32 send_cq;
	__u32 recv_cq;
	__u32 max_send_wr;
	__u32 max_recv_wr;
	__u32 max_send_sge;
	__u32 max_recv_sge;
	__u32 sq_sig_all;
	__u32 handle;
	__u32 qp_num;
};

struct gohfi_modify_qp {
	__u32 handle;
	__u32 qp_state;
	__u32 dest_qp_num;
	__u32 dest_port;
	__u32 sq_psn;
	__u32 rq_psn;
	__u32 access_flags;
	__u32 flags;
	__u8 timeout;
	__u8 retry_cnt;
	__u8 rnr_retry;
	__u8 min_rnr_timer;
	__u32 reserved;
};

struct gohfi_sge {
	__aligned_u64 addr;
	__u32 length;
	__u32 lkey;
};

struct gohfi_send_wr {
	__aligned_u64 wr_id;
	__u32 opcode;
	__u32 send_flags;
	__u32 num_sge;
	__u32 invalidate_rkey;
	__aligned_u64 sg_list;
	__aligned_u64 remote_addr;
	__u32 rkey;
	__u32 imm_data;
	__aligned_u64 fr_iova;
	__aligned_u64 fr_length;
	__aligned_u64 fr_page_list;
	__u32 fr_page_list_len;
	__u32 fr_page_shift;
	__u32 fr_mr_handle;
	__u32 fr_key;
	__u32 fr_access;
	__u32 remote_qpn;
	__u32 remote_qkey;
	__u32 remote_port;
	__aligned_u64 compare_add;
	__aligned_u64 swap;
};

struct gohfi_recv_wr {
	__aligned_u64 wr_id;
	__u32 num_sge;
	__u32 reserved;
	__aligned_u64 sg_list;
};

struct gohfi_post_send {
	__u32 qp_handle;
	__u32 wr_count;
	__aligned_u64 wr_list;
	__u32 bad_wr;
	__u32 wqe_size;
};

struct gohfi_post_recv {
	__u32 qp_handle;
	__u32 wr_count;
	__aligned_u64 wr_list;
	__u32 bad_wr;
	__u32 wqe_size;
};

struct gohfi_wc {
	__aligned_u64 wr_id;
	__u32 status;
	__u32 opcode;
	__u32 vendor_err;
	__u32 byte_len;
	__u32 invalidated_rkey;
	__u32 imm_data;
	__u32 qp_num;
	__u32 src_qp;
	__u32 wc_flags;
	__u32 reserved;
};

struct gohfi_poll_cq {
	__u32 cq_handle;
	__u32 ne;
	__aligned_u64 wc_list;
	__u32 wc_size;
	__u32 reserved;
};

struct gohfi_mr_stats {
	__u32 handle;
	__u32 reserved;
	__aligned_u64 page_faults;
	__aligned_u64 page_faults_handled;
	__aligned_u64 page_invalidations;
	__aligned_u64 page_invalidations_handled;
	__aligned_u64 page_prefetch;
	__aligned_u64 pages_pinned;
};

struct gohfi_driver_stats {
	__aligned_u64 tids_programmed;
	__aligned_u64 tids_freed;
	__aligned_u64 tid_invalidations;
	__aligned_u64 tid_inval_reads;
	__aligned_u64 pages_pinned;
	__aligned_u64 pages_unpinned;
	__aligned_u64 odp_page_faults;
	__aligned_u64 odp_invalidations;
	__aligned_u64 tlb_flushes;
	__aligned_u64 fast_regs;
	__aligned_u64 local_invs;
	__aligned_u64 odp_page_faults_handled;
	__aligned_u64 odp_invalidations_handled;
	__aligned_u64 odp_page_prefetch;
	__aligned_u64 reserved[2];
};

#define GOHFI_IOCTL_QUERY_DEVICE _IOR(GOHFI_IOCTL_MAGIC, 0x40, struct gohfi_device_attr)
#define GOHFI_IOCTL_REG_MR _IOWR(GOHFI_IOCTL_MAGIC, 0x41, struct gohfi_reg_mr)
#define GOHFI_IOCTL_DEREG_MR _IOW(GOHFI_IOCTL_MAGIC, 0x42, struct gohfi_handle)
#define GOHFI_IOCTL_ADVISE_MR _IOW(GOHFI_IOCTL_MAGIC, 0x43, struct gohfi_advise_mr)
#define GOHFI_IOCTL_ALLOC_MR _IOWR(GOHFI_IOCTL_MAGIC, 0x44, struct gohfi_alloc_mr)
#define GOHFI_IOCTL_CREATE_CQ _IOWR(GOHFI_IOCTL_MAGIC, 0x45, struct gohfi_create_cq)
#define GOHFI_IOCTL_DESTROY_CQ _IOW(GOHFI_IOCTL_MAGIC, 0x46, struct gohfi_handle)
#define GOHFI_IOCTL_CREATE_QP _IOWR(GOHFI_IOCTL_MAGIC, 0x47, struct gohfi_create_qp)
#define GOHFI_IOCTL_MODIFY_QP _IOW(GOHFI_IOCTL_MAGIC, 0x48, struct gohfi_modify_qp)
#define GOHFI_IOCTL_DESTROY_QP _IOW(GOHFI_IOCTL_MAGIC, 0x49, struct gohfi_handle)
#define GOHFI_IOCTL_POST_SEND _IOWR(GOHFI_IOCTL_MAGIC, 0x4a, struct gohfi_post_send)
#define GOHFI_IOCTL_POST_RECV _IOWR(GOHFI_IOCTL_MAGIC, 0x4b, struct gohfi_post_recv)
#define GOHFI_IOCTL_POLL_CQ _IOWR(GOHFI_IOCTL_MAGIC, 0x4c, struct gohfi_poll_cq)
#define GOHFI_IOCTL_MR_STATS _IOWR(GOHFI_IOCTL_MAGIC, 0x4d, struct gohfi_mr_stats)
#define GOHFI_IOCTL_DRIVER_STATS _IOR(GOHFI_IOCTL_MAGIC, 0x4e, struct gohfi_driver_stats)
/* Receive/send path commands (uapi/gohfi_exprcv.go). */
#define GOHFI_SEND_EAGER 1
#define GOHFI_SEND_EXPECTED 2
#define GOHFI_SEND_FLAG_URGENT (1 << 0)
#define GOHFI_SEND_FLAG_WAIT (1 << 1)
#define GOHFI_SEND_FLAG_SDMA (1 << 2)

struct gohfi_send {
	__u8 opcode;
	__u8 flags;
	__u16 dst_ctxt;
	__u32 length;
	__aligned_u64 vaddr;
	__u32 tid;
	__u32 tid_offset;
	__aligned_u64 tag;
	__aligned_u64 reserved;
};

/* The receive header queue entry, read by user space from the mapped queue. */
#define GOHFI_RHF_EAGER 1
#define GOHFI_RHF_EXPECTED 2
#define GOHFI_RHF_ERROR 3
#define GOHFI_RHF_ERR_TID (1 << 0)
#define GOHFI_RHF_ERR_LENGTH (1 << 1)
#define GOHFI_RHF_ERR_DMA (1 << 2)
#define GOHFI_RHF_ERR_EAGER (1 << 3)

struct gohfi_rhq_entry {
	__u8 type;
	__u8 err;
	__u16 src_ctxt;
	__u32 length;
	__u32 eager_idx;
	__u32 tid;
	__u32 tid_offset;
	__u32 seq;
	__aligned_u64 tag;
};

#define GOHFI_IOCTL_RCVHDR_HEAD _IOW(GOHFI_IOCTL_MAGIC, 0x50, __u64)
#define GOHFI_IOCTL_SEND _IOWR(GOHFI_IOCTL_MAGIC, 0x51, struct gohfi_send)
`
