package qemu

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/gohfi/gohfi/hfisim"
	"github.com/gohfi/gohfi/tools/vmimage/vmimage"
	"github.com/gohfi/gohfi/vfio/vfiouser"
)

// TestGuestHFISimSmoke serves hfisim over vfio-user on a unix socket, boots
// the guest with QEMU's vfio-user-pci device on it and runs the smoke
// scenario (guestprobe.TestHFISmoke) through the kernel VFIO backend.
func TestGuestHFISimSmoke(t *testing.T) {
	a := Setup(t)
	cfg := hfisim.DefaultConfig()
	dev, err := hfisim.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	sock := filepath.Join(t.TempDir(), "hfisim.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- vfiouser.NewServer(dev).Serve(ctx, ln) }()
	defer func() {
		cancel()
		select {
		case err := <-served:
			if err != nil && !errors.Is(err, context.Canceled) {
				t.Errorf("vfio-user server: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("vfio-user server did not stop within 10 s")
		}
	}()

	res := RunDeviceScenarios(t, a, sock, []vmimage.TestPackage{
		{Package: "./test/qemu/guestprobe", Tags: []string{"gohfiguest"}, Run: "^TestHFI", Timeout: time.Minute},
	})
	t.Logf("guest facts:\n%s", FormatFacts(Facts(res)))
}
