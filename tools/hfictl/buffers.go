package main

import (
	"flag"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"strconv"
	"strings"

	"github.com/gohfi/gohfi/mem"
	"golang.org/x/sys/unix"
)

// Named user buffers: page-aligned memory outside the Go heap (package mem),
// anonymous or memfd-backed, to register with TID_UPDATE and send from.
// munmap keeps the name and the address so that later commands show what the
// driver does with memory that went away.

type buffer struct {
	name  string
	b     *mem.Buffer
	memfd bool
}

func (s *session) buffer(name string) (*buffer, error) {
	b, ok := s.bufs[name]
	if !ok {
		return nil, fmt.Errorf("no buffer %q (alloc it first): %w", name, unix.ENOENT)
	}
	return b, nil
}

// parseBuffer parses fs's flags and one positional argument, a buffer's
// name, and returns that buffer.
func (s *session) parseBuffer(fs *flag.FlagSet, args []string) (*buffer, error) {
	pos, err := parseArgs(fs, args, 1, 1)
	if err != nil {
		return nil, err
	}
	return s.buffer(pos[0])
}

// mapped returns the buffer's bytes, or EFAULT once it is unmapped.
func (b *buffer) mapped() ([]byte, error) {
	data := b.b.Bytes()
	if data == nil {
		return nil, fmt.Errorf("buffer %s at %#x is unmapped: %w", b.name, b.b.Addr(), unix.EFAULT)
	}
	return data, nil
}

func (b *buffer) describe() obj {
	return obj{
		{"name", b.name}, {"addr", hex(b.b.Addr())}, {"size", b.b.Len()}, {"mapped_len", b.b.MappedLen()},
		{"memfd", b.memfd}, {"mapped", b.b.Bytes() != nil},
	}
}

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// crc is the CRC-32C that checksum, send and recv print.
func crc(b []byte) hex { return hex(crc32.Checksum(b, crcTable)) }

// rangeFlags adds --offset and --len to a command working on part of a
// buffer and returns a function resolving them against a buffer size.
func rangeFlags(fs interface {
	String(name, value, usage string) *string
}) func(size int) (int, int, error) {
	offArg := fs.String("offset", "0", "first byte")
	lenArg := fs.String("len", "", "bytes (default: to the end)")
	return func(size int) (int, int, error) { return resolveSpan(*offArg, *lenArg, size) }
}

// resolveSpan reads an offset (default 0) and a length (default: to the
// end) within size bytes.
func resolveSpan(offArg, lenArg string, size int) (off, n int, err error) {
	if offArg != "" {
		if off, err = parseSize("offset", offArg); err != nil {
			return 0, 0, err
		}
	}
	n = size - off
	if lenArg != "" {
		if n, err = parseSize("len", lenArg); err != nil {
			return 0, 0, err
		}
	}
	if off > size || n < 0 || off+n > size {
		return 0, 0, usageErr("offset %d, length %d: outside %d bytes", off, n, size)
	}
	return off, n, nil
}

func cmdAlloc(s *session, args []string) (obj, error) {
	fs := newFlags("alloc")
	memfd := fs.Bool("memfd", false, "back the buffer with a memfd (shared mapping)")
	pos, err := parseArgs(fs, args, 2, 2)
	if err != nil {
		return nil, err
	}
	name := pos[0]
	if _, ok := s.bufs[name]; ok {
		return nil, fmt.Errorf("buffer %q exists: %w", name, unix.EEXIST)
	}
	size, err := parseSize("size", pos[1])
	if err != nil {
		return nil, err
	}
	var b *mem.Buffer
	if *memfd {
		b, err = mem.AllocMemfd(size)
	} else {
		b, err = mem.Alloc(size)
	}
	if err != nil {
		return nil, err
	}
	buf := &buffer{name: name, b: b, memfd: *memfd}
	s.bufs[name] = buf
	return buf.describe(), nil
}

// fill patterns: a byte value, seq (byte i = i mod 256), zero, rand[:SEED]
// (deterministic), text:STRING (repeated).
func fillPattern(data []byte, pattern string) error {
	switch {
	case pattern == "seq":
		fillSeq(data)
	case pattern == "zero":
		clear(data)
	case pattern == "rand" || strings.HasPrefix(pattern, "rand:"):
		seed := uint64(1)
		if _, s, ok := strings.Cut(pattern, ":"); ok {
			v, err := parseUint("seed", s, 64)
			if err != nil {
				return err
			}
			seed = v
		}
		r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
		for i := range data {
			data[i] = byte(r.Uint32())
		}
	case strings.HasPrefix(pattern, "text:"):
		t := pattern[len("text:"):]
		if t == "" {
			return usageErr("fill: empty text")
		}
		for i := 0; i < len(data); i += copy(data[i:], t) {
		}
	default:
		v, err := strconv.ParseUint(pattern, 0, 8)
		if err != nil {
			return usageErr("fill pattern %q: want a byte, seq, zero, rand[:SEED] or text:STRING", pattern)
		}
		for i := range data {
			data[i] = byte(v)
		}
	}
	return nil
}

func fillSeq(data []byte) {
	for i := range data {
		data[i] = byte(i)
	}
}

// bufferRange parses "NAME [more positional args] [--offset --len]" and
// returns the named buffer, the chosen range's offset and bytes, and the
// positional arguments.
func bufferRange(s *session, cmd string, args []string, npos int) (b *buffer, off int, data []byte, pos []string, err error) {
	fs := newFlags(cmd)
	span := rangeFlags(fs)
	if pos, err = parseArgs(fs, args, npos, npos); err != nil {
		return nil, 0, nil, nil, err
	}
	if b, err = s.buffer(pos[0]); err != nil {
		return nil, 0, nil, nil, err
	}
	all, err := b.mapped()
	if err != nil {
		return nil, 0, nil, nil, err
	}
	off, n, err := span(len(all))
	if err != nil {
		return nil, 0, nil, nil, err
	}
	return b, off, all[off : off+n], pos, nil
}

func rangeResult(b *buffer, off int, data []byte) obj {
	return obj{{"buffer", b.name}, {"offset", off}, {"length", len(data)}, {"checksum", crc(data)}}
}

func cmdFill(s *session, args []string) (obj, error) {
	b, off, data, pos, err := bufferRange(s, "fill", args, 2)
	if err != nil {
		return nil, err
	}
	if err := fillPattern(data, pos[1]); err != nil {
		return nil, err
	}
	return rangeResult(b, off, data), nil
}

func cmdChecksum(s *session, args []string) (obj, error) {
	b, off, data, _, err := bufferRange(s, "checksum", args, 1)
	if err != nil {
		return nil, err
	}
	return rangeResult(b, off, data), nil
}

func cmdMunmap(s *session, args []string) (obj, error) {
	b, err := s.parseBuffer(newFlags("munmap"), args)
	if err != nil {
		return nil, err
	}
	if err := b.b.Unmap(); err != nil {
		return nil, err
	}
	return b.describe(), nil
}

func cmdFree(s *session, args []string) (obj, error) {
	b, err := s.parseBuffer(newFlags("free"), args)
	if err != nil {
		return nil, err
	}
	delete(s.bufs, b.name)
	// TIDs still programmed stay in the files' records: the driver keeps
	// them until TID_FREE, and tid-free BUF still finds them by name.
	outstanding := 0
	for _, of := range s.files {
		for _, r := range of.tids {
			if r.buf == b.name {
				outstanding++
			}
		}
	}
	if err := b.b.Close(); err != nil {
		return nil, err
	}
	return obj{{"name", b.name}, {"tids_outstanding", outstanding}}, nil
}

func cmdBuffers(s *session, args []string) (obj, error) {
	if _, err := parseArgs(newFlags("buffers"), args, 0, 0); err != nil {
		return nil, err
	}
	list := []obj{}
	for _, n := range sortedKeys(s.bufs) {
		list = append(list, s.bufs[n].describe())
	}
	return obj{{"buffers", list}}, nil
}
