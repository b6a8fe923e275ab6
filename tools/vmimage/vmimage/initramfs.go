package vmimage

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/u-root/u-root/pkg/cpio"

	"github.com/gohfi/gohfi/tools/vmimage/guest"
)

// InitPackage is the Go package of the guest's init.
const InitPackage = "github.com/gohfi/gohfi/tools/vmimage/guestinit"

// TestBinary is a program for the init to run in the guest.
type TestBinary struct {
	Name    string   // unique; the file name in the guest's /gohfi/bin
	Path    string   // on the host
	Args    []string // e.g. -test.v, -test.run=Pattern
	Timeout time.Duration
}

// InitramfsSpec is the content of an initramfs.
type InitramfsSpec struct {
	Init        string // host path of the static init binary (BuildInit)
	Modules     []KernelModule
	Tests       []TestBinary
	Env         []string          // added to the tests' environment
	Files       map[string]string // guest path -> host path, extra files
	Links       map[string]string // guest path -> symlink target
	Interactive bool              // offer a shell on the console after the tests
}

// WriteInitramfs writes spec as an uncompressed newc cpio archive, the
// format the kernel unpacks into its initial root file system.
func WriteInitramfs(w io.Writer, spec InitramfsSpec) error {
	bw := bufio.NewWriterSize(w, 1<<20)
	cw := cpio.Newc.Writer(bw)
	var cfg guest.Config
	cfg.Env = spec.Env
	cfg.Interactive = spec.Interactive

	// The kernel creates no intermediate directories while unpacking, so
	// every directory gets its own record, parents first.
	dirs := map[string]bool{}
	var records []cpio.Record
	var mkdir func(d string)
	mkdir = func(d string) {
		d = path.Clean(d)
		if d == "/" || d == "." || dirs[d] {
			return
		}
		mkdir(path.Dir(d))
		dirs[d] = true
		records = append(records, cpio.Directory(strings.TrimPrefix(d, "/"), 0o755))
	}
	for _, d := range []string{"/dev", "/proc", "/sys", "/tmp", "/bin", "/etc", guest.BinDir, guest.ModuleDir} {
		mkdir(d)
	}
	// The kernel opens /dev/console for init's stdin/stdout/stderr before
	// init can mount devtmpfs.
	records = append(records, cpio.CharDev("dev/console", 0o600, 5, 1))

	var files []*os.File
	defer func() {
		for _, f := range files {
			_ = f.Close() // read-only inputs: nothing a close could lose
		}
	}()
	addFile := func(guestPath, hostPath string, perm uint64) error {
		f, err := os.Open(hostPath)
		if err != nil {
			return fmt.Errorf("vmimage: initramfs: %w", err)
		}
		files = append(files, f)
		st, err := f.Stat()
		if err != nil {
			return err
		}
		mkdir(path.Dir(guestPath))
		records = append(records, cpio.Record{ReaderAt: f, Info: cpio.Info{
			Name: strings.TrimPrefix(guestPath, "/"), Mode: cpio.S_IFREG | perm, FileSize: uint64(st.Size()),
		}})
		return nil
	}
	if err := addFile("/init", spec.Init, 0o755); err != nil {
		return err
	}
	for _, m := range spec.Modules {
		p := path.Join(guest.ModuleDir, m.Name+".ko")
		records = append(records, cpio.StaticRecord(m.Image, cpio.Info{
			Name: strings.TrimPrefix(p, "/"), Mode: cpio.S_IFREG | 0o644,
		}))
		cfg.Modules = append(cfg.Modules, guest.Module{Name: m.Name, Path: p})
	}
	seen := map[string]bool{}
	for _, t := range spec.Tests {
		if t.Name == "" || strings.Contains(t.Name, "/") || seen[t.Name] {
			return fmt.Errorf("vmimage: initramfs: bad or duplicate test name %q", t.Name)
		}
		seen[t.Name] = true
		p := path.Join(guest.BinDir, t.Name)
		if err := addFile(p, t.Path, 0o755); err != nil {
			return err
		}
		cfg.Tests = append(cfg.Tests, guest.Test{Name: t.Name, Path: p, Args: t.Args, Timeout: t.Timeout})
	}
	for _, g := range sortedKeys(spec.Files) {
		if err := addFile(g, spec.Files[g], 0o755); err != nil {
			return err
		}
	}
	for _, g := range sortedKeys(spec.Links) {
		mkdir(path.Dir(g))
		records = append(records, cpio.Symlink(strings.TrimPrefix(g, "/"), spec.Links[g]))
	}
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return err
	}
	mkdir(path.Dir(guest.ConfigPath))
	records = append(records, cpio.StaticRecord(b, cpio.Info{
		Name: strings.TrimPrefix(guest.ConfigPath, "/"), Mode: cpio.S_IFREG | 0o644,
	}))
	for i := range records {
		records[i] = cpio.MakeReproducible(records[i])
	}
	if err := cpio.WriteRecords(cw, records); err != nil {
		return fmt.Errorf("vmimage: initramfs: %w", err)
	}
	if err := cpio.WriteTrailer(cw); err != nil {
		return fmt.Errorf("vmimage: initramfs: %w", err)
	}
	return bw.Flush()
}

func sortedKeys(m map[string]string) []string {
	k := make([]string, 0, len(m))
	for g := range m {
		k = append(k, g)
	}
	slices.Sort(k)
	return k
}

// BuildInitramfs writes spec to the file at path.
func BuildInitramfs(path string, spec InitramfsSpec) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("vmimage: initramfs: %w", err)
	}
	if err := WriteInitramfs(f, spec); err != nil {
		_ = f.Close() // the file is incomplete anyway: the write error is the one to report
		return err
	}
	return f.Close()
}

// GoTool returns the go command: the one on PATH, else the one of the
// toolchain this program was built with.
func GoTool() (string, error) {
	if p, err := exec.LookPath("go"); err == nil {
		return p, nil
	}
	p := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("vmimage: no go command on PATH or in %s", filepath.Dir(p))
	}
	return p, nil
}

// goBuild runs the go command with CGO_ENABLED=0 (static binaries: the
// guest has no libc) in dir, a directory of the gohfi module.
func goBuild(ctx context.Context, dir string, args ...string) error {
	gotool, err := GoTool()
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, gotool, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("vmimage: go %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

// BuildInit builds the guest init as a static binary at out.
func BuildInit(ctx context.Context, moduleDir, out string) error {
	return goBuild(ctx, moduleDir, "build", "-ldflags=-s -w", "-o", out, InitPackage)
}

// BuildTest builds the tests of package pkg as a static binary at out
// (go test -c), with the given build tags.
func BuildTest(ctx context.Context, moduleDir, pkg, out string, tags ...string) error {
	args := []string{"test", "-c", "-ldflags=-s -w", "-o", out}
	if len(tags) > 0 {
		args = append(args, "-tags", strings.Join(tags, ","))
	}
	if err := goBuild(ctx, moduleDir, append(args, pkg)...); err != nil {
		return err
	}
	// go test -c writes nothing for a package without tests.
	if _, err := os.Stat(out); err != nil {
		return fmt.Errorf("vmimage: %s has no tests to build (build tags %v): %w", pkg, tags, err)
	}
	return nil
}
