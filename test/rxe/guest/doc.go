// Package guest is the guest side of test/rxe: inside the QEMU guest it
// brings up eth0 and a soft-RoCE device (rdma_rxe) on it, then runs the
// stock ibv_rc_pingpong against hfictl pingpong on the host, as the host
// test asks over a control connection.
//
// The tests are behind the gohfiguest build tag (see test/qemu/guestprobe).
package guest

// Set by the host test (test/rxe) in the guest tests' environment.
const (
	EnvHost  = "GOHFI_RXE_HOST"  // the host's tap address
	EnvGuest = "GOHFI_RXE_GUEST" // this guest's eth0 address with its prefix
	EnvCtl   = "GOHFI_RXE_CTL"   // the host's control port
)

// RDMAProgram is where test/rxe/testdata/rxe_rdma.c, built on the host,
// is in the guest.
const RDMAProgram = "/gohfi/bin/rxe_rdma"
