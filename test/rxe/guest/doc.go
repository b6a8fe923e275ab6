// Package guest is the guest side of test/rxe: inside the QEMU guest it
// brings up eth0 and a soft-RoCE device (rdma_rxe) on it, then runs the
// stock ibv_rc_pingpong against hfictl pingpong on the host, as the host
// test asks over a control connection.
//
// The tests are behind the gohfiguest build tag (see test/qemu/guestprobe).
package guest
