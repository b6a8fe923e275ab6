package vfiouser

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/vfio/abi"
)

// header is the 16-byte message header.
type header = abi.VFIOUserHeader

const headerSize = abi.SizeofVFIOUserHeader

// putCommandHeader writes into b the header of command cmd with message id
// id; b's length is the message's size.
func putCommandHeader(b []byte, id, cmd uint16, flags uint32) {
	h := header{MsgID: id, Cmd: cmd, Size: uint32(len(b)), Flags: abi.VFIO_USER_F_TYPE_COMMAND | flags}
	abi.Encode(b, &h)
}

// sendErrorReply sends on sk an error reply to the command h, unless it
// asked for none; a failure to send is logged with logf.
func sendErrorReply(sk *sock, logf func(string, ...any), h header, errno unix.Errno) {
	if h.Flags&abi.VFIO_USER_F_NO_REPLY != 0 {
		return
	}
	var b [headerSize]byte
	rh := header{MsgID: h.MsgID, Cmd: h.Cmd, Size: headerSize, Flags: abi.VFIO_USER_F_TYPE_REPLY | abi.VFIO_USER_F_ERROR, Errno: uint32(errno)}
	abi.Encode(b[:], &rh)
	if err := sk.send(b[:], nil); err != nil {
		logf("%v", err)
	}
}

// pendingCalls are the commands one side sent and waits for the replies
// of, by message id. Its owner holds a lock around every method.
type pendingCalls[V any] struct {
	m    map[uint16]*V
	last uint16 // the last message id given out
}

// freeID advances to the next message id that no pending call holds and
// returns it.
func (p *pendingCalls[V]) freeID() uint16 {
	for {
		p.last++
		if p.m[p.last] == nil {
			return p.last
		}
	}
}

// add puts v under a free message id and returns the id.
func (p *pendingCalls[V]) add(v *V) uint16 {
	if p.m == nil {
		p.m = make(map[uint16]*V)
	}
	id := p.freeID()
	p.m[id] = v
	return id
}

// remove takes v out if it still waits under id; false if a reply took
// it first.
func (p *pendingCalls[V]) remove(id uint16, v *V) bool {
	if p.m[id] != v {
		return false
	}
	delete(p.m, id)
	return true
}

// take removes and returns the call waiting under id if match (nil: any)
// accepts it, else nil.
func (p *pendingCalls[V]) take(id uint16, match func(*V) bool) *V {
	v := p.m[id]
	if v == nil || match != nil && !match(v) {
		return nil
	}
	delete(p.m, id)
	return v
}

// drain removes every pending call, handing each to fail.
func (p *pendingCalls[V]) drain(fail func(*V)) {
	for id, v := range p.m {
		delete(p.m, id)
		fail(v)
	}
}

// message is what the protocol says of one command (the C structures are
// vfio/abi's): its name, the fixed parts of its request and reply payloads
// (data may follow them; 0 is none), and whether each may carry file
// descriptors. The framing, the decoders and the fd checks of both sides
// work from this table.
type message struct {
	name            string
	req, reply      int
	reqFDs, replyFD bool
}

var messages = [...]message{
	abi.VFIO_USER_VERSION: {name: "VERSION",
		req: abi.SizeofVFIOUserVersion, reply: abi.SizeofVFIOUserVersion}, // + JSON
	abi.VFIO_USER_DMA_MAP: {name: "DMA_MAP",
		req: abi.SizeofVFIOIommuType1DmaMap, reqFDs: true}, // the memory, or none for DMA_READ/WRITE
	abi.VFIO_USER_DMA_UNMAP: {name: "DMA_UNMAP",
		req: abi.SizeofVFIOIommuType1DmaUnmap, reply: abi.SizeofVFIOIommuType1DmaUnmap},
	abi.VFIO_USER_DEVICE_GET_INFO: {name: "DEVICE_GET_INFO",
		req: abi.SizeofVFIOUserDeviceInfo, reply: abi.SizeofVFIOUserDeviceInfo},
	abi.VFIO_USER_DEVICE_GET_REGION_INFO: {name: "GET_REGION_INFO",
		req: abi.SizeofVFIORegionInfo, reply: abi.SizeofVFIORegionInfo, replyFD: true}, // + capabilities; the mmap fd
	abi.VFIO_USER_DEVICE_GET_REGION_IO_FDS: {name: "GET_REGION_IO_FDS",
		req: abi.SizeofVFIOUserRegionIOFDsRequest, reply: abi.SizeofVFIOUserRegionIOFDsRequest, replyFD: true}, // + sub-regions; their fds
	abi.VFIO_USER_DEVICE_GET_IRQ_INFO: {name: "GET_IRQ_INFO",
		req: abi.SizeofVFIOIrqInfo, reply: abi.SizeofVFIOIrqInfo},
	abi.VFIO_USER_DEVICE_SET_IRQS: {name: "SET_IRQS",
		req: abi.SizeofVFIOIrqSet, reqFDs: true}, // + bools; eventfds
	abi.VFIO_USER_REGION_READ: {name: "REGION_READ",
		req: abi.SizeofVFIOUserRegionAccess, reply: abi.SizeofVFIOUserRegionAccess}, // reply + data
	abi.VFIO_USER_REGION_WRITE: {name: "REGION_WRITE",
		req: abi.SizeofVFIOUserRegionAccess, reply: abi.SizeofVFIOUserRegionAccess}, // request + data
	abi.VFIO_USER_DMA_READ: {name: "DMA_READ",
		req: abi.SizeofVFIOUserDmaRegionAccess, reply: abi.SizeofVFIOUserDmaRegionAccess}, // reply + data
	abi.VFIO_USER_DMA_WRITE: {name: "DMA_WRITE",
		req: abi.SizeofVFIOUserDmaRegionAccess, reply: abi.SizeofVFIOUserDmaRegionAccess}, // request + data
	abi.VFIO_USER_DEVICE_RESET: {name: "DEVICE_RESET"},
	14:                         {},
	abi.VFIO_USER_REGION_WRITE_MULTI: {name: "REGION_WRITE_MULTI",
		req: abi.SizeofVFIOUserWriteMulti, reply: abi.SizeofVFIOUserWriteMulti}, // request + writes
	abi.VFIO_USER_DEVICE_FEATURE: {name: "DEVICE_FEATURE"},
}

// messageOf returns the table entry of cmd (the zero message for an
// unknown one: no name, no fixed parts, no fds).
func messageOf(cmd uint16) message {
	if int(cmd) < len(messages) {
		return messages[cmd]
	}
	return message{}
}

func cmdName(cmd uint16) string {
	if n := messageOf(cmd).name; n != "" {
		return n
	}
	return fmt.Sprintf("command %d", cmd)
}

// fixedPart is the size of the fixed part of cmd's request or reply.
func fixedPart(cmd uint16, reply bool) int {
	if reply {
		return messageOf(cmd).reply
	}
	return messageOf(cmd).req
}

// partName names cmd's request or reply in errors.
func partName(cmd uint16, reply bool) string {
	if reply {
		return cmdName(cmd) + " reply"
	}
	return cmdName(cmd)
}

// decode reads *v, the fixed part of cmd's request or reply, from the
// payload p: an error wrapping EINVAL when p is shorter. T must be the
// structure the table gives the message.
func decode[T abi.Struct](cmd uint16, reply bool, p []byte, v *T) error {
	n := fixedPart(cmd, reply)
	if len(abi.Bytes(v)) != n {
		panic(fmt.Sprintf("vfio-user: %s is not %d bytes", partName(cmd, reply), n)) // a programming error
	}
	if !abi.Decode(p, v) {
		return errShort(partName(cmd, reply), len(p), n)
	}
	return nil
}

// encode writes *v, the fixed part of cmd's request or reply, at the start
// of b and returns its size. T must be the structure the table gives the
// message.
func encode[T abi.Struct](cmd uint16, reply bool, b []byte, v *T) int {
	if n := fixedPart(cmd, reply); len(abi.Bytes(v)) != n {
		panic(fmt.Sprintf("vfio-user: %s is not %d bytes", partName(cmd, reply), n)) // a programming error
	}
	return abi.Encode(b, v)
}

// capSparseMmapVersion is the version of the sparse mmap capability.
const capSparseMmapVersion = 1

// writeMultiData is the data room of one coalesced write of
// REGION_WRITE_MULTI.
const writeMultiData = len(abi.VFIOUserWriteMultiOne{}.Data)

// dmaRingExtSize is what a DMA_MAP carrying a device ring adds after the
// standard structure (argsz 40): the client's fd number of the ring (u32)
// and a zero u32. The message's fd is then a pidfd of the client
// (docs/hfisim.md, "DMA mappings").
const dmaRingExtSize = 8

// Defaults and hard limits.
const (
	// writeMultiMax is the most writes QEMU coalesces into one
	// REGION_WRITE_MULTI (VFIO_USER_MULTI_MAX); more is refused.
	writeMultiMax = 200

	defaultMaxDataXferSize = 1 << 20
	minMaxDataXferSize     = 512
	// msgHeadroom is what a message may carry beyond max_data_xfer_size:
	// the header and the fixed part of any payload, with room for region
	// info capabilities.
	msgHeadroom      = 4096
	defaultMaxMsgFDs = 16
	// maxFDsLimit is SCM_MAX_FD: the kernel never passes more in one message.
	maxFDsLimit        = 253
	defaultMaxDMAMaps  = 65535
	pageSize           = 4096
	maxVersionJSONSize = 4096
)

func decodeHeader(b []byte) (header, error) {
	var h header
	if !abi.Decode(b, &h) {
		return header{}, fmt.Errorf("vfio-user: short header (%d bytes): %w", len(b), unix.EINVAL)
	}
	if h.Size < headerSize {
		return h, fmt.Errorf("vfio-user: message size %d smaller than its header: %w", h.Size, unix.EINVAL)
	}
	return h, nil
}

func isReply(h header) bool { return h.Flags&abi.VFIO_USER_F_TYPE_MASK == abi.VFIO_USER_F_TYPE_REPLY }

// versionCaps is the JSON of a VERSION message. Pointers tell "absent" from
// zero; unknown keys are ignored.
type versionJSON struct {
	Capabilities *versionCaps `json:"capabilities,omitempty"`
}

type versionCaps struct {
	MaxMsgFDs       *uint32 `json:"max_msg_fds,omitempty"`
	MaxDataXferSize *uint64 `json:"max_data_xfer_size,omitempty"`
	MaxDMAMaps      *uint32 `json:"max_dma_maps,omitempty"`
	PgSizes         *uint64 `json:"pgsizes,omitempty"`
	WriteMultiple   *bool   `json:"write_multiple,omitempty"`
	// DMARing (gohfi's own, ignored by other implementations): the server
	// takes a DMA_MAP whose fd is a device ring (docs/hfisim.md, "DMA
	// mappings"). Sent by a server that does; a client sends device rings
	// only to such a server.
	DMARing *bool `json:"gohfi_dma_ring,omitempty"`
}

func errShort(what string, got, want int) error {
	return fmt.Errorf("vfio-user: %s: payload of %d bytes, need %d: %w", what, got, want, unix.EINVAL)
}

// errnoOf gives the errno to put in an error reply for err.
func errnoOf(err error) unix.Errno {
	var e unix.Errno
	switch {
	case err == nil:
		return 0
	case errors.As(err, &e) && e != 0:
		return e
	case errors.Is(err, ErrIOMMUFault):
		return unix.EFAULT
	default:
		return unix.EIO
	}
}

// replyError turns the errno of an error reply into an error.
func replyError(cmd uint16, errno uint32) error {
	if errno == 0 {
		// The specification allows an error reply without an errno.
		return fmt.Errorf("vfio-user: %s: error reply without errno: %w", cmdName(cmd), unix.EIO)
	}
	return fmt.Errorf("vfio-user: %s: %w", cmdName(cmd), unix.Errno(errno))
}

func protoErr(format string, args ...any) error {
	return fmt.Errorf("vfio-user: "+format+": %w", append(args, unix.EPROTO)...)
}

// addOverflows reports whether a+b overflows 64 bits.
func addOverflows(a, b uint64) bool { return a+b < a }
