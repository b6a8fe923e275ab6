package driver

import (
	"fmt"
	"net/netip"
	"sync"

	"github.com/gohfi/gohfi/chip"
	"golang.org/x/sys/unix"
)

// The network port (chip/net.go, docs/fabric.md): the device's own
// address, shown as a GID the way `rdma link` and ibv_devinfo show one,
// the peer table that MODIFY_QP's dest_port indexes, and the transport
// attributes of a QP connected through the port.

// NetAttr are the transport attributes of a QP connected to a peer
// (ib_qp_attr's timeout, retry_cnt, rnr_retry and min_rnr_timer):
// retransmission after 4.096 us * 2^Timeout (0: never), RetryCnt
// retransmissions without progress before GOHFI_WC_RETRY_EXC_ERR,
// RnrRetry RNR retries (7: without limit) before GOHFI_WC_RNR_RETRY_EXC_ERR,
// and the RNR timer code the QP's RNR NAKs ask the peer to wait.
type NetAttr struct {
	Timeout     uint8 // 0..31
	RetryCnt    uint8 // 0..7
	RnrRetry    uint8 // 0..7
	MinRnrTimer uint8 // 0..31
}

// DefaultNetAttr are the attributes of a QP whose MODIFY_QP gives none:
// 67 ms, 7 retries, RNR retries without limit, 640 us (rdma-core's usual
// choices, and the device's reset values).
var DefaultNetAttr = NetAttr{Timeout: 14, RetryCnt: 7, RnrRetry: 7, MinRnrTimer: 12}

func (a NetAttr) valid() bool {
	return a.Timeout <= chip.QPNetTimeoutMask && a.RetryCnt <= 7 && a.RnrRetry <= 7 && a.MinRnrTimer <= 0x1f
}

// Peer is one entry of the peer table.
type Peer struct {
	Index int
	Addr  netip.AddrPort
}

// netMu orders the driver's writes of the peer table: an entry is three
// registers.
var netMu sync.Mutex

func (d *Device) hasPort() error {
	if !d.HardwareHasCap(chip.CapNet) {
		return errnoErr("the device has no network port", unix.EOPNOTSUPP)
	}
	return nil
}

// PortAddr is the address of the device's network port; its GID is the
// address as IPv6 (IPv4 as ::ffff:a.b.c.d). EOPNOTSUPP without a port.
func (d *Device) PortAddr() (netip.AddrPort, error) {
	if err := d.hasPort(); err != nil {
		return netip.AddrPort{}, err
	}
	var v [3]uint64
	for i, r := range []uint64{chip.RegNetGIDHi, chip.RegNetGIDLo, chip.RegNetUDPPort} {
		var err error
		if v[i], err = d.readCSR(r); err != nil {
			return netip.AddrPort{}, fmt.Errorf("gohfi: port address: %w", err)
		}
	}
	return netip.AddrPortFrom(chip.GIDAddr(v[0], v[1]), uint16(v[2])), nil
}

// GID is an address as the 16 bytes of a RoCEv2 GID.
func GID(a netip.Addr) [16]byte { return a.As16() }

// NumPeers is the number of peer table entries (1..NumPeers are usable).
func (d *Device) NumPeers() (int, error) {
	if err := d.hasPort(); err != nil {
		return 0, err
	}
	n, err := d.readCSR(chip.RegNetNumPeers)
	if err != nil {
		return 0, fmt.Errorf("gohfi: peer table: %w", err)
	}
	return int(min(n, chip.MaxPeers)), nil
}

// SetPeer makes entry i of the peer table addr (a unicast address of the
// port's family and a nonzero UDP port). QPs already connected through
// the entry keep the address they took at RTR. EINVAL: i outside
// 1..NumPeers, a bad address; EOPNOTSUPP: no port.
func (d *Device) SetPeer(i int, addr netip.AddrPort) error {
	own, err := d.PortAddr()
	if err != nil {
		return err
	}
	n, err := d.NumPeers()
	if err != nil {
		return err
	}
	a := addr.Addr().Unmap()
	switch {
	case i < 1 || i > n:
		return errnoErr(fmt.Sprintf("peer %d: want 1..%d", i, n), unix.EINVAL)
	case !a.IsValid() || a.IsUnspecified() || a.IsMulticast() || addr.Port() == 0:
		return errnoErr(fmt.Sprintf("peer %d: address %v", i, addr), unix.EINVAL)
	case a.Is4() != own.Addr().Is4():
		return errnoErr(fmt.Sprintf("peer %d: %v is not of the port's family (%v)", i, addr, own), unix.EINVAL)
	}
	hi, lo := chip.GIDWords(a)
	netMu.Lock()
	defer netMu.Unlock()
	for _, w := range []struct{ reg, v uint64 }{
		{chip.PeerUDPPort, 0}, {chip.PeerGIDHi, hi}, {chip.PeerGIDLo, lo},
		{chip.PeerUDPPort, uint64(addr.Port()) | chip.PeerValid},
	} {
		if err := d.writeCSR(chip.PeerReg(i, w.reg), w.v); err != nil {
			return fmt.Errorf("gohfi: peer %d: %w", i, err)
		}
	}
	return nil
}

// DelPeer makes entry i of the peer table invalid: QPs no longer reach RTR
// through it (those connected keep their address).
func (d *Device) DelPeer(i int) error {
	n, err := d.NumPeers()
	if err != nil {
		return err
	}
	if i < 1 || i > n {
		return errnoErr(fmt.Sprintf("peer %d: want 1..%d", i, n), unix.EINVAL)
	}
	netMu.Lock()
	defer netMu.Unlock()
	if err := d.writeCSR(chip.PeerReg(i, chip.PeerUDPPort), 0); err != nil {
		return fmt.Errorf("gohfi: peer %d: %w", i, err)
	}
	return nil
}

// Peers lists the valid entries of the peer table.
func (d *Device) Peers() ([]Peer, error) {
	n, err := d.NumPeers()
	if err != nil {
		return nil, err
	}
	var out []Peer
	for i := 1; i <= n; i++ {
		port, err := d.readCSR(chip.PeerReg(i, chip.PeerUDPPort))
		if err != nil {
			return nil, fmt.Errorf("gohfi: peer %d: %w", i, err)
		}
		if port&chip.PeerValid == 0 {
			continue
		}
		hi, err := d.readCSR(chip.PeerReg(i, chip.PeerGIDHi))
		if err != nil {
			return nil, fmt.Errorf("gohfi: peer %d: %w", i, err)
		}
		lo, err := d.readCSR(chip.PeerReg(i, chip.PeerGIDLo))
		if err != nil {
			return nil, fmt.Errorf("gohfi: peer %d: %w", i, err)
		}
		out = append(out, Peer{Index: i, Addr: netip.AddrPortFrom(chip.GIDAddr(hi, lo), uint16(port))})
	}
	return out, nil
}

// peerValid reports whether entry i is a valid peer (for MODIFY_QP).
func (d *Device) peerValid(i uint32) (bool, error) {
	n, err := d.NumPeers()
	if err != nil || i < 1 || int(i) > n {
		return false, err
	}
	port, err := d.readCSR(chip.PeerReg(int(i), chip.PeerUDPPort))
	return port&chip.PeerValid != 0, err
}

// NetCounter is one of the port's counters.
type NetCounter struct {
	Name  string
	Value uint64
}

// NetCounters reads the port's counters (chip.NetCounterNames): packets,
// drops per reason, retransmissions, NAKs.
func (d *Device) NetCounters() ([]NetCounter, error) {
	if err := d.hasPort(); err != nil {
		return nil, err
	}
	out := make([]NetCounter, chip.NetCntNum)
	for i := range out {
		v, err := d.readCSR(chip.RegNetCnt(i))
		if err != nil {
			return nil, fmt.Errorf("gohfi: network counters: %w", err)
		}
		out[i] = NetCounter{Name: chip.NetCounterNames[i], Value: v}
	}
	return out, nil
}

// Retransmits is how many packets the QP sent again (QPNetRetrans) since
// it left RESET.
func (qp *QP) Retransmits() (uint64, error) {
	return qp.pd.d.readCSR(chip.QPNetReg(qp.idx, chip.QPNetRetrans))
}

// checkRemote checks MODIFY_QP's remote end at RTR towards peer port: a
// device with a network port, a valid entry, attributes in range.
func (qp *QP) checkRemote(a *QPAttr) error {
	d := qp.pd.d
	if err := d.hasPort(); err != nil {
		return errnoErr(fmt.Sprintf("MODIFY_QP: destination port %d: only this device (0) is reachable", a.DestPort), unix.EINVAL)
	}
	ok, err := d.peerValid(a.DestPort)
	if err != nil {
		return fmt.Errorf("gohfi: MODIFY_QP: %w", err)
	}
	if !ok {
		return errnoErr(fmt.Sprintf("MODIFY_QP: destination port %d: no such peer", a.DestPort), unix.EINVAL)
	}
	if a.DestQPNum < chip.QPNBase || a.DestQPNum > 1<<24-1 {
		return errnoErr(fmt.Sprintf("MODIFY_QP: destination QP %d", a.DestQPNum), unix.EINVAL)
	}
	return nil
}

// netAttrValue is the QPNetAttr register of a (nil: DefaultNetAttr).
func netAttrValue(a *NetAttr) (uint64, error) {
	v := DefaultNetAttr
	if a != nil {
		v = *a
	}
	if !v.valid() {
		return 0, errnoErr(fmt.Sprintf("MODIFY_QP: transport attributes %+v", v), unix.EINVAL)
	}
	return chip.QPNetAttrValue(v.Timeout, v.RetryCnt, v.RnrRetry, v.MinRnrTimer), nil
}
