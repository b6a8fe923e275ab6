package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
	"sync"
	"unicode"

	"golang.org/x/sys/unix"
)

// obj is a command result: fields in the order they were added, printed as
// one JSON object (--json) or as aligned "key: value" lines.
type obj []field

type field struct {
	key string
	val any
}

func (o *obj) add(key string, val any) *obj {
	*o = append(*o, field{key, val})
	return o
}

// get returns the value of key, or nil.
func (o obj) get(key string) any {
	for _, f := range o {
		if f.key == key {
			return f.val
		}
	}
	return nil
}

// MarshalJSON keeps the field order.
func (o obj) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, f := range o {
		if i > 0 {
			b.WriteByte(',')
		}
		k, _ := json.Marshal(f.key)
		v, err := json.Marshal(f.val)
		if err != nil {
			return nil, fmt.Errorf("field %s: %w", f.key, err)
		}
		b.Write(k)
		b.WriteByte(':')
		b.Write(v)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

// hex is a number shown in hexadecimal to people and as a plain number in
// JSON.
type hex uint64

func (h hex) String() string { return fmt.Sprintf("%#x", uint64(h)) }

// flagsVal is a bit mask with the names of its set bits.
type flagsVal struct {
	v     uint64
	names []string
}

func (f flagsVal) String() string {
	if len(f.names) == 0 {
		return hex(f.v).String()
	}
	return fmt.Sprintf("%#x (%s)", f.v, strings.Join(f.names, "|"))
}

func (f flagsVal) MarshalJSON() ([]byte, error) { return json.Marshal(f.v) }

// bitNames decodes v with a table of bit names, naming unknown bits by
// number.
func bitNames(v uint64, names map[uint64]string) flagsVal {
	fv := flagsVal{v: v}
	for bit := 0; bit < 64; bit++ {
		m := uint64(1) << bit
		if v&m == 0 {
			continue
		}
		if n, ok := names[m]; ok {
			fv.names = append(fv.names, n)
		} else {
			fv.names = append(fv.names, fmt.Sprintf("bit%d", bit))
		}
	}
	return fv
}

// structObj turns a struct (uapi, driver) into an obj: keys from the json
// tag, else the C field name in the c tag, else the Go name in snake case.
// Reserved and padding fields are left out; the fields named in hexKeys
// print in hexadecimal.
func structObj(v any, hexKeys ...string) obj {
	rv := reflect.Indirect(reflect.ValueOf(v))
	rt := rv.Type()
	var o obj
	for i := 0; i < rt.NumField(); i++ {
		sf := rt.Field(i)
		if !sf.IsExported() || strings.HasPrefix(sf.Name, "Reserved") || strings.HasPrefix(sf.Name, "Pad") {
			continue
		}
		key := sf.Tag.Get("json")
		key, _, _ = strings.Cut(key, ",")
		if key == "" {
			key = sf.Tag.Get("c")
		}
		if key == "" {
			key = snake(sf.Name)
		}
		fv := rv.Field(i)
		var val any
		switch fv.Kind() {
		case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
			val = fv.Uint()
			for _, h := range hexKeys {
				if h == key {
					val = hex(fv.Uint())
				}
			}
		case reflect.Array:
			if fv.Type().Elem().Kind() == reflect.Uint8 {
				b := make([]byte, fv.Len())
				reflect.Copy(reflect.ValueOf(b), fv)
				val = fmt.Sprintf("%x", b)
				break
			}
			val = fv.Interface()
		default:
			val = fv.Interface()
		}
		o.add(key, val)
	}
	return o
}

// snake turns a Go name into snake case: RcvHdrCnt -> rcv_hdr_cnt,
// TIDUnmapOnInvalidate -> tid_unmap_on_invalidate.
func snake(s string) string {
	r := []rune(s)
	var b strings.Builder
	for i, c := range r {
		if unicode.IsUpper(c) {
			prevLower := i > 0 && (unicode.IsLower(r[i-1]) || unicode.IsDigit(r[i-1]))
			nextLower := i > 0 && i+1 < len(r) && unicode.IsUpper(r[i-1]) && unicode.IsLower(r[i+1])
			if prevLower || nextLower {
				b.WriteByte('_')
			}
			c = unicode.ToLower(c)
		}
		b.WriteRune(c)
	}
	return b.String()
}

// printer writes results and errors in the chosen format.
type printer struct {
	mu          sync.Mutex // trace events print from their own goroutine
	out, errOut io.Writer
	json        bool
	printed     int   // human results so far, to separate them
	line        int   // shell input line being run, 0 outside the shell
	outErr      error // the first write to out that failed
}

// write writes one result to out, with mu held. A failure is kept for the
// exit status (writeErr): a result that was not written is a failed run,
// most of all with --json into a file.
func (p *printer) write(b []byte) {
	if _, err := p.out.Write(b); err != nil && p.outErr == nil {
		p.outErr = err
	}
}

// writeErr is the first failed write of a result, or nil.
func (p *printer) writeErr() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.outErr
}

// text prints text as it is (the shell's help).
func (p *printer) text(s string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.write([]byte(s))
}

// result prints one successful command result.
func (p *printer) result(cmd string, o obj) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.json {
		full := append(obj{{"cmd", cmd}}, o...)
		b, err := json.Marshal(full)
		if err != nil {
			b, _ = json.Marshal(obj{{"cmd", cmd}, {"error", err.Error()}})
		}
		p.write(append(b, '\n'))
		return
	}
	var b bytes.Buffer
	if p.printed > 0 {
		b.WriteByte('\n')
	}
	p.printed++
	if len(o) == 0 {
		fmt.Fprintf(&b, "%s: ok\n", cmd)
	} else {
		writeHuman(&b, o, "")
	}
	p.write(b.Bytes())
}

// fail prints a failed command: a JSON object on stdout with --json (so the
// machine-readable stream is complete), else a line on stderr.
func (p *printer) fail(cmd string, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	name := errnoName(err)
	if p.json {
		o := obj{{"error", err.Error()}, {"errno", name}}
		if cmd != "" {
			o = append(obj{{"cmd", cmd}}, o...)
		}
		if p.line > 0 {
			o.add("line", p.line)
		}
		b, _ := json.Marshal(o)
		p.write(append(b, '\n'))
		return
	}
	prefix := "hfictl: "
	if p.line > 0 {
		prefix += fmt.Sprintf("line %d: ", p.line)
	}
	if cmd != "" {
		prefix += cmd + ": "
	}
	// Failures go to stderr, where a failure to write one would be
	// reported; the exit status says the command failed regardless.
	if name != "" {
		_, _ = fmt.Fprintf(p.errOut, "%s%v (%s)\n", prefix, err, name)
	} else {
		_, _ = fmt.Fprintf(p.errOut, "%s%v\n", prefix, err)
	}
}

// errnoName is the symbolic errno wrapped in err ("EINVAL"), or "".
func errnoName(err error) string {
	var e unix.Errno
	if errors.As(err, &e) {
		if n := unix.ErrnoName(e); n != "" {
			return n
		}
		return fmt.Sprintf("errno %d", int(e))
	}
	return ""
}

// writeHuman prints o as aligned "key: value" lines; nested objects become
// indented sections, lists of objects one line per element.
func writeHuman(w *bytes.Buffer, o obj, indent string) {
	width := 0
	for _, f := range o {
		if _, nested := f.val.(obj); !nested && len(f.key) > width {
			width = len(f.key)
		}
	}
	for _, f := range o {
		switch v := f.val.(type) {
		case obj:
			fmt.Fprintf(w, "%s%s:\n", indent, f.key)
			writeHuman(w, v, indent+"  ")
		case []obj:
			fmt.Fprintf(w, "%s%-*s %d\n", indent, width+1, f.key+":", len(v))
			for _, e := range v {
				fmt.Fprintf(w, "%s  - %s\n", indent, inline(e))
			}
		default:
			fmt.Fprintf(w, "%s%-*s %s\n", indent, width+1, f.key+":", human(v))
		}
	}
}

// inline prints an object on one line: "k: v  k: v".
func inline(o obj) string {
	parts := make([]string, len(o))
	for i, f := range o {
		parts[i] = f.key + ": " + human(f.val)
	}
	return strings.Join(parts, "  ")
}

func human(v any) string {
	switch v := v.(type) {
	case nil:
		return "-"
	case string:
		if v == "" {
			return `""`
		}
		return v
	case []hex:
		if len(v) == 0 {
			return "(none)"
		}
		s := make([]string, len(v))
		for i, h := range v {
			s[i] = h.String()
		}
		return strings.Join(s, " ")
	case []string:
		if len(v) == 0 {
			return "(none)"
		}
		return strings.Join(v, " ")
	case fmt.Stringer:
		return v.String()
	}
	return fmt.Sprint(v)
}
