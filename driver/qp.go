package driver

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/vfio"
	"golang.org/x/sys/unix"
)

// QP is a reliable-connected queue pair (ib_qp): a send and a receive
// queue of WQEs in driver-owned host memory that the device reads, and the
// per-QP CSR block that configures it.
type QP struct {
	pd             *PD
	handle         uint32
	idx            int
	sendCQ, recvCQ *CQ
	sigAll         bool
	maxSendSge     int
	maxRecvSge     int
	sq, rq         *ringMem
	sqN, rqN       int
	sqHeadMem      *ringMem // the word the device writes SQHead to (QPSQHeadAddr), and the doorbell record
	dbRec          []byte   // the doorbell record (chip.QPDBRecAddr) in sqHeadMem; nil: register doorbells only
	dbHook         func()   // test hook: runs between a record store and the notify-flag load

	mu             sync.Mutex
	state          uint32 // last state the driver set (the device may since have moved to ERR)
	sqTail, sqHead int    // producer index and last consumer index read from QPSQHead
	rqTail, rqHead int
	psn            uint64      // QPPSN as written
	frPend         []frPending // local operations posted, not yet known consumed (fastreg.go)
	sqHeadTag      uint64      // QPSQHeadAddr's tag, changed at every RESET
}

// QPInitAttr are CREATE_QP's arguments (ib_qp_init_attr).
type QPInitAttr struct {
	Type                   uint32 // GOHFI_QPT_RC
	SendCQ, RecvCQ         *CQ
	MaxSendWR, MaxRecvWR   int
	MaxSendSge, MaxRecvSge int
	SqSigAll               bool
}

// QPAttr are MODIFY_QP's arguments (ib_qp_attr): the new state and, for
// RTR, the remote end and PSNs; AccessFlags are the IB_ACCESS_REMOTE_*
// rights the responder grants (taken at INIT and RTR).
type QPAttr struct {
	State       uint32
	DestQPNum   uint32
	DestPort    uint32 // 0: this device; else a peer table entry (fabric.go)
	SqPsn       uint32
	RqPsn       uint32
	AccessFlags uint32
	// Net are the transport attributes at RTR of a QP whose DestPort is
	// a peer (nil: DefaultNetAttr).
	Net *NetAttr
}

// SGE is one scatter/gather element of a work request (ib_sge).
type SGE = uapi.GohfiSge

// SendWR is one send work request (ib_send_wr, RC subset).
type SendWR struct {
	WrID       uint64
	Opcode     uint32 // GOHFI_WR_*
	SendFlags  uint32 // GOHFI_SEND_*
	SGL        []SGE
	RemoteAddr uint64
	Rkey       uint32
	ImmData    uint32 // network order, as the caller gives it
	CompareAdd uint64 // ATOMIC_CMP_AND_SWP: compare; ATOMIC_FETCH_AND_ADD: add
	Swap       uint64 // ATOMIC_CMP_AND_SWP: the value written when equal

	InvalidateRkey uint32 // LOCAL_INV, SEND_WITH_INV, RDMA_READ_WITH_INV
	Reg            *RegWR // FAST_REG_MR (GOHFI_WR_REG_MR)
}

// RecvWR is one receive work request (ib_recv_wr).
type RecvWR struct {
	WrID uint64
	SGL  []SGE
}

// Handle is the QP's handle, Num its number on the wire.
func (qp *QP) Handle() uint32 { return qp.handle }
func (qp *QP) Num() uint32    { return chip.QPNBase + uint32(qp.idx) }

func nextPow2(n int) int {
	p := 1
	for p < n {
		p *= 2
	}
	return p
}

// CreateQP creates a QP in RESET (ib_create_qp). RC only: UC and UD are
// EOPNOTSUPP, other types EINVAL; work requests 1..max_qp_wr and SGEs
// 0..max_sge per queue, else EINVAL; ENOSPC when every QP of the device is
// taken. The CQs must be the PD's own.
func (pd *PD) CreateQP(a QPInitAttr) (*QP, error) {
	v, d := pd.v, pd.d
	switch {
	case a.Type == uapi.GOHFI_QPT_UC || a.Type == uapi.GOHFI_QPT_UD:
		return nil, errnoErr(fmt.Sprintf("CREATE_QP: type %d is not offered yet (RC only)", a.Type), unix.EOPNOTSUPP)
	case a.Type != uapi.GOHFI_QPT_RC:
		return nil, errnoErr(fmt.Sprintf("CREATE_QP: type %d", a.Type), unix.EINVAL)
	case a.SendCQ == nil || a.RecvCQ == nil || a.SendCQ.pd != pd || a.RecvCQ.pd != pd:
		return nil, errnoErr("CREATE_QP: CQs of another file", unix.EINVAL)
	case a.MaxSendWR < 1 || a.MaxSendWR > v.maxQPWR() || a.MaxRecvWR < 1 || a.MaxRecvWR > v.maxQPWR():
		return nil, errnoErr(fmt.Sprintf("CREATE_QP: %d send and %d receive WRs, want 1..%d", a.MaxSendWR, a.MaxRecvWR, v.maxQPWR()), unix.EINVAL)
	case a.MaxSendSge < 0 || a.MaxSendSge > v.attr.MaxSGE || a.MaxRecvSge < 0 || a.MaxRecvSge > v.attr.MaxSGE:
		return nil, errnoErr(fmt.Sprintf("CREATE_QP: %d send and %d receive SGEs, want at most %d", a.MaxSendSge, a.MaxRecvSge, v.attr.MaxSGE), unix.EINVAL)
	}
	qp := &QP{pd: pd, idx: -1, sendCQ: a.SendCQ, recvCQ: a.RecvCQ, sigAll: a.SqSigAll,
		maxSendSge: a.MaxSendSge, maxRecvSge: a.MaxRecvSge,
		sqN: nextPow2(a.MaxSendWR + 1), rqN: nextPow2(a.MaxRecvWR + 1)}
	if qp.idx = takeSlot(&v.mu, v.qps, qp); qp.idx < 0 {
		return nil, errnoErr(fmt.Sprintf("CREATE_QP: all %d QPs in use", len(v.qps)), unix.ENOSPC)
	}
	var err error
	for _, r := range []struct {
		dst   **ringMem
		name  string
		size  int
		flags uint32
	}{{&qp.sq, "sq", qp.sqN * chip.SendWQESize, vfio.DMARead}, {&qp.rq, "rq", qp.rqN * chip.RecvWQESize, vfio.DMARead},
		{&qp.sqHeadMem, "sqhead", qpDBRecOff + chip.DBRecSize, vfio.DMARead | vfio.DMAWrite}} {
		if *r.dst, err = newRingMem(fmt.Sprintf("qp%d%s", qp.idx, r.name), r.size); err != nil {
			return nil, errors.Join(fmt.Errorf("gohfi: CREATE_QP: %w", errors.Join(err, unix.ENOMEM)), qp.release())
		}
		if err = d.dmaMap(*r.dst, r.flags); err != nil {
			return nil, errors.Join(fmt.Errorf("gohfi: CREATE_QP: %w", err), qp.release())
		}
	}
	for _, r := range []struct{ reg, val uint64 }{
		{chip.QPControl, uapi.GOHFI_QPS_RESET | uapi.GOHFI_QPT_RC<<chip.QPTypeShift},
		{chip.QPSQBase, qp.sq.iova},
		{chip.QPSQEntries, uint64(qp.sqN)},
		{chip.QPRQBase, qp.rq.iova},
		{chip.QPRQEntries, uint64(qp.rqN)},
		{chip.QPCQs, uint64(a.SendCQ.idx) | uint64(a.RecvCQ.idx)<<32},
		{chip.QPPD, uint64(pd.num)},
		{chip.QPDest, 0},
		{chip.QPAccess, 0},
		{chip.QPPSN, 0},
		{chip.QPSQHeadAddr, qp.sqHeadMem.iova},
	} {
		if err = d.writeCSR(chip.QPReg(qp.idx, r.reg), r.val); err != nil {
			return nil, errors.Join(fmt.Errorf("gohfi: CREATE_QP: %w", err), qp.release())
		}
	}
	if v.dbRec {
		qp.dbRec = qp.sqHeadMem.mem[qpDBRecOff : qpDBRecOff+chip.DBRecSize]
		qp.resetDBRec()
		if err = d.writeCSR(chip.QPDBReg(qp.idx, chip.QPDBRecAddr), qp.sqHeadMem.iova+qpDBRecOff); err != nil {
			return nil, errors.Join(fmt.Errorf("gohfi: CREATE_QP: %w", err), qp.release())
		}
	}
	pd.mu.Lock()
	if pd.closed != 0 || pd.cqs[a.SendCQ.handle] != a.SendCQ || pd.cqs[a.RecvCQ.handle] != a.RecvCQ {
		why := pd.closed
		pd.mu.Unlock()
		if why == 0 {
			why = unix.EINVAL
		}
		return nil, errors.Join(errnoErr("CREATE_QP: CQ destroyed or file closed", why), qp.release())
	}
	qp.handle = v.newHandle()
	pd.qps[qp.handle] = qp
	a.SendCQ.qpRefs++
	a.RecvCQ.qpRefs++
	pd.mu.Unlock()
	return qp, nil
}

// qpTransitionOK is the state machine MODIFY_QP allows: RESET→INIT→RTR→RTS,
// any state to RESET, any state but RESET to ERR (as Linux's
// ib_modify_qp_is_ok and the device: a QP in RESET has nothing to flush).
func qpTransitionOK(from, to uint32) bool {
	switch to {
	case uapi.GOHFI_QPS_RESET:
		return true
	case uapi.GOHFI_QPS_ERR:
		return from != uapi.GOHFI_QPS_RESET
	case uapi.GOHFI_QPS_INIT:
		return from == uapi.GOHFI_QPS_RESET
	case uapi.GOHFI_QPS_RTR:
		return from == uapi.GOHFI_QPS_INIT
	case uapi.GOHFI_QPS_RTS:
		return from == uapi.GOHFI_QPS_RTR
	}
	return false
}

const (
	qpAccessKnown  = uapi.IB_ACCESS_LOCAL_WRITE | uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ | uapi.IB_ACCESS_REMOTE_ATOMIC
	qpAccessRemote = uapi.IB_ACCESS_REMOTE_WRITE | uapi.IB_ACCESS_REMOTE_READ | uapi.IB_ACCESS_REMOTE_ATOMIC
	psnMask        = 1<<24 - 1
)

// State reads the QP's state as the device holds it (QPStatus): the device
// moves a QP to ERR by itself.
func (qp *QP) State() (uint32, error) {
	st, err := qp.pd.d.readCSR(chip.QPReg(qp.idx, chip.QPStatus))
	return uint32(st & chip.QPStateMask), err
}

// Modify moves the QP to a.State (ib_modify_qp). The current state is the
// device's (QPStatus). EINVAL for a transition outside the state machine,
// access bits other than IB_ACCESS_*, PSNs wider than 24 bits, and at RTR
// a dest_qp_num that is no QP of this device (dest_port 0) or a dest_port
// that is no valid peer table entry of a device with a network port, or
// Net attributes out of range; EIO when the device refuses a transition
// the driver allowed.
func (qp *QP) Modify(a QPAttr) error {
	d := qp.pd.d
	qp.mu.Lock()
	defer qp.mu.Unlock()
	if a.State > uapi.GOHFI_QPS_ERR {
		return errnoErr(fmt.Sprintf("MODIFY_QP: state %d", a.State), unix.EINVAL)
	}
	if a.AccessFlags&^qpAccessKnown != 0 || a.SqPsn&^psnMask != 0 || a.RqPsn&^psnMask != 0 {
		return errnoErr(fmt.Sprintf("MODIFY_QP: access %#x, PSNs %#x/%#x", a.AccessFlags, a.SqPsn, a.RqPsn), unix.EINVAL)
	}
	cur, err := qp.State()
	if err != nil {
		return fmt.Errorf("gohfi: MODIFY_QP: %w", err)
	}
	if !qpTransitionOK(cur, a.State) {
		return errnoErr(fmt.Sprintf("MODIFY_QP: QP %d from state %d to %d", qp.Num(), cur, a.State), unix.EINVAL)
	}
	var regs []struct{ reg, val uint64 }
	reg := func(r, v uint64) { regs = append(regs, struct{ reg, val uint64 }{r, v}) }
	switch a.State {
	case uapi.GOHFI_QPS_INIT:
		reg(chip.QPAccess, uint64(a.AccessFlags&qpAccessRemote))
	case uapi.GOHFI_QPS_RTR:
		if a.DestPort != 0 {
			if err := qp.checkRemote(&a); err != nil {
				return err
			}
			v, err := netAttrValue(a.Net)
			if err != nil {
				return err
			}
			if err := d.writeCSR(chip.QPNetReg(qp.idx, chip.QPNetAttr), v); err != nil {
				return fmt.Errorf("gohfi: MODIFY_QP: %w", err)
			}
		} else if !qp.pd.v.qpExists(a.DestQPNum) {
			return errnoErr(fmt.Sprintf("MODIFY_QP: destination QP %d does not exist on this device", a.DestQPNum), unix.EINVAL)
		}
		qp.psn = qp.psn&psnMask | uint64(a.RqPsn)<<32
		reg(chip.QPDest, uint64(a.DestQPNum)|uint64(a.DestPort)<<32)
		reg(chip.QPAccess, uint64(a.AccessFlags&qpAccessRemote))
		reg(chip.QPPSN, qp.psn)
	case uapi.GOHFI_QPS_RTS:
		qp.psn = qp.psn&^psnMask | uint64(a.SqPsn)
		reg(chip.QPPSN, qp.psn)
	}
	reg(chip.QPControl, uint64(a.State)|uapi.GOHFI_QPT_RC<<chip.QPTypeShift)
	for _, r := range regs {
		if err := d.writeCSR(chip.QPReg(qp.idx, r.reg), r.val); err != nil {
			return fmt.Errorf("gohfi: MODIFY_QP: %w", err)
		}
	}
	got, err := qp.State()
	if err != nil {
		return fmt.Errorf("gohfi: MODIFY_QP: %w", err)
	}
	// The device may have moved the QP to ERR by itself right after.
	if got != a.State && got != uapi.GOHFI_QPS_ERR {
		return errnoErr(fmt.Sprintf("MODIFY_QP: device refused QP %d from %d to %d (status %d)", qp.Num(), cur, a.State, got), unix.EIO)
	}
	qp.state = a.State
	if a.State == uapi.GOHFI_QPS_RESET {
		qp.sqTail, qp.sqHead, qp.rqTail, qp.rqHead, qp.psn = 0, 0, 0, 0, 0
		qp.dropPendingLocked()
		// A head the engine was still writing carries the old tag.
		qp.sqHeadTag = (qp.sqHeadTag + 1) & chip.QPSQHeadTagMask
		store64(qp.sqHeadMem.mem, 0, qp.sqHeadTag<<chip.QPSQHeadTagShift)
		qp.resetDBRec()
		if err := d.writeCSR(chip.QPReg(qp.idx, chip.QPSQHeadAddr), qp.sqHeadMem.iova|qp.sqHeadTag); err != nil {
			return fmt.Errorf("gohfi: MODIFY_QP: %w", err)
		}
	}
	return nil
}

func (v *verbsDev) qpExists(qpn uint32) bool {
	if qpn < chip.QPNBase || qpn-chip.QPNBase >= uint32(len(v.qps)) {
		return false
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.qps[qpn-chip.QPNBase] != nil
}

// Destroy moves the QP to RESET and frees it (ib_destroy_qp).
func (qp *QP) Destroy() error {
	pd := qp.pd
	pd.mu.Lock()
	if pd.qps[qp.handle] != qp {
		pd.mu.Unlock()
		return errnoErr(fmt.Sprintf("DESTROY_QP: QP %d does not exist", qp.handle), unix.EINVAL)
	}
	delete(pd.qps, qp.handle)
	pd.mu.Unlock()
	return qp.destroy()
}

// destroy resets the QP in the device and frees it; it is out of the table.
func (qp *QP) destroy() error {
	d, pd := qp.pd.d, qp.pd
	var errs []error
	if !d.dead.Load() {
		errs = append(errs, d.writeCSR(chip.QPReg(qp.idx, chip.QPControl), uapi.GOHFI_QPS_RESET|uapi.GOHFI_QPT_RC<<chip.QPTypeShift))
		for _, r := range []uint64{chip.QPSQBase, chip.QPSQEntries, chip.QPRQBase, chip.QPRQEntries, chip.QPDest, chip.QPAccess, chip.QPSQHeadAddr} {
			errs = append(errs, d.writeCSR(chip.QPReg(qp.idx, r), 0))
		}
		if qp.dbRec != nil {
			errs = append(errs, d.writeCSR(chip.QPDBReg(qp.idx, chip.QPDBRecAddr), 0))
		}
	}
	qp.mu.Lock()
	qp.dropPendingLocked()
	qp.mu.Unlock()
	pd.mu.Lock()
	qp.sendCQ.qpRefs--
	qp.recvCQ.qpRefs--
	pd.mu.Unlock()
	errs = append(errs, qp.release())
	return errors.Join(errs...)
}

func (qp *QP) release() error {
	v, d := qp.pd.v, qp.pd.d
	var errs []error
	qp.dbRec = nil
	for _, r := range []**ringMem{&qp.sq, &qp.rq, &qp.sqHeadMem} {
		if *r == nil {
			continue
		}
		if !d.dead.Load() {
			errs = append(errs, d.dmaUnmap(*r))
		} else if (*r).iova != 0 {
			d.iova.release((*r).iova, uint64(len((*r).mem)))
		}
		(*r).free()
		*r = nil
	}
	if qp.idx >= 0 {
		v.mu.Lock()
		if v.qps[qp.idx] == qp {
			v.qps[qp.idx] = nil
		}
		v.mu.Unlock()
	}
	return errors.Join(errs...)
}

// sendOpcodeOK reports the work requests this driver posts: RC, atomics,
// fast registration where the device has it; no memory windows.
func (qp *QP) sendOpcodeOK(op uint32) bool {
	switch op {
	case uapi.GOHFI_WR_RDMA_WRITE, uapi.GOHFI_WR_RDMA_WRITE_WITH_IMM, uapi.GOHFI_WR_SEND,
		uapi.GOHFI_WR_SEND_WITH_IMM, uapi.GOHFI_WR_RDMA_READ,
		uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP, uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD:
		return true
	}
	return isFastRegOp(op) && qp.pd.v.maxFRPages > 0
}

func isAtomicWR(op uint32) bool {
	return op == uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP || op == uapi.GOHFI_WR_ATOMIC_FETCH_AND_ADD
}

const sendFlagsKnown = uapi.GOHFI_SEND_FENCE | uapi.GOHFI_SEND_SIGNALED | uapi.GOHFI_SEND_SOLICITED

// PostSend posts wrs to the send queue (ib_post_send) and rings the
// doorbell once; it returns how many were posted. Keys are not checked
// here: the device completes a bad one with an error status.
func (qp *QP) PostSend(wrs []SendWR) (int, error) {
	return qp.postSend(len(wrs), func(i int) (*SendWR, error) { return &wrs[i], nil })
}

// postSend posts count WRs that next returns one by one (the ioctl copies
// them from user space as it goes); it stops at the first WR that cannot
// be posted and returns its index with the reason.
func (qp *QP) postSend(count int, next func(i int) (*SendWR, error)) (int, error) {
	d := qp.pd.d
	if err := qp.pd.v.odp.fence(); err != nil {
		return 0, fmt.Errorf("gohfi: POST_SEND: %w", err)
	}
	qp.mu.Lock()
	defer qp.mu.Unlock()
	if qp.sq == nil {
		return 0, errnoErr("POST_SEND: QP destroyed", unix.EINVAL)
	}
	if qp.state != uapi.GOHFI_QPS_RTS && qp.state != uapi.GOHFI_QPS_ERR {
		return 0, errnoErr(fmt.Sprintf("POST_SEND: QP %d in state %d", qp.Num(), qp.state), unix.EINVAL)
	}
	posted := 0
	var perr error
	var w chip.SendWQE
	for ; posted < count; posted++ {
		wr, err := next(posted)
		if err != nil {
			perr = err
			break
		}
		if posted == 0 {
			d.trace(TracePostSend, qp.ctxt(), uint64(qp.idx), wr.WrID, uint64(count))
		}
		if err := qp.checkSendWR(wr); err != nil {
			perr = err
			break
		}
		if (qp.sqTail+1)%qp.sqN == qp.sqHead {
			if err := qp.reclaimLocked(); err != nil {
				perr = fmt.Errorf("gohfi: POST_SEND: %w", err)
				break
			}
			if (qp.sqTail+1)%qp.sqN == qp.sqHead {
				perr = errnoErr(fmt.Sprintf("POST_SEND: send queue of QP %d full (%d WRs)", qp.Num(), qp.sqN-1), unix.ENOMEM)
				break
			}
		}
		w = chip.SendWQE{WrID: wr.WrID, Opcode: uint8(wr.Opcode), Flags: uint8(wr.SendFlags),
			NumSGE: uint16(len(wr.SGL)), Imm: wr.ImmData, RemoteAddr: wr.RemoteAddr, Rkey: wr.Rkey,
			CompareAdd: wr.CompareAdd, Swap: wr.Swap}
		if qp.sigAll {
			w.Flags |= uapi.GOHFI_SEND_SIGNALED
		}
		for i, s := range wr.SGL {
			w.SGE[i] = chip.SGE{Addr: s.Addr, Length: s.Length, Lkey: s.Lkey}
		}
		if err := qp.localOpLocked(wr, &w); err != nil {
			perr = err
			break
		}
		switch {
		case wr.Opcode == uapi.GOHFI_WR_FAST_REG_MR:
			d.trace(TraceFastRegBind, qp.ctxt(), uint64(w.FrMPTIndex), uint64(w.FrPageListLen), uint64(w.FrKey))
		case invalidates(wr.Opcode):
			d.trace(TraceFastRegInvalidate, qp.ctxt(), 0, 0, uint64(w.Imm))
		}
		w.Marshal(qp.sq.mem[qp.sqTail*chip.SendWQESize:])
		qp.sqTail = (qp.sqTail + 1) % qp.sqN
	}
	if posted > 0 {
		if err := qp.ringLocked(chip.QPSQTail, qp.sqTail); err != nil {
			return 0, fmt.Errorf("gohfi: POST_SEND doorbell: %w", err)
		}
	}
	return posted, perr
}

func (qp *QP) checkSendWR(wr *SendWR) error {
	var total uint64
	for _, s := range wr.SGL {
		total += uint64(s.Length)
	}
	switch {
	case !qp.sendOpcodeOK(wr.Opcode):
		return errnoErr(fmt.Sprintf("POST_SEND: opcode %d", wr.Opcode), unix.EINVAL)
	case (wr.Opcode == uapi.GOHFI_WR_FAST_REG_MR || wr.Opcode == uapi.GOHFI_WR_LOCAL_INV) && len(wr.SGL) != 0:
		return errnoErr(fmt.Sprintf("POST_SEND: opcode %d takes no SGEs", wr.Opcode), unix.EINVAL)
	case wr.Opcode != uapi.GOHFI_WR_FAST_REG_MR && wr.Reg != nil:
		return errnoErr(fmt.Sprintf("POST_SEND: opcode %d with a REG_MR", wr.Opcode), unix.EINVAL)
	case wr.SendFlags&^sendFlagsKnown != 0:
		return errnoErr(fmt.Sprintf("POST_SEND: send flags %#x (inline data is not offered)", wr.SendFlags), unix.EINVAL)
	case len(wr.SGL) > qp.maxSendSge:
		return errnoErr(fmt.Sprintf("POST_SEND: %d SGEs, QP has %d", len(wr.SGL), qp.maxSendSge), unix.EINVAL)
	case total > qp.pd.v.attr.MaxMsgSize:
		return errnoErr(fmt.Sprintf("POST_SEND: %d bytes, at most %d", total, qp.pd.v.attr.MaxMsgSize), unix.EINVAL)
	case isAtomicWR(wr.Opcode) && (len(wr.SGL) != 1 || wr.SGL[0].Length != 8):
		// As mlx5: the original value lands in exactly one 8-byte SGE.
		return errnoErr(fmt.Sprintf("POST_SEND: atomic with %d SGEs of %d bytes, want one of 8", len(wr.SGL), total), unix.EINVAL)
	case wr.Opcode != uapi.GOHFI_WR_ATOMIC_CMP_AND_SWP && wr.Swap != 0,
		!isAtomicWR(wr.Opcode) && wr.CompareAdd != 0:
		return errnoErr(fmt.Sprintf("POST_SEND: opcode %d with atomic operands it does not use", wr.Opcode), unix.EINVAL)
	}
	return nil
}

// PostRecv posts wrs to the receive queue (ib_post_recv), doorbell once.
func (qp *QP) PostRecv(wrs []RecvWR) (int, error) {
	return qp.postRecv(len(wrs), func(i int) (*RecvWR, error) { return &wrs[i], nil })
}

func (qp *QP) postRecv(count int, next func(i int) (*RecvWR, error)) (int, error) {
	d := qp.pd.d
	if err := qp.pd.v.odp.fence(); err != nil {
		return 0, fmt.Errorf("gohfi: POST_RECV: %w", err)
	}
	qp.mu.Lock()
	defer qp.mu.Unlock()
	if qp.rq == nil {
		return 0, errnoErr("POST_RECV: QP destroyed", unix.EINVAL)
	}
	if qp.state == uapi.GOHFI_QPS_RESET {
		return 0, errnoErr(fmt.Sprintf("POST_RECV: QP %d in RESET", qp.Num()), unix.EINVAL)
	}
	posted := 0
	var perr error
	var w chip.RecvWQE
	for ; posted < count; posted++ {
		wr, err := next(posted)
		if err != nil {
			perr = err
			break
		}
		var total uint64
		for _, s := range wr.SGL {
			total += uint64(s.Length)
		}
		if len(wr.SGL) > qp.maxRecvSge {
			perr = errnoErr(fmt.Sprintf("POST_RECV: %d SGEs, QP has %d", len(wr.SGL), qp.maxRecvSge), unix.EINVAL)
			break
		}
		if total > 1<<32-1 {
			perr = errnoErr(fmt.Sprintf("POST_RECV: %d bytes", total), unix.EINVAL)
			break
		}
		if (qp.rqTail+1)%qp.rqN == qp.rqHead {
			h, err := d.readCSR(chip.QPReg(qp.idx, chip.QPRQHead))
			if err != nil {
				perr = fmt.Errorf("gohfi: POST_RECV: %w", err)
				break
			}
			qp.rqHead = int(h % uint64(qp.rqN))
			if (qp.rqTail+1)%qp.rqN == qp.rqHead {
				perr = errnoErr(fmt.Sprintf("POST_RECV: receive queue of QP %d full (%d WRs)", qp.Num(), qp.rqN-1), unix.ENOMEM)
				break
			}
		}
		w = chip.RecvWQE{WrID: wr.WrID, NumSGE: uint16(len(wr.SGL))}
		for i, s := range wr.SGL {
			w.SGE[i] = chip.SGE{Addr: s.Addr, Length: s.Length, Lkey: s.Lkey}
		}
		w.Marshal(qp.rq.mem[qp.rqTail*chip.RecvWQESize:])
		qp.rqTail = (qp.rqTail + 1) % qp.rqN
	}
	if posted > 0 {
		if err := qp.ringLocked(chip.QPRQTail, qp.rqTail); err != nil {
			return 0, fmt.Errorf("gohfi: POST_RECV doorbell: %w", err)
		}
	}
	return posted, perr
}

func (pd *PD) ioctlCreateQP(arg UserPtr) error {
	var r uapi.GohfiCreateQP
	if err := readArg(arg, &r, "CREATE_QP"); err != nil {
		return err
	}
	if r.SqSigAll > 1 {
		return errnoErr(fmt.Sprintf("CREATE_QP: sq_sig_all %d", r.SqSigAll), unix.EINVAL)
	}
	scq, err := lookup(pd, pd.cqs, r.SendCQ, "CREATE_QP send_cq")
	if err != nil {
		return err
	}
	rcq, err := lookup(pd, pd.cqs, r.RecvCQ, "CREATE_QP recv_cq")
	if err != nil {
		return err
	}
	qp, err := pd.CreateQP(QPInitAttr{Type: r.QPType, SendCQ: scq, RecvCQ: rcq,
		MaxSendWR: int(r.MaxSendWR), MaxRecvWR: int(r.MaxRecvWR),
		MaxSendSge: int(r.MaxSendSge), MaxRecvSge: int(r.MaxRecvSge), SqSigAll: r.SqSigAll != 0})
	if err != nil {
		return err
	}
	r.Handle, r.QPNum = qp.handle, qp.Num()
	if err := writeArg(arg, &r, "CREATE_QP"); err != nil {
		return errors.Join(err, qp.Destroy())
	}
	return nil
}

func (pd *PD) ioctlModifyQP(arg UserPtr) error {
	var r uapi.GohfiModifyQP
	if err := readArg(arg, &r, "MODIFY_QP"); err != nil {
		return err
	}
	if r.Reserved != 0 {
		return errnoErr("MODIFY_QP: reserved field set", unix.EINVAL)
	}
	a := QPAttr{State: r.QPState, DestQPNum: r.DestQPNum, DestPort: r.DestPort,
		SqPsn: r.SqPsn, RqPsn: r.RqPsn, AccessFlags: r.AccessFlags}
	net := NetAttr{Timeout: r.Timeout, RetryCnt: r.RetryCnt, RnrRetry: r.RnrRetry, MinRnrTimer: r.MinRnrTimer}
	switch {
	case r.Flags&^uapi.GOHFI_MODIFY_QP_NET != 0:
		return errnoErr(fmt.Sprintf("MODIFY_QP: flags %#x", r.Flags), unix.EINVAL)
	case r.Flags&uapi.GOHFI_MODIFY_QP_NET == 0:
		if net != (NetAttr{}) {
			return errnoErr("MODIFY_QP: transport attributes without GOHFI_MODIFY_QP_NET", unix.EINVAL)
		}
	case r.QPState != uapi.GOHFI_QPS_RTR:
		// As ib_modify_qp_is_ok: attributes the transition does not take.
		return errnoErr(fmt.Sprintf("MODIFY_QP: transport attributes at state %d (RTR only)", r.QPState), unix.EINVAL)
	case !net.valid():
		return errnoErr(fmt.Sprintf("MODIFY_QP: transport attributes %+v", net), unix.EINVAL)
	default:
		a.Net = &net
	}
	qp, err := lookup(pd, pd.qps, r.Handle, "MODIFY_QP")
	if err != nil {
		return err
	}
	return qp.Modify(a)
}

func (pd *PD) ioctlDestroyQP(arg UserPtr) error {
	return destroyByHandle(pd, arg, pd.qps, "DESTROY_QP")
}

// wrBatch is how many work requests a POST ioctl copies in at once.
const wrBatch = 32

// userWRs reads the work requests of a POST_SEND or POST_RECV from user
// space, wrBatch at a time.
type userWRs struct {
	what  string
	list  uint64 // wr_list
	count int    // wr_count
	size  int    // bytes of one WR
	buf   []byte // WRs first.. as copied in
	first int    // -1 before the first copy
}

// postTarget checks a POST argument's wqe_size against size and its QP
// handle, and returns the QP and a reader of the work requests.
func (pd *PD) postTarget(what string, handle uint32, list uint64, count, wqeSize uint32, size int) (*QP, *userWRs, error) {
	if wqeSize != uint32(size) {
		return nil, nil, errnoErr(fmt.Sprintf("%s: wqe_size %d, want %d", what, wqeSize, size), unix.EINVAL)
	}
	qp, err := lookup(pd, pd.qps, handle, what)
	if err != nil {
		return nil, nil, err
	}
	return qp, &userWRs{what: what, list: list, count: int(count), size: size, first: -1}, nil
}

// at decodes WR i into u, copying in the batch that holds it if needed.
func (w *userWRs) at(i int, u uapi.Marshallable) error {
	if w.first < 0 || i >= w.first+len(w.buf)/w.size {
		w.first = i
		n := min(w.count-i, wrBatch)
		w.buf = make([]byte, n*w.size)
		if err := copyFromUser(w.buf, UserAddr(w.list+uint64(i)*uint64(w.size))); err != nil {
			w.buf = nil
			return errFault("gohfi: " + w.what + " wr_list")
		}
	}
	if err := u.UnmarshalBytes(w.buf[(i-w.first)*w.size:]); err != nil {
		return errnoErr(fmt.Sprintf("%s: WR %d: %v", w.what, i, err), unix.EINVAL)
	}
	return nil
}

// readSGL copies a work request's scatter/gather list in.
func readSGL(addr uint64, n uint32, what string) ([]SGE, error) {
	if n == 0 {
		return nil, nil
	}
	b := make([]byte, int(n)*uapi.SizeofGohfiSge)
	if err := copyFromUser(b, UserAddr(addr)); err != nil {
		return nil, errFault("gohfi: " + what + " sg_list")
	}
	sgl := make([]SGE, n)
	for i := range sgl {
		if err := sgl[i].UnmarshalBytes(b[i*uapi.SizeofGohfiSge:]); err != nil {
			return nil, errnoErr(fmt.Sprintf("%s: gohfi_sge %d: %v", what, i, err), unix.EINVAL)
		}
	}
	return sgl, nil
}

func (pd *PD) ioctlPostSend(arg UserPtr) (ferr error) {
	var r uapi.GohfiPostSend
	if err := readArg(arg, &r, "POST_SEND"); err != nil {
		return err
	}
	r.BadWr = 0
	defer writeBack(arg, &r, "POST_SEND", &ferr)
	qp, wrs, err := pd.postTarget("POST_SEND", r.QPHandle, r.WrList, r.WrCount, r.WqeSize, uapi.SizeofGohfiSendWR)
	if err != nil {
		return err
	}
	var wr SendWR
	next := func(i int) (*SendWR, error) {
		var u uapi.GohfiSendWR
		if err := wrs.at(i, &u); err != nil {
			return nil, err
		}
		switch {
		case u.NumSge > uint32(qp.maxSendSge):
			return nil, errnoErr(fmt.Sprintf("POST_SEND: WR %d has %d SGEs, QP has %d", i, u.NumSge, qp.maxSendSge), unix.EINVAL)
		case u.InvalidateRkey != 0 && !invalidates(u.Opcode):
			return nil, errnoErr(fmt.Sprintf("POST_SEND: WR %d sets invalidate_rkey", i), unix.EINVAL)
		case u.Opcode != uapi.GOHFI_WR_FAST_REG_MR && (u.FrIova != 0 || u.FrLength != 0 || u.FrPageList != 0 || u.FrPageListLen != 0 ||
			u.FrPageShift != 0 || u.FrMRHandle != 0 || u.FrKey != 0 || u.FrAccess != 0):
			return nil, errnoErr(fmt.Sprintf("POST_SEND: WR %d sets fast-registration fields", i), unix.EINVAL)
		case u.RemoteQPN != 0 || u.RemoteQkey != 0 || u.RemotePort != 0:
			return nil, errnoErr(fmt.Sprintf("POST_SEND: WR %d sets UD fields on an RC QP", i), unix.EINVAL)
		}
		sgl, err := readSGL(u.SgList, u.NumSge, "POST_SEND")
		if err != nil {
			return nil, err
		}
		wr = SendWR{WrID: u.WrID, Opcode: u.Opcode, SendFlags: u.SendFlags, SGL: sgl,
			RemoteAddr: u.RemoteAddr, Rkey: u.Rkey, ImmData: u.ImmData, CompareAdd: u.CompareAdd, Swap: u.Swap,
			InvalidateRkey: u.InvalidateRkey}
		if u.Opcode == uapi.GOHFI_WR_FAST_REG_MR && qp.pd.v.maxFRPages > 0 {
			if wr.Reg, err = pd.userBindingOf(&u, i); err != nil {
				return nil, err
			}
		}
		return &wr, nil
	}
	n, err := qp.postSend(int(r.WrCount), next)
	r.BadWr = uint32(n)
	return err
}

func (pd *PD) ioctlPostRecv(arg UserPtr) (ferr error) {
	var r uapi.GohfiPostRecv
	if err := readArg(arg, &r, "POST_RECV"); err != nil {
		return err
	}
	r.BadWr = 0
	defer writeBack(arg, &r, "POST_RECV", &ferr)
	qp, wrs, err := pd.postTarget("POST_RECV", r.QPHandle, r.WrList, r.WrCount, r.WqeSize, uapi.SizeofGohfiRecvWR)
	if err != nil {
		return err
	}
	var wr RecvWR
	next := func(i int) (*RecvWR, error) {
		var u uapi.GohfiRecvWR
		if err := wrs.at(i, &u); err != nil {
			return nil, err
		}
		switch {
		case u.Reserved != 0:
			return nil, errnoErr(fmt.Sprintf("POST_RECV: WR %d: reserved field set", i), unix.EINVAL)
		case u.NumSge > uint32(qp.maxRecvSge):
			return nil, errnoErr(fmt.Sprintf("POST_RECV: WR %d has %d SGEs, QP has %d", i, u.NumSge, qp.maxRecvSge), unix.EINVAL)
		}
		sgl, err := readSGL(u.SgList, u.NumSge, "POST_RECV")
		if err != nil {
			return nil, err
		}
		wr = RecvWR{WrID: u.WrID, SGL: sgl}
		return &wr, nil
	}
	n, err := qp.postRecv(int(r.WrCount), next)
	r.BadWr = uint32(n)
	return err
}

// qpDBRecOff is where the doorbell record sits in the page of the SQ head
// word (one DMA mapping for both).
const qpDBRecOff = chip.DBRecAlign

// resetDBRec puts the doorbell record in the state the device expects of a
// QP in RESET (chip/verbs.go): indices 0, notify set (the device has not
// polled it yet, so the first doorbell also goes to the register).
func (qp *QP) resetDBRec() {
	if qp.dbRec == nil {
		return
	}
	store32(qp.dbRec, chip.DBRecSQTail, 0)
	store32(qp.dbRec, chip.DBRecRQTail, 0)
	store32(qp.dbRec, chip.DBRecFlags, chip.DBRecNotify)
}

// ringLocked tells the device about a new producer index of the send
// (QPSQTail) or receive (QPRQTail) queue, the WQEs already in memory. With
// a doorbell record it stores the index there and writes a register only
// when the device asked to be notified (it sleeps): the store, then the
// flag's load, both sequentially consistent atomics, so either this load
// sees the flag or the device's read after setting it sees the index. The
// register is then QPDBRing where the device has it (chip.CapDBRing).
func (qp *QP) ringLocked(reg uint64, tail int) error {
	d := qp.pd.d
	dir, off := uint64(0), chip.DBRecSQTail
	if reg == chip.QPRQTail {
		dir, off = 1, chip.DBRecRQTail
	}
	// The event's time is the store's: the device may take the index
	// before the event is recorded.
	var when time.Time
	if d.tracing() {
		when = time.Now()
	}
	csr := chip.QPReg(qp.idx, reg)
	if qp.dbRec != nil {
		store32(qp.dbRec, off, uint32(tail))
		if qp.dbHook != nil {
			qp.dbHook()
		}
		if load32(qp.dbRec, chip.DBRecFlags)&chip.DBRecNotify == 0 {
			d.traceAt(when, TraceDoorbellRecord, qp.ctxt(), uint64(qp.idx), uint64(tail), dir)
			return nil
		}
		if d.info.CapFlags&chip.CapDBRing != 0 {
			// The index is in the record: the ring register, whose
			// value means nothing, which a vfio-user server offers
			// as an ioeventfd (no message on the socket).
			csr = chip.QPDBReg(qp.idx, chip.QPDBRing)
		}
	}
	if err := d.writeCSRPosted(csr, uint64(tail)); err != nil {
		return err
	}
	d.traceAt(when, TraceDoorbell, qp.ctxt(), uint64(qp.idx), uint64(tail), dir)
	return nil
}

// ctxt is the receive context of the QP's file (its PD is context + 1),
// for trace events.
func (qp *QP) ctxt() int { return int(qp.pd.num) - 1 }
