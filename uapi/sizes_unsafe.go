package uapi

import "unsafe"

// Compile-time checks that the Go structs have exactly the C sizes: each
// line fails to build if the two differ (a non-empty array, or a negative
// uintptr constant).
var (
	_ [0]struct{} = [unsafe.Sizeof(Hfi1UserInfo{}) - SizeofHfi1UserInfo]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(Hfi1CtxtInfo{}) - SizeofHfi1CtxtInfo]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(Hfi1TidInfo{}) - SizeofHfi1TidInfo]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(Hfi1BaseInfo{}) - SizeofHfi1BaseInfo]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(GohfiDeviceAttr{}) - SizeofGohfiDeviceAttr]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(GohfiRegMR{}) - SizeofGohfiRegMR]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(GohfiHandle{}) - SizeofGohfiHandle]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(GohfiAdviseMR{}) - SizeofGohfiAdviseMR]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(GohfiAllocMR{}) - SizeofGohfiAllocMR]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(GohfiCreateCQ{}) - SizeofGohfiCreateCQ]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(GohfiCreateQP{}) - SizeofGohfiCreateQP]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(GohfiModifyQP{}) - SizeofGohfiModifyQP]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(GohfiSge{}) - SizeofGohfiSge]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(GohfiSendWR{}) - SizeofGohfiSendWR]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(GohfiRecvWR{}) - SizeofGohfiRecvWR]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(GohfiPostSend{}) - SizeofGohfiPostSend]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(GohfiPostRecv{}) - SizeofGohfiPostRecv]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(GohfiWC{}) - SizeofGohfiWC]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(GohfiPollCQ{}) - SizeofGohfiPollCQ]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(GohfiMRStats{}) - SizeofGohfiMRStats]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(GohfiDriverStats{}) - SizeofGohfiDriverStats]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(GohfiSend{}) - SizeofGohfiSend]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(GohfiRHQEntry{}) - SizeofGohfiRHQEntry]struct{}{}
)
