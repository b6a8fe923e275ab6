package hfisim

import (
	"net/netip"
	"testing"

	"github.com/gohfi/gohfi/uapi"
)

// BenchmarkNetUDP moves 1 MiB RDMA WRITEs and READs between two devices
// of this process on real sockets of 127.0.0.1 (the raw receive path as
// root), one message at a time: the port's packet I/O per byte, the
// kernel's loopback included.
func BenchmarkNetUDP(b *testing.B) {
	for _, op := range []uint8{uapi.GOHFI_WR_RDMA_WRITE, uapi.GOHFI_WR_RDMA_READ} {
		name := map[uint8]string{uapi.GOHFI_WR_RDMA_WRITE: "WRITE", uapi.GOHFI_WR_RDMA_READ: "READ"}[op]
		b.Run(name, func(b *testing.B) {
			lo := netip.MustParseAddrPort("127.0.0.1:0")
			x, y := newVerbsPort(b, lo, nil), newVerbsPort(b, lo, nil)
			cx, cy := x.newCQ(0, 256), y.newCQ(0, 256)
			qx, qy := x.newQP(0, 1, remoteAll, cx, cx), y.newQP(0, 1, remoteAll, cy, cy)
			const size = 1 << 20
			mx := x.regMR(1, 1, allAccess, 0x7f00_0000_0000, size)
			my := y.regMR(1, 1, allAccess, 0x7e00_0000_0000, size)
			netConnect(b, x, qx, y.d.PortAddr(), qy.qpn(), testNetAttr)
			netConnect(b, y, qy, x.d.PortAddr(), qx.qpn(), testNetAttr)
			b.SetBytes(size)
			b.ResetTimer()
			for i := range b.N {
				w := sendWQE(uint64(i), op, sge(mx, 0, size))
				w.RemoteAddr, w.Rkey = my.va, my.key()
				x.postSend(qx, w)
				x.expectCQE(cx, uint64(i), uapi.GOHFI_WC_SUCCESS, wcOpcode(op), 0)
			}
		})
	}
}
