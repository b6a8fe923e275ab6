package hfisim

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/vfio/vfiouser"
)

// The QPDBRing registers as an ioeventfd (chip.CapDBRing): one eventfd per
// attached client, offered for every QP's QPDBRing through
// DEVICE_GET_REGION_IO_FDS. A client that signals it instead of writing
// the register sends no message: the write wakes a goroutine of the device
// blocked on the eventfd in the runtime's poller, which kicks the engine as
// a register write does. That is one goroutine between the client's write
// and the engine, against the server's socket reader and handler for a
// REGION_WRITE. The value the client writes is only a count: all it can do
// is wake the engine, which then reads the records it polls anyway, less
// than a write of the register can (that counts a ring of a QP without a
// record).

// ringFD is the eventfd of one attached client and its waiter.
type ringFD struct {
	file *os.File
	done chan struct{} // closed when the waiter has returned
}

// startRing makes the eventfd of a newly attached client; nil when the
// system has none to give (the client then writes the registers).
func startRing() (*ringFD, error) {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("hfisim: doorbell eventfd: %w", err)
	}
	return &ringFD{file: os.NewFile(uintptr(fd), "hfisim-dbring"), done: make(chan struct{})}, nil
}

// wait kicks the engine for every signal until the eventfd is closed.
func (r *ringFD) wait(kick func()) {
	defer close(r.done)
	var b [8]byte
	for {
		// A read takes the whole count: any number of signals is one
		// kick, as several register writes before the engine runs are.
		// An eventfd read fails only once closed (os.ErrClosed).
		if _, err := r.file.Read(b[:]); err != nil {
			return
		}
		kick()
	}
}

// stop closes the eventfd (the client's duplicates then signal nothing)
// and waits for the waiter.
func (r *ringFD) stop() {
	_ = r.file.Close() // an eventfd has nothing to flush; the waiter's Read returns ErrClosed
	<-r.done
}

// RegionIOFDs implements vfiouser.IOFDModel: the QPDBRing register of
// every QP, 8 bytes, any value, on one eventfd.
func (d *Device) RegionIOFDs(index uint32) ([]vfiouser.IOEventFD, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if index != chip.CSRBar || d.ringFD == nil {
		return nil, nil
	}
	subs := make([]vfiouser.IOEventFD, len(d.qps))
	for n := range subs {
		subs[n] = vfiouser.IOEventFD{Offset: chip.QPDBReg(n, chip.QPDBRing), Size: 8, File: d.ringFD.file}
	}
	return subs, nil
}
