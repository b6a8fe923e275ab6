// Package guestprobe holds tests that run inside the QEMU guest booted by
// test/qemu: they report what the guest kernel allows (userfaultfd, BPF
// programs, tracefs, VFIO) as GOHFI-FACT lines and check the essentials.
//
// The tests are behind the gohfiguest build tag, so that `go test ./...` on
// the host does not see them; the harness builds them with
// `go test -c -tags gohfiguest`.
package guestprobe
