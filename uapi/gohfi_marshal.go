// Code written with the help of a one-off script from the struct definitions in
// gohfi.go; offsets are those of the C structs (checked by parity_test.go).

package uapi

// SizeBytes implements Marshallable.
func (*GohfiDeviceAttr) SizeBytes() int { return SizeofGohfiDeviceAttr }

// MarshalBytes implements Marshallable.
func (r *GohfiDeviceAttr) MarshalBytes(dst []byte) {
	_ = dst[SizeofGohfiDeviceAttr-1]
	le.PutUint32(dst[0:], r.VendorID)
	le.PutUint32(dst[4:], r.VendorPartID)
	le.PutUint32(dst[8:], r.HwVer)
	le.PutUint32(dst[12:], r.NumContexts)
	le.PutUint32(dst[16:], r.RcvArrayEntries)
	le.PutUint32(dst[20:], r.MaxTidPages)
	le.PutUint32(dst[24:], r.MttEntries)
	le.PutUint32(dst[28:], r.MaxMR)
	le.PutUint32(dst[32:], r.MaxQP)
	le.PutUint32(dst[36:], r.MaxQPWR)
	le.PutUint32(dst[40:], r.MaxSge)
	le.PutUint32(dst[44:], r.MaxCQ)
	le.PutUint32(dst[48:], r.MaxCQE)
	le.PutUint32(dst[52:], r.MaxFastRegPageListLen)
	le.PutUint64(dst[56:], r.MaxMRSize)
	le.PutUint64(dst[64:], r.PageSizeCap)
	le.PutUint64(dst[72:], r.DeviceCapFlags)
	le.PutUint64(dst[80:], r.OdpGeneralCaps)
	le.PutUint32(dst[88:], r.OdpRCCaps)
	le.PutUint32(dst[92:], r.OdpUCCaps)
	le.PutUint32(dst[96:], r.OdpUDCaps)
	le.PutUint32(dst[100:], r.Reserved)
}

// UnmarshalBytes implements Marshallable.
func (r *GohfiDeviceAttr) UnmarshalBytes(src []byte) error {
	if len(src) < SizeofGohfiDeviceAttr {
		return shortBuffer("gohfi_device_attr", len(src), SizeofGohfiDeviceAttr)
	}
	r.VendorID = le.Uint32(src[0:])
	r.VendorPartID = le.Uint32(src[4:])
	r.HwVer = le.Uint32(src[8:])
	r.NumContexts = le.Uint32(src[12:])
	r.RcvArrayEntries = le.Uint32(src[16:])
	r.MaxTidPages = le.Uint32(src[20:])
	r.MttEntries = le.Uint32(src[24:])
	r.MaxMR = le.Uint32(src[28:])
	r.MaxQP = le.Uint32(src[32:])
	r.MaxQPWR = le.Uint32(src[36:])
	r.MaxSge = le.Uint32(src[40:])
	r.MaxCQ = le.Uint32(src[44:])
	r.MaxCQE = le.Uint32(src[48:])
	r.MaxFastRegPageListLen = le.Uint32(src[52:])
	r.MaxMRSize = le.Uint64(src[56:])
	r.PageSizeCap = le.Uint64(src[64:])
	r.DeviceCapFlags = le.Uint64(src[72:])
	r.OdpGeneralCaps = le.Uint64(src[80:])
	r.OdpRCCaps = le.Uint32(src[88:])
	r.OdpUCCaps = le.Uint32(src[92:])
	r.OdpUDCaps = le.Uint32(src[96:])
	r.Reserved = le.Uint32(src[100:])
	return nil
}

// SizeBytes implements Marshallable.
func (*GohfiRegMR) SizeBytes() int { return SizeofGohfiRegMR }

// MarshalBytes implements Marshallable.
func (r *GohfiRegMR) MarshalBytes(dst []byte) {
	_ = dst[SizeofGohfiRegMR-1]
	le.PutUint64(dst[0:], r.Addr)
	le.PutUint64(dst[8:], r.Length)
	le.PutUint64(dst[16:], r.Iova)
	le.PutUint32(dst[24:], r.AccessFlags)
	le.PutUint32(dst[28:], r.Handle)
	le.PutUint32(dst[32:], r.Lkey)
	le.PutUint32(dst[36:], r.Rkey)
}

// UnmarshalBytes implements Marshallable.
func (r *GohfiRegMR) UnmarshalBytes(src []byte) error {
	if len(src) < SizeofGohfiRegMR {
		return shortBuffer("gohfi_reg_mr", len(src), SizeofGohfiRegMR)
	}
	r.Addr = le.Uint64(src[0:])
	r.Length = le.Uint64(src[8:])
	r.Iova = le.Uint64(src[16:])
	r.AccessFlags = le.Uint32(src[24:])
	r.Handle = le.Uint32(src[28:])
	r.Lkey = le.Uint32(src[32:])
	r.Rkey = le.Uint32(src[36:])
	return nil
}

// SizeBytes implements Marshallable.
func (*GohfiHandle) SizeBytes() int { return SizeofGohfiHandle }

// MarshalBytes implements Marshallable.
func (r *GohfiHandle) MarshalBytes(dst []byte) {
	_ = dst[SizeofGohfiHandle-1]
	le.PutUint32(dst[0:], r.Handle)
	le.PutUint32(dst[4:], r.Reserved)
}

// UnmarshalBytes implements Marshallable.
func (r *GohfiHandle) UnmarshalBytes(src []byte) error {
	if len(src) < SizeofGohfiHandle {
		return shortBuffer("gohfi_handle", len(src), SizeofGohfiHandle)
	}
	r.Handle = le.Uint32(src[0:])
	r.Reserved = le.Uint32(src[4:])
	return nil
}

// SizeBytes implements Marshallable.
func (*GohfiAdviseMR) SizeBytes() int { return SizeofGohfiAdviseMR }

// MarshalBytes implements Marshallable.
func (r *GohfiAdviseMR) MarshalBytes(dst []byte) {
	_ = dst[SizeofGohfiAdviseMR-1]
	le.PutUint32(dst[0:], r.Advice)
	le.PutUint32(dst[4:], r.Flags)
	le.PutUint32(dst[8:], r.Lkey)
	le.PutUint32(dst[12:], r.Reserved)
	le.PutUint64(dst[16:], r.Addr)
	le.PutUint64(dst[24:], r.Length)
}

// UnmarshalBytes implements Marshallable.
func (r *GohfiAdviseMR) UnmarshalBytes(src []byte) error {
	if len(src) < SizeofGohfiAdviseMR {
		return shortBuffer("gohfi_advise_mr", len(src), SizeofGohfiAdviseMR)
	}
	r.Advice = le.Uint32(src[0:])
	r.Flags = le.Uint32(src[4:])
	r.Lkey = le.Uint32(src[8:])
	r.Reserved = le.Uint32(src[12:])
	r.Addr = le.Uint64(src[16:])
	r.Length = le.Uint64(src[24:])
	return nil
}

// SizeBytes implements Marshallable.
func (*GohfiAllocMR) SizeBytes() int { return SizeofGohfiAllocMR }

// MarshalBytes implements Marshallable.
func (r *GohfiAllocMR) MarshalBytes(dst []byte) {
	_ = dst[SizeofGohfiAllocMR-1]
	le.PutUint32(dst[0:], r.MRType)
	le.PutUint32(dst[4:], r.MaxNumSg)
	le.PutUint32(dst[8:], r.Handle)
	le.PutUint32(dst[12:], r.Lkey)
	le.PutUint32(dst[16:], r.Rkey)
	le.PutUint32(dst[20:], r.Reserved)
}

// UnmarshalBytes implements Marshallable.
func (r *GohfiAllocMR) UnmarshalBytes(src []byte) error {
	if len(src) < SizeofGohfiAllocMR {
		return shortBuffer("gohfi_alloc_mr", len(src), SizeofGohfiAllocMR)
	}
	r.MRType = le.Uint32(src[0:])
	r.MaxNumSg = le.Uint32(src[4:])
	r.Handle = le.Uint32(src[8:])
	r.Lkey = le.Uint32(src[12:])
	r.Rkey = le.Uint32(src[16:])
	r.Reserved = le.Uint32(src[20:])
	return nil
}

// SizeBytes implements Marshallable.
func (*GohfiCreateCQ) SizeBytes() int { return SizeofGohfiCreateCQ }

// MarshalBytes implements Marshallable.
func (r *GohfiCreateCQ) MarshalBytes(dst []byte) {
	_ = dst[SizeofGohfiCreateCQ-1]
	le.PutUint32(dst[0:], r.Cqe)
	le.PutUint32(dst[4:], r.Handle)
	le.PutUint64(dst[8:], r.UserHandle)
}

// UnmarshalBytes implements Marshallable.
func (r *GohfiCreateCQ) UnmarshalBytes(src []byte) error {
	if len(src) < SizeofGohfiCreateCQ {
		return shortBuffer("gohfi_create_cq", len(src), SizeofGohfiCreateCQ)
	}
	r.Cqe = le.Uint32(src[0:])
	r.Handle = le.Uint32(src[4:])
	r.UserHandle = le.Uint64(src[8:])
	return nil
}

// SizeBytes implements Marshallable.
func (*GohfiCreateQP) SizeBytes() int { return SizeofGohfiCreateQP }

// MarshalBytes implements Marshallable.
func (r *GohfiCreateQP) MarshalBytes(dst []byte) {
	_ = dst[SizeofGohfiCreateQP-1]
	le.PutUint32(dst[0:], r.QPType)
	le.PutUint32(dst[4:], r.SendCQ)
	le.PutUint32(dst[8:], r.RecvCQ)
	le.PutUint32(dst[12:], r.MaxSendWR)
	le.PutUint32(dst[16:], r.MaxRecvWR)
	le.PutUint32(dst[20:], r.MaxSendSge)
	le.PutUint32(dst[24:], r.MaxRecvSge)
	le.PutUint32(dst[28:], r.SqSigAll)
	le.PutUint32(dst[32:], r.Handle)
	le.PutUint32(dst[36:], r.QPNum)
}

// UnmarshalBytes implements Marshallable.
func (r *GohfiCreateQP) UnmarshalBytes(src []byte) error {
	if len(src) < SizeofGohfiCreateQP {
		return shortBuffer("gohfi_create_qp", len(src), SizeofGohfiCreateQP)
	}
	r.QPType = le.Uint32(src[0:])
	r.SendCQ = le.Uint32(src[4:])
	r.RecvCQ = le.Uint32(src[8:])
	r.MaxSendWR = le.Uint32(src[12:])
	r.MaxRecvWR = le.Uint32(src[16:])
	r.MaxSendSge = le.Uint32(src[20:])
	r.MaxRecvSge = le.Uint32(src[24:])
	r.SqSigAll = le.Uint32(src[28:])
	r.Handle = le.Uint32(src[32:])
	r.QPNum = le.Uint32(src[36:])
	return nil
}

// SizeBytes implements Marshallable.
func (*GohfiModifyQP) SizeBytes() int { return SizeofGohfiModifyQP }

// MarshalBytes implements Marshallable.
func (r *GohfiModifyQP) MarshalBytes(dst []byte) {
	_ = dst[SizeofGohfiModifyQP-1]
	le.PutUint32(dst[0:], r.Handle)
	le.PutUint32(dst[4:], r.QPState)
	le.PutUint32(dst[8:], r.DestQPNum)
	le.PutUint32(dst[12:], r.DestPort)
	le.PutUint32(dst[16:], r.SqPsn)
	le.PutUint32(dst[20:], r.RqPsn)
	le.PutUint32(dst[24:], r.AccessFlags)
	le.PutUint32(dst[28:], r.Reserved)
}

// UnmarshalBytes implements Marshallable.
func (r *GohfiModifyQP) UnmarshalBytes(src []byte) error {
	if len(src) < SizeofGohfiModifyQP {
		return shortBuffer("gohfi_modify_qp", len(src), SizeofGohfiModifyQP)
	}
	r.Handle = le.Uint32(src[0:])
	r.QPState = le.Uint32(src[4:])
	r.DestQPNum = le.Uint32(src[8:])
	r.DestPort = le.Uint32(src[12:])
	r.SqPsn = le.Uint32(src[16:])
	r.RqPsn = le.Uint32(src[20:])
	r.AccessFlags = le.Uint32(src[24:])
	r.Reserved = le.Uint32(src[28:])
	return nil
}

// SizeBytes implements Marshallable.
func (*GohfiSge) SizeBytes() int { return SizeofGohfiSge }

// MarshalBytes implements Marshallable.
func (r *GohfiSge) MarshalBytes(dst []byte) {
	_ = dst[SizeofGohfiSge-1]
	le.PutUint64(dst[0:], r.Addr)
	le.PutUint32(dst[8:], r.Length)
	le.PutUint32(dst[12:], r.Lkey)
}

// UnmarshalBytes implements Marshallable.
func (r *GohfiSge) UnmarshalBytes(src []byte) error {
	if len(src) < SizeofGohfiSge {
		return shortBuffer("gohfi_sge", len(src), SizeofGohfiSge)
	}
	r.Addr = le.Uint64(src[0:])
	r.Length = le.Uint32(src[8:])
	r.Lkey = le.Uint32(src[12:])
	return nil
}

// SizeBytes implements Marshallable.
func (*GohfiSendWR) SizeBytes() int { return SizeofGohfiSendWR }

// MarshalBytes implements Marshallable.
func (r *GohfiSendWR) MarshalBytes(dst []byte) {
	_ = dst[SizeofGohfiSendWR-1]
	le.PutUint64(dst[0:], r.WrID)
	le.PutUint32(dst[8:], r.Opcode)
	le.PutUint32(dst[12:], r.SendFlags)
	le.PutUint32(dst[16:], r.NumSge)
	le.PutUint32(dst[20:], r.InvalidateRkey)
	le.PutUint64(dst[24:], r.SgList)
	le.PutUint64(dst[32:], r.RemoteAddr)
	le.PutUint32(dst[40:], r.Rkey)
	le.PutUint32(dst[44:], r.ImmData)
	le.PutUint64(dst[48:], r.FrIova)
	le.PutUint64(dst[56:], r.FrLength)
	le.PutUint64(dst[64:], r.FrPageList)
	le.PutUint32(dst[72:], r.FrPageListLen)
	le.PutUint32(dst[76:], r.FrPageShift)
	le.PutUint32(dst[80:], r.FrMRHandle)
	le.PutUint32(dst[84:], r.FrKey)
	le.PutUint32(dst[88:], r.FrAccess)
	le.PutUint32(dst[92:], r.RemoteQPN)
	le.PutUint32(dst[96:], r.RemoteQkey)
	le.PutUint32(dst[100:], r.RemotePort)
	le.PutUint64(dst[104:], r.CompareAdd)
	le.PutUint64(dst[112:], r.Swap)
}

// UnmarshalBytes implements Marshallable.
func (r *GohfiSendWR) UnmarshalBytes(src []byte) error {
	if len(src) < SizeofGohfiSendWR {
		return shortBuffer("gohfi_send_wr", len(src), SizeofGohfiSendWR)
	}
	r.WrID = le.Uint64(src[0:])
	r.Opcode = le.Uint32(src[8:])
	r.SendFlags = le.Uint32(src[12:])
	r.NumSge = le.Uint32(src[16:])
	r.InvalidateRkey = le.Uint32(src[20:])
	r.SgList = le.Uint64(src[24:])
	r.RemoteAddr = le.Uint64(src[32:])
	r.Rkey = le.Uint32(src[40:])
	r.ImmData = le.Uint32(src[44:])
	r.FrIova = le.Uint64(src[48:])
	r.FrLength = le.Uint64(src[56:])
	r.FrPageList = le.Uint64(src[64:])
	r.FrPageListLen = le.Uint32(src[72:])
	r.FrPageShift = le.Uint32(src[76:])
	r.FrMRHandle = le.Uint32(src[80:])
	r.FrKey = le.Uint32(src[84:])
	r.FrAccess = le.Uint32(src[88:])
	r.RemoteQPN = le.Uint32(src[92:])
	r.RemoteQkey = le.Uint32(src[96:])
	r.RemotePort = le.Uint32(src[100:])
	r.CompareAdd = le.Uint64(src[104:])
	r.Swap = le.Uint64(src[112:])
	return nil
}

// SizeBytes implements Marshallable.
func (*GohfiRecvWR) SizeBytes() int { return SizeofGohfiRecvWR }

// MarshalBytes implements Marshallable.
func (r *GohfiRecvWR) MarshalBytes(dst []byte) {
	_ = dst[SizeofGohfiRecvWR-1]
	le.PutUint64(dst[0:], r.WrID)
	le.PutUint32(dst[8:], r.NumSge)
	le.PutUint32(dst[12:], r.Reserved)
	le.PutUint64(dst[16:], r.SgList)
}

// UnmarshalBytes implements Marshallable.
func (r *GohfiRecvWR) UnmarshalBytes(src []byte) error {
	if len(src) < SizeofGohfiRecvWR {
		return shortBuffer("gohfi_recv_wr", len(src), SizeofGohfiRecvWR)
	}
	r.WrID = le.Uint64(src[0:])
	r.NumSge = le.Uint32(src[8:])
	r.Reserved = le.Uint32(src[12:])
	r.SgList = le.Uint64(src[16:])
	return nil
}

// SizeBytes implements Marshallable.
func (*GohfiPostSend) SizeBytes() int { return SizeofGohfiPostSend }

// MarshalBytes implements Marshallable.
func (r *GohfiPostSend) MarshalBytes(dst []byte) {
	_ = dst[SizeofGohfiPostSend-1]
	le.PutUint32(dst[0:], r.QPHandle)
	le.PutUint32(dst[4:], r.WrCount)
	le.PutUint64(dst[8:], r.WrList)
	le.PutUint32(dst[16:], r.BadWr)
	le.PutUint32(dst[20:], r.WqeSize)
}

// UnmarshalBytes implements Marshallable.
func (r *GohfiPostSend) UnmarshalBytes(src []byte) error {
	if len(src) < SizeofGohfiPostSend {
		return shortBuffer("gohfi_post_send", len(src), SizeofGohfiPostSend)
	}
	r.QPHandle = le.Uint32(src[0:])
	r.WrCount = le.Uint32(src[4:])
	r.WrList = le.Uint64(src[8:])
	r.BadWr = le.Uint32(src[16:])
	r.WqeSize = le.Uint32(src[20:])
	return nil
}

// SizeBytes implements Marshallable.
func (*GohfiPostRecv) SizeBytes() int { return SizeofGohfiPostRecv }

// MarshalBytes implements Marshallable.
func (r *GohfiPostRecv) MarshalBytes(dst []byte) {
	_ = dst[SizeofGohfiPostRecv-1]
	le.PutUint32(dst[0:], r.QPHandle)
	le.PutUint32(dst[4:], r.WrCount)
	le.PutUint64(dst[8:], r.WrList)
	le.PutUint32(dst[16:], r.BadWr)
	le.PutUint32(dst[20:], r.WqeSize)
}

// UnmarshalBytes implements Marshallable.
func (r *GohfiPostRecv) UnmarshalBytes(src []byte) error {
	if len(src) < SizeofGohfiPostRecv {
		return shortBuffer("gohfi_post_recv", len(src), SizeofGohfiPostRecv)
	}
	r.QPHandle = le.Uint32(src[0:])
	r.WrCount = le.Uint32(src[4:])
	r.WrList = le.Uint64(src[8:])
	r.BadWr = le.Uint32(src[16:])
	r.WqeSize = le.Uint32(src[20:])
	return nil
}

// SizeBytes implements Marshallable.
func (*GohfiWC) SizeBytes() int { return SizeofGohfiWC }

// MarshalBytes implements Marshallable.
func (r *GohfiWC) MarshalBytes(dst []byte) {
	_ = dst[SizeofGohfiWC-1]
	le.PutUint64(dst[0:], r.WrID)
	le.PutUint32(dst[8:], r.Status)
	le.PutUint32(dst[12:], r.Opcode)
	le.PutUint32(dst[16:], r.VendorErr)
	le.PutUint32(dst[20:], r.ByteLen)
	le.PutUint32(dst[24:], r.InvalidatedRkey)
	le.PutUint32(dst[28:], r.ImmData)
	le.PutUint32(dst[32:], r.QPNum)
	le.PutUint32(dst[36:], r.SrcQP)
	le.PutUint32(dst[40:], r.WcFlags)
	le.PutUint32(dst[44:], r.Reserved)
}

// UnmarshalBytes implements Marshallable.
func (r *GohfiWC) UnmarshalBytes(src []byte) error {
	if len(src) < SizeofGohfiWC {
		return shortBuffer("gohfi_wc", len(src), SizeofGohfiWC)
	}
	r.WrID = le.Uint64(src[0:])
	r.Status = le.Uint32(src[8:])
	r.Opcode = le.Uint32(src[12:])
	r.VendorErr = le.Uint32(src[16:])
	r.ByteLen = le.Uint32(src[20:])
	r.InvalidatedRkey = le.Uint32(src[24:])
	r.ImmData = le.Uint32(src[28:])
	r.QPNum = le.Uint32(src[32:])
	r.SrcQP = le.Uint32(src[36:])
	r.WcFlags = le.Uint32(src[40:])
	r.Reserved = le.Uint32(src[44:])
	return nil
}

// SizeBytes implements Marshallable.
func (*GohfiPollCQ) SizeBytes() int { return SizeofGohfiPollCQ }

// MarshalBytes implements Marshallable.
func (r *GohfiPollCQ) MarshalBytes(dst []byte) {
	_ = dst[SizeofGohfiPollCQ-1]
	le.PutUint32(dst[0:], r.CQHandle)
	le.PutUint32(dst[4:], r.Ne)
	le.PutUint64(dst[8:], r.WcList)
	le.PutUint32(dst[16:], r.WcSize)
	le.PutUint32(dst[20:], r.Reserved)
}

// UnmarshalBytes implements Marshallable.
func (r *GohfiPollCQ) UnmarshalBytes(src []byte) error {
	if len(src) < SizeofGohfiPollCQ {
		return shortBuffer("gohfi_poll_cq", len(src), SizeofGohfiPollCQ)
	}
	r.CQHandle = le.Uint32(src[0:])
	r.Ne = le.Uint32(src[4:])
	r.WcList = le.Uint64(src[8:])
	r.WcSize = le.Uint32(src[16:])
	r.Reserved = le.Uint32(src[20:])
	return nil
}

// SizeBytes implements Marshallable.
func (*GohfiMRStats) SizeBytes() int { return SizeofGohfiMRStats }

// MarshalBytes implements Marshallable.
func (r *GohfiMRStats) MarshalBytes(dst []byte) {
	_ = dst[SizeofGohfiMRStats-1]
	le.PutUint32(dst[0:], r.Handle)
	le.PutUint32(dst[4:], r.Reserved)
	le.PutUint64(dst[8:], r.PageFaults)
	le.PutUint64(dst[16:], r.PageFaultsHandled)
	le.PutUint64(dst[24:], r.PageInvalidations)
	le.PutUint64(dst[32:], r.PageInvalidationsHandled)
	le.PutUint64(dst[40:], r.PagePrefetch)
	le.PutUint64(dst[48:], r.PagesPinned)
}

// UnmarshalBytes implements Marshallable.
func (r *GohfiMRStats) UnmarshalBytes(src []byte) error {
	if len(src) < SizeofGohfiMRStats {
		return shortBuffer("gohfi_mr_stats", len(src), SizeofGohfiMRStats)
	}
	r.Handle = le.Uint32(src[0:])
	r.Reserved = le.Uint32(src[4:])
	r.PageFaults = le.Uint64(src[8:])
	r.PageFaultsHandled = le.Uint64(src[16:])
	r.PageInvalidations = le.Uint64(src[24:])
	r.PageInvalidationsHandled = le.Uint64(src[32:])
	r.PagePrefetch = le.Uint64(src[40:])
	r.PagesPinned = le.Uint64(src[48:])
	return nil
}

// SizeBytes implements Marshallable.
func (*GohfiDriverStats) SizeBytes() int { return SizeofGohfiDriverStats }

// MarshalBytes implements Marshallable.
func (r *GohfiDriverStats) MarshalBytes(dst []byte) {
	_ = dst[SizeofGohfiDriverStats-1]
	le.PutUint64(dst[0:], r.TidsProgrammed)
	le.PutUint64(dst[8:], r.TidsFreed)
	le.PutUint64(dst[16:], r.TidInvalidations)
	le.PutUint64(dst[24:], r.TidInvalReads)
	le.PutUint64(dst[32:], r.PagesPinned)
	le.PutUint64(dst[40:], r.PagesUnpinned)
	le.PutUint64(dst[48:], r.OdpPageFaults)
	le.PutUint64(dst[56:], r.OdpInvalidations)
	le.PutUint64(dst[64:], r.TlbFlushes)
	le.PutUint64(dst[72:], r.FastRegs)
	le.PutUint64(dst[80:], r.LocalInvs)
	le.PutUint64(dst[88:], r.OdpFaultsHandled)
	le.PutUint64(dst[96:], r.OdpInvalsHandled)
	le.PutUint64(dst[104:], r.OdpPagePrefetch)
	for i, v := range r.Reserved {
		le.PutUint64(dst[112+8*i:], v)
	}
}

// UnmarshalBytes implements Marshallable.
func (r *GohfiDriverStats) UnmarshalBytes(src []byte) error {
	if len(src) < SizeofGohfiDriverStats {
		return shortBuffer("gohfi_driver_stats", len(src), SizeofGohfiDriverStats)
	}
	r.TidsProgrammed = le.Uint64(src[0:])
	r.TidsFreed = le.Uint64(src[8:])
	r.TidInvalidations = le.Uint64(src[16:])
	r.TidInvalReads = le.Uint64(src[24:])
	r.PagesPinned = le.Uint64(src[32:])
	r.PagesUnpinned = le.Uint64(src[40:])
	r.OdpPageFaults = le.Uint64(src[48:])
	r.OdpInvalidations = le.Uint64(src[56:])
	r.TlbFlushes = le.Uint64(src[64:])
	r.FastRegs = le.Uint64(src[72:])
	r.LocalInvs = le.Uint64(src[80:])
	r.OdpFaultsHandled = le.Uint64(src[88:])
	r.OdpInvalsHandled = le.Uint64(src[96:])
	r.OdpPagePrefetch = le.Uint64(src[104:])
	for i := range r.Reserved {
		r.Reserved[i] = le.Uint64(src[112+8*i:])
	}
	return nil
}
