package ibwire

import "time"

// AETH is the ACK extended transport header (4 bytes, IB vol. 1 9.3.5):
// an 8-bit syndrome and the 24-bit message sequence number.
//
// The syndrome: bit 7 reserved (0); bits 6:5 the kind (00 ACK, 01 RNR NAK,
// 10 reserved, 11 NAK); bits 4:0 the ACK's credit count, the RNR NAK's
// timer, or the NAK code.
type AETH struct {
	Syndrome uint8
	MSN      uint32 // 24 bits
}

// AckKind is the kind of an AETH syndrome.
type AckKind uint8

const (
	KindACK      AckKind = 0 // positive acknowledgement (with credits)
	KindRNRNAK   AckKind = 1 // receiver not ready (with a timer)
	KindReserved AckKind = 2 // reserved: never valid on the wire
	KindNAK      AckKind = 3 // negative acknowledgement (with a code)
)

func (k AckKind) String() string {
	return [...]string{"ACK", "RNR NAK", "reserved", "NAK"}[k&3]
}

// NAKCode is the low five bits of a NAK syndrome.
type NAKCode uint8

// The NAK codes of IB vol. 1 table 43; 5-31 are reserved.
const (
	NAKPSNSeqError      NAKCode = 0 // PSN sequence error: the requester goes back
	NAKInvalidRequest   NAKCode = 1
	NAKRemoteAccessErr  NAKCode = 2
	NAKRemoteOpErr      NAKCode = 3
	NAKInvalidRDRequest NAKCode = 4
	nakCodes                    = 5
)

func (c NAKCode) String() string {
	switch c {
	case NAKPSNSeqError:
		return "PSN sequence error"
	case NAKInvalidRequest:
		return "invalid request"
	case NAKRemoteAccessErr:
		return "remote access error"
	case NAKRemoteOpErr:
		return "remote operational error"
	case NAKInvalidRDRequest:
		return "invalid RD request"
	}
	return "reserved NAK code"
}

// CreditsInvalid is the ACK credit code that means "no credit count" (the
// responder has no receive-queue flow control, or it is not known).
const CreditsInvalid = 0x1F

// ACK is a positive acknowledgement with the given 5-bit credit code.
func ACK(credits uint8, msn uint32) AETH {
	return AETH{Syndrome: credits & 0x1F, MSN: msn & Mask24}
}

// RNRNAK is a receiver-not-ready NAK with the given 5-bit timer code
// (RNRTimer).
func RNRNAK(timer uint8, msn uint32) AETH {
	return AETH{Syndrome: 1<<5 | timer&0x1F, MSN: msn & Mask24}
}

// NAK is a negative acknowledgement with the given code.
func NAK(code NAKCode, msn uint32) AETH {
	return AETH{Syndrome: 3<<5 | uint8(code)&0x1F, MSN: msn & Mask24}
}

// Kind is the syndrome's kind.
func (a AETH) Kind() AckKind { return AckKind(a.Syndrome >> 5 & 3) }

// Value is the low five bits: the credit code, timer code or NAK code.
func (a AETH) Value() uint8 { return a.Syndrome & 0x1F }

// IsACK, IsRNRNAK and IsNAK classify the syndrome.
func (a AETH) IsACK() bool    { return a.Kind() == KindACK }
func (a AETH) IsRNRNAK() bool { return a.Kind() == KindRNRNAK }
func (a AETH) IsNAK() bool    { return a.Kind() == KindNAK }

// Credits is an ACK's credit code (CreditsInvalid: none).
func (a AETH) Credits() uint8 { return a.Value() }

// RNRTimer is an RNR NAK's timer code.
func (a AETH) RNRTimer() uint8 { return a.Value() }

// NAKCode is a NAK's code.
func (a AETH) NAKCode() NAKCode { return NAKCode(a.Value()) }

func (a AETH) check() error {
	switch {
	case a.Syndrome&0x80 != 0:
		return fieldErr("AETH.Syndrome", ErrReserved, "bit 7 set in %#x", a.Syndrome)
	case a.Kind() == KindReserved:
		return fieldErr("AETH.Syndrome", ErrReserved, "kind 10b in %#x", a.Syndrome)
	case a.Kind() == KindNAK && a.NAKCode() >= nakCodes:
		return fieldErr("AETH.Syndrome", ErrReserved, "NAK code %d", a.NAKCode())
	case a.MSN > Mask24:
		return fieldErr("AETH.MSN", ErrField, "%#x wider than 24 bits", a.MSN)
	}
	return nil
}

// Encode writes the header into b[:AETHLen]; a reserved syndrome is
// refused.
func (a *AETH) Encode(b []byte) error {
	return encodeHdr("AETH", b, AETHLen, a.check, a.put)
}

func (a *AETH) put(b []byte) { be.PutUint32(b, uint32(a.Syndrome)<<24|a.MSN) }

// Decode reads the header from b; a reserved syndrome is refused.
func (a *AETH) Decode(b []byte) error {
	if err := shortCheck("AETH", b, AETHLen); err != nil {
		return err
	}
	v := be.Uint32(b)
	x := AETH{Syndrome: uint8(v >> 24), MSN: v & Mask24}
	if err := x.check(); err != nil {
		return err
	}
	*a = x
	return nil
}

func (a AETH) String() string {
	switch a.Kind() {
	case KindACK:
		if a.Credits() == CreditsInvalid {
			return "ACK msn " + itoa(a.MSN)
		}
		return "ACK credits " + itoa(uint32(a.Credits())) + " msn " + itoa(a.MSN)
	case KindRNRNAK:
		return "RNR NAK " + RNRTimerDuration(a.RNRTimer()).String() + " msn " + itoa(a.MSN)
	case KindNAK:
		return "NAK " + a.NAKCode().String() + " msn " + itoa(a.MSN)
	}
	return "reserved syndrome " + hexString(uint64(a.Syndrome))
}

// rnrTimerUS is IB vol. 1 table 45: the minimum RNR NAK delay of each
// 5-bit timer code, in microseconds. Code 0 is the longest.
var rnrTimerUS = [32]uint32{
	655360, 10, 20, 30, 40, 60, 80, 120, 160, 240, 320, 480, 640, 960, 1280, 1920,
	2560, 3840, 5120, 7680, 10240, 15360, 20480, 30720, 40960, 61440, 81920, 122880, 163840, 245760, 327680, 491520,
}

// RNRTimerDuration is the delay an RNR NAK's timer code asks for.
func RNRTimerDuration(code uint8) time.Duration {
	return time.Duration(rnrTimerUS[code&0x1F]) * time.Microsecond
}

// RNRTimerCode is the code of the shortest delay at least d (code 0, the
// longest, for anything above 491.52 ms).
func RNRTimerCode(d time.Duration) uint8 {
	for c := 1; c < 32; c++ {
		if time.Duration(rnrTimerUS[c])*time.Microsecond >= d {
			return uint8(c)
		}
	}
	return 0
}

func itoa(v uint32) string {
	var b [10]byte
	i := len(b)
	for {
		i--
		b[i] = byte('0' + v%10)
		v /= 10
		if v == 0 {
			return string(b[i:])
		}
	}
}
