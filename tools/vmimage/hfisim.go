package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/gohfi/gohfi/hfisim"
	"github.com/gohfi/gohfi/tools/vmimage/vmimage"
	"github.com/gohfi/gohfi/vfio/vfiouser"
)

// serveHFISim serves an hfisim device over vfio-user on a unix socket in
// dir, for QEMU's vfio-user-pci. stop ends the server (bounded) and closes
// the device.
func serveHFISim(dir string, cfg hfisim.Config) (socket string, stop func() error, err error) {
	dev, err := hfisim.New(cfg)
	if err != nil {
		return "", nil, err
	}
	socket = filepath.Join(dir, "hfisim.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		return "", nil, errors.Join(err, dev.Close())
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	logf := func(format string, args ...any) { fmt.Fprintf(os.Stderr, "hfisim: "+format+"\n", args...) }
	go func() { served <- vfiouser.NewServer(dev, vfiouser.WithLogger(logf)).Serve(ctx, ln) }()
	stop = func() error {
		cancel()
		var err error
		select {
		case err = <-served:
			if errors.Is(err, context.Canceled) {
				err = nil
			}
		case <-time.After(10 * time.Second):
			err = errors.New("vfio-user server did not stop within 10 s")
		}
		return errors.Join(err, dev.Close())
	}
	return socket, stop, nil
}

// hfisimSlot is where the vm and run commands put their own hfisim:
// 0000:00:04.0 in the guest.
const hfisimSlot = 4

func hfisimNote() string {
	return fmt.Sprintf("vmimage: hfisim is at PCI %s in the guest: hfictl --device pci:%[1]s info", vmimage.GuestBDF(hfisimSlot))
}
