package ibwire

// PSN is a 24-bit packet sequence number. PSNs wrap: of two PSNs, the one
// less than 2^23 ahead (modulo 2^24) is the later, which is how IB vol. 1
// 9.7.5 splits the space around a responder's expected PSN into a valid
// half (ahead) and a duplicate half (behind).
type PSN uint32

// PSNWindow is half the PSN space: the most by which two comparable PSNs
// may differ.
const PSNWindow = 1 << 23

// Add is p advanced by n (n may be negative), modulo 2^24.
func (p PSN) Add(n int32) PSN { return PSN((uint32(p) + uint32(n)) & Mask24) }

// Next is p + 1 modulo 2^24.
func (p PSN) Next() PSN { return p.Add(1) }

// Sub is the signed distance p - q in [-2^23, 2^23): positive when p is
// after q.
func (p PSN) Sub(q PSN) int32 {
	return int32((uint32(p)-uint32(q))<<8) >> 8
}

// Before reports whether p comes before q.
func (p PSN) Before(q PSN) bool { return p.Sub(q) < 0 }

// After reports whether p comes after q.
func (p PSN) After(q PSN) bool { return p.Sub(q) > 0 }

// InRange reports whether p lies in [first, first+n) modulo 2^24, for
// n <= 2^24: a requester's outstanding window, or the PSNs of one message.
func (p PSN) InRange(first PSN, n uint32) bool {
	return (uint32(p)-uint32(first))&Mask24 < n
}

// Valid reports whether p fits in 24 bits.
func (p PSN) Valid() bool { return p <= Mask24 }
