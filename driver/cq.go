package driver

import (
	"errors"
	"fmt"
	"sync"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/vfio"
	"golang.org/x/sys/unix"
)

// CQ is a completion queue (ib_cq): a ring of CQEs in driver-owned host
// memory that the device writes, polled from memory by sequence number
// (no register read per poll). The driver tells the device how far it has
// consumed: where the device has consumer-index records
// (chip.CapCQHeadRec), by storing its head into the record after the ring,
// which the device reads when it finds the ring full, at every poll that
// consumed CQEs; otherwise by writing CQHead once a quarter of the ring
// was, so a CQ of n entries holds cqUsable(n) completions without
// overflowing (with a record it holds n-1; Size stays cqUsable(n), what
// CREATE_CQ reported on either device).
type CQ struct {
	pd         *PD
	handle     uint32
	idx        int
	n          int      // ring entries
	ring       *ringMem // n CQEs, then the consumer-index record if headRec
	headRec    bool
	userHandle uint64
	qpRefs     int // QPs whose send or receive CQ it is; under pd.mu

	mu          sync.Mutex
	head        int    // ring slot of the next CQE
	expect      uint32 // its sequence number
	unpublished int    // CQEs consumed since CQHead was written (no headRec)
	gone        bool   // destroyed
}

// cqThreshold is how many consumed CQEs make the driver write CQHead.
func cqThreshold(n int) int { return max(1, n/4) }

// cqUsable is how many completions a ring of n entries holds: indices are
// modulo n (one slot stays empty) and up to cqThreshold-1 consumed entries
// are not yet reported to the device.
func cqUsable(n int) int { return n - cqThreshold(n) }

// Handle is the CQ's handle; Size the completions it holds.
func (cq *CQ) Handle() uint32 { return cq.handle }
func (cq *CQ) Size() int      { return cqUsable(cq.n) }
func (cq *CQ) Index() int     { return cq.idx }

// CreateCQ creates a CQ that holds at least cqe completions
// (ib_create_cq); its interrupt is the file's context's. EINVAL for cqe 0
// or above the device's limit, ENOSPC when every CQ of the device is taken.
func (pd *PD) CreateCQ(cqe int, userHandle uint64) (*CQ, error) {
	v, d := pd.v, pd.d
	if cqe < 1 || cqe > v.maxCQE() {
		return nil, errnoErr(fmt.Sprintf("CREATE_CQ: %d entries, want 1..%d", cqe, v.maxCQE()), unix.EINVAL)
	}
	n := 2
	for cqUsable(n) < cqe {
		n *= 2
	}
	cq := &CQ{pd: pd, n: n, userHandle: userHandle, expect: 1, idx: -1}
	if cq.idx = takeSlot(&v.mu, v.cqs, cq); cq.idx < 0 {
		return nil, errnoErr(fmt.Sprintf("CREATE_CQ: all %d CQs in use", len(v.cqs)), unix.ENOSPC)
	}
	// The consumer-index record is the 8-byte word after the ring, in the
	// same memfd and mapping (the device reads it, so the mapping is
	// read-write); it starts 0, as the memfd does.
	size, flags := n*chip.CQESize, uint32(vfio.DMAWrite)
	if cq.headRec = v.cqHeadRec; cq.headRec {
		size, flags = size+cqHeadRecSize, flags|vfio.DMARead
	}
	var err error
	if cq.ring, err = newRingMem(fmt.Sprintf("cq%d", cq.idx), size); err != nil {
		return nil, errors.Join(fmt.Errorf("gohfi: CREATE_CQ: %w", errors.Join(err, unix.ENOMEM)), cq.release())
	}
	if err = d.dmaMap(cq.ring, flags); err != nil {
		return nil, errors.Join(fmt.Errorf("gohfi: CREATE_CQ: %w", err), cq.release())
	}
	type csr struct{ reg, val uint64 }
	regs := []csr{{chip.CQControl, 0}, {chip.CQRingBase, cq.ring.iova}}
	if cq.headRec {
		regs = append(regs, csr{chip.CQHeadAddr, cq.ring.iova + cq.headRecOff()})
	}
	regs = append(regs, csr{chip.CQEntries, uint64(n)}, csr{chip.CQHead, 0}, csr{chip.CQControl, cq.control(false)})
	for _, r := range regs {
		if err = d.writeCSR(chip.CQReg(cq.idx, r.reg), r.val); err != nil {
			return nil, errors.Join(fmt.Errorf("gohfi: CREATE_CQ: %w", err), cq.release())
		}
	}
	if err := insert(pd, pd.cqs, cq, func(h uint32) { cq.handle = h }); err != nil {
		return nil, errors.Join(errnoErr("CREATE_CQ: file closed", err.(unix.Errno)), cq.release())
	}
	return cq, nil
}

// cqHeadRecSize is the room after a CQ's ring for its consumer-index
// record: one 8-byte word, in a cache line of its own.
const cqHeadRecSize = 64

// headRecOff is the offset of the consumer-index record in cq.ring.
func (cq *CQ) headRecOff() uint64 { return uint64(cq.n) * chip.CQESize }

func (cq *CQ) control(arm bool) uint64 {
	v := uint64(chip.CQCtrlEnable) | uint64(cq.pd.num-1)<<chip.CQCtrlCtxtShift
	if arm {
		v |= chip.CQCtrlArm
	}
	return v
}

// Destroy destroys the CQ (ib_destroy_cq); EBUSY while a QP uses it.
func (cq *CQ) Destroy() error {
	pd := cq.pd
	pd.mu.Lock()
	if pd.cqs[cq.handle] != cq {
		pd.mu.Unlock()
		return errnoErr(fmt.Sprintf("DESTROY_CQ: CQ %d does not exist", cq.handle), unix.EINVAL)
	}
	if cq.qpRefs > 0 {
		pd.mu.Unlock()
		return errnoErr(fmt.Sprintf("DESTROY_CQ: CQ %d is used by %d QPs", cq.handle, cq.qpRefs), unix.EBUSY)
	}
	delete(pd.cqs, cq.handle)
	pd.mu.Unlock()
	return cq.destroy()
}

// destroy stops the CQ in the device and frees it; it is out of the table.
func (cq *CQ) destroy() error {
	d := cq.pd.d
	var errs []error
	if !d.dead.Load() {
		errs = append(errs, d.writeCSR(chip.CQReg(cq.idx, chip.CQControl), 0))
		errs = append(errs, d.writeCSR(chip.CQReg(cq.idx, chip.CQRingBase), 0))
		if cq.headRec {
			errs = append(errs, d.writeCSR(chip.CQReg(cq.idx, chip.CQHeadAddr), 0))
		}
	}
	errs = append(errs, cq.release())
	return errors.Join(errs...)
}

// release unmaps and frees the ring and gives the CQ index back.
func (cq *CQ) release() error {
	v, d := cq.pd.v, cq.pd.d
	cq.mu.Lock()
	cq.gone = true
	cq.mu.Unlock()
	var err error
	if cq.ring != nil {
		if !d.dead.Load() {
			err = d.dmaUnmap(cq.ring)
		} else if cq.ring.iova != 0 {
			d.iova.release(cq.ring.iova, uint64(len(cq.ring.mem)))
			cq.ring.iova = 0
		}
		cq.ring.free()
		cq.ring = nil
	}
	if cq.idx >= 0 {
		v.mu.Lock()
		if v.cqs[cq.idx] == cq {
			v.cqs[cq.idx] = nil
		}
		v.mu.Unlock()
	}
	return err
}

// slotSeq is the sequence word of the CQE in slot i: the device writes it
// last, so a matching seq means the rest of the entry is there.
func (cq *CQ) slotSeq(i int) uint32 {
	return uint32(load64(cq.ring.mem, i*chip.CQESize+chip.CQESeqWordOff) >> 32)
}

// Poll takes up to len(wc) completions (ib_poll_cq) and returns how many.
// It never blocks and reads no register. It tells the device which entries
// it may reuse: in the consumer-index record when it consumed any, or by
// writing CQHead every quarter of the ring.
func (cq *CQ) Poll(wc []uapi.GohfiWC) (int, error) {
	cq.mu.Lock()
	defer cq.mu.Unlock()
	if cq.gone {
		return 0, errnoErr("POLL_CQ: CQ destroyed", unix.EINVAL)
	}
	n := 0
	var e chip.CQE
	for n < len(wc) && cq.slotSeq(cq.head) == cq.expect {
		e.Unmarshal(cq.ring.mem[cq.head*chip.CQESize:])
		wc[n] = uapi.GohfiWC{
			WrID: e.WrID, Status: e.Status, Opcode: e.Opcode, VendorErr: e.VendorErr,
			ByteLen: e.ByteLen, InvalidatedRkey: e.InvalidatedRkey, ImmData: e.ImmData,
			QPNum: e.QPNum, SrcQP: e.SrcQP, WcFlags: e.WcFlags,
		}
		cq.pd.d.trace(TraceCompletion, int(cq.pd.num)-1, uint64(cq.idx), e.WrID, uint64(e.Status))
		n++
		cq.head = (cq.head + 1) % cq.n
		cq.expect = uapi.NextSeq(cq.expect)
		cq.unpublished++
	}
	if cq.headRec {
		// An 8-byte store, no register write: the device reads the record
		// only when it finds the ring full, and only after it took the
		// work requests whose completions need the slots freed here
		// (from their doorbell register or record), which the caller
		// posts after this store.
		if n > 0 {
			store64(cq.ring.mem, int(cq.headRecOff()), uint64(cq.head))
			cq.unpublished = 0
		}
		return n, nil
	}
	if cq.unpublished >= cqThreshold(cq.n) {
		// A posted write reaches the device in order with later register
		// doorbells, but not with doorbell records, which the engine may
		// read first and then find the ring full: with records, the head
		// is written and waited for (one round trip a quarter ring).
		write := cq.pd.d.writeCSRPosted
		if cq.pd.v.dbRec {
			write = cq.pd.d.writeCSR
		}
		if err := write(chip.CQReg(cq.idx, chip.CQHead), uint64(cq.head)); err != nil {
			return n, fmt.Errorf("gohfi: POLL_CQ: %w", err)
		}
		cq.unpublished = 0
	}
	return n, nil
}

// ready reports whether a completion waits to be polled.
func (cq *CQ) ready() bool {
	cq.mu.Lock()
	defer cq.mu.Unlock()
	return !cq.gone && cq.slotSeq(cq.head) == cq.expect
}

// arm asks the device to raise the context's interrupt at the CQ's next
// completion (ib_req_notify_cq); the device disarms when it does. The write
// is posted: the caller makes sure the device took it (a later register
// read) before it relies on the arm.
func (cq *CQ) arm() error {
	return cq.pd.d.writeCSRPosted(chip.CQReg(cq.idx, chip.CQControl), cq.control(true))
}

// pollCQs is Poll's look at the file's CQs: POLLIN when one has a
// completion. With arm, every CQ is armed first and looked at after, so a
// completion written before the arm is seen and one after it interrupts.
func (pd *PD) pollCQs(arm bool) (uint32, error) {
	pd.mu.RLock()
	defer pd.mu.RUnlock()
	if pd.closed != 0 {
		return POLLERR, errnoErr("poll: file closed", pd.closed)
	}
	if arm && len(pd.cqs) > 0 {
		for _, cq := range pd.cqs {
			if err := cq.arm(); err != nil {
				return POLLERR, fmt.Errorf("gohfi: poll: arm CQ %d: %w", cq.handle, err)
			}
		}
		// The arms are posted: one read makes sure the device took them
		// all before the rings are looked at.
		if _, err := pd.d.readCSR(chip.RegID); err != nil {
			return POLLERR, fmt.Errorf("gohfi: poll: arm CQs: %w", err)
		}
	}
	for _, cq := range pd.cqs {
		if cq.ready() {
			return POLLIN | POLLRDNORM, nil
		}
	}
	return 0, nil
}

func (pd *PD) ioctlCreateCQ(arg UserPtr) error {
	var r uapi.GohfiCreateCQ
	if err := readArg(arg, &r, "CREATE_CQ"); err != nil {
		return err
	}
	cq, err := pd.CreateCQ(int(r.Cqe), r.UserHandle)
	if err != nil {
		return err
	}
	r.Cqe, r.Handle = uint32(cq.Size()), cq.handle
	if err := writeArg(arg, &r, "CREATE_CQ"); err != nil {
		return errors.Join(err, cq.Destroy())
	}
	return nil
}

func (pd *PD) ioctlDestroyCQ(arg UserPtr) error {
	return destroyByHandle(pd, arg, pd.cqs, "DESTROY_CQ")
}

// pollChunk is how many completions POLL_CQ takes from the ring at a time.
const pollChunk = 16

func (pd *PD) ioctlPollCQ(arg UserPtr) error {
	var r uapi.GohfiPollCQ
	if err := readArg(arg, &r, "POLL_CQ"); err != nil {
		return err
	}
	switch {
	case r.WcSize != uapi.SizeofGohfiWC:
		return errnoErr(fmt.Sprintf("POLL_CQ: wc_size %d, want %d", r.WcSize, uapi.SizeofGohfiWC), unix.EINVAL)
	case r.Reserved != 0:
		return errnoErr("POLL_CQ: reserved field set", unix.EINVAL)
	}
	cq, err := lookup(pd, pd.cqs, r.CQHandle, "POLL_CQ")
	if err != nil {
		return err
	}
	// At most one ring's worth per call: no more can be waiting. Polled
	// in chunks on the stack: a consumer that spins on POLL_CQ allocates
	// nothing.
	want := min(int(r.Ne), cq.n)
	if want > 0 && r.WcList == 0 {
		return errFault("gohfi: POLL_CQ wc_list")
	}
	var (
		wc   [pollChunk]uapi.GohfiWC
		b    [pollChunk * uapi.SizeofGohfiWC]byte
		n    int
		perr error
	)
	for n < want {
		ask := min(want-n, pollChunk)
		k, err := cq.Poll(wc[:ask])
		for i := range wc[:k] {
			wc[i].MarshalBytes(b[i*uapi.SizeofGohfiWC:])
		}
		// As in uverbs, completions polled but not copied are lost.
		if err := copyToUser(UserAddr(r.WcList+uint64(n)*uapi.SizeofGohfiWC), b[:k*uapi.SizeofGohfiWC]); err != nil {
			return errFault("gohfi: POLL_CQ wc_list")
		}
		n += k
		if perr = err; err != nil || k < ask {
			break // an error, or the ring is empty
		}
	}
	r.Ne = uint32(n)
	if err := writeArg(arg, &r, "POLL_CQ"); err != nil {
		return err
	}
	return perr
}
