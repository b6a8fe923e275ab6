// Package ibwire is the InfiniBand transport wire format as RoCEv2 carries
// it: the base and extended transport headers of the IB specification
// (vol. 1 ch. 9: BTH, RDETH, DETH, RETH, AtomicETH, AETH, AtomicAckETH,
// ImmDt, IETH, and FETH), the opcode table that says which of them follow
// each opcode, whole IB packets (headers, payload, pad, ICRC), PSN
// arithmetic, and the RoCEv2 framing of Annex A17 (IPv4 or IPv6, UDP
// destination port 4791, the invariant CRC). hfisim, the tools and the
// tests share it, as they share chip/ for the register map.
//
// Layouts and the ICRC follow the Linux soft-RoCE driver (rdma_rxe) and
// Wireshark's InfiniBand dissector; the tests check the ICRC against an
// independent implementation, against packets captured from hardware,
// and against tshark's decoding.
//
// Encoding writes into a caller's buffer and allocates nothing. Decoding
// checks every length and field of a packet that may be hostile and
// returns an *Error that names the field and wraps one of the Err*
// reasons; it never panics and never copies the payload (Packet.Payload
// aliases the input).
package ibwire
