package tidcache

import (
	"sync/atomic"
	"unsafe"
)

// loadEventWord reads a __u64 of the events page (uapi.GOHFI_EVENTS_*_OFF)
// that the driver updates concurrently.
func loadEventWord(page []byte, off int) uint64 {
	return atomic.LoadUint64((*uint64)(unsafe.Pointer(&page[off])))
}
