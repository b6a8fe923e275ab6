// Package ctest checks Go definitions of a C ABI against a C compiler: a
// test writes a C program that prints named values (sizes, offsets,
// constants), Run compiles and runs it, and Compare matches the output
// with what the Go side says. The parity tests of uapi and vfio/abi use it.
package ctest

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gohfi/gohfi/internal/testenv"
)

// Expectation is one value the C program prints, with the Go value.
type Expectation struct {
	Key  string // also the printf label
	Expr string // C expression
	Want uint64
}

// GCC returns the path of gcc. Without one the test is skipped, except
// under CI=true, where checking against C is required and it fails
// (testenv.Missing).
func GCC(t testing.TB) string {
	t.Helper()
	gcc, err := exec.LookPath("gcc")
	if err != nil {
		testenv.Missing(t, "gcc not found: cannot check the ABI against C: %v", err)
	}
	return gcc
}

// Program returns C source that includes prelude and prints every
// expectation as "key=value".
func Program(prelude string, ex []Expectation) string {
	var b strings.Builder
	b.WriteString(prelude)
	b.WriteString("\n#include <stdio.h>\nint main(void)\n{\n")
	for _, e := range ex {
		fmt.Fprintf(&b, "\tprintf(\"%%s=%%llu\\n\", %q, (unsigned long long)(%s));\n", e.Key, e.Expr)
	}
	b.WriteString("\treturn 0;\n}\n")
	return b.String()
}

// Run compiles src with gcc (warnings are errors), runs it and returns
// key -> value of what it printed.
func Run(t testing.TB, gcc, src string) map[string]uint64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dir := t.TempDir()
	cfile, bin := filepath.Join(dir, "parity.c"), filepath.Join(dir, "parity")
	if err := os.WriteFile(cfile, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.CommandContext(ctx, gcc, "-std=gnu11", "-Wall", "-Werror", "-Wno-unused-function", "-o", bin, cfile).CombinedOutput()
	if err != nil {
		t.Fatalf("gcc: %v\n%s", err, out)
	}
	out, err = exec.CommandContext(ctx, bin).Output()
	if err != nil {
		t.Fatalf("running the C program: %v", err)
	}
	got := map[string]uint64{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), "=")
		if !ok {
			t.Fatalf("bad line %q", sc.Text())
		}
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("bad line %q: %v", sc.Text(), err)
		}
		got[k] = n
	}
	return got
}

// Compare reports every expectation the C output disagrees with.
func Compare(t testing.TB, ex []Expectation, got map[string]uint64) {
	t.Helper()
	if len(got) != len(ex) {
		t.Errorf("C printed %d values, want %d", len(got), len(ex))
	}
	for _, e := range ex {
		g, ok := got[e.Key]
		switch {
		case !ok:
			t.Errorf("%s: missing from C output", e.Key)
		case g != e.Want:
			t.Errorf("%s: C %#x, Go %#x", e.Key, g, e.Want)
		}
	}
}

// StructLayout returns the expectations for Go struct type rt standing for
// struct cname: its size, and each field's offset and size. A field's C
// name is its `c` tag or SnakeCase of its Go name; blank fields (padding,
// structs.HostLayout) are skipped. A field tagged `c:"-"` is missing from
// some versions of the C header and must be last: the size is then
// checked to be either the Go size or the offset of that field.
func StructLayout(cname string, rt reflect.Type) []Expectation {
	sizeExpr := "sizeof(struct " + cname + ")"
	ex := []Expectation{{"sizeof " + cname, sizeExpr, uint64(rt.Size())}}
	for i := 0; i < rt.NumField(); i++ {
		f := rt.Field(i)
		if f.Name == "_" {
			continue
		}
		cn := f.Tag.Get("c")
		if cn == "-" {
			ex[0] = Expectation{"sizeof " + cname + " (with or without " + f.Name + ")",
				fmt.Sprintf("%s == %d || %s == %d", sizeExpr, rt.Size(), sizeExpr, f.Offset), 1}
			continue
		}
		if cn == "" {
			cn = SnakeCase(f.Name)
		}
		ex = append(ex,
			Expectation{"offsetof " + cname + "." + cn, fmt.Sprintf("offsetof(struct %s, %s)", cname, cn), uint64(f.Offset)},
			Expectation{"fieldsize " + cname + "." + cn, fmt.Sprintf("sizeof(((struct %s *)0)->%s)", cname, cn), uint64(f.Type.Size())})
	}
	return ex
}

// PackageFiles parses the Go files of the package in the current directory
// (the one under test), without its tests.
func PackageFiles(t testing.TB) (*token.FileSet, []*ast.File) {
	t.Helper()
	fset := token.NewFileSet()
	pkgs, err := parser.ParseDir(fset, ".", func(fi os.FileInfo) bool {
		return !strings.HasSuffix(fi.Name(), "_test.go")
	}, 0)
	if err != nil {
		t.Fatal(err)
	}
	var files []*ast.File
	for _, p := range pkgs {
		for _, f := range p.Files {
			files = append(files, f)
		}
	}
	return fset, files
}

// SnakeCase turns a Go field name into the C one: TIDOffset -> tid_offset,
// DstCtxt -> dst_ctxt.
func SnakeCase(s string) string {
	var b strings.Builder
	r := []rune(s)
	for i, c := range r {
		upper := c >= 'A' && c <= 'Z'
		if upper && i > 0 {
			prevLower := r[i-1] >= 'a' && r[i-1] <= 'z'
			nextLower := i+1 < len(r) && r[i+1] >= 'a' && r[i+1] <= 'z'
			if prevLower || nextLower {
				b.WriteByte('_')
			}
		}
		if upper {
			c += 'a' - 'A'
		}
		b.WriteRune(c)
	}
	return b.String()
}
