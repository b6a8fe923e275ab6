package driver_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"golang.org/x/sys/unix"
)

// pollUntilGone runs Poll in a loop, as an event loop does, until it fails,
// and returns that error. A POLLPRI/POLLIN result is consumed by polling
// again; nothing is pending on a fresh context.
func pollUntilGone(f *driver.File) error {
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		_, err := f.Poll(ctx)
		cancel()
		if err != nil {
			return err
		}
	}
}

// TestPollRacingClose: pollers blocked in (or entering) Poll while another
// goroutine closes the file get EBADF, never a panic or a hang; calls after
// Close get EBADF too.
func TestPollRacingClose(t *testing.T) {
	a := openDev(t, 2)
	for i := 0; i < 200; i++ {
		f, err := a.Device.Open()
		if err != nil {
			t.Fatal(err)
		}
		assign(t, f)
		errs := make(chan error, 4)
		for range 4 {
			go func() { errs <- pollUntilGone(f) }()
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		for range 4 {
			if err := <-errs; !errors.Is(err, unix.EBADF) {
				t.Fatalf("iteration %d: Poll racing Close: %v, want EBADF", i, err)
			}
		}
		if _, err := hfiuser.CtxtInfo(f); !errors.Is(err, unix.EBADF) {
			t.Fatalf("CTXT_INFO after Close: %v, want EBADF", err)
		}
		if _, err := f.Mmap(0, 4096, unix.PROT_READ); !errors.Is(err, unix.EBADF) {
			t.Fatalf("mmap after Close: %v, want EBADF", err)
		}
	}
}

// TestPollRacingRemove: the same against Module.Remove: ENXIO.
func TestPollRacingRemove(t *testing.T) {
	for i := 0; i < 20; i++ {
		a := openDev(t, 2)
		var files []*driver.File
		for range 2 {
			f := openFile(t, a)
			assign(t, f)
			files = append(files, f)
		}
		errs := make(chan error, 8)
		for _, f := range files {
			for range 4 {
				go func() { errs <- pollUntilGone(f) }()
			}
		}
		if err := a.Module.Remove(a.Device.Info().Unit); err != nil {
			t.Fatal(err)
		}
		for range 8 {
			if err := <-errs; !errors.Is(err, unix.ENXIO) {
				t.Fatalf("iteration %d: Poll racing Remove: %v, want ENXIO", i, err)
			}
		}
		for _, f := range files {
			if _, err := hfiuser.CtxtInfo(f); !errors.Is(err, unix.ENXIO) {
				t.Fatalf("CTXT_INFO after Remove: %v, want ENXIO", err)
			}
		}
	}
}
