package ibwire

import (
	"encoding/binary"
	"os"
	"testing"
)

// writePcap writes IP datagrams as a classic pcap file (the libpcap
// format: a 24-byte global header, then a 16-byte record header before
// each packet), link type LINKTYPE_RAW (101: each packet starts with its
// IPv4 or IPv6 header).
func writePcap(t testing.TB, path string, datagrams [][]byte) {
	t.Helper()
	const linktypeRaw = 101
	b := make([]byte, 24, 24+len(datagrams)*1100)
	le := binary.LittleEndian
	le.PutUint32(b[0:], 0xA1B2C3D4) // magic: microsecond timestamps, our byte order
	le.PutUint16(b[4:], 2)          // version 2.4
	le.PutUint16(b[6:], 4)
	le.PutUint32(b[8:], 0)  // thiszone
	le.PutUint32(b[12:], 0) // sigfigs
	le.PutUint32(b[16:], 65535)
	le.PutUint32(b[20:], linktypeRaw)
	for i, d := range datagrams {
		var rec [16]byte
		le.PutUint32(rec[0:], 1700000000) // seconds
		le.PutUint32(rec[4:], uint32(i))  // microseconds
		le.PutUint32(rec[8:], uint32(len(d)))
		le.PutUint32(rec[12:], uint32(len(d)))
		b = append(b, rec[:]...)
		b = append(b, d...)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}
