package hfiuser

import (
	"runtime"

	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/uapi"
)

// The verbs wrappers (what rdma-core's ibv_* calls do for a provider):
// each lays its argument, and any list it points to, out in C layout in
// memory pinned for the call, and passes the address.

// QueryDevice reads the device's attributes (QUERY_DEVICE).
func QueryDevice(f *driver.File) (uapi.GohfiDeviceAttr, error) {
	var a uapi.GohfiDeviceAttr
	err := Ioctl(f, uapi.GOHFI_IOCTL_QUERY_DEVICE, &a)
	return a, err
}

// RegMR registers [addr, addr+length) at device address iova with
// IB_ACCESS_* rights (REG_MR) and returns the handle and keys in r.
func RegMR(f *driver.File, addr uintptr, length, iova uint64, access uint32) (uapi.GohfiRegMR, error) {
	r := uapi.GohfiRegMR{Addr: uint64(addr), Length: length, Iova: iova, AccessFlags: access}
	err := Ioctl(f, uapi.GOHFI_IOCTL_REG_MR, &r)
	return r, err
}

// DeregMR deregisters an MR (DEREG_MR).
func DeregMR(f *driver.File, handle uint32) error {
	return Ioctl(f, uapi.GOHFI_IOCTL_DEREG_MR, &uapi.GohfiHandle{Handle: handle})
}

// MRStats reads an MR's counters (MR_STATS).
func MRStats(f *driver.File, handle uint32) (uapi.GohfiMRStats, error) {
	s := uapi.GohfiMRStats{Handle: handle}
	err := Ioctl(f, uapi.GOHFI_IOCTL_MR_STATS, &s)
	return s, err
}

// CreateCQ creates a CQ of at least cqe entries (CREATE_CQ); it returns
// the handle and the entries the CQ holds.
func CreateCQ(f *driver.File, cqe uint32, userHandle uint64) (handle, size uint32, err error) {
	r := uapi.GohfiCreateCQ{Cqe: cqe, UserHandle: userHandle}
	err = Ioctl(f, uapi.GOHFI_IOCTL_CREATE_CQ, &r)
	return r.Handle, r.Cqe, err
}

// DestroyCQ destroys a CQ (DESTROY_CQ).
func DestroyCQ(f *driver.File, handle uint32) error {
	return Ioctl(f, uapi.GOHFI_IOCTL_DESTROY_CQ, &uapi.GohfiHandle{Handle: handle})
}

// CreateQP creates a QP (CREATE_QP); Handle and QPNum are filled in.
func CreateQP(f *driver.File, r uapi.GohfiCreateQP) (uapi.GohfiCreateQP, error) {
	err := Ioctl(f, uapi.GOHFI_IOCTL_CREATE_QP, &r)
	return r, err
}

// ModifyQP changes a QP's state (MODIFY_QP).
func ModifyQP(f *driver.File, r uapi.GohfiModifyQP) error {
	return Ioctl(f, uapi.GOHFI_IOCTL_MODIFY_QP, &r)
}

// DestroyQP destroys a QP (DESTROY_QP).
func DestroyQP(f *driver.File, handle uint32) error {
	return Ioctl(f, uapi.GOHFI_IOCTL_DESTROY_QP, &uapi.GohfiHandle{Handle: handle})
}

// SendWR is a send work request with its scatter/gather list: PostSend
// sets sg_list and num_sge from SGL when SGL is not nil, and otherwise
// passes the WR's own fields as they are (for tests of bad lists). Pages
// does the same for a FAST_REG_MR's fr_page_list and fr_page_list_len.
type SendWR struct {
	uapi.GohfiSendWR
	SGL   []uapi.GohfiSge
	Pages []uint64
}

// RecvWR is a receive work request with its scatter/gather list, as SendWR.
type RecvWR struct {
	uapi.GohfiRecvWR
	SGL []uapi.GohfiSge
}

// pinnedArray lays out an array of n elements of size bytes, the i-th
// written by put, and returns its pinned address (0 when n is 0).
func pinnedArray(pin *runtime.Pinner, n, size int, put func(i int, b []byte)) uint64 {
	if n == 0 {
		return 0
	}
	b := make([]byte, n*size)
	for i := range n {
		put(i, b[i*size:])
	}
	return pinnedAddr(pin, &b[0])
}

// sglAddr lays sgl out in C layout and returns its pinned address.
func sglAddr(pin *runtime.Pinner, sgl []uapi.GohfiSge) uint64 {
	return pinnedArray(pin, len(sgl), uapi.SizeofGohfiSge, func(i int, b []byte) { sgl[i].MarshalBytes(b) })
}

// PostSend posts wrs to QP qp (POST_SEND) and returns bad_wr: the index of
// the first WR not posted (len(wrs) when all were).
func PostSend(f *driver.File, qp uint32, wrs []SendWR) (int, error) {
	r := uapi.GohfiPostSend{QPHandle: qp, WrCount: uint32(len(wrs)), WqeSize: uapi.SizeofGohfiSendWR}
	err := postWRs(f, uapi.GOHFI_IOCTL_POST_SEND, &r, &r.WrList, wrs, uapi.SizeofGohfiSendWR)
	return int(r.BadWr), err
}

func (wr *SendWR) put(pin *runtime.Pinner, b []byte) {
	w := wr.GohfiSendWR
	if wr.SGL != nil {
		w.SgList, w.NumSge = sglAddr(pin, wr.SGL), uint32(len(wr.SGL))
	}
	if wr.Pages != nil {
		w.FrPageList, w.FrPageListLen = pageListAddr(pin, wr.Pages), uint32(len(wr.Pages))
	}
	w.MarshalBytes(b)
}

// PostRecv posts wrs to QP qp (POST_RECV) and returns bad_wr.
func PostRecv(f *driver.File, qp uint32, wrs []RecvWR) (int, error) {
	r := uapi.GohfiPostRecv{QPHandle: qp, WrCount: uint32(len(wrs)), WqeSize: uapi.SizeofGohfiRecvWR}
	err := postWRs(f, uapi.GOHFI_IOCTL_POST_RECV, &r, &r.WrList, wrs, uapi.SizeofGohfiRecvWR)
	return int(r.BadWr), err
}

func (wr *RecvWR) put(pin *runtime.Pinner, b []byte) {
	w := wr.GohfiRecvWR
	if wr.SGL != nil {
		w.SgList, w.NumSge = sglAddr(pin, wr.SGL), uint32(len(wr.SGL))
	}
	w.MarshalBytes(b)
}

// postWRs runs POST_SEND or POST_RECV (cmd with r) with wrs, each size
// bytes, laid out and pinned at *list (r's wr_list) for the call.
func postWRs[R any, PR interface {
	*R
	uapi.Marshallable
}, W any, PW interface {
	*W
	put(*runtime.Pinner, []byte)
}](f *driver.File, cmd uint32, r PR, list *uint64, wrs []W, size int) error {
	var pin runtime.Pinner
	defer pin.Unpin()
	*list = pinnedArray(&pin, len(wrs), size, func(i int, b []byte) { PW(&wrs[i]).put(&pin, b) })
	return Ioctl(f, cmd, r)
}

// PollCQ takes up to len(wc) completions of CQ cq (POLL_CQ) into wc and
// returns how many. It never blocks.
func PollCQ(f *driver.File, cq uint32, wc []uapi.GohfiWC) (int, error) {
	var pin runtime.Pinner
	defer pin.Unpin()
	r := uapi.GohfiPollCQ{CQHandle: cq, Ne: uint32(len(wc)), WcSize: uapi.SizeofGohfiWC}
	if len(wc) > 0 {
		// struct gohfi_wc's layout is the Go struct's (uapi's parity
		// test): the driver writes the caller's slice itself.
		r.WcList = pinnedAddr(&pin, &wc[0])
	}
	err := Ioctl(f, uapi.GOHFI_IOCTL_POLL_CQ, &r)
	if err != nil {
		return 0, err
	}
	return min(int(r.Ne), len(wc)), nil
}
