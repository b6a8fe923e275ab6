package vfiouser

import (
	"context"
	"encoding/binary"
	"io"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/vfio"
	"github.com/gohfi/gohfi/vfio/abi"
)

// serverSeeds are message streams a client could send: every command
// well-formed after a VERSION, and broken ones.
func serverSeeds() [][]byte {
	ver := msg(1, abi.VFIO_USER_VERSION, 0, versionPayload(qemuVersionJSON))
	valid := [][]byte{
		msg(2, abi.VFIO_USER_DEVICE_GET_INFO, 0, le32(16, 0, 0, 0)),
		msg(3, abi.VFIO_USER_DEVICE_GET_REGION_INFO, 0, cat(le32(32, 0, 2, 0), le64(0, 0))),
		msg(4, abi.VFIO_USER_DEVICE_GET_REGION_INFO, 0, cat(le32(64, 0, 2, 0), le64(0, 0))),
		msg(5, abi.VFIO_USER_DEVICE_GET_REGION_IO_FDS, 0, le32(16, 0, 0, 0)),
		msg(5, abi.VFIO_USER_DEVICE_GET_REGION_IO_FDS, 0, le32(4096, 0, 0, 2)),
		msg(6, abi.VFIO_USER_DEVICE_GET_IRQ_INFO, 0, le32(16, 0, 2, 0)),
		msg(7, abi.VFIO_USER_DEVICE_SET_IRQS, 0, le32(20, abi.VFIO_IRQ_SET_DATA_NONE|abi.VFIO_IRQ_SET_ACTION_TRIGGER, 2, 0, 0)),
		msg(8, abi.VFIO_USER_DEVICE_SET_IRQS, 0, append(le32(21, abi.VFIO_IRQ_SET_DATA_BOOL|abi.VFIO_IRQ_SET_ACTION_UNMASK, 0, 0, 1), 1)),
		msg(9, abi.VFIO_USER_REGION_READ, 0, cat(le64(0), le32(7, 4))),
		msg(10, abi.VFIO_USER_REGION_WRITE, 0, cat(le64(0x20), le32(0, 4), le32(0xdeadbeef))),
		msg(11, abi.VFIO_USER_REGION_WRITE, abi.VFIO_USER_F_NO_REPLY, cat(le64(0x24), le32(0, 4), le32(1))),
		msg(12, abi.VFIO_USER_REGION_WRITE_MULTI, 0, cat(le64(1), le64(0x30), le32(0, 4), le64(5))),
		msg(13, abi.VFIO_USER_DMA_MAP, 0, cat(le32(32, 3), le64(0, 0x10000, 0x4000))),
		msg(14, abi.VFIO_USER_REGION_WRITE, 0, cat(le64(regDMAIOVA), le32(0, 8), le64(0x10000))),
		msg(15, abi.VFIO_USER_REGION_WRITE, 0, cat(le64(regDMALen), le32(0, 4), le32(64))),
		msg(16, abi.VFIO_USER_REGION_WRITE, 0, cat(le64(regDMAOp), le32(0, 4), le32(1))), // DMA_READ to the client
		msg(17, abi.VFIO_USER_DMA_UNMAP, 0, cat(le32(24, 0), le64(0x10000, 0x4000))),
		msg(18, abi.VFIO_USER_DMA_UNMAP, 0, cat(le32(24, abi.VFIO_DMA_UNMAP_FLAG_ALL), le64(0, 0))),
		msg(19, abi.VFIO_USER_DEVICE_RESET, 0, nil),
		msg(20, abi.VFIO_USER_DEVICE_FEATURE, 0, le32(8, 1<<16|1)),
		msg(21, abi.VFIO_USER_DMA_READ, abi.VFIO_USER_F_TYPE_REPLY, cat(le64(0x10000, 4), le32(0))), // unsolicited reply
	}
	seeds := [][]byte{cat(append([][]byte{ver}, valid...)...)}
	for _, v := range valid {
		seeds = append(seeds, cat(ver, v))
	}
	huge := msg(2, abi.VFIO_USER_REGION_WRITE, 0, nil)
	binary.LittleEndian.PutUint32(huge[4:], 0xfffffff0)
	small := msg(2, abi.VFIO_USER_REGION_WRITE, 0, nil)
	binary.LittleEndian.PutUint32(small[4:], 4)
	seeds = append(seeds,
		nil,
		ver[:7],
		cat(ver, huge),
		cat(ver, small),
		cat(ver, msg(2, 77, 0, nil)),
		msg(1, abi.VFIO_USER_VERSION, 0, versionPayload(`{"capabilities":{"max_data_xfer_size":1}}`)),
		msg(1, abi.VFIO_USER_VERSION, 0, versionPayload(`{"capabilities":[1,2]}`)),
		msg(1, abi.VFIO_USER_VERSION, 0, versionPayload(`not json`)),
		cat(ver, msg(2, abi.VFIO_USER_REGION_READ, 0, cat(le64(0), le32(0, 1<<20)))),
		cat(ver, msg(2, abi.VFIO_USER_DEVICE_SET_IRQS, 0, le32(20, abi.VFIO_IRQ_SET_DATA_BOOL|abi.VFIO_IRQ_SET_ACTION_MASK, 2, 0, 4))),
		cat(ver, msg(2, abi.VFIO_USER_REGION_WRITE, 0, cat(le64(0), le32(0, 100), make([]byte, 50)))),
		cat(ver, msg(2, abi.VFIO_USER_DMA_MAP, 0, cat(le32(32, 3), le64(0, ^uint64(0)-4096, 8192)))),
	)
	return seeds
}

func FuzzServerDecode(f *testing.F) {
	for _, s := range serverSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		m := newFakeModel(t)
		a, b := socketPair(t)
		defer a.Close()
		srv := NewServer(m, WithTimeout(200*time.Millisecond), WithMaxDataXferSize(64<<10), WithMaxMsgFDs(4))
		done := make(chan error, 1)
		go func() { done <- srv.ServeConn(context.Background(), b) }()
		drained := make(chan struct{})
		go func() { io.Copy(io.Discard, a); close(drained) }()
		a.SetWriteDeadline(time.Now().Add(5 * time.Second))
		a.Write(data)
		a.CloseWrite()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("server did not finish")
		}
		<-drained
		if n := m.vectorsSet(vfio.PCIMSIXIRQIndex) + m.vectorsSet(vfio.PCIINTxIRQIndex); n != 0 {
			t.Fatalf("%d eventfds kept after the client left", n)
		}
		if at, de, _ := m.counts(); at != de {
			t.Fatalf("attached %d detached %d", at, de)
		}
	})
}

// clientSeeds are streams of server messages, one reply per client call in
// the order FuzzClientDecode makes them (ids are patched), with DMA
// requests from the server in between.
func clientSeeds() [][]byte {
	rp := func(cmd uint16, p []byte) []byte { return msg(0, cmd, abi.VFIO_USER_F_TYPE_REPLY, p) }
	regInfo := func() []byte {
		r := abi.VFIORegionInfo{Argsz: 64, Flags: vfio.RegionFlagRead | vfio.RegionFlagCaps, Index: 2, CapOffset: 32, Size: 8192}
		b := make([]byte, 32)
		abi.Encode(b, &r)
		return cat(b, le32(abi.VFIO_REGION_INFO_CAP_SPARSE_MMAP|1<<16, 0, 1, 0), le64(4096, 4096))
	}
	replies := [][]byte{
		rp(abi.VFIO_USER_DEVICE_GET_REGION_INFO, regInfo()),
		rp(abi.VFIO_USER_REGION_READ, cat(le64(8), le32(0, 4), le32(7))),
		rp(abi.VFIO_USER_REGION_WRITE, cat(le64(8), le32(0, 4))),
		rp(abi.VFIO_USER_DEVICE_GET_IRQ_INFO, le32(16, 1, 2, 4)),
		rp(abi.VFIO_USER_DEVICE_SET_IRQS, nil),
		rp(abi.VFIO_USER_DMA_MAP, nil),
		msg(90, abi.VFIO_USER_DMA_READ, 0, le64(0x1000, 16)),
		msg(91, abi.VFIO_USER_DMA_WRITE, 0, cat(le64(0x1000, 4), le32(0x01020304))),
		rp(abi.VFIO_USER_DMA_UNMAP, cat(le32(24, 0), le64(0x1000, 4096))),
		rp(abi.VFIO_USER_DEVICE_RESET, nil),
	}
	seeds := [][]byte{cat(replies...)}
	bad := msg(0, abi.VFIO_USER_REGION_READ, abi.VFIO_USER_F_TYPE_REPLY, nil)
	binary.LittleEndian.PutUint32(bad[4:], 2)
	seeds = append(seeds,
		cat(rp(abi.VFIO_USER_DEVICE_GET_REGION_INFO, regInfo()[:40])),
		cat(msg(0, abi.VFIO_USER_DEVICE_GET_REGION_INFO, abi.VFIO_USER_F_TYPE_REPLY|abi.VFIO_USER_F_ERROR, nil)),
		cat(rp(abi.VFIO_USER_DEVICE_GET_REGION_INFO, regInfo()), rp(abi.VFIO_USER_REGION_READ, le64(1))),
		cat(rp(abi.VFIO_USER_DEVICE_GET_REGION_INFO, regInfo()), bad),
		cat(msg(5, abi.VFIO_USER_DMA_READ, 0, le64(0x1000, 1<<30))),
		cat(msg(5, 200, 0, nil)),
	)
	return seeds
}

func FuzzClientDecode(f *testing.F) {
	for _, s := range clientSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, srv := scripted(t, WithTimeout(time.Second), WithMaxDataXferSize(64<<10))
		mem := anonMem(t, 4096)
		efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(efd)

		script := make(chan struct{})
		go func() {
			defer close(script)
			defer srv.conn.Close()
			rest := data
			for len(rest) > 0 {
				srv.conn.SetReadDeadline(time.Now().Add(2 * time.Second))
				h, _, fds, err := srv.sk.readMsg(nil)
				closeFDs(fds)
				if err != nil {
					return
				}
				if isReply(h) {
					continue // the client answering a DMA request
				}
				// Feed frames until one is a reply, patched to this request.
				for len(rest) > 0 {
					n := len(rest)
					if n >= headerSize {
						if sz := binary.LittleEndian.Uint32(rest[4:]); sz >= headerSize && uint64(sz) <= uint64(n) {
							n = int(sz)
						}
					}
					frame := append([]byte(nil), rest[:n]...)
					rest = rest[n:]
					isReply := len(frame) >= headerSize && binary.LittleEndian.Uint32(frame[8:])&abi.VFIO_USER_F_TYPE_MASK == abi.VFIO_USER_F_TYPE_REPLY
					if isReply {
						binary.LittleEndian.PutUint16(frame, h.MsgID)
					}
					srv.conn.SetWriteDeadline(time.Now().Add(2 * time.Second))
					if _, err := srv.conn.Write(frame); err != nil {
						return
					}
					if isReply {
						break
					}
				}
			}
		}()
		c.RegionInfo(2)
		c.ReadRegion(0, 8, make([]byte, 4))
		c.WriteRegion(0, 8, []byte{1, 2, 3, 4})
		c.IRQInfo(2)
		c.SetIRQs(2, 0, []int{efd})
		c.DMAMap(vfio.DMAMapping{IOVA: 0x1000, Vaddr: addrOf(mem), Size: 4096, Flags: vfio.DMARead | vfio.DMAWrite})
		c.DMAUnmap(0x1000, 4096)
		c.Reset()
		if b, err := c.MmapRegion(2, 4096, 4096, unix.PROT_READ); err == nil {
			unix.Munmap(b)
		}
		c.Close()
		select {
		case <-script:
		case <-time.After(10 * time.Second):
			t.Fatal("script did not finish")
		}
	})
}

// FuzzParseRegionIOFDs: whatever a server answers to GET_REGION_IO_FDS,
// the client keeps only sub-regions inside the region, of a register's
// size, on an eventfd of the reply, and closes or returns every fd.
func FuzzParseRegionIOFDs(f *testing.F) {
	sub := func(off, size uint64, fdIndex, typ, flags uint32, data uint64) []byte {
		b := make([]byte, abi.SizeofVFIOUserSubRegionIOEventFD)
		abi.Encode(b, &abi.VFIOUserSubRegionIOEventFD{Offset: off, Size: size, FDIndex: fdIndex, Type: typ, Flags: flags, Datamatch: data})
		return b
	}
	f.Add(cat(le32(16+80, 0, 0, 2), sub(0x10, 8, 0, 0, 0, 0), sub(0x18, 4, 0, 0, abi.KVM_IOEVENTFD_FLAG_DATAMATCH, 7)), true)
	f.Add(le32(16+40*1000, 0, 0, 1000), false)
	f.Add(cat(le32(16+40, 0, 0, 1), sub(4090, 8, 0, 0, 0, 0)), true)
	f.Add(cat(le32(16+40, 0, 0, 1), sub(0, 8, 0, abi.VFIO_USER_IO_FD_TYPE_IOREGIONFD, 0, 0)), true)
	f.Add(le32(16, 0, 0, 0), false)
	f.Fuzz(func(t *testing.T, p []byte, withFD bool) {
		var fds []int
		if withFD {
			efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
			if err != nil {
				t.Fatal(err)
			}
			fds = []int{efd}
		}
		const size = 4096
		subs, keep, need, err := parseRegionIOFDs(p, fds, 0, size, 16+40*4, 1<<20)
		if err != nil || need != 0 {
			closeFDs(fds)
			if subs != nil || keep != nil {
				t.Fatalf("sub-regions %v fds %v with need %d, err %v", subs, keep, need, err)
			}
			return
		}
		defer closeFDs(keep)
		for _, s := range subs {
			if !accessSize(s.size) || s.off+s.size > size || s.off+s.size < s.off || !slices.Contains(keep, s.fd) {
				t.Fatalf("kept %+v (fds %v)", s, keep)
			}
		}
		if len(subs) == 0 && len(keep) != 0 {
			t.Fatalf("fds %v kept without sub-regions", keep)
		}
	})
}
