package ibwire

import (
	"strings"
	"testing"
)

// wantOps is the opcode table written out by hand from IB vol. 1 table 35
// and rxe_opcode.c (which headers, in which order, and their total size
// with the BTH), independently of opDefs.
var wantOps = []struct {
	op      Opcode
	name    string
	hdrs    string // wire order after the BTH
	hdrLen  int    // BTH + extended headers
	payload Payload
}{
	{0x00, "RC_SEND_FIRST", "none", 12, PayloadData},
	{0x01, "RC_SEND_MIDDLE", "none", 12, PayloadData},
	{0x02, "RC_SEND_LAST", "none", 12, PayloadData},
	{0x03, "RC_SEND_LAST_WITH_IMMEDIATE", "ImmDt", 16, PayloadData},
	{0x04, "RC_SEND_ONLY", "none", 12, PayloadData},
	{0x05, "RC_SEND_ONLY_WITH_IMMEDIATE", "ImmDt", 16, PayloadData},
	{0x06, "RC_RDMA_WRITE_FIRST", "RETH", 28, PayloadData},
	{0x07, "RC_RDMA_WRITE_MIDDLE", "none", 12, PayloadData},
	{0x08, "RC_RDMA_WRITE_LAST", "none", 12, PayloadData},
	{0x09, "RC_RDMA_WRITE_LAST_WITH_IMMEDIATE", "ImmDt", 16, PayloadData},
	{0x0a, "RC_RDMA_WRITE_ONLY", "RETH", 28, PayloadData},
	{0x0b, "RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE", "RETH+ImmDt", 32, PayloadData},
	{0x0c, "RC_RDMA_READ_REQUEST", "RETH", 28, PayloadNone},
	{0x0d, "RC_RDMA_READ_RESPONSE_FIRST", "AETH", 16, PayloadData},
	{0x0e, "RC_RDMA_READ_RESPONSE_MIDDLE", "none", 12, PayloadData},
	{0x0f, "RC_RDMA_READ_RESPONSE_LAST", "AETH", 16, PayloadData},
	{0x10, "RC_RDMA_READ_RESPONSE_ONLY", "AETH", 16, PayloadData},
	{0x11, "RC_ACKNOWLEDGE", "AETH", 16, PayloadNone},
	{0x12, "RC_ATOMIC_ACKNOWLEDGE", "AETH+AtomicAckETH", 24, PayloadNone},
	{0x13, "RC_COMPARE_SWAP", "AtomicETH", 40, PayloadNone},
	{0x14, "RC_FETCH_ADD", "AtomicETH", 40, PayloadNone},
	{0x16, "RC_SEND_LAST_WITH_INVALIDATE", "IETH", 16, PayloadData},
	{0x17, "RC_SEND_ONLY_WITH_INVALIDATE", "IETH", 16, PayloadData},
	{0x1c, "RC_FLUSH", "FETH+RETH", 32, PayloadNone},
	{0x1d, "RC_ATOMIC_WRITE", "RETH", 28, PayloadFixed},

	{0x20, "UC_SEND_FIRST", "none", 12, PayloadData},
	{0x21, "UC_SEND_MIDDLE", "none", 12, PayloadData},
	{0x22, "UC_SEND_LAST", "none", 12, PayloadData},
	{0x23, "UC_SEND_LAST_WITH_IMMEDIATE", "ImmDt", 16, PayloadData},
	{0x24, "UC_SEND_ONLY", "none", 12, PayloadData},
	{0x25, "UC_SEND_ONLY_WITH_IMMEDIATE", "ImmDt", 16, PayloadData},
	{0x26, "UC_RDMA_WRITE_FIRST", "RETH", 28, PayloadData},
	{0x27, "UC_RDMA_WRITE_MIDDLE", "none", 12, PayloadData},
	{0x28, "UC_RDMA_WRITE_LAST", "none", 12, PayloadData},
	{0x29, "UC_RDMA_WRITE_LAST_WITH_IMMEDIATE", "ImmDt", 16, PayloadData},
	{0x2a, "UC_RDMA_WRITE_ONLY", "RETH", 28, PayloadData},
	{0x2b, "UC_RDMA_WRITE_ONLY_WITH_IMMEDIATE", "RETH+ImmDt", 32, PayloadData},

	{0x40, "RD_SEND_FIRST", "RDETH+DETH", 24, PayloadData},
	{0x41, "RD_SEND_MIDDLE", "RDETH+DETH", 24, PayloadData},
	{0x42, "RD_SEND_LAST", "RDETH+DETH", 24, PayloadData},
	{0x43, "RD_SEND_LAST_WITH_IMMEDIATE", "RDETH+DETH+ImmDt", 28, PayloadData},
	{0x44, "RD_SEND_ONLY", "RDETH+DETH", 24, PayloadData},
	{0x45, "RD_SEND_ONLY_WITH_IMMEDIATE", "RDETH+DETH+ImmDt", 28, PayloadData},
	{0x46, "RD_RDMA_WRITE_FIRST", "RDETH+DETH+RETH", 40, PayloadData},
	{0x47, "RD_RDMA_WRITE_MIDDLE", "RDETH+DETH", 24, PayloadData},
	{0x48, "RD_RDMA_WRITE_LAST", "RDETH+DETH", 24, PayloadData},
	{0x49, "RD_RDMA_WRITE_LAST_WITH_IMMEDIATE", "RDETH+DETH+ImmDt", 28, PayloadData},
	{0x4a, "RD_RDMA_WRITE_ONLY", "RDETH+DETH+RETH", 40, PayloadData},
	{0x4b, "RD_RDMA_WRITE_ONLY_WITH_IMMEDIATE", "RDETH+DETH+RETH+ImmDt", 44, PayloadData},
	{0x4c, "RD_RDMA_READ_REQUEST", "RDETH+DETH+RETH", 40, PayloadNone},
	{0x4d, "RD_RDMA_READ_RESPONSE_FIRST", "RDETH+AETH", 20, PayloadData},
	{0x4e, "RD_RDMA_READ_RESPONSE_MIDDLE", "RDETH", 16, PayloadData},
	{0x4f, "RD_RDMA_READ_RESPONSE_LAST", "RDETH+AETH", 20, PayloadData},
	{0x50, "RD_RDMA_READ_RESPONSE_ONLY", "RDETH+AETH", 20, PayloadData},
	{0x51, "RD_ACKNOWLEDGE", "RDETH+AETH", 20, PayloadNone},
	{0x52, "RD_ATOMIC_ACKNOWLEDGE", "RDETH+AETH+AtomicAckETH", 28, PayloadNone},
	{0x53, "RD_COMPARE_SWAP", "RDETH+DETH+AtomicETH", 52, PayloadNone},
	{0x54, "RD_FETCH_ADD", "RDETH+DETH+AtomicETH", 52, PayloadNone},
	{0x55, "RD_RESYNC", "RDETH+DETH", 24, PayloadNone},

	{0x64, "UD_SEND_ONLY", "DETH", 20, PayloadData},
	{0x65, "UD_SEND_ONLY_WITH_IMMEDIATE", "DETH+ImmDt", 24, PayloadData},

	{0x81, "CNP", "CNPPad", 28, PayloadNone},

	{0xa0, "XRC_SEND_FIRST", "XRCETH", 16, PayloadData},
	{0xa1, "XRC_SEND_MIDDLE", "XRCETH", 16, PayloadData},
	{0xa2, "XRC_SEND_LAST", "XRCETH", 16, PayloadData},
	{0xa3, "XRC_SEND_LAST_WITH_IMMEDIATE", "XRCETH+ImmDt", 20, PayloadData},
	{0xa4, "XRC_SEND_ONLY", "XRCETH", 16, PayloadData},
	{0xa5, "XRC_SEND_ONLY_WITH_IMMEDIATE", "XRCETH+ImmDt", 20, PayloadData},
	{0xa6, "XRC_RDMA_WRITE_FIRST", "XRCETH+RETH", 32, PayloadData},
	{0xa7, "XRC_RDMA_WRITE_MIDDLE", "XRCETH", 16, PayloadData},
	{0xa8, "XRC_RDMA_WRITE_LAST", "XRCETH", 16, PayloadData},
	{0xa9, "XRC_RDMA_WRITE_LAST_WITH_IMMEDIATE", "XRCETH+ImmDt", 20, PayloadData},
	{0xaa, "XRC_RDMA_WRITE_ONLY", "XRCETH+RETH", 32, PayloadData},
	{0xab, "XRC_RDMA_WRITE_ONLY_WITH_IMMEDIATE", "XRCETH+RETH+ImmDt", 36, PayloadData},
	{0xac, "XRC_RDMA_READ_REQUEST", "XRCETH+RETH", 32, PayloadNone},
	{0xad, "XRC_RDMA_READ_RESPONSE_FIRST", "AETH", 16, PayloadData},
	{0xae, "XRC_RDMA_READ_RESPONSE_MIDDLE", "none", 12, PayloadData},
	{0xaf, "XRC_RDMA_READ_RESPONSE_LAST", "AETH", 16, PayloadData},
	{0xb0, "XRC_RDMA_READ_RESPONSE_ONLY", "AETH", 16, PayloadData},
	{0xb1, "XRC_ACKNOWLEDGE", "AETH", 16, PayloadNone},
	{0xb2, "XRC_ATOMIC_ACKNOWLEDGE", "AETH+AtomicAckETH", 24, PayloadNone},
	{0xb3, "XRC_COMPARE_SWAP", "XRCETH+AtomicETH", 44, PayloadNone},
	{0xb4, "XRC_FETCH_ADD", "XRCETH+AtomicETH", 44, PayloadNone},
	{0xb6, "XRC_SEND_LAST_WITH_INVALIDATE", "XRCETH+IETH", 20, PayloadData},
	{0xb7, "XRC_SEND_ONLY_WITH_INVALIDATE", "XRCETH+IETH", 20, PayloadData},
}

func TestOpcodeTable(t *testing.T) {
	want := map[Opcode]bool{}
	for _, w := range wantOps {
		want[w.op] = true
		op := w.op
		if !op.Valid() {
			t.Errorf("%#02x %s: not valid", uint8(op), w.name)
			continue
		}
		if op.String() != w.name {
			t.Errorf("%#02x: name %q, want %q", uint8(op), op.String(), w.name)
		}
		if got := op.Headers().String(); got != w.hdrs {
			t.Errorf("%s: headers %s, want %s", w.name, got, w.hdrs)
		}
		if op.HeaderLen() != w.hdrLen || BTHLen+op.Headers().Len() != w.hdrLen {
			t.Errorf("%s: header length %d (set %d), want %d", w.name, op.HeaderLen(),
				BTHLen+op.Headers().Len(), w.hdrLen)
		}
		if op.Payload() != w.payload {
			t.Errorf("%s: payload %d, want %d", w.name, op.Payload(), w.payload)
		}
		// Position and kind follow the name.
		pos := PosOnly
		switch {
		case strings.Contains(w.name, "_FIRST"):
			pos = PosFirst
		case strings.Contains(w.name, "_MIDDLE"):
			pos = PosMiddle
		case strings.Contains(w.name, "_LAST"):
			pos = PosLast
		}
		if op.Position() != pos {
			t.Errorf("%s: position %v, want %v", w.name, op.Position(), pos)
		}
		kinds := []struct {
			is   bool
			want bool
			what string
		}{
			{op.IsSend(), strings.Contains(w.name, "_SEND_"), "send"},
			{op.IsWrite(), strings.Contains(w.name, "RDMA_WRITE"), "write"},
			{op.IsReadResponse(), strings.Contains(w.name, "READ_RESPONSE"), "read response"},
			{op.IsResponse(), strings.Contains(w.name, "RESPONSE") || strings.Contains(w.name, "ACKNOWLEDGE"), "response"},
			{op.IsRequest(), w.name != "CNP" && !strings.Contains(w.name, "RESPONSE") && !strings.Contains(w.name, "ACKNOWLEDGE"), "request"},
			{op.HasImmediate(), strings.Contains(w.name, "IMMEDIATE"), "immediate"},
			{op.HasInvalidate(), strings.Contains(w.name, "INVALIDATE"), "invalidate"},
		}
		for _, k := range kinds {
			if k.is != k.want {
				t.Errorf("%s: %s = %v", w.name, k.what, k.is)
			}
		}
	}
	for i := range 256 {
		op := Opcode(i)
		if op.Valid() != want[op] {
			t.Errorf("%#02x (%v): valid = %v", i, op, op.Valid())
		}
		if !op.Valid() && (op.String() != "OPCODE_0x"+string("0123456789abcdef"[i>>4])+string("0123456789abcdef"[i&15]) ||
			op.HeaderLen() != 0 || op.IsRequest() || op.IsResponse() || op.IsSend()) {
			t.Errorf("%#02x: undefined opcode has %q, header length %d", i, op, op.HeaderLen())
		}
		if op.HeaderLen() > MaxHeaderLen {
			t.Errorf("%v: header length %d > MaxHeaderLen %d", op, op.HeaderLen(), MaxHeaderLen)
		}
	}
	// The named constants are the opcodes of the table.
	named := map[Opcode]string{RCSendFirst: "RC_SEND_FIRST", RCSendOnlyImm: "RC_SEND_ONLY_WITH_IMMEDIATE",
		RCWriteOnlyImm: "RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE", RCReadRequest: "RC_RDMA_READ_REQUEST",
		RCReadResponseMiddle: "RC_RDMA_READ_RESPONSE_MIDDLE", RCAcknowledge: "RC_ACKNOWLEDGE",
		RCAtomicAcknowledge: "RC_ATOMIC_ACKNOWLEDGE", RCCompareSwap: "RC_COMPARE_SWAP", RCFetchAdd: "RC_FETCH_ADD",
		RCSendLastInvalidate: "RC_SEND_LAST_WITH_INVALIDATE", RCSendOnlyInvalidate: "RC_SEND_ONLY_WITH_INVALIDATE",
		RCFlush: "RC_FLUSH", RCAtomicWrite: "RC_ATOMIC_WRITE", UCWriteOnlyImm: "UC_RDMA_WRITE_ONLY_WITH_IMMEDIATE",
		UDSendOnly: "UD_SEND_ONLY", UDSendOnlyImm: "UD_SEND_ONLY_WITH_IMMEDIATE", CNP: "CNP"}
	for op, name := range named {
		if op.String() != name {
			t.Errorf("constant %#02x is %s, want %s", uint8(op), op, name)
		}
	}
	if len(wantOps) != len(validOpcodes()) {
		t.Errorf("%d opcodes valid, the table lists %d", len(validOpcodes()), len(wantOps))
	}
}

func TestHeaderSizes(t *testing.T) {
	sizes := map[Header]int{HdrRDETH: 4, HdrDETH: 8, HdrXRCETH: 4, HdrFETH: 4, HdrRETH: 16, HdrAtomicETH: 28,
		HdrAETH: 4, HdrAtomicAckETH: 8, HdrImmDt: 4, HdrIETH: 4, HdrCNPPad: 16}
	for h, n := range sizes {
		if h.Len() != n {
			t.Errorf("%v: %d bytes, want %d", h, h.Len(), n)
		}
	}
	if BTHLen != 12 || ICRCLen != 4 || MaxHeaderLen != 52 {
		t.Errorf("BTH %d ICRC %d max header %d", BTHLen, ICRCLen, MaxHeaderLen)
	}
}
