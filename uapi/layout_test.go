package uapi

import (
	"bytes"
	"reflect"
	"structs"
	"testing"
)

// TestLayoutsAreTheirMemory checks what makes MarshalBytes (a copy of the
// struct's memory) the C layout, beyond the offsets and sizes that
// parity_test.go compares with C: every struct is structs.HostLayout, and
// its fields, named or blank, tile it with no padding the compiler added,
// so that no byte of the memory image is left undefined.
func TestLayoutsAreTheirMemory(t *testing.T) {
	hostLayout := reflect.TypeFor[structs.HostLayout]()
	for _, s := range abiStructs {
		rt := reflect.TypeOf(s.v).Elem()
		hasHostLayout := false
		var end uintptr
		for i := 0; i < rt.NumField(); i++ {
			f := rt.Field(i)
			if f.Type == hostLayout {
				hasHostLayout = true
				continue
			}
			if f.Offset != end {
				t.Errorf("%s: %d bytes of implicit padding before %s: make it an explicit field", s.c, f.Offset-end, f.Name)
			}
			end = f.Offset + f.Type.Size()
		}
		if end != rt.Size() {
			t.Errorf("%s: %d bytes of implicit tail padding: make it an explicit field", s.c, rt.Size()-end)
		}
		if !hasHostLayout {
			t.Errorf("%s: no structs.HostLayout field", s.c)
		}
	}
}

// TestMarshalLittleEndian pins the byte order of the encoding (the package
// does not build on a big-endian host: endian_little.go).
func TestMarshalLittleEndian(t *testing.T) {
	ti := Hfi1TidInfo{Vaddr: 0x0102030405060708, Tidcnt: 0x0a0b0c0d}
	b := make([]byte, SizeofHfi1TidInfo)
	ti.MarshalBytes(b)
	if want := []byte{8, 7, 6, 5, 4, 3, 2, 1}; !bytes.Equal(b[0:8], want) {
		t.Errorf("vaddr encoded as %x, want %x", b[0:8], want)
	}
	if want := []byte{0xd, 0xc, 0xb, 0xa}; !bytes.Equal(b[16:20], want) {
		t.Errorf("tidcnt encoded as %x, want %x", b[16:20], want)
	}
}
