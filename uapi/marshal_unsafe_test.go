package uapi

import (
	"bytes"
	"math/rand/v2"
	"reflect"
	"testing"
	"unsafe"
)

// TestMarshalMatchesMemoryLayout checks that each MarshalBytes produces the
// Go struct's own memory image on this little-endian host. With the C parity
// of the Go layout (parity_test.go) this ties the hand-written encodings to
// the C layout, field by field.
func TestMarshalMatchesMemoryLayout(t *testing.T) {
	if *(*byte)(unsafe.Pointer(&[]uint16{1}[0])) != 1 {
		t.Skip("big-endian host: the memory image is not the wire format")
	}
	r := rand.New(rand.NewPCG(5, 6))
	for _, s := range abiStructs {
		m := newOf(s.v)
		in := make([]byte, m.SizeBytes())
		for i := range in {
			in[i] = byte(r.Uint32())
		}
		if err := m.UnmarshalBytes(in); err != nil {
			t.Fatal(err)
		}
		out := make([]byte, m.SizeBytes())
		m.MarshalBytes(out)
		p := reflect.ValueOf(m).UnsafePointer()
		mem := unsafe.Slice((*byte)(p), m.SizeBytes())
		if !bytes.Equal(out, mem) {
			t.Errorf("%s: MarshalBytes\n%x\nmemory\n%x", s.c, out, mem)
		}
	}
}
