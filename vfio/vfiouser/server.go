package vfiouser

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/vfio"
	"github.com/gohfi/gohfi/vfio/abi"
)

// Server serves a DeviceModel to vfio-user clients, one at a time.
type Server struct {
	model DeviceModel
	opts  options
	busy  sync.Mutex
}

// NewServer returns a server for model.
func NewServer(model DeviceModel, opts ...Option) *Server {
	return &Server{model: model, opts: buildOptions(opts)}
}

// Serve accepts clients on ln and serves them one after another until ctx
// is done (then it closes ln and returns ctx.Err()) or Accept fails.
// Connections that are not unix sockets are closed at once.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	// Closing ln is how ctx stops Accept; Serve then returns ctx.Err().
	stop := context.AfterFunc(ctx, func() { _ = ln.Close() })
	defer stop()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("vfio-user: accept: %w", err)
		}
		uc, ok := c.(*net.UnixConn)
		if !ok {
			_ = c.Close() // refused before a byte was read: nothing to report
			continue
		}
		if err := s.ServeConn(ctx, uc); err != nil {
			s.opts.logf("vfio-user: client: %v", err)
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
}

// ServeConn serves the client on conn until it disconnects or ctx is done,
// then drops the client's DMA mappings, disables the interrupts it set,
// detaches the model and closes conn. It returns nil when the client went
// away, ctx.Err() when ctx ended it, and an error for a client that broke
// the framing of the protocol. Only one connection is served at a time: a
// second concurrent call fails with EBUSY.
func (s *Server) ServeConn(ctx context.Context, conn *net.UnixConn) error {
	if !s.busy.TryLock() {
		_ = conn.Close() // refused before a byte was read: EBUSY is the answer
		return fmt.Errorf("vfio-user: already serving a client: %w", unix.EBUSY)
	}
	defer s.busy.Unlock()

	sk, err := newSock(conn, &s.opts)
	if err != nil {
		_ = conn.Close() // best effort: nothing was read or sent, the socket error is reported
		return err
	}
	se := &session{
		srv:     s,
		model:   s.model,
		o:       &s.opts,
		sk:      sk,
		queue:   make(chan *inMsg, 256),
		drained: make(chan struct{}, 1),
		dead:    make(chan struct{}),
		irqsSet: make(map[uint32]bool),
	}
	se.iommu = &iommu{max: s.opts.maxDMAMaps, sess: se}
	info := s.model.DeviceInfo()
	se.numRegions, se.numIRQs = info.NumRegions, info.NumIRQs

	// Closing conn is how ctx ends the session; ServeConn then returns
	// ctx.Err().
	stop := context.AfterFunc(ctx, func() { _ = conn.Close() })
	defer stop()

	readerDone := make(chan error, 1)
	go func() { readerDone <- se.readLoop() }()
	for m := range se.queue {
		se.handle(m)
		se.queued.Add(-int64(len(m.payload)))
		select {
		case se.drained <- struct{}{}:
		default:
		}
		putInMsg(m)
	}
	rerr := <-readerDone

	se.iommu.close()
	for idx := range se.irqsSet {
		if err := s.model.SetIRQs(idx, 0, 0, nil); err != nil {
			s.opts.logf("vfio-user: disabling IRQ index %d: %v", idx, err)
		}
	}
	if se.attached {
		s.model.Detach()
	}
	// The session is over and its outcome decided above: the close may
	// only repeat the AfterFunc's (net.ErrClosed), and nobody is left to
	// tell about a socket we drop.
	_ = conn.Close()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if rerr == nil || errors.Is(rerr, io.EOF) || errors.Is(rerr, io.ErrUnexpectedEOF) ||
		errors.Is(rerr, unix.ECONNRESET) || errors.Is(rerr, net.ErrClosed) {
		return nil
	}
	return rerr
}

// inMsg is a command read from the client, waiting for the handler.
type inMsg struct {
	h       header
	buf     []byte
	payload []byte
	fds     []int
}

var inMsgPool = sync.Pool{New: func() any { return new(inMsg) }}

func getInMsg() *inMsg { return inMsgPool.Get().(*inMsg) }

func putInMsg(m *inMsg) {
	closeFDs(m.fds)
	m.fds = m.fds[:0]
	m.payload = nil
	if cap(m.buf) > 64<<10 {
		m.buf = nil // do not pin large buffers in the pool
	}
	inMsgPool.Put(m)
}

// session is the state of one client connection.
//
// Two goroutines run per client: the reader, which reads every message,
// hands replies to the server's own DMA requests to their waiters and
// queues commands; and the handler (the ServeConn goroutine), which runs
// commands in order and calls the model. The split lets a model that DMAs
// synchronously from a register write get the client's DMA_READ reply.
type session struct {
	srv   *Server
	model DeviceModel
	o     *options
	sk    *sock
	iommu *iommu

	numRegions, numIRQs uint32

	// Handler state.
	versioned  bool
	attached   bool
	writeMulti bool
	irqsSet    map[uint32]bool
	wbuf       []byte

	// Client capabilities, set by the handler before Attach.
	peerMaxData uint32

	queue   chan *inMsg
	queued  atomic.Int64
	drained chan struct{}

	// Server-to-client requests.
	pmu     sync.Mutex
	pending pendingCalls[dmaCall]
	dead    chan struct{} // closed when the reader has stopped
	isDead  bool
}

func (se *session) logf(format string, args ...any) { se.o.logf(format, args...) }

// readLoop reads messages until the connection fails, then fails the
// pending DMA requests and closes the queue.
func (se *session) readLoop() (err error) {
	defer func() {
		se.sk.closeReader()
		se.pmu.Lock()
		se.isDead = true
		se.pending.drain(func(c *dmaCall) {
			c.err = fmt.Errorf("vfio-user: %s: %w", cmdName(c.cmd), vfio.ErrDisconnected)
			c.done <- struct{}{}
		})
		se.pmu.Unlock()
		close(se.dead)
		close(se.queue)
	}()
	var rfds []int
	for {
		h, p, fds, err := se.sk.readMsg(rfds)
		if err != nil {
			switch {
			case errors.Is(err, errMsgFDs):
				se.logf("%v", err)
				if !isReply(h) && h.Flags&abi.VFIO_USER_F_NO_REPLY == 0 {
					se.sendError(h, unix.EINVAL)
				}
				continue
			case errors.Is(err, errFraming):
				if h.Size >= headerSize && !isReply(h) {
					se.sendError(h, errnoOf(err))
				}
			}
			return err
		}
		if isReply(h) {
			se.dispatchReply(h, p, fds)
			closeFDs(fds)
			continue
		}
		if h.Flags&abi.VFIO_USER_F_TYPE_MASK != abi.VFIO_USER_F_TYPE_COMMAND {
			closeFDs(fds)
			se.logf("vfio-user: message type %d", h.Flags&abi.VFIO_USER_F_TYPE_MASK)
			se.sendError(h, unix.EINVAL)
			continue
		}
		// The reader's buffers are reused: the queued command gets copies.
		m := getInMsg()
		m.buf = append(m.buf[:0], p...)
		m.h, m.payload, m.fds = h, m.buf, append(m.fds[:0], fds...)
		rfds = fds[:0]
		// Bound the memory queued commands hold; the handler drains.
		for se.queued.Load() > int64(se.o.queueBudget) {
			<-se.drained
		}
		se.queued.Add(int64(len(p)))
		se.queue <- m
	}
}

// sendError sends an error reply to the command h, unless it asked for none.
func (se *session) sendError(h header, errno unix.Errno) {
	sendErrorReply(se.sk, se.logf, h, errno)
}

// payloadBuf returns the handler's reply buffer with room for n payload
// bytes after the header.
func (se *session) payloadBuf(n int) []byte {
	if cap(se.wbuf) < headerSize+n {
		se.wbuf = make([]byte, headerSize+n)
	}
	se.wbuf = se.wbuf[:headerSize+n]
	clear(se.wbuf)
	return se.wbuf[headerSize:]
}

// handle runs one command and replies.
func (se *session) handle(m *inMsg) {
	h := m.h
	fds := m.fds
	m.fds = m.fds[:0] // handlers own the fds from here
	n, sendFDs, err := se.dispatch(h, m.payload, fds)
	// Our copies: a reply carries its own references.
	defer closeFDs(sendFDs)
	if h.Flags&abi.VFIO_USER_F_NO_REPLY != 0 {
		if err != nil {
			se.logf("vfio-user: posted %s: %v", cmdName(h.Cmd), err)
		}
		return
	}
	if err != nil {
		se.sendError(h, errnoOf(err))
		return
	}
	if len(se.wbuf) < headerSize+n {
		se.payloadBuf(n)
	}
	b := se.wbuf[:headerSize+n]
	rh := header{MsgID: h.MsgID, Cmd: h.Cmd, Size: uint32(headerSize + n), Flags: abi.VFIO_USER_F_TYPE_REPLY}
	abi.Encode(b, &rh)
	if err := se.sk.send(b, sendFDs); err != nil {
		se.logf("%v", err)
	}
}

// dispatch runs command h. It returns the reply payload length (the payload
// is in se.wbuf after the header) and the fds to send, which dispatch's
// caller closes. dispatch owns fds.
func (se *session) dispatch(h header, p []byte, fds []int) (n int, sendFDs []int, err error) {
	if len(fds) > 0 && (!messageOf(h.Cmd).reqFDs || !se.versioned) {
		closeFDs(fds)
		return 0, nil, fmt.Errorf("vfio-user: %s: unexpected fds: %w", cmdName(h.Cmd), unix.EINVAL)
	}
	if !se.versioned && h.Cmd != abi.VFIO_USER_VERSION {
		return 0, nil, fmt.Errorf("vfio-user: %s before VERSION: %w", cmdName(h.Cmd), unix.EINVAL)
	}
	switch h.Cmd {
	case abi.VFIO_USER_VERSION:
		n, err = se.version(p)
	case abi.VFIO_USER_DMA_MAP:
		err = se.dmaMap(p, fds)
	case abi.VFIO_USER_DMA_UNMAP:
		n, err = se.dmaUnmap(p)
	case abi.VFIO_USER_DEVICE_GET_INFO:
		n, err = se.deviceGetInfo(p)
	case abi.VFIO_USER_DEVICE_GET_REGION_INFO:
		var fd int
		if n, fd, err = se.getRegionInfo(p); fd >= 0 {
			sendFDs = []int{fd}
		}
	case abi.VFIO_USER_DEVICE_GET_REGION_IO_FDS:
		n, sendFDs, err = se.getRegionIOFDs(p)
	case abi.VFIO_USER_DEVICE_GET_IRQ_INFO:
		n, err = se.getIRQInfo(p)
	case abi.VFIO_USER_DEVICE_SET_IRQS:
		err = se.setIRQs(p, fds)
	case abi.VFIO_USER_REGION_READ:
		n, err = se.regionRead(p)
	case abi.VFIO_USER_REGION_WRITE:
		n, err = se.regionWrite(p)
	case abi.VFIO_USER_REGION_WRITE_MULTI:
		n, err = se.regionWriteMulti(p)
	case abi.VFIO_USER_DEVICE_RESET:
		err = se.model.Reset()
	case abi.VFIO_USER_DEVICE_FEATURE:
		// No features (migration, dirty logging): what the kernel
		// answers for an unsupported feature.
		err = fmt.Errorf("vfio-user: DEVICE_FEATURE: %w", unix.ENOTTY)
	default:
		err = fmt.Errorf("vfio-user: %s: %w", cmdName(h.Cmd), unix.ENOSYS)
	}
	return n, sendFDs, err
}

func (se *session) version(p []byte) (int, error) {
	if se.versioned {
		return 0, fmt.Errorf("vfio-user: VERSION: already negotiated: %w", unix.EINVAL)
	}
	var ver abi.VFIOUserVersion
	if err := decode(abi.VFIO_USER_VERSION, false, p, &ver); err != nil {
		return 0, err
	}
	if ver.Major != 0 {
		return 0, fmt.Errorf("vfio-user: VERSION: major %d: %w", ver.Major, unix.ENOTSUP)
	}
	js := bytes.TrimRight(p[abi.SizeofVFIOUserVersion:], "\x00")
	peerMaxData := uint64(defaultMaxDataXferSize)
	writeMulti := false
	if len(js) > 0 {
		if len(js) > maxVersionJSONSize {
			return 0, fmt.Errorf("vfio-user: VERSION: %d bytes of JSON: %w", len(js), unix.EINVAL)
		}
		var v versionJSON
		if err := json.Unmarshal(js, &v); err != nil {
			return 0, fmt.Errorf("vfio-user: VERSION: capabilities: %v: %w", err, unix.EINVAL)
		}
		if c := v.Capabilities; c != nil {
			if c.MaxDataXferSize != nil {
				peerMaxData = *c.MaxDataXferSize
				if peerMaxData == 0 {
					return 0, fmt.Errorf("vfio-user: VERSION: max_data_xfer_size 0: %w", unix.EINVAL)
				}
			}
			if c.PgSizes != nil && *c.PgSizes&pageSize == 0 {
				return 0, fmt.Errorf("vfio-user: VERSION: pgsizes %#x lacks 4 KiB: %w", *c.PgSizes, unix.EINVAL)
			}
			writeMulti = c.WriteMultiple != nil && *c.WriteMultiple
		}
	}
	// Our DMA requests must fit both the client's limit and our own
	// message limit (its replies carry the data).
	se.peerMaxData = uint32(min(peerMaxData, uint64(se.o.maxData)))
	se.writeMulti = writeMulti

	maxFDs := uint32(se.o.maxMsgFDs)
	maxData := uint64(se.o.maxData)
	maxMaps := uint32(min(se.o.maxDMAMaps, 1<<32-1))
	pg := uint64(pageSize)
	caps := versionCaps{MaxMsgFDs: &maxFDs, MaxDataXferSize: &maxData, MaxDMAMaps: &maxMaps, PgSizes: &pg}
	if !se.o.noDMARing {
		yes := true
		caps.DMARing = &yes
	}
	if writeMulti {
		caps.WriteMultiple = &writeMulti
	}
	out, err := json.Marshal(versionJSON{Capabilities: &caps})
	if err != nil {
		return 0, fmt.Errorf("vfio-user: VERSION: %w", err)
	}
	b := se.payloadBuf(abi.SizeofVFIOUserVersion + len(out) + 1)
	n := encode(abi.VFIO_USER_VERSION, true, b, &abi.VFIOUserVersion{Major: 0, Minor: 0})
	copy(b[n:], out) // NUL-terminated JSON
	se.versioned = true
	se.attached = true
	se.model.Attach(se.iommu)
	return len(b), nil
}

func (se *session) dmaMap(p []byte, fds []int) error {
	if len(fds) > 1 {
		closeFDs(fds)
		return fmt.Errorf("vfio-user: DMA_MAP: %d fds: %w", len(fds), unix.EINVAL)
	}
	fd := -1
	if len(fds) == 1 {
		fd = fds[0]
	}
	var req abi.VFIOIommuType1DmaMap
	if err := decode(abi.VFIO_USER_DMA_MAP, false, p, &req); err != nil {
		if fd >= 0 {
			_ = unix.Close(fd) // the client's fd, refused with the message
		}
		return err
	}
	if req.Argsz != abi.SizeofVFIOIommuType1DmaMap+dmaRingExtSize {
		return se.iommu.dmaMap(req, fd, false, false)
	}
	// A device ring: fd is a pidfd of the client, the ring its fd number
	// there (docs/hfisim.md, "DMA mappings").
	ext := p[abi.SizeofVFIOIommuType1DmaMap:]
	if fd < 0 || se.o.noDMARing || len(ext) < dmaRingExtSize || binary.LittleEndian.Uint32(ext[4:]) != 0 {
		if fd >= 0 {
			_ = unix.Close(fd) // the client's fd, refused with the message
		}
		return fmt.Errorf("vfio-user: DMA_MAP: device ring (argsz %d, %d bytes, fd %v, announced %v): %w",
			req.Argsz, len(p), fd >= 0, !se.o.noDMARing, unix.EINVAL)
	}
	ring, err := unix.PidfdGetfd(fd, int(binary.LittleEndian.Uint32(ext)), 0)
	self := pidfdPid(fd) == os.Getpid()
	_ = unix.Close(fd) // the client's pidfd: only needed for the ring
	if err != nil {
		return fmt.Errorf("vfio-user: DMA_MAP: device ring: pidfd_getfd: %w", err)
	}
	return se.iommu.dmaMap(req, ring, true, self)
}

// pidfdPid is the pid a pidfd refers to (its fdinfo's Pid line), or -1.
func pidfdPid(fd int) int {
	b, err := os.ReadFile("/proc/self/fdinfo/" + strconv.Itoa(fd))
	if err != nil {
		return -1
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "Pid:"); ok {
			if pid, err := strconv.Atoi(strings.TrimSpace(v)); err == nil {
				return pid
			}
		}
	}
	return -1
}

func (se *session) dmaUnmap(p []byte) (int, error) {
	var req abi.VFIOIommuType1DmaUnmap
	if err := decode(abi.VFIO_USER_DMA_UNMAP, false, p, &req); err != nil {
		return 0, err
	}
	if err := se.iommu.dmaUnmap(req); err != nil {
		return 0, err
	}
	// The reply is the request's DMA entry.
	return encode(abi.VFIO_USER_DMA_UNMAP, true, se.payloadBuf(abi.SizeofVFIOIommuType1DmaUnmap), &req), nil
}

func (se *session) deviceGetInfo(p []byte) (int, error) {
	var req abi.VFIOUserDeviceInfo
	if err := decode(abi.VFIO_USER_DEVICE_GET_INFO, false, p, &req); err != nil {
		return 0, err
	}
	if req.Argsz < abi.SizeofVFIOUserDeviceInfo {
		return 0, fmt.Errorf("vfio-user: DEVICE_GET_INFO: argsz %d: %w", req.Argsz, unix.EINVAL)
	}
	info := se.model.DeviceInfo()
	r := abi.VFIOUserDeviceInfo{Argsz: abi.SizeofVFIOUserDeviceInfo, Flags: info.Flags, NumRegions: info.NumRegions, NumIRQs: info.NumIRQs}
	return encode(abi.VFIO_USER_DEVICE_GET_INFO, true, se.payloadBuf(abi.SizeofVFIOUserDeviceInfo), &r), nil
}

func (se *session) getRegionInfo(p []byte) (int, int, error) {
	var req abi.VFIORegionInfo
	if err := decode(abi.VFIO_USER_DEVICE_GET_REGION_INFO, false, p, &req); err != nil {
		return 0, -1, err
	}
	if req.Argsz < abi.SizeofVFIORegionInfo {
		return 0, -1, fmt.Errorf("vfio-user: GET_REGION_INFO: argsz %d: %w", req.Argsz, unix.EINVAL)
	}
	if req.Index >= se.numRegions {
		return 0, -1, fmt.Errorf("vfio-user: GET_REGION_INFO: index %d of %d: %w", req.Index, se.numRegions, unix.EINVAL)
	}
	info, file, err := se.model.RegionInfo(req.Index)
	if err != nil {
		return 0, -1, err
	}
	flags := info.Flags &^ vfio.RegionFlagCaps
	if file == nil {
		// Nothing to map: never claim the region is mappable.
		flags &^= vfio.RegionFlagMmap
	}
	sparse := info.Sparse
	if flags&vfio.RegionFlagMmap == 0 {
		sparse = nil
	}
	full := abi.SizeofVFIORegionInfo
	if len(sparse) > 0 {
		full += abi.SizeofVFIORegionInfoCapSparseMmap + abi.SizeofVFIORegionSparseMmapArea*len(sparse)
	}
	if full > int(se.o.maxData) {
		return 0, -1, fmt.Errorf("vfio-user: GET_REGION_INFO: %d sparse areas: %w", len(sparse), unix.E2BIG)
	}
	r := abi.VFIORegionInfo{Argsz: uint32(full), Flags: flags, Index: req.Index, Size: info.Size, Offset: info.Offset}
	const cmd = abi.VFIO_USER_DEVICE_GET_REGION_INFO
	if int(req.Argsz) < full {
		// Too small for the capabilities: say how much is needed, send
		// neither capabilities nor fd; the client asks again.
		return encode(cmd, true, se.payloadBuf(abi.SizeofVFIORegionInfo), &r), -1, nil
	}
	b := se.payloadBuf(full)
	if len(sparse) > 0 {
		r.Flags |= abi.VFIO_REGION_INFO_FLAG_CAPS
		r.CapOffset = abi.SizeofVFIORegionInfo
		c := abi.VFIORegionInfoCapSparseMmap{NrAreas: uint32(len(sparse)), Header: abi.VFIOInfoCapHeader{
			ID: abi.VFIO_REGION_INFO_CAP_SPARSE_MMAP, Version: capSparseMmapVersion, Next: 0}} // the last capability
		off := abi.SizeofVFIORegionInfo + abi.Encode(b[abi.SizeofVFIORegionInfo:], &c)
		for i := range sparse {
			off += abi.Encode(b[off:], &sparse[i])
		}
	}
	encode(cmd, true, b, &r)
	fd := -1
	if flags&vfio.RegionFlagMmap != 0 {
		if fd, err = dupFile(file); err != nil {
			return 0, -1, fmt.Errorf("vfio-user: GET_REGION_INFO: %w", err)
		}
	}
	return full, fd, nil
}

// dupFile duplicates f's descriptor without touching f's mode (os.File.Fd
// would make it blocking).
func dupFile(f *os.File) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return -1, err
	}
	nfd := -1
	var derr error
	if err := rc.Control(func(fd uintptr) {
		nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return -1, err
	}
	return nfd, derr
}

// getRegionIOFDs answers with the ioeventfds the model offers for the
// region (IOFDModel), none when it offers none. As for GET_REGION_INFO, a
// request whose argsz cannot hold them all gets the argsz and count needed,
// without sub-regions or fds; the client asks again.
func (se *session) getRegionIOFDs(p []byte) (int, []int, error) {
	const cmd = abi.VFIO_USER_DEVICE_GET_REGION_IO_FDS
	const fixed, one = abi.SizeofVFIOUserRegionIOFDsRequest, abi.SizeofVFIOUserSubRegionIOEventFD
	var req abi.VFIOUserRegionIOFDsRequest
	if err := decode(cmd, false, p, &req); err != nil {
		return 0, nil, err
	}
	if req.Argsz < fixed || req.Flags != 0 || req.Count != 0 || req.Index >= se.numRegions {
		return 0, nil, fmt.Errorf("vfio-user: GET_REGION_IO_FDS: argsz %d flags %#x count %d index %d: %w",
			req.Argsz, req.Flags, req.Count, req.Index, unix.EINVAL)
	}
	var subs []IOEventFD
	if m, ok := se.model.(IOFDModel); ok {
		var err error
		if subs, err = m.RegionIOFDs(req.Index); err != nil {
			return 0, nil, err
		}
	}
	// One fd per distinct file, in order of first use.
	var files []*os.File
	index := make([]uint32, len(subs))
	for i, s := range subs {
		k := slices.Index(files, s.File)
		if k < 0 {
			k = len(files)
			files = append(files, s.File)
		}
		index[i] = uint32(k)
	}
	full := fixed + one*len(subs)
	if full > int(se.o.maxData) || len(files) > se.o.maxMsgFDs {
		return 0, nil, fmt.Errorf("vfio-user: GET_REGION_IO_FDS: %d sub-regions with %d fds: %w", len(subs), len(files), unix.E2BIG)
	}
	r := abi.VFIOUserRegionIOFDsRequest{Argsz: uint32(full), Index: req.Index, Count: uint32(len(subs))}
	if int(req.Argsz) < full || len(subs) == 0 {
		return encode(cmd, true, se.payloadBuf(fixed), &r), nil, nil
	}
	b := se.payloadBuf(full)
	off := encode(cmd, true, b, &r)
	for i, s := range subs {
		e := abi.VFIOUserSubRegionIOEventFD{Offset: s.Offset, Size: s.Size, FDIndex: index[i], Type: abi.VFIO_USER_IO_FD_TYPE_IOEVENTFD}
		if s.DataMatch {
			e.Flags, e.Datamatch = abi.KVM_IOEVENTFD_FLAG_DATAMATCH, s.Data
		}
		off += abi.Encode(b[off:], &e)
	}
	fds := make([]int, 0, len(files))
	for _, f := range files {
		fd, err := dupFile(f)
		if err != nil {
			closeFDs(fds)
			return 0, nil, fmt.Errorf("vfio-user: GET_REGION_IO_FDS: %w", err)
		}
		fds = append(fds, fd)
	}
	return full, fds, nil
}

func (se *session) getIRQInfo(p []byte) (int, error) {
	const cmd = abi.VFIO_USER_DEVICE_GET_IRQ_INFO
	var req abi.VFIOIrqInfo
	if err := decode(cmd, false, p, &req); err != nil {
		return 0, err
	}
	if req.Argsz < abi.SizeofVFIOIrqInfo || req.Index >= se.numIRQs {
		return 0, fmt.Errorf("vfio-user: GET_IRQ_INFO: argsz %d index %d: %w", req.Argsz, req.Index, unix.EINVAL)
	}
	info, err := se.model.IRQInfo(req.Index)
	if err != nil {
		return 0, err
	}
	r := abi.VFIOIrqInfo{Argsz: abi.SizeofVFIOIrqInfo, Flags: info.Flags, Index: req.Index, Count: info.Count}
	return encode(cmd, true, se.payloadBuf(abi.SizeofVFIOIrqInfo), &r), nil
}

func (se *session) setIRQs(p []byte, fds []int) (err error) {
	defer func() {
		if err != nil {
			closeFDs(fds)
		}
	}()
	var req abi.VFIOIrqSet
	if err := decode(abi.VFIO_USER_DEVICE_SET_IRQS, false, p, &req); err != nil {
		return err
	}
	data, action := req.Flags&abi.VFIO_IRQ_SET_DATA_TYPE_MASK, req.Flags&abi.VFIO_IRQ_SET_ACTION_TYPE_MASK
	if req.Flags&^(abi.VFIO_IRQ_SET_DATA_TYPE_MASK|abi.VFIO_IRQ_SET_ACTION_TYPE_MASK) != 0 || !onebit(data) || !onebit(action) {
		return fmt.Errorf("vfio-user: SET_IRQS: flags %#x: %w", req.Flags, unix.EINVAL)
	}
	if req.Index >= se.numIRQs {
		return fmt.Errorf("vfio-user: SET_IRQS: index %d of %d: %w", req.Index, se.numIRQs, unix.EINVAL)
	}
	info, err := se.model.IRQInfo(req.Index)
	if err != nil {
		return err
	}
	disableAll := req.Start == 0 && req.Count == 0
	if !disableAll && (req.Count == 0 || uint64(req.Start)+uint64(req.Count) > uint64(info.Count)) {
		return fmt.Errorf("vfio-user: SET_IRQS: vectors %d+%d of %d: %w", req.Start, req.Count, info.Count, unix.EINVAL)
	}
	if data != abi.VFIO_IRQ_SET_DATA_EVENTFD && len(fds) > 0 {
		return fmt.Errorf("vfio-user: SET_IRQS: fds without DATA_EVENTFD: %w", unix.EINVAL)
	}
	if data == abi.VFIO_IRQ_SET_DATA_BOOL && len(p) < abi.SizeofVFIOIrqSet+int(req.Count) {
		return errShort("SET_IRQS", len(p), abi.SizeofVFIOIrqSet+int(req.Count))
	}
	switch {
	case action == abi.VFIO_IRQ_SET_ACTION_TRIGGER && data == abi.VFIO_IRQ_SET_DATA_EVENTFD:
		if len(fds) != 0 && len(fds) != int(req.Count) {
			return fmt.Errorf("vfio-user: SET_IRQS: %d fds for %d vectors: %w", len(fds), req.Count, unix.EINVAL)
		}
		se.irqsSet[req.Index] = true
		if len(fds) == 0 {
			// No fds: de-assign those vectors (how QEMU sends runs of -1).
			return se.model.SetIRQs(req.Index, req.Start, req.Count, nil)
		}
		files := make([]*os.File, len(fds))
		for i, fd := range fds {
			files[i] = os.NewFile(uintptr(fd), "eventfd")
		}
		fds = nil // owned by files now
		if err := se.model.SetIRQs(req.Index, req.Start, req.Count, files); err != nil {
			// Closing an *os.File twice is harmless, so this is safe
			// whether or not the model closed them.
			for _, f := range files {
				_ = f.Close() // refused eventfds (or closed by the model already): nothing to flush
			}
			return err
		}
		return nil
	case action == abi.VFIO_IRQ_SET_ACTION_TRIGGER && data == abi.VFIO_IRQ_SET_DATA_NONE && disableAll:
		se.irqsSet[req.Index] = true
		return se.model.SetIRQs(req.Index, 0, 0, nil)
	case action == abi.VFIO_IRQ_SET_ACTION_TRIGGER:
		// A client-triggered interrupt (loopback) is not supported.
		return fmt.Errorf("vfio-user: SET_IRQS: trigger from the client: %w", unix.ENOTSUP)
	case data == abi.VFIO_IRQ_SET_DATA_EVENTFD:
		// Mask/unmask notification eventfds are not supported.
		return fmt.Errorf("vfio-user: SET_IRQS: mask/unmask eventfds: %w", unix.ENOTSUP)
	default:
		// Mask/unmask: the model keeps its own interrupt masks (MSI-X
		// table, INTx disable); QEMU unmasks INTx after each interrupt,
		// so accept.
		return nil
	}
}

func onebit(x uint32) bool { return x != 0 && x&(x-1) == 0 }

func (se *session) checkAccess(what string, ra abi.VFIOUserRegionAccess) error {
	if ra.Region >= se.numRegions {
		return fmt.Errorf("vfio-user: %s: region %d of %d: %w", what, ra.Region, se.numRegions, unix.EINVAL)
	}
	if ra.Count == 0 {
		return fmt.Errorf("vfio-user: %s: count 0: %w", what, unix.EINVAL)
	}
	if ra.Count > se.o.maxData {
		return fmt.Errorf("vfio-user: %s: count %d above %d: %w", what, ra.Count, se.o.maxData, unix.E2BIG)
	}
	return nil
}

func (se *session) regionRead(p []byte) (int, error) {
	const cmd = abi.VFIO_USER_REGION_READ
	var ra abi.VFIOUserRegionAccess
	if err := decode(cmd, false, p, &ra); err != nil {
		return 0, err
	}
	if err := se.checkAccess("REGION_READ", ra); err != nil {
		return 0, err
	}
	b := se.payloadBuf(abi.SizeofVFIOUserRegionAccess + int(ra.Count))
	n := encode(cmd, true, b, &ra)
	if err := se.model.RegionRead(ra.Region, ra.Offset, b[n:]); err != nil {
		return 0, err
	}
	return len(b), nil
}

func (se *session) regionWrite(p []byte) (int, error) {
	const cmd = abi.VFIO_USER_REGION_WRITE
	const fixed = abi.SizeofVFIOUserRegionAccess
	var ra abi.VFIOUserRegionAccess
	if err := decode(cmd, false, p, &ra); err != nil {
		return 0, err
	}
	if err := se.checkAccess("REGION_WRITE", ra); err != nil {
		return 0, err
	}
	if len(p) != fixed+int(ra.Count) {
		return 0, fmt.Errorf("vfio-user: REGION_WRITE: %d data bytes for count %d: %w", len(p)-fixed, ra.Count, unix.EINVAL)
	}
	if err := se.model.RegionWrite(ra.Region, ra.Offset, p[fixed:]); err != nil {
		return 0, err
	}
	return encode(cmd, true, se.payloadBuf(fixed), &ra), nil
}

func (se *session) regionWriteMulti(p []byte) (int, error) {
	const cmd = abi.VFIO_USER_REGION_WRITE_MULTI
	var hdr abi.VFIOUserWriteMulti
	if err := decode(cmd, false, p, &hdr); err != nil {
		return 0, err
	}
	cnt := hdr.WrCnt
	if cnt == 0 || cnt > writeMultiMax || len(p) != abi.SizeofVFIOUserWriteMulti+int(cnt)*abi.SizeofVFIOUserWriteMultiOne {
		return 0, fmt.Errorf("vfio-user: REGION_WRITE_MULTI: %d writes in %d bytes: %w", cnt, len(p), unix.EINVAL)
	}
	writes, _ := abi.DecodeSlice[abi.VFIOUserWriteMultiOne](p[abi.SizeofVFIOUserWriteMulti:], int(cnt))
	// Validate all before doing any.
	for _, w := range writes {
		ra := abi.VFIOUserRegionAccess{Offset: w.Offset, Region: w.Region, Count: w.Count}
		if err := se.checkAccess("REGION_WRITE_MULTI", ra); err != nil {
			return 0, err
		}
		if int(ra.Count) > writeMultiData {
			return 0, fmt.Errorf("vfio-user: REGION_WRITE_MULTI: count %d: %w", ra.Count, unix.EINVAL)
		}
	}
	for _, w := range writes {
		if err := se.model.RegionWrite(w.Region, w.Offset, w.Data[:w.Count]); err != nil {
			return 0, err
		}
	}
	return encode(cmd, true, se.payloadBuf(abi.SizeofVFIOUserWriteMulti), &hdr), nil
}

// dmaCall is a DMA_READ or DMA_WRITE the server sent to the client.
type dmaCall struct {
	id    uint16
	cmd   uint16
	addr  uint64
	dst   []byte // DMA_READ: where the reply's data goes
	count uint64
	err   error
	done  chan struct{}
	buf   []byte
	timer *time.Timer
}

var dmaCallPool = sync.Pool{New: func() any {
	t := time.NewTimer(time.Hour)
	t.Stop()
	return &dmaCall{done: make(chan struct{}, 1), timer: t}
}}

// socketDMA moves p to or from client memory at iova with DMA_WRITE or
// DMA_READ requests of at most the client's max_data_xfer_size.
func (se *session) socketDMA(write bool, iova uint64, p []byte) error {
	chunk := se.maxDMAChunk()
	for len(p) > 0 {
		n := min(len(p), chunk)
		if err := se.dmaRoundTrip(write, iova, p[:n]); err != nil {
			return err
		}
		iova += uint64(n)
		p = p[n:]
	}
	return nil
}

// maxDMAChunk is the largest DMA_READ or DMA_WRITE the client takes.
func (se *session) maxDMAChunk() int {
	if se.peerMaxData == 0 {
		return defaultMaxDataXferSize
	}
	return int(se.peerMaxData)
}

func (se *session) dmaRoundTrip(write bool, iova uint64, p []byte) error {
	c := dmaCallPool.Get().(*dmaCall)
	defer dmaCallPool.Put(c)
	c.cmd, c.addr, c.count, c.err, c.dst = abi.VFIO_USER_DMA_READ, iova, uint64(len(p)), nil, nil
	const dmaAccessSize = abi.SizeofVFIOUserDmaRegionAccess
	size := headerSize + dmaAccessSize
	if write {
		c.cmd = abi.VFIO_USER_DMA_WRITE
		size += len(p)
	} else {
		c.dst = p
	}
	if cap(c.buf) < size {
		c.buf = make([]byte, size)
	}
	b := c.buf[:size]

	se.pmu.Lock()
	if se.isDead {
		se.pmu.Unlock()
		return fmt.Errorf("vfio-user: %s: %w", cmdName(c.cmd), vfio.ErrDisconnected)
	}
	c.id = se.pending.add(c)
	se.pmu.Unlock()

	putCommandHeader(b, c.id, c.cmd, 0)
	encode(c.cmd, false, b[headerSize:], &abi.VFIOUserDmaRegionAccess{Addr: iova, Count: uint64(len(p))})
	if write {
		// p may be a mapping of the client's file (Copy): a truncated
		// file faults here, which is the source's error.
		if err := faultSafeCopy(b[headerSize+dmaAccessSize:], p); err != nil {
			if !se.unpend(c) {
				<-c.done // cannot happen: nothing was sent to reply to
			}
			return err
		}
	}
	if err := se.sk.send(b, nil); err != nil {
		if se.unpend(c) {
			return err
		}
		<-c.done
		return err
	}
	c.timer.Reset(se.o.dmaTimeout)
	defer c.timer.Stop()
	select {
	case <-c.done:
		c.dst = nil
		return c.err
	case <-c.timer.C:
		if se.unpend(c) {
			c.dst = nil
			return fmt.Errorf("vfio-user: %s of %d bytes at %#x: no reply from client: %w",
				cmdName(c.cmd), len(p), iova, unix.ETIMEDOUT)
		}
		// The reader claimed it: it is copying into p right now.
		<-c.done
		c.dst = nil
		return c.err
	}
}

// unpend removes c from the pending table; false if the reader took it.
func (se *session) unpend(c *dmaCall) bool {
	se.pmu.Lock()
	defer se.pmu.Unlock()
	return se.pending.remove(c.id, c)
}

// dispatchReply hands the client's reply to a DMA request to its waiter.
func (se *session) dispatchReply(h header, p []byte, fds []int) {
	se.pmu.Lock()
	c := se.pending.take(h.MsgID, func(c *dmaCall) bool { return c.cmd == h.Cmd })
	se.pmu.Unlock()
	if c == nil {
		se.logf("vfio-user: unexpected %s reply id %d", cmdName(h.Cmd), h.MsgID)
		return
	}
	c.err = nil
	switch {
	case len(fds) > 0:
		c.err = protoErr("%s reply with fds", cmdName(h.Cmd))
	case h.Flags&abi.VFIO_USER_F_ERROR != 0:
		c.err = replyError(h.Cmd, h.Errno)
	case h.Cmd == abi.VFIO_USER_DMA_READ:
		const dmaAccessSize = abi.SizeofVFIOUserDmaRegionAccess
		var a abi.VFIOUserDmaRegionAccess
		switch err := decode(h.Cmd, true, p, &a); {
		case err != nil:
			c.err = err
		case a.Addr != c.addr || a.Count != c.count || uint64(len(p)-dmaAccessSize) != c.count:
			c.err = protoErr("DMA_READ reply for %#x+%d to a request for %#x+%d with %d bytes",
				a.Addr, a.Count, c.addr, c.count, len(p)-dmaAccessSize)
		default:
			// c.dst may be a mapping of the client's file (Copy).
			c.err = faultSafeCopy(c.dst, p[dmaAccessSize:])
		}
	case h.Cmd == abi.VFIO_USER_DMA_WRITE:
		// The specification's reply has a 4-byte count; accept 4 or 8.
		if len(p) != 0 && len(p) != 12 && len(p) != abi.SizeofVFIOUserDmaRegionAccess {
			c.err = protoErr("DMA_WRITE reply of %d bytes", len(p))
		} else if len(p) >= 8 && binary.LittleEndian.Uint64(p) != c.addr {
			c.err = protoErr("DMA_WRITE reply for another address")
		}
	}
	c.done <- struct{}{}
}
