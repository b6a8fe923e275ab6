package main

import (
	"fmt"
	"net/netip"
	"strconv"

	"github.com/gohfi/gohfi/driver"
)

// The network port (docs/fabric.md): the device's own address as a GID,
// the peer table MODIFY_QP's dest_port indexes, the port's counters.

func cmdPeer(s *session, args []string) (obj, error) {
	return subcommand(s, "peer", args, map[string]func(*session, []string) (obj, error){
		"add":  peerAdd,
		"del":  peerDel,
		"show": peerShow,
	})
}

func parsePeerIndex(arg string) (int, error) {
	i, err := strconv.Atoi(arg)
	if err != nil {
		return 0, usageErr("peer %q: want an entry number (1..)", arg)
	}
	return i, nil
}

func peerAdd(s *session, args []string) (obj, error) {
	pos, err := parseArgs(newFlags("peer"), args, 2, 2)
	if err != nil {
		return nil, err
	}
	i, err := parsePeerIndex(pos[0])
	if err != nil {
		return nil, err
	}
	addr, err := netip.ParseAddrPort(pos[1])
	if err != nil {
		return nil, usageErr("peer address %q: want ADDR:PORT ([ADDR]:PORT for IPv6): %v", pos[1], err)
	}
	a, err := s.device()
	if err != nil {
		return nil, err
	}
	if err := a.Device.SetPeer(i, addr); err != nil {
		return nil, err
	}
	return obj{{"peer", i}, {"addr", addr.String()}, {"gid", gidString(addr.Addr())}}, nil
}

func peerDel(s *session, args []string) (obj, error) {
	pos, err := parseArgs(newFlags("peer"), args, 1, 1)
	if err != nil {
		return nil, err
	}
	i, err := parsePeerIndex(pos[0])
	if err != nil {
		return nil, err
	}
	a, err := s.device()
	if err != nil {
		return nil, err
	}
	return obj{{"peer", i}}, a.Device.DelPeer(i)
}

// peerShow prints the port's address and GID (as ibv_devinfo -v prints
// GID[0]), the valid peers and the port's counters.
func peerShow(s *session, args []string) (obj, error) {
	if _, err := parseArgs(newFlags("peer"), args, 0, 0); err != nil {
		return nil, err
	}
	a, err := s.device()
	if err != nil {
		return nil, err
	}
	own, err := a.Device.PortAddr()
	if err != nil {
		return nil, err
	}
	peers, err := a.Device.Peers()
	if err != nil {
		return nil, err
	}
	co, err := netCounters(a.Device)
	if err != nil {
		return nil, err
	}
	var ps []obj
	for _, p := range peers {
		ps = append(ps, obj{{"peer", p.Index}, {"addr", p.Addr.String()}, {"gid", gidString(p.Addr.Addr())}})
	}
	return obj{{"addr", own.String()}, {"gid", gidString(own.Addr())}, {"peers", ps}, {"counters", co}}, nil
}

// gidString is a GID as rdma-core prints one: eight groups of four hex
// digits.
func gidString(a netip.Addr) string {
	g := driver.GID(a)
	var out string
	for i := 0; i < 16; i += 2 {
		if i > 0 {
			out += ":"
		}
		out += fmt.Sprintf("%02x%02x", g[i], g[i+1])
	}
	return out
}

// netCounters is the port's counters as an object, by name.
func netCounters(d *driver.Device) (obj, error) {
	cnt, err := d.NetCounters()
	if err != nil {
		return nil, err
	}
	var co obj
	for _, c := range cnt {
		co.add(c.Name, c.Value)
	}
	return co, nil
}
