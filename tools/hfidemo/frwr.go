package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/gohfi/gohfi/attach"
	"github.com/gohfi/gohfi/chip"
	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/mem"
	"github.com/gohfi/gohfi/uapi"
	"github.com/gohfi/gohfi/ulp/frwr"
)

// The demo's fast-registration part: the model ULP of ulp/frwr (a server
// in the shape of xprtrdma's frwr_ops, exposing a pinned pool one request
// at a time) serves the same requests once registering each request's
// pages with REG_MR/DEREG_MR ioctls and once binding them to fast-reg MRs
// through the send queue under a fresh key variant; then a client writes
// through the rkey an earlier request was given and is refused.

// frwrConfig sizes the fast-registration part.
type frwrConfig struct {
	requests int // per mode: puts and gets alternating, a multiple of 2*block
	size     int // bytes per request
	block    int // requests of one mode before the other mode's turn
	pool     int // each server's pool, a multiple of 64 KiB (RLIMIT_MEMLOCK holds both)
}

var defaultFRWRConfig = frwrConfig{requests: 1200, size: 16 << 10, block: 100, pool: 1 << 20}

// frwrPair is a server and a connected client of one mode, each on a file
// of its own.
type frwrPair struct {
	fastReg bool
	files   []*driver.File
	s       *frwr.Server
	c       *frwr.Client
	serving bool
	elapsed time.Duration
	done    int

	firstRkey uint32 // the rkey the first put was given, and its iova
	firstIOVA uint64
}

// open opens the pair's files into p (close releases them, also
// after a failure) and starts the server.
func (p *frwrPair) open(a *attach.Attached, pool *mem.Buffer, size int) error {
	for range 2 {
		f, err := a.Device.Open()
		if err != nil {
			return err
		}
		p.files = append(p.files, f)
		if err := hfiuser.AssignCtxt(f); err != nil {
			return fmt.Errorf("ASSIGN_CTXT: %w", err)
		}
	}
	var err error
	if p.s, err = frwr.NewServer(p.files[0], pool, p.fastReg, 8); err != nil {
		return err
	}
	if p.c, err = frwr.NewClient(p.files[1], size); err != nil {
		return err
	}
	if err := p.c.Connect(p.s.QPNum()); err != nil {
		return err
	}
	if err := p.s.Start(p.c.QPNum()); err != nil {
		return err
	}
	p.serving = true
	return nil
}

// stop ends the server loop.
func (p *frwrPair) stop() error {
	if !p.serving {
		return nil
	}
	p.serving = false
	return p.s.Stop()
}

// close stops the server and closes the files: the driver destroys the
// QPs and deregisters the MRs (before the pool is unmapped).
func (p *frwrPair) close() error {
	errs := []error{p.stop()}
	for _, f := range p.files {
		errs = append(errs, f.Close())
	}
	return errors.Join(errs...)
}

// run serves n requests, a put then a get of the same bytes at the next
// pool offset, and checks that the get returns what the put wrote.
func (p *frwrPair) run(n, size int, pool *mem.Buffer) error {
	buf := p.c.Buf()[:size]
	slots := pool.Len() / (64 << 10)
	t0 := time.Now()
	for i := 0; i < n; i += 2 {
		k := p.done + i
		off := uint64(k/2%slots) * (64 << 10)
		for j := range buf {
			buf[j] = byte(k + j*7)
		}
		if err := p.c.Put(off, size, p.fastReg); err != nil {
			return fmt.Errorf("put %d: %w", k, err)
		}
		if k == 0 {
			p.firstRkey, p.firstIOVA = p.c.LastRkey, p.c.LastIOVA
		}
		clear(buf)
		if err := p.c.Get(off, size); err != nil {
			return fmt.Errorf("get %d: %w", k+1, err)
		}
		for j := range buf {
			if buf[j] != byte(k+j*7) {
				return fmt.Errorf("get %d: byte %d is %#x, want %#x", k+1, j, buf[j], byte(k+j*7))
			}
		}
	}
	p.elapsed += time.Since(t0)
	p.done += n
	return nil
}

func (p *frwrPair) rate() float64 { return float64(p.done) / p.elapsed.Seconds() }

var vendorErrWords = map[uint32]string{
	chip.VendorErrKey: "no such key, or another variant", chip.VendorErrState: "the region is not valid",
}

// runFRWR is the fast-registration part on a device of its own (spec as
// for run); it prints to w.
func runFRWR(w io.Writer, spec string, cfg frwrConfig) (err error) {
	if cfg.requests%(2*cfg.block) != 0 || cfg.block%2 != 0 {
		return fmt.Errorf("frwr part: %d requests in blocks of %d", cfg.requests, cfg.block)
	}
	o := attach.DefaultOptions()
	o.Sim.NumContexts = 4
	a, err := attach.Open(context.Background(), spec, o)
	if err != nil {
		return err
	}
	defer cleanup(&err, "closing the device", a.Close)
	var pools [2]*mem.Buffer
	for i := range pools {
		if pools[i], err = mem.Alloc(cfg.pool); err != nil {
			return err
		}
		defer cleanup(&err, "unmapping a pool", pools[i].Close)
	}
	reg, fast := &frwrPair{}, &frwrPair{fastReg: true}
	defer cleanup(&err, "closing the REG_MR pair", reg.close)
	defer cleanup(&err, "closing the fast-reg pair", fast.close)
	if err := reg.open(a, pools[0], cfg.size); err != nil {
		return fmt.Errorf("frwr part, REG_MR server: %w", err)
	}
	if err := fast.open(a, pools[1], cfg.size); err != nil {
		return fmt.Errorf("frwr part, fast-reg server: %w", err)
	}
	// The modes take turns, a block at a time, so that a burst of load on
	// the machine falls on both.
	for fast.done < cfg.requests {
		for _, p := range []*frwrPair{reg, fast} {
			if err := p.run(cfg.block, cfg.size, pools[btoi(p.fastReg)]); err != nil {
				return err
			}
		}
	}
	if err := reg.stop(); err != nil {
		return err
	}
	rs := reg.s.Stats()
	// The lines are for people reading the demo: nothing to do if a write
	// fails.
	_, _ = fmt.Fprintf(w, "FRWR        ulp/frwr, xprtrdma's frwr_ops in small: %d requests per mode, %d KiB puts (client RDMA WRITE) and gets (server SEND), data verified\n",
		cfg.requests, cfg.size>>10)
	_, _ = fmt.Fprintf(w, "FRWR REG_MR %8.0f requests/s, each request's pages registered and deregistered by ioctl (%d REG_MR)\n", // for people, see above
		reg.rate(), rs.Registrations)

	// The last get's LOCAL_INV completes after the client has its data:
	// let the server see it.
	fs := fast.s.Stats()
	for deadline := time.Now().Add(2 * time.Second); fs.RemoteInvals+fs.LocalInvals < fast.done && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
		fs = fast.s.Stats()
	}
	// The stale rkey: bound for the first put, invalidated by its
	// SEND_WITH_INV, the MR bound again since under other variants.
	stale := fast.firstRkey
	wc, err := fast.c.WriteStale(stale, fast.firstIOVA)
	if err != nil {
		return err
	}
	if err := fast.stop(); err != nil {
		return err
	}
	_, _ = fmt.Fprintf(w, "FRWR fastreg%8.0f requests/s, pages bound in the send queue: FAST_REG_MR posted with the reply or data, %d SEND_WITH_INV, %d LOCAL_INV\n", // for people, see above
		fast.rate(), fs.RemoteInvals, fs.LocalInvals)
	_, _ = fmt.Fprintf(w, "FRWR ratio  fast registration %.2fx the requests/s of REG_MR/DEREG_MR\n", fast.rate()/reg.rate()) // for people, see above
	if wc.Status != uapi.GOHFI_WC_REM_ACCESS_ERR {
		return fmt.Errorf("WRITE through the stale rkey %#x: completion status %d, vendor error %d; want REM_ACCESS_ERR", stale, wc.Status, wc.VendorErr)
	}
	_, _ = fmt.Fprintf(w, "FRWR stale  WRITE through rkey %#x of the first request: REM_ACCESS_ERR (vendor error %d: %s)\n", // for people, see above
		stale, wc.VendorErr, vendorErrWords[wc.VendorErr])
	return nil
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}
