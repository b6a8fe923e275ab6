// Package vmimage fetches QEMU and a guest kernel from Debian, builds an
// initramfs around a small Go init (tools/vmimage/guestinit) and boots it
// under QEMU with TCG, collecting the results the init writes to the serial
// console.
//
// The host's own QEMU is too old for vfio-user (Debian 12 ships 7.2), so
// QEMU comes from trixie-backports and the kernel from trixie. Both are
// fetched with apt-get through a private configuration (its own sources,
// lists, cache and an empty dpkg status, so the host's package state is
// neither read nor touched), unpacked with dpkg -x into a prefix in a cache
// directory outside the clone, and run through the prefix's dynamic loader.
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
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Defaults for Fetch.
const (
	DefaultCacheDir    = "/var/cache/gohfi"
	CacheEnv           = "GOHFI_CACHE"
	DefaultSourcesFile = "/etc/apt/sources.list.d/debian.sources"
	defaultKeyring     = "/usr/share/keyrings/debian-archive-keyring.gpg"

	qemuPackage   = "qemu-system-x86"
	qemuSuite     = "trixie-backports"
	kernelMeta    = "linux-image-amd64"
	kernelSuite   = "trixie"
	stampName     = "fetch.json"
	stampVersion  = 1
	minQEMUMajor  = 10
	minQEMUMinor  = 1
	vfioUserPCI   = "vfio-user-pci"
	qemuBinary    = "usr/bin/qemu-system-x86_64"
	libDir        = "usr/lib/x86_64-linux-gnu"
	dynamicLoader = "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
)

// CacheDir returns $GOHFI_CACHE, or DefaultCacheDir when it is not set.
func CacheDir() string {
	if d := os.Getenv(CacheEnv); d != "" {
		return d
	}
	return DefaultCacheDir
}

// FetchOptions configures Fetch. The zero value fetches into CacheDir()
// using the host's Debian mirror.
type FetchOptions struct {
	// CacheDir holds the apt state, the downloaded packages and the
	// unpacked prefix. Default CacheDir().
	CacheDir string
	// SourcesFile is the deb822 sources file the mirror URL is read from.
	// Default DefaultSourcesFile.
	SourcesFile string
	// Refresh ignores a complete earlier fetch and fetches again.
	Refresh bool
	// Log receives progress lines and the output of apt-get and dpkg. Nil
	// discards them.
	Log io.Writer
}

// Artifacts are the results of Fetch: where QEMU and the kernel are.
type Artifacts struct {
	Version int `json:"version"` // stamp format

	Root          string   `json:"root"`           // the unpacked prefix
	QEMUVersion   string   `json:"qemu_version"`   // e.g. "11.1.3"
	KernelRelease string   `json:"kernel_release"` // e.g. "6.12.107+deb13-amd64"
	Packages      []string `json:"packages"`       // name=version, as downloaded
	DownloadBytes int64    `json:"download_bytes"`
}

// Kernel is the path of the guest kernel image.
func (a *Artifacts) Kernel() string {
	return filepath.Join(a.Root, "boot", "vmlinuz-"+a.KernelRelease)
}

// ModulesDir is the guest kernel's module tree (lib/modules/<release>).
func (a *Artifacts) ModulesDir() string {
	return filepath.Join(a.Root, "usr/lib/modules", a.KernelRelease)
}

// QEMUCommand returns a command that runs the fetched qemu-system-x86_64
// with args. QEMU is started through the prefix's dynamic loader so it uses
// the prefix's libraries and never the host's; -L points it at the
// prefix's firmware (the directories are searched in order).
func (a *Artifacts) QEMUCommand(ctx context.Context, args ...string) *exec.Cmd {
	full := []string{
		"--library-path", a.libraryPath(),
		filepath.Join(a.Root, qemuBinary),
		"-L", filepath.Join(a.Root, "usr/share/qemu"),
		"-L", filepath.Join(a.Root, "usr/share/seabios"),
		"-L", filepath.Join(a.Root, "usr/lib/ipxe/qemu"),
	}
	full = append(full, args...)
	cmd := exec.CommandContext(ctx, filepath.Join(a.Root, dynamicLoader), full...)
	// QEMU finds its loadable modules relative to its own executable,
	// which under the loader is ld.so: name the directory explicitly.
	cmd.Env = append(os.Environ(), "QEMU_MODULE_DIR="+filepath.Join(a.Root, libDir, "qemu"))
	return cmd
}

func (a *Artifacts) libraryPath() string {
	return strings.Join([]string{
		filepath.Join(a.Root, libDir),
		filepath.Join(a.Root, "usr/lib"),
	}, ":")
}

// Fetch makes QEMU >= 10.1 and the trixie kernel available in the cache
// directory, downloading and unpacking them unless an earlier complete fetch
// is there, and checks that QEMU runs and offers vfio-user-pci.
func Fetch(ctx context.Context, opts FetchOptions) (*Artifacts, error) {
	unlock, err := opts.lockCache(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()

	if !opts.Refresh {
		if a, err := readStamp(opts.CacheDir); err == nil {
			if err := a.Check(ctx); err == nil {
				// Progress log only: a failed write is not a failed fetch.
				_, _ = fmt.Fprintf(opts.Log, "vmimage: using cached QEMU %s and kernel %s in %s\n",
					a.QEMUVersion, a.KernelRelease, a.Root)
				return a, nil
			} else {
				// Progress log only: a failed write is not a failed fetch.
				_, _ = fmt.Fprintf(opts.Log, "vmimage: cached fetch unusable, fetching again: %v\n", err)
			}
		}
	}
	a, err := fetch(ctx, opts)
	if err != nil {
		return nil, err
	}
	if err := a.Check(ctx); err != nil {
		return nil, err
	}
	b, err := json.MarshalIndent(a, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := writeFileAtomic(filepath.Join(opts.CacheDir, stampName), b); err != nil {
		return nil, fmt.Errorf("vmimage: writing stamp: %w", err)
	}
	return a, nil
}

// lockCache fills in the defaults of o, makes the cache directory and
// takes its lock.
func (o *FetchOptions) lockCache(ctx context.Context) (unlock func(), err error) {
	if o.CacheDir == "" {
		o.CacheDir = CacheDir()
	}
	if o.SourcesFile == "" {
		o.SourcesFile = DefaultSourcesFile
	}
	if o.Log == nil {
		o.Log = io.Discard
	}
	if err := os.MkdirAll(o.CacheDir, 0o755); err != nil {
		return nil, fmt.Errorf("vmimage: cache: %w", err)
	}
	return lockDir(ctx, o.CacheDir)
}

// openAPT sets up the private apt configuration in the cache with the
// host's mirror and updates its lists.
func (o *FetchOptions) openAPT(ctx context.Context) (*apt, error) {
	mirror, keyring, err := readMirror(o.SourcesFile)
	if err != nil {
		return nil, err
	}
	a, err := newAPT(filepath.Join(o.CacheDir, "apt"), mirror, keyring, o.Log)
	if err != nil {
		return nil, err
	}
	// Progress log only: a failed write is not a failed fetch.
	_, _ = fmt.Fprintf(o.Log, "vmimage: apt-get update (%s, %s)\n", kernelSuite, qemuSuite)
	if _, err := a.run(ctx, a.dir, "apt-get", "-q", "update"); err != nil {
		return nil, err
	}
	return a, nil
}

// Check runs the fetched QEMU: its version must be at least 10.1 and
// -device help must list vfio-user-pci. The kernel image must exist.
func (a *Artifacts) Check(ctx context.Context) error {
	if _, err := os.Stat(a.Kernel()); err != nil {
		return fmt.Errorf("vmimage: guest kernel: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := a.QEMUCommand(ctx, "-version").CombinedOutput()
	if err != nil {
		return fmt.Errorf("vmimage: qemu -version: %w: %s", err, firstLine(out))
	}
	v, err := parseQEMUVersion(string(out))
	if err != nil {
		return err
	}
	if !versionAtLeast(v, minQEMUMajor, minQEMUMinor) {
		return fmt.Errorf("vmimage: QEMU %s is older than %d.%d (no vfio-user-pci)", v, minQEMUMajor, minQEMUMinor)
	}
	a.QEMUVersion = v
	out, err = a.QEMUCommand(ctx, "-machine", "none", "-device", "help").CombinedOutput()
	if err != nil {
		return fmt.Errorf("vmimage: qemu -device help: %w: %s", err, firstLine(out))
	}
	if !bytes.Contains(out, []byte(`name "`+vfioUserPCI+`"`)) {
		return fmt.Errorf("vmimage: QEMU %s does not list %s in -device help", v, vfioUserPCI)
	}
	return nil
}

var qemuVersionRE = regexp.MustCompile(`QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?`)

func parseQEMUVersion(out string) (string, error) {
	m := qemuVersionRE.FindStringSubmatch(out)
	if m == nil {
		return "", fmt.Errorf("vmimage: no version in qemu -version output %q", firstLine([]byte(out)))
	}
	if m[3] == "" {
		return m[1] + "." + m[2], nil
	}
	return m[1] + "." + m[2] + "." + m[3], nil
}

func versionAtLeast(v string, major, minor int) bool {
	parts := strings.SplitN(v, ".", 3)
	if len(parts) < 2 {
		return false
	}
	ma, err1 := strconv.Atoi(parts[0])
	mi, err2 := strconv.Atoi(parts[1])
	if err1 != nil || err2 != nil {
		return false
	}
	return ma > major || ma == major && mi >= minor
}

// apt is a private apt configuration rooted in dir.
type apt struct {
	dir  string
	opts []string
	log  io.Writer
}

func newAPT(dir, mirror, keyring string, log io.Writer) (*apt, error) {
	for _, d := range []string{"etc/preferences.d", "etc/sources.list.d", "lists/partial", "cache/archives/partial", "state"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return nil, fmt.Errorf("vmimage: apt dir: %w", err)
		}
	}
	var src strings.Builder
	for _, suite := range []string{kernelSuite, qemuSuite} {
		fmt.Fprintf(&src, "deb [signed-by=%s] %s %s main\n", keyring, mirror, suite)
	}
	if err := os.WriteFile(filepath.Join(dir, "etc/sources.list"), []byte(src.String()), 0o644); err != nil {
		return nil, err
	}
	// An empty status file: apt resolves the whole dependency closure as
	// if nothing were installed, and never looks at the host's packages.
	if err := os.WriteFile(filepath.Join(dir, "state/status"), nil, 0o644); err != nil {
		return nil, err
	}
	o := func(k, v string) []string { return []string{"-o", k + "=" + v} }
	var opts []string
	for _, kv := range [][2]string{
		{"Dir::Etc::SourceList", filepath.Join(dir, "etc/sources.list")},
		{"Dir::Etc::SourceParts", filepath.Join(dir, "etc/sources.list.d")},
		{"Dir::Etc::Preferences", filepath.Join(dir, "etc/preferences")},
		{"Dir::Etc::PreferencesParts", filepath.Join(dir, "etc/preferences.d")},
		{"Dir::State", filepath.Join(dir, "state")},
		{"Dir::State::Lists", filepath.Join(dir, "lists")},
		{"Dir::State::status", filepath.Join(dir, "state/status")},
		{"Dir::Cache", filepath.Join(dir, "cache")},
		{"APT::Architecture", "amd64"},
		{"APT::Architectures", "amd64"},
		{"APT::Install-Recommends", "false"},
		{"APT::Sandbox::User", "root"},
		{"Acquire::Languages", "none"},
		{"Acquire::IndexTargets::deb::DEP-11::DefaultEnabled", "false"},
		{"Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled", "false"},
		{"Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled", "false"},
		{"Acquire::Retries", "3"},
	} {
		opts = append(opts, o(kv[0], kv[1])...)
	}
	return &apt{dir: dir, opts: opts, log: log}, nil
}

func (a *apt) run(ctx context.Context, dir string, tool string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, tool, append(append([]string{}, a.opts...), args...)...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C")
	var stdout bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = a.log
	if err := cmd.Run(); err != nil {
		_, _ = a.log.Write(stdout.Bytes()) // progress log: the command's error is the one to return
		return nil, fmt.Errorf("vmimage: %s %s: %w", tool, strings.Join(args, " "), err)
	}
	return stdout.Bytes(), nil
}

func fetch(ctx context.Context, opts FetchOptions) (*Artifacts, error) {
	start := time.Now()
	a, err := opts.openAPT(ctx)
	if err != nil {
		return nil, err
	}

	// The closure of QEMU from backports, as apt would install it on an
	// empty system, without recommends.
	out, err := a.run(ctx, a.dir, "apt-get", "-q", "-s", "-t", qemuSuite, "install", qemuPackage)
	if err != nil {
		return nil, err
	}
	pkgs := parseSimulatedInstalls(out)
	if len(pkgs) == 0 {
		return nil, fmt.Errorf("vmimage: apt-get -s install %s selected no packages", qemuPackage)
	}
	// Only the kernel image itself: its dependencies (initramfs-tools,
	// kmod, ...) are for installing it on a real system.
	out, err = a.run(ctx, a.dir, "apt-cache", "show", kernelMeta+"/"+kernelSuite)
	if err != nil {
		return nil, err
	}
	kpkg, kver, err := parseKernelDepends(out)
	if err != nil {
		return nil, err
	}
	pkgs = append(pkgs, kpkg+"="+kver)

	// Progress log only: a failed write is not a failed fetch.
	_, _ = fmt.Fprintf(opts.Log, "vmimage: apt-get download of %d packages\n", len(pkgs))
	root := filepath.Join(opts.CacheDir, "root")
	total, err := a.downloadUnpack(ctx, pkgs, filepath.Join(opts.CacheDir, "debs"), root)
	if err != nil {
		return nil, err
	}
	release, err := kernelRelease(root)
	if err != nil {
		return nil, err
	}
	// Progress log only: a failed write is not a failed fetch.
	_, _ = fmt.Fprintf(opts.Log, "vmimage: fetched in %v\n", time.Since(start).Round(time.Millisecond))
	return &Artifacts{
		Version:       stampVersion,
		Root:          root,
		KernelRelease: release,
		Packages:      pkgs,
		DownloadBytes: total,
	}, nil
}

// downloadUnpack downloads pkgs (name=version) into the directory debs
// and unpacks them into a fresh directory renamed to root when complete,
// so that a cut-off fetch never leaves a half prefix that looks complete.
// The packages are not kept once unpacked (a new fetch downloads afresh).
// It returns the bytes downloaded.
func (a *apt) downloadUnpack(ctx context.Context, pkgs []string, debs, root string) (int64, error) {
	if err := os.RemoveAll(debs); err != nil {
		return 0, err
	}
	if err := os.MkdirAll(debs, 0o755); err != nil {
		return 0, err
	}
	defer func() { _ = os.RemoveAll(debs) }() // downloads only: the prefix is what is kept
	if _, err := a.run(ctx, debs, "apt-get", append([]string{"-q", "download"}, pkgs...)...); err != nil {
		return 0, err
	}
	files, err := filepath.Glob(filepath.Join(debs, "*.deb"))
	if err != nil {
		return 0, err
	}
	if len(files) != len(pkgs) {
		return 0, fmt.Errorf("vmimage: asked apt-get for %d packages, got %d files", len(pkgs), len(files))
	}
	var total int64
	for _, f := range files {
		if st, err := os.Stat(f); err == nil {
			total += st.Size()
		}
	}
	tmp := root + ".tmp"
	if err := os.RemoveAll(tmp); err != nil {
		return 0, err
	}
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return 0, err
	}
	// Progress log only: a failed write is not a failed fetch.
	_, _ = fmt.Fprintf(a.log, "vmimage: dpkg -x %d packages (%d MB)\n", len(files), total>>20)
	if err := extractAll(ctx, files, tmp, a.log); err != nil {
		return 0, err
	}
	if err := os.RemoveAll(root); err != nil {
		return 0, err
	}
	return total, os.Rename(tmp, root)
}

// extractAll runs dpkg -x for every file, two at a time: dpkg -x is mostly
// decompression, and the machines have two cores.
func extractAll(ctx context.Context, files []string, dst string, log io.Writer) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	work := make(chan string)
	errs := make(chan error, 2)
	for range 2 {
		go func() {
			for f := range work {
				cmd := exec.CommandContext(ctx, "dpkg", "-x", f, dst)
				if out, err := cmd.CombinedOutput(); err != nil {
					errs <- fmt.Errorf("vmimage: dpkg -x %s: %w: %s", filepath.Base(f), err, firstLine(out))
					cancel()
					for range work {
					}
					return
				}
			}
			errs <- nil
		}()
	}
	for _, f := range files {
		select {
		case work <- f:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
	}
	close(work)
	var first error
	for range 2 {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	if first == nil && ctx.Err() != nil {
		first = ctx.Err()
	}
	return first
}

// parseSimulatedInstalls returns name=version for every "Inst" line of
// apt-get -s output: "Inst libc6 (2.41-12 Debian:13.1/stable [amd64])".
func parseSimulatedInstalls(out []byte) []string {
	var pkgs []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 3 || f[0] != "Inst" || !strings.HasPrefix(f[2], "(") {
			continue
		}
		pkgs = append(pkgs, f[1]+"="+strings.TrimPrefix(f[2], "("))
	}
	return pkgs
}

// parseKernelDepends reads the versioned kernel image package that the
// linux-image-amd64 metapackage depends on.
func parseKernelDepends(out []byte) (name, version string, err error) {
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		dep, ok := strings.CutPrefix(sc.Text(), "Depends: ")
		if !ok {
			continue
		}
		first, _, _ := strings.Cut(dep, ",")
		m := regexp.MustCompile(`^\s*(linux-image-\S+)\s*\(=\s*([^)\s]+)\)`).FindStringSubmatch(first)
		if m == nil {
			return "", "", fmt.Errorf("vmimage: unexpected %s Depends: %q", kernelMeta, dep)
		}
		return m[1], m[2], nil
	}
	return "", "", fmt.Errorf("vmimage: no Depends in apt-cache show %s", kernelMeta)
}

// kernelRelease finds the single kernel in root/boot.
func kernelRelease(root string) (string, error) {
	m, err := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	if err != nil {
		return "", err
	}
	if len(m) != 1 {
		return "", fmt.Errorf("vmimage: want one kernel in %s/boot, found %d", root, len(m))
	}
	return strings.TrimPrefix(filepath.Base(m[0]), "vmlinuz-"), nil
}

// readMirror returns the URI and keyring of the host's main Debian source
// (the stanza with a suite that is neither -security nor -updates), read
// from a deb822 sources file. The mirror is whatever the host uses; the
// project never names one.
func readMirror(path string) (uri, keyring string, err error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", "", fmt.Errorf("vmimage: reading the host's apt sources: %w", err)
	}
	for _, st := range parseDeb822(b) {
		if !strings.Contains(" "+st["Types"]+" ", " deb ") {
			continue
		}
		main := false
		for _, s := range strings.Fields(st["Suites"]) {
			if !strings.Contains(s, "-") && !strings.Contains(s, "/") {
				main = true
			}
		}
		uris := strings.Fields(st["URIs"])
		if !main || len(uris) == 0 {
			continue
		}
		// The archive keyring package's combined file covers trixie too;
		// the host's Signed-By may name a file for its own release only.
		keyring = defaultKeyring
		if _, err := os.Stat(defaultKeyring); err != nil {
			if k := strings.TrimSpace(st["Signed-By"]); strings.HasPrefix(k, "/") && !strings.Contains(k, "\n") {
				keyring = k
			}
		}
		return strings.TrimRight(uris[0], "/"), keyring, nil
	}
	return "", "", fmt.Errorf("vmimage: no Debian mirror found in %s", path)
}

// parseDeb822 splits a deb822 file into stanzas of fields. Continuation
// lines are appended with a newline; comments are dropped.
func parseDeb822(b []byte) []map[string]string {
	var out []map[string]string
	cur := map[string]string{}
	last := ""
	for _, line := range strings.Split(string(b), "\n") {
		switch {
		case strings.TrimSpace(line) == "":
			if len(cur) > 0 {
				out = append(out, cur)
				cur = map[string]string{}
			}
			last = ""
		case strings.HasPrefix(line, "#"):
		case line[0] == ' ' || line[0] == '\t':
			if last != "" {
				cur[last] += "\n" + strings.TrimSpace(line)
			}
		default:
			k, v, ok := strings.Cut(line, ":")
			if !ok {
				continue
			}
			last = strings.TrimSpace(k)
			cur[last] = strings.TrimSpace(v)
		}
	}
	if len(cur) > 0 {
		out = append(out, cur)
	}
	return out
}

func readStamp(cacheDir string) (*Artifacts, error) {
	b, err := os.ReadFile(filepath.Join(cacheDir, stampName))
	if err != nil {
		return nil, err
	}
	var a Artifacts
	if err := json.Unmarshal(b, &a); err != nil {
		return nil, err
	}
	if a.Version != stampVersion || a.Root == "" || a.KernelRelease == "" {
		return nil, errors.New("vmimage: stale stamp")
	}
	return &a, nil
}

func writeFileAtomic(path string, b []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// lockDir takes an exclusive flock on dir/.lock so that two fetches (two
// test processes) do not unpack into the same prefix at once. flock(2)
// cannot be interrupted by a context, so it is polled.
func lockDir(ctx context.Context, dir string) (unlock func(), err error) {
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("vmimage: lock: %w", err)
	}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			// Closing drops the flock; the file holds no data to lose.
			return func() { _ = f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			_ = f.Close() // never locked, holds no data
			return nil, fmt.Errorf("vmimage: flock %s: %w", f.Name(), err)
		}
		select {
		case <-ctx.Done():
			_ = f.Close() // never locked, holds no data
			return nil, fmt.Errorf("vmimage: waiting for the cache lock: %w", ctx.Err())
		case <-tick.C:
		}
	}
}

func firstLine(b []byte) string {
	s, _, _ := strings.Cut(strings.TrimSpace(string(b)), "\n")
	return s
}
