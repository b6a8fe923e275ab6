package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestServeUntilCancelled: run listens on the socket, and returns 0 with the
// socket removed when its context ends (what SIGINT/SIGTERM do in main).
func TestServeUntilCancelled(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "hfi.sock")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var log bytes.Buffer
	done := make(chan int, 1)
	go func() { done <- run(ctx, []string{"--socket", sock, "--contexts", "2"}, &log) }()
	deadline := time.After(10 * time.Second)
	for {
		if fi, err := os.Stat(sock); err == nil && fi.Mode()&os.ModeSocket != 0 {
			break
		}
		select {
		case code := <-done:
			t.Fatalf("run returned %d before listening: %s", code, log.String())
		case <-deadline:
			t.Fatal("no socket after 10 s")
		case <-time.After(5 * time.Millisecond):
		}
	}
	cancel()
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("exit %d: %s", code, log.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("run did not return within 10 s of cancellation")
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket left behind: %v", err)
	}
	if !strings.Contains(log.String(), "stopped") {
		t.Fatalf("log: %q", log.String())
	}
}

func TestUsage(t *testing.T) {
	var log bytes.Buffer
	for _, args := range [][]string{nil, {"--socket"}, {"--socket", "x", "extra"}, {"--socket", "x", "--port", "10.0.0.1"},
		{"--socket", "x", "--port", "udp:0.0.0.0"}} {
		if code := run(context.Background(), args, &log); code != 2 {
			t.Errorf("%q: exit %d, want 2", args, code)
		}
	}
	if code := run(context.Background(), []string{"--socket", "x", "--contexts", "0"}, &log); code != 1 {
		t.Errorf("zero contexts: exit %d, want 1", code)
	}
}
