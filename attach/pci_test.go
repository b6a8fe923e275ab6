package attach

import (
	"context"
	"errors"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/vfio"
)

func TestNormalizeBDF(t *testing.T) {
	for in, want := range map[string]string{
		"0000:00:03.0": "0000:00:03.0",
		"00:03.0":      "0000:00:03.0",
		"0000:AF:1F.7": "0000:af:1f.7",
		"0001:00:04.1": "0001:00:04.1",
	} {
		if got, err := normalizeBDF(in); err != nil || got != want {
			t.Errorf("normalizeBDF(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "3", "00:20.0", "00:03.8", "0000:00:03", "x0000:00:03.0", "../../etc"} {
		if _, err := normalizeBDF(bad); !errors.Is(err, unix.EINVAL) {
			t.Errorf("normalizeBDF(%q): %v, want EINVAL", bad, err)
		}
	}
}

// TestPCISpecFailsOnlyAtOpen: "pci:" is known to attach without any
// opener registered; a malformed address is EINVAL, and a well-formed one
// that is not there fails in the kernel backend with the address named.
func TestPCISpecFailsOnlyAtOpen(t *testing.T) {
	ctx := context.Background()
	if _, err := Open(ctx, "pci:not-an-address", DefaultOptions()); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("pci:not-an-address: %v, want EINVAL", err)
	}
	// Domain ffff does not exist on any machine this runs on.
	_, err := Open(ctx, "pci:ffff:00:1f.7", DefaultOptions())
	if err == nil {
		t.Fatal("pci:ffff:00:1f.7 opened")
	}
	if want := "ffff:00:1f.7"; !strings.Contains(err.Error(), want) {
		t.Fatalf("error %q does not name %s", err, want)
	}
	if _, err := Open(ctx, "nosuch:x", DefaultOptions()); err == nil {
		t.Fatal("unknown prefix accepted")
	}
}

// TestPCIOpenerOverride: an Openers["pci"] entry replaces OpenPCI.
func TestPCIOpenerOverride(t *testing.T) {
	sentinel := errors.New("test opener called")
	var got string
	o := DefaultOptions()
	o.Openers = map[string]Opener{"pci": func(ctx context.Context, arg string) (vfio.Device, error) {
		got = arg
		return nil, sentinel
	}}
	if _, err := Open(context.Background(), "pci:0000:00:04.0", o); !errors.Is(err, sentinel) {
		t.Fatalf("Open: %v, want the test opener's error", err)
	}
	if got != "0000:00:04.0" {
		t.Fatalf("opener got %q", got)
	}
}
