// Package testenv is the one place tests decide whether a missing machine
// feature (root, userfaultfd, io_uring, eBPF, KVM, QEMU, a kernel
// interface) skips them, as cilium/ebpf's testutils and Go's internal
// testenv do. A test skips only when the feature is really missing: an
// error that means "not here" (ENOSYS, EOPNOTSUPP, EPERM, EACCES, ENOENT,
// ENODEV, ebpf.ErrNotSupported); any other error is a failure, so a
// regression that returns EINVAL cannot hide as a skip. Under CI=true a
// missing feature fails too: CI's machines have everything.
package testenv

import (
	"errors"
	"os"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// CI reports whether the tests run under CI=true, where nothing may skip.
func CI() bool { return os.Getenv("CI") == "true" }

// missing are the errnos that mean the feature is not on this machine or
// not allowed to this process.
var missing = []error{unix.ENOSYS, unix.EOPNOTSUPP, unix.EPERM, unix.EACCES, unix.ENOENT, unix.ENODEV,
	ebpf.ErrNotSupported}

// IsMissing reports whether err says that a feature is absent rather than
// broken.
func IsMissing(err error) bool {
	for _, m := range missing {
		if errors.Is(err, m) {
			return true
		}
	}
	return false
}

// Require passes when err is nil, skips when err says what is missing
// (fails under CI=true), and fails on any other error.
func Require(tb testing.TB, err error, what string) {
	tb.Helper()
	switch {
	case err == nil:
	case !IsMissing(err):
		tb.Fatalf("%s: %v (not a missing feature: failing, not skipping)", what, err)
	case CI():
		tb.Fatalf("%s: %v (CI=true: not skipping)", what, err)
	default:
		tb.Skipf("%s: %v", what, err)
	}
}

// Missing skips for a feature found absent by other means than an error
// (a capability bit, a file), or fails under CI=true.
func Missing(tb testing.TB, format string, args ...any) {
	tb.Helper()
	if CI() {
		tb.Fatalf("CI=true, not skipping: "+format, args...)
	}
	tb.Skipf(format, args...)
}

// RequireRoot skips (fails under CI=true) unless the test runs as root;
// why says what needs it.
func RequireRoot(tb testing.TB, why string) {
	tb.Helper()
	if os.Geteuid() != 0 {
		Missing(tb, "needs root: %s", why)
	}
}
