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
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/vfio"
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
	stop := context.AfterFunc(ctx, func() { ln.Close() })
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
			c.Close()
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
		conn.Close()
		return fmt.Errorf("vfio-user: already serving a client: %w", unix.EBUSY)
	}
	defer s.busy.Unlock()

	sk, err := newSock(conn, &s.opts)
	if err != nil {
		conn.Close()
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
		pending: make(map[uint16]*dmaCall),
		irqsSet: make(map[uint32]bool),
	}
	se.iommu = &iommu{max: s.opts.maxDMAMaps, sess: se}
	info := s.model.DeviceInfo()
	se.numRegions, se.numIRQs = info.NumRegions, info.NumIRQs

	stop := context.AfterFunc(ctx, func() { conn.Close() })
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
	conn.Close()
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
	pending map[uint16]*dmaCall
	nextID  uint16
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
		for id, c := range se.pending {
			delete(se.pending, id)
			c.err = fmt.Errorf("vfio-user: %s: %w", cmdName(c.cmd), vfio.ErrDisconnected)
			c.done <- struct{}{}
		}
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
				if !h.isReply() && h.Flags&flagNoReply == 0 {
					se.sendError(h, unix.EINVAL)
				}
				continue
			case errors.Is(err, errFraming):
				if h.Size >= headerSize && !h.isReply() {
					se.sendError(h, errnoOf(err))
				}
			}
			return err
		}
		if h.isReply() {
			se.dispatchReply(h, p, fds)
			closeFDs(fds)
			continue
		}
		if h.Flags&flagTypeMask != flagCommand {
			closeFDs(fds)
			se.logf("vfio-user: message type %d", h.Flags&flagTypeMask)
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
	if h.Flags&flagNoReply != 0 {
		return
	}
	var b [headerSize]byte
	rh := header{MsgID: h.MsgID, Cmd: h.Cmd, Size: headerSize, Flags: flagReply | flagError, Errno: uint32(errno)}
	rh.encode(b[:])
	if err := se.sk.send(b[:], nil); err != nil {
		se.logf("%v", err)
	}
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
	n, sendFD, err := se.dispatch(h, m.payload, fds)
	if h.Flags&flagNoReply != 0 {
		if err != nil {
			se.logf("vfio-user: posted %s: %v", cmdName(h.Cmd), err)
		}
		if sendFD >= 0 {
			unix.Close(sendFD)
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
	rh := header{MsgID: h.MsgID, Cmd: h.Cmd, Size: uint32(headerSize + n), Flags: flagReply}
	rh.encode(b)
	var sfds []int
	if sendFD >= 0 {
		sfds = []int{sendFD}
	}
	if err := se.sk.send(b, sfds); err != nil {
		se.logf("%v", err)
	}
	if sendFD >= 0 {
		unix.Close(sendFD)
	}
}

// dispatch runs command h. It returns the reply payload length (the payload
// is in se.wbuf after the header) and an fd to send (or -1) that dispatch's
// caller closes. dispatch owns fds.
func (se *session) dispatch(h header, p []byte, fds []int) (n int, sendFD int, err error) {
	sendFD = -1
	takesFDs := h.Cmd == cmdDMAMap || h.Cmd == cmdSetIRQs
	if len(fds) > 0 && (!takesFDs || !se.versioned) {
		closeFDs(fds)
		return 0, -1, fmt.Errorf("vfio-user: %s: unexpected fds: %w", cmdName(h.Cmd), unix.EINVAL)
	}
	if !se.versioned && h.Cmd != cmdVersion {
		return 0, -1, fmt.Errorf("vfio-user: %s before VERSION: %w", cmdName(h.Cmd), unix.EINVAL)
	}
	switch h.Cmd {
	case cmdVersion:
		n, err = se.version(p)
	case cmdDMAMap:
		err = se.dmaMap(p, fds)
	case cmdDMAUnmap:
		n, err = se.dmaUnmap(p)
	case cmdDeviceGetInfo:
		n, err = se.deviceGetInfo(p)
	case cmdGetRegionInfo:
		n, sendFD, err = se.getRegionInfo(p)
	case cmdGetRegionIOFDs:
		n, err = se.getRegionIOFDs(p)
	case cmdGetIRQInfo:
		n, err = se.getIRQInfo(p)
	case cmdSetIRQs:
		err = se.setIRQs(p, fds)
	case cmdRegionRead:
		n, err = se.regionRead(p)
	case cmdRegionWrite:
		n, err = se.regionWrite(p)
	case cmdRegionWriteMulti:
		n, err = se.regionWriteMulti(p)
	case cmdDeviceReset:
		err = se.model.Reset()
	case cmdDeviceFeature:
		// No features (migration, dirty logging): what the kernel
		// answers for an unsupported feature.
		err = fmt.Errorf("vfio-user: DEVICE_FEATURE: %w", unix.ENOTTY)
	default:
		err = fmt.Errorf("vfio-user: %s: %w", cmdName(h.Cmd), unix.ENOSYS)
	}
	return n, sendFD, err
}

func (se *session) version(p []byte) (int, error) {
	if se.versioned {
		return 0, fmt.Errorf("vfio-user: VERSION: already negotiated: %w", unix.EINVAL)
	}
	if len(p) < versionSize {
		return 0, errShort("VERSION", len(p), versionSize)
	}
	major := binary.LittleEndian.Uint16(p[0:])
	if major != 0 {
		return 0, fmt.Errorf("vfio-user: VERSION: major %d: %w", major, unix.ENOTSUP)
	}
	js := bytes.TrimRight(p[versionSize:], "\x00")
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
	if writeMulti {
		caps.WriteMultiple = &writeMulti
	}
	out, err := json.Marshal(versionJSON{Capabilities: &caps})
	if err != nil {
		return 0, fmt.Errorf("vfio-user: VERSION: %w", err)
	}
	b := se.payloadBuf(versionSize + len(out) + 1)
	copy(b[versionSize:], out) // major 0, minor 0, NUL-terminated JSON
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
	req, err := decodeDMAMap(p)
	if err != nil {
		if fd >= 0 {
			unix.Close(fd)
		}
		return err
	}
	return se.iommu.dmaMap(req, fd)
}

func (se *session) dmaUnmap(p []byte) (int, error) {
	req, err := decodeDMAUnmap(p)
	if err != nil {
		return 0, err
	}
	if err := se.iommu.dmaUnmap(req); err != nil {
		return 0, err
	}
	// The reply is the request's DMA entry.
	copy(se.payloadBuf(dmaUnmapSize), p[:dmaUnmapSize])
	return dmaUnmapSize, nil
}

func (se *session) deviceGetInfo(p []byte) (int, error) {
	req, err := decodeInfo4("DEVICE_GET_INFO", p)
	if err != nil {
		return 0, err
	}
	if req.Argsz < deviceInfoSize {
		return 0, fmt.Errorf("vfio-user: DEVICE_GET_INFO: argsz %d: %w", req.Argsz, unix.EINVAL)
	}
	info := se.model.DeviceInfo()
	r := info4{Argsz: deviceInfoSize, Flags: info.Flags, A: info.NumRegions, B: info.NumIRQs}
	r.encode(se.payloadBuf(deviceInfoSize))
	return deviceInfoSize, nil
}

func (se *session) getRegionInfo(p []byte) (int, int, error) {
	req, err := decodeRegionInfo(p)
	if err != nil {
		return 0, -1, err
	}
	if req.Argsz < regionInfoSize {
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
	full := regionInfoSize
	if len(sparse) > 0 {
		full += capHeaderSize + sparseHeaderSize + sparseAreaSize*len(sparse)
	}
	if full > int(se.o.maxData) {
		return 0, -1, fmt.Errorf("vfio-user: GET_REGION_INFO: %d sparse areas: %w", len(sparse), unix.E2BIG)
	}
	r := regionInfo{Argsz: uint32(full), Flags: flags, Index: req.Index, Size: info.Size, Offset: info.Offset}
	if int(req.Argsz) < full {
		// Too small for the capabilities: say how much is needed, send
		// neither capabilities nor fd; the client asks again.
		r.encode(se.payloadBuf(regionInfoSize))
		return regionInfoSize, -1, nil
	}
	b := se.payloadBuf(full)
	if len(sparse) > 0 {
		r.Flags |= vfio.RegionFlagCaps
		r.CapOffset = regionInfoSize
		c := b[regionInfoSize:]
		binary.LittleEndian.PutUint16(c[0:], capSparseMmap)
		binary.LittleEndian.PutUint16(c[2:], capSparseMmapVersion)
		binary.LittleEndian.PutUint32(c[4:], 0) // last capability
		binary.LittleEndian.PutUint32(c[8:], uint32(len(sparse)))
		for i, a := range sparse {
			binary.LittleEndian.PutUint64(c[16+16*i:], a.Offset)
			binary.LittleEndian.PutUint64(c[24+16*i:], a.Size)
		}
	}
	r.encode(b)
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

func (se *session) getRegionIOFDs(p []byte) (int, error) {
	req, err := decodeInfo4("GET_REGION_IO_FDS", p)
	if err != nil {
		return 0, err
	}
	if req.Argsz < regionIOFDsSize || req.Flags != 0 || req.A >= se.numRegions {
		return 0, fmt.Errorf("vfio-user: GET_REGION_IO_FDS: argsz %d flags %#x index %d: %w",
			req.Argsz, req.Flags, req.A, unix.EINVAL)
	}
	// No ioeventfds: every trapped access comes as a message.
	r := info4{Argsz: regionIOFDsSize, Flags: 0, A: req.A, B: 0}
	r.encode(se.payloadBuf(regionIOFDsSize))
	return regionIOFDsSize, nil
}

func (se *session) getIRQInfo(p []byte) (int, error) {
	req, err := decodeInfo4("GET_IRQ_INFO", p)
	if err != nil {
		return 0, err
	}
	if req.Argsz < irqInfoSize || req.A >= se.numIRQs {
		return 0, fmt.Errorf("vfio-user: GET_IRQ_INFO: argsz %d index %d: %w", req.Argsz, req.A, unix.EINVAL)
	}
	info, err := se.model.IRQInfo(req.A)
	if err != nil {
		return 0, err
	}
	r := info4{Argsz: irqInfoSize, Flags: info.Flags, A: req.A, B: info.Count}
	r.encode(se.payloadBuf(irqInfoSize))
	return irqInfoSize, nil
}

func (se *session) setIRQs(p []byte, fds []int) (err error) {
	defer func() {
		if err != nil {
			closeFDs(fds)
		}
	}()
	req, err := decodeIRQSet(p)
	if err != nil {
		return err
	}
	data, action := req.Flags&irqSetDataMask, req.Flags&irqSetActionMaskAll
	if req.Flags&^(irqSetDataMask|irqSetActionMaskAll) != 0 || !onebit(data) || !onebit(action) {
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
	if data != irqSetDataEventfd && len(fds) > 0 {
		return fmt.Errorf("vfio-user: SET_IRQS: fds without DATA_EVENTFD: %w", unix.EINVAL)
	}
	if data == irqSetDataBool && len(p) < irqSetSize+int(req.Count) {
		return errShort("SET_IRQS", len(p), irqSetSize+int(req.Count))
	}
	switch {
	case action == irqSetActionTrigger && data == irqSetDataEventfd:
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
				f.Close()
			}
			return err
		}
		return nil
	case action == irqSetActionTrigger && data == irqSetDataNone && disableAll:
		se.irqsSet[req.Index] = true
		return se.model.SetIRQs(req.Index, 0, 0, nil)
	case action == irqSetActionTrigger:
		// A client-triggered interrupt (loopback) is not supported.
		return fmt.Errorf("vfio-user: SET_IRQS: trigger from the client: %w", unix.ENOTSUP)
	case data == irqSetDataEventfd:
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

func (se *session) checkAccess(what string, ra regionAccess) error {
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
	ra, err := decodeRegionAccess("REGION_READ", p)
	if err != nil {
		return 0, err
	}
	if err := se.checkAccess("REGION_READ", ra); err != nil {
		return 0, err
	}
	n := regionAccessSize + int(ra.Count)
	b := se.payloadBuf(n)
	ra.encode(b)
	if err := se.model.RegionRead(ra.Region, ra.Offset, b[regionAccessSize:]); err != nil {
		return 0, err
	}
	return n, nil
}

func (se *session) regionWrite(p []byte) (int, error) {
	ra, err := decodeRegionAccess("REGION_WRITE", p)
	if err != nil {
		return 0, err
	}
	if err := se.checkAccess("REGION_WRITE", ra); err != nil {
		return 0, err
	}
	if len(p) != regionAccessSize+int(ra.Count) {
		return 0, fmt.Errorf("vfio-user: REGION_WRITE: %d data bytes for count %d: %w", len(p)-regionAccessSize, ra.Count, unix.EINVAL)
	}
	if err := se.model.RegionWrite(ra.Region, ra.Offset, p[regionAccessSize:]); err != nil {
		return 0, err
	}
	ra.encode(se.payloadBuf(regionAccessSize))
	return regionAccessSize, nil
}

func (se *session) regionWriteMulti(p []byte) (int, error) {
	if len(p) < writeMultiHdrSize {
		return 0, errShort("REGION_WRITE_MULTI", len(p), writeMultiHdrSize)
	}
	cnt := binary.LittleEndian.Uint64(p)
	if cnt == 0 || cnt > writeMultiMax || len(p) != writeMultiHdrSize+int(cnt)*writeMultiOneSize {
		return 0, fmt.Errorf("vfio-user: REGION_WRITE_MULTI: %d writes in %d bytes: %w", cnt, len(p), unix.EINVAL)
	}
	// Validate all before doing any.
	for i := range int(cnt) {
		e := p[writeMultiHdrSize+i*writeMultiOneSize:]
		ra, _ := decodeRegionAccess("REGION_WRITE_MULTI", e)
		if err := se.checkAccess("REGION_WRITE_MULTI", ra); err != nil {
			return 0, err
		}
		if ra.Count > writeMultiData {
			return 0, fmt.Errorf("vfio-user: REGION_WRITE_MULTI: count %d: %w", ra.Count, unix.EINVAL)
		}
	}
	for i := range int(cnt) {
		e := p[writeMultiHdrSize+i*writeMultiOneSize:]
		ra, _ := decodeRegionAccess("REGION_WRITE_MULTI", e)
		if err := se.model.RegionWrite(ra.Region, ra.Offset, e[regionAccessSize:regionAccessSize+ra.Count]); err != nil {
			return 0, err
		}
	}
	binary.LittleEndian.PutUint64(se.payloadBuf(writeMultiHdrSize), cnt)
	return writeMultiHdrSize, nil
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
	chunk := int(se.peerMaxData)
	if chunk == 0 {
		chunk = defaultMaxDataXferSize
	}
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

func (se *session) dmaRoundTrip(write bool, iova uint64, p []byte) error {
	c := dmaCallPool.Get().(*dmaCall)
	defer dmaCallPool.Put(c)
	c.cmd, c.addr, c.count, c.err, c.dst = cmdDMARead, iova, uint64(len(p)), nil, nil
	size := headerSize + dmaAccessSize
	if write {
		c.cmd = cmdDMAWrite
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
	for {
		se.nextID++
		if se.pending[se.nextID] == nil {
			break
		}
	}
	c.id = se.nextID
	se.pending[c.id] = c
	se.pmu.Unlock()

	h := header{MsgID: c.id, Cmd: c.cmd, Size: uint32(size), Flags: flagCommand}
	h.encode(b)
	a := dmaAccess{Addr: iova, Count: uint64(len(p))}
	a.encode(b[headerSize:])
	if write {
		copy(b[headerSize+dmaAccessSize:], p)
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
	if se.pending[c.id] == c {
		delete(se.pending, c.id)
		return true
	}
	return false
}

// dispatchReply hands the client's reply to a DMA request to its waiter.
func (se *session) dispatchReply(h header, p []byte, fds []int) {
	se.pmu.Lock()
	c := se.pending[h.MsgID]
	if c != nil && c.cmd == h.Cmd {
		delete(se.pending, h.MsgID)
	} else {
		c = nil
	}
	se.pmu.Unlock()
	if c == nil {
		se.logf("vfio-user: unexpected %s reply id %d", cmdName(h.Cmd), h.MsgID)
		return
	}
	c.err = nil
	switch {
	case len(fds) > 0:
		c.err = protoErr("%s reply with fds", cmdName(h.Cmd))
	case h.Flags&flagError != 0:
		c.err = replyError(h.Cmd, h.Errno)
	case h.Cmd == cmdDMARead:
		a, err := decodeDMAAccess("DMA_READ reply", p)
		switch {
		case err != nil:
			c.err = err
		case a.Addr != c.addr || a.Count != c.count || uint64(len(p)-dmaAccessSize) != c.count:
			c.err = protoErr("DMA_READ reply for %#x+%d to a request for %#x+%d with %d bytes",
				a.Addr, a.Count, c.addr, c.count, len(p)-dmaAccessSize)
		default:
			copy(c.dst, p[dmaAccessSize:])
		}
	case h.Cmd == cmdDMAWrite:
		// The specification's reply has a 4-byte count; accept 4 or 8.
		if len(p) != 0 && len(p) != 12 && len(p) != dmaAccessSize {
			c.err = protoErr("DMA_WRITE reply of %d bytes", len(p))
		} else if len(p) >= 8 && binary.LittleEndian.Uint64(p) != c.addr {
			c.err = protoErr("DMA_WRITE reply for another address")
		}
	}
	c.done <- struct{}{}
}
