package driver_test

import (
	"bytes"
	"sync"
	"testing"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/hfisim"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/vfio"
	"golang.org/x/sys/unix"
)

// countingDMA records the DMA mappings the driver makes and keeps or hides
// the backend's vfio.AccessServer (hidden, the driver maps as it does over
// kernel VFIO: chunk by chunk).
type countingDMA struct {
	vfio.Device
	mu      sync.Mutex
	maps    int
	unmaps  int
	serving bool
}

func (c *countingDMA) DMAMap(m vfio.DMAMapping) error {
	c.mu.Lock()
	c.maps++
	c.mu.Unlock()
	return c.Device.DMAMap(m)
}

func (c *countingDMA) DMAUnmap(iova, size uint64) error {
	c.mu.Lock()
	c.unmaps++
	c.mu.Unlock()
	return c.Device.DMAUnmap(iova, size)
}

func (c *countingDMA) counts() (int, int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.maps, c.unmaps
}

type servingDMA struct{ *countingDMA }

func (servingDMA) ServesDMAThroughAccess() bool { return true }

// TestODPWindow: over vfio-user an ODP MR is DMA-mapped once, at REG_MR,
// and its faults map nothing more (the saved DMA_MAP round trip); without
// the backend's AccessServer every fault-around chunk is mapped by itself.
// Either way the data lands, an munmap+mmap at the same address is
// followed, and DEREG_MR leaves nothing mapped or pinned.
func TestODPWindow(t *testing.T) {
	requireRoot(t)
	for _, serving := range []bool{true, false} {
		name := map[bool]string{true: "window", false: "per chunk"}[serving]
		t.Run(name, func(t *testing.T) {
			cd := &countingDMA{}
			o := attach.DefaultOptions()
			o.Params.ODPFaultAround = 4096
			cfg := hfisim.DefaultConfig()
			cfg.NumContexts = 2
			a, err := openBehind(t, o, cfg, func(d vfio.Device) vfio.Device {
				cd.Device = d
				if serving {
					return servingDMA{cd}
				}
				return cd
			})
			if err != nil {
				t.Fatal(err)
			}
			l := newODPLoop(t, a)
			const pages = 8
			src, dst := allocBuf(t, 4096, false), allocBuf(t, pages*4096, false)
			ms := l.reg(l.qa.f, src.Addr(), 4096, pinAccess)
			// The first ODP MR of a device starts its event queue (a
			// mapping of its own): count from the second.
			first := l.reg(l.qb.f, src.Addr(), 4096, odpAccess)
			m0, u0 := cd.counts()
			md := l.reg(l.qb.f, dst.Addr(), pages*4096, odpAccess)
			m1, _ := cd.counts()
			want := 0
			if serving {
				want = 1
			}
			if m1-m0 != want {
				t.Fatalf("REG_MR of an ODP MR: %d DMA mappings, want %d", m1-m0, want)
			}
			write := func(round byte) {
				t.Helper()
				for p := 0; p < pages; p++ {
					fill(src.Bytes(), round+byte(p))
					wantOK(t, "WRITE", l.op(uapi.GOHFI_WR_RDMA_WRITE, sg(src.Addr(), 4096, ms), dst.Addr()+uintptr(p*4096), md.Rkey))
					if !bytes.Equal(dst.Bytes()[p*4096:(p+1)*4096], src.Bytes()) {
						t.Fatalf("round %d page %d: data differs", round, p)
					}
				}
			}
			write(1)
			m2, _ := cd.counts()
			if s := l.stats(l.qb.f, md); s.PageFaults < pages {
				t.Fatalf("%d faults for %d pages, fault-around 4 KiB", s.PageFaults, pages)
			}
			want = 0
			if !serving {
				want = pages
			}
			if m2-m1 != want {
				t.Fatalf("%d faults made %d DMA mappings, want %d", pages, m2-m1, want)
			}
			// A new mapping at the same address: the MR follows it.
			if err := mmapFixed(dst.Addr(), pages*4096, unix.PROT_READ|unix.PROT_WRITE); err != nil {
				t.Fatal(err)
			}
			write(100)
			if err := hfiuser.DeregMR(l.qb.f, md.Handle); err != nil {
				t.Fatal(err)
			}
			m3, u3 := cd.counts()
			if m3-m0 != u3-u0 {
				t.Fatalf("after DEREG_MR: %d DMA mappings made, %d unmapped", m3-m0, u3-u0)
			}
			if err := hfiuser.DeregMR(l.qa.f, ms.Handle); err != nil {
				t.Fatal(err)
			}
			if err := hfiuser.DeregMR(l.qb.f, first.Handle); err != nil {
				t.Fatal(err)
			}
			nothingPinned(t, a)
		})
	}
}
