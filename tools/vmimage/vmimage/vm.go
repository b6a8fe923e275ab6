package vmimage

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/gohfi/gohfi/tools/vmimage/guest"
)

// VM is one boot of the guest: QEMU with TCG, a q35 machine with an
// emulated Intel IOMMU (so that the guest's vfio-pci has real DMA
// remapping), guest RAM in a shared memfd (so a vfio-user server can map
// it) and optionally one vfio-user-pci device.
type VM struct {
	Artifacts *Artifacts
	Initramfs string
	MemoryMB  int // default 1024
	CPUs      int // default 1: TCG on a shared two-core machine
	// VFIOUserSocket, when set, adds a vfio-user-pci device connected to
	// the vfio-user server listening on this unix socket.
	VFIOUserSocket string
	// VFIOUserDevices adds more vfio-user-pci devices, after the one of
	// VFIOUserSocket.
	VFIOUserDevices []VFIOUserDevice
	// Append is added to the kernel command line.
	Append []string
	// ExtraArgs are added to the QEMU command line.
	ExtraArgs []string
}

// VFIOUserDevice is a vfio-user-pci device of the guest.
type VFIOUserDevice struct {
	// Socket is where its vfio-user server listens.
	Socket string
	// Slot, when not 0, puts the device at PCI address GuestBDF(Slot), so
	// guest tests can be told where it is; 0 lets QEMU choose.
	Slot int
}

// GuestBDF is the guest PCI address of a device in slot (function 0) of the
// q35 root bus.
func GuestBDF(slot int) string { return fmt.Sprintf("0000:00:%02x.0", slot) }

func (d VFIOUserDevice) arg() (string, error) {
	if d.Slot < 0 || d.Slot > 0x1f {
		return "", fmt.Errorf("vmimage: vfio-user device %s: PCI slot %d out of range", d.Socket, d.Slot)
	}
	// QEMU takes the socket only in JSON form: dotted keys
	// (socket.path=) are rejected for this device.
	dev := map[string]any{
		"driver": "vfio-user-pci",
		"socket": map[string]string{"type": "unix", "path": d.Socket},
	}
	if d.Slot != 0 {
		dev["addr"] = fmt.Sprintf("%#x", d.Slot)
	}
	b, err := json.Marshal(dev)
	return string(b), err
}

// Args returns QEMU's command line (without the program). With
// interactive, the serial console and the QEMU monitor share stdio
// (Ctrl-A X quits); otherwise the console goes to stdout.
func (vm *VM) Args(interactive bool) ([]string, error) {
	mem := vm.MemoryMB
	if mem == 0 {
		mem = 1024
	}
	cpus := vm.CPUs
	if cpus == 0 {
		cpus = 1
	}
	// no_timer_check: under TCG on a loaded host the IO-APIC timer check
	// through interrupt remapping can fail and panic the boot ("timer
	// doesn't work through Interrupt-remapped IO-APIC").
	appendLine := []string{"console=ttyS0", "intel_iommu=on", "panic=-1", "quiet", "mitigations=off", "no_timer_check"}
	appendLine = append(appendLine, vm.Append...)
	serial := "stdio"
	if interactive {
		serial = "mon:stdio"
	}
	args := []string{
		"-nodefaults", "-no-user-config", "-no-reboot",
		"-display", "none",
		"-accel", "tcg",
		"-machine", "q35,kernel-irqchip=split,memory-backend=mem",
		"-object", fmt.Sprintf("memory-backend-memfd,id=mem,size=%dM,share=on", mem),
		"-m", fmt.Sprintf("%dM", mem),
		"-smp", fmt.Sprint(cpus),
		// The IOMMU comes before the devices it translates for.
		"-device", "intel-iommu,intremap=on,caching-mode=on",
		"-serial", serial,
		"-kernel", vm.Artifacts.Kernel(),
		"-initrd", vm.Initramfs,
		"-append", strings.Join(appendLine, " "),
	}
	devs := vm.VFIOUserDevices
	if vm.VFIOUserSocket != "" {
		devs = append([]VFIOUserDevice{{Socket: vm.VFIOUserSocket}}, devs...)
	}
	for _, d := range devs {
		a, err := d.arg()
		if err != nil {
			return nil, err
		}
		args = append(args, "-device", a)
	}
	return append(args, vm.ExtraArgs...), nil
}

// RunResult is what a non-interactive boot produced.
type RunResult struct {
	Report  guest.Report
	Console []byte // everything the guest wrote to its serial console
	Stderr  []byte // QEMU's own messages
	// BootToInit is the wall time from starting QEMU to the init's first
	// marker; Total from starting QEMU to its exit.
	BootToInit time.Duration
	Total      time.Duration
}

// Failed reports whether the run did not complete or a test failed.
func (r *RunResult) Failed() bool {
	if !r.Report.Complete {
		return true
	}
	for _, t := range r.Report.Results {
		if !t.Passed() {
			return true
		}
	}
	return false
}

// Run boots the guest, reads its console until the init reports its results
// and powers off, and returns what it read. When ctx ends first QEMU is
// killed and the error says so; the partial console is in the result. If
// console is not nil, the guest's console is copied to it as it arrives.
func (vm *VM) Run(ctx context.Context, console io.Writer) (*RunResult, error) {
	args, err := vm.Args(false)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	cmd := vm.Artifacts.QEMUCommand(ctx, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.Stdin = nil
	cmd.WaitDelay = 5 * time.Second
	// Our own pipe rather than StdoutPipe: Wait must not depend on the
	// reader having seen EOF, and the reader is stopped by closing r.
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer func() { _ = r.Close() }() // our read end: nothing to flush (and maybe closed below)
	cmd.Stdout = w
	res := &RunResult{}
	start := time.Now()
	err = cmd.Start()
	_ = w.Close() // our copy of QEMU's stdout: dropping it only lets the reader see EOF
	if err != nil {
		return nil, fmt.Errorf("vmimage: starting QEMU: %w", err)
	}

	var (
		mu      sync.Mutex
		log     bytes.Buffer
		parser  guest.Parser
		perr    error
		guestOK = make(chan struct{})
	)
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		sc := bufio.NewScanner(r)
		sc.Buffer(make([]byte, 0, 64<<10), 64<<20)
		signalled := false
		for sc.Scan() {
			line := sc.Text()
			mu.Lock()
			log.WriteString(line)
			log.WriteByte('\n')
			mu.Unlock()
			if console != nil {
				_, _ = fmt.Fprintln(console, line) // an echo only: the log above keeps the line
			}
			hadInit := parser.Report.Init != nil
			done, err := parser.Line(line)
			if !hadInit && parser.Report.Init != nil {
				res.BootToInit = time.Since(start)
			}
			if err != nil && perr == nil {
				perr = err
			}
			if done && !signalled {
				signalled = true
				close(guestOK)
			}
		}
	}()

	var waitErr error
	waitDone := make(chan struct{})
	go func() {
		waitErr = cmd.Wait()
		close(waitDone)
	}()

	var runErr error
	select {
	case <-waitDone:
	case <-guestOK:
		// The init is powering off; give QEMU a bounded time to exit.
		select {
		case <-waitDone:
		case <-time.After(15 * time.Second):
			cancel()
			<-waitDone
		}
	case <-ctx.Done():
		runErr = fmt.Errorf("vmimage: guest did not finish: %w (QEMU killed)", context.Cause(ctx))
		cancel()
		<-waitDone
	}
	// QEMU is gone: the reader sees EOF unless something inherited the
	// pipe; do not wait for it long.
	select {
	case <-readDone:
	case <-time.After(2 * time.Second):
		_ = r.Close() // closing is how the reader is stopped
		<-readDone
	}
	res.Total = time.Since(start)
	mu.Lock()
	res.Console = append([]byte(nil), log.Bytes()...)
	mu.Unlock()
	res.Stderr = stderr.Bytes()
	res.Report = parser.Report
	switch {
	case runErr != nil:
		return res, runErr
	case perr != nil:
		return res, perr
	case !res.Report.Complete:
		return res, fmt.Errorf("vmimage: QEMU exited (%v) before the guest reported its results: %s",
			waitErr, firstLine(res.Stderr))
	}
	return res, nil
}

// Interactive boots the guest with its console on this process's stdio and
// returns when QEMU exits.
func (vm *VM) Interactive(ctx context.Context) error {
	args, err := vm.Args(true)
	if err != nil {
		return err
	}
	cmd := vm.Artifacts.QEMUCommand(ctx, args...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil && !errors.Is(err, context.Canceled) {
		return fmt.Errorf("vmimage: QEMU: %w", err)
	}
	return nil
}
