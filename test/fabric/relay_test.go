package fabric_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/ibwire"
	"github.com/gohfi/gohfi/internal/testenv"
)

// An impairment relay: the middle namespace of relayed() has no bridge;
// its two veth ends are joined by this program, which reads every frame
// from one (a packet socket) and writes it to the other. It is there
// because this machine's kernel has neither netem nor fq (tc qdisc add
// ... netem: "unknown qdisc"), and a tc program can drop and duplicate
// but not hold a packet back. RoCEv2 frames (IPv4, UDP port 4791) are
// dropped, sent twice, or held back until one to three later frames of
// the same direction have passed (or 1 ms passes without one), as a seeded
// generator decides, per direction; other frames (ARP) cross untouched.

// impairment is what the relay does to RoCEv2 frames, in fractions.
type impairment struct {
	loss, dup, reorder float64
}

func (m impairment) String() string {
	return fmt.Sprintf("loss %g%%, duplication %g%%, reordering %g%%", m.loss*100, m.dup*100, m.reorder*100)
}

// relayStats counts what the relay did, both directions together.
type relayStats struct {
	forwarded, dropped, duplicated, reordered, sockDrops uint64
}

type relay struct {
	imp   atomic.Pointer[impairment]
	stats [5]atomic.Uint64 // relayStats' fields, in order
	quit  chan struct{}
	done  chan error
}

// startRelay joins mid[0] and mid[1] (two devices of one namespace) with
// the relay, without impairment, until t ends.
func startRelay(t *testing.T, mid [2]ns, seed int64) *relay {
	t.Helper()
	r := &relay{quit: make(chan struct{}), done: make(chan error, 2)}
	r.imp.Store(&impairment{})
	started := make(chan error, 2)
	for i := range 2 {
		go r.forward(mid[i], mid[1-i], rand.New(rand.NewSource(seed+int64(i))), started)
	}
	errs := errors.Join(<-started, <-started)
	if errs != nil {
		close(r.quit)
		testenv.Require(t, errs, "the relay's packet sockets")
	}
	t.Cleanup(func() {
		close(r.quit)
		if err := errors.Join(<-r.done, <-r.done); err != nil {
			t.Errorf("relay: %v", err)
		}
	})
	return r
}

// set changes what the relay does from the next frame on.
func (r *relay) set(m impairment) { r.imp.Store(&m) }

func (r *relay) counts() relayStats {
	return relayStats{r.stats[0].Load(), r.stats[1].Load(), r.stats[2].Load(), r.stats[3].Load(), r.stats[4].Load()}
}

func (s relayStats) sub(o relayStats) relayStats {
	return relayStats{s.forwarded - o.forwarded, s.dropped - o.dropped, s.duplicated - o.duplicated,
		s.reordered - o.reordered, s.sockDrops - o.sockDrops}
}

// held is a frame held back until after more frames have passed.
type held struct {
	frame []byte
	after int
}

// forward relays the frames that arrive on in to out until quit, on a
// thread of its own in their namespace (never given back to the runtime).
func (r *relay) forward(in, out ns, rng *rand.Rand, started chan<- error) {
	runtime.LockOSThread() // never unlocked: the thread joins the namespace and dies with the goroutine
	rfd, err := packetSocket(in)
	if err != nil {
		started <- err
		r.done <- nil
		return
	}
	defer unix.Close(rfd)
	wfd, err := packetSocket(out)
	if err != nil {
		started <- err
		r.done <- nil
		return
	}
	defer unix.Close(wfd)
	// A burst must not overflow the relay's own socket: that would be a
	// loss the relay does not decide and count as its own.
	started <- errors.Join(unix.SetsockoptInt(rfd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 16<<20),
		unix.SetsockoptInt(wfd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, 16<<20))
	var hold []held
	send := func(f []byte) error {
		_, err := unix.Write(wfd, f)
		return err
	}
	// release sends the held frames whose turn came (all when flush).
	release := func(flush bool) error {
		k := 0
		for _, h := range hold {
			h.after--
			if flush || h.after <= 0 {
				if err := send(h.frame); err != nil {
					return err
				}
				continue
			}
			hold[k] = h
			k++
		}
		hold = hold[:k]
		return nil
	}
	buf := make([]byte, 65536)
	err = func() error {
		for {
			if len(hold) > 0 {
				// Frames held back wait at most a millisecond for later
				// ones (the ends' timers are tens of milliseconds).
				pfd := []unix.PollFd{{Fd: int32(rfd), Events: unix.POLLIN}}
				k, err := unix.Poll(pfd, 1)
				if err != nil && !errors.Is(err, unix.EINTR) {
					return err
				}
				if k == 0 {
					if err := release(true); err != nil {
						return err
					}
					continue
				}
			}
			n, from, err := unix.Recvfrom(rfd, buf, 0)
			switch {
			case errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR):
				select {
				case <-r.quit:
					return release(true)
				default:
				}
				continue
			case err != nil:
				return err
			}
			if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
				continue // the other direction's writes
			}
			f := buf[:n]
			m := r.imp.Load()
			if roce := isRoCE(f); roce {
				// The veth end hands the UDP checksum to its offload; a
				// packet socket does not complete it. Zero is IPv4's "no
				// checksum" (the ICRC does not cover it).
				clearUDPChecksum(f)
				switch x := rng.Float64(); {
				case x < m.loss:
					r.stats[1].Add(1)
					continue
				case x < m.loss+m.dup:
					r.stats[2].Add(1)
					if err := send(f); err != nil {
						return err
					}
				case x < m.loss+m.dup+m.reorder:
					r.stats[3].Add(1)
					hold = append(hold, held{append([]byte(nil), f...), 1 + rng.Intn(3)})
					continue
				}
			}
			if err := send(f); err != nil {
				return err
			}
			r.stats[0].Add(1)
			if err := release(false); err != nil {
				return err
			}
		}
	}()
	if st, serr := unix.GetsockoptTpacketStats(rfd, unix.SOL_PACKET, unix.PACKET_STATISTICS); serr == nil {
		r.stats[4].Add(uint64(st.Drops))
	} else {
		err = errors.Join(err, serr)
	}
	if err != nil {
		err = fmt.Errorf("%s -> %s: %w", in.dev, out.dev, err)
	}
	r.done <- err
}

// isRoCE reports whether f is an Ethernet frame of an IPv4 UDP datagram
// to the RoCEv2 port.
func isRoCE(f []byte) bool {
	if len(f) < 14+20+8 || binary.BigEndian.Uint16(f[12:]) != 0x0800 || f[14+9] != unix.IPPROTO_UDP {
		return false
	}
	ihl := int(f[14]&0xf) * 4
	return len(f) >= 14+ihl+8 && binary.BigEndian.Uint16(f[14+ihl+2:]) == ibwire.UDPPort
}

func clearUDPChecksum(f []byte) {
	ihl := int(f[14]&0xf) * 4
	f[14+ihl+6], f[14+ihl+7] = 0, 0
}

// TestFabricImpaired: two hfisim processes joined through the relay, two
// connections between them running WRITE, READ and SEND both ways at once
// while the relay loses 1% and 10% of the frames, duplicates them,
// reorders them, and all three: the data arrives intact, the losses are
// made up by retransmissions (the devices' counters), the duplicates are
// recognised, and nothing hangs.
func TestFabricImpaired(t *testing.T) {
	a, b, mid := relayed(t)
	r := startRelay(t, mid, 13)
	x, y := attachNode(t, a), attachNode(t, b)
	// 4.096 us * 2^12 = 16.8 ms before a retransmission, 7 retries.
	attr := driver.NetAttr{Timeout: 12, RetryCnt: 7, RnrRetry: 7, MinRnrTimer: 1}
	var conns [][2]*ep
	for range 2 {
		ex, ey := newEP(t, x, 1<<20), newEP(t, y, 1<<20)
		connectEPs(t, ex, ey, 1, 1, attr)
		conns = append(conns, [2]*ep{ex, ey})
	}
	for i, c := range []struct {
		name string
		imp  impairment
		// what the devices must have counted (sums of both)
		want []string
	}{
		{"clean", impairment{}, nil},
		{"loss1", impairment{loss: 0.01}, []string{"retransmits"}},
		{"loss10", impairment{loss: 0.10}, []string{"retransmits", "timeouts"}},
		{"dup5", impairment{dup: 0.05}, []string{"duplicate_requests"}},
		{"reorder10", impairment{reorder: 0.10}, []string{"seq_naks_sent"}},
		{"all", impairment{loss: 0.02, dup: 0.02, reorder: 0.05}, []string{"retransmits", "duplicate_requests"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			cx0, cy0, r0 := counters(t, x), counters(t, y), r.counts()
			r.set(c.imp)
			defer r.set(impairment{})
			start := time.Now()
			if err := rounds(conns, roundSizes, byte(32*i)); err != nil {
				t.Fatal(err)
			}
			took := time.Since(start)
			rs := r.counts().sub(r0)
			cx, cy := counters(t, x), counters(t, y)
			d := func(k string) uint64 { return cx[k] - cx0[k] + cy[k] - cy0[k] }
			for _, k := range c.want {
				if d(k) == 0 {
					t.Errorf("%s: no %s counted by the devices", c.imp, k)
				}
			}
			switch {
			case c.imp.loss > 0 && rs.dropped == 0, c.imp.dup > 0 && rs.duplicated == 0, c.imp.reorder > 0 && rs.reordered == 0:
				t.Errorf("%s: the relay did not do it: %+v", c.imp, rs)
			case c.imp.loss > 0 && d("retransmits") < rs.dropped/2:
				// A lost ACK may be covered by a later one; a lost request
				// or response is sent again.
				t.Errorf("%s: %d frames dropped, %d retransmissions", c.imp, rs.dropped, d("retransmits"))
			}
			if d("drop_icrc")+d("drop_header")+d("drop_length")+d("drop_peer")+d("drop_qp") != 0 {
				t.Errorf("malformed or stray packets counted: %v / %v", cx, cy)
			}
			t.Logf("%s: %v; relay %+v; devices: retransmits %d, timeouts %d, seq NAKs %d, duplicates %d, drop_psn %d",
				c.imp, took.Round(time.Millisecond), rs, d("retransmits"), d("timeouts"), d("seq_naks_sent"),
				d("duplicate_requests"), d("drop_psn"))
		})
	}
}
