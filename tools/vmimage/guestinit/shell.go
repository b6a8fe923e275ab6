package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"strings"

	"golang.org/x/sys/unix"
)

// shell runs /bin/sh on the console if the image has one, else a minimal
// command loop: each line is split on blanks and run as a program (looked
// up in /gohfi/bin, /bin), with cd and exit built in. It is for looking
// around in a guest booted by "vmimage vm", not for scripting. The console
// is the only output: a write to it that fails has nowhere to be reported.
func shell(console *os.File, env []string) {
	if _, err := os.Stat("/bin/sh"); err == nil {
		cmd := exec.Command("/bin/sh")
		cmd.Stdin, cmd.Stdout, cmd.Stderr = console, console, console
		cmd.Env = env
		if err := cmd.Run(); err != nil {
			_, _ = fmt.Fprintf(console, "sh: %v\n", err) // console only, see above
		}
		return
	}
	_, _ = fmt.Fprintln(console, "gohfi guest: built-in command loop (no /bin/sh); 'exit' powers off") // console only
	in := bufio.NewScanner(console)
	for {
		_, _ = fmt.Fprint(console, "# ") // console only
		if !in.Scan() {
			return
		}
		f := strings.Fields(in.Text())
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "exit", "poweroff":
			return
		case "cd":
			dir := "/"
			if len(f) > 1 {
				dir = f[1]
			}
			if err := unix.Chdir(dir); err != nil {
				_, _ = fmt.Fprintf(console, "cd: %v\n", err) // console only
			}
			continue
		}
		cmd := exec.Command(f[0], f[1:]...)
		cmd.Stdin, cmd.Stdout, cmd.Stderr = console, console, console
		cmd.Env = env
		if err := cmd.Run(); err != nil {
			_, _ = fmt.Fprintf(console, "%s: %v\n", f[0], err) // console only
		}
	}
}
