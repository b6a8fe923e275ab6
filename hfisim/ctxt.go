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
}

func (c *ctxtState) enabled() bool { return c.status&chip.CtxtStatusEnabled != 0 }

func (c *ctxtState) read(r uint64, n int, cfg Config) uint64 {
	switch r {
	case chip.CtxtControl:
		return c.control
	case chip.CtxtRHQBase:
		return c.rhqBase
	case chip.CtxtRHQEntries:
		return c.rhqEntries
	case chip.CtxtRHQHead:
		return c.rhqHead
	case chip.CtxtRHQTail:
		return c.rhqTail
	case chip.CtxtEagerBase:
		return c.eagerBase
	case chip.CtxtEagerSize:
		return c.eagerSize
	case chip.CtxtEagerCount:
		return c.eagerCnt
	case chip.CtxtSQBase:
		return c.sqBase
	case chip.CtxtSQEntries:
		return c.sqEntries
	case chip.CtxtSQTail:
		return c.sqTail
	case chip.CtxtSQHead:
		return c.sqHead
	case chip.CtxtSQHeadAddr:
		return c.sqHeadAddr
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
	if c.enabled() {
		switch r {
		case chip.CtxtRHQBase, chip.CtxtRHQEntries, chip.CtxtEagerBase, chip.CtxtEagerSize,
			chip.CtxtEagerCount, chip.CtxtSQBase, chip.CtxtSQEntries, chip.CtxtSQHeadAddr:
			c.errCnt++
			return false
		}
	}
	switch r {
	case chip.CtxtControl:
		c.control = v & (chip.CtxtCtrlEnable | chip.CtxtCtrlIntEnable | chip.CtxtCtrlTIDFlowDisable)
		if v&chip.CtxtCtrlEnable == 0 {
			c.status &^= chip.CtxtStatusEnabled | chip.CtxtStatusHalted
			c.rhqHead, c.rhqTail, c.sqHead, c.sqTail, c.seq, c.urgent = 0, 0, 0, 0, 0, 0
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
		return true
	case chip.CtxtRHQBase:
		c.rhqBase = v
	case chip.CtxtRHQEntries:
		c.rhqEntries = v
	case chip.CtxtRHQHead:
		if v >= c.rhqEntries {
			c.errCnt++
			return false
		}
		c.rhqHead = v
		return true // space in the RHQ may unblock nothing now, but cheap
	case chip.CtxtEagerBase:
		c.eagerBase = v
	case chip.CtxtEagerSize:
		c.eagerSize = v
	case chip.CtxtEagerCount:
		c.eagerCnt = v
	case chip.CtxtSQBase:
		c.sqBase = v
	case chip.CtxtSQEntries:
		c.sqEntries = v
	case chip.CtxtSQTail:
		if v >= c.sqEntries {
			c.errCnt++
			return false
		}
		c.sqTail = v
		return c.enabled()
	case chip.CtxtSQHeadAddr:
		c.sqHeadAddr = v
	}
	return false
}

// geometryOK checks the rings before a context is enabled.
func (c *ctxtState) geometryOK(cfg Config) bool {
	if !isPow2(c.rhqEntries) || c.rhqEntries < 2 || c.rhqEntries > uint64(cfg.RHQMaxEntries) || c.rhqBase%64 != 0 {
		return false
	}
	if c.sqEntries != 0 && (!isPow2(c.sqEntries) || c.sqEntries > 1<<16 || c.sqBase%64 != 0) {
		return false
	}
	if c.eagerCnt != 0 && (!isPow2(c.eagerSize) || c.eagerSize < 4096 || c.eagerSize > 1<<21 ||
		c.eagerCnt < c.rhqEntries || c.eagerCnt > 1<<16 || c.eagerBase%4096 != 0) {
		return false
	}
	return true
}
