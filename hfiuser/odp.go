package hfiuser

import (
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/uapi"
)

// AdviseMR gives advice about [addr, addr+length) of the ODP MR lkey
// (ADVISE_MR, ibv_advise_mr with one SGE): GOHFI_ADVISE_MR_ADVICE_* and
// GOHFI_ADVISE_MR_FLAG_FLUSH.
func AdviseMR(f *driver.File, advice, flags, lkey uint32, addr, length uint64) error {
	return Ioctl(f, uapi.GOHFI_IOCTL_ADVISE_MR, &uapi.GohfiAdviseMR{Advice: advice, Flags: flags, Lkey: lkey, Addr: addr, Length: length})
}
