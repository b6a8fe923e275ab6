//go:build gohfiguest

package guest

import "syscall"

// syscallParse splits netlink messages (x/sys/unix has no parser).
func syscallParse(b []byte) ([]syscall.NetlinkMessage, error) { return syscall.ParseNetlinkMessage(b) }
