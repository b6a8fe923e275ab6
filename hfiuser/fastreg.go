package hfiuser

import (
	"encoding/binary"
	"runtime"

	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/uapi"
)

// Fast registration (what rdma-core would offer a provider for ALLOC_MR and
// the fr_* fields of a work request).

// AllocMR allocates a fast-registration MR with room for maxNumSg pages
// (ALLOC_MR, GOHFI_MR_TYPE_MEM_REG); its keys carry variant byte 0.
func AllocMR(f *driver.File, maxNumSg uint32) (uapi.GohfiAllocMR, error) {
	r := uapi.GohfiAllocMR{MRType: uapi.GOHFI_MR_TYPE_MEM_REG, MaxNumSg: maxNumSg}
	err := Ioctl(f, uapi.GOHFI_IOCTL_ALLOC_MR, &r)
	return r, err
}

// FastRegWR is a FAST_REG_MR work request binding MR handle mr to the
// user pages at the addresses in pages (each aligned to 1 << shift) under
// key, as [iova, iova+length) with IB_ACCESS_* rights.
func FastRegWR(wrID uint64, flags, mr, key, access uint32, pages []uint64, shift uint32, iova, length uint64) SendWR {
	return SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: wrID, Opcode: uapi.GOHFI_WR_FAST_REG_MR, SendFlags: flags,
		FrIova: iova, FrLength: length, FrPageShift: shift, FrMRHandle: mr, FrKey: key, FrAccess: access}, Pages: pages}
}

// LocalInvWR is a LOCAL_INV work request of key.
func LocalInvWR(wrID uint64, flags, key uint32) SendWR {
	return SendWR{GohfiSendWR: uapi.GohfiSendWR{WrID: wrID, Opcode: uapi.GOHFI_WR_LOCAL_INV, SendFlags: flags, InvalidateRkey: key}}
}

// pageListAddr lays a page list out as the __u64 array fr_page_list points
// to and returns its pinned address.
func pageListAddr(pin *runtime.Pinner, pages []uint64) uint64 {
	return pinnedArray(pin, len(pages), 8, func(i int, b []byte) { binary.LittleEndian.PutUint64(b, pages[i]) })
}
