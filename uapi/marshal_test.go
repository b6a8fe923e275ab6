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

// covered marks the bytes that belong to named fields (not padding).
func covered(m Marshallable) []bool {
	rt := reflect.TypeOf(m).Elem()
	mask := make([]bool, rt.Size())
	for i := 0; i < rt.NumField(); i++ {
		f := rt.Field(i)
		if f.Name == "_" {
			continue
		}
		for j := uintptr(0); j < f.Type.Size(); j++ {
			mask[f.Offset+j] = true
		}
	}
	return mask
}

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
		mask := covered(m)
		for i := 0; i < n; i++ {
			if mask[i] && out[i] != in[i] {
				t.Errorf("%s: byte %d: in %#x out %#x", s.c, i, in[i], out[i])
			}
			if !mask[i] && out[i] != 0 {
				t.Errorf("%s: padding byte %d written as %#x, want 0", s.c, i, out[i])
			}
		}
		if !bytes.Equal(out[n:], bytes.Repeat([]byte{0xAA}, 5)) {
			t.Errorf("%s: MarshalBytes wrote past SizeBytes", s.c)
		}
		// Every covered byte must reach some field: a zero struct differs.
		if reflect.DeepEqual(m, newOf(s.v)) {
			t.Errorf("%s: unmarshal left the struct zero", s.c)
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
// same field bytes (padding zero), and re-decoding must be stable.
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
		mask := covered(m)
		for i := range out {
			if want := data[i]; mask[i] && out[i] != want || !mask[i] && out[i] != 0 {
				t.Fatalf("%s: byte %d: in %#x out %#x (field byte %v)", s.c, i, data[i], out[i], mask[i])
			}
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
