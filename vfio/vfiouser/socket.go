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
// call to readMsg, with the fds that came with it, and one writer at a
// time.
//
// Reads are buffered, so small messages cost one recvmsg or less. The fds
// of a message travel with its first byte (the sender passes them to the
// sendmsg that starts the message), and the kernel ends a read right after
// the data that carried fds (af_unix: "if (scm.fp) break"). So the fds that
// come with a read belong to the last message that starts inside that
// read; fds that no message can claim that way (a peer that attaches them
// mid-message) are closed.
type sock struct {
	uc      *net.UnixConn
	rc      syscall.RawConn
	timeout time.Duration

	// Reader state, owned by the single reading goroutine.
	maxMsg  uint32
	maxFDs  int
	rbuf    []byte
	rstart  int    // first unparsed byte in rbuf
	rend    int    // end of data in rbuf
	roff    uint64 // stream offset of rbuf[rstart]
	batches []fdBatch
	oob     []byte
	rmsg    unix.Msghdr
	riov    unix.Iovec
	rn      int
	roobn   int
	rflags  int
	rerr    error
	rfn     func(uintptr) bool

	// Writer state, under wmu.
	wmu      sync.Mutex
	wb       []byte
	woob     []byte
	wdone    int
	werr     error
	wwait    bool // wait for the socket to become writable
	wblocked bool // the non-waiting attempt found it full
	wfn      func(uintptr) bool
}

// fdBatch is the fds that came with the read of stream bytes [a, b).
type fdBatch struct {
	a, b  uint64
	fds   []int
	trunc bool
}

const readBufSize = 128 << 10

// keepReadBuf is the largest read buffer kept between messages: room for
// a DMA_READ reply or DMA_WRITE of the default max_data_xfer_size (1 MiB),
// so a stream of them does not allocate (and zero) a buffer per message.
const keepReadBuf = 2*defaultMaxDataXferSize + readBufSize

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
		rbuf:    make([]byte, readBufSize),
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
		n, oobn, flags, err := recvmsg(int(fd), s.rbuf[s.rend:], s.oob, unix.MSG_CMSG_CLOEXEC, &s.rmsg, &s.riov)
		switch err {
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false
		}
		s.rn, s.roobn, s.rflags, s.rerr = n, oobn, flags, err
		if err == nil && n == 0 {
			s.rerr = io.EOF
		}
		return true
	}
}

// fill reads more of the stream into rbuf[rend:], recording fds.
func (s *sock) fill() error {
	s.rn, s.roobn, s.rflags, s.rerr = 0, 0, 0, nil
	if err := s.rc.Read(s.rfn); err != nil {
		return err
	}
	if s.roobn > 0 || s.rflags&unix.MSG_CTRUNC != 0 {
		a := s.roff + uint64(s.rend-s.rstart)
		b := fdBatch{a: a, b: a + uint64(s.rn), trunc: s.rflags&unix.MSG_CTRUNC != 0}
		if s.roobn > 0 {
			b.fds = appendRights(nil, s.oob[:s.roobn])
		}
		if s.rn == 0 {
			closeFDs(b.fds) // fds with no data: nothing can own them
		} else {
			s.batches = append(s.batches, b)
		}
	}
	s.rend += s.rn
	return s.rerr
}

// claim returns the fds of the message at stream bytes [start, end).
func (s *sock) claim(fds []int, start, end uint64) ([]int, bool) {
	trunc := false
	for len(s.batches) > 0 {
		b := &s.batches[0]
		switch {
		case b.b <= start:
			// Every message starting in that read is parsed: orphans.
			closeFDs(b.fds)
		case b.a <= start && b.b <= end:
			fds = append(fds, b.fds...)
			trunc = trunc || b.trunc
		default:
			return fds, trunc
		}
		*b = fdBatch{}
		s.batches = s.batches[1:]
	}
	s.batches = s.batches[:0:0]
	return fds, trunc
}

// closeReader closes fds read but never claimed.
func (s *sock) closeReader() {
	for _, b := range s.batches {
		closeFDs(b.fds)
	}
	s.batches = nil
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

// readMsg reads one message and returns its header, its payload (valid
// until the next readMsg) and its fds (appended to fds[:0]; the caller owns
// them). Errors: io.EOF at a clean message boundary; errFraming (with the
// header, when it was read) for a stream that can no longer be trusted;
// errMsgFDs for a complete message with too many fds (they are closed).
func (s *sock) readMsg(fds []int) (header, []byte, []int, error) {
	fds = fds[:0]
	for {
		avail := s.rend - s.rstart
		need := headerSize
		if avail >= headerSize {
			h, err := decodeHeader(s.rbuf[s.rstart:s.rend])
			if err != nil {
				return h, nil, nil, fmt.Errorf("%w: %w", errFraming, err)
			}
			if h.Size > s.maxMsg {
				return h, nil, nil, fmt.Errorf("%w: message of %d bytes exceeds %d: %w", errFraming, h.Size, s.maxMsg, unix.E2BIG)
			}
			if avail >= int(h.Size) {
				start := s.roff
				p := s.rbuf[s.rstart+headerSize : s.rstart+int(h.Size)]
				s.rstart += int(h.Size)
				s.roff += uint64(h.Size)
				if s.rstart == s.rend {
					s.rstart, s.rend = 0, 0
					if len(s.rbuf) > keepReadBuf {
						// Give back a buffer grown for one large
						// message (p keeps the old one alive).
						s.rbuf = make([]byte, readBufSize)
					}
				}
				fds, trunc := s.claim(fds, start, s.roff)
				if trunc || len(fds) > s.maxFDs {
					closeFDs(fds)
					return h, p, nil, fmt.Errorf("%w: %s (limit %d): %w", errMsgFDs, cmdName(h.Cmd), s.maxFDs, unix.EINVAL)
				}
				return h, p, fds, nil
			}
			need = int(h.Size)
		}
		// Make room for the whole message after rstart.
		if len(s.rbuf)-s.rstart < need || s.rend == len(s.rbuf) {
			if need > len(s.rbuf) {
				nb := make([]byte, max(need, readBufSize))
				s.rend = copy(nb, s.rbuf[s.rstart:s.rend])
				s.rbuf = nb
			} else {
				s.rend = copy(s.rbuf, s.rbuf[s.rstart:s.rend])
			}
			s.rstart = 0
		}
		if err := s.fill(); err != nil {
			if err == io.EOF {
				if s.rend == s.rstart {
					return header{}, nil, nil, io.EOF
				}
				err = io.ErrUnexpectedEOF
			}
			return header{}, nil, nil, fmt.Errorf("vfio-user: reading message: %w", err)
		}
	}
}

func (s *sock) doSend(fd uintptr) bool {
	for {
		n, err := unix.SendmsgN(int(fd), s.wb[s.wdone:], s.woob, nil, unix.MSG_NOSIGNAL)
		switch err {
		case nil:
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			if !s.wwait {
				s.wblocked = true
				return true
			}
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
	s.wb, s.wdone, s.werr, s.woob = b, 0, nil, nil
	s.wwait, s.wblocked = false, false
	if len(fds) > 0 {
		s.woob = unix.UnixRights(fds...)
	}
	// First without waiting; only a full socket buffer pays for a
	// deadline, which bounds a peer that stops reading.
	err := s.rc.Write(s.wfn)
	if err == nil && s.werr == nil && s.wblocked {
		s.wwait = true
		if s.timeout > 0 {
			// Without its deadline the wait would not be bounded.
			err = s.uc.SetWriteDeadline(time.Now().Add(s.timeout))
		}
		if err == nil {
			err = s.rc.Write(s.wfn)
		}
		if s.timeout > 0 {
			// Fails only on a closed socket, where the next send fails
			// anyway; the message's fate is err.
			_ = s.uc.SetWriteDeadline(time.Time{})
		}
	}
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
			_ = unix.Close(fd) // an fd we refuse: nothing to flush
		}
	}
}
