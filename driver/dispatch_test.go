package driver_test

import (
	"errors"
	"go/ast"
	"go/constant"
	"go/importer"
	"go/parser"
	"go/token"
	"go/types"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/gohfi/gohfi/driver"
	"golang.org/x/sys/unix"
)

// uapiCommands type-checks package uapi from its source and returns the
// value of every *_IOCTL_* constant, so the test needs no second list.
func uapiCommands(t *testing.T) map[string]uint32 {
	t.Helper()
	fset := token.NewFileSet()
	pkgs, err := parser.ParseDir(fset, "../uapi", func(fi os.FileInfo) bool {
		return !strings.HasSuffix(fi.Name(), "_test.go")
	}, 0)
	if err != nil {
		t.Fatal(err)
	}
	var files []*ast.File
	for _, f := range pkgs["uapi"].Files {
		files = append(files, f)
	}
	conf := types.Config{Importer: importer.ForCompiler(fset, "source", nil)}
	pkg, err := conf.Check("github.com/gohfi/gohfi/uapi", fset, files, nil)
	if err != nil {
		t.Fatal(err)
	}
	cmds := map[string]uint32{}
	for _, name := range pkg.Scope().Names() {
		c, ok := pkg.Scope().Lookup(name).(*types.Const)
		command := strings.HasPrefix(name, "HFI1_IOCTL_") || strings.HasPrefix(name, "GOHFI_IOCTL_")
		if !ok || !command || strings.HasSuffix(name, "_MAGIC") {
			continue
		}
		v, ok := constant.Uint64Val(c.Val())
		if !ok {
			t.Fatalf("%s is not an integer constant", name)
		}
		cmds[name] = uint32(v)
	}
	return cmds
}

var docCommand = regexp.MustCompile("(?m)^\\| `((?:HFI1|GOHFI)_IOCTL_[A-Z_]+)` \\| (0x[0-9A-F]+) \\|")

// TestEveryDocumentedIoctlIsDispatched: each command docs/abi.md lists has
// the number the document gives, exists in uapi, and reaches a handler: a
// call with a null argument fails with EFAULT or an errno of its own, never
// ENOTTY ("no such command"), or succeeds for the commands without one. And
// every command uapi defines is documented.
func TestEveryDocumentedIoctlIsDispatched(t *testing.T) {
	doc, err := os.ReadFile("../docs/abi.md")
	if err != nil {
		t.Fatal(err)
	}
	cmds := uapiCommands(t)
	rows := docCommand.FindAllStringSubmatch(string(doc), -1)
	if len(rows) < 20 {
		t.Fatalf("docs/abi.md lists %d commands: the table format changed?", len(rows))
	}
	a := openDev(t, 1)
	f := openFile(t, a)
	assign(t, f)
	documented := map[string]bool{}
	for _, r := range rows {
		name := r[1]
		documented[name] = true
		num, _ := strconv.ParseUint(r[2], 0, 32)
		v, ok := cmds[name]
		switch {
		case !ok:
			t.Errorf("%s: documented, not defined in uapi", name)
			continue
		case uint32(num) != v:
			t.Errorf("%s: documented as %#x, uapi has %#x", name, num, v)
		}
		if _, err := f.Ioctl(v, driver.UserPtr{}); errors.Is(err, unix.ENOTTY) {
			t.Errorf("%s: not dispatched (%v)", name, err)
		}
	}
	for name := range cmds {
		if !documented[name] {
			t.Errorf("%s: defined in uapi, missing from docs/abi.md", name)
		}
	}
}
