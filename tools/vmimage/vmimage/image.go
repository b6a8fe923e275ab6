package vmimage

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"
)

// ModulePath is the import path of the gohfi module.
const ModulePath = "github.com/gohfi/gohfi"

// TestPackage is a Go package of the gohfi module whose tests run in the
// guest.
type TestPackage struct {
	Package string   // import path, or relative to the module ("./test/qemu/guest")
	Run     string   // -test.run pattern; empty runs all
	Tags    []string // build tags (guest-only tests use gohfiguest)
	Args    []string
	Timeout time.Duration
}

// ImageOptions describes a guest image.
type ImageOptions struct {
	// ModuleDir is the root of the gohfi module (for go build); default:
	// found upwards from the working directory.
	ModuleDir string
	// WorkDir receives the binaries and the initramfs; it must exist.
	WorkDir string
	Tests   []TestPackage
	// Modules are loaded by the init, with their dependencies. Default
	// VFIOModules; use an empty non-nil slice for none.
	Modules []string
	Env     []string
	// Tools are packages of the module built as static commands into
	// /bin (e.g. "./tools/hfictl").
	Tools []string
	// Files are added to the image (guest path -> host path), Links
	// as symlinks (guest path -> target): a Userland's Entries.
	Files, Links map[string]string
	// Interactive keeps the guest up with a command loop on the console
	// and adds a few u-root core commands (ls, cat, dmesg, ...) to /bin.
	Interactive bool
}

// interactiveTools are u-root core commands put into /bin of interactive
// images; they build from the module's own dependencies.
var interactiveTools = []string{"ls", "cat", "dmesg", "lsmod", "mount", "uname", "ps", "pci"}

// BuildImage builds the init, the test binaries and the initramfs in
// opts.WorkDir and returns the initramfs path.
func BuildImage(ctx context.Context, a *Artifacts, opts ImageOptions) (string, error) {
	if opts.ModuleDir == "" {
		d, err := FindModuleDir()
		if err != nil {
			return "", err
		}
		opts.ModuleDir = d
	}
	if opts.Modules == nil {
		opts.Modules = VFIOModules
	}
	spec := InitramfsSpec{Env: opts.Env, Interactive: opts.Interactive, Files: map[string]string{}, Links: opts.Links}
	for g, h := range opts.Files {
		spec.Files[g] = h
	}
	spec.Init = filepath.Join(opts.WorkDir, "init")
	if err := BuildInit(ctx, opts.ModuleDir, spec.Init); err != nil {
		return "", err
	}
	mods, err := ResolveModules(a.ModulesDir(), opts.Modules...)
	if err != nil {
		return "", err
	}
	spec.Modules = mods
	for i, t := range opts.Tests {
		name := fmt.Sprintf("%02d-%s.test", i, path.Base(t.Package))
		out := filepath.Join(opts.WorkDir, name)
		pkg := t.Package
		if strings.HasPrefix(pkg, "./") {
			pkg = ModulePath + strings.TrimPrefix(pkg, ".")
		}
		if err := BuildTest(ctx, opts.ModuleDir, pkg, out, t.Tags...); err != nil {
			return "", err
		}
		args := []string{"-test.v", "-test.count=1"}
		if t.Run != "" {
			args = append(args, "-test.run="+t.Run)
		}
		if t.Timeout > 0 {
			args = append(args, "-test.timeout="+t.Timeout.String())
		}
		args = append(args, t.Args...)
		to := t.Timeout
		if to > 0 {
			to += 10 * time.Second // let -test.timeout report first
		}
		spec.Tests = append(spec.Tests, TestBinary{Name: name, Path: out, Args: args, Timeout: to})
	}
	for _, tool := range opts.Tools {
		pkg := tool
		if strings.HasPrefix(pkg, "./") {
			pkg = ModulePath + strings.TrimPrefix(pkg, ".")
		}
		name := path.Base(pkg)
		out := filepath.Join(opts.WorkDir, "tool-"+name)
		if err := goBuild(ctx, opts.ModuleDir, "build", "-ldflags=-s -w", "-o", out, pkg); err != nil {
			return "", err
		}
		spec.Files["/bin/"+name] = out
	}
	if opts.Interactive {
		for _, tool := range interactiveTools {
			out := filepath.Join(opts.WorkDir, "bin-"+tool)
			if err := goBuild(ctx, opts.ModuleDir, "build", "-ldflags=-s -w", "-o", out,
				"github.com/u-root/u-root/cmds/core/"+tool); err != nil {
				return "", err
			}
			spec.Files["/bin/"+tool] = out
		}
	}
	initrd := filepath.Join(opts.WorkDir, "initramfs.cpio")
	if err := BuildInitramfs(initrd, spec); err != nil {
		return "", err
	}
	return initrd, nil
}

// FindModuleDir returns the directory of the gohfi go.mod at or above the
// working directory.
func FindModuleDir() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if isGohfiModule(filepath.Join(dir, "go.mod")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("vmimage: not inside the gohfi module (no go.mod naming " + ModulePath + ")")
		}
		dir = parent
	}
}

func isGohfiModule(gomod string) bool {
	f, err := os.Open(gomod)
	if err != nil {
		return false
	}
	defer func() { _ = f.Close() }() // read-only: nothing a close could lose
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if m, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "module "); ok {
			return strings.TrimSpace(m) == ModulePath
		}
	}
	return false
}
