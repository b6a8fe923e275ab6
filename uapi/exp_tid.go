package uapi

// TID encoding of expected receive (drivers/infiniband/hw/hfi1/user_exp_rcv.h).
//
// Each __u32 in hfi1_tid_info.tidlist names one programmed RcvArray entry:
//
//	bits  0-10  LEN   pages covered by the entry
//	bits 20-21  CTRL  1 = even entry of a pair, 2 = odd entry
//	bits 22-31  IDX   pair index, relative to the context's expected base
//
// so the entry's index from the expected base is IDX*2 + CTRL - 1.
const (
	EXP_TID_TIDLEN_MASK   = 0x7FF
	EXP_TID_TIDLEN_SHIFT  = 0
	EXP_TID_TIDCTRL_MASK  = 0x3
	EXP_TID_TIDCTRL_SHIFT = 20
	EXP_TID_TIDIDX_MASK   = 0x3FF
	EXP_TID_TIDIDX_SHIFT  = 22
)

// ExpTidField names a TID field for ExpTidSet/ExpTidGet, standing in for the
// token pasting of the C macros EXP_TID_SET(LEN, v) etc.
type ExpTidField uint8

// The three TID fields.
const (
	EXP_TID_LEN ExpTidField = iota
	EXP_TID_CTRL
	EXP_TID_IDX
)

func (f ExpTidField) maskShift() (mask, shift uint32) {
	switch f {
	case EXP_TID_LEN:
		return EXP_TID_TIDLEN_MASK, EXP_TID_TIDLEN_SHIFT
	case EXP_TID_CTRL:
		return EXP_TID_TIDCTRL_MASK, EXP_TID_TIDCTRL_SHIFT
	case EXP_TID_IDX:
		return EXP_TID_TIDIDX_MASK, EXP_TID_TIDIDX_SHIFT
	}
	return 0, 0
}

// ExpTidSet is EXP_TID_SET(field, value): value masked and shifted into place.
func ExpTidSet(field ExpTidField, value uint32) uint32 {
	m, s := field.maskShift()
	return (value & m) << s
}

// ExpTidGet is EXP_TID_GET(tid, field).
func ExpTidGet(tid uint32, field ExpTidField) uint32 {
	m, s := field.maskShift()
	return tid >> s & m
}

// ExpTidReset is EXP_TID_RESET(tid, field, value), returning the new TID.
func ExpTidReset(tid uint32, field ExpTidField, value uint32) uint32 {
	m, s := field.maskShift()
	return tid&^(m<<s) | ExpTidSet(field, value)
}

// CreateTid encodes the TID of RcvArray entry rcventry (relative to the
// context's expected base) covering npages pages, as hfi1's create_tid does.
func CreateTid(rcventry, npages uint32) uint32 {
	pair := rcventry &^ 1
	return ExpTidSet(EXP_TID_IDX, pair>>1) |
		ExpTidSet(EXP_TID_CTRL, 1<<(rcventry-pair)) |
		ExpTidSet(EXP_TID_LEN, npages)
}

// TidRcvEntry decodes a TID into its RcvArray entry (relative to the expected
// base) and page count. ok is false when CTRL is neither 1 nor 2, which the
// driver must reject with EINVAL.
func TidRcvEntry(tid uint32) (rcventry, npages uint32, ok bool) {
	ctrl := ExpTidGet(tid, EXP_TID_CTRL)
	if ctrl != 1 && ctrl != 2 {
		return 0, 0, false
	}
	return ExpTidGet(tid, EXP_TID_IDX)*2 + ctrl - 1, ExpTidGet(tid, EXP_TID_LEN), true
}
