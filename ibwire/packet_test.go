package ibwire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"reflect"
	"testing"
	"time"
)

func validOpcodes() []Opcode {
	var ops []Opcode
	for i := range 256 {
		if Opcode(i).Valid() {
			ops = append(ops, Opcode(i))
		}
	}
	return ops
}

// randomPacket fills every header op carries with random values (valid
// ones: 24-bit fields, an AETH syndrome of a defined kind) and a payload
// that fits op.
func randomPacket(r *rand.Rand, op Opcode) Packet {
	p := Packet{BTH: BTH{Opcode: op, SE: r.IntN(2) == 1, MigReq: r.IntN(2) == 1, PKey: uint16(r.Uint32()),
		FECN: r.IntN(2) == 1, BECN: r.IntN(2) == 1, DestQP: r.Uint32() & Mask24, AckReq: r.IntN(2) == 1,
		PSN: PSN(r.Uint32() & Mask24)}}
	h := op.Headers()
	if h.Has(HdrRDETH) {
		p.RDETH = r.Uint32() & Mask24
	}
	if h.Has(HdrDETH) {
		p.DETH = DETH{QKey: r.Uint32(), SrcQP: r.Uint32() & Mask24}
	}
	if h.Has(HdrXRCETH) {
		p.XRCETH = r.Uint32() & Mask24
	}
	if h.Has(HdrFETH) {
		p.FETH = FETH{SelectivityLevel: uint8(r.IntN(4)), PlacementType: uint8(r.IntN(16))}
	}
	if h.Has(HdrRETH) {
		p.RETH = RETH{VA: r.Uint64(), RKey: r.Uint32(), DMALen: r.Uint32()}
	}
	if h.Has(HdrAtomicETH) {
		p.AtomicETH = AtomicETH{VA: r.Uint64(), RKey: r.Uint32(), SwapAdd: r.Uint64(), Compare: r.Uint64()}
	}
	if h.Has(HdrAETH) {
		switch r.IntN(3) {
		case 0:
			p.AETH = ACK(uint8(r.IntN(32)), r.Uint32())
		case 1:
			p.AETH = RNRNAK(uint8(r.IntN(32)), r.Uint32())
		default:
			p.AETH = NAK(NAKCode(r.IntN(5)), r.Uint32())
		}
	}
	if h.Has(HdrAtomicAckETH) {
		p.AtomicAckETH.Orig = r.Uint64()
	}
	if h.Has(HdrImmDt) {
		p.ImmDt = ImmDt(r.Uint32())
	}
	if h.Has(HdrIETH) {
		p.IETH.RKey = r.Uint32()
	}
	switch op.Payload() {
	case PayloadFixed:
		p.Payload = make([]byte, 8)
	case PayloadData:
		p.Payload = make([]byte, r.IntN(300))
	}
	for i := range p.Payload {
		p.Payload[i] = byte(r.Uint32())
	}
	p.BTH.PadCount = padFor(len(p.Payload))
	return p
}

func TestPacketRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for _, op := range validOpcodes() {
		sizes := []int{-1}
		if op.Payload() == PayloadData {
			sizes = []int{0, 1, 2, 3, 4, 5, 7, 255, 256, 1023, 4096}
		}
		for _, size := range sizes {
			p := randomPacket(r, op)
			if size >= 0 {
				p.Payload = bytes.Repeat([]byte{0xA5}, size)
				p.BTH.PadCount = padFor(size)
			}
			buf := make([]byte, p.Len()+7)
			for i := range buf {
				buf[i] = 0xEE // Encode must write every byte it claims
			}
			n, err := p.Encode(buf)
			if err != nil {
				t.Fatalf("%v/%d: %v", op, size, err)
			}
			if n != p.Len() || n%4 != 0 || n != op.HeaderLen()+len(p.Payload)+int(p.BTH.PadCount)+ICRCLen {
				t.Fatalf("%v/%d: encoded %d bytes, Len %d", op, size, n, p.Len())
			}
			if !bytes.Equal(buf[n-ICRCLen-int(p.BTH.PadCount):n], make([]byte, ICRCLen+int(p.BTH.PadCount))) {
				t.Fatalf("%v/%d: pad and ICRC place not zero: %x", op, size, buf[n-8:n])
			}
			if buf[n] != 0xEE {
				t.Fatalf("%v/%d: wrote past the packet", op, size)
			}
			var q Packet
			if err := q.Decode(buf[:n]); err != nil {
				t.Fatalf("%v/%d: decode: %v", op, size, err)
			}
			if len(p.Payload) == 0 {
				p.Payload = q.Payload[:0:0]
				if len(q.Payload) != 0 {
					t.Fatalf("%v: payload %d bytes", op, len(q.Payload))
				}
				q.Payload = p.Payload
			}
			if !reflect.DeepEqual(p, q) {
				t.Fatalf("%v/%d: round trip\n got %+v\nwant %+v", op, size, q, p)
			}
			if cap(q.Payload) != len(q.Payload) {
				t.Fatalf("%v: payload capacity %d reaches past it (%d)", op, cap(q.Payload), len(q.Payload))
			}
		}
	}
}

// TestEncodeBTHLayout pins the BTH's bits against a hand-assembled header.
func TestEncodeBTHLayout(t *testing.T) {
	h := BTH{Opcode: RCSendOnly, SE: true, MigReq: true, PadCount: 3, PKey: 0x8001, FECN: true, BECN: true,
		DestQP: 0x123456, AckReq: true, PSN: 0xABCDEF}
	var b [BTHLen]byte
	if err := h.Encode(b[:]); err != nil {
		t.Fatal(err)
	}
	want := []byte{0x04, 0x80 | 0x40 | 0x30, 0x80, 0x01, 0xC0, 0x12, 0x34, 0x56, 0x80, 0xAB, 0xCD, 0xEF}
	if !bytes.Equal(b[:], want) {
		t.Fatalf("BTH % x, want % x", b, want)
	}
	var g BTH
	if err := g.Decode(b[:]); err != nil || g != h {
		t.Fatalf("decode %+v %v", g, err)
	}
	for _, bad := range []BTH{{PadCount: 4}, {TVer: 16}, {DestQP: 1 << 24}, {PSN: 1 << 24}} {
		if err := bad.Encode(b[:]); !errors.Is(err, ErrField) {
			t.Errorf("%+v: %v, want ErrField", bad, err)
		}
	}
	if err := h.Encode(b[:11]); !errors.Is(err, ErrBuffer) {
		t.Errorf("short buffer: %v", err)
	}
}

func TestHeaderEncodeDecode(t *testing.T) {
	reth := RETH{VA: 0x0102030405060708, RKey: 0x090A0B0C, DMALen: 0x0D0E0F10}
	var b [32]byte
	if err := reth.Encode(b[:]); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b[:16], []byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}) {
		t.Fatalf("RETH % x", b[:16])
	}
	var reth2 RETH
	if err := reth2.Decode(b[:16]); err != nil || reth2 != reth {
		t.Fatalf("RETH %+v %v", reth2, err)
	}
	at := AtomicETH{VA: 1, RKey: 2, SwapAdd: 3, Compare: 4}
	if err := at.Encode(b[:]); err != nil {
		t.Fatal(err)
	}
	wantAt := make([]byte, 28)
	wantAt[7], wantAt[11], wantAt[19], wantAt[27] = 1, 2, 3, 4
	if !bytes.Equal(b[:28], wantAt) {
		t.Fatalf("AtomicETH % x", b[:28])
	}
	var at2 AtomicETH
	if err := at2.Decode(b[:28]); err != nil || at2 != at {
		t.Fatalf("AtomicETH %+v %v", at2, err)
	}
	ack := AtomicAckETH{Orig: 0x1122334455667788}
	if err := ack.Encode(b[:]); err != nil || binary.BigEndian.Uint64(b[:]) != ack.Orig {
		t.Fatalf("AtomicAckETH % x %v", b[:8], err)
	}
	var ack2 AtomicAckETH
	if err := ack2.Decode(b[:8]); err != nil || ack2 != ack {
		t.Fatal(err)
	}
	d := DETH{QKey: GSIQKey, SrcQP: 1}
	if err := d.Encode(b[:]); err != nil || !bytes.Equal(b[:8], []byte{0x80, 0x01, 0, 0, 0, 0, 0, 1}) {
		t.Fatalf("DETH % x %v", b[:8], err)
	}
	var d2 DETH
	if err := d2.Decode(b[:8]); err != nil || d2 != d {
		t.Fatal(err)
	}
	b[4] = 1
	if err := d2.Decode(b[:8]); !errors.Is(err, ErrReserved) {
		t.Errorf("DETH reserved byte: %v", err)
	}
	if err := (&DETH{SrcQP: 1 << 24}).Encode(b[:]); !errors.Is(err, ErrField) {
		t.Errorf("DETH wide source QP: %v", err)
	}
	f := FETH{SelectivityLevel: 2, PlacementType: 5}
	if err := f.Encode(b[:]); err != nil || binary.BigEndian.Uint32(b[:]) != 0x25 {
		t.Fatalf("FETH % x %v", b[:4], err)
	}
	var f2 FETH
	if err := f2.Decode(b[:4]); err != nil || f2 != f {
		t.Fatal(err)
	}
	b[0] = 0x80
	if err := f2.Decode(b[:4]); !errors.Is(err, ErrReserved) {
		t.Errorf("FETH reserved: %v", err)
	}
	// Every decoder refuses a short buffer with ErrShort, every encoder a
	// short buffer with ErrBuffer.
	decoders := map[string]func([]byte) error{
		"BTH": new(BTH).Decode, "RETH": new(RETH).Decode, "AtomicETH": new(AtomicETH).Decode,
		"AtomicAckETH": new(AtomicAckETH).Decode, "DETH": new(DETH).Decode, "FETH": new(FETH).Decode,
		"AETH": new(AETH).Decode,
	}
	for name, dec := range decoders {
		if err := dec(b[:3]); !errors.Is(err, ErrShort) {
			t.Errorf("%s.Decode of 3 bytes: %v", name, err)
		}
	}
	encoders := map[string]func([]byte) error{
		"BTH": new(BTH).Encode, "RETH": new(RETH).Encode, "AtomicETH": new(AtomicETH).Encode,
		"AtomicAckETH": new(AtomicAckETH).Encode, "DETH": new(DETH).Encode, "FETH": new(FETH).Encode,
		"AETH": new(AETH).Encode,
	}
	for name, enc := range encoders {
		if err := enc(b[:3]); !errors.Is(err, ErrBuffer) {
			t.Errorf("%s.Encode into 3 bytes: %v", name, err)
		}
	}
}

func TestAETH(t *testing.T) {
	a := ACK(CreditsInvalid, 0x1234567)
	if !a.IsACK() || a.Credits() != 31 || a.MSN != 0x234567 || a.Syndrome != 0x1F {
		t.Errorf("ACK: %+v", a)
	}
	r := RNRNAK(RNRTimerCode(1500*time.Microsecond), 9)
	if !r.IsRNRNAK() || r.Syndrome != 0x20|15 || RNRTimerDuration(r.RNRTimer()) != 1920*time.Microsecond {
		t.Errorf("RNR NAK: %+v %v", r, RNRTimerDuration(r.RNRTimer()))
	}
	codes := map[NAKCode]uint8{NAKPSNSeqError: 0x60, NAKInvalidRequest: 0x61, NAKRemoteAccessErr: 0x62,
		NAKRemoteOpErr: 0x63, NAKInvalidRDRequest: 0x64}
	for c, syn := range codes {
		n := NAK(c, 1)
		if !n.IsNAK() || n.NAKCode() != c || n.Syndrome != syn || n.IsACK() || n.IsRNRNAK() {
			t.Errorf("NAK %v: %+v", c, n)
		}
		var b [4]byte
		if err := n.Encode(b[:]); err != nil || b != [4]byte{syn, 0, 0, 1} {
			t.Errorf("NAK %v: % x %v", c, b, err)
		}
		var m AETH
		if err := m.Decode(b[:]); err != nil || m != n {
			t.Errorf("NAK %v decode: %+v %v", c, m, err)
		}
	}
	for _, syn := range []uint8{0x80, 0x9F, 0x40, 0x5F, 0x65, 0x7F} {
		b := [4]byte{syn, 0, 0, 0}
		var m AETH
		err := m.Decode(b[:])
		var e *Error
		if !errors.Is(err, ErrReserved) || !errors.As(err, &e) || e.Field != "AETH.Syndrome" {
			t.Errorf("syndrome %#02x: %v", syn, err)
		}
		x := AETH{Syndrome: syn}
		if err := x.Encode(b[:]); !errors.Is(err, ErrReserved) {
			t.Errorf("encode syndrome %#02x: %v", syn, err)
		}
	}
	if RNRTimerDuration(0) != 655360*time.Microsecond || RNRTimerDuration(1) != 10*time.Microsecond ||
		RNRTimerDuration(31) != 491520*time.Microsecond {
		t.Error("RNR timer table ends")
	}
	for c := uint8(1); c < 32; c++ {
		if RNRTimerCode(RNRTimerDuration(c)) != c {
			t.Errorf("RNRTimerCode(RNRTimerDuration(%d)) = %d", c, RNRTimerCode(RNRTimerDuration(c)))
		}
		if c > 1 && RNRTimerDuration(c) <= RNRTimerDuration(c-1) {
			t.Errorf("RNR timer %d not longer than %d", c, c-1)
		}
	}
	if RNRTimerCode(time.Second) != 0 {
		t.Error("a second is code 0")
	}
	for _, s := range []string{ACK(3, 5).String(), a.String(), r.String(), NAK(NAKRemoteAccessErr, 2).String()} {
		if s == "" {
			t.Error("empty String")
		}
	}
	if got := NAK(NAKRemoteAccessErr, 2).String(); got != "NAK remote access error msn 2" {
		t.Errorf("String %q", got)
	}
}

func TestPSN(t *testing.T) {
	cases := []struct {
		a, b PSN
		diff int32
	}{
		{5, 3, 2},
		{3, 5, -2},
		{0, Mask24, 1},
		{Mask24, 0, -1},
		{0x7FFFFF, 0, 0x7FFFFF},
		{0x800000, 0, -0x800000}, // exactly half way: behind
		{0x800001, 1, -0x800000},
		{10, 0xFFFFF0, 26},
	}
	for _, c := range cases {
		if got := c.a.Sub(c.b); got != c.diff {
			t.Errorf("%#x - %#x = %d, want %d", c.a, c.b, got, c.diff)
		}
		if c.a.After(c.b) != (c.diff > 0) || c.a.Before(c.b) != (c.diff < 0) {
			t.Errorf("%#x vs %#x: after %v before %v", c.a, c.b, c.a.After(c.b), c.a.Before(c.b))
		}
		if c.b.Add(c.diff) != c.a {
			t.Errorf("%#x + %d = %#x, want %#x", c.b, c.diff, c.b.Add(c.diff), c.a)
		}
	}
	if PSN(Mask24).Next() != 0 || PSN(0).Add(-1) != Mask24 {
		t.Error("wrap")
	}
	if !PSN(2).InRange(Mask24-1, 5) || PSN(3).InRange(Mask24-1, 5) || !PSN(7).InRange(7, 1) || PSN(7).InRange(7, 0) {
		t.Error("InRange across the wrap")
	}
	if PSN(1<<24).Valid() || !PSN(Mask24).Valid() {
		t.Error("Valid")
	}
	// The responder's split of IB 9.7.5: ePSN .. ePSN+2^23-1 valid, the
	// 2^23 PSNs before it duplicates.
	e := PSN(0x000010)
	if !e.Add(PSNWindow-1).After(e) || e.Add(PSNWindow).After(e) || !e.Add(-PSNWindow).Before(e) {
		t.Error("window edges")
	}
}

func TestCheckPMTU(t *testing.T) {
	mk := func(op Opcode, n int) *Packet { return &Packet{BTH: BTH{Opcode: op}, Payload: make([]byte, n)} }
	ok := []*Packet{mk(RCSendFirst, 1024), mk(RCSendMiddle, 1024), mk(RCSendLast, 1), mk(RCSendLast, 1024),
		mk(RCSendOnly, 0), mk(RCWriteOnly, 1024), mk(RCReadResponseFirst, 1024), mk(RCAcknowledge, 0),
		mk(UDSendOnly, 1024)}
	for _, p := range ok {
		if err := p.CheckPMTU(1024); err != nil {
			t.Errorf("%v %d: %v", p.BTH.Opcode, len(p.Payload), err)
		}
	}
	bad := []*Packet{mk(RCSendFirst, 1020), mk(RCWriteMiddle, 2048), mk(RCSendLast, 0), mk(RCSendLast, 1025),
		mk(RCSendOnly, 1025), mk(RCReadResponseMiddle, 4), mk(UDSendOnlyImm, 2048)}
	for _, p := range bad {
		if err := p.CheckPMTU(1024); !errors.Is(err, ErrLength) {
			t.Errorf("%v %d: %v, want ErrLength", p.BTH.Opcode, len(p.Payload), err)
		}
	}
	if err := mk(RCSendOnly, 0).CheckPMTU(1000); !errors.Is(err, ErrField) {
		t.Errorf("PMTU 1000: %v", err)
	}
}

func TestEncodeRefuses(t *testing.T) {
	buf := make([]byte, 8192)
	cases := []struct {
		name   string
		p      Packet
		reason error
		field  string
	}{
		{"unknown opcode", Packet{BTH: BTH{Opcode: 0x18}}, ErrOpcode, "BTH.Opcode"},
		{"payload on ACK", Packet{BTH: BTH{Opcode: RCAcknowledge}, Payload: []byte{1}}, ErrLength, "Payload"},
		{"read request with data", Packet{BTH: BTH{Opcode: RCReadRequest}, Payload: make([]byte, 4)}, ErrLength, "Payload"},
		{"atomic write of 4", Packet{BTH: BTH{Opcode: RCAtomicWrite}, Payload: make([]byte, 4)}, ErrLength, "Payload"},
		{"payload over 4096", Packet{BTH: BTH{Opcode: RCSendOnly}, Payload: make([]byte, 4097)}, ErrLength, "Payload"},
		{"wide QP", Packet{BTH: BTH{Opcode: RCSendOnly, DestQP: 1 << 24}}, ErrField, "BTH.DestQP"},
		{"wide PSN", Packet{BTH: BTH{Opcode: RCSendOnly, PSN: 1 << 24}}, ErrField, "BTH.PSN"},
		{"wide MSN", Packet{BTH: BTH{Opcode: RCAcknowledge}, AETH: AETH{MSN: 1 << 24}}, ErrField, "AETH.MSN"},
		{"reserved syndrome", Packet{BTH: BTH{Opcode: RCAcknowledge}, AETH: AETH{Syndrome: 0x40}}, ErrReserved, "AETH.Syndrome"},
		{"wide source QP", Packet{BTH: BTH{Opcode: UDSendOnly}, DETH: DETH{SrcQP: 1 << 24}}, ErrField, "DETH.SrcQP"},
		{"wide EEC", Packet{BTH: BTH{Opcode: 0x44}, RDETH: 1 << 24}, ErrField, "RDETH.EEC"},
		{"wide XRC SRQ", Packet{BTH: BTH{Opcode: 0xA4}, XRCETH: 1 << 24}, ErrField, "XRCETH.SRQ"},
		{"FETH level", Packet{BTH: BTH{Opcode: RCFlush}, FETH: FETH{SelectivityLevel: 4}}, ErrField, "FETH"},
	}
	for _, c := range cases {
		_, err := c.p.Encode(buf)
		var e *Error
		if !errors.Is(err, c.reason) || !errors.As(err, &e) || e.Field != c.field {
			t.Errorf("%s: %v, want %v in %s", c.name, err, c.reason, c.field)
		}
	}
	p := Packet{BTH: BTH{Opcode: RCSendOnly}, Payload: make([]byte, 10)}
	if _, err := p.Encode(buf[:p.Len()-1]); !errors.Is(err, ErrBuffer) {
		t.Errorf("short buffer: %v", err)
	}
	// A field the opcode does not carry is not checked.
	p = Packet{BTH: BTH{Opcode: RCSendOnly}, AETH: AETH{Syndrome: 0x40}, DETH: DETH{SrcQP: 1 << 30}}
	if _, err := p.Encode(buf); err != nil {
		t.Errorf("unused fields: %v", err)
	}
}

// TestDecodeHostile: each mutation of a good packet is refused for the
// reason and with the field it names.
func TestDecodeHostile(t *testing.T) {
	enc := func(p Packet) []byte {
		b := make([]byte, p.Len())
		if _, err := p.Encode(b); err != nil {
			t.Fatal(err)
		}
		return b
	}
	send := enc(Packet{BTH: BTH{Opcode: RCSendOnly, DestQP: 7, PSN: 9}, Payload: []byte("hello")}) // pad 3
	ack := enc(Packet{BTH: BTH{Opcode: RCAcknowledge}, AETH: ACK(CreditsInvalid, 1)})
	write := enc(Packet{BTH: BTH{Opcode: RCWriteOnly}, RETH: RETH{DMALen: 8}, Payload: make([]byte, 8)})
	ud := enc(Packet{BTH: BTH{Opcode: UDSendOnly}, DETH: DETH{QKey: 1, SrcQP: 2}, Payload: make([]byte, 4)})
	cnp := enc(Packet{BTH: BTH{Opcode: CNP, BECN: true}})
	aw := enc(Packet{BTH: BTH{Opcode: RCAtomicWrite}, Payload: make([]byte, 8)})
	mut := func(b []byte, f func([]byte) []byte) []byte { return f(append([]byte{}, b...)) }
	cases := []struct {
		name   string
		b      []byte
		reason error
		field  string
	}{
		{"empty", nil, ErrShort, "Packet"},
		{"BTH only", send[:12], ErrShort, "Packet"},
		{"BTH and 3", send[:15], ErrShort, "Packet"},
		{"unknown opcode 0x18", mut(send, func(b []byte) []byte { b[0] = 0x18; return b }), ErrOpcode, "BTH.Opcode"},
		{"unknown opcode 0xff", mut(send, func(b []byte) []byte { b[0] = 0xFF; return b }), ErrOpcode, "BTH.Opcode"},
		{"UD RDMA write", mut(send, func(b []byte) []byte { b[0] = 0x6A; return b }), ErrOpcode, "BTH.Opcode"},
		{"transport version", mut(send, func(b []byte) []byte { b[1] |= 1; return b }), ErrVersion, "BTH.TVer"},
		{"resv6", mut(send, func(b []byte) []byte { b[4] |= 0x01; return b }), ErrReserved, "BTH.Resv6"},
		{"resv7", mut(send, func(b []byte) []byte { b[8] |= 0x40; return b }), ErrReserved, "BTH.Resv7"},
		{"length not multiple of 4", send[:len(send)-1], ErrLength, "Packet"},
		{"pad count lies low", mut(send, func(b []byte) []byte { b[1] &^= 0x30; return b }), nil, ""},
		{"pad without payload", mut(send[:16], func(b []byte) []byte { b[1] = b[1]&^0x30 | 0x10; return b }), ErrLength, "BTH.PadCount"},
		{"pad larger than the rest", mut(send[:16], func(b []byte) []byte { b[1] |= 0x30; return b }), ErrLength, "BTH.PadCount"},
		{"pad on ACK", mut(ack, func(b []byte) []byte { b[1] |= 0x10; return b }), ErrLength, "BTH.PadCount"},
		{"payload on ACK", append(append([]byte{}, ack[:16]...), 0, 0, 0, 0, 0, 0, 0, 0), ErrLength, "Payload"},
		{"ACK without AETH", ack[:16], ErrShort, "RC_ACKNOWLEDGE"},
		{"WRITE without RETH", write[:24], ErrShort, "RC_RDMA_WRITE_ONLY"},
		{"reserved syndrome", mut(ack, func(b []byte) []byte { b[12] = 0x40; return b }), ErrReserved, "AETH.Syndrome"},
		{"reserved NAK code", mut(ack, func(b []byte) []byte { b[12] = 0x70; return b }), ErrReserved, "AETH.Syndrome"},
		{"DETH reserved", mut(ud, func(b []byte) []byte { b[16] = 1; return b }), ErrReserved, "DETH.Reserved"},
		{"CNP reserved", mut(cnp, func(b []byte) []byte { b[20] = 1; return b }), ErrReserved, "CNP.Reserved"},
		{"CNP with payload", append(append([]byte{}, cnp[:28]...), 1, 2, 3, 4, 0, 0, 0, 0), ErrLength, "Payload"},
		{"atomic write of 12", append(append([]byte{}, aw[:36]...), make([]byte, 8)...), ErrLength, "Payload"},
		{"payload over 4096", append(append([]byte{}, send[:12]...), make([]byte, 4100+4)...), ErrLength, "Payload"},
	}
	for _, c := range cases {
		var p Packet
		err := p.Decode(c.b)
		if c.reason == nil {
			// A pad count the sender got wrong but that is possible: the
			// packet decodes with a different payload length.
			if err != nil || len(p.Payload) != 8 {
				t.Errorf("%s: %v, payload %d", c.name, err, len(p.Payload))
			}
			continue
		}
		var e *Error
		if !errors.Is(err, c.reason) || !errors.As(err, &e) || e.Field != c.field {
			t.Errorf("%s: %v, want %v in %s", c.name, err, c.reason, c.field)
			continue
		}
		if p.BTH.Opcode != 0 || p.Payload != nil {
			t.Errorf("%s: refused packet left %v and %d payload bytes", c.name, p.BTH.Opcode, len(p.Payload))
		}
	}
}

func TestDecodeDatagramHostile(t *testing.T) {
	v4 := sampleDatagram(t, false, RCSendOnly, 10)
	v6 := sampleDatagram(t, true, RCSendOnly, 10)
	mut := func(b []byte, f func([]byte)) []byte { c := append([]byte{}, b...); f(c); return c }
	fix4 := func(b []byte) { // recompute the IPv4 header checksum after a change
		b[10], b[11] = 0, 0
		binary.BigEndian.PutUint16(b[10:], ipv4Checksum(b[:20]))
	}
	cases := []struct {
		name   string
		b      []byte
		reason error
		field  string
	}{
		{"empty", nil, ErrShort, "IP"},
		{"IPv4 short", v4[:19], ErrShort, "IPv4"},
		{"IPv6 short", v6[:39], ErrShort, "IPv6"},
		{"version 5", mut(v4, func(b []byte) { b[0] = 0x55 }), ErrVersion, "IP.Version"},
		{"IPv4 options", mut(v4, func(b []byte) { b[0] = 0x46; fix4(b) }), ErrField, "IPv4.IHL"},
		{"IPv4 total length long", mut(v4, func(b []byte) { b[3] += 4; fix4(b) }), ErrShort, "IPv4.TotalLength"},
		{"IPv4 total length tiny", mut(v4, func(b []byte) { b[2], b[3] = 0, 20; fix4(b) }), ErrLength, "IPv4.TotalLength"},
		{"IPv4 fragment", mut(v4, func(b []byte) { b[6] |= 0x20; fix4(b) }), ErrField, "IPv4.Fragment"},
		{"IPv4 evil bit", mut(v4, func(b []byte) { b[6] |= 0x80; fix4(b) }), ErrReserved, "IPv4.Flags"},
		{"IPv4 TCP", mut(v4, func(b []byte) { b[9] = 6; fix4(b) }), ErrNotRoCE, "IPv4.Protocol"},
		{"IPv4 checksum", mut(v4, func(b []byte) { b[11] ^= 1 }), ErrChecksum, "IPv4.Checksum"},
		{"IPv6 TCP", mut(v6, func(b []byte) { b[6] = 6 }), ErrNotRoCE, "IPv6.NextHeader"},
		{"IPv6 payload length long", mut(v6, func(b []byte) { b[5] += 4 }), ErrShort, "IPv6.PayloadLength"},
		{"IPv6 payload length tiny", mut(v6, func(b []byte) { b[4], b[5] = 0, 4 }), ErrLength, "IPv6.PayloadLength"},
		{"UDP port", mut(v4, func(b []byte) { b[23]++ }), ErrNotRoCE, "UDP.DstPort"},
		{"UDP length lies", mut(v4, func(b []byte) { b[25] -= 4 }), ErrLength, "UDP.Length"},
		{"IB too short", mut(v4[:20+8+12], func(b []byte) { b[3] = 40; b[25] = 20; fix4(b) }), ErrShort, "Packet"},
		{"ICRC", mut(v4, func(b []byte) { b[len(b)-1] ^= 1 }), ErrICRC, "ICRC"},
		{"ICRC before opcode", mut(v4, func(b []byte) { b[28] = 0x18 }), ErrICRC, "ICRC"},
	}
	for _, c := range cases {
		var p Packet
		_, _, err := DecodeDatagram(c.b, &p)
		var e *Error
		if !errors.Is(err, c.reason) || !errors.As(err, &e) || e.Field != c.field {
			t.Errorf("%s: %v, want %v in %s", c.name, err, c.reason, c.field)
		}
	}
	// Link-layer padding after the IP length is ignored.
	var p Packet
	if _, _, err := DecodeDatagram(append(append([]byte{}, v4...), 0, 0, 0, 0, 0, 0), &p); err != nil {
		t.Errorf("trailing padding: %v", err)
	}
	// The IPv6 UDP checksum EncodeDatagram wrote is right: the sum over the
	// pseudo-header and the datagram folds to 0xFFFF.
	if c := binary.BigEndian.Uint16(v6[46:]); c == 0 {
		t.Error("IPv6 UDP checksum 0")
	}
	sum := udp6Checksum(mut(v6, func(b []byte) { b[46], b[47] = 0, 0 }))
	if sum != binary.BigEndian.Uint16(v6[46:]) {
		t.Errorf("IPv6 UDP checksum %#04x, recomputed %#04x", binary.BigEndian.Uint16(v6[46:]), sum)
	}
}

func TestEncodeDatagramRefuses(t *testing.T) {
	p := Packet{BTH: BTH{Opcode: RCSendOnly}}
	buf := make([]byte, 128)
	v4, v6 := randomIP(rand.New(rand.NewPCG(1, 1)), false), randomIP(rand.New(rand.NewPCG(1, 1)), true)
	mixed := IPHeader{Src: v4.Src, Dst: v6.Dst}
	if _, err := EncodeDatagram(buf, &mixed, 1, &p); !errors.Is(err, ErrField) {
		t.Errorf("mixed families: %v", err)
	}
	if _, err := EncodeDatagram(buf, &IPHeader{}, 1, &p); !errors.Is(err, ErrField) {
		t.Errorf("no addresses: %v", err)
	}
	wide := v6
	wide.FlowLabel = 1 << 20
	if _, err := EncodeDatagram(buf, &wide, 1, &p); !errors.Is(err, ErrField) {
		t.Errorf("wide flow label: %v", err)
	}
	if _, err := EncodeDatagram(buf[:40], &v4, 1, &p); !errors.Is(err, ErrBuffer) {
		t.Errorf("short buffer: %v", err)
	}
	// TTL 0 encodes as 64.
	n, err := EncodeDatagram(buf, &v4, 1, &Packet{BTH: BTH{Opcode: RCSendOnly}})
	if err != nil || n != 20+8+16 {
		t.Fatal(n, err)
	}
	v4.TTL = 0
	if _, err := EncodeDatagram(buf, &v4, 1, &p); err != nil || buf[8] != 64 {
		t.Errorf("TTL %d %v", buf[8], err)
	}
}
