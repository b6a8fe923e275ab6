package chip

import "net/netip"

// The network port (RegCapFlags CapNet): the device speaks RoCEv2 (IB
// transport headers over UDP/IP, ibwire) to peer devices. A QP whose
// QPDest port is not 0 is connected to QPDest's QP number on the peer that
// entry of the peer table names. docs/hfisim.md, "Network port", is the
// datasheet of this file; docs/fabric.md says what the fabric does.

// CapNet is the RegCapFlags bit of the network port.
const CapNet = 1 << 7

// The port's own address and the peer table's size (BAR0, RO). The GID is
// the 16 bytes of an IPv6 address (an IPv4 port as an IPv4-mapped address,
// ::ffff:a.b.c.d, as RoCEv2 GIDs are), most significant byte first:
// RegNetGIDHi holds bytes 0-7, RegNetGIDLo bytes 8-15.
const (
	RegNetGIDHi    = 0x200 // RO: GID bytes 0-7 (big-endian), 0 without a port
	RegNetGIDLo    = 0x208 // RO: GID bytes 8-15
	RegNetUDPPort  = 0x210 // RO: the port's UDP port (0: no port)
	RegNetNumPeers = 0x218 // RO: peer table entries (1..RegNetNumPeers are usable)
	RegNetPMTU     = 0x220 // RO: payload bytes per packet on the wire (an IB MTU)
)

// Network counters (BAR0, RO, cleared by reset): RegNetCnt(i) for i <
// NetCntNum, named by NetCounterNames. Drops count packets the port
// refused, one reason each.
const (
	RegNetCntBase = 0x280

	NetCntRxPkts     = 0  // datagrams received (before any check)
	NetCntTxPkts     = 1  // datagrams sent
	NetCntDropICRC   = 2  // bad ICRC
	NetCntDropHeader = 3  // malformed IB header, unknown or non-RC opcode, wrong P_Key
	NetCntDropLength = 4  // a length that lies: short datagram, payload against PMTU, READ response size
	NetCntDropQP     = 5  // destination QP unknown, not a network QP or not in RTR/RTS
	NetCntDropPeer   = 6  // source address is not the QP's connected peer
	NetCntDropPSN    = 7  // PSN outside the window (or an ACK/response for nothing outstanding)
	NetCntDropFlood  = 8  // receive queue full
	NetCntRetrans    = 9  // request packets sent again (timeout, NAK, go-back-N)
	NetCntTimeouts   = 10 // retransmission timer expiries
	NetCntSeqNAKs    = 11 // PSN sequence error NAKs sent
	NetCntRNRNAKs    = 12 // RNR NAKs sent
	NetCntDupReqs    = 13 // duplicate requests answered (ACK again, READ responses again)
	NetCntAcksSent   = 14 // ACKs sent (coalesced: one per QP per receive batch)
	NetCntErrNAKs    = 15 // error NAKs sent: invalid request, remote access, remote operational
	NetCntRxNAKs     = 16 // NAKs and RNR NAKs received
	NetCntNum        = 17
)

// RegNetCnt returns the BAR0 offset of network counter i.
func RegNetCnt(i int) uint64 { return RegNetCntBase + uint64(i)*8 }

// NetCounterNames names the network counters in register order.
var NetCounterNames = [NetCntNum]string{
	"rx_packets", "tx_packets", "drop_icrc", "drop_header", "drop_length", "drop_qp", "drop_peer",
	"drop_psn", "drop_flood", "retransmits", "timeouts", "seq_naks_sent", "rnr_naks_sent",
	"duplicate_requests", "acks_sent", "error_naks_sent", "naks_received",
}

// The peer table: entry i (1..RegNetNumPeers; 0 is this device) at
// PeerBase + i*PeerStride. The driver writes the GID words, then
// PeerUDPPort with PeerValid; a QP latches its peer's address when it
// moves to RTR, so later writes change only QPs connected after them.
const (
	PeerBase    = 0x400
	PeerStride  = 0x20
	PeerGIDHi   = 0x00 // RW: GID bytes 0-7 (big-endian)
	PeerGIDLo   = 0x08 // RW: GID bytes 8-15
	PeerUDPPort = 0x10 // RW: UDP port (bits 0-15) | PeerValid
	PeerValid   = 1 << 63

	MaxPeers = 32
)

// PeerReg returns the BAR0 offset of register reg of peer entry i.
func PeerReg(i int, reg uint64) uint64 { return PeerBase + uint64(i)*PeerStride + reg }

// Per-QP transport attributes of a network QP (the QP block is full): QP
// n's block at QPNetBase + n*QPNetStride. QPNetAttr is read at every
// transition to RTR and RTS: timeout (bits 0-4: 4.096 us * 2^timeout
// before a retransmission, 0 = never), retry_cnt (bits 8-10), rnr_retry
// (bits 16-18, 7 = without limit) and min_rnr_timer (bits 24-28, the
// IB RNR timer code the responder's RNR NAKs carry), as ib_qp_attr has
// them. QPNetRetrans counts the QP's retransmitted packets.
const (
	QPNetBase    = 0xe000
	QPNetStride  = 0x20
	QPNetAttr    = 0x00 // RW
	QPNetRetrans = 0x08 // RO, cleared at RESET

	QPNetTimeoutMask     = 0x1f
	QPNetRetryShift      = 8
	QPNetRNRRetryShift   = 16
	QPNetMinRNRTimeShift = 24
)

// QPNetReg returns the BAR0 offset of network register reg of QP n.
func QPNetReg(n int, reg uint64) uint64 { return QPNetBase + uint64(n)*QPNetStride + reg }

// QPNetAttrValue packs a network QP's transport attributes.
func QPNetAttrValue(timeout, retryCnt, rnrRetry, minRNRTimer uint8) uint64 {
	return uint64(timeout&QPNetTimeoutMask) | uint64(retryCnt&7)<<QPNetRetryShift |
		uint64(rnrRetry&7)<<QPNetRNRRetryShift | uint64(minRNRTimer&0x1f)<<QPNetMinRNRTimeShift
}

// The network blocks fit where they are put.
var (
	_ [CtxtBase - (PeerBase + (MaxPeers+1)*PeerStride)]struct{}
	_ [PeerBase - (RegNetCntBase + NetCntNum*8)]struct{}
	_ [CSRBarSize - (QPNetBase + MaxQPs*QPNetStride)]struct{}
	_ [QPNetBase - (QPDBBase + MaxQPs*QPDBStride)]struct{}
)

// GIDWords is an address as the two GID words of RegNetGIDHi/Lo and
// PeerGIDHi/Lo (its 16-byte IPv6 form, IPv4 as ::ffff:a.b.c.d).
func GIDWords(a netip.Addr) (hi, lo uint64) {
	b := a.As16()
	for i := range 8 {
		hi = hi<<8 | uint64(b[i])
		lo = lo<<8 | uint64(b[8+i])
	}
	return hi, lo
}

// GIDAddr is the address two GID words hold (IPv4-mapped unmapped).
func GIDAddr(hi, lo uint64) netip.Addr {
	var b [16]byte
	for i := range 8 {
		b[i] = byte(hi >> (56 - 8*i))
		b[8+i] = byte(lo >> (56 - 8*i))
	}
	return netip.AddrFrom16(b).Unmap()
}
