package chip

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"reflect"
	"structs"
	"testing"
)

// coder is what every in-memory format has.
type coder interface {
	Marshal(b []byte)
	Unmarshal(b []byte)
}

// formats lists every in-memory format with its size.
var formats = []struct {
	name string
	v    coder
	size int
}{
	{"SendDesc", &SendDesc{}, SendDescSize},
	{"MPTEntry", &MPTEntry{}, MPTEntrySize},
	{"SendWQE", &SendWQE{}, SendWQESize},
	{"RecvWQE", &RecvWQE{}, RecvWQESize},
	{"CQE", &CQE{}, CQESize},
	{"EQE", &EQE{}, EQESize},
}

func newOf(c coder) coder { return reflect.New(reflect.TypeOf(c).Elem()).Interface().(coder) }

// fill sets every named field of v (recursively into SGEs) from r, as the
// driver or the device builds an entry.
func fill(v reflect.Value, r *rand.Rand) {
	switch v.Kind() {
	case reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		v.SetUint(r.Uint64())
	case reflect.Array:
		for i := 0; i < v.Len(); i++ {
			fill(v.Index(i), r)
		}
	case reflect.Struct:
		for i := 0; i < v.NumField(); i++ {
			if v.Type().Field(i).Name != "_" {
				fill(v.Field(i), r)
			}
		}
	}
}

// reserved marks the bytes of blank fields (reserved) of type rt at off.
func reserved(rt reflect.Type, off uintptr, mask []bool) {
	for i := 0; i < rt.NumField(); i++ {
		f := rt.Field(i)
		switch {
		case f.Name == "_":
			for j := uintptr(0); j < f.Type.Size(); j++ {
				mask[off+f.Offset+j] = true
			}
		case f.Type.Kind() == reflect.Array && f.Type.Elem().Kind() == reflect.Struct:
			for k := 0; k < f.Type.Len(); k++ {
				reserved(f.Type.Elem(), off+f.Offset+uintptr(k)*f.Type.Elem().Size(), mask)
			}
		}
	}
}

// TestFormatsAreTheirMemory: every format (and SGE) is structs.HostLayout
// and its fields, named or reserved, tile it with no padding the compiler
// added. With the offsets checked in layout_unsafe.go, every byte of the
// memory image is the table's.
func TestFormatsAreTheirMemory(t *testing.T) {
	hostLayout := reflect.TypeFor[structs.HostLayout]()
	types := []reflect.Type{reflect.TypeFor[SGE]()}
	for _, f := range formats {
		types = append(types, reflect.TypeOf(f.v).Elem())
	}
	for _, rt := range types {
		if rt.Field(0).Type != hostLayout {
			t.Errorf("%s: first field is not structs.HostLayout", rt.Name())
		}
		var end uintptr
		for i := 1; i < rt.NumField(); i++ {
			f := rt.Field(i)
			if f.Offset != end {
				t.Errorf("%s: %d bytes of implicit padding before %s", rt.Name(), f.Offset-end, f.Name)
			}
			end = f.Offset + f.Type.Size()
		}
		if end != rt.Size() {
			t.Errorf("%s: %d bytes of implicit tail padding", rt.Name(), rt.Size()-end)
		}
	}
}

// TestMarshal: Marshal writes exactly the format's bytes, the reserved
// ones as zero over whatever the slot held; Unmarshal reads them back.
func TestMarshal(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, f := range formats {
		v := newOf(f.v)
		fill(reflect.ValueOf(v).Elem(), r)
		b := bytes.Repeat([]byte{0xAA}, f.size+4)
		v.Marshal(b)
		if !bytes.Equal(b[f.size:], []byte{0xAA, 0xAA, 0xAA, 0xAA}) {
			t.Errorf("%s: Marshal wrote past %d bytes", f.name, f.size)
		}
		mask := make([]bool, f.size)
		reserved(reflect.TypeOf(v).Elem(), 0, mask)
		for i, res := range mask {
			if res && b[i] != 0 {
				t.Errorf("%s: reserved byte %d is %#x, want 0", f.name, i, b[i])
			}
		}
		back := newOf(f.v)
		back.Unmarshal(b)
		if !reflect.DeepEqual(back, v) {
			t.Errorf("%s: %+v came back as %+v", f.name, v, back)
		}
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("%s: Marshal into %d bytes did not panic", f.name, f.size-1)
				}
			}()
			v.Marshal(make([]byte, f.size-1))
		}()
	}
}

// TestFormatsLittleEndian pins fields of the tables to their bytes.
func TestFormatsLittleEndian(t *testing.T) {
	var b [SendWQESize]byte
	w := SendWQE{WrID: 0x0102030405060708, Rkey: 0x11223344, FrAccess: 0x55667788}
	w.SGE[1] = SGE{Addr: 0x99, Length: 0xaabbccdd, Lkey: 0xeeff0011}
	w.Marshal(b[:])
	le := binary.LittleEndian
	if le.Uint64(b[0:]) != w.WrID || le.Uint32(b[24:]) != w.Rkey || le.Uint32(b[104:]) != w.FrAccess ||
		le.Uint64(b[wqeSGEOff+SGESize:]) != 0x99 || le.Uint32(b[wqeSGEOff+SGESize+8:]) != 0xaabbccdd ||
		le.Uint32(b[wqeSGEOff+SGESize+12:]) != 0xeeff0011 {
		t.Errorf("send WQE encoded as %x", b)
	}
	// The CQE word the device writes last: wc_flags | seq << 32.
	var c [CQESize]byte
	e := CQE{WcFlags: 0x2, Seq: 0x12345678}
	e.Marshal(c[:])
	if got := le.Uint64(c[CQESeqWordOff:]); got != 0x12345678_00000002 {
		t.Errorf("CQE seq word %#x", got)
	}
}
