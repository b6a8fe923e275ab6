package ibwire

import (
	"fmt"
	"math/bits"
	"math/rand/v2"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gohfi/gohfi/internal/testenv"
)

// Wireshark's names of the operations (its packet-infiniband.c opcode
// strings), to check that tshark reads our opcode bytes as what we meant.
var wiresharkOps = map[uint8]string{
	opSendFirst: "SEND First", opSendMiddle: "SEND Middle", opSendLast: "SEND Last",
	opSendLastImm: "SEND Last with Immediate", opSendOnly: "SEND Only", opSendOnlyImm: "SEND Only with Immediate",
	opWriteFirst: "RDMA WRITE First", opWriteMiddle: "RDMA WRITE Middle", opWriteLast: "RDMA WRITE Last",
	opWriteLastImm: "RDMA WRITE Last with Immediate", opWriteOnly: "RDMA WRITE Only",
	opWriteOnlyImm: "RDMA WRITE Only with Immediate", opReadRequest: "RDMA READ Request",
	opReadResponseFirst: "RDMA READ response First", opReadResponseMiddle: "RDMA READ response Middle",
	opReadResponseLast: "RDMA READ response Last", opReadResponseOnly: "RDMA READ response Only",
	opAcknowledge: "Acknowledge", opAtomicAcknowledge: "ATOMIC Acknowledge", opCompareSwap: "CmpSwap",
	opFetchAdd: "FetchAdd", opSendLastInvalidate: "SEND Last with Invalidate",
	opSendOnlyInvalidate: "SEND Only with Invalidate",
}

var wiresharkTransports = map[Transport]string{
	TransportRC: "Reliable Connection (RC)", TransportUC: "Unreliable Connection (UC)",
	TransportUD: "Unreliable Datagram (UD)", TransportXRC: "Extended Reliable Connection (XRC)",
}

func wiresharkName(op Opcode) string {
	name := wiresharkOps[uint8(op&opMask)]
	if op.Transport() == TransportUD {
		name = strings.Replace(name, "Only", "only", 1) // Wireshark spells UD's so
	}
	return fmt.Sprintf("%s - %s (%d)", wiresharkTransports[op.Transport()], name, uint8(op))
}

// The payload heuristics tshark tries on SEND data (RPC over RDMA, SMB
// Direct, ...): off, so that random payloads stay "Data".
var tsharkNoHeuristics = []string{"smc", "smb_direct", "rpcordma", "nvme-rdma", "lnet", "iser", "infiniband_sdp",
	"fcoib"}

// TestTsharkDecodes writes RoCEv2 datagrams of every RC, UC, UD and XRC
// opcode that Wireshark 4.0 knows, over IPv4 and IPv6, to a pcap file and
// checks tshark's reading of each: the opcode's name, the BTH fields, the
// RETH, ImmDt, IETH, AETH, AtomicETH, AtomicAckETH and DETH fields, the
// ICRC bytes, the UDP ports, and no malformed packet or expert complaint.
//
// Wireshark 4.0 shows the ICRC but does not check it (its dissector has no
// such code and no preference for it); the ICRC's value is checked by
// TestICRCKnownAnswers (a ConnectX-4 Lx capture, Scapy) and
// TestICRCReference. RD opcodes are left out (Wireshark 4.0 reads
// transport 010 as Mellanox DC), as are FLUSH, ATOMIC WRITE and CNP (it
// does not know them). Of XRC packets only the BTH is compared: Wireshark
// 4.0 names XRC opcodes but shows all that follows the BTH as vendor
// data.
func TestTsharkDecodes(t *testing.T) {
	tshark, err := exec.LookPath("tshark")
	if err != nil {
		testenv.Missing(t, "tshark (Debian package tshark; scripts/install-deps.sh installs it): %v", err)
	}
	r := rand.New(rand.NewPCG(5, 6))
	var ps []Packet
	var ds [][]byte
	var ips []IPHeader
	for _, op := range validOpcodes() {
		if _, ok := wiresharkTransports[op.Transport()]; !ok {
			continue
		}
		if _, ok := wiresharkOps[uint8(op&opMask)]; !ok {
			continue
		}
		for _, six := range []bool{false, true} {
			p := randomPacket(r, op)
			p.BTH.PKey = DefaultPKey
			if op.Payload() == PayloadData && len(p.Payload) == 0 {
				p.Payload = []byte{1} // a pad count of 3 to check
			}
			ip := randomIP(r, six)
			buf := make([]byte, DatagramLen(&ip, &p))
			n, err := EncodeDatagram(buf, &ip, SourcePort(p.BTH.DestQP), &p)
			if err != nil {
				t.Fatal(err)
			}
			ps, ds, ips = append(ps, p), append(ds, buf[:n]), append(ips, ip)
		}
	}
	pcap := filepath.Join(t.TempDir(), "roce.pcap")
	writePcap(t, pcap, ds)

	args := []string{"-r", pcap, "-o", fmt.Sprintf("infiniband.rroce.port:%d", UDPPort)}
	for _, p := range tsharkNoHeuristics {
		args = append(args, "--disable-protocol", p)
	}
	fields := []string{"frame.number", "infiniband.bth.opcode", "infiniband.bth.se", "infiniband.bth.m",
		"infiniband.bth.padcnt", "infiniband.bth.tver", "infiniband.bth.p_key", "infiniband.bth.destqp",
		"infiniband.bth.a", "infiniband.bth.psn", "infiniband.invariant.crc", "udp.srcport", "udp.dstport",
		"_ws.malformed", "_ws.expert",
		// extended headers
		"infiniband.reth.va", "infiniband.reth.r_key", "infiniband.reth.dmalen", "infiniband.immdt",
		"infiniband.ieth", "infiniband.aeth.syndrome", "infiniband.aeth.msn", "infiniband.atomiceth.swapdt",
		"infiniband.atomiceth.cmpdt", "infiniband.atomicacketh.origremdt", "infiniband.deth.q_key",
		"infiniband.deth.srcqp"}
	fargs := append([]string{}, args...)
	fargs = append(fargs, "-T", "fields", "-E", "separator=|", "-E", "occurrence=f")
	for _, f := range fields {
		fargs = append(fargs, "-e", f)
	}
	out, err := exec.Command(tshark, fargs...).Output()
	if err != nil {
		t.Fatalf("tshark: %v", err)
	}
	rows := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(rows) != len(ds) {
		t.Fatalf("tshark printed %d rows for %d packets:\n%s", len(rows), len(ds), out)
	}
	verbose, err := exec.Command(tshark, append(args, "-V")...).Output()
	if err != nil {
		t.Fatalf("tshark -V: %v", err)
	}
	var names []string
	for _, line := range strings.Split(string(verbose), "\n") {
		if s, ok := strings.CutPrefix(strings.TrimSpace(line), "Opcode: "); ok {
			names = append(names, s)
		}
	}
	if len(names) != len(ds) {
		t.Fatalf("tshark -V named %d opcodes for %d packets", len(names), len(ds))
	}

	b01 := func(v bool) string {
		if v {
			return "1"
		}
		return "0"
	}
	for i, row := range rows {
		p, ip := &ps[i], &ips[i]
		op := p.BTH.Opcode
		got := map[string]string{}
		for j, v := range strings.Split(row, "|") {
			got[fields[j]] = v
		}
		want := map[string]string{
			"frame.number":             fmt.Sprint(i + 1),
			"infiniband.bth.opcode":    fmt.Sprint(uint8(op)),
			"infiniband.bth.se":        b01(p.BTH.SE),
			"infiniband.bth.m":         b01(p.BTH.MigReq),
			"infiniband.bth.padcnt":    fmt.Sprint(p.BTH.PadCount),
			"infiniband.bth.tver":      "0",
			"infiniband.bth.p_key":     "65535",
			"infiniband.bth.destqp":    fmt.Sprintf("0x%06x", p.BTH.DestQP),
			"infiniband.bth.a":         b01(p.BTH.AckReq),
			"infiniband.bth.psn":       fmt.Sprint(uint32(p.BTH.PSN)),
			"infiniband.invariant.crc": fmt.Sprintf("0x%08x", bits.ReverseBytes32(p.ICRC)), // read big-endian
			"udp.srcport":              fmt.Sprint(SourcePort(p.BTH.DestQP)),
			"udp.dstport":              fmt.Sprint(UDPPort),
			"_ws.malformed":            "",
			"_ws.expert":               "",
		}
		if op.Transport() == TransportXRC {
			delete(want, "infiniband.invariant.crc") // shown as vendor data
		} else {
			h := op.Headers()
			if h.Has(HdrRETH) {
				want["infiniband.reth.va"] = fmt.Sprintf("0x%016x", p.RETH.VA)
				want["infiniband.reth.r_key"] = fmt.Sprintf("0x%08x", p.RETH.RKey)
				want["infiniband.reth.dmalen"] = fmt.Sprint(p.RETH.DMALen)
			}
			if h.Has(HdrImmDt) {
				want["infiniband.immdt"] = fmt.Sprintf("%08x", uint32(p.ImmDt))
			}
			if h.Has(HdrIETH) {
				want["infiniband.ieth"] = fmt.Sprintf("%08x", p.IETH.RKey)
			}
			if h.Has(HdrAETH) {
				want["infiniband.aeth.syndrome"] = fmt.Sprint(p.AETH.Syndrome)
				want["infiniband.aeth.msn"] = fmt.Sprint(p.AETH.MSN)
			}
			if h.Has(HdrAtomicETH) {
				want["infiniband.atomiceth.swapdt"] = fmt.Sprint(p.AtomicETH.SwapAdd)
				want["infiniband.atomiceth.cmpdt"] = fmt.Sprint(p.AtomicETH.Compare)
			}
			if h.Has(HdrAtomicAckETH) {
				want["infiniband.atomicacketh.origremdt"] = fmt.Sprint(p.AtomicAckETH.Orig)
			}
			if h.Has(HdrDETH) {
				want["infiniband.deth.q_key"] = fmt.Sprintf("0x%016x", p.DETH.QKey)
				want["infiniband.deth.srcqp"] = fmt.Sprintf("0x%08x", p.DETH.SrcQP)
			}
		}
		for f, w := range want {
			if got[f] != w {
				t.Errorf("frame %d (%v, ipv6=%v): tshark %s = %q, want %q", i+1, op, ip.Is6(), f, got[f], w)
			}
		}
		if names[i] != wiresharkName(op) {
			t.Errorf("frame %d: tshark names %q, want %q", i+1, names[i], wiresharkName(op))
		}
	}
	t.Logf("tshark decoded %d RoCEv2 datagrams (%d opcodes, IPv4 and IPv6) as encoded", len(ds), len(ds)/2)
	if testing.Verbose() {
		summary, _ := exec.Command(tshark, append(args, "-c", "12")...).Output()
		t.Logf("tshark:\n%s", summary)
	}
}

// TestTsharkKnownAnswers has tshark read the known-answer datagrams too:
// the same opcode, QP, PSN and ICRC bytes as our decoder.
func TestTsharkKnownAnswers(t *testing.T) {
	tshark, err := exec.LookPath("tshark")
	if err != nil {
		testenv.Missing(t, "tshark: %v", err)
	}
	var ds [][]byte
	for _, v := range knownICRC {
		ds = append(ds, unhex(t, v.hex))
	}
	pcap := filepath.Join(t.TempDir(), "known.pcap")
	writePcap(t, pcap, ds)
	out, err := exec.Command(tshark, "-r", pcap, "-T", "fields", "-E", "separator=|", "-e", "infiniband.bth.opcode",
		"-e", "infiniband.bth.destqp", "-e", "infiniband.bth.psn", "-e", "infiniband.invariant.crc").Output()
	if err != nil {
		t.Fatal(err)
	}
	rows := strings.Split(strings.TrimSpace(string(out)), "\n")
	for i, v := range knownICRC {
		d := ds[i]
		icrc, _ := ICRC(d)
		want := fmt.Sprintf("%d|0x%06x|%d|0x%08x", uint8(v.op), v.qp, uint32(v.psn), bits.ReverseBytes32(icrc))
		if v.op == CNP {
			// Wireshark 4.0 does not know the CNP: after the BTH it shows
			// vendor data, no ICRC.
			want = fmt.Sprintf("%d|0x%06x|%d|", uint8(v.op), v.qp, uint32(v.psn))
		}
		if i >= len(rows) || rows[i] != want {
			t.Errorf("%s: tshark %q, want %q", v.name, rows[min(i, len(rows)-1)], want)
		}
	}
}
