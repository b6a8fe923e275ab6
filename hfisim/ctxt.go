package hfisim

import "github.com/gohfi/gohfi/chip"

// ctxtState is one receive/send context's registers and ring indices.
type ctxtState struct {
	control                        uint64
	status                         uint64
	rhqBase, rhqEntries            uint64
	rhqHead, rhqTail               uint64
	eagerBase, eagerSize, eagerCnt uint64
	sqBase, sqEntries              uint64
	sqHead, sqTail, sqHeadAddr     uint64
	errCnt                         uint64
	urgent                         uint64 // urgent packets delivered
	seq                            uint32 // sequence number of the last RHQ entry written

	// The send queue's doorbell record (chip.CtxtDBRecAddr, dbrec.go):
	// dbAddr as written, latched at enable; recSQ the index last read
	// from it; recAwake whether the engine cleared its notify flag since
	// it last set it; epoch counts enables and disables, so an index read
	// across one is dropped.
	dbAddr, recSQ, epoch uint64
	recAwake             bool

	// rhqHeadAddr is the RHQ's consumer-index record (chip.CtxtRHQHeadAddr),
	// read when a packet finds the RHQ full; armSeen the value of its arm
	// word the device last raised the receive interrupt for.
	rhqHeadAddr, armSeen uint64

	// intrIdle: a descriptor with chip.DescFlagIntrIdle was consumed and
	// its interrupt waits for the send queue to run empty.
	intrIdle bool
}

func (c *ctxtState) enabled() bool { return c.status&chip.CtxtStatusEnabled != 0 }

// geometry is the field of a ring geometry register: read back as written,
// writable only while the context is disabled. nil for another register.
func (c *ctxtState) geometry(r uint64) *uint64 {
	switch r {
	case chip.CtxtRHQBase:
		return &c.rhqBase
	case chip.CtxtRHQEntries:
		return &c.rhqEntries
	case chip.CtxtEagerBase:
		return &c.eagerBase
	case chip.CtxtEagerSize:
		return &c.eagerSize
	case chip.CtxtEagerCount:
		return &c.eagerCnt
	case chip.CtxtSQBase:
		return &c.sqBase
	case chip.CtxtSQEntries:
		return &c.sqEntries
	case chip.CtxtSQHeadAddr:
		return &c.sqHeadAddr
	case chip.CtxtDBRecAddr:
		return &c.dbAddr
	case chip.CtxtRHQHeadAddr:
		return &c.rhqHeadAddr
	}
	return nil
}

func (c *ctxtState) read(r uint64, n int, cfg Config) uint64 {
	if p := c.geometry(r); p != nil {
		return *p
	}
	switch r {
	case chip.CtxtControl:
		return c.control
	case chip.CtxtRHQHead:
		return c.rhqHead
	case chip.CtxtRHQTail:
		return c.rhqTail
	case chip.CtxtSQTail:
		return c.sqTail
	case chip.CtxtSQHead:
		return c.sqHead
	case chip.CtxtExpBase:
		return uint64(n * cfg.RcvArrayPerCtxt)
	case chip.CtxtExpCount:
		return uint64(cfg.RcvArrayPerCtxt)
	case chip.CtxtStatus:
		return c.status
	case chip.CtxtErrCnt:
		return c.errCnt
	case chip.CtxtUrgentCnt:
		return c.urgent
	}
	return 0
}

func isPow2(v uint64) bool { return v != 0 && v&(v-1) == 0 }

// write updates a context register and reports whether the send engine has
// new work. Ring geometry can change only while the context is disabled, as
// on hardware where the rings are latched at enable.
func (c *ctxtState) write(r, v uint64, cfg Config) (kick bool) {
	if p := c.geometry(r); p != nil {
		if c.enabled() {
			c.errCnt++
		} else {
			*p = v
		}
		return false
	}
	switch r {
	case chip.CtxtControl:
		c.control = v & (chip.CtxtCtrlEnable | chip.CtxtCtrlIntEnable | chip.CtxtCtrlTIDFlowDisable | chip.CtxtCtrlIntArm)
		if v&chip.CtxtCtrlEnable == 0 {
			if c.status&(chip.CtxtStatusEnabled|chip.CtxtStatusHalted) != 0 {
				c.epoch++
			}
			c.status &^= chip.CtxtStatusEnabled | chip.CtxtStatusHalted
			c.rhqHead, c.rhqTail, c.sqHead, c.sqTail, c.seq, c.urgent = 0, 0, 0, 0, 0, 0
			c.recSQ, c.recAwake, c.intrIdle = 0, false, false
			return false
		}
		if c.enabled() {
			return false
		}
		if !c.geometryOK(cfg) {
			c.status |= chip.CtxtStatusHalted
			c.errCnt++
			return false
		}
		c.status = chip.CtxtStatusEnabled
		c.epoch++
		c.recSQ, c.recAwake, c.armSeen, c.intrIdle = 0, false, 0, false
		return true
	case chip.CtxtRHQHead:
		// Space in the RHQ may unblock nothing now, but a kick is cheap.
		return c.setIndex(&c.rhqHead, v, c.rhqEntries)
	case chip.CtxtSQTail:
		if c.dbAddr != 0 {
			// The index is in the record: checked, not taken (a
			// posted write that arrives late never moves the tail
			// back); the engine wakes and reads the record.
			if v >= c.sqEntries {
				c.errCnt++
				return false
			}
			return c.enabled()
		}
		return c.setIndex(&c.sqTail, v, c.sqEntries) && c.enabled()
	}
	return false
}

// setIndex sets the ring index *p to v, refusing (and counting) an index
// outside a ring of n entries; it reports whether v was taken.
func (c *ctxtState) setIndex(p *uint64, v, n uint64) bool {
	if v >= n {
		c.errCnt++
		return false
	}
	*p = v
	return true
}

// geometryOK checks the rings before a context is enabled.
func (c *ctxtState) geometryOK(cfg Config) bool {
	if !isPow2(c.rhqEntries) || c.rhqEntries < 2 || c.rhqEntries > uint64(cfg.RHQMaxEntries) || c.rhqBase%64 != 0 {
		return false
	}
	if c.sqEntries != 0 && (!isPow2(c.sqEntries) || c.sqEntries > 1<<16 || c.sqBase%64 != 0) {
		return false
	}
	if c.dbAddr%chip.DBRecAlign != 0 || c.rhqHeadAddr%chip.RHQHeadRecAlign != 0 {
		return false
	}
	if c.eagerCnt != 0 && (!isPow2(c.eagerSize) || c.eagerSize < 4096 || c.eagerSize > 1<<21 ||
		c.eagerCnt < c.rhqEntries || c.eagerCnt > 1<<16 || c.eagerBase%4096 != 0) {
		return false
	}
	return true
}
