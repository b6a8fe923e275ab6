package hfisim

import (
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// mmsg is a batch of datagrams for sendmmsg(2) and recvmmsg(2): one
// message header, iovec and socket address per datagram. The port sends
// and receives through it a batch per system call instead of a datagram
// (docs/fabric.md): each datagram is still its own packet on the wire.
type mmsg struct {
	hdrs  []unix.Mmsghdr
	iovs  []unix.Iovec
	names []unix.RawSockaddrInet6 // room for either family
	bufs  [][]byte                // receive buffers (nil for sending)
}

// newMmsg makes a batch of n datagrams; size > 0 gives each a receive
// buffer of size bytes.
func newMmsg(n, size int) *mmsg {
	m := &mmsg{hdrs: make([]unix.Mmsghdr, n), iovs: make([]unix.Iovec, n), names: make([]unix.RawSockaddrInet6, n)}
	for i := range m.hdrs {
		h := &m.hdrs[i].Hdr
		h.Name = (*byte)(unsafe.Pointer(&m.names[i]))
		h.Iov = &m.iovs[i]
		h.SetIovlen(1)
	}
	if size > 0 {
		m.bufs = make([][]byte, n)
		for i := range m.bufs {
			m.bufs[i] = make([]byte, size)
			m.iovs[i].Base = &m.bufs[i][0]
			m.iovs[i].SetLen(size)
		}
	}
	return m
}

// setSend makes message i datagram b to to; v6 is the socket's family
// (an IPv4 address goes to an IPv6 socket as a mapped one).
func (m *mmsg) setSend(i int, to netip.AddrPort, b []byte, v6 bool) {
	m.iovs[i].Base = &b[0]
	m.iovs[i].SetLen(len(b))
	h := &m.hdrs[i].Hdr
	port := to.Port()
	if !v6 {
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(&m.names[i]))
		*sa = unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: to.Addr().As4()}
		sa.Port = port<<8 | port>>8 // network order
		h.Namelen = unix.SizeofSockaddrInet4
		return
	}
	sa := &m.names[i]
	*sa = unix.RawSockaddrInet6{Family: unix.AF_INET6, Addr: to.Addr().As16()}
	sa.Port = port<<8 | port>>8
	h.Namelen = unix.SizeofSockaddrInet6
}

// from is the source address of received message i (invalid: none or an
// unknown family).
func (m *mmsg) from(i int) netip.AddrPort {
	sa := &m.names[i]
	switch {
	case m.hdrs[i].Hdr.Namelen >= unix.SizeofSockaddrInet4 && sa.Family == unix.AF_INET:
		s4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		return netip.AddrPortFrom(netip.AddrFrom4(s4.Addr), s4.Port<<8|s4.Port>>8)
	case m.hdrs[i].Hdr.Namelen >= unix.SizeofSockaddrInet6 && sa.Family == unix.AF_INET6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), sa.Port<<8|sa.Port>>8)
	}
	return netip.AddrPort{}
}

// sendmmsg sends messages from m.hdrs[off:n] on fd (non-blocking) and
// returns how many went.
func (m *mmsg) sendmmsg(fd int, off, n int) (int, error) {
	r, _, e := unix.Syscall6(unix.SYS_SENDMMSG, uintptr(fd), uintptr(unsafe.Pointer(&m.hdrs[off])), uintptr(n-off),
		unix.MSG_DONTWAIT, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}

// recvmmsg receives up to len(m.hdrs) datagrams on fd (non-blocking): the
// length of message i is m.hdrs[i].Len, MSG_TRUNC in its flags when it
// did not fit its buffer.
func (m *mmsg) recvmmsg(fd int) (int, error) {
	for i := range m.hdrs {
		m.hdrs[i].Hdr.Namelen = unix.SizeofSockaddrInet6
		m.hdrs[i].Hdr.Flags = 0
	}
	r, _, e := unix.Syscall6(unix.SYS_RECVMMSG, uintptr(fd), uintptr(unsafe.Pointer(&m.hdrs[0])), uintptr(len(m.hdrs)),
		unix.MSG_DONTWAIT, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}
