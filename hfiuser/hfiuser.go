// Package hfiuser is the thin user-space library over the driver's file
// operations, the part of PSM (or libhfi1) that turns calls into ioctls: each
// wrapper lays its argument out in C layout in the caller's memory and passes
// its address, exactly as a C program would.
package hfiuser

import (
	"encoding/binary"
	"fmt"
	"runtime"

	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// Ioctl passes m as the argument of cmd: the address of the struct itself,
// whose Go layout is the C one (structs.HostLayout; uapi's parity test
// checks it against the C headers), exactly as a C program passes &arg.
// The driver writes partial results back also when the call fails (TID_FREE's
// tidcnt of TIDs freed before the bad one), as the kernel does.
func Ioctl[T any, P interface {
	*T
	uapi.Marshallable
}](f *driver.File, cmd uint32, m P) error {
	_, err := f.Ioctl(cmd, driver.UserPtrOf((*T)(m)))
	return err
}

// IoctlScalar passes a pointer to the scalar argument of cmd (RECV_CTRL,
// POLL_TYPE, ACK_EVENT, SET_PKEY, RCVHDR_HEAD), as hfi1's get_user expects.
// The value is stored little-endian in 8 bytes; the driver reads the
// command's own size from the start, which is the same value.
func IoctlScalar(f *driver.File, cmd uint32, v uint64) error {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	_, err := f.Ioctl(cmd, driver.UserPtrOf(&b))
	return err
}

// AssignCtxt takes a hardware context for f (ASSIGN_CTXT).
func AssignCtxt(f *driver.File) error {
	return Ioctl(f, uapi.HFI1_IOCTL_ASSIGN_CTXT, &uapi.Hfi1UserInfo{Userversion: uapi.HFI1_USER_SWVERSION})
}

// CtxtInfo reads the context's description (CTXT_INFO).
func CtxtInfo(f *driver.File) (uapi.Hfi1CtxtInfo, error) {
	var ci uapi.Hfi1CtxtInfo
	err := Ioctl(f, uapi.HFI1_IOCTL_CTXT_INFO, &ci)
	return ci, err
}

// UserInfo reads the context's mmap tokens (USER_INFO).
func UserInfo(f *driver.File) (uapi.Hfi1BaseInfo, error) {
	var bi uapi.Hfi1BaseInfo
	err := Ioctl(f, uapi.HFI1_IOCTL_USER_INFO, &bi)
	return bi, err
}

// TIDUpdate registers [addr, addr+length) (TID_UPDATE) using list as the
// TID list; it returns the TIDs programmed and the bytes they cover.
func TIDUpdate(f *driver.File, addr uintptr, length int, list []uint32) ([]uint32, int, error) {
	if len(list) == 0 {
		return nil, 0, fmt.Errorf("hfiuser: TID_UPDATE with an empty TID list: %w", unix.EINVAL)
	}
	var pin runtime.Pinner
	defer pin.Unpin()
	ti := uapi.Hfi1TidInfo{Vaddr: uint64(addr), Tidlist: pinnedAddr(&pin, &list[0]),
		Tidcnt: uint32(len(list)), Length: uint32(length)}
	err := Ioctl(f, uapi.HFI1_IOCTL_TID_UPDATE, &ti)
	if err != nil {
		return nil, 0, err
	}
	return list[:ti.Tidcnt], int(ti.Length), nil
}

// TIDFree frees tids (TID_FREE) and returns how many were freed: on an
// error, the TIDs before the bad one (the driver writes tidcnt back).
func TIDFree(f *driver.File, tids []uint32) (int, error) {
	if len(tids) == 0 {
		return 0, nil
	}
	var pin runtime.Pinner
	defer pin.Unpin()
	ti := uapi.Hfi1TidInfo{Tidlist: pinnedAddr(&pin, &tids[0]), Tidcnt: uint32(len(tids))}
	if err := Ioctl(f, uapi.HFI1_IOCTL_TID_FREE, &ti); err != nil {
		return min(int(ti.Tidcnt), len(tids)), err
	}
	return int(ti.Tidcnt), nil
}

// TIDInvalRead reads the invalidated TIDs into list (TID_INVAL_READ).
func TIDInvalRead(f *driver.File, list []uint32) ([]uint32, error) {
	if len(list) == 0 {
		return nil, fmt.Errorf("hfiuser: TID_INVAL_READ with an empty TID list: %w", unix.EINVAL)
	}
	var pin runtime.Pinner
	defer pin.Unpin()
	ti := uapi.Hfi1TidInfo{Tidlist: pinnedAddr(&pin, &list[0]), Tidcnt: uint32(len(list))}
	err := Ioctl(f, uapi.HFI1_IOCTL_TID_INVAL_READ, &ti)
	if err != nil {
		return nil, err
	}
	return list[:ti.Tidcnt], nil
}

// Send sends one packet from data (GOHFI_IOCTL_SEND); s.Vaddr and s.Length
// are set from data.
func Send(f *driver.File, s uapi.GohfiSend, data []byte) error {
	var pin runtime.Pinner
	defer pin.Unpin()
	s.Length = uint32(len(data))
	if len(data) > 0 {
		s.Vaddr = pinnedAddr(&pin, &data[0])
	}
	return Ioctl(f, uapi.GOHFI_IOCTL_SEND, &s)
}

// SetRcvHdrHead tells the device how far the header queue was consumed.
func SetRcvHdrHead(f *driver.File, head uint64) error {
	return IoctlScalar(f, uapi.GOHFI_IOCTL_RCVHDR_HEAD, head)
}

// DriverStats reads the driver's counters (GOHFI_IOCTL_DRIVER_STATS).
func DriverStats(f *driver.File) (uapi.GohfiDriverStats, error) {
	var st uapi.GohfiDriverStats
	err := Ioctl(f, uapi.GOHFI_IOCTL_DRIVER_STATS, &st)
	return st, err
}
