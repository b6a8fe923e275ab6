package vmimage

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"github.com/gohfi/gohfi/internal/testenv"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/u-root/u-root/pkg/cpio"

	"github.com/gohfi/gohfi/tools/vmimage/guest"
)

func TestReadMirror(t *testing.T) {
	// The format of Debian 12's /etc/apt/sources.list.d/debian.sources,
	// with a placeholder mirror.
	src := `Types: deb
# http://snapshot.example.invalid/archive/debian/20250520T000000Z
URIs: http://mirror.example.invalid/debian/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example.invalid/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
`
	p := filepath.Join(t.TempDir(), "debian.sources")
	if err := os.WriteFile(p, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	uri, keyring, err := readMirror(p)
	if err != nil {
		t.Fatal(err)
	}
	if uri != "http://mirror.example.invalid/debian" {
		t.Errorf("mirror %q", uri)
	}
	if !strings.HasPrefix(keyring, "/") {
		t.Errorf("keyring %q", keyring)
	}
	// Only a security source: no mirror.
	if err := os.WriteFile(p, []byte(src[strings.Index(src, "Types: deb\nURIs: http://mirror.example.invalid/debian-security"):]), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err := readMirror(p); err == nil {
		t.Error("a security-only sources file gave a mirror")
	}
}

func TestParseAptOutput(t *testing.T) {
	sim := `NOTE: This is only a simulation!
Inst gcc-14-base (14.2.0-19 Debian:13.2/stable [amd64])
Inst libc6 (2.41-12+deb13u4 Debian:13.2/stable [amd64])
Inst qemu-system-x86 (1:11.1.3+ds-1~bpo13+1 Debian Backports:stable-backports [amd64])
Conf libc6 (2.41-12+deb13u4 Debian:13.2/stable [amd64])
`
	got := parseSimulatedInstalls([]byte(sim))
	want := []string{"gcc-14-base=14.2.0-19", "libc6=2.41-12+deb13u4", "qemu-system-x86=1:11.1.3+ds-1~bpo13+1"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("installs %v, want %v", got, want)
	}
	show := "Package: linux-image-amd64\nVersion: 6.12.107-1\nDepends: linux-image-6.12.107+deb13-amd64 (= 6.12.107-1)\n"
	name, ver, err := parseKernelDepends([]byte(show))
	if err != nil || name != "linux-image-6.12.107+deb13-amd64" || ver != "6.12.107-1" {
		t.Errorf("kernel %q %q %v", name, ver, err)
	}
	if _, _, err := parseKernelDepends([]byte("Depends: initramfs-tools\n")); err == nil {
		t.Error("unexpected Depends accepted")
	}
}

func TestQEMUVersion(t *testing.T) {
	v, err := parseQEMUVersion("QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-1~bpo13+1)\nCopyright")
	if err != nil || v != "11.1.3" {
		t.Fatalf("%q %v", v, err)
	}
	for _, c := range []struct {
		v  string
		ok bool
	}{{"10.1", true}, {"10.1.2", true}, {"11.0", true}, {"10.0.13", false}, {"7.2.15", false}, {"x", false}} {
		if got := versionAtLeast(c.v, 10, 1); got != c.ok {
			t.Errorf("versionAtLeast(%q, 10.1) = %v", c.v, got)
		}
	}
}

func TestWriteInitramfs(t *testing.T) {
	dir := t.TempDir()
	initBin := filepath.Join(dir, "init")
	testBin := filepath.Join(dir, "x.test")
	os.WriteFile(initBin, []byte("#!init"), 0o755)
	os.WriteFile(testBin, []byte("#!test"), 0o755)
	var buf bytes.Buffer
	err := WriteInitramfs(&buf, InitramfsSpec{
		Init:    initBin,
		Modules: []KernelModule{{Name: "vfio", Image: []byte("\x7fELF")}},
		Tests:   []TestBinary{{Name: "x.test", Path: testBin, Args: []string{"-test.v"}, Timeout: time.Minute}},
		Env:     []string{"A=b"},
	})
	if err != nil {
		t.Fatal(err)
	}
	recs, err := cpio.ReadAllRecords(cpio.Newc.Reader(bytes.NewReader(buf.Bytes())))
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]cpio.Record{}
	seen := map[string]bool{}
	for _, r := range recs {
		// Parents must come before their children.
		if d := filepath.Dir(r.Name); d != "." && !seen[d] {
			t.Errorf("%s comes before its directory %s", r.Name, d)
		}
		seen[r.Name] = true
		byName[r.Name] = r
	}
	read := func(name string) []byte {
		r, ok := byName[name]
		if !ok {
			t.Fatalf("no %s in the archive", name)
		}
		b, err := io.ReadAll(io.NewSectionReader(r.ReaderAt, 0, int64(r.FileSize)))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	if c := byName["dev/console"]; c.Mode&cpio.S_IFMT != cpio.S_IFCHR || c.Rmajor != 5 || c.Rminor != 1 {
		t.Errorf("dev/console %+v", c.Info)
	}
	if string(read("init")) != "#!init" || byName["init"].Mode&0o111 == 0 {
		t.Error("init missing or not executable")
	}
	if string(read("gohfi/bin/x.test")) != "#!test" {
		t.Error("test binary missing")
	}
	if string(read("lib/modules/gohfi/vfio.ko")) != "\x7fELF" {
		t.Error("module missing")
	}
	var cfg guest.Config
	if err := json.Unmarshal(read("gohfi/config.json"), &cfg); err != nil {
		t.Fatal(err)
	}
	if len(cfg.Modules) != 1 || cfg.Modules[0].Path != "/lib/modules/gohfi/vfio.ko" ||
		len(cfg.Tests) != 1 || cfg.Tests[0].Path != "/gohfi/bin/x.test" || cfg.Tests[0].Timeout != time.Minute ||
		len(cfg.Env) != 1 {
		t.Errorf("config %+v", cfg)
	}

	err = WriteInitramfs(io.Discard, InitramfsSpec{Init: initBin, Tests: []TestBinary{{Name: "a", Path: testBin}, {Name: "a", Path: testBin}}})
	if err == nil {
		t.Error("duplicate test names accepted")
	}
}

// fakeQEMU makes an Artifacts whose "dynamic loader" is a shell script, so
// that VM.Run's console handling and its killing of a hung guest can be
// tested without QEMU.
func fakeQEMU(t *testing.T, script string) *Artifacts {
	t.Helper()
	root := t.TempDir()
	ld := filepath.Join(root, dynamicLoader)
	if err := os.MkdirAll(filepath.Dir(ld), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(ld, []byte("#!/bin/sh\n"+script), 0o755); err != nil {
		t.Fatal(err)
	}
	return &Artifacts{Root: root, KernelRelease: "test"}
}

func TestRunCollectsResults(t *testing.T) {
	checkLeaks(t)
	a := fakeQEMU(t, `
echo "SeaBIOS"
echo 'GOHFI-INIT {"uptime":2.5,"release":"6.12"}'
echo 'GOHFI-BEGIN'
printf '%s\n' 'GOHFI-RESULT {"name":"a.test","exit_code":0,"output":"GOHFI-FACT k=v\n"}'
echo 'GOHFI-END 1'
echo 'GOHFI-POWEROFF'
`)
	vm := &VM{Artifacts: a, Initramfs: "/nonexistent"}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := vm.Run(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !res.Report.Complete || res.Failed() || res.Report.Results[0].Facts()["k"] != "v" || res.BootToInit <= 0 {
		t.Fatalf("result %+v", res)
	}
}

// checkLeaks fails t if goroutines or open fds grew during the test, after
// a bounded wait for goroutines to wind down.
func checkLeaks(t *testing.T) {
	t.Helper()
	fds := func() int {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			return -1
		}
		return len(ents)
	}
	g0, f0 := runtime.NumGoroutine(), fds()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for runtime.NumGoroutine() > g0 && time.Now().Before(deadline) {
			runtime.Gosched()
			time.Sleep(10 * time.Millisecond)
		}
		if g := runtime.NumGoroutine(); g > g0 {
			t.Errorf("goroutines: %d before, %d after", g0, g)
		}
		if f := fds(); f > f0 {
			t.Errorf("open fds: %d before, %d after", f0, f)
		}
	})
}

func TestRunKillsHungGuest(t *testing.T) {
	checkLeaks(t)
	a := fakeQEMU(t, "echo 'GOHFI-INIT {}'\nexec sleep 60\n")
	vm := &VM{Artifacts: a, Initramfs: "/nonexistent"}
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	res, err := vm.Run(ctx, nil)
	if err == nil || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Run of a hung guest = %v", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("took %v to give up", d)
	}
	if res == nil || res.Report.Init == nil || !strings.Contains(string(res.Console), "GOHFI-INIT") {
		t.Fatalf("partial console lost: %+v", res)
	}
}

func TestRunQEMUExitsEarly(t *testing.T) {
	a := fakeQEMU(t, "echo 'qemu: bad option' >&2\nexit 1\n")
	vm := &VM{Artifacts: a, Initramfs: "/nonexistent"}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := vm.Run(ctx, nil)
	if err == nil || !strings.Contains(err.Error(), "qemu: bad option") {
		t.Fatalf("Run = %v, want QEMU's error", err)
	}
}

func TestVMArgs(t *testing.T) {
	vm := &VM{Artifacts: &Artifacts{Root: "/r", KernelRelease: "k"}, Initramfs: "/i", VFIOUserSocket: "/s.sock"}
	args, err := vm.Args(false)
	if err != nil {
		t.Fatal(err)
	}
	line := strings.Join(args, " ")
	for _, want := range []string{
		"-accel tcg",
		"-machine q35,kernel-irqchip=split,memory-backend=mem",
		"memory-backend-memfd,id=mem,size=1024M,share=on",
		"-device intel-iommu,intremap=on,caching-mode=on",
		`-device {"driver":"vfio-user-pci","socket":{"path":"/s.sock","type":"unix"}}`,
		"console=ttyS0 intel_iommu=on",
		"-serial stdio",
	} {
		if !strings.Contains(line, want) {
			t.Errorf("command line lacks %q:\n%s", want, line)
		}
	}
	if strings.Index(line, "intel-iommu") > strings.Index(line, "vfio-user-pci") {
		t.Error("the IOMMU must come before the device")
	}
}

// TestVMArgsDevicesAtSlots: extra vfio-user devices come after the one of
// VFIOUserSocket, at the slots asked for; a slot off the bus is refused.
func TestVMArgsDevicesAtSlots(t *testing.T) {
	vm := &VM{Artifacts: &Artifacts{Root: "/r", KernelRelease: "k"}, Initramfs: "/i", VFIOUserSocket: "/s.sock",
		VFIOUserDevices: []VFIOUserDevice{{Socket: "/a.sock", Slot: 4}, {Socket: "/b.sock", Slot: 0x1e}}}
	args, err := vm.Args(false)
	if err != nil {
		t.Fatal(err)
	}
	line := strings.Join(args, " ")
	s := strings.Index(line, `"path":"/s.sock"`)
	a := strings.Index(line, `{"addr":"0x4","driver":"vfio-user-pci","socket":{"path":"/a.sock","type":"unix"}}`)
	b := strings.Index(line, `{"addr":"0x1e","driver":"vfio-user-pci","socket":{"path":"/b.sock","type":"unix"}}`)
	if s < 0 || a < 0 || b < 0 || !(s < a && a < b) {
		t.Fatalf("devices missing or out of order (%d %d %d):\n%s", s, a, b, line)
	}
	if got := GuestBDF(0x1e); got != "0000:00:1e.0" {
		t.Errorf("GuestBDF(0x1e) = %q", got)
	}
	vm.VFIOUserDevices = []VFIOUserDevice{{Socket: "/c.sock", Slot: 0x20}}
	if _, err := vm.Args(false); err == nil {
		t.Error("slot 0x20 accepted")
	}
}

// TestFetchAndModules fetches (or reuses) QEMU and the kernel and resolves
// the VFIO modules from the real kernel package.
func TestFetchAndModules(t *testing.T) {
	testenv.RequireRoot(t, "fetching with apt-get")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var log bytes.Buffer
	a, err := Fetch(ctx, FetchOptions{Log: &log})
	if err != nil {
		t.Logf("%s", log.Bytes())
	}
	testenv.Require(t, err, "fetch QEMU and the kernel")
	if !versionAtLeast(a.QEMUVersion, 10, 1) {
		t.Fatalf("QEMU %s", a.QEMUVersion)
	}
	mods, err := ResolveModules(a.ModulesDir(), VFIOModules...)
	if err != nil {
		t.Fatal(err)
	}
	pos := map[string]int{}
	for i, m := range mods {
		pos[m.Name] = i
		if !bytes.HasPrefix(m.Image, []byte("\x7fELF")) {
			t.Errorf("%s is not an ELF object after decompression", m.Name)
		}
	}
	for _, m := range mods {
		for _, d := range m.Depends {
			if p, ok := pos[d]; !ok || p > pos[m.Name] {
				t.Errorf("%s depends on %s, which is not loaded before it", m.Name, d)
			}
		}
	}
	for _, n := range []string{"irqbypass", "vfio", "vfio_iommu_type1", "vfio_pci_core", "vfio_pci"} {
		if _, ok := pos[n]; !ok {
			t.Errorf("module %s not resolved", n)
		}
	}
	if _, err := ResolveModules(a.ModulesDir(), "no_such_module"); err == nil {
		t.Error("a missing module resolved")
	}
}
