package rxe

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/ibwire"
)

// capture reads every IPv4 packet on the tap (both directions) with a
// packet socket in the namespace and checks the RoCEv2 ones: each ICRC
// against the headers the packet really had (ibwire.ICRC over the whole
// datagram), and how many of rxe's had a nonzero IPv4 identification (the
// field a receiver behind a UDP socket cannot see).
type capture struct {
	fd     int
	done   chan struct{}
	exited chan struct{}

	mu      sync.Mutex
	fromRxe dirStats // guest -> host
	toRxe   dirStats // host -> guest
	err     error
}

type dirStats struct {
	packets, badICRC, nonzeroID int
	ports                       map[uint16]bool
}

func (d dirStats) String() string {
	return fmt.Sprintf("%d RoCEv2 packets, %d bad ICRCs, %d with a nonzero IPv4 identification, %d UDP source ports",
		d.packets, d.badICRC, d.nonzeroID, len(d.ports))
}

func startCapture(t *testing.T, n netns) *capture {
	t.Helper()
	c := &capture{fd: -1, done: make(chan struct{}), exited: make(chan struct{})}
	var err error
	inNamespace(t, n, func() {
		var ifi *net.Interface
		ifi, err = net.InterfaceByName(n.tap)
		if err != nil {
			return
		}
		// ETH_P_ALL: a socket bound to one protocol sees only what the
		// device receives, not what the host sends through it.
		c.fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return
		}
		err = unix.Bind(c.fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index})
	})
	if err == nil {
		// A read that waits at most this long, so that stop is seen.
		err = unix.SetsockoptTimeval(c.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100000})
	}
	if err != nil {
		if c.fd >= 0 {
			_ = unix.Close(c.fd) // never read
		}
		t.Fatalf("packet socket on %s: %v", n.tap, err)
	}
	go c.loop(n)
	return c
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func (c *capture) loop(n netns) {
	defer close(c.exited)
	defer func() { _ = unix.Close(c.fd) }() // read-only socket
	buf := make([]byte, 65536)
	guest := n.guest.Addr().As4()
	for {
		select {
		case <-c.done:
			return
		default:
		}
		k, _, err := unix.Recvfrom(c.fd, buf, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			c.mu.Lock()
			c.err = err
			c.mu.Unlock()
			return
		}
		c.packet(buf[:k], guest)
	}
}

func (c *capture) packet(b []byte, guest [4]byte) {
	if len(b) < 28 || b[0]>>4 != 4 || b[9] != unix.IPPROTO_UDP {
		return
	}
	hl := int(b[0]&0xF) * 4
	if len(b) < hl+8 || binary.BigEndian.Uint16(b[hl+2:]) != ibwire.UDPPort {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	d := &c.toRxe
	if [4]byte(b[12:16]) == guest {
		d = &c.fromRxe
	}
	if d.ports == nil {
		d.ports = map[uint16]bool{}
	}
	d.packets++
	d.ports[binary.BigEndian.Uint16(b[hl:])] = true
	if binary.BigEndian.Uint16(b[4:]) != 0 {
		d.nonzeroID++
	}
	total := int(binary.BigEndian.Uint16(b[2:]))
	crc, err := ibwire.ICRC(b)
	if err != nil || total > len(b) || binary.LittleEndian.Uint32(b[total-4:total]) != crc {
		d.badICRC++
	}
}

// stop ends the capture and returns what it saw.
func (c *capture) stop() (fromRxe, toRxe dirStats, err error) {
	close(c.done)
	<-c.exited
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.fromRxe, c.toRxe, c.err
}
