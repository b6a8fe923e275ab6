package qemu

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/gohfi/gohfi/hfisim"
	"github.com/gohfi/gohfi/tools/vmimage/vmimage"
	"github.com/gohfi/gohfi/vfio/vfiouser"
)

// serveHFISim serves an hfisim device with cfg over vfio-user on a unix
// socket until t ends, and returns the socket's path.
func serveHFISim(t testing.TB, cfg hfisim.Config) string {
	t.Helper()
	dev, err := hfisim.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), fmt.Sprintf("hfisim-%d.sock", time.Now().UnixNano()))
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		dev.Close()
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	// The server's diagnostics (requests it refused) go to the test log.
	logf := func(format string, args ...any) {
		t.Logf("hfisim %s: "+format, append([]any{filepath.Base(sock)}, args...)...)
	}
	go func() { served <- vfiouser.NewServer(dev, vfiouser.WithLogger(logf)).Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-served:
			if err != nil && !errors.Is(err, context.Canceled) {
				t.Errorf("vfio-user server: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("vfio-user server did not stop within 10 s")
		}
		if err := dev.Close(); err != nil {
			t.Errorf("hfisim: %v", err)
		}
	})
	return sock
}

// TestGuestHFISimSmoke serves hfisim over vfio-user on a unix socket, boots
// the guest with QEMU's vfio-user-pci device on it and runs the smoke
// scenario (guestprobe.TestHFISmoke) through the kernel VFIO backend.
func TestGuestHFISimSmoke(t *testing.T) {
	a := Setup(t)
	sock := serveHFISim(t, hfisim.DefaultConfig())
	res := RunDeviceScenarios(t, a, sock, []vmimage.TestPackage{
		{Package: "./test/qemu/guestprobe", Tags: []string{"gohfiguest"}, Run: "^TestHFI", Timeout: time.Minute},
	})
	t.Logf("guest facts:\n%s", FormatFacts(Facts(res)))
}
