// Package dma holds what the driver needs to let a device reach process
// memory: pins and device addresses.
//
//   - Accountant counts pinned pages against RLIMIT_MEMLOCK, as hfi1's
//     hfi1_can_pin_pages does, shared by everything that pins in one driver
//     instance (user_pages.go).
//   - Pinner holds long-term pins of ordinary anonymous or memfd memory as
//     io_uring fixed buffers and reads and writes the pinned pages
//     themselves, even after the application unmapped them or mapped new
//     memory at the same address: a Pin is the vfio.DMAAccessor of a
//     host-native (vfio-user) DMA mapping (pin.go, io_uring.go). Memory
//     mapped without PROT_WRITE, which io_uring cannot pin, is held for
//     device reads by PinReadOnly: page references in pipes (pin_ro.go).
//   - IOVAAllocator hands out device address ranges inside the usable IOVA
//     ranges (iova.go).
//
// io_uring is driven with raw system calls (io_uring_setup, _enter,
// _register) and rings mapped by hand; the unsafe parts are in
// io_uring_unsafe.go. docs/pinning.md explains why the host-native path
// needs pins and how they are accounted.
package dma
