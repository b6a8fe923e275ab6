package vfiouser

import (
	"math"
	"reflect"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/vfio"
)

// TestIOVARanges: the protocol carries no IOVA ranges, so the client
// reports the protocol's own limit, everything but the top page, and that
// is exactly what DMA_MAP accepts.
func TestIOVARanges(t *testing.T) {
	leakCheck(t)
	c, _, _ := newPair(t, nil, nil)
	ranges := c.IOVARanges()
	if want := []vfio.IOVARange{{Start: 0, End: math.MaxUint64 - 4096}}; !reflect.DeepEqual(ranges, want) {
		t.Fatalf("IOVARanges = %v, want %v", ranges, want)
	}
	last := ranges[0].End + 1 - 4096
	acc := &memAccessor{b: make([]byte, 4096)}
	if err := c.DMAMap(vfio.DMAMapping{IOVA: last, Size: 4096, Flags: vfio.DMARead, Access: acc}); err != nil {
		t.Fatalf("DMAMap of the last page in range: %v", err)
	}
	if err := c.DMAUnmap(last, 4096); err != nil {
		t.Fatal(err)
	}
	if err := c.DMAMap(vfio.DMAMapping{IOVA: last + 4096, Size: 4096, Flags: vfio.DMARead, Access: acc}); !isErrno(err, unix.EINVAL) {
		t.Fatalf("DMAMap of the top page = %v, want EINVAL", err)
	}
}

// TestMessageTable: every command has a name, and the fds rules are the
// protocol's: only DMA_MAP and SET_IRQS requests, only GET_REGION_INFO
// replies.
func TestMessageTable(t *testing.T) {
	for cmd, m := range messages {
		if cmd == 0 || cmd == 14 {
			if m != (message{}) {
				t.Errorf("command %d: %+v, want none", cmd, m)
			}
			continue
		}
		if m.name == "" {
			t.Errorf("command %d has no name", cmd)
		}
		if want := cmd == 2 || cmd == 8; m.reqFDs != want {
			t.Errorf("%s: request fds %v", m.name, m.reqFDs)
		}
		if want := cmd == 5 || cmd == 6; m.replyFD != want {
			t.Errorf("%s: reply fd %v", m.name, m.replyFD)
		}
	}
	if n := cmdName(99); n != "command 99" {
		t.Errorf("cmdName(99) = %q", n)
	}
	// A decoder used with the wrong structure is a programming error.
	defer func() {
		if recover() == nil {
			t.Error("decode of a mismatched structure did not panic")
		}
	}()
	var h header
	decode(2, false, make([]byte, 64), &h)
}
