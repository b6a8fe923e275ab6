package ibwire

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// FuzzDecode feeds arbitrary bytes to Packet.Decode and, as a datagram, to
// DecodeDatagram. Neither may panic; a refusal must be an *Error with a
// field and one of the reasons; an accepted packet must re-encode to the
// same bytes (but the pad's and the ICRC's contents, which Encode writes
// as zeros) and satisfy what Decode promises. Seeds: testdata/fuzz/FuzzDecode
// (one of every opcode, and both known-answer datagrams).
func FuzzDecode(f *testing.F) {
	for _, v := range knownICRC {
		f.Add(unhex(f, v.hex))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var p Packet
		err := p.Decode(b)
		checkRefusal(t, err)
		if err == nil {
			checkAccepted(t, &p, b)
		}
		var q Packet
		_, _, err = DecodeDatagram(b, &q)
		checkRefusal(t, err)
		if err == nil {
			if _, err := ICRC(b); err != nil {
				t.Fatalf("accepted datagram, ICRC: %v", err)
			}
		}
		_, _ = ICRC(b)
	})
}

var reasons = []error{ErrShort, ErrLength, ErrOpcode, ErrReserved, ErrVersion, ErrField, ErrICRC, ErrChecksum,
	ErrNotRoCE, ErrBuffer}

func checkRefusal(t *testing.T, err error) {
	t.Helper()
	if err == nil {
		return
	}
	var e *Error
	if !errors.As(err, &e) || e.Field == "" {
		t.Fatalf("refusal %v is not an *Error naming a field", err)
	}
	for _, r := range reasons {
		if errors.Is(err, r) {
			return
		}
	}
	t.Fatalf("refusal %v wraps no reason", err)
}

func checkAccepted(t *testing.T, p *Packet, b []byte) {
	t.Helper()
	op := p.BTH.Opcode
	if !op.Valid() || len(b)%4 != 0 || len(b) != p.Len() || len(p.Payload) > MaxPayload {
		t.Fatalf("accepted %v: %d bytes, Len %d, payload %d", op, len(b), p.Len(), len(p.Payload))
	}
	out := make([]byte, len(b))
	n, err := p.Encode(out)
	if err != nil {
		t.Fatalf("accepted %v does not re-encode: %v", op, err)
	}
	// The pad bytes and the ICRC are not kept: compare what is.
	keep := n - int(p.BTH.PadCount) - ICRCLen
	if n != len(b) || string(out[:keep]) != string(b[:keep]) {
		t.Fatalf("%v re-encodes as\n%x\nnot\n%x", op, out[:n], b)
	}
}

// TestFuzzSeeds holds testdata/fuzz/FuzzDecode to one encoded packet and
// one datagram of every opcode (IPv4 and IPv6 alternating), as generated
// here; GOHFI_WRITE_SEEDS=1 writes them anew.
func TestFuzzSeeds(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzDecode")
	regen := os.Getenv("GOHFI_WRITE_SEEDS") == "1"
	if regen {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	r := rand.New(rand.NewPCG(7, 8))
	seed := func(name string, b []byte) {
		s := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b)
		path := filepath.Join(dir, name)
		if regen {
			if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
				t.Fatal(err)
			}
			return
		}
		if have, err := os.ReadFile(path); err != nil || string(have) != s {
			t.Errorf("seed %s missing or different (%v): GOHFI_WRITE_SEEDS=1 rewrites the corpus", path, err)
		}
	}
	for i, op := range validOpcodes() {
		p := randomPacket(r, op)
		if op.Payload() == PayloadData {
			p.Payload = p.Payload[:min(len(p.Payload), 13)]
		}
		b := make([]byte, p.Len())
		if _, err := p.Encode(b); err != nil {
			t.Fatal(err)
		}
		seed(fmt.Sprintf("packet-%s", op), b)
		ip := randomIP(r, i%2 == 1)
		d := make([]byte, DatagramLen(&ip, &p))
		if _, err := EncodeDatagram(d, &ip, SourcePort(p.BTH.DestQP), &p); err != nil {
			t.Fatal(err)
		}
		seed(fmt.Sprintf("datagram-%s", op), d)
	}
}
