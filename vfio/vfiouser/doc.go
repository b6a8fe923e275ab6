// Package vfiouser implements the vfio-user protocol (QEMU's
// docs/interop/vfio-user.rst, version 0.0) on unix stream sockets: a Client
// that is a vfio.Device for the driver, and a Server that serves a
// DeviceModel to a client such as our own or QEMU's vfio-user-pci.
//
// # Wire
//
// Every message is a 16-byte little-endian header {msg_id, cmd, size, flags,
// errno} and a payload; fds travel as SCM_RIGHTS with the first byte of the
// message. The framed reader (socket.go) is buffered, so a small message
// costs at most one recvmsg, and it still gives every message exactly its
// own fds: the kernel ends a read right after data that carried fds, so
// the fds of a read belong to the last message that starts inside it; fds
// no message can claim are closed. It receives with MSG_CMSG_CLOEXEC into a
// control buffer sized for max_msg_fds, so a message with more fds is
// truncated by the kernel, rejected, and the fds that did arrive are
// closed. Messages are capped at max_data_xfer_size plus 4 KiB of headers;
// a larger size, or one smaller than the header, breaks the framing and
// ends the connection. Decoders check every length before use.
//
// # Server
//
// Per client, a reader goroutine reads all messages: replies to the
// server's own DMA_READ/DMA_WRITE requests go straight to their waiters,
// commands are queued (bounded in bytes) for the handler goroutine, which
// runs them in order and calls the model. The split is what lets a model
// DMA synchronously from inside a register write: the client's DMA reply is
// read while the handler waits.
//
// The DMA the model is attached to is an IOMMU over the client's mappings
// (iommu.go): a sorted table; an access may span adjacent mappings but must
// be covered entirely with the needed permission, or it fails with
// ErrIOMMUFault and copies nothing. Mappings that came with an fd are
// mmapped MAP_SHARED (the fd is closed at once) and accessed with memcpy,
// guarded against SIGBUS from a client that truncates the file; mappings
// without fd are reached with DMA_READ/DMA_WRITE requests over the socket.
// It is also a Copier: Copy moves bytes from one IOVA range to another
// with both checked first, as one memcpy between two fd mappings, or with
// the fd mapping as the DMA_READ/DMA_WRITE buffer, so a device model need
// not stage data (CopyDMA falls back to Read and Write for other DMAs).
// Accesses hold the table's read lock, DMA_UNMAP its write lock, so unmap
// returns (and munmaps) only once no access can touch the memory.
//
// A model that implements IOFDModel offers ioeventfds for sub-regions of
// its regions: DEVICE_GET_REGION_IO_FDS answers them with one fd per
// distinct eventfd (a request too small for them all gets the argsz and
// count needed, as for GET_REGION_INFO). The model makes them at Attach
// and closes them at Detach.
//
// When the client goes, the server fails pending DMA requests, drops all
// mappings, disables the interrupts the client set, calls model.Detach and
// closes the socket; the device state is otherwise kept, as the
// specification asks.
//
// # Client
//
// A reader goroutine demultiplexes replies by msg_id to the waiting calls
// and serves the server's DMA requests in place: through DMAMapping.Access
// when set, otherwise with process_vm_readv/writev on our own pid, so an
// address that was unmapped (or is read-only, for a write) yields an errno
// reply, never a crash. Every call has a timeout (WithTimeout, 5 s by
// default); when the server disappears every pending and later call fails
// with an error wrapping vfio.ErrDisconnected. Replies are validated as
// hostile input: ids, commands, sizes, argsz, fds, region offsets.
//
// At the first posted write to a region the client asks for its
// ioeventfds (checked as hostile: inside the region, a register's size,
// on an eventfd of the reply; ioregionfd and PIO sub-regions are left
// out; a server that refuses the request offers none), and from then on a
// posted write that one covers (offset, size, datamatch) is an 8-byte
// write to that eventfd instead of a message (ioefd.go).
//
// Calls reuse pooled buffers and timers, so a register round trip does not
// allocate in the steady state; one mutex serialises writers on the socket.
//
// # Deviations and limits
//
// The specification gives DMA_READ/DMA_WRITE count 8 bytes (data at payload
// offset 16), which is what both sides here use; QEMU's own structure puts a
// 4-byte count there, so DMA without fds to a QEMU client is not expected
// to interoperate (QEMU with memory-backend-memfd sends fds and never needs
// it). Twin-socket mode, migration and dirty-page logging are not
// implemented; DEVICE_FEATURE is answered ENOTTY. Interrupt mask/unmask
// requests without eventfds are accepted and left to the model's own
// masking; eventfds for mask/unmask notification and client-triggered
// interrupts are refused with ENOTSUP.
//
// A DMAMapping.Access callback runs on the client's reader goroutine: it
// must not wait for a reply from the same device.
package vfiouser
