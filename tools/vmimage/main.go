// Command vmimage fetches QEMU (>= 10.1, from Debian trixie-backports) and a
// trixie guest kernel into a cache directory, builds an initramfs with a Go
// init and the gohfi test binaries, and boots it under TCG.
//
//	vmimage fetch [-cache dir] [-refresh]
//	vmimage run   [-cache dir] [-socket path] [-hfisim] [-tool pkg]... [-env K=V]... [-test pkg[:pattern]]... [-timeout d]
//	vmimage vm    [-cache dir] [-socket path] [-hfisim] [-tool pkg]... [-env K=V]... [-test pkg[:pattern]]...
//	vmimage initramfs -o file [-test pkg[:pattern]]...
//
// run prints the results the guest reports; vm boots with the serial
// console (and the QEMU monitor, Ctrl-A C; quit with Ctrl-A X) on stdio and
// a small command loop in the guest. -hfisim serves an hfisim device in
// this process and attaches it at guest PCI 0000:00:04.0; -tool puts a
// command of the module (static) into the guest's /bin. See docs/qemu.md.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"time"

	"github.com/gohfi/gohfi/hfisim"
	"github.com/gohfi/gohfi/tools/vmimage/vmimage"
)

type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, " ") }
func (l *stringList) Set(s string) error { *l = append(*l, s); return nil }

type testList []vmimage.TestPackage

func (l *testList) String() string { return fmt.Sprint(*l) }
func (l *testList) Set(s string) error {
	pkg, run, _ := strings.Cut(s, ":")
	if pkg == "" {
		return fmt.Errorf("empty package in %q", s)
	}
	*l = append(*l, vmimage.TestPackage{Package: pkg, Run: run, Timeout: 2 * time.Minute})
	return nil
}

func (l testList) setTags(tags string) {
	for i := range l {
		if tags != "" {
			l[i].Tags = strings.Split(tags, ",")
		}
	}
}

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	var err error
	switch os.Args[1] {
	case "fetch":
		err = cmdFetch(ctx, os.Args[2:])
	case "run":
		err = cmdRun(ctx, os.Args[2:], false)
	case "vm":
		err = cmdRun(ctx, os.Args[2:], true)
	case "initramfs":
		err = cmdInitramfs(ctx, os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "vmimage:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: vmimage fetch|run|vm|initramfs [flags] (see -h of each)")
	os.Exit(2)
}

func cmdFetch(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("fetch", flag.ExitOnError)
	cache := fs.String("cache", vmimage.CacheDir(), "cache directory ($"+vmimage.CacheEnv+")")
	refresh := fs.Bool("refresh", false, "fetch again even if the cache is complete")
	if err := fs.Parse(args); err != nil { // not with ExitOnError, which exits instead
		return err
	}
	start := time.Now()
	a, err := vmimage.Fetch(ctx, vmimage.FetchOptions{CacheDir: *cache, Refresh: *refresh, Log: os.Stderr})
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "vmimage: ready in %v\n", time.Since(start).Round(time.Millisecond))
	return json.NewEncoder(os.Stdout).Encode(struct {
		*vmimage.Artifacts
		Kernel string `json:"kernel"`
	}{a, a.Kernel()})
}

// imageFlags are the flags of the commands that build an initramfs.
type imageFlags struct {
	cache, tags *string
	tests       testList
}

func addImageFlags(fs *flag.FlagSet) *imageFlags {
	f := &imageFlags{
		cache: fs.String("cache", vmimage.CacheDir(), "cache directory ($"+vmimage.CacheEnv+")"),
		tags:  fs.String("tags", "gohfiguest", "build tags for the test binaries"),
	}
	fs.Var(&f.tests, "test", "package[:pattern] whose tests run in the guest (repeatable)")
	return f
}

// build fetches the artifacts and builds an initramfs with opts and the
// flags' tests in a new work directory, which the caller removes with
// removeWork.
func (f *imageFlags) build(ctx context.Context, opts vmimage.ImageOptions) (a *vmimage.Artifacts, work, initrd string, err error) {
	f.tests.setTags(*f.tags)
	if a, err = vmimage.Fetch(ctx, vmimage.FetchOptions{CacheDir: *f.cache, Log: os.Stderr}); err != nil {
		return nil, "", "", err
	}
	if work, err = os.MkdirTemp("", "vmimage-"); err != nil {
		return nil, "", "", err
	}
	opts.WorkDir, opts.Tests = work, f.tests
	if initrd, err = vmimage.BuildImage(ctx, a, opts); err != nil {
		removeWork(work, &err)
		return nil, "", "", err
	}
	return a, work, initrd, nil
}

// removeWork removes the work directory, joining a failure to *err: the
// directory holds the whole initramfs, and leaving it in TMPDIR is worth an
// error.
func removeWork(work string, err *error) {
	if rerr := os.RemoveAll(work); rerr != nil {
		*err = errors.Join(*err, fmt.Errorf("removing %s: %w", work, rerr))
	}
}

func cmdInitramfs(ctx context.Context, args []string) (err error) {
	fs := flag.NewFlagSet("initramfs", flag.ExitOnError)
	img := addImageFlags(fs)
	out := fs.String("o", "initramfs.cpio", "output file")
	if err := fs.Parse(args); err != nil { // not with ExitOnError, which exits instead
		return err
	}
	_, work, initrd, err := img.build(ctx, vmimage.ImageOptions{})
	if err != nil {
		return err
	}
	defer removeWork(work, &err)
	b, err := os.ReadFile(initrd)
	if err != nil {
		return err
	}
	return os.WriteFile(*out, b, 0o644)
}

func cmdRun(ctx context.Context, args []string, interactive bool) (err error) {
	fs := flag.NewFlagSet("run", flag.ExitOnError)
	img := addImageFlags(fs)
	socket := fs.String("socket", "", "unix socket of a running vfio-user server: adds a vfio-user-pci device")
	timeout := fs.Duration("timeout", 5*time.Minute, "kill the guest after this long (run only)")
	mem := fs.Int("m", 1024, "guest memory in MiB")
	var qemuArgs stringList
	fs.Var(&qemuArgs, "qemu", "extra QEMU argument (repeatable), e.g. -qemu=-device -qemu=edu")
	var env stringList
	fs.Var(&env, "env", "KEY=VALUE added to the guest tests' environment (repeatable)")
	var tools stringList
	fs.Var(&tools, "tool", "package of a command to put into the guest's /bin, e.g. ./tools/hfictl (repeatable)")
	withSim := fs.Bool("hfisim", false, "serve an hfisim device in this process and attach it at guest PCI "+vmimage.GuestBDF(hfisimSlot))
	simCtxts := fs.Int("hfisim-contexts", hfisim.DefaultConfig().NumContexts, "receive contexts of the -hfisim device")
	if err := fs.Parse(args); err != nil { // not with ExitOnError, which exits instead
		return err
	}

	a, work, initrd, err := img.build(ctx, vmimage.ImageOptions{Tools: tools, Env: env, Interactive: interactive})
	if err != nil {
		return err
	}
	defer removeWork(work, &err)
	vm := &vmimage.VM{Artifacts: a, Initramfs: initrd, MemoryMB: *mem, VFIOUserSocket: *socket, ExtraArgs: qemuArgs}
	if *withSim {
		cfg := hfisim.DefaultConfig()
		cfg.NumContexts = *simCtxts
		sock, stop, err := serveHFISim(work, cfg)
		if err != nil {
			return err
		}
		defer func() {
			if serr := stop(); serr != nil {
				fmt.Fprintln(os.Stderr, "vmimage: hfisim:", serr)
			}
		}()
		vm.VFIOUserDevices = append(vm.VFIOUserDevices, vmimage.VFIOUserDevice{Socket: sock, Slot: hfisimSlot})
		fmt.Fprintln(os.Stderr, hfisimNote())
	}
	if interactive {
		return vm.Interactive(ctx)
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	res, err := vm.Run(ctx, nil)
	if res != nil {
		if err != nil || res.Failed() {
			_, _ = os.Stderr.Write(res.Console) // the console dump is itself the report: nowhere else to send it
		}
		if len(res.Stderr) > 0 {
			fmt.Fprintf(os.Stderr, "QEMU stderr:\n%s", res.Stderr)
		}
		printReport(res)
	}
	if err != nil {
		return err
	}
	if res.Failed() {
		return fmt.Errorf("guest tests failed")
	}
	return nil
}

func printReport(res *vmimage.RunResult) {
	r := res.Report
	fmt.Printf("boot to init: %v (guest uptime %.2fs), total %v\n",
		res.BootToInit.Round(time.Millisecond), initUptime(res), res.Total.Round(time.Millisecond))
	if r.Init != nil {
		fmt.Printf("kernel %s, modules loaded in %.1f ms: %v\n", r.Init.Release, r.Init.ModulesMS, r.Init.Modules)
	}
	for _, t := range r.Results {
		status := "PASS"
		if !t.Passed() {
			status = fmt.Sprintf("FAIL (exit %d %s)", t.ExitCode, t.Error)
		}
		fmt.Printf("%s %s in %v\n", status, t.Name, t.Duration.Round(time.Millisecond))
		for k, v := range t.Facts() {
			fmt.Printf("    %s = %s\n", k, v)
		}
	}
}

func initUptime(res *vmimage.RunResult) float64 {
	if res.Report.Init == nil {
		return -1
	}
	return res.Report.Init.Uptime
}
