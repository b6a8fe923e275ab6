package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/gohfi/gohfi/internal/testenv"
)

// TestFRWRPart runs the demo's fast-registration part, small: both modes
// serve their requests with the data verified, every line is printed, and
// the stale rkey is refused.
func TestFRWRPart(t *testing.T) {
	testenv.RequireRoot(t, "io_uring pins")
	var out bytes.Buffer
	if err := runFRWR(&out, "embedded", frwrConfig{requests: 40, size: 4096, block: 10, pool: 256 << 10}); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	t.Log("\n" + out.String())
	for _, want := range []string{"FRWR        ", "40 requests per mode", "data verified", "FRWR REG_MR ", "(40 REG_MR)",
		"FRWR fastreg", "20 SEND_WITH_INV, 20 LOCAL_INV", "FRWR ratio  ", "FRWR stale  ", ": REM_ACCESS_ERR (vendor error "} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q", want)
		}
	}
}
