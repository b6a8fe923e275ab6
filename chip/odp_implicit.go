package chip

// Implicit on-demand paging (RegCapFlags CapImplicitODP): one MR of the
// whole address space, as rdma-core's ibv_reg_mr(pd, NULL, SIZE_MAX,
// IBV_ACCESS_ON_DEMAND), in the shape of mlx5's implicit MR (a KSM mkey
// whose entries name child MRs of 1 GiB). docs/hfisim.md, "Implicit ODP",
// is the datasheet of this file.
//
// An MPT entry of type MPTTypeImplicit has IOVA 0 and length 2^64-1; its
// MTTFirst names a run of ImplicitDirEntries MTT entries, the child
// directory: entry c describes the 1 GiB child [c << ImplicitChildShift,
// (c+1) << ImplicitChildShift). A directory entry is MTTPresent |
// child's first MTT entry << ImplicitDirMTTShift, or 0 (no child); a child
// is a run of ImplicitChildPages MTT entries of 4 KiB pages, translated as
// an MPTTypeODP region's. A directory entry that is not present, or a child
// page that is not present (or read-only for a write), raises a page fault
// with the implicit MR's key and the address, as for MPTTypeODP (chip/odp.go).
// Directory entries are cached in the device TLB as the MTT entries they
// are, and leave it through the TLB-invalidate command.
//
// The directory covers the 47-bit user address space of x86-64 (four-level
// paging); an access at or above 2^47 fails with VendorErrBounds.
const (
	CapImplicitODP = 1 << 6

	// MPTTypeImplicit is the MPT entry type of an implicit ODP region,
	// beside chip/verbs.go's MPTTypePinned, MPTTypeODP and MPTTypeFastReg.
	MPTTypeImplicit = 3 << MPTTypeShift

	ImplicitChildShift  = 30
	ImplicitChildSize   = 1 << ImplicitChildShift
	ImplicitChildPages  = ImplicitChildSize >> 12
	ImplicitVABits      = 47
	ImplicitDirEntries  = 1 << (ImplicitVABits - ImplicitChildShift)
	ImplicitDirMTTShift = 32

	// ImplicitLength is the length of an implicit MR (and its MPT entry).
	ImplicitLength = ^uint64(0)
)

// ImplicitDirEntry is the directory entry of a child whose MTT run starts
// at entry first.
func ImplicitDirEntry(first uint32) uint64 {
	return uint64(first)<<ImplicitDirMTTShift | MTTPresent
}

// ImplicitChildMTT is the first MTT entry of the child a present directory
// entry names.
func ImplicitChildMTT(dirEntry uint64) uint32 { return uint32(dirEntry >> ImplicitDirMTTShift) }
