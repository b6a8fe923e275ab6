package ibwire

import "strings"

// Opcode is the BTH opcode byte: a transport in the top three bits and an
// operation in the low five (IB vol. 1 table 35).
type Opcode uint8

// Transport is the top three bits of an opcode.
type Transport uint8

// The transports of the opcode byte. CNP is RoCEv2's congestion
// notification (Annex A17.9.3); 0xC0 and 0xE0 are manufacturer specific.
const (
	TransportRC  Transport = 0x00
	TransportUC  Transport = 0x20
	TransportRD  Transport = 0x40
	TransportUD  Transport = 0x60
	TransportCNP Transport = 0x80
	TransportXRC Transport = 0xA0
)

// Transport returns the opcode's transport bits.
func (op Opcode) Transport() Transport { return Transport(op & 0xE0) }

func (t Transport) String() string {
	switch t {
	case TransportRC:
		return "RC"
	case TransportUC:
		return "UC"
	case TransportRD:
		return "RD"
	case TransportUD:
		return "UD"
	case TransportCNP:
		return "CNP"
	case TransportXRC:
		return "XRC"
	}
	return "vendor"
}

// The operations (low five bits).
const (
	opSendFirst            = 0x00
	opSendMiddle           = 0x01
	opSendLast             = 0x02
	opSendLastImm          = 0x03
	opSendOnly             = 0x04
	opSendOnlyImm          = 0x05
	opWriteFirst           = 0x06
	opWriteMiddle          = 0x07
	opWriteLast            = 0x08
	opWriteLastImm         = 0x09
	opWriteOnly            = 0x0A
	opWriteOnlyImm         = 0x0B
	opReadRequest          = 0x0C
	opReadResponseFirst    = 0x0D
	opReadResponseMiddle   = 0x0E
	opReadResponseLast     = 0x0F
	opReadResponseOnly     = 0x10
	opAcknowledge          = 0x11
	opAtomicAcknowledge    = 0x12
	opCompareSwap          = 0x13
	opFetchAdd             = 0x14
	opResync               = 0x15
	opSendLastInvalidate   = 0x16
	opSendOnlyInvalidate   = 0x17
	opFlush                = 0x1C
	opAtomicWrite          = 0x1D
	opCNP                  = 0x01
	opMask                 = 0x1F
	atomicWritePayloadSize = 8
)

// The opcodes of RC, UC and UD, and RoCEv2's CNP. RD and XRC opcodes are
// in the table too (Opcode(TransportRD)|op); they have no names here
// because gohfi does not speak them.
const (
	RCSendFirst          = Opcode(TransportRC | opSendFirst)
	RCSendMiddle         = Opcode(TransportRC | opSendMiddle)
	RCSendLast           = Opcode(TransportRC | opSendLast)
	RCSendLastImm        = Opcode(TransportRC | opSendLastImm)
	RCSendOnly           = Opcode(TransportRC | opSendOnly)
	RCSendOnlyImm        = Opcode(TransportRC | opSendOnlyImm)
	RCWriteFirst         = Opcode(TransportRC | opWriteFirst)
	RCWriteMiddle        = Opcode(TransportRC | opWriteMiddle)
	RCWriteLast          = Opcode(TransportRC | opWriteLast)
	RCWriteLastImm       = Opcode(TransportRC | opWriteLastImm)
	RCWriteOnly          = Opcode(TransportRC | opWriteOnly)
	RCWriteOnlyImm       = Opcode(TransportRC | opWriteOnlyImm)
	RCReadRequest        = Opcode(TransportRC | opReadRequest)
	RCReadResponseFirst  = Opcode(TransportRC | opReadResponseFirst)
	RCReadResponseMiddle = Opcode(TransportRC | opReadResponseMiddle)
	RCReadResponseLast   = Opcode(TransportRC | opReadResponseLast)
	RCReadResponseOnly   = Opcode(TransportRC | opReadResponseOnly)
	RCAcknowledge        = Opcode(TransportRC | opAcknowledge)
	RCAtomicAcknowledge  = Opcode(TransportRC | opAtomicAcknowledge)
	RCCompareSwap        = Opcode(TransportRC | opCompareSwap)
	RCFetchAdd           = Opcode(TransportRC | opFetchAdd)
	RCSendLastInvalidate = Opcode(TransportRC | opSendLastInvalidate)
	RCSendOnlyInvalidate = Opcode(TransportRC | opSendOnlyInvalidate)
	RCFlush              = Opcode(TransportRC | opFlush)
	RCAtomicWrite        = Opcode(TransportRC | opAtomicWrite)
	UCSendFirst          = Opcode(TransportUC | opSendFirst)
	UCSendMiddle         = Opcode(TransportUC | opSendMiddle)
	UCSendLast           = Opcode(TransportUC | opSendLast)
	UCSendLastImm        = Opcode(TransportUC | opSendLastImm)
	UCSendOnly           = Opcode(TransportUC | opSendOnly)
	UCSendOnlyImm        = Opcode(TransportUC | opSendOnlyImm)
	UCWriteFirst         = Opcode(TransportUC | opWriteFirst)
	UCWriteMiddle        = Opcode(TransportUC | opWriteMiddle)
	UCWriteLast          = Opcode(TransportUC | opWriteLast)
	UCWriteLastImm       = Opcode(TransportUC | opWriteLastImm)
	UCWriteOnly          = Opcode(TransportUC | opWriteOnly)
	UCWriteOnlyImm       = Opcode(TransportUC | opWriteOnlyImm)
	UDSendOnly           = Opcode(TransportUD | opSendOnly)
	UDSendOnlyImm        = Opcode(TransportUD | opSendOnlyImm)
	CNP                  = Opcode(TransportCNP | opCNP)
)

// cnpReservedBytes follow a CNP's BTH (Annex A17.9.3).
const cnpReservedBytes = 16

// Header is one extended transport header; HeaderSet is the ones an opcode
// carries. They follow the BTH in the order of the constants.
type Header uint16

// HeaderSet is a set of extended transport headers.
type HeaderSet uint16

// The extended transport headers, in wire order.
const (
	HdrRDETH        Header = 1 << iota // reliable datagram: EE context
	HdrDETH                            // datagram: Q_Key, source QP
	HdrXRCETH                          // XRC: XRC SRQ number
	HdrFETH                            // FLUSH: selectivity level, placement type
	HdrRETH                            // RDMA: VA, R_Key, DMA length
	HdrAtomicETH                       // atomic: VA, R_Key, swap/add, compare
	HdrAETH                            // acknowledge: syndrome, MSN
	HdrAtomicAckETH                    // atomic acknowledge: original data
	HdrImmDt                           // immediate data
	HdrIETH                            // invalidate: R_Key
	HdrCNPPad                          // CNP: 16 reserved bytes (Annex A17)
	numHeaders      = iota
)

// The header sizes in bytes.
const (
	BTHLen          = 12
	RDETHLen        = 4
	DETHLen         = 8
	XRCETHLen       = 4
	FETHLen         = 4
	RETHLen         = 16
	AtomicETHLen    = 28
	AETHLen         = 4
	AtomicAckETHLen = 8
	ImmDtLen        = 4
	IETHLen         = 4
	ICRCLen         = 4
	// MaxHeaderLen is the longest BTH plus extended headers of any opcode.
	MaxHeaderLen = BTHLen + RDETHLen + DETHLen + AtomicETHLen
	// MaxPayload is the largest IB MTU: no packet carries more.
	MaxPayload = 4096
)

var headerNames = [numHeaders]string{"RDETH", "DETH", "XRCETH", "FETH", "RETH", "AtomicETH", "AETH",
	"AtomicAckETH", "ImmDt", "IETH", "CNPPad"}

var headerLens = [numHeaders]int{RDETHLen, DETHLen, XRCETHLen, FETHLen, RETHLen, AtomicETHLen, AETHLen,
	AtomicAckETHLen, ImmDtLen, IETHLen, cnpReservedBytes}

// Len is the header's size in bytes.
func (h Header) Len() int {
	for i := range numHeaders {
		if h == 1<<i {
			return headerLens[i]
		}
	}
	return 0
}

func (h Header) String() string {
	for i := range numHeaders {
		if h == 1<<i {
			return headerNames[i]
		}
	}
	return "Header(?)"
}

// Has reports whether the set holds h.
func (s HeaderSet) Has(h Header) bool { return s&HeaderSet(h) != 0 }

// Len is the total size of the headers in the set.
func (s HeaderSet) Len() int {
	n := 0
	for i := range numHeaders {
		if s&(1<<i) != 0 {
			n += headerLens[i]
		}
	}
	return n
}

func (s HeaderSet) String() string {
	if s == 0 {
		return "none"
	}
	var parts []string
	for i := range numHeaders {
		if s&(1<<i) != 0 {
			parts = append(parts, headerNames[i])
		}
	}
	return strings.Join(parts, "+")
}

// Payload says what an opcode carries after its headers.
type Payload uint8

const (
	PayloadNone  Payload = iota // no payload, pad count 0
	PayloadData                 // 0 to MaxPayload bytes, padded to 4
	PayloadFixed                // exactly 8 bytes (ATOMIC WRITE)
)

// Position is where a packet sits in its message.
type Position uint8

const (
	PosOnly   Position = iota // the whole message (also requests and acknowledgements)
	PosFirst                  // first of several
	PosMiddle                 // neither first nor last
	PosLast                   // last of several
)

func (p Position) String() string {
	return [...]string{"only", "first", "middle", "last"}[p&3]
}

type opInfo struct {
	name    string
	hdrs    HeaderSet
	hdrLen  uint8 // BTH + extended headers
	payload Payload
	pos     Position
	valid   bool
}

var opTable [256]opInfo

// Valid reports whether the IB tables define op.
func (op Opcode) Valid() bool { return opTable[op].valid }

// Headers is the set of extended headers that follow the BTH.
func (op Opcode) Headers() HeaderSet { return opTable[op].hdrs }

// HeaderLen is the size of the BTH and the extended headers.
func (op Opcode) HeaderLen() int { return int(opTable[op].hdrLen) }

// Payload says whether and how much payload follows the headers.
func (op Opcode) Payload() Payload { return opTable[op].payload }

// Position is where a packet of this opcode sits in its message.
func (op Opcode) Position() Position { return opTable[op].pos }

// String is the opcode's name as ib_pack.h spells it without its prefix,
// "RC_SEND_ONLY"; an undefined opcode prints as "OPCODE_0xNN".
func (op Opcode) String() string {
	if !opTable[op].valid {
		const hex = "0123456789abcdef"
		return "OPCODE_0x" + string([]byte{hex[op>>4], hex[op&15]})
	}
	return opTable[op].name
}

// Message kinds of an opcode, for a responder's dispatch.

// IsSend reports a SEND packet (any position, with or without ImmDt or IETH).
func (op Opcode) IsSend() bool {
	o := op & opMask
	return op.Valid() && op.Transport() != TransportCNP &&
		(o <= opSendOnlyImm || o == opSendLastInvalidate || o == opSendOnlyInvalidate)
}

// IsWrite reports an RDMA WRITE packet.
func (op Opcode) IsWrite() bool {
	o := op & opMask
	return op.Valid() && op.Transport() != TransportCNP && o >= opWriteFirst && o <= opWriteOnlyImm
}

// IsReadResponse reports an RDMA READ response packet.
func (op Opcode) IsReadResponse() bool {
	o := op & opMask
	return op.Valid() && op.Transport() != TransportCNP && o >= opReadResponseFirst && o <= opReadResponseOnly
}

// IsRequest reports a packet a requester sends (not a response and not a CNP).
func (op Opcode) IsRequest() bool {
	return op.Valid() && op.Transport() != TransportCNP && !op.IsResponse()
}

// IsResponse reports a packet a responder sends: read responses, ACKs,
// atomic ACKs.
func (op Opcode) IsResponse() bool {
	o := op & opMask
	return op.Valid() && op.Transport() != TransportCNP &&
		(op.IsReadResponse() || o == opAcknowledge || o == opAtomicAcknowledge)
}

// HasImmediate reports an opcode that carries ImmDt.
func (op Opcode) HasImmediate() bool { return op.Headers().Has(HdrImmDt) }

// HasInvalidate reports an opcode that carries IETH.
func (op Opcode) HasInvalidate() bool { return op.Headers().Has(HdrIETH) }

// opDef is one operation and what it carries on the transports that have it.
type opDef struct {
	op      uint8
	name    string
	hdrs    HeaderSet
	payload Payload
	pos     Position
	rc      bool // RC (and XRC, whose requests add XRCETH)
	uc      bool
	rd      bool // RD (RDETH, and DETH on requests)
	ud      bool
}

const (
	hRETH  = HeaderSet(HdrRETH)
	hImm   = HeaderSet(HdrImmDt)
	hIETH  = HeaderSet(HdrIETH)
	hAETH  = HeaderSet(HdrAETH)
	hAtom  = HeaderSet(HdrAtomicETH)
	hAtAck = HeaderSet(HdrAtomicAckETH)
)

var opDefs = []opDef{
	{opSendFirst, "SEND_FIRST", 0, PayloadData, PosFirst, true, true, true, false},
	{opSendMiddle, "SEND_MIDDLE", 0, PayloadData, PosMiddle, true, true, true, false},
	{opSendLast, "SEND_LAST", 0, PayloadData, PosLast, true, true, true, false},
	{opSendLastImm, "SEND_LAST_WITH_IMMEDIATE", hImm, PayloadData, PosLast, true, true, true, false},
	{opSendOnly, "SEND_ONLY", 0, PayloadData, PosOnly, true, true, true, true},
	{opSendOnlyImm, "SEND_ONLY_WITH_IMMEDIATE", hImm, PayloadData, PosOnly, true, true, true, true},
	{opWriteFirst, "RDMA_WRITE_FIRST", hRETH, PayloadData, PosFirst, true, true, true, false},
	{opWriteMiddle, "RDMA_WRITE_MIDDLE", 0, PayloadData, PosMiddle, true, true, true, false},
	{opWriteLast, "RDMA_WRITE_LAST", 0, PayloadData, PosLast, true, true, true, false},
	{opWriteLastImm, "RDMA_WRITE_LAST_WITH_IMMEDIATE", hImm, PayloadData, PosLast, true, true, true, false},
	{opWriteOnly, "RDMA_WRITE_ONLY", hRETH, PayloadData, PosOnly, true, true, true, false},
	{opWriteOnlyImm, "RDMA_WRITE_ONLY_WITH_IMMEDIATE", hRETH | hImm, PayloadData, PosOnly, true, true, true, false},
	{opReadRequest, "RDMA_READ_REQUEST", hRETH, PayloadNone, PosOnly, true, false, true, false},
	{opReadResponseFirst, "RDMA_READ_RESPONSE_FIRST", hAETH, PayloadData, PosFirst, true, false, true, false},
	{opReadResponseMiddle, "RDMA_READ_RESPONSE_MIDDLE", 0, PayloadData, PosMiddle, true, false, true, false},
	{opReadResponseLast, "RDMA_READ_RESPONSE_LAST", hAETH, PayloadData, PosLast, true, false, true, false},
	{opReadResponseOnly, "RDMA_READ_RESPONSE_ONLY", hAETH, PayloadData, PosOnly, true, false, true, false},
	{opAcknowledge, "ACKNOWLEDGE", hAETH, PayloadNone, PosOnly, true, false, true, false},
	{opAtomicAcknowledge, "ATOMIC_ACKNOWLEDGE", hAETH | hAtAck, PayloadNone, PosOnly, true, false, true, false},
	{opCompareSwap, "COMPARE_SWAP", hAtom, PayloadNone, PosOnly, true, false, true, false},
	{opFetchAdd, "FETCH_ADD", hAtom, PayloadNone, PosOnly, true, false, true, false},
	{opResync, "RESYNC", 0, PayloadNone, PosOnly, false, false, true, false},
	{opSendLastInvalidate, "SEND_LAST_WITH_INVALIDATE", hIETH, PayloadData, PosLast, true, false, false, false},
	{opSendOnlyInvalidate, "SEND_ONLY_WITH_INVALIDATE", hIETH, PayloadData, PosOnly, true, false, false, false},
	{opFlush, "FLUSH", HeaderSet(HdrFETH) | hRETH, PayloadNone, PosOnly, true, false, false, false},
	{opAtomicWrite, "ATOMIC_WRITE", hRETH, PayloadFixed, PosOnly, true, false, false, false},
}

func init() {
	set := func(op Opcode, name string, hdrs HeaderSet, payload Payload, pos Position) {
		opTable[op] = opInfo{name: name, hdrs: hdrs, hdrLen: uint8(BTHLen + hdrs.Len()), payload: payload,
			pos: pos, valid: true}
	}
	for _, d := range opDefs {
		if d.rc {
			set(Opcode(TransportRC)|Opcode(d.op), "RC_"+d.name, d.hdrs, d.payload, d.pos)
			// XRC has no FLUSH or ATOMIC WRITE here (IBA 1.5 defines them
			// for RC); its requests carry the XRCETH.
			if d.op != opFlush && d.op != opAtomicWrite {
				h := d.hdrs
				if !isResponseOp(d.op) {
					h |= HeaderSet(HdrXRCETH)
				}
				set(Opcode(TransportXRC)|Opcode(d.op), "XRC_"+d.name, h, d.payload, d.pos)
			}
		}
		if d.uc {
			set(Opcode(TransportUC)|Opcode(d.op), "UC_"+d.name, d.hdrs, d.payload, d.pos)
		}
		if d.rd {
			h := d.hdrs | HeaderSet(HdrRDETH)
			if !isResponseOp(d.op) {
				h |= HeaderSet(HdrDETH)
			}
			set(Opcode(TransportRD)|Opcode(d.op), "RD_"+d.name, h, d.payload, d.pos)
		}
		if d.ud {
			set(Opcode(TransportUD)|Opcode(d.op), "UD_"+d.name, d.hdrs|HeaderSet(HdrDETH), d.payload, d.pos)
		}
	}
	set(CNP, "CNP", HeaderSet(HdrCNPPad), PayloadNone, PosOnly)
}

func isResponseOp(op uint8) bool {
	return op >= opReadResponseFirst && op <= opAtomicAcknowledge
}
