package fabric_test

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/internal/testenv"
)

// A lossy link. `tc qdisc add ... netem` is the usual tool; where the
// kernel has no netem (CONFIG_NET_SCH_NETEM, not in every kernel) the
// same loss and duplication come from a tc program at each veth end's
// egress (TCX): it drops lossPct of the packets and sends dupPct again
// (bpf_clone_redirect to the same device). Reordering needs netem's delay
// line; without netem the in-process wire of hfisim's tests reorders.

// impair makes both ends of the veth pair lose lossPct and duplicate
// dupPct of their packets, and reorder reorderPct where netem exists,
// until t ends.
func impair(t *testing.T, a, b ns, lossPct, dupPct, reorderPct int) {
	t.Helper()
	if netemAvailable(a) {
		for _, n := range []ns{a, b} {
			run(t, "ip", "netns", "exec", n.name, "tc", "qdisc", "add", "dev", n.dev, "root", "netem",
				"delay", "1ms", "loss", fmt.Sprintf("%d%%", lossPct), "duplicate", fmt.Sprintf("%d%%", dupPct),
				"reorder", fmt.Sprintf("%d%%", reorderPct))
			t.Cleanup(func() { run(t, "ip", "netns", "exec", n.name, "tc", "qdisc", "del", "dev", n.dev, "root") })
		}
		return
	}
	t.Logf("no netem in this kernel: loss %d%% and duplication %d%% by a tc program, no reordering", lossPct, dupPct)
	for _, n := range []ns{a, b} {
		l, err := attachLossy(n, lossPct, dupPct)
		testenv.Require(t, err, "a tc (TCX) program on "+n.dev)
		t.Cleanup(func() {
			if err := l.Close(); err != nil {
				t.Errorf("detach the lossy program of %s: %v", n.dev, err)
			}
		})
	}
}

// netemAvailable reports whether n's kernel takes a netem qdisc (it adds
// one and removes it).
func netemAvailable(n ns) bool {
	if exec.Command("ip", "netns", "exec", n.name, "tc", "qdisc", "add", "dev", n.dev, "root", "netem", "delay", "1ms").Run() != nil {
		return false
	}
	return exec.Command("ip", "netns", "exec", n.name, "tc", "qdisc", "del", "dev", n.dev, "root").Run() == nil
}

// attachLossy attaches the lossy program to n's veth end, from a thread
// that joins n (the thread is not given back to the runtime: it dies with
// its goroutine, namespace and all).
func attachLossy(n ns, lossPct, dupPct int) (link.Link, error) {
	type res struct {
		l   link.Link
		err error
	}
	ch := make(chan res, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: see above
		l, err := attachLossyHere(n, lossPct, dupPct)
		ch <- res{l, err}
	}()
	r := <-ch
	return r.l, r.err
}

func attachLossyHere(n ns, lossPct, dupPct int) (link.Link, error) {
	f, err := os.Open("/run/netns/" + n.name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
		return nil, fmt.Errorf("setns %s: %w", n.name, err)
	}
	ifc, err := net.InterfaceByName(n.dev)
	if err != nil {
		return nil, err
	}
	const tcActOK, tcActShot = 0, 2
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:    ebpf.SchedCLS,
		License: "GPL",
		Instructions: asm.Instructions{
			asm.Mov.Reg(asm.R6, asm.R1), // the skb
			asm.FnGetPrandomU32.Call(),
			asm.Mod.Imm(asm.R0, 100),
			asm.JGE.Imm(asm.R0, int32(lossPct), "keep"),
			asm.Mov.Imm(asm.R0, tcActShot),
			asm.Return(),
			asm.JGE.Imm(asm.R0, int32(lossPct+dupPct), "pass").WithSymbol("keep"),
			asm.Mov.Reg(asm.R1, asm.R6),
			asm.Mov.Imm(asm.R2, int32(ifc.Index)),
			asm.Mov.Imm(asm.R3, 0), // egress of the same device: a second copy
			asm.FnCloneRedirect.Call(),
			asm.Mov.Imm(asm.R0, tcActOK).WithSymbol("pass"),
			asm.Return(),
		},
	})
	if err != nil {
		return nil, fmt.Errorf("load the lossy program: %w", err)
	}
	defer prog.Close() // the link holds it
	return link.AttachTCX(link.TCXOptions{Interface: ifc.Index, Program: prog, Attach: ebpf.AttachTCXEgress})
}
