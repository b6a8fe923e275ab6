package vfiouser

import (
	"fmt"

	"github.com/gohfi/gohfi/vfio/abi"
	"golang.org/x/sys/unix"
)

// WriteRegionPosted writes p at off of region index like WriteRegion, in
// REGION_WRITE messages flagged VFIO_USER_F_NO_REPLY: each is sent and not
// waited for, as a PCI memory write is posted. The server reads the socket
// in order and runs the commands of a session one after the other, so a
// later message of this client is handled after it. A write the server
// refuses is logged there, not reported here; a local failure (closed,
// disconnected, bad offset) is.
//
// This is the smallest version the ODP fault path needs (its resume
// write); the posted-doorbell work brings the same method to vfio.Device.
func (c *Client) WriteRegionPosted(index uint32, off uint64, p []byte) error {
	if addOverflows(off, uint64(len(p))) {
		return fmt.Errorf("vfio-user: posted REGION_WRITE: offset %#x: %w", off, unix.EINVAL)
	}
	for len(p) > 0 {
		n := min(len(p), int(c.serverMaxData))
		if err := c.postWrite(index, off, p[:n]); err != nil {
			return err
		}
		off += uint64(n)
		p = p[n:]
	}
	return nil
}

func (c *Client) postWrite(index uint32, off uint64, p []byte) error {
	k := newCall(abi.VFIO_USER_REGION_WRITE, abi.SizeofVFIOUserRegionAccess+len(p))
	defer k.release()
	n := encode(k.cmd, false, k.payload(), &abi.VFIOUserRegionAccess{Offset: off, Region: index, Count: uint32(len(p))})
	copy(k.payload()[n:], p)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return fmt.Errorf("vfio-user: posted REGION_WRITE: %w", err)
	}
	// An id no call waits for: a reply to it (the server sends none)
	// would be logged as unknown.
	for {
		c.nextID++
		if c.pending[c.nextID] == nil {
			break
		}
	}
	id := c.nextID
	c.mu.Unlock()
	h := header{MsgID: id, Cmd: k.cmd, Size: uint32(len(k.sbuf)), Flags: abi.VFIO_USER_F_TYPE_COMMAND | abi.VFIO_USER_F_NO_REPLY}
	abi.Encode(k.sbuf, &h)
	if err := c.sk.send(k.sbuf, nil); err != nil {
		if derr := c.dead(); derr != nil {
			return fmt.Errorf("vfio-user: posted REGION_WRITE: %w", derr)
		}
		return err
	}
	return nil
}
