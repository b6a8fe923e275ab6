package hfisim

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
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
		if cerr := dev.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("hfisim: close device: %w", cerr))
		}
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	e := &Embedded{Device: dev, Conn: cliConn, cancel: cancel}
	srv := vfiouser.NewServer(dev, opts...)
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		// ServeConn closes the conn itself; this close is for a return
		// before it got that far, and a second close's error says nothing.
		defer func() { _ = srvConn.Close() }()
		if err := srv.ServeConn(ctx, srvConn); err != nil && !errors.Is(err, context.Canceled) {
			e.err = err
		}
	}()
	return e, nil
}

// Stop ends the server (the client sees a disconnect), waits for it and
// closes the device. It returns the server's error, if any, and then the
// device's.
func (e *Embedded) Stop() error {
	e.cancel()
	e.wg.Wait()
	err := e.err
	if cerr := e.Device.Close(); cerr != nil {
		err = errors.Join(err, fmt.Errorf("hfisim: close device: %w", cerr))
	}
	return err
}

// ListenAndServe serves a device on a unix socket at path until ctx ends,
// one client at a time, like a vfio-user device process.
func ListenAndServe(ctx context.Context, dev *Device, path string, opts ...vfiouser.Option) (err error) {
	// A socket an earlier run left behind; if it cannot be removed,
	// Listen says why.
	_ = os.Remove(path)
	// The socket appears at path only once it listens (bound under a
	// temporary name, then renamed): a client that sees the file may
	// connect at once, without ECONNREFUSED between bind and listen.
	tmp := fmt.Sprintf("%s.%d.tmp", path, os.Getpid())
	_ = os.Remove(tmp) // as path above
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return fmt.Errorf("hfisim: listen %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(false) // path is removed below; tmp is gone after the rename
	if err := os.Rename(tmp, path); err != nil {
		_ = ln.Close() // the rename's error is the one to report
		_ = os.Remove(tmp)
		return fmt.Errorf("hfisim: listen %s: %w", path, err)
	}
	defer func() {
		// Serve closes ln when ctx ends, not when Accept fails.
		if cerr := ln.Close(); cerr != nil && !errors.Is(cerr, net.ErrClosed) {
			err = errors.Join(err, fmt.Errorf("hfisim: close %s: %w", path, cerr))
		}
		if rerr := os.Remove(path); rerr != nil && !errors.Is(rerr, fs.ErrNotExist) {
			err = errors.Join(err, fmt.Errorf("hfisim: remove %s: %w", path, rerr))
		}
	}()
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
		_ = f.Close() // FileConn holds a dup of the fd: this close loses nothing
		if err != nil {
			// Best effort after the failure returned: sockets nothing
			// was sent on.
			if i == 1 {
				_ = conns[0].Close()
			} else {
				_ = unix.Close(fds[1])
			}
			return nil, nil, fmt.Errorf("hfisim: socketpair: %w", err)
		}
		conns[i] = c.(*net.UnixConn)
	}
	return conns[0], conns[1], nil
}
