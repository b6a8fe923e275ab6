package vfiouser

import "time"

// Option configures a Client or a Server. Options that make no sense for one
// side are ignored by it.
type Option func(*options)

type options struct {
	timeout     time.Duration
	maxData     uint32
	maxMsgFDs   int
	maxDMAMaps  int
	logf        func(format string, args ...any)
	dmaTimeout  time.Duration
	queueBudget int
	noDMARing   bool
}

func defaultOptions() options {
	return options{
		timeout:     5 * time.Second,
		maxData:     defaultMaxDataXferSize,
		maxMsgFDs:   defaultMaxMsgFDs,
		maxDMAMaps:  defaultMaxDMAMaps,
		logf:        func(string, ...any) {},
		dmaTimeout:  5 * time.Second,
		queueBudget: 8 << 20,
	}
}

func buildOptions(opts []Option) options {
	o := defaultOptions()
	for _, opt := range opts {
		if opt != nil {
			opt(&o)
		}
	}
	return o
}

// WithTimeout bounds every request/reply round trip (client calls, and the
// server's DMA_READ/DMA_WRITE requests to the client), and every blocking
// socket write. Zero or negative keeps the default of 5 s.
func WithTimeout(d time.Duration) Option {
	return func(o *options) {
		if d > 0 {
			o.timeout = d
			o.dmaTimeout = d
		}
	}
}

// WithMaxDataXferSize sets the max_data_xfer_size this side announces: the
// largest REGION/DMA read or write it accepts in one message. It also caps
// the size of any message accepted (this plus a few KiB of headers).
// Values are clamped to [512, 64 MiB]; the default is 1 MiB.
func WithMaxDataXferSize(n uint32) Option {
	return func(o *options) {
		switch {
		case n < minMaxDataXferSize:
			n = minMaxDataXferSize
		case n > 64<<20:
			n = 64 << 20
		}
		o.maxData = n
	}
}

// WithMaxMsgFDs sets the most file descriptors accepted with one message
// (max_msg_fds); a message with more is rejected and its fds closed.
// Clamped to [1, 253]; the default is 16.
func WithMaxMsgFDs(n int) Option {
	return func(o *options) {
		o.maxMsgFDs = min(max(n, 1), maxFDsLimit)
	}
}

// WithMaxDMAMaps sets how many DMA mappings a server allows at once
// (max_dma_maps). The default is 65535.
func WithMaxDMAMaps(n int) Option {
	return func(o *options) {
		if n > 0 {
			o.maxDMAMaps = n
		}
	}
}

// WithLogger sets a printf-like function for diagnostics (protocol
// violations by the peer, errors of posted writes). The default discards.
func WithLogger(logf func(format string, args ...any)) Option {
	return func(o *options) {
		if logf != nil {
			o.logf = logf
		}
	}
}

// WithoutDMARing turns device rings off (docs/pinning.md, "Device rings"):
// a client sends none, a server neither announces gohfi_dma_ring nor takes
// one, and pinned anonymous memory is reached through DMA_READ/DMA_WRITE.
func WithoutDMARing() Option {
	return func(o *options) { o.noDMARing = true }
}
