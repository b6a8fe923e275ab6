package vfiouser

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Errors of the framed reader. errFraming means the byte stream can no
// longer be trusted to be at a message boundary: the connection must be
// dropped. errMsgFDs means the message was read completely but came with
// more fds than allowed (they are closed already): the stream is intact.
var (
	errFraming = errors.New("vfio-user: framing error")
	errMsgFDs  = errors.New("vfio-user: too many file descriptors with message")
)

// sock frames vfio-user messages on a unix stream socket: one message per
// read, with the fds that came with it, and one writer at a time.
//
// Reads take exactly the header, then exactly the rest of the message. The
// kernel attaches SCM_RIGHTS to the first byte of what the sender passed to
// sendmsg, so reading no further than the current message guarantees that
// fds are never attributed to the wrong message. It costs two recvmsg calls
// per message; a buffered reader could glue a fd-carrying message onto the
// tail of the previous one.
type sock struct {
	uc      *net.UnixConn
	rc      syscall.RawConn
	timeout time.Duration

	// Reader state, owned by the single reading goroutine.
	maxMsg uint32
	maxFDs int
	hdrBuf [headerSize]byte
	oob    []byte
	rp     []byte
	rn     int
	roobn  int
	rflags int
	rerr   error
	rfn    func(uintptr) bool

	// Writer state, under wmu.
	wmu   sync.Mutex
	wb    []byte
	woob  []byte
	wdone int
	werr  error
	wfn   func(uintptr) bool
}

func newSock(uc *net.UnixConn, o *options) (*sock, error) {
	rc, err := uc.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("vfio-user: socket: %w", err)
	}
	s := &sock{
		uc:      uc,
		rc:      rc,
		timeout: o.timeout,
		maxMsg:  o.maxData + msgHeadroom,
		maxFDs:  o.maxMsgFDs,
		// Exactly room for maxFDs: with more, the kernel sets MSG_CTRUNC
		// and closes the ones that did not fit.
		oob: make([]byte, unix.CmsgSpace(o.maxMsgFDs*4)),
	}
	s.rfn = s.doRecv
	s.wfn = s.doSend
	return s, nil
}

func (s *sock) doRecv(fd uintptr) bool {
	for {
		n, oobn, flags, _, err := unix.Recvmsg(int(fd), s.rp[s.rn:], s.oob, unix.MSG_CMSG_CLOEXEC)
		switch err {
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false
		}
		s.rerr = err
		if err == nil {
			s.rn += n
			s.roobn, s.rflags = oobn, flags
			if n == 0 {
				s.rerr = io.EOF
			}
		}
		return true
	}
}

// readFull fills p, collecting any fds that arrive into fds. A peer that
// sends more fds than fit sets *trunc.
func (s *sock) readFull(p []byte, fds []int, trunc *bool) ([]int, error) {
	s.rp, s.rn = p, 0
	defer func() { s.rp = nil }()
	for s.rn < len(p) {
		s.rerr, s.roobn, s.rflags = nil, 0, 0
		if err := s.rc.Read(s.rfn); err != nil {
			return fds, err
		}
		if s.roobn > 0 {
			fds = appendRights(fds, s.oob[:s.roobn])
		}
		if s.rflags&unix.MSG_CTRUNC != 0 {
			*trunc = true
		}
		if s.rerr != nil {
			return fds, s.rerr
		}
	}
	return fds, nil
}

// appendRights appends the fds of the SCM_RIGHTS messages in oob.
func appendRights(fds []int, oob []byte) []int {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return fds
	}
	for i := range msgs {
		if msgs[i].Header.Level != unix.SOL_SOCKET || msgs[i].Header.Type != unix.SCM_RIGHTS {
			continue
		}
		rights, err := unix.ParseUnixRights(&msgs[i])
		if err == nil {
			fds = append(fds, rights...)
		}
	}
	return fds
}

// readMsg reads one message into *buf (grown as needed, reused by the
// caller) and returns its header, payload (aliasing *buf) and fds (appended
// to fds[:0]; the caller owns them). Errors: io.EOF at a clean message
// boundary; errFraming (with the header, when it was read) for a stream
// that can no longer be trusted; errMsgFDs for a complete message with too
// many fds (the fds are closed).
func (s *sock) readMsg(buf *[]byte, fds []int) (header, []byte, []int, error) {
	fds = fds[:0]
	trunc := false
	fds, err := s.readFull(s.hdrBuf[:], fds, &trunc)
	if err != nil {
		closeFDs(fds)
		if err == io.EOF && s.rn == 0 {
			return header{}, nil, nil, io.EOF
		}
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return header{}, nil, nil, fmt.Errorf("vfio-user: reading header: %w", err)
	}
	h, err := decodeHeader(s.hdrBuf[:])
	if err != nil {
		closeFDs(fds)
		return h, nil, nil, fmt.Errorf("%w: %w", errFraming, err)
	}
	if h.Size > s.maxMsg {
		closeFDs(fds)
		return h, nil, nil, fmt.Errorf("%w: message of %d bytes exceeds %d: %w", errFraming, h.Size, s.maxMsg, unix.E2BIG)
	}
	n := int(h.Size) - headerSize
	if cap(*buf) < n {
		*buf = make([]byte, n, max(n, 2*cap(*buf)))
	}
	p := (*buf)[:n]
	if n > 0 {
		fds, err = s.readFull(p, fds, &trunc)
		if err != nil {
			closeFDs(fds)
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return h, nil, nil, fmt.Errorf("vfio-user: reading %s payload: %w", cmdName(h.Cmd), err)
		}
	}
	if trunc || len(fds) > s.maxFDs {
		closeFDs(fds)
		return h, p, nil, fmt.Errorf("%w: %s (limit %d): %w", errMsgFDs, cmdName(h.Cmd), s.maxFDs, unix.EINVAL)
	}
	return h, p, fds, nil
}

func (s *sock) doSend(fd uintptr) bool {
	for {
		n, err := unix.SendmsgN(int(fd), s.wb[s.wdone:], s.woob, nil, unix.MSG_NOSIGNAL)
		switch err {
		case nil:
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false
		default:
			s.werr = err
			return true
		}
		// The fds went with the first byte; never send them twice.
		s.woob = nil
		s.wdone += n
		if s.wdone >= len(s.wb) {
			return true
		}
	}
}

// send writes the complete message b (header included) with fds.
func (s *sock) send(b []byte, fds []int) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if s.timeout > 0 {
		// Bounds a peer that stops reading; the deadline costs no syscall.
		if err := s.uc.SetWriteDeadline(time.Now().Add(s.timeout)); err != nil {
			return fmt.Errorf("vfio-user: send: %w", err)
		}
	}
	s.wb, s.wdone, s.werr, s.woob = b, 0, nil, nil
	if len(fds) > 0 {
		s.woob = unix.UnixRights(fds...)
	}
	err := s.rc.Write(s.wfn)
	if err == nil {
		err = s.werr
	}
	s.wb, s.woob = nil, nil
	if err != nil {
		return fmt.Errorf("vfio-user: send %s: %w", cmdNameOf(b), err)
	}
	return nil
}

func cmdNameOf(b []byte) string {
	if len(b) < 4 {
		return "message"
	}
	return cmdName(uint16(b[2]) | uint16(b[3])<<8)
}

func (s *sock) close() error { return s.uc.Close() }

func closeFDs(fds []int) {
	for _, fd := range fds {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
}
