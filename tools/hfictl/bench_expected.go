package main

// hfictl bench expected: the expected-receive path of the perftest-style
// bench (bench_perf.go). Each lane is a sender and a receiver context of
// one device; the receiver's destination slots are registered through its
// TID cache (package tidcache) before the round, as PSM registers a
// receive buffer; a message is one GOHFI_IOCTL_SEND of an expected packet
// per TID of its slot, and it has arrived when the receiver has read the
// header queue entry of each (tagged with the message's number). Packets
// of at least expSDMAMin bytes are SDMA sends (GOHFI_SEND_FLAG_SDMA), read
// by the device from the source buffer, unless --sdma=false: a message has
// left its source once its entries arrived, and sources are not written
// during a round.

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/mem"
	"github.com/gohfi/gohfi/rcvarray"
	"github.com/gohfi/gohfi/tidcache"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// expSDMAMin is the smallest packet the bench sends with SDMA: below it the
// copy into the send buffer costs less than the cache lookup and the
// completion interrupt.
const expSDMAMin = 64 << 10

type expectedEngine struct {
	ctx   context.Context
	sdma  bool // SDMA sends of packets >= expSDMAMin
	lanes []*expLane
	r     *perfRegion
	slots [][]*tidcache.Entry // destination slot i: its windows, in lane i%len(lanes)'s cache

	events bool // wait in File.Poll for the header queue (perftest -e), else busy poll
}

// expLane is a sender and a receiver context.
type expLane struct {
	tx, rx   *driver.File
	rxCtxt   uint16
	rcvtids  int
	tidPages int // pages one TID may cover (QUERY_DEVICE max_tid_pages)
	rhq      []byte
	entsize  int
	cnt      uint64
	head     uint64
	seq      uint32
	cache    *tidcache.Cache
	inflight []uint64 // tags of packets sent and not yet read, oldest first
}

func newExpectedEngine(ctx context.Context, dev *driver.Device, lanes int, sdma bool) (e *expectedEngine, err error) {
	e = &expectedEngine{ctx: ctx, sdma: sdma}
	defer func() {
		if err != nil {
			err = errors.Join(err, e.close())
		}
	}()
	for range lanes {
		l := &expLane{seq: 1}
		e.lanes = append(e.lanes, l)
		for _, f := range []**driver.File{&l.tx, &l.rx} {
			if *f, err = dev.Open(); err != nil {
				return nil, err
			}
			if err := hfiuser.AssignCtxt(*f); err != nil {
				return nil, fmt.Errorf("ASSIGN_CTXT: %w", err)
			}
		}
		ci, err := hfiuser.CtxtInfo(l.rx)
		if err != nil {
			return nil, err
		}
		bi, err := hfiuser.UserInfo(l.rx)
		if err != nil {
			return nil, err
		}
		attr, err := hfiuser.QueryDevice(l.rx)
		if err != nil {
			return nil, fmt.Errorf("QUERY_DEVICE: %w", err)
		}
		l.rxCtxt, l.rcvtids, l.entsize, l.cnt = ci.Ctxt, int(ci.Rcvtids), int(ci.RcvhdrqEntsize), uint64(ci.RcvhdrqCnt)
		l.tidPages = int(attr.MaxTidPages)
		if l.rhq, err = l.rx.Mmap(bi.RcvhdrBufbase, int(l.cnt)*l.entsize, unix.PROT_READ); err != nil {
			return nil, fmt.Errorf("map header queue: %w", err)
		}
		if l.cache, err = tidcache.New(l.rx, tidcache.Options{}); err != nil {
			return nil, err
		}
	}
	return e, nil
}

// close frees the caches' TIDs and closes the files, releasing the
// contexts.
func (e *expectedEngine) close() error {
	var errs []error
	for _, l := range e.lanes {
		if l.cache != nil {
			errs = append(errs, l.cache.Close())
		}
		if l.rhq != nil {
			if err := unix.Munmap(l.rhq); err != nil {
				errs = append(errs, fmt.Errorf("unmapping a header queue: %w", err))
			}
		}
		errs = append(errs, closeBenchFiles(l.tx, l.rx))
	}
	return errors.Join(errs...)
}

// stride: TIDs map whole pages.
func (e *expectedEngine) stride(size int) int {
	p := mem.PageSize()
	return (size + p - 1) / p * p
}

// maxSlots keeps the TIDs of a lane's slots within its context's RcvArray
// entries (one slot per lane at least).
func (e *expectedEngine) maxSlots(stride int) int {
	l := e.lanes[0]
	return len(e.lanes) * max(1, l.rcvtids/l.slotTIDs(stride))
}

// slotTIDs is how many RcvArray entries a slot of stride bytes takes:
// prepare registers it a window at a time, and the driver cuts each
// TID_UPDATE into page sets of at most tidPages pages
// (rcvarray.SplitPages), a TID each.
func (l *expLane) slotTIDs(stride int) int {
	n := 0
	for off := 0; off < stride; off += l.window() {
		n += len(rcvarray.SplitPages(min(l.window(), stride-off)/mem.PageSize(), l.tidPages))
	}
	return max(1, n)
}

// window is the largest range one TID_UPDATE may register: the context's
// RcvArray entries in pages (hfi1 refuses more).
func (l *expLane) window() int { return l.rcvtids * mem.PageSize() }

func (e *expectedEngine) prepare(r *perfRegion) error {
	e.r = r
	for i := range r.slots {
		l := e.lanes[i%len(e.lanes)]
		var ents []*tidcache.Entry
		for off := 0; off < r.stride; off += l.window() {
			ent, err := l.cache.Acquire(r.dstAddr(i)+uintptr(off), min(l.window(), r.stride-off))
			if err != nil {
				e.slots = append(e.slots, ents)
				return errors.Join(fmt.Errorf("registering slot %d: %w", i, err), e.release())
			}
			ents = append(ents, ent)
		}
		e.slots = append(e.slots, ents)
	}
	return nil
}

// release returns the slots' entries and frees their TIDs (TID_FREE).
func (e *expectedEngine) release() error {
	var errs []error
	for i, ents := range e.slots {
		for _, ent := range ents {
			errs = append(errs, e.lanes[i%len(e.lanes)].cache.Release(ent))
		}
	}
	for _, l := range e.lanes {
		errs = append(errs, l.cache.Flush())
	}
	e.slots, e.r = nil, nil
	return errors.Join(errs...)
}

func (e *expectedEngine) setEvents(on bool) { e.events = on }

func (e *expectedEngine) round(n, depth, _ int, lat samples) (time.Duration, error) {
	nl := min(len(e.lanes), n)
	start := time.Now()
	if lat != nil {
		// One at a time, each on the lane whose receiver registered
		// its slot.
		for i := range n {
			if err := e.lane(e.lanes[i%nl], i, nl, i+1, 1, lat); err != nil {
				return 0, err
			}
		}
		return time.Since(start), nil
	}
	errs := make([]error, nl)
	var wg sync.WaitGroup
	for li := range nl {
		wg.Go(func() { errs[li] = e.lane(e.lanes[li], li, nl, n, depth, nil) })
	}
	wg.Wait()
	d := time.Since(start)
	return d, errors.Join(errs...)
}

// lane sends messages first, first+step, ... below n on lane l (whose
// receiver registered their slots), at most depth packets unread (and
// fewer than the header queue holds); with lat, each message is timed
// from its first send to its last header queue entry.
func (e *expectedEngine) lane(l *expLane, first, step, n, depth int, lat samples) error {
	depth = min(depth, int(l.cnt)-1)
	for i := first; i < n; i += step {
		t0 := time.Now()
		src := e.r.srcBytes(i)
		off := 0
		for _, ent := range e.slots[i] {
			for _, tid := range ent.TIDs {
				if off >= len(src) {
					break
				}
				k := min(int(uapi.ExpTidGet(tid, uapi.EXP_TID_LEN))*mem.PageSize(), len(src)-off)
				for len(l.inflight) >= depth {
					if err := e.read(l); err != nil {
						return err
					}
				}
				m := uapi.GohfiSend{Opcode: uapi.GOHFI_SEND_EXPECTED, DstCtxt: l.rxCtxt, TID: tid, Tag: uint64(i)}
				if e.sdma && k >= expSDMAMin {
					m.Flags |= uapi.GOHFI_SEND_FLAG_SDMA
				}
				if err := hfiuser.Send(l.tx, m, src[off:off+k]); err != nil {
					return fmt.Errorf("message %d: send: %w", i, err)
				}
				l.inflight = append(l.inflight, uint64(i))
				off += k
			}
		}
		if off < len(src) {
			return fmt.Errorf("message %d: TIDs cover %d of %d bytes: %w", i, off, len(src), unix.EIO)
		}
		if lat != nil {
			for len(l.inflight) > 0 {
				if err := e.read(l); err != nil {
					return err
				}
			}
			lat[i] = time.Since(t0)
		}
	}
	for len(l.inflight) > 0 {
		if err := e.read(l); err != nil {
			return err
		}
	}
	return nil
}

// read consumes the header queue entries that have arrived (waiting in
// File.Poll for one when none has): each must be an expected packet
// without error (a packet the device refused arrives as an error entry),
// tagged with the oldest message in flight; then it writes RcvHdrHead
// once.
func (e *expectedEngine) read(l *expLane) error {
	got := 0
	var spin spinner
	for len(l.inflight) > 0 {
		var h uapi.GohfiRHQEntry
		if err := h.UnmarshalBytes(l.rhq[int(l.head)*l.entsize:]); err != nil {
			return err
		}
		if h.Seq != l.seq {
			if got > 0 {
				break
			}
			if !e.events {
				if err := spin.idle(e.ctx); err != nil {
					return fmt.Errorf("polling the header queue, message %d in flight: %w", l.inflight[0], err)
				}
				continue
			}
			ctx, cancel := waitCtx(e.ctx)
			_, err := l.rx.Poll(ctx)
			cancel()
			if err != nil {
				if errors.Is(err, context.DeadlineExceeded) {
					err = unix.ETIMEDOUT
				}
				return fmt.Errorf("waiting for the header queue, message %d in flight: %w", l.inflight[0], err)
			}
			continue
		}
		// The device writes seq last: the other fields, read after it.
		if err := h.UnmarshalBytes(l.rhq[int(l.head)*l.entsize:]); err != nil {
			return err
		}
		if h.Type != uapi.GOHFI_RHF_EXPECTED || h.Err != 0 || h.Tag != l.inflight[0] {
			return fmt.Errorf("header entry %+v, want an expected packet of message %d: %w", h, l.inflight[0], unix.EIO)
		}
		l.inflight = l.inflight[1:]
		l.head = (l.head + 1) % l.cnt
		if l.seq++; l.seq == 0 {
			l.seq = 1
		}
		got++
	}
	if got == 0 {
		return nil
	}
	return hfiuser.SetRcvHdrHead(l.rx, l.head)
}
