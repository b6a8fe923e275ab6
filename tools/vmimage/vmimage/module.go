package vmimage

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/ulikunitz/xz"
)

// VFIOModules are the modules the kernel VFIO backend needs in a trixie
// guest (the legacy container/group API; the kernel has no iommufd).
var VFIOModules = []string{"irqbypass", "vfio", "vfio_iommu_type1", "vfio-pci-core", "vfio-pci"}

// KernelModule is a module ready to be put into the initramfs.
type KernelModule struct {
	Name    string // as the kernel names it (dashes turned into underscores)
	Depends []string
	Image   []byte // uncompressed ELF object
}

// ResolveModules finds names and everything they depend on in the module
// tree dir (lib/modules/<release>), decompresses them and returns them in
// an order in which each module comes after its dependencies.
//
// Debian's kernel package does not ship modules.dep (depmod writes it at
// install time), so dependencies are read from each module's own .modinfo
// section ("depends="), which is what depmod reads as well.
func ResolveModules(dir string, names ...string) ([]KernelModule, error) {
	index, err := indexModules(dir)
	if err != nil {
		return nil, err
	}
	var order []KernelModule
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(name string, chain []string) error
	visit = func(name string, chain []string) error {
		name = modName(name)
		switch state[name] {
		case 1:
			return fmt.Errorf("vmimage: module dependency cycle: %s", strings.Join(append(chain, name), " -> "))
		case 2:
			return nil
		}
		path, ok := index[name]
		if !ok {
			if builtin(dir, name) {
				state[name] = 2
				return nil
			}
			return fmt.Errorf("vmimage: module %s not found in %s", name, dir)
		}
		state[name] = 1
		img, err := readModule(path)
		if err != nil {
			return err
		}
		deps, err := moduleDepends(img)
		if err != nil {
			return fmt.Errorf("vmimage: module %s: %w", name, err)
		}
		for _, d := range deps {
			if err := visit(d, append(chain, name)); err != nil {
				return err
			}
		}
		state[name] = 2
		order = append(order, KernelModule{Name: name, Depends: deps, Image: img})
		return nil
	}
	for _, n := range names {
		if err := visit(n, nil); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// modName is the kernel's canonical module name: dashes and underscores are
// the same to modprobe.
func modName(s string) string { return strings.ReplaceAll(s, "-", "_") }

func indexModules(dir string) (map[string]string, error) {
	index := map[string]string{}
	err := filepath.WalkDir(filepath.Join(dir, "kernel"), func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			return nil
		}
		base := d.Name()
		i := strings.Index(base, ".ko")
		if i < 0 {
			return nil
		}
		index[modName(base[:i])] = path
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("vmimage: indexing modules: %w", err)
	}
	return index, nil
}

// builtin reports whether name is listed in modules.builtin.
func builtin(dir, name string) bool {
	b, err := os.ReadFile(filepath.Join(dir, "modules.builtin"))
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		base := filepath.Base(line)
		if i := strings.Index(base, ".ko"); i >= 0 && modName(base[:i]) == name {
			return true
		}
	}
	return false
}

// readModule reads a module file, decompressing .ko.xz (Debian's
// choice) and .ko.gz; other compressions are refused.
func readModule(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }() // read-only: nothing a close could lose
	var r io.Reader = f
	switch {
	case strings.HasSuffix(path, ".xz"):
		xr, err := xz.NewReader(f)
		if err != nil {
			return nil, fmt.Errorf("vmimage: %s: %w", path, err)
		}
		r = xr
	case strings.HasSuffix(path, ".gz"):
		gr, err := gzip.NewReader(f)
		if err != nil {
			return nil, fmt.Errorf("vmimage: %s: %w", path, err)
		}
		r = gr
	case strings.HasSuffix(path, ".ko"):
	default:
		return nil, fmt.Errorf("vmimage: %s: unsupported module compression", path)
	}
	b, err := io.ReadAll(r)
	if err != nil {
		return nil, fmt.Errorf("vmimage: decompressing %s: %w", path, err)
	}
	return b, nil
}

// moduleDepends reads "depends=" from the module's .modinfo section.
func moduleDepends(img []byte) ([]string, error) {
	ef, err := elf.NewFile(bytes.NewReader(img))
	if err != nil {
		return nil, err
	}
	sec := ef.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("no .modinfo section")
	}
	data, err := sec.Data()
	if err != nil {
		return nil, err
	}
	for _, kv := range bytes.Split(data, []byte{0}) {
		v, ok := bytes.CutPrefix(kv, []byte("depends="))
		if !ok {
			continue
		}
		var deps []string
		for _, d := range strings.Split(string(v), ",") {
			if d = strings.TrimSpace(d); d != "" {
				deps = append(deps, modName(d))
			}
		}
		return deps, nil
	}
	return nil, nil
}
