// Package guest is the contract between the guest image builder (the host
// side) and the init program that runs inside the guest: the configuration
// the init reads from the initramfs and the results it writes to the serial
// console between markers.
//
// The console also carries kernel messages, so every line the host must
// understand starts with a fixed prefix and a result is one JSON document on
// one line; anything else on the console is ignored by the parser.
package guest

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"
)

// Paths inside the initramfs.
const (
	ConfigPath = "/gohfi/config.json"
	BinDir     = "/gohfi/bin"
	ModuleDir  = "/lib/modules/gohfi"
)

// Console markers. Each sits at the start of its own line.
const (
	MarkerInit     = "GOHFI-INIT "   // followed by an InitInfo JSON document
	MarkerBegin    = "GOHFI-BEGIN"   // results follow
	MarkerResult   = "GOHFI-RESULT " // followed by a Result JSON document
	MarkerEnd      = "GOHFI-END "    // followed by the number of results
	MarkerError    = "GOHFI-ERROR "  // followed by a message; the init gives up
	MarkerPoweroff = "GOHFI-POWEROFF"
	MarkerKmsg     = "GOHFI-KMSG " // followed by the kernel log as a JSON string, when a test failed
)

// FactPrefix starts a line a guest test prints to report a measured fact
// ("GOHFI-FACT key=value"); the host collects them from the test output.
const FactPrefix = "GOHFI-FACT "

// EnvGuest is set to "1" in the environment of every test the init runs.
const EnvGuest = "GOHFI_GUEST"

// Config is what the init does, read from ConfigPath.
type Config struct {
	// Modules are kernel module files (uncompressed), in load order.
	Modules []Module `json:"modules,omitempty"`
	// Tests are run one after the other.
	Tests []Test `json:"tests,omitempty"`
	// Env is added to the environment of every test (KEY=VALUE).
	Env []string `json:"env,omitempty"`
	// Interactive makes the init offer a shell on the console after the
	// tests instead of powering off: /bin/sh if the image has one, else a
	// minimal built-in command loop. The guest powers off when it exits.
	Interactive bool `json:"interactive,omitempty"`
}

// Module is one kernel module to load.
type Module struct {
	Name   string `json:"name"`
	Path   string `json:"path"`
	Params string `json:"params,omitempty"`
}

// Test is one binary to run in the guest.
type Test struct {
	Name    string        `json:"name"`
	Path    string        `json:"path"`
	Args    []string      `json:"args,omitempty"`
	Timeout time.Duration `json:"timeout,omitempty"`
}

// InitInfo is printed by the init as soon as it runs.
type InitInfo struct {
	Uptime  float64 `json:"uptime"` // seconds since the guest kernel started, from /proc/uptime
	Release string  `json:"release"`
	// Modules lists the modules loaded, with an error string for those that
	// failed.
	Modules   map[string]string `json:"modules,omitempty"`
	ModulesMS float64           `json:"modules_ms"`
	Mounts    map[string]string `json:"mounts,omitempty"` // mount point -> error ("" when mounted)
}

// Result is the outcome of one Test.
type Result struct {
	Name     string        `json:"name"`
	ExitCode int           `json:"exit_code"`
	Error    string        `json:"error,omitempty"` // could not run, or timed out
	Duration time.Duration `json:"duration"`
	Output   string        `json:"output"`
}

// Passed reports whether the test binary ran and exited with status 0.
func (r Result) Passed() bool { return r.Error == "" && r.ExitCode == 0 }

// Facts returns the GOHFI-FACT key=value lines of the output.
func (r Result) Facts() map[string]string {
	facts := map[string]string{}
	for _, line := range strings.Split(r.Output, "\n") {
		i := strings.Index(line, FactPrefix)
		if i < 0 {
			continue
		}
		kv := strings.TrimSpace(line[i+len(FactPrefix):])
		k, v, _ := strings.Cut(kv, "=")
		facts[k] = v
	}
	return facts
}

// Report is everything the host learned from the console.
type Report struct {
	Init     *InitInfo
	Results  []Result
	Complete bool   // the end marker was seen with the right count
	Error    string // the init's own error, if it reported one
	Kmsg     string // the guest kernel's log, sent when a test failed
}

// Encode writes one marker line with v as JSON.
func Encode(w io.Writer, marker string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "\n%s%s\n", marker, b)
	return err
}

// Parser reads the console line by line and builds a Report. Feed it lines
// as they arrive (Line) so a caller can react to markers while the guest
// still runs.
type Parser struct {
	Report Report
	begun  bool
}

// Line consumes one console line (without the newline) and reports whether
// the guest has finished: the end marker, an init error or power-off.
func (p *Parser) Line(line string) (done bool, err error) {
	// Serial lines end in \r\n; kernel messages may precede a marker on the
	// same line only if they raced it, which Encode avoids by starting with
	// a newline.
	line = strings.TrimRight(line, "\r")
	switch {
	case strings.HasPrefix(line, MarkerInit):
		var info InitInfo
		if err := json.Unmarshal([]byte(line[len(MarkerInit):]), &info); err != nil {
			return false, fmt.Errorf("guest: bad %q line: %w", strings.TrimSpace(MarkerInit), err)
		}
		p.Report.Init = &info
	case strings.HasPrefix(line, MarkerKmsg):
		if err := json.Unmarshal([]byte(line[len(MarkerKmsg):]), &p.Report.Kmsg); err != nil {
			return false, fmt.Errorf("guest: bad %q line: %w", strings.TrimSpace(MarkerKmsg), err)
		}
	case line == MarkerBegin:
		p.begun = true
	case strings.HasPrefix(line, MarkerResult):
		var r Result
		if err := json.Unmarshal([]byte(line[len(MarkerResult):]), &r); err != nil {
			return false, fmt.Errorf("guest: bad %q line: %w", strings.TrimSpace(MarkerResult), err)
		}
		p.Report.Results = append(p.Report.Results, r)
	case strings.HasPrefix(line, MarkerEnd):
		var n int
		if _, err := fmt.Sscanf(line[len(MarkerEnd):], "%d", &n); err != nil {
			return true, fmt.Errorf("guest: bad end marker %q: %w", line, err)
		}
		p.Report.Complete = p.begun && n == len(p.Report.Results)
		if !p.Report.Complete {
			return true, fmt.Errorf("guest: end marker says %d results, read %d", n, len(p.Report.Results))
		}
		return true, nil
	case strings.HasPrefix(line, MarkerError):
		p.Report.Error = line[len(MarkerError):]
		return true, fmt.Errorf("guest init: %s", p.Report.Error)
	case line == MarkerPoweroff:
		return true, nil
	}
	return false, nil
}

// Parse reads a whole console log.
func Parse(r io.Reader) (Report, error) {
	var p Parser
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 64<<20)
	for sc.Scan() {
		done, err := p.Line(sc.Text())
		if err != nil {
			return p.Report, err
		}
		if done {
			break
		}
	}
	return p.Report, sc.Err()
}
