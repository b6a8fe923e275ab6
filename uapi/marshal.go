package uapi

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Marshallable is implemented by every ABI struct in this package, in the
// manner of gVisor's marshal.Marshallable: the struct's memory, which is its
// C layout, of exactly the C size (layout_unsafe.go). Padding and reserved
// fields are part of it: zero in a struct built in Go, carried along in one
// that was unmarshalled, as C's copy_from_user and copy_to_user of one struct.
type Marshallable interface {
	// SizeBytes is sizeof() of the C struct.
	SizeBytes() int
	// MarshalBytes encodes into dst[:SizeBytes()]; it panics if dst is
	// shorter (use Marshal to get EINVAL instead).
	MarshalBytes(dst []byte)
	// UnmarshalBytes decodes src[:SizeBytes()]; a shorter src is an error
	// wrapping EINVAL and leaves the receiver unchanged.
	UnmarshalBytes(src []byte) error
}

// Marshal encodes m into dst, failing with EINVAL if dst is too short.
func Marshal(m Marshallable, dst []byte) error {
	if len(dst) < m.SizeBytes() {
		return shortBuffer(fmt.Sprintf("%T", m), len(dst), m.SizeBytes())
	}
	m.MarshalBytes(dst)
	return nil
}

// shortBuffer is the error of every UnmarshalBytes given too few bytes.
// It only runs on the error path, so the hot path stays allocation-free.
func shortBuffer(what string, have, want int) error {
	return fmt.Errorf("uapi: %s: buffer of %d bytes, need %d: %w", what, have, want, unix.EINVAL)
}
