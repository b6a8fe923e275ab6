package driver_test

import (
	"errors"
	"testing"

	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// TestTIDErrnoTable: every failure of the TID ioctls carries the errno of
// docs/abi.md, and none leaves a page pinned or a TID programmed. ENOMEM is
// only the memlock limit (TestMemlockLimit): a TID cache evicts on it, so a
// bad address must never look like it.
func TestTIDErrnoTable(t *testing.T) {
	requireRoot(t)
	a := openDev(t, 2)
	f := openFile(t, a)
	assign(t, f)

	gone := allocBuf(t, 64<<10, false)
	goneAddr := gone.Addr()
	if err := gone.Unmap(); err != nil {
		t.Fatal(err)
	}
	noAccess, err := unix.Mmap(-1, 0, 64<<10, unix.PROT_NONE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(noAccess)
	goHeap := make([]byte, 1<<20)
	heapAddr := (uintptrOf(goHeap) + 4095) &^ 4095
	good := allocBuf(t, 64<<10, false)
	list := make([]uint32, 64)

	update := func(vaddr uintptr, length int, tidlist uint64) error {
		ti := uapi.Hfi1TidInfo{Vaddr: uint64(vaddr), Length: uint32(length), Tidlist: tidlist, Tidcnt: uint32(len(list))}
		return hfiuser.Ioctl(f, uapi.HFI1_IOCTL_TID_UPDATE, &ti)
	}
	listAddr := uint64(uintptrOfU32(list))
	for _, c := range []struct {
		name string
		err  error
		want unix.Errno
	}{
		{"unmapped", update(goneAddr, 64<<10, listAddr), unix.EFAULT},
		{"PROT_NONE", update(uintptrOf(noAccess), 64<<10, listAddr), unix.EFAULT},
		{"kernel half", update(0xffff_8000_0000_0000, 64<<10, listAddr), unix.EFAULT},
		{"non-canonical", update(0x0001_0000_0000_0000, 64<<10, listAddr), unix.EFAULT},
		{"crosses the top of user space", update(1<<47-4096, 64<<10, listAddr), unix.EFAULT},
		{"Go heap", update(heapAddr, 4096, listAddr), unix.EFAULT},
		{"unaligned", update(good.Addr()+8, 4096, listAddr), unix.EINVAL},
		{"zero length", update(good.Addr(), 0, listAddr), unix.EINVAL},
		{"more pages than entries", update(good.Addr(), 4096*4096, listAddr), unix.EINVAL},
		{"null tidlist", update(good.Addr(), 4096, 0), unix.EFAULT},
		{"unmapped tidlist", update(good.Addr(), 4096, uint64(goneAddr)), unix.EFAULT},
		{"bad argument pointer", func() error {
			_, err := f.Ioctl(uapi.HFI1_IOCTL_TID_UPDATE, driver.UserAddr(uint64(goneAddr)))
			return err
		}(), unix.EFAULT},
		{"TID_FREE of no TIDs", func() error {
			ti := uapi.Hfi1TidInfo{Tidlist: listAddr}
			return hfiuser.Ioctl(f, uapi.HFI1_IOCTL_TID_FREE, &ti)
		}(), unix.EINVAL},
		{"TID_FREE of a TID never programmed", func() error {
			_, err := hfiuser.TIDFree(f, []uint32{uapi.ExpTidSet(uapi.EXP_TID_CTRL, 1) | uapi.ExpTidSet(uapi.EXP_TID_LEN, 1)})
			return err
		}(), unix.EINVAL},
		{"TID_FREE with an unmapped tidlist", func() error {
			ti := uapi.Hfi1TidInfo{Tidlist: uint64(goneAddr), Tidcnt: 1}
			return hfiuser.Ioctl(f, uapi.HFI1_IOCTL_TID_FREE, &ti)
		}(), unix.EFAULT},
	} {
		var errno unix.Errno
		if !errors.As(c.err, &errno) || errno != c.want {
			t.Errorf("%s: %v, want %v", c.name, c.err, c.want)
		}
	}
	st := a.Device.Stats()
	if st.PagesPinned != st.PagesUnpinned || st.TidsProgrammed != st.TidsFreed {
		t.Fatalf("failed calls left state behind: %+v", st)
	}
}
