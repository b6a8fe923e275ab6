package main

import (
	"flag"
	"strings"

	"github.com/gohfi/gohfi/driver"
	"github.com/gohfi/gohfi/hfiuser"
	"github.com/gohfi/gohfi/uapi"
)

// Fast registration by hand: alloc-mr (ALLOC_MR), the FAST_REG_MR work
// request that binds such an MR to pages of registered buffers under a new
// key variant, and the invalidating work requests (LOCAL_INV,
// SEND_WITH_INV, RDMA_READ_WITH_INV), all posted through post-send.

// fastReg is what an MR record of alloc-mr adds: the driver's MR (hfictl
// runs in the driver's process, so mr show reads the state the driver
// sees in the MPT and the key of the last REG_MR posted) and the last
// binding posted.
type fastReg struct {
	mr       *driver.FastRegMR
	maxNumSg uint32
	index    uint32 // the MR's MPT index: the key's upper 24 bits
	bound    bool   // a FAST_REG_MR was posted: r's iova, length, access are its
	shift    uint32
	pages    []hex // user virtual addresses of the last binding
}

func cmdAllocMR(s *session, args []string) (obj, error) {
	fs := newFlags("alloc-mr")
	maxNumSg := fs.Uint("max-num-sg", 16, "pages the MR can be bound to at most")
	pos, err := parseNew(fs, args, 1, s.verbs.mrs, "MR")
	if err != nil {
		return nil, err
	}
	of, err := s.verbsFile()
	if err != nil {
		return nil, err
	}
	a, err := hfiuser.AllocMR(of.f, uint32(*maxNumSg))
	if err != nil {
		return nil, err
	}
	pd, err := of.f.PD()
	if err != nil {
		return nil, err
	}
	fr, err := pd.FastRegMR(a.Handle)
	if err != nil {
		return nil, err
	}
	m := &mrRec{name: pos[0], of: of, r: uapi.GohfiRegMR{Handle: a.Handle, Lkey: a.Lkey, Rkey: a.Rkey},
		fr: &fastReg{mr: fr, maxNumSg: a.MaxNumSg, index: a.Lkey >> 8}}
	s.verbs.mrs[m.name] = m
	return m.describe()
}

// describeFastReg shows a fast-reg MR: its state and key as the driver
// knows them (VALID or FREE in the MPT; the key of the last REG_MR posted)
// and the last binding posted.
func (m *mrRec) describeFastReg(st uapi.GohfiMRStats) obj {
	state := "FREE"
	if m.fr.mr.Valid() {
		state = "VALID"
	}
	key := m.fr.mr.Lkey()
	o := obj{{"name", m.name}, {"file", m.of.name}, {"kind", "fast_reg"}, {"handle", m.r.Handle},
		{"state", state}, {"lkey", hex(key)}, {"rkey", hex(key)}, {"key_variant", key & 0xff},
		{"max_num_sg", m.fr.maxNumSg}, {"pages_pinned", st.PagesPinned}}
	if m.fr.bound {
		o = append(o, obj{{"iova", hex(m.r.Iova)}, {"length", m.r.Length},
			{"access", bitNames(uint64(m.r.AccessFlags), accessNames)}, {"page_shift", m.fr.shift},
			{"pages", m.fr.pages}}...)
	}
	return o
}

// fastRegFlags are post-send's flags for the fast-registration opcodes.
type fastRegFlags struct {
	mr, pages, iova, length, variant, access, invKey *string
	pageShift                                        *uint
}

func addFastRegFlags(fs *flag.FlagSet) *fastRegFlags {
	return &fastRegFlags{
		mr:        fs.String("mr", "", "fast-reg: the MR to bind (an alloc-mr MR)"),
		pages:     fs.String("pages", "", "fast-reg: BUF[:OFF][@MR],... the page list, in order"),
		pageShift: fs.Uint("page-shift", 12, "fast-reg: log2 of the page size"),
		iova:      fs.String("iova", "", "fast-reg: the address the peer uses (default: the first page's)"),
		length:    fs.String("length", "", "fast-reg: bytes bound (default: the pages from the iova's offset)"),
		variant:   fs.String("key-variant", "", "fast-reg: the new key's variant byte (default: the next one)"),
		access:    fs.String("access", "local_write", "fast-reg: IB_ACCESS_* names joined by , or a number"),
		invKey:    fs.String("inv-key", "", "local-inv, send-inv, read-inv: the key to invalidate, a number or an MR's name"),
	}
}

// fastRegOnly are the flags only a FAST_REG_MR takes.
var fastRegOnly = []string{"mr", "pages", "page-shift", "iova", "length", "key-variant", "access"}

// pageList reads --pages BUF[:OFF][@MR],...: the user virtual address of
// each page. An @MR names the registered MR the page belongs to, and the
// page must then lie in that MR's pinned pages (leave it out to let the
// driver alone judge the page).
func (s *session) pageList(arg string, pgsz uint64) ([]uint64, error) {
	if arg == "" {
		return nil, usageErr("fast-reg needs --pages BUF[:OFF][@MR],...")
	}
	var pages []uint64
	for _, spec := range strings.Split(arg, ",") {
		bufArg, mrName, withMR := strings.Cut(spec, "@")
		b, off, _, err := s.bufSpan(bufArg)
		if err != nil {
			return nil, err
		}
		va := uint64(b.b.Addr()) + uint64(off)
		if withMR {
			m, err := named(s.verbs.mrs, "MR", mrName)
			if err != nil {
				return nil, err
			}
			first, end := m.r.Addr&^4095, (m.r.Addr+m.r.Length+4095)&^4095
			if m.fr != nil || va < first || va+pgsz > end {
				return nil, usageErr("--pages %s: the %d-byte page at %#x is not inside the pinned pages of MR %s", spec, pgsz, va, mrName)
			}
		}
		pages = append(pages, va)
	}
	return pages, nil
}

// fastRegWR fills wr in as the FAST_REG_MR the flags describe, adds the
// binding to o and returns what to record once the post succeeded.
func (s *session) fastRegWR(f *fastRegFlags, wr *hfiuser.SendWR, o *obj) (func(), error) {
	if *f.mr == "" {
		return nil, usageErr("fast-reg needs --mr MR (an alloc-mr MR)")
	}
	m, err := named(s.verbs.mrs, "MR", *f.mr)
	if err != nil {
		return nil, err
	}
	if m.fr == nil {
		return nil, usageErr("--mr %s: not a fast-reg MR (alloc-mr makes one)", m.name)
	}
	shift := uint32(*f.pageShift)
	if shift > 63 {
		return nil, usageErr("--page-shift %d", shift)
	}
	pgsz := uint64(1) << shift
	pages, err := s.pageList(*f.pages, pgsz)
	if err != nil {
		return nil, err
	}
	iova := pages[0]
	if *f.iova != "" {
		if iova, err = parseUint("iova", *f.iova, 64); err != nil {
			return nil, err
		}
	}
	length := uint64(len(pages))*pgsz - iova&(pgsz-1)
	if *f.length != "" {
		n, err := parseSize("length", *f.length)
		if err != nil {
			return nil, err
		}
		length = uint64(n)
	}
	variant := driver.IncRkey(m.fr.mr.Lkey()) & 0xff
	if *f.variant != "" {
		v, err := parseUint("key-variant", *f.variant, 8)
		if err != nil {
			return nil, err
		}
		variant = uint32(v)
	}
	access, err := parseAccess(*f.access)
	if err != nil {
		return nil, err
	}
	key := m.fr.index<<8 | variant
	*wr = hfiuser.FastRegWR(wr.WrID, wr.SendFlags, m.r.Handle, key, access, pages, shift, iova, length)
	shown := make([]hex, len(pages))
	for i, p := range pages {
		shown[i] = hex(p)
	}
	o.add("mr", m.name).add("key", hex(key)).add("key_variant", variant).add("iova", hex(iova)).
		add("length", length).add("page_shift", shift).add("access", bitNames(uint64(access), accessNames)).
		add("pages", shown)
	return func() {
		// As the driver: the key is the MR's from the post on (a device
		// refusal leaves the MR as it was, which mr show's state tells).
		m.r.Lkey, m.r.Rkey, m.r.Iova, m.r.Length, m.r.AccessFlags = key, key, iova, length, access
		m.fr.bound, m.fr.shift, m.fr.pages = true, shift, shown
	}, nil
}
