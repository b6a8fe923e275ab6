package vfiouser

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/vfio"
	"github.com/gohfi/gohfi/vfio/abi"
)

// Client is a vfio.Device reached over a vfio-user socket.
//
// One reader goroutine reads every message from the server: replies go to
// the calls waiting for them (by message id), and the server's DMA_READ and
// DMA_WRITE requests are served on the spot from the DMA mappings. Calls
// from any number of goroutines share the socket through one writer lock.
type Client struct {
	o  options
	sk *sock

	info          vfio.DeviceInfo
	serverMaxData uint32 // chunk size of region reads and writes
	serverMaxFDs  int
	serverDMARing bool // the server takes device rings (gohfi_dma_ring)

	mu      sync.Mutex
	pending pendingCalls[call]
	err     error         // non-nil once closed or disconnected
	done    chan struct{} // closed when the reader has stopped: disconnected or closed

	regMu   sync.Mutex
	regions map[uint32]*clientRegion

	dmaMu sync.RWMutex
	maps  []clientMap // sorted by iova, never overlapping

	// Reader-goroutine state.
	rfds   []int
	dmaBuf []byte
	pid    int
}

type clientRegion struct {
	info vfio.RegionInfo
	file *os.File // the mmap fd, or nil

	// The server's ioeventfds for the region (ioefd.go), asked at the
	// first posted write.
	ioAsked bool
	ioErr   error       // the server's answer was hostile: every posted write fails with it
	ioefds  []ioEventFD // sorted by offset
	ioFDs   []int       // the eventfds they use, closed at Close
}

type clientMap struct {
	iova, size uint64
	vaddr      uintptr
	flags      uint32
	access     vfio.DMAAccessor
}

var _ vfio.Device = (*Client)(nil)

// Dial connects to the vfio-user server listening at path and negotiates
// the protocol (see NewClient). ctx bounds the connection and negotiation.
func Dial(ctx context.Context, path string, opts ...Option) (*Client, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("vfio-user: dial %s: %w", path, err)
	}
	// Closing the connection is how ctx aborts the negotiation; the
	// close's own error is not the story, ctx.Err() below is.
	stop := context.AfterFunc(ctx, func() { _ = c.Close() })
	cl, err := NewClient(c.(*net.UnixConn), opts...)
	if !stop() {
		if err == nil {
			// A client that negotiated on a socket ctx then closed: only
			// the socket to release, and ctx.Err() is the story.
			_ = cl.Close()
		}
		return nil, fmt.Errorf("vfio-user: dial %s: %w", path, ctx.Err())
	}
	return cl, err
}

// NewClient takes over conn, negotiates the protocol version and
// capabilities and reads the device info. On error conn is closed.
func NewClient(conn *net.UnixConn, opts ...Option) (*Client, error) {
	o := buildOptions(opts)
	sk, err := newSock(conn, &o)
	if err != nil {
		_ = conn.Close() // best effort: nothing was sent on it, the socket error is reported
		return nil, err
	}
	c := &Client{
		o:             o,
		sk:            sk,
		done:          make(chan struct{}),
		regions:       make(map[uint32]*clientRegion),
		serverMaxData: defaultMaxDataXferSize,
		serverMaxFDs:  1,
		pid:           os.Getpid(),
	}
	go c.readLoop()
	// On failure Close has only the socket to release (no region is
	// open yet): the negotiation error is the one to report.
	if err := c.negotiate(); err != nil {
		_ = c.Close()
		return nil, err
	}
	if err := c.getDeviceInfo(); err != nil {
		_ = c.Close()
		return nil, err
	}
	return c, nil
}

// call is one request waiting for its reply.
type call struct {
	id    uint16
	cmd   uint16
	sbuf  []byte // request message
	h     header // reply header
	reply []byte // reply payload (copied by the reader)
	fds   []int  // fds of the reply, owned by the call until taken
	err   error
	done  chan struct{}
	timer *time.Timer
}

var callPool = sync.Pool{New: func() any {
	t := time.NewTimer(time.Hour)
	t.Stop()
	return &call{done: make(chan struct{}, 1), timer: t}
}}

// newCall returns a call for cmd whose request payload (n bytes, zeroed)
// is call.payload().
func newCall(cmd uint16, n int) *call {
	k := callPool.Get().(*call)
	k.cmd, k.err = cmd, nil
	if cap(k.sbuf) < headerSize+n {
		k.sbuf = make([]byte, headerSize+n)
	}
	k.sbuf = k.sbuf[:headerSize+n]
	clear(k.sbuf)
	return k
}

func (k *call) payload() []byte { return k.sbuf[headerSize:] }

func (k *call) release() {
	closeFDs(k.fds)
	k.fds = k.fds[:0]
	if cap(k.reply) > 64<<10 {
		k.reply = nil
	}
	if cap(k.sbuf) > 64<<10 {
		k.sbuf = nil
	}
	callPool.Put(k)
}

// start registers k and sends it with fds.
func (c *Client) start(k *call, fds []int) error {
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return fmt.Errorf("vfio-user: %s: %w", cmdName(k.cmd), err)
	}
	k.id = c.pending.add(k)
	c.mu.Unlock()

	putCommandHeader(k.sbuf, k.id, k.cmd, 0)
	if err := c.sk.send(k.sbuf, fds); err != nil {
		if !c.unpend(k) {
			<-k.done // the reader (or a disconnect) completed it meanwhile
		}
		if c.dead() != nil {
			return fmt.Errorf("vfio-user: %s: %w", cmdName(k.cmd), c.dead())
		}
		return err
	}
	return nil
}

// wait waits for k's reply; on success k.h, k.reply and k.fds hold it.
func (c *Client) wait(k *call) error {
	k.timer.Reset(c.o.timeout)
	defer k.timer.Stop()
	select {
	case <-k.done:
	case <-k.timer.C:
		if c.unpend(k) {
			return fmt.Errorf("vfio-user: %s: no reply within %v: %w", cmdName(k.cmd), c.o.timeout, unix.ETIMEDOUT)
		}
		<-k.done
	}
	return k.err
}

func (c *Client) roundTrip(k *call, fds []int) error {
	if err := c.start(k, fds); err != nil {
		return err
	}
	return c.wait(k)
}

func (c *Client) unpend(k *call) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pending.remove(k.id, k)
}

func (c *Client) dead() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// readLoop reads the server's messages until the connection ends.
func (c *Client) readLoop() {
	var cause error
	for {
		h, p, fds, err := c.sk.readMsg(c.rfds)
		c.rfds = fds[:0]
		if err != nil {
			if errors.Is(err, errMsgFDs) {
				c.o.logf("%v", err)
				if isReply(h) {
					c.complete(h, nil, nil, err)
				} else {
					c.sendError(h, unix.EINVAL)
				}
				continue
			}
			cause = err
			break
		}
		if isReply(h) {
			c.complete(h, p, fds, nil)
			continue
		}
		closeFDs(fds)
		if h.Flags&abi.VFIO_USER_F_TYPE_MASK != abi.VFIO_USER_F_TYPE_COMMAND {
			c.o.logf("vfio-user: message type %d from server", h.Flags&abi.VFIO_USER_F_TYPE_MASK)
			continue
		}
		c.serveDMA(h, p)
	}
	c.sk.closeReader()
	c.mu.Lock()
	if c.err == nil {
		c.err = fmt.Errorf("%w: %v", vfio.ErrDisconnected, cause)
	}
	c.pending.drain(func(k *call) {
		k.err = fmt.Errorf("vfio-user: %s: %w", cmdName(k.cmd), c.err)
		k.done <- struct{}{}
	})
	c.mu.Unlock()
	close(c.done)
}

// complete hands a reply to its call. fds become the call's.
func (c *Client) complete(h header, p []byte, fds []int, rerr error) {
	c.mu.Lock()
	k := c.pending.take(h.MsgID, nil)
	c.mu.Unlock()
	if k == nil {
		// A late reply to a call that timed out, or a lie.
		c.o.logf("vfio-user: reply %s with unknown id %d", cmdName(h.Cmd), h.MsgID)
		closeFDs(fds)
		return
	}
	k.h = h
	k.reply = append(k.reply[:0], p...)
	k.fds = append(k.fds[:0], fds...)
	switch {
	case rerr != nil:
		k.err = rerr
	case h.Cmd != k.cmd:
		k.err = protoErr("%s reply to %s", cmdName(h.Cmd), cmdName(k.cmd))
	case h.Flags&abi.VFIO_USER_F_ERROR != 0:
		k.err = replyError(h.Cmd, h.Errno)
	case len(fds) > 0 && !messageOf(k.cmd).replyFD:
		k.err = protoErr("%s reply with %d fds", cmdName(h.Cmd), len(fds))
	default:
		k.err = nil
	}
	k.done <- struct{}{}
}

func (c *Client) sendError(h header, errno unix.Errno) {
	sendErrorReply(c.sk, c.o.logf, h, errno)
}

// Done implements vfio.Device: the channel is closed once the connection
// has ended, because the server hung up (or died) or because of Close. By
// then every call in flight has failed, with an error wrapping
// vfio.ErrDisconnected or vfio.ErrClosed, and later calls fail the same way.
func (c *Client) Done() <-chan struct{} { return c.done }

// Close closes the connection. Region mappings made by MmapRegion stay
// valid; DMA mappings die with the connection on the server's side.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.err != nil && errors.Is(c.err, vfio.ErrClosed) {
		c.mu.Unlock()
		return vfio.ErrClosed
	}
	c.err = vfio.ErrClosed
	c.mu.Unlock()
	var errs []error
	if err := c.sk.close(); err != nil && !errors.Is(err, net.ErrClosed) {
		errs = append(errs, fmt.Errorf("vfio-user: close: %w", err))
	}
	<-c.done
	c.regMu.Lock()
	for i, r := range c.regions {
		if r.file != nil {
			if err := r.file.Close(); err != nil {
				errs = append(errs, fmt.Errorf("vfio-user: close region %d fd: %w", i, err))
			}
		}
		closeFDs(r.ioFDs)
		delete(c.regions, i)
	}
	c.regMu.Unlock()
	return errors.Join(errs...)
}

func (c *Client) negotiate() error {
	maxFDs := uint32(c.o.maxMsgFDs)
	maxData := uint64(c.o.maxData)
	maxMaps := uint32(65535)
	pg := uint64(pageSize)
	js, err := json.Marshal(versionJSON{Capabilities: &versionCaps{
		MaxMsgFDs: &maxFDs, MaxDataXferSize: &maxData, MaxDMAMaps: &maxMaps, PgSizes: &pg,
	}})
	if err != nil {
		return err
	}
	k := newCall(abi.VFIO_USER_VERSION, abi.SizeofVFIOUserVersion+len(js)+1)
	defer k.release()
	encode(k.cmd, false, k.payload(), &abi.VFIOUserVersion{Major: 0, Minor: 0})
	copy(k.payload()[abi.SizeofVFIOUserVersion:], js)
	if err := c.roundTrip(k, nil); err != nil {
		return err
	}
	p := k.reply
	var ver abi.VFIOUserVersion
	if !abi.Decode(p, &ver) {
		return protoErr("VERSION reply of %d bytes", len(p))
	}
	if ver.Major != 0 || ver.Minor != 0 {
		return fmt.Errorf("vfio-user: VERSION: server speaks %d.%d: %w", ver.Major, ver.Minor, unix.ENOTSUP)
	}
	js = bytes.TrimRight(p[abi.SizeofVFIOUserVersion:], "\x00")
	if len(js) == 0 {
		return nil
	}
	var v versionJSON
	if err := json.Unmarshal(js, &v); err != nil {
		return protoErr("VERSION reply capabilities: %v", err)
	}
	if caps := v.Capabilities; caps != nil {
		if caps.MaxMsgFDs != nil {
			c.serverMaxFDs = int(min(max(*caps.MaxMsgFDs, 1), maxFDsLimit))
		}
		if caps.MaxDataXferSize != nil {
			if *caps.MaxDataXferSize == 0 {
				return protoErr("VERSION reply: max_data_xfer_size 0")
			}
			c.serverMaxData = uint32(min(*caps.MaxDataXferSize, math.MaxUint32))
		}
		c.serverDMARing = caps.DMARing != nil && *caps.DMARing && !c.o.noDMARing
	}
	c.serverMaxData = min(c.serverMaxData, c.o.maxData)
	return nil
}

func (c *Client) getDeviceInfo() error {
	k := newCall(abi.VFIO_USER_DEVICE_GET_INFO, abi.SizeofVFIOUserDeviceInfo)
	defer k.release()
	encode(k.cmd, false, k.payload(), &abi.VFIOUserDeviceInfo{Argsz: abi.SizeofVFIOUserDeviceInfo})
	if err := c.roundTrip(k, nil); err != nil {
		return err
	}
	var r abi.VFIOUserDeviceInfo
	if err := decode(k.cmd, true, k.reply, &r); err != nil {
		return err
	}
	if r.Argsz < abi.SizeofVFIOUserDeviceInfo {
		return protoErr("DEVICE_GET_INFO reply argsz %d", r.Argsz)
	}
	c.info = vfio.DeviceInfo{Flags: r.Flags, NumRegions: r.NumRegions, NumIRQs: r.NumIRQs}
	return nil
}

// Info returns the device info read when the client connected.
func (c *Client) Info() vfio.DeviceInfo { return c.info }

// RegionInfo describes region index (asked once, then cached).
func (c *Client) RegionInfo(index uint32) (vfio.RegionInfo, error) {
	r, err := c.region(index)
	if err != nil {
		return vfio.RegionInfo{}, err
	}
	info := r.info
	info.Sparse = append([]vfio.SparseArea(nil), r.info.Sparse...)
	return info, nil
}

func (c *Client) region(index uint32) (*clientRegion, error) {
	if index >= c.info.NumRegions {
		return nil, fmt.Errorf("vfio-user: region %d of %d: %w", index, c.info.NumRegions, unix.EINVAL)
	}
	c.regMu.Lock()
	defer c.regMu.Unlock()
	if r := c.regions[index]; r != nil {
		return r, nil
	}
	argsz := uint32(abi.SizeofVFIORegionInfo + abi.SizeofVFIORegionInfoCapSparseMmap + 16*abi.SizeofVFIORegionSparseMmapArea)
	for try := 0; try < 3; try++ {
		r, need, err := c.getRegionInfo(index, argsz)
		if err != nil {
			return nil, err
		}
		if r != nil {
			if err := c.dead(); err != nil { // Close raced with us
				if r.file != nil {
					_ = r.file.Close() // never mapped: nothing a close could lose
				}
				return nil, fmt.Errorf("vfio-user: GET_REGION_INFO: %w", err)
			}
			c.regions[index] = r
			return r, nil
		}
		argsz = need
	}
	return nil, protoErr("GET_REGION_INFO: server keeps asking for a larger argsz")
}

// getRegionInfo asks once; it returns the region, or the argsz the server
// needs.
func (c *Client) getRegionInfo(index, argsz uint32) (*clientRegion, uint32, error) {
	k := newCall(abi.VFIO_USER_DEVICE_GET_REGION_INFO, abi.SizeofVFIORegionInfo)
	defer k.release()
	encode(k.cmd, false, k.payload(), &abi.VFIORegionInfo{Argsz: argsz, Index: index})
	if err := c.roundTrip(k, nil); err != nil {
		return nil, 0, err
	}
	p := k.reply
	var ri abi.VFIORegionInfo
	if err := decode(k.cmd, true, p, &ri); err != nil {
		return nil, 0, err
	}
	switch {
	case ri.Index != index:
		return nil, 0, protoErr("GET_REGION_INFO reply for region %d, asked %d", ri.Index, index)
	case ri.Argsz < abi.SizeofVFIORegionInfo:
		return nil, 0, protoErr("GET_REGION_INFO reply argsz %d", ri.Argsz)
	case len(p) > int(argsz):
		return nil, 0, protoErr("GET_REGION_INFO reply of %d bytes for argsz %d", len(p), argsz)
	case addOverflows(ri.Offset, ri.Size):
		return nil, 0, protoErr("GET_REGION_INFO: region %d offset %#x size %#x overflows", index, ri.Offset, ri.Size)
	case len(k.fds) > 1:
		return nil, 0, protoErr("GET_REGION_INFO reply with %d fds", len(k.fds))
	}
	if ri.Argsz > argsz {
		if ri.Argsz > c.o.maxData {
			return nil, 0, protoErr("GET_REGION_INFO: argsz %d", ri.Argsz)
		}
		return nil, ri.Argsz, nil
	}
	info := vfio.RegionInfo{Index: index, Flags: ri.Flags &^ abi.VFIO_REGION_INFO_FLAG_CAPS, Size: ri.Size, Offset: ri.Offset}
	if ri.Flags&abi.VFIO_REGION_INFO_FLAG_CAPS != 0 {
		sparse, err := parseRegionCaps(p[:min(len(p), int(ri.Argsz))], ri)
		if err != nil {
			return nil, 0, err
		}
		info.Sparse = sparse
	}
	if info.Flags&abi.VFIO_REGION_INFO_FLAG_MMAP == 0 {
		// An fd with a region that cannot be mapped is dropped (release
		// closes it).
		info.Sparse = nil
		return &clientRegion{info: info}, 0, nil
	}
	if len(k.fds) != 1 {
		return nil, 0, protoErr("GET_REGION_INFO: mappable region %d without fd", index)
	}
	r := &clientRegion{info: info, file: os.NewFile(uintptr(k.fds[0]), fmt.Sprintf("vfio-user-region%d", index))}
	k.fds = k.fds[:0]
	return r, 0, nil
}

// parseRegionCaps walks the capability chain of a region info reply and
// returns the sparse-mmap areas. Every offset is checked against the reply.
func parseRegionCaps(p []byte, ri abi.VFIORegionInfo) ([]vfio.SparseArea, error) {
	var areas []vfio.SparseArea
	off := uint64(ri.CapOffset)
	for hops := 0; off != 0; hops++ {
		var h abi.VFIOInfoCapHeader
		if hops > 16 || off < abi.SizeofVFIORegionInfo || off > uint64(len(p)) || !abi.Decode(p[off:], &h) {
			return nil, protoErr("GET_REGION_INFO: capability at %d of %d bytes", off, len(p))
		}
		c := p[off:]
		next := uint64(h.Next)
		if next != 0 && next <= off {
			return nil, protoErr("GET_REGION_INFO: capability chain goes back (%d after %d)", next, off)
		}
		if h.ID == abi.VFIO_REGION_INFO_CAP_SPARSE_MMAP && h.Version == capSparseMmapVersion {
			var sp abi.VFIORegionInfoCapSparseMmap
			if !abi.Decode(c, &sp) {
				return nil, protoErr("GET_REGION_INFO: truncated sparse capability")
			}
			all, ok := abi.DecodeSlice[vfio.SparseArea](c[abi.SizeofVFIORegionInfoCapSparseMmap:], int(sp.NrAreas))
			if !ok {
				return nil, protoErr("GET_REGION_INFO: %d sparse areas do not fit", sp.NrAreas)
			}
			for _, a := range all {
				if addOverflows(a.Offset, a.Size) || a.Offset+a.Size > ri.Size {
					return nil, protoErr("GET_REGION_INFO: sparse area %#x+%#x outside region of %#x", a.Offset, a.Size, ri.Size)
				}
				if a.Size > 0 {
					areas = append(areas, a)
				}
			}
		}
		off = next
	}
	return areas, nil
}

// ReadRegion reads through REGION_READ messages.
func (c *Client) ReadRegion(index uint32, off uint64, p []byte) error {
	return c.inChunks("REGION_READ", index, off, p, c.readRegion)
}

// inChunks runs one access per max_data_xfer_size piece of p.
func (c *Client) inChunks(what string, index uint32, off uint64, p []byte, f func(index uint32, off uint64, p []byte) error) error {
	if addOverflows(off, uint64(len(p))) {
		return fmt.Errorf("vfio-user: %s: offset %#x: %w", what, off, unix.EINVAL)
	}
	for len(p) > 0 {
		n := min(len(p), int(c.serverMaxData))
		if err := f(index, off, p[:n]); err != nil {
			return err
		}
		off += uint64(n)
		p = p[n:]
	}
	return nil
}

func (c *Client) readRegion(index uint32, off uint64, p []byte) error {
	k := newCall(abi.VFIO_USER_REGION_READ, abi.SizeofVFIOUserRegionAccess)
	defer k.release()
	req := abi.VFIOUserRegionAccess{Offset: off, Region: index, Count: uint32(len(p))}
	n := encode(k.cmd, false, k.payload(), &req)
	if err := c.roundTrip(k, nil); err != nil {
		return err
	}
	var r abi.VFIOUserRegionAccess
	if err := decode(k.cmd, true, k.reply, &r); err != nil {
		return err
	}
	if r != req || len(k.reply) != n+len(p) {
		return protoErr("REGION_READ reply %+v with %d bytes for %+v", r, len(k.reply)-n, req)
	}
	copy(p, k.reply[n:])
	return nil
}

// WriteRegion writes through REGION_WRITE messages, each acknowledged.
func (c *Client) WriteRegion(index uint32, off uint64, p []byte) error {
	return c.inChunks("REGION_WRITE", index, off, p, c.writeRegion)
}

// newWriteCall is the REGION_WRITE message of p at off of region index,
// with the access header it carries and its size.
func newWriteCall(index uint32, off uint64, p []byte) (*call, abi.VFIOUserRegionAccess, int) {
	k := newCall(abi.VFIO_USER_REGION_WRITE, abi.SizeofVFIOUserRegionAccess+len(p))
	req := abi.VFIOUserRegionAccess{Offset: off, Region: index, Count: uint32(len(p))}
	n := encode(k.cmd, false, k.payload(), &req)
	copy(k.payload()[n:], p)
	return k, req, n
}

func (c *Client) writeRegion(index uint32, off uint64, p []byte) error {
	k, req, n := newWriteCall(index, off, p)
	defer k.release()
	if err := c.roundTrip(k, nil); err != nil {
		return err
	}
	if len(k.reply) == 0 {
		return nil
	}
	var r abi.VFIOUserRegionAccess
	if err := decode(k.cmd, true, k.reply, &r); err != nil {
		return err
	}
	if r != req || len(k.reply) != n {
		return protoErr("REGION_WRITE reply %+v for %+v", r, req)
	}
	return nil
}

// WriteRegionPosted writes through REGION_WRITE messages flagged
// VFIO_USER_F_NO_REPLY: each is sent and not waited for. The server reads
// the socket in order and runs every command on one handler goroutine, in
// the order read (server.go: session), so a later message of this client
// (a read, whose reply then also says the write was taken) is handled after
// it. A write the server refuses is logged there, not reported here.
//
// A write the server covers with an ioeventfd (DEVICE_GET_REGION_IO_FDS,
// asked at the first posted write to the region) is an 8-byte write to
// that eventfd instead, and no message: the server takes it, but in no
// order with this client's messages (ioefd.go).
func (c *Client) WriteRegionPosted(index uint32, off uint64, p []byte) error {
	if ok, err := c.ringIOEventFD(index, off, p); ok || err != nil {
		return err
	}
	return c.inChunks("posted REGION_WRITE", index, off, p, c.postWrite)
}

func (c *Client) postWrite(index uint32, off uint64, p []byte) error {
	k, _, _ := newWriteCall(index, off, p)
	defer k.release()
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return fmt.Errorf("vfio-user: posted REGION_WRITE: %w", err)
	}
	// An id no call waits for: a reply to it (the server sends none) would
	// be logged as unknown.
	id := c.pending.freeID()
	c.mu.Unlock()
	putCommandHeader(k.sbuf, id, k.cmd, abi.VFIO_USER_F_NO_REPLY)
	if err := c.sk.send(k.sbuf, nil); err != nil {
		if derr := c.dead(); derr != nil {
			return fmt.Errorf("vfio-user: posted REGION_WRITE: %w", derr)
		}
		return err
	}
	return nil
}

// MmapRegion maps [off, off+size) of region index from the fd the server
// gave with the region info. Unmap with unix.Munmap.
func (c *Client) MmapRegion(index uint32, off, size uint64, prot int) ([]byte, error) {
	r, err := c.region(index)
	if err != nil {
		return nil, err
	}
	if !r.info.Mappable(off, size) || r.file == nil {
		return nil, fmt.Errorf("vfio-user: mmap region %d %#x+%#x: not mappable: %w", index, off, size, unix.EINVAL)
	}
	foff := r.info.Offset + off
	if foff%pageSize != 0 || addOverflows(r.info.Offset, off) || foff > math.MaxInt64 || size > math.MaxInt {
		return nil, fmt.Errorf("vfio-user: mmap region %d %#x+%#x: alignment: %w", index, off, size, unix.EINVAL)
	}
	rc, err := r.file.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("vfio-user: mmap region %d: %w", index, err)
	}
	var mem []byte
	var merr error
	if err := rc.Control(func(fd uintptr) {
		mem, merr = unix.Mmap(int(fd), int64(foff), int(size), prot, unix.MAP_SHARED)
	}); err != nil {
		return nil, fmt.Errorf("vfio-user: mmap region %d: %w", index, err)
	}
	if merr != nil {
		return nil, fmt.Errorf("vfio-user: mmap region %d %#x+%#x: %w", index, off, size, merr)
	}
	return mem, nil
}

// DMAMap makes m reachable by the device. With a File the server maps the
// file itself; without one, the device's accesses come back as DMA_READ /
// DMA_WRITE requests, served through m.Access or from this process's
// memory at m.Vaddr.
func (c *Client) DMAMap(m vfio.DMAMapping) error {
	if m.Size == 0 || addOverflows(m.IOVA, m.Size) || m.Flags&^(vfio.DMARead|vfio.DMAWrite) != 0 || m.Flags == 0 {
		return fmt.Errorf("vfio-user: DMA_MAP: IOVA %#x size %#x flags %#x: %w", m.IOVA, m.Size, m.Flags, unix.EINVAL)
	}
	if m.File == nil && m.Access == nil && (m.Vaddr == 0 || addOverflows(uint64(m.Vaddr), m.Size)) {
		return fmt.Errorf("vfio-user: DMA_MAP: vaddr %#x size %#x: %w", m.Vaddr, m.Size, unix.EINVAL)
	}
	cm := clientMap{iova: m.IOVA, size: m.Size, vaddr: m.Vaddr, flags: m.Flags, access: m.Access}
	// Known before the server can use it: its DMA requests may arrive
	// before its reply does.
	if err := c.addMap(cm); err != nil {
		return err
	}
	if r, ok := m.Access.(vfio.DeviceRinger); ok && m.File == nil && c.serverDMARing {
		// The server reaches the pinned pages through a device ring, not
		// through DMA_READ/DMA_WRITE (docs/pinning.md, "Device rings");
		// without one (read-only pin, old kernel, a server that cannot
		// take it) it still can through the socket.
		err := c.dmaMapRing(m, r)
		if err == nil {
			return nil
		}
		if c.dead() != nil {
			c.removeMap(m.IOVA, m.Size)
			return err
		}
		c.o.logf("vfio-user: DMA_MAP %#x+%#x without a device ring: %v", m.IOVA, m.Size, err)
	}
	n := abi.SizeofVFIOIommuType1DmaMap
	k := newCall(abi.VFIO_USER_DMA_MAP, n)
	defer k.release()
	// vfio.DMARead and DMAWrite are VFIO_DMA_MAP_FLAG_READ and WRITE.
	req := abi.VFIOIommuType1DmaMap{Argsz: uint32(n), Flags: m.Flags, IOVA: m.IOVA, Size: m.Size}
	var err error
	if m.File != nil {
		req.Vaddr = m.FileOffset // vfio-user's "offset" in the file sent along
		encode(k.cmd, false, k.payload(), &req)
		err = c.sendWithFile(k, m.File)
	} else {
		encode(k.cmd, false, k.payload(), &req)
		err = c.roundTrip(k, nil)
	}
	if err != nil {
		c.removeMap(m.IOVA, m.Size)
		return err
	}
	return nil
}

// dmaMapRing sends m's DMA_MAP with a device ring of r (docs/hfisim.md,
// "DMA mappings"). The ring travels as its fd number in this process, with
// a pidfd of this process for the server's pidfd_getfd: the kernel does
// not pass io_uring files in SCM_RIGHTS.
func (c *Client) dmaMapRing(m vfio.DMAMapping, r vfio.DeviceRinger) error {
	ring, addr, err := r.DeviceRing()
	if err != nil {
		return err
	}
	defer func() { _ = ring.Close() }() // the server took its own copy before replying: ours is spare
	pidfd, err := unix.PidfdOpen(os.Getpid(), 0)
	if err != nil {
		return fmt.Errorf("vfio-user: DMA_MAP: pidfd_open: %w", err)
	}
	pf := os.NewFile(uintptr(pidfd), "pidfd")
	defer func() { _ = pf.Close() }() // sent with the message or refused: ours is spare
	n := abi.SizeofVFIOIommuType1DmaMap + dmaRingExtSize
	k := newCall(abi.VFIO_USER_DMA_MAP, n)
	defer k.release()
	req := abi.VFIOIommuType1DmaMap{Argsz: uint32(n), Flags: m.Flags, IOVA: m.IOVA, Size: m.Size, Vaddr: uint64(addr)}
	encode(k.cmd, false, k.payload(), &req)
	binary.LittleEndian.PutUint32(k.payload()[abi.SizeofVFIOIommuType1DmaMap:], uint32(ring.Fd()))
	return c.sendWithFile(k, pf)
}

// sendWithFile sends k with f's fd and waits for the reply.
func (c *Client) sendWithFile(k *call, f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	// Control keeps the fd open while it is being sent.
	cerr := rc.Control(func(fd uintptr) { err = c.start(k, []int{int(fd)}) })
	if err == nil {
		err = cerr
	}
	if err == nil {
		err = c.wait(k)
	}
	return err
}

// DMAUnmap removes the mapping at iova of size size. When it returns, the
// server no longer touches the memory.
func (c *Client) DMAUnmap(iova, size uint64) error {
	k := newCall(abi.VFIO_USER_DMA_UNMAP, abi.SizeofVFIOIommuType1DmaUnmap)
	defer k.release()
	encode(k.cmd, false, k.payload(), &abi.VFIOIommuType1DmaUnmap{Argsz: abi.SizeofVFIOIommuType1DmaUnmap, IOVA: iova, Size: size})
	if err := c.roundTrip(k, nil); err != nil {
		return err
	}
	c.removeMap(iova, size)
	return nil
}

// ServesDMAThroughAccess implements vfio.AccessServer: the server reaches a
// mapping that came without a file only through DMA_READ/DMA_WRITE messages,
// which this client serves through the mapping's Access.
func (c *Client) ServesDMAThroughAccess() bool { return true }

// IOVARanges implements vfio.Device. vfio-user carries no IOVA ranges
// (VERSION's capabilities say how many mappings and which page sizes, not
// where), and the server has no IOMMU windows of its own: the limit is the
// protocol's, an address and size that do not overflow 64 bits, so the
// whole space but the top page, [0, 2^64 - 4096 - 1].
func (c *Client) IOVARanges() []vfio.IOVARange {
	return []vfio.IOVARange{{Start: 0, End: math.MaxUint64 - pageSize}}
}

// IRQInfo asks about IRQ index.
func (c *Client) IRQInfo(index uint32) (vfio.IRQInfo, error) {
	if index >= c.info.NumIRQs {
		return vfio.IRQInfo{}, fmt.Errorf("vfio-user: IRQ index %d of %d: %w", index, c.info.NumIRQs, unix.EINVAL)
	}
	k := newCall(abi.VFIO_USER_DEVICE_GET_IRQ_INFO, abi.SizeofVFIOIrqInfo)
	defer k.release()
	encode(k.cmd, false, k.payload(), &abi.VFIOIrqInfo{Argsz: abi.SizeofVFIOIrqInfo, Index: index})
	if err := c.roundTrip(k, nil); err != nil {
		return vfio.IRQInfo{}, err
	}
	var r abi.VFIOIrqInfo
	if err := decode(k.cmd, true, k.reply, &r); err != nil {
		return vfio.IRQInfo{}, err
	}
	if r.Index != index || r.Argsz < abi.SizeofVFIOIrqInfo {
		return vfio.IRQInfo{}, protoErr("GET_IRQ_INFO reply for index %d argsz %d, asked %d", r.Index, r.Argsz, index)
	}
	return vfio.IRQInfo{Index: index, Flags: r.Flags, Count: r.Count}, nil
}

// SetIRQs connects eventfds to vectors [start, start+len(fds)) of index; an
// fd of -1 disconnects its vector. Empty fds disables the whole index. Runs
// are split to respect the server's max_msg_fds.
func (c *Client) SetIRQs(index, start uint32, fds []int) error {
	if len(fds) == 0 {
		return c.setIRQs(abi.VFIOIrqSet{Argsz: abi.SizeofVFIOIrqSet, Flags: abi.VFIO_IRQ_SET_DATA_NONE | abi.VFIO_IRQ_SET_ACTION_TRIGGER, Index: index}, nil)
	}
	if uint64(start)+uint64(len(fds)) > math.MaxUint32 {
		return fmt.Errorf("vfio-user: SET_IRQS: vectors %d+%d: %w", start, len(fds), unix.EINVAL)
	}
	for i := 0; i < len(fds); {
		if fds[i] < -1 {
			return fmt.Errorf("vfio-user: SET_IRQS: fd %d: %w", fds[i], unix.EBADF)
		}
		j := i + 1
		for j < len(fds) && (fds[j] == -1) == (fds[i] == -1) && (fds[i] == -1 || j-i < c.serverMaxFDs) {
			j++
		}
		req := abi.VFIOIrqSet{Argsz: abi.SizeofVFIOIrqSet, Flags: abi.VFIO_IRQ_SET_DATA_EVENTFD | abi.VFIO_IRQ_SET_ACTION_TRIGGER,
			Index: index, Start: start + uint32(i), Count: uint32(j - i)}
		var send []int
		if fds[i] != -1 {
			send = fds[i:j]
		}
		if err := c.setIRQs(req, send); err != nil {
			return err
		}
		i = j
	}
	return nil
}

func (c *Client) setIRQs(req abi.VFIOIrqSet, fds []int) error {
	k := newCall(abi.VFIO_USER_DEVICE_SET_IRQS, abi.SizeofVFIOIrqSet)
	defer k.release()
	encode(k.cmd, false, k.payload(), &req)
	return c.roundTrip(k, fds)
}

// Reset resets the device.
func (c *Client) Reset() error {
	k := newCall(abi.VFIO_USER_DEVICE_RESET, 0)
	defer k.release()
	return c.roundTrip(k, nil)
}
