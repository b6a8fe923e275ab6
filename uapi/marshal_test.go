package uapi

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"reflect"
	"testing"

	"golang.org/x/sys/unix"
)

// newOf returns a fresh zero value of the same struct type as m.
func newOf(m Marshallable) Marshallable {
	return reflect.New(reflect.TypeOf(m).Elem()).Interface().(Marshallable)
}

// fillFields sets every named field of m from r, as a handler builds a
// reply: blank fields (padding) stay as Go made them.
func fillFields(m Marshallable, r *rand.Rand) {
	v := reflect.ValueOf(m).Elem()
	for i := 0; i < v.NumField(); i++ {
		f := v.Field(i)
		if v.Type().Field(i).Name == "_" {
			continue
		}
		switch f.Kind() {
		case reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
			f.SetUint(r.Uint64())
		case reflect.Array:
			for j := 0; j < f.Len(); j++ {
				f.Index(j).SetUint(r.Uint64())
			}
		default:
			panic("unexpected field kind " + f.Kind().String())
		}
	}
}

// TestMarshalRoundTrip: UnmarshalBytes then MarshalBytes gives back every
// byte of the input (the struct is its memory, padding and reserved fields
// included, as C's copy_from_user and copy_to_user of the same struct), and
// neither reads nor writes past SizeBytes.
func TestMarshalRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for _, s := range abiStructs {
		m := newOf(s.v)
		n := m.SizeBytes()
		if uintptr(n) != reflect.TypeOf(m).Elem().Size() {
			t.Errorf("%s: SizeBytes %d != Go size %d", s.c, n, reflect.TypeOf(m).Elem().Size())
		}
		in := make([]byte, n+5) // longer input is accepted
		for i := range in {
			in[i] = byte(r.Uint32())
		}
		if err := m.UnmarshalBytes(in); err != nil {
			t.Fatalf("%s: %v", s.c, err)
		}
		out := bytes.Repeat([]byte{0xAA}, n+5)
		m.MarshalBytes(out)
		if !bytes.Equal(out[:n], in[:n]) {
			t.Errorf("%s: in\n%x\nout\n%x", s.c, in[:n], out[:n])
		}
		if !bytes.Equal(out[n:], bytes.Repeat([]byte{0xAA}, 5)) {
			t.Errorf("%s: MarshalBytes wrote past SizeBytes", s.c)
		}
		// Every byte reaches the struct: a zero struct differs.
		if reflect.DeepEqual(m, newOf(s.v)) {
			t.Errorf("%s: unmarshal left the struct zero", s.c)
		}
	}
}

// TestMarshalZeroesPadding: a struct built in Go, as the driver builds its
// replies, marshals its padding as zero, whatever was in the buffer, so no
// stale bytes reach user space.
func TestMarshalZeroesPadding(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	for _, s := range abiStructs {
		m := newOf(s.v)
		fillFields(m, r)
		out := bytes.Repeat([]byte{0xAA}, m.SizeBytes())
		m.MarshalBytes(out)
		rt := reflect.TypeOf(m).Elem()
		for i := 0; i < rt.NumField(); i++ {
			f := rt.Field(i)
			if f.Name != "_" {
				continue
			}
			if pad := out[f.Offset : f.Offset+f.Type.Size()]; !bytes.Equal(pad, make([]byte, len(pad))) {
				t.Errorf("%s: padding at %d marshalled as %x", s.c, f.Offset, pad)
			}
		}
		back := newOf(s.v)
		if err := back.UnmarshalBytes(out); err != nil || !reflect.DeepEqual(back, m) {
			t.Errorf("%s: %+v marshalled and unmarshalled as %+v (%v)", s.c, m, back, err)
		}
	}
}

func TestUnmarshalShortBuffer(t *testing.T) {
	for _, s := range abiStructs {
		m := newOf(s.v)
		m.UnmarshalBytes(bytes.Repeat([]byte{7}, m.SizeBytes()))
		before := reflect.ValueOf(m).Elem().Interface()
		err := m.UnmarshalBytes(make([]byte, m.SizeBytes()-1))
		if !errors.Is(err, unix.EINVAL) {
			t.Errorf("%s: short buffer: %v, want EINVAL", s.c, err)
		}
		if !reflect.DeepEqual(before, reflect.ValueOf(m).Elem().Interface()) {
			t.Errorf("%s: failed unmarshal changed the struct", s.c)
		}
		if err := Marshal(m, make([]byte, m.SizeBytes()-1)); !errors.Is(err, unix.EINVAL) {
			t.Errorf("%s: Marshal into short buffer: %v, want EINVAL", s.c, err)
		}
		if err := Marshal(m, make([]byte, m.SizeBytes())); err != nil {
			t.Errorf("%s: Marshal: %v", s.c, err)
		}
	}
}

func TestMarshalDoesNotAllocate(t *testing.T) {
	for _, s := range abiStructs {
		m := newOf(s.v)
		buf := make([]byte, m.SizeBytes())
		allocs := testing.AllocsPerRun(100, func() {
			if err := m.UnmarshalBytes(buf); err != nil {
				t.Fatal(err)
			}
			m.MarshalBytes(buf)
		})
		if allocs != 0 {
			t.Errorf("%s: %v allocations per unmarshal+marshal", s.c, allocs)
		}
	}
}

func BenchmarkTidInfoUnmarshalMarshal(b *testing.B) {
	var ti Hfi1TidInfo
	buf := make([]byte, SizeofHfi1TidInfo)
	b.ReportAllocs()
	for b.Loop() {
		if err := ti.UnmarshalBytes(buf); err != nil {
			b.Fatal(err)
		}
		ti.Tidcnt++
		ti.MarshalBytes(buf)
	}
}

// FuzzUnmarshal decodes arbitrary bytes as each ABI struct: short input must
// fail with EINVAL, longer input must round-trip through MarshalBytes to the
// same bytes, and re-decoding must be stable.
func FuzzUnmarshal(f *testing.F) {
	for i, s := range abiStructs {
		n := s.v.SizeBytes()
		f.Add(uint8(i), make([]byte, n))
		f.Add(uint8(i), bytes.Repeat([]byte{0xff}, n))
		f.Add(uint8(i), make([]byte, n-1))
		seq := make([]byte, n+3)
		for j := range seq {
			seq[j] = byte(j)
		}
		f.Add(uint8(i), seq)
	}
	f.Fuzz(func(t *testing.T, which uint8, data []byte) {
		s := abiStructs[int(which)%len(abiStructs)]
		m := newOf(s.v)
		n := m.SizeBytes()
		err := m.UnmarshalBytes(data)
		if len(data) < n {
			if !errors.Is(err, unix.EINVAL) {
				t.Fatalf("%s: %d bytes: %v, want EINVAL", s.c, len(data), err)
			}
			return
		}
		if err != nil {
			t.Fatalf("%s: %v", s.c, err)
		}
		out := make([]byte, n)
		m.MarshalBytes(out)
		if !bytes.Equal(out, data[:n]) {
			t.Fatalf("%s: in %x out %x", s.c, data[:n], out)
		}
		m2 := newOf(s.v)
		if err := m2.UnmarshalBytes(out); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(m, m2) {
			t.Fatalf("%s: not stable: %+v vs %+v", s.c, m, m2)
		}
	})
}
