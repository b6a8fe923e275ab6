package driver_test

import (
	"errors"
	"testing"

	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// TestSetPKey: SET_PKEY takes only keys of the port's table, never a
// management key, as hfi1's set_ctxt_pkey; CTXT_INFO says keys are checked.
func TestSetPKey(t *testing.T) {
	a := openDev(t, 2)
	f := openFile(t, a)
	assign(t, f)
	ci, err := hfiuser.CtxtInfo(f)
	if err != nil {
		t.Fatal(err)
	}
	if ci.RuntimeFlags&uapi.HFI1_CAP_PKEY_CHECK == 0 {
		t.Fatalf("runtime flags %#x lack HFI1_CAP_PKEY_CHECK", ci.RuntimeFlags)
	}
	for _, c := range []struct {
		pkey uint16
		want error
	}{
		{driver.DefaultPKey, nil},
		{0x7fff, unix.EINVAL},
		{0xffff, unix.EINVAL},
		{0x8002, unix.ENOENT},
		{0, unix.ENOENT},
	} {
		err := hfiuser.IoctlScalar(f, uapi.HFI1_IOCTL_SET_PKEY, uint64(c.pkey))
		if c.want == nil && err != nil || c.want != nil && !errors.Is(err, c.want) {
			t.Errorf("SET_PKEY %#x: %v, want %v", c.pkey, err, c.want)
		}
	}
}
