package hfisim

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"

	"github.com/gohfi/gohfi/vfio/vfiouser"
	"golang.org/x/sys/unix"
)

// Embedded is a device served in-process over a socketpair: the vfio-user
// path without a separate process, for the demo, tests and benchmarks.
type Embedded struct {
	Device *Device
	// Conn is the client end of the socket; hand it to vfiouser.NewClient.
	Conn *net.UnixConn

	cancel context.CancelFunc
	wg     sync.WaitGroup
	err    error
}

// StartEmbedded creates a device and serves it on one end of a new
// socketpair.
func StartEmbedded(cfg Config, opts ...vfiouser.Option) (*Embedded, error) {
	dev, err := New(cfg)
	if err != nil {
		return nil, err
	}
	srvConn, cliConn, err := socketpair()
	if err != nil {
		dev.Close()
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	e := &Embedded{Device: dev, Conn: cliConn, cancel: cancel}
	srv := vfiouser.NewServer(dev, opts...)
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		defer srvConn.Close()
		if err := srv.ServeConn(ctx, srvConn); err != nil && !errors.Is(err, context.Canceled) {
			e.err = err
		}
	}()
	return e, nil
}

// Stop ends the server (the client sees a disconnect), waits for it and
// closes the device. It returns the server's error, if any.
func (e *Embedded) Stop() error {
	e.cancel()
	e.wg.Wait()
	e.Device.Close()
	return e.err
}

// ListenAndServe serves a device on a unix socket at path until ctx ends,
// one client at a time, like a vfio-user device process.
func ListenAndServe(ctx context.Context, dev *Device, path string, opts ...vfiouser.Option) error {
	os.Remove(path)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return fmt.Errorf("hfisim: listen %s: %w", path, err)
	}
	defer os.Remove(path)
	return vfiouser.NewServer(dev, opts...).Serve(ctx, ln)
}

func socketpair() (*net.UnixConn, *net.UnixConn, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("hfisim: socketpair: %w", err)
	}
	conns := make([]*net.UnixConn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "hfisim-vfio-user")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			if i == 1 {
				conns[0].Close()
			} else {
				unix.Close(fds[1])
			}
			return nil, nil, fmt.Errorf("hfisim: socketpair: %w", err)
		}
		conns[i] = c.(*net.UnixConn)
	}
	return conns[0], conns[1], nil
}
