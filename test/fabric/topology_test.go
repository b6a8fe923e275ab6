package fabric_test

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"testing"
)

// More machines than a veth pair: several namespaces on a bridge (the
// three-node test), and two namespaces joined through a middle one whose
// forwarding is the test's own impairment relay (relay_test.go).

// addNamespace makes the network namespace name, with lo up, and removes
// it when t ends.
func addNamespace(t *testing.T, name string) {
	t.Helper()
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	run(t, "ip", "-n", name, "link", "set", "lo", "up")
}

// bridged makes k namespaces, each with one end of a veth pair whose
// other end is a port of a bridge in a hub namespace, with addresses
// 10.202.P.1..k/24 (P from the process id), and removes them when t ends.
func bridged(t *testing.T, k int) []ns {
	t.Helper()
	requireNetns(t)
	pid := os.Getpid()
	hub := fmt.Sprintf("gohfi-fab%d-hub", pid)
	addNamespace(t, hub)
	run(t, "ip", "-n", hub, "link", "add", "br0", "type", "bridge")
	run(t, "ip", "-n", hub, "link", "set", "br0", "up")
	nodes := make([]ns, k)
	for i := range nodes {
		n := ns{name: fmt.Sprintf("gohfi-fab%d-%c", pid, 'a'+i), dev: fmt.Sprintf("g%c%d", 'a'+i, pid),
			addr: netip.AddrFrom4([4]byte{10, 202, byte(pid % 250), byte(1 + i)})}
		addNamespace(t, n.name)
		hubEnd := fmt.Sprintf("h%c%d", 'a'+i, pid)
		run(t, "ip", "-n", n.name, "link", "add", n.dev, "type", "veth", "peer", "name", hubEnd, "netns", hub)
		run(t, "ip", "-n", hub, "link", "set", hubEnd, "master", "br0")
		run(t, "ip", "-n", hub, "link", "set", hubEnd, "up")
		run(t, "ip", "-n", n.name, "addr", "add", n.addr.String()+"/24", "dev", n.dev)
		run(t, "ip", "-n", n.name, "link", "set", n.dev, "up")
		nodes[i] = n
	}
	return nodes
}

// relayed makes namespaces a and b on one subnet (10.203.P.1 and .2/24)
// whose veth pairs end in a middle namespace, not joined there: the
// frames cross only through the relay returned, which the caller starts.
func relayed(t *testing.T) (a, b ns, mid [2]ns) {
	t.Helper()
	requireNetns(t)
	pid := os.Getpid()
	m := fmt.Sprintf("gohfi-fab%d-mid", pid)
	addNamespace(t, m)
	a = ns{name: fmt.Sprintf("gohfi-fab%d-ra", pid), dev: fmt.Sprintf("gra%d", pid),
		addr: netip.AddrFrom4([4]byte{10, 203, byte(pid % 250), 1})}
	b = ns{name: fmt.Sprintf("gohfi-fab%d-rb", pid), dev: fmt.Sprintf("grb%d", pid),
		addr: netip.AddrFrom4([4]byte{10, 203, byte(pid % 250), 2})}
	for i, n := range []ns{a, b} {
		addNamespace(t, n.name)
		mid[i] = ns{name: m, dev: fmt.Sprintf("m%c%d", 'a'+i, pid)}
		run(t, "ip", "-n", n.name, "link", "add", n.dev, "type", "veth", "peer", "name", mid[i].dev, "netns", m)
		// The relay's packet sockets see frames for the other side's
		// address: promiscuous, as a bridge port is.
		run(t, "ip", "-n", m, "link", "set", mid[i].dev, "promisc", "on")
		run(t, "ip", "-n", m, "link", "set", mid[i].dev, "up")
		run(t, "ip", "-n", n.name, "addr", "add", n.addr.String()+"/24", "dev", n.dev)
		run(t, "ip", "-n", n.name, "link", "set", n.dev, "up")
	}
	return a, b, mid
}
