package main

import (
	"encoding/binary"
	"fmt"
	"strconv"
	"strings"

	"github.com/gohfi/gohfi/mem"
	"github.com/gohfi/gohfi/uapi"
	"golang.org/x/sys/unix"
)

// Expected receive: TID_UPDATE, TID_FREE and TID_INVAL_READ with struct
// hfi1_tid_info, whose tidlist is a user pointer to a __u32 array that the
// caller allocates (here in memory outside the Go heap, like every buffer
// hfictl gives the driver).

// tidRec remembers which buffer a programmed TID belongs to, so that
// tid-free BUF, send --tid BUF and recv can name it.
type tidRec struct {
	tid uint32
	buf string
	off int // byte offset of the TID's first page in the buffer
}

func (of *openFile) findTid(tid uint32) (tidRec, bool) {
	for _, r := range of.tids {
		if r.tid == tid {
			return r, true
		}
	}
	return tidRec{}, false
}

// forget drops freed TIDs from the records.
func (of *openFile) forget(tids []uint32) {
	gone := map[uint32]bool{}
	for _, t := range tids {
		gone[t] = true
	}
	kept := of.tids[:0]
	for _, r := range of.tids {
		if !gone[r.tid] {
			kept = append(kept, r)
		}
	}
	of.tids = kept
}

// tidArg reads a TID: a number, or BUF or BUF:I, the I-th TID programmed for
// buffer BUF, looked up in the file that owns context dst, else in any file.
func (s *session) tidArg(arg string, dst uint16) (uint32, error) {
	if v, err := strconv.ParseUint(arg, 0, 32); err == nil {
		return uint32(v), nil
	}
	name, idxs, _ := strings.Cut(arg, ":")
	idx := 0
	if idxs != "" {
		v, err := strconv.Atoi(idxs)
		if err != nil || v < 0 {
			return 0, usageErr("TID %q: want a number, BUF or BUF:I", arg)
		}
		idx = v
	}
	files := make([]*openFile, 0, len(s.files))
	for _, n := range sortedKeys(s.files) {
		of := s.files[n]
		if of.ci != nil && of.ci.Ctxt == dst {
			files = append([]*openFile{of}, files...)
		} else {
			files = append(files, of)
		}
	}
	for _, of := range files {
		i := 0
		for _, r := range of.tids {
			if r.buf != name {
				continue
			}
			if i == idx {
				return r.tid, nil
			}
			i++
		}
	}
	return 0, fmt.Errorf("TID %q: no TID %d programmed for buffer %q: %w", arg, idx, name, unix.ENOENT)
}

// tidList allocates room for n TIDs in user memory.
func tidList(n int) (*mem.Buffer, error) {
	return mem.Alloc(max(n, 1) * 4)
}

func readTids(b *mem.Buffer, n int) []uint32 {
	data := b.Bytes()
	tids := make([]uint32, n)
	for i := range tids {
		tids[i] = binary.LittleEndian.Uint32(data[4*i:])
	}
	return tids
}

// tidObjs decodes TIDs for printing: the entry relative to the context's
// expected base, the pages it covers, and the buffer it was programmed for.
func tidObjs(of *openFile, tids []uint32) []obj {
	out := make([]obj, len(tids))
	for i, t := range tids {
		o := obj{{"tid", hex(t)}}
		if entry, npages, ok := uapi.TidRcvEntry(t); ok {
			o.add("entry", entry).add("npages", npages)
		} else {
			o.add("entry", "invalid")
		}
		if r, ok := of.findTid(t); ok {
			o.add("buffer", r.buf).add("offset", r.off)
		}
		out[i] = o
	}
	return out
}

func cmdTidUpdate(s *session, args []string) (_ obj, err error) {
	fs := newFlags("tid-update")
	offArg := fs.String("offset", "0", "start in the buffer (the driver wants it page aligned)")
	lenArg := fs.String("len", "", "bytes (default: to the end of the buffer)")
	b, err := s.parseBuffer(fs, args)
	if err != nil {
		return nil, err
	}
	off, err := parseSize("offset", *offArg)
	if err != nil {
		return nil, err
	}
	length := b.b.Len() - off
	if *lenArg != "" {
		if length, err = parseSize("len", *lenArg); err != nil {
			return nil, err
		}
	}
	if off > b.b.Len() || length < 0 || length > 1<<32-1 {
		return nil, usageErr("offset %d, length %d: outside buffer %s of %d bytes", off, length, b.name, b.b.Len())
	}
	of, err := s.file()
	if err != nil {
		return nil, err
	}
	vaddr := uint64(b.b.Addr()) + uint64(off)
	// Every TID covers at least one page: room for one per page touched.
	ps := uint64(mem.PageSize())
	capacity := int((vaddr%ps + uint64(length) + ps - 1) / ps)
	list, err := tidList(capacity)
	if err != nil {
		return nil, err
	}
	defer cleanup(&err, "unmapping the TID list", list.Close)
	ti := uapi.Hfi1TidInfo{Vaddr: vaddr, Tidlist: uint64(list.Addr()), Tidcnt: uint32(capacity), Length: uint32(length)}
	if err := s.ioctl(of, uapi.HFI1_IOCTL_TID_UPDATE, &ti); err != nil {
		return nil, err
	}
	if int(ti.Tidcnt) > capacity {
		return nil, fmt.Errorf("TID_UPDATE reported %d TIDs, the list holds %d: %w", ti.Tidcnt, capacity, unix.EIO)
	}
	tids := readTids(list, int(ti.Tidcnt))
	// TIDs cover the programmed range in order; remember where each starts.
	at := off
	for _, t := range tids {
		of.tids = append(of.tids, tidRec{tid: t, buf: b.name, off: at})
		_, npages, _ := uapi.TidRcvEntry(t)
		at += int(npages) * int(ps)
	}
	return obj{
		{"buffer", b.name}, {"vaddr", hex(vaddr)}, {"requested", length}, {"length", ti.Length},
		{"partial", int(ti.Length) < length}, {"tidcnt", ti.Tidcnt}, {"tids", tidObjs(of, tids)},
	}, nil
}

func cmdTidFree(s *session, args []string) (_ obj, err error) {
	pos, err := parseArgs(newFlags("tid-free"), args, 1, -1)
	if err != nil {
		return nil, err
	}
	of, err := s.file()
	if err != nil {
		return nil, err
	}
	var tids []uint32
	for _, r := range of.tids {
		if len(pos) == 1 && r.buf == pos[0] {
			tids = append(tids, r.tid)
		}
	}
	if _, isBuf := s.bufs[pos[0]]; isBuf && len(tids) == 0 {
		return nil, fmt.Errorf("buffer %s has no TIDs programmed through file %s: %w", pos[0], of.name, unix.ENOENT)
	}
	if len(tids) == 0 {
		for _, a := range pos {
			for _, t := range strings.Split(a, ",") {
				v, err := parseUint("TID", t, 32)
				if err != nil {
					return nil, err
				}
				tids = append(tids, uint32(v))
			}
		}
	}
	list, err := tidList(len(tids))
	if err != nil {
		return nil, err
	}
	defer cleanup(&err, "unmapping the TID list", list.Close)
	data := list.Bytes()
	for i, t := range tids {
		binary.LittleEndian.PutUint32(data[4*i:], t)
	}
	ti := uapi.Hfi1TidInfo{Tidlist: uint64(list.Addr()), Tidcnt: uint32(len(tids))}
	if err := s.ioctl(of, uapi.HFI1_IOCTL_TID_FREE, &ti); err != nil {
		// A bad TID stops TID_FREE after the ones before it were freed;
		// the driver writes back how many.
		var back uapi.Hfi1TidInfo
		if back.UnmarshalBytes(s.arg.Bytes()) == nil && int(back.Tidcnt) < len(tids) {
			of.forget(tids[:back.Tidcnt])
			return nil, fmt.Errorf("%w (%d of %d TIDs freed)", err, back.Tidcnt, len(tids))
		}
		return nil, err
	}
	o := obj{{"tidcnt", ti.Tidcnt}, {"tids", tidObjs(of, tids)}}
	of.forget(tids)
	return o, nil
}

func cmdTidInvalRead(s *session, args []string) (_ obj, err error) {
	fs := newFlags("tid-inval-read")
	maxArg := fs.Int("max", 0, "room in the TID list (default: the context's rcvtids)")
	of, err := s.parseFile(fs, args)
	if err != nil {
		return nil, err
	}
	capacity := *maxArg
	if capacity <= 0 {
		capacity = 2048
		if of.ci != nil {
			capacity = int(of.ci.Rcvtids)
		}
	}
	list, err := tidList(capacity)
	if err != nil {
		return nil, err
	}
	defer cleanup(&err, "unmapping the TID list", list.Close)
	ti := uapi.Hfi1TidInfo{Tidlist: uint64(list.Addr()), Tidcnt: uint32(capacity)}
	if err := s.ioctl(of, uapi.HFI1_IOCTL_TID_INVAL_READ, &ti); err != nil {
		return nil, err
	}
	if int(ti.Tidcnt) > capacity {
		return nil, fmt.Errorf("TID_INVAL_READ reported %d TIDs, the list holds %d: %w", ti.Tidcnt, capacity, unix.EIO)
	}
	return obj{{"tidcnt", ti.Tidcnt}, {"tids", tidObjs(of, readTids(list, int(ti.Tidcnt)))}}, nil
}
