// Command guestinit is the init (PID 1) of the gohfi test guest. It mounts
// the pseudo file systems, loads the kernel modules it was given, runs the
// test binaries listed in its configuration, writes their results to the
// console between markers (see package guest) and powers the guest off.
//
// It is built as a static binary (CGO_ENABLED=0) and placed at /init of the
// initramfs by tools/vmimage.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/tools/vmimage/guest"
)

func main() {
	console := os.Stdout
	if err := run(console); err != nil {
		// PID 1 has no other output: a console that fails shows as a
		// report missing on the host.
		_, _ = fmt.Fprintf(console, "\n%s%v\n", guest.MarkerError, err)
	}
	poweroff(console)
}

func run(console *os.File) error {
	// The kernel starts init with an almost empty environment; programs
	// are looked up here.
	if err := os.Setenv("PATH", "/gohfi/bin:/bin:/sbin"); err != nil {
		return fmt.Errorf("setting PATH: %w", err)
	}
	// Mounted in order; a failure is reported, not fatal: the tests say
	// what they miss.
	mounts := []struct {
		source, target, fstype string
		flags                  uintptr
		data                   string
	}{
		{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
		{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
		{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755"},
		{"tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, ""},
		{"tracefs", "/sys/kernel/tracing", "tracefs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
		{"bpf", "/sys/fs/bpf", "bpf", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
		{"debugfs", "/sys/kernel/debug", "debugfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	}
	info := guest.InitInfo{Mounts: map[string]string{}, Modules: map[string]string{}}
	for _, m := range mounts {
		err := os.MkdirAll(m.target, 0o755)
		if err == nil {
			err = unix.Mount(m.source, m.target, m.fstype, m.flags, m.data)
		}
		info.Mounts[m.target] = errString(err)
	}
	// Keep kernel messages off the console so they cannot split result
	// lines; they stay readable in /dev/kmsg.
	_ = os.WriteFile("/proc/sys/kernel/printk", []byte("1 4 1 7\n"), 0)
	info.Uptime = uptime()
	var uts unix.Utsname
	if err := unix.Uname(&uts); err == nil {
		info.Release = unix.ByteSliceToString(uts.Release[:])
	}

	b, err := os.ReadFile(guest.ConfigPath)
	if err != nil {
		return fmt.Errorf("reading config: %w", err)
	}
	var cfg guest.Config
	if err := json.Unmarshal(b, &cfg); err != nil {
		return fmt.Errorf("parsing %s: %w", guest.ConfigPath, err)
	}

	start := time.Now()
	for _, m := range cfg.Modules {
		info.Modules[m.Name] = errString(loadModule(m))
	}
	info.ModulesMS = float64(time.Since(start).Microseconds()) / 1000
	if err := guest.Encode(console, guest.MarkerInit, info); err != nil {
		return err
	}

	env := append(os.Environ(), guest.EnvGuest+"=1", "HOME=/tmp", "TMPDIR=/tmp")
	env = append(env, cfg.Env...)
	results := make([]guest.Result, 0, len(cfg.Tests))
	for _, t := range cfg.Tests {
		results = append(results, runTest(t, env))
	}
	if _, err := fmt.Fprintf(console, "\n%s\n", guest.MarkerBegin); err != nil {
		return err
	}
	for _, r := range results {
		if err := guest.Encode(console, guest.MarkerResult, r); err != nil {
			return err
		}
	}
	for _, r := range results {
		if !r.Passed() {
			// The kernel's view of a failure (IOMMU faults, vfio-pci
			// messages) is kept off the console while tests run.
			if err := guest.Encode(console, guest.MarkerKmsg, kmsg(32<<10)); err != nil {
				return err
			}
			break
		}
	}
	if _, err := fmt.Fprintf(console, "\n%s%d\n", guest.MarkerEnd, len(results)); err != nil {
		return err
	}

	if cfg.Interactive {
		_ = os.WriteFile("/proc/sys/kernel/printk", []byte("4 4 1 7\n"), 0)
		shell(console, env)
	}
	return nil
}

// loadModule loads an uncompressed module file with finit_module, falling
// back to init_module for kernels that refuse finit_module on the
// initramfs (tmpfs) file.
func loadModule(m guest.Module) error {
	f, err := os.Open(m.Path)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }() // read-only: nothing a close could lose
	err = unix.FinitModule(int(f.Fd()), m.Params, 0)
	if errors.Is(err, unix.EEXIST) {
		return nil
	}
	if err == nil {
		return nil
	}
	ferr := err
	img, err := os.ReadFile(m.Path)
	if err != nil {
		return err
	}
	err = unix.InitModule(img, m.Params)
	if err == nil || errors.Is(err, unix.EEXIST) {
		return nil
	}
	return fmt.Errorf("finit_module: %v; init_module: %w", ferr, err)
}

func runTest(t guest.Test, env []string) guest.Result {
	timeout := t.Timeout
	if timeout <= 0 {
		timeout = 2 * time.Minute
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, t.Path, t.Args...)
	cmd.Env = env
	cmd.Dir = "/tmp"
	cmd.Stdout, cmd.Stderr = &out, &out
	// Kill the whole process group on timeout: test binaries may fork.
	cmd.SysProcAttr = &unix.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return unix.Kill(-cmd.Process.Pid, unix.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	start := time.Now()
	err := cmd.Run()
	r := guest.Result{Name: t.Name, Duration: time.Since(start), Output: out.String()}
	var exit *exec.ExitError
	switch {
	case ctx.Err() != nil:
		r.ExitCode = -1
		r.Error = fmt.Sprintf("timed out after %v", timeout)
	case errors.As(err, &exit):
		r.ExitCode = exit.ExitCode()
	case err != nil:
		r.ExitCode = -1
		r.Error = err.Error()
	}
	return r
}

// kmsg returns the last max bytes of the kernel log, one message per line.
func kmsg(max int) string {
	// Raw syscalls: an *os.File would park on EAGAIN in the poller
	// instead of returning at the end of the log.
	fd, err := unix.Open("/dev/kmsg", unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return err.Error()
	}
	defer func() { _ = unix.Close(fd) }() // read-only: nothing a close could lose
	var b strings.Builder
	buf := make([]byte, 8192)
	for {
		n, err := unix.Read(fd, buf)
		if errors.Is(err, unix.EPIPE) {
			continue // overwritten while reading: go on with the next record
		}
		if err != nil || n <= 0 {
			break // EAGAIN at the end of the log
		}
		// "prio,seq,usec,flags;text": keep the time and the text.
		hdr, text, ok := strings.Cut(string(buf[:n]), ";")
		if !ok {
			continue
		}
		fields := strings.SplitN(hdr, ",", 4)
		if len(fields) >= 3 {
			if us, err := strconv.ParseInt(fields[2], 10, 64); err == nil {
				fmt.Fprintf(&b, "[%6d.%06d] ", us/1e6, us%1e6)
			}
		}
		text, _, _ = strings.Cut(text, "\n")
		b.WriteString(text)
		b.WriteByte('\n')
	}
	s := b.String()
	if len(s) > max {
		s = s[len(s)-max:]
	}
	return s
}

func uptime() float64 {
	b, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return -1
	}
	f, _, _ := strings.Cut(string(b), " ")
	v, err := strconv.ParseFloat(f, 64)
	if err != nil {
		return -1
	}
	return v
}

func poweroff(console *os.File) {
	// Nothing to do about a console failing now: power off regardless.
	_, _ = fmt.Fprintf(console, "\n%s\n", guest.MarkerPoweroff)
	_ = console.Sync() // a serial console may not support fsync (EINVAL)
	unix.Sync()
	// If power-off fails, returning from PID 1 panics the kernel, which
	// QEMU (-no-reboot, panic=-1) turns into an exit as well.
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
