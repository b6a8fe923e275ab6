// Command hfisim serves one emulated HFI (package hfisim) over vfio-user on a
// unix socket, as a device process for the driver (`hfictl --device
// vfio-user:PATH`, attach.Open) or for QEMU's vfio-user-pci:
//
//	hfisim --socket PATH [--contexts N] [--rcvarray N] [--max-tid-pages N] [--mtt N] [--rhq-max N] [--port udp:ADDR[:PORT]]
//
// With --port the device has a network port: RoCEv2 over UDP from ADDR
// (port 4791 by default) to the peer devices its driver names
// (docs/fabric.md).
//
// It serves one client at a time until SIGINT or SIGTERM, then stops, closes
// the device and removes the socket. It logs to stderr.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"

	"github.com/gohfi/gohfi/hfisim"
	"github.com/gohfi/gohfi/vfio/vfiouser"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stderr))
}

func run(ctx context.Context, args []string, stderr io.Writer) (code int) {
	logger := log.New(stderr, "hfisim: ", log.LstdFlags|log.Lmicroseconds)
	fs := flag.NewFlagSet("hfisim", flag.ContinueOnError)
	fs.SetOutput(stderr)
	def := hfisim.DefaultConfig()
	socket := fs.String("socket", "", "unix socket path to listen on (required)")
	cfg := def
	fs.IntVar(&cfg.NumContexts, "contexts", def.NumContexts, "receive contexts")
	fs.IntVar(&cfg.RcvArrayPerCtxt, "rcvarray", def.RcvArrayPerCtxt, "RcvArray entries per context (multiple of 8)")
	fs.IntVar(&cfg.MaxTIDPages, "max-tid-pages", def.MaxTIDPages, "pages one RcvArray entry may cover (power of two)")
	fs.IntVar(&cfg.MTTEntries, "mtt", def.MTTEntries, "memory translation table entries")
	fs.IntVar(&cfg.RHQMaxEntries, "rhq-max", def.RHQMaxEntries, "largest receive header queue")
	port := fs.String("port", "", "network port: udp:ADDR[:PORT] (RoCEv2, port 4791 by default); none by default")
	profile := fs.String("cpuprofile", "", "write a CPU profile of the process, until it stops, to FILE (go tool pprof)")
	noRing := fs.Bool("no-dma-ring", false, "do not take device rings: pinned anonymous memory over DMA_READ/DMA_WRITE (docs/hfisim.md, \"DMA mappings\")")
	fs.Usage = func() {
		_, _ = fmt.Fprintln(stderr, "usage: hfisim --socket PATH [flags]") // stderr is where errors would go
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *socket == "" || fs.NArg() != 0 {
		fs.Usage()
		return 2
	}
	if *port != "" {
		p, err := hfisim.ParsePort(*port)
		if err != nil {
			logger.Print(err)
			return 2
		}
		cfg.Port = p
	}
	if *profile != "" {
		f, err := os.Create(*profile)
		if err != nil {
			logger.Print(err)
			return 1
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			logger.Print(errors.Join(err, f.Close()))
			return 1
		}
		defer func() {
			pprof.StopCPUProfile()
			if err := f.Close(); err != nil {
				logger.Printf("writing the CPU profile: %v", err)
				code = 1
			}
		}()
	}
	dev, err := hfisim.New(cfg)
	if err != nil {
		logger.Print(err)
		return 1
	}
	defer func() {
		if err := dev.Close(); err != nil {
			logger.Printf("close device: %v", err)
			if code == 0 {
				code = 1
			}
		}
	}()
	// Protocol violations and client errors go to the log: a device
	// process has nobody else to tell.
	opts := []vfiouser.Option{vfiouser.WithLogger(logger.Printf)}
	if *noRing {
		opts = append(opts, vfiouser.WithoutDMARing())
	}
	logger.Printf("serving %d contexts, %d RcvArray entries each, on %s", cfg.NumContexts, cfg.RcvArrayPerCtxt, *socket)
	if a := dev.PortAddr(); a.IsValid() {
		logger.Printf("network port udp:%v", a)
	}
	err = hfisim.ListenAndServe(ctx, dev, *socket, opts...)
	if err != nil && !errors.Is(err, context.Canceled) {
		logger.Print(err)
		return 1
	}
	logger.Print("stopped")
	return 0
}
