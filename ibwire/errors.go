package ibwire

import (
	"errors"
	"fmt"
)

// The reasons a packet is refused. Every error from this package wraps one
// of them (errors.Is), so a receiver can count drops per reason.
var (
	ErrShort    = errors.New("too short")             // fewer bytes than the headers need
	ErrLength   = errors.New("bad length")            // a length field or the packet length disagrees
	ErrOpcode   = errors.New("unknown opcode")        // an opcode the IB tables do not define
	ErrReserved = errors.New("reserved bits set")     // a reserved field or value is not zero
	ErrVersion  = errors.New("unsupported version")   // IP version or BTH transport version
	ErrField    = errors.New("invalid field")         // a field holds a value out of its range
	ErrICRC     = errors.New("ICRC mismatch")         // the invariant CRC does not match
	ErrChecksum = errors.New("IP checksum mismatch")  // the IPv4 header checksum does not match
	ErrNotRoCE  = errors.New("not a RoCEv2 datagram") // not UDP, or not to port 4791
	ErrBuffer   = errors.New("buffer too small")      // an encode buffer cannot hold the result
)

// Error is a refusal: which header field, why (one of the Err* reasons),
// and the values involved.
type Error struct {
	Field  string // "BTH.PadCount", "RETH", "IPv4.IHL", ...
	Err    error  // the reason: ErrShort, ErrLength, ...
	Detail string // the values, for a reader
}

func (e *Error) Error() string {
	if e.Detail == "" {
		return "ibwire: " + e.Field + ": " + e.Err.Error()
	}
	return "ibwire: " + e.Field + ": " + e.Err.Error() + ": " + e.Detail
}

func (e *Error) Unwrap() error { return e.Err }

func fieldErr(field string, reason error, format string, args ...any) error {
	return &Error{Field: field, Err: reason, Detail: fmt.Sprintf(format, args...)}
}

func shortErr(field string, need, have int) error {
	return &Error{Field: field, Err: ErrShort, Detail: fmt.Sprintf("need %d bytes, have %d", need, have)}
}

// bufCheck refuses an encode buffer shorter than n.
func bufCheck(field string, b []byte, n int) error {
	if len(b) < n {
		return &Error{Field: field, Err: ErrBuffer, Detail: fmt.Sprintf("need %d bytes, have %d", n, len(b))}
	}
	return nil
}

// encodeHdr writes a header of n bytes into b with put, once b is long
// enough and check (if not nil) accepts the fields.
func encodeHdr(field string, b []byte, n int, check func() error, put func([]byte)) error {
	if err := bufCheck(field, b, n); err != nil {
		return err
	}
	if check != nil {
		if err := check(); err != nil {
			return err
		}
	}
	put(b)
	return nil
}

// decodeHdr reads a header of n bytes from b with get, once b is long
// enough.
func decodeHdr(field string, b []byte, n int, get func([]byte)) error {
	if err := shortCheck(field, b, n); err != nil {
		return err
	}
	get(b)
	return nil
}

// shortCheck refuses input shorter than n.
func shortCheck(field string, b []byte, n int) error {
	if len(b) < n {
		return shortErr(field, n, len(b))
	}
	return nil
}
