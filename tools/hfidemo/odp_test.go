package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/gohfi/gohfi/internal/testenv"
	"golang.org/x/sys/unix"
)

// TestODPPart runs the demo's ODP part, smaller: every line is printed, the
// munmapped range fails with REM_ACCESS_ERR, and RLIMIT_MEMLOCK is back.
func TestODPPart(t *testing.T) {
	testenv.RequireRoot(t, "userfaultfd and io_uring pins")
	var before, after unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_MEMLOCK, &before); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := runODP(&out, "embedded", odpConfig{size: 4 << 20, chunk: 256 << 10, memlock: 2 << 20}); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	t.Log("\n" + out.String())
	for _, want := range []string{"ODP write ", "verified by CRC32", "ODP stats ", "ODP munmap ", "REM_ACCESS_ERR (vendor error 13"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q", want)
		}
	}
	if err := unix.Getrlimit(unix.RLIMIT_MEMLOCK, &after); err != nil || after != before {
		t.Fatalf("RLIMIT_MEMLOCK %+v after the part, %+v before (%v)", after, before, err)
	}
}
