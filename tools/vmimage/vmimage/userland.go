package vmimage

import (
	"context"
	"debug/elf"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// RDMAPackages are the trixie packages a guest needs to run rdma-core's
// verbs examples (ibv_rc_pingpong, ibv_devinfo) on the kernel's soft-RoCE
// (rdma_rxe): libibverbs with its providers (librxe) and the utilities,
// and the shared libraries they link (glibc, libnl). Not apt's closure:
// libibverbs1 depends on adduser (for the rdma group), whose closure
// (passwd, PAM, debconf, perl) a guest without a package manager does
// not use. Userland.CheckLinks makes sure nothing linked is missing.
var RDMAPackages = []string{
	"libc6", "libgcc-s1", "libnl-3-200", "libnl-route-3-200",
	"libibverbs1", "ibverbs-providers", "ibverbs-utils",
}

// RDMAModules are the guest kernel modules for soft-RoCE on a virtio NIC.
// rxe computes its ICRC through the crypto API's "crc32", which it asks
// for by name (request_module, without modprobe in the guest): its
// .modinfo does not name crc32_generic, so the list does (TCG's CPU has no
// PCLMULQDQ for crc32-pclmul).
var RDMAModules = []string{"virtio_net", "crc32_generic", "rdma_rxe", "ib_uverbs"}

const userlandStampVersion = 1

// Userland is a set of Debian packages unpacked for a guest.
type Userland struct {
	Version  int      `json:"version"`
	Root     string   `json:"root"`     // the unpacked prefix
	Packages []string `json:"packages"` // name=version, as downloaded
}

// FetchUserland downloads the trixie packages names (no dependencies:
// name them all) with the private apt configuration Fetch uses and unpacks
// them into a prefix of their own, CacheDir/userland-<key>, reusing an
// earlier fetch of the same list.
func FetchUserland(ctx context.Context, opts FetchOptions, key string, names []string) (*Userland, error) {
	if key == "" || strings.ContainsAny(key, "/. ") || len(names) == 0 {
		return nil, fmt.Errorf("vmimage: userland %q: want a plain name and packages", key)
	}
	unlock, err := opts.lockCache(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	dir := filepath.Join(opts.CacheDir, "userland-"+key)
	stamp := dir + ".json"
	want := slices.Sorted(slices.Values(names))
	if !opts.Refresh {
		if u, err := readUserlandStamp(stamp); err == nil && slices.Equal(u.names(), want) {
			if _, err := os.Stat(u.Root); err == nil {
				return u, nil
			}
		}
	}
	start := time.Now()
	a, err := opts.openAPT(ctx)
	if err != nil {
		return nil, err
	}
	var pkgs []string
	for _, n := range want {
		out, err := a.run(ctx, a.dir, "apt-cache", "show", "--no-all-versions", n+"/"+kernelSuite)
		if err != nil {
			return nil, err
		}
		v := ""
		for _, st := range parseDeb822(out) {
			if st["Package"] == n && st["Version"] != "" {
				v = st["Version"]
				break
			}
		}
		if v == "" {
			return nil, fmt.Errorf("vmimage: no version of %s in %s", n, kernelSuite)
		}
		pkgs = append(pkgs, n+"="+v)
	}
	if _, err := a.downloadUnpack(ctx, pkgs, dir+".debs", dir); err != nil {
		return nil, err
	}
	u := &Userland{Version: userlandStampVersion, Root: dir, Packages: pkgs}
	b, err := json.MarshalIndent(u, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := writeFileAtomic(stamp, b); err != nil {
		return nil, err
	}
	// Progress log only: a failed write is not a failed fetch.
	_, _ = fmt.Fprintf(opts.Log, "vmimage: userland %s (%d packages) in %v\n", key, len(pkgs),
		time.Since(start).Round(time.Millisecond))
	return u, nil
}

func (u *Userland) names() []string {
	var n []string
	for _, p := range u.Packages {
		name, _, _ := strings.Cut(p, "=")
		n = append(n, name)
	}
	slices.Sort(n)
	return n
}

func readUserlandStamp(p string) (*Userland, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, err
	}
	var u Userland
	if err := json.Unmarshal(b, &u); err != nil {
		return nil, err
	}
	if u.Version != userlandStampVersion || u.Root == "" {
		return nil, errors.New("vmimage: stale userland stamp")
	}
	return &u, nil
}

// Entries lists the prefix for an initramfs: every regular file and
// symlink under usr/ and etc/ (documentation and manuals left out), guest
// path to host path, and the merged-/usr links a Debian root has
// (/lib64 -> usr/lib64, /lib -> usr/lib): the dynamic loader's path
// is /lib64/ld-linux-x86-64.so.2.
func (u *Userland) Entries() (files map[string]string, links map[string]string, err error) {
	files, links = map[string]string{}, map[string]string{"/lib64": "usr/lib64", "/lib": "usr/lib"}
	err = filepath.WalkDir(u.Root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(u.Root, p)
		if err != nil {
			return err
		}
		g := "/" + filepath.ToSlash(rel)
		if d.IsDir() {
			if strings.HasPrefix(g, "/usr/share/doc") || strings.HasPrefix(g, "/usr/share/man") ||
				strings.HasPrefix(g, "/usr/share/lintian") || strings.HasPrefix(g, "/usr/share/locale") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasPrefix(g, "/usr/") && !strings.HasPrefix(g, "/etc/") {
			return nil
		}
		if d.Type()&fs.ModeSymlink != 0 {
			t, err := os.Readlink(p)
			if err != nil {
				return err
			}
			links[g] = t
			return nil
		}
		if d.Type().IsRegular() {
			files[g] = p
		}
		return nil
	})
	return files, links, err
}

// CheckLinks checks that every DT_NEEDED library of the ELF files under
// the prefix's bin directories and of the verbs providers is in the
// prefix: a package missing from the list would otherwise only show as
// a program that does not start in the guest.
func (u *Userland) CheckLinks() error {
	var bins []string
	for _, g := range []string{"usr/bin/*", "usr/lib/x86_64-linux-gnu/libibverbs/*.so"} {
		m, err := filepath.Glob(filepath.Join(u.Root, g))
		if err != nil {
			return err
		}
		bins = append(bins, m...)
	}
	have := map[string]bool{}
	libs, err := filepath.Glob(filepath.Join(u.Root, "usr/lib/x86_64-linux-gnu/*.so*"))
	if err != nil {
		return err
	}
	for _, l := range libs {
		have[path.Base(l)] = true
	}
	var missing []string
	for _, b := range bins {
		f, err := elf.Open(b)
		if err != nil {
			continue // a script, not a program
		}
		need, err := f.ImportedLibraries()
		_ = f.Close() // read-only
		if err != nil {
			return fmt.Errorf("vmimage: %s: %w", b, err)
		}
		for _, n := range need {
			if !have[n] {
				missing = append(missing, filepath.Base(b)+" needs "+n)
			}
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("vmimage: userland %s misses libraries: %s", u.Root, strings.Join(missing, ", "))
	}
	return nil
}
