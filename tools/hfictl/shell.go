package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strings"
	"unicode"

	"golang.org/x/sys/unix"
)

// The shell reads one command per line and keeps the open files, their
// contexts and the named buffers between lines, as a program holding the
// device open would. Several open files (open NAME, use NAME) give several
// contexts, to send from one to another.

func (s *session) shell(stdin io.Reader, stderr io.Writer, args []string) bool {
	fs := newFlags("shell")
	stop := fs.Bool("stop-on-error", false, "stop at the first failed command")
	if _, err := parseArgs(fs, args, 0, 0); err != nil {
		s.p.fail("shell", err)
		return false
	}
	interactive := isTerminal(stdin)
	sc := bufio.NewScanner(stdin)
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	ok := true
	defer func() { s.p.line = 0 }()
	for n := 1; ; n++ {
		if interactive {
			_, _ = fmt.Fprintf(stderr, "hfictl:%s> ", s.cur) // a prompt: nothing to do if the terminal fails
		}
		if !sc.Scan() {
			break
		}
		s.p.line = n
		words, err := splitLine(sc.Text())
		if err != nil {
			s.p.fail("", err)
			ok = false
		} else if len(words) > 0 {
			switch words[0] {
			case "exit", "quit":
				return ok
			case "help":
				s.p.text(commandList())
				continue
			}
			if !s.exec(words[0], words[1:]) {
				ok = false
			}
		}
		if (!ok && *stop) || s.ctx.Err() != nil {
			break
		}
	}
	if err := sc.Err(); err != nil {
		s.p.fail("shell", fmt.Errorf("reading commands: %w", err))
		return false
	}
	if err := s.ctx.Err(); err != nil {
		s.p.fail("shell", fmt.Errorf("interrupted: %w", unix.EINTR))
		return false
	}
	return ok
}

func isTerminal(r io.Reader) bool {
	f, ok := r.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// splitLine splits a line into words at white space, honouring '...' and
// "..." quoting; a word starting with # begins a comment.
func splitLine(line string) ([]string, error) {
	var words []string
	var cur strings.Builder
	inWord := false
	var quote rune
	for _, r := range line {
		switch {
		case quote != 0:
			if r == quote {
				quote = 0
			} else {
				cur.WriteRune(r)
			}
		case r == '\'' || r == '"':
			quote, inWord = r, true
		case r == '#' && !inWord:
			return words, nil
		case unicode.IsSpace(r):
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteRune(r)
			inWord = true
		}
	}
	if quote != 0 {
		return nil, usageErr("unterminated %c quote", quote)
	}
	if inWord {
		words = append(words, cur.String())
	}
	return words, nil
}

func (of *openFile) describe(current bool) obj {
	o := obj{{"file", of.name}, {"current", current}}
	if of.ci != nil {
		o.add("ctxt", of.ci.Ctxt)
	} else {
		o.add("ctxt", nil)
	}
	return o
}

func cmdOpen(s *session, args []string) (obj, error) {
	pos, err := parseArgs(newFlags("open"), args, 1, 1)
	if err != nil {
		return nil, err
	}
	if _, ok := s.files[pos[0]]; ok {
		return nil, fmt.Errorf("file %q is open: %w", pos[0], unix.EEXIST)
	}
	of, err := s.openFile(pos[0])
	if err != nil {
		return nil, err
	}
	s.cur = of.name
	return of.describe(true), nil
}

func cmdUse(s *session, args []string) (obj, error) {
	pos, err := parseArgs(newFlags("use"), args, 1, 1)
	if err != nil {
		return nil, err
	}
	if _, ok := s.files[pos[0]]; !ok && pos[0] != defaultFile {
		return nil, fmt.Errorf("no open file %q: %w", pos[0], unix.EBADF)
	}
	s.cur = pos[0]
	of, err := s.file()
	if err != nil {
		return nil, err
	}
	return of.describe(true), nil
}

func cmdClose(s *session, args []string) (obj, error) {
	pos, err := parseArgs(newFlags("close"), args, 0, 1)
	if err != nil {
		return nil, err
	}
	name := s.cur
	if len(pos) == 1 {
		name = pos[0]
	}
	of, ok := s.files[name]
	if !ok {
		return nil, fmt.Errorf("no open file %q: %w", name, unix.EBADF)
	}
	delete(s.files, name)
	released := s.verbs.drop(of) // the driver destroys them with the file
	if err := of.close(); err != nil {
		return nil, err
	}
	return obj{{"file", name}, {"tids_released", len(of.tids)}, {"verbs_objects_released", released}}, nil
}

func cmdFiles(s *session, args []string) (obj, error) {
	if _, err := parseArgs(newFlags("files"), args, 0, 0); err != nil {
		return nil, err
	}
	list := []obj{}
	for _, n := range sortedKeys(s.files) {
		list = append(list, s.files[n].describe(n == s.cur))
	}
	return obj{{"current", s.cur}, {"files", list}}, nil
}
