package driver

import "golang.org/x/sys/unix"

// expRcv is a context's expected-receive state (hfi1 user_exp_rcv.c).
type expRcv struct {
	f *File
	c *ctxtData
}

func newExpRcv(f *File, c *ctxtData) (*expRcv, error) { return &expRcv{f: f, c: c}, nil }

func (e *expRcv) tidUpdate(arg uintptr) error    { return errnoErr("TID_UPDATE", unix.ENOSYS) }
func (e *expRcv) tidFree(arg uintptr) error      { return errnoErr("TID_FREE", unix.ENOSYS) }
func (e *expRcv) tidInvalRead(arg uintptr) error { return errnoErr("TID_INVAL_READ", unix.ENOSYS) }
func (e *expRcv) close() error                   { return nil }
