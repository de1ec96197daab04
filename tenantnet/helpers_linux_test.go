package tenantnet

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"nstarget/fleet"
)

// failAfter bounds every wait of the tests. It is a failure deadline, never a pause: each wait
// returns as soon as its event happens.
const failAfter = 20 * time.Second

// offLink is an address the gateway side owns outside every tenant prefix: connecting from it
// proves the tenant's default route.
var offLink = netip.MustParsePrefix("198.51.100.1/32")

// lab is one test's world: a directory of tenant namespaces, another of "switch" namespaces
// (names tnt-<pid>-...), and veth pairs whose root ends (tn<pid>p<i>) are the tenants' parents.
// Its cleanup, registered first, runs last and removes all of it even when the test failed.
type lab struct {
	t      testing.TB
	pid    int
	dir    string // tenant namespaces
	swDir  string // switch and gateway namespaces
	mu     sync.Mutex
	seq    int
	nets   []*Net
	veths  []string
	parIdx map[int]bool
}

func newLab(t testing.TB) *lab {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("needs root: namespaces, mounts and links")
	}
	base := t.TempDir()
	l := &lab{t: t, pid: os.Getpid(), dir: filepath.Join(base, "tenants"), swDir: filepath.Join(base, "switch"), parIdx: map[int]bool{}}
	for _, d := range []string{l.dir, l.swDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(l.cleanup)
	return l
}

func (l *lab) cleanup() {
	t := l.t
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, n := range l.nets {
		if err := n.Down(); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	}
	// Veths before the switch namespaces: destroying a namespace deletes its veth ends, and
	// with them the root ends, asynchronously.
	for _, name := range l.veths {
		link, err := netlink.LinkByName(name)
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			continue
		}
		if err == nil {
			err = netlink.LinkDel(link)
		}
		if err != nil && !errors.Is(err, unix.ENODEV) {
			t.Errorf("cleanup: delete veth %s: %v", name, err)
		}
	}
	for _, dir := range []string{l.dir, l.swDir} {
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			if err := fleet.Delete(dir, e.Name()); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
	}
}

func (l *lab) next() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.seq++
	return l.seq
}

// up calls Up and has the lab Down the result at cleanup.
func (l *lab) up(name string, spec Spec) (*Net, error) {
	n, err := Up(l.dir, name, spec)
	if err == nil {
		l.mu.Lock()
		l.nets = append(l.nets, n)
		l.mu.Unlock()
	}
	return n, err
}

func (l *lab) mustUp(name string, spec Spec) *Net {
	l.t.Helper()
	n, err := l.up(name, spec)
	if err != nil {
		l.t.Fatal(err)
	}
	return n
}

// ns is a test-made namespace: an fd that pins it and an rtnetlink handle inside it.
type ns struct {
	path string
	fd   int
	h    *netlink.Handle
}

func (l *lab) addNs(name string) *ns {
	t := l.t
	t.Helper()
	if _, err := fleet.Add(l.swDir, name); err != nil {
		t.Fatal(err)
	}
	s := &ns{path: filepath.Join(l.swDir, name)}
	s.fd = openNs(t, s.path)
	s.h = handleIn(t, s.fd)
	t.Cleanup(func() { s.h.Close(); unix.Close(s.fd) })
	return s
}

func openNs(t testing.TB, path string) int {
	t.Helper()
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return fd
}

func handleIn(t testing.TB, fd int) *netlink.Handle {
	t.Helper()
	var h *netlink.Handle
	if err := inNamespace(fd, func() (err error) { h, err = netlink.NewHandle(unix.NETLINK_ROUTE); return }); err != nil {
		t.Fatal(err)
	}
	return h
}

// segment is a veth pair: parent (root namespace, up) and its peer inside the switch namespace.
type segment struct {
	l      *lab
	parent string
	sw     *ns
	peer   netlink.Link
}

func (l *lab) newSegment() *segment {
	t := l.t
	t.Helper()
	i := l.next()
	sw := l.addNs(fmt.Sprintf("tnt-%d-sw%d", l.pid, i))
	parent, peer := fmt.Sprintf("tn%dp%d", l.pid, i), fmt.Sprintf("tn%dq%d", l.pid, i)
	if len(parent) > 15 {
		t.Fatalf("veth name %q too long", parent)
	}
	l.mu.Lock()
	l.veths = append(l.veths, parent)
	l.mu.Unlock()
	attrs := netlink.NewLinkAttrs()
	attrs.Name = parent
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: attrs, PeerName: peer, PeerNamespace: netlink.NsFd(sw.fd)}); err != nil {
		t.Fatalf("create veth %s: %v", parent, err)
	}
	pl, err := netlink.LinkByName(parent)
	if err != nil {
		t.Fatal(err)
	}
	l.mu.Lock()
	l.parIdx[pl.Attrs().Index] = true
	l.mu.Unlock()
	if err := netlink.LinkSetUp(pl); err != nil {
		t.Fatal(err)
	}
	s := &segment{l: l, parent: parent, sw: sw}
	if s.peer, err = sw.h.LinkByName(peer); err != nil {
		t.Fatal(err)
	}
	if err := sw.h.LinkSetUp(s.peer); err != nil {
		t.Fatal(err)
	}
	return s
}

// gw is where a tenant's gateway address lives: the switch namespace's veth end for untagged
// traffic, or a VLAN interface on it moved into a namespace of its own (so that several VLANs
// can reuse one subnet, as the tenants do).
type gw struct {
	*ns
	ifindex int
	addr    netip.Prefix
}

func (s *segment) untaggedGateway(addr netip.Prefix) *gw {
	t := s.l.t
	t.Helper()
	g := &gw{ns: s.sw, ifindex: s.peer.Attrs().Index, addr: addr}
	g.addAddrs(t, s.peer)
	return g
}

// vlanGateway skips the test if the kernel has no 802.1Q support.
func (s *segment) vlanGateway(vlan int, addr netip.Prefix) *gw {
	t := s.l.t
	t.Helper()
	gns := s.l.addNs(fmt.Sprintf("tnt-%d-gw%dv%d", s.l.pid, s.l.next(), vlan))
	attrs := netlink.NewLinkAttrs()
	attrs.Name = fmt.Sprintf("v%d", vlan)
	attrs.ParentIndex = s.peer.Attrs().Index
	attrs.Namespace = netlink.NsFd(gns.fd)
	attrs.Flags = net.FlagUp
	if err := s.sw.h.LinkAdd(&netlink.Vlan{LinkAttrs: attrs, VlanId: vlan}); err != nil {
		if errors.Is(err, unix.EOPNOTSUPP) {
			t.Skipf("this kernel has no 802.1Q (vlan) support: %v", err)
		}
		t.Fatalf("create gateway vlan %d: %v", vlan, err)
	}
	link, err := gns.h.LinkByName(attrs.Name)
	if err != nil {
		t.Fatal(err)
	}
	g := &gw{ns: gns, ifindex: link.Attrs().Index, addr: addr}
	g.addAddrs(t, link)
	return g
}

func (g *gw) addAddrs(t testing.TB, link netlink.Link) {
	t.Helper()
	for _, p := range []netip.Prefix{g.addr, offLink} {
		a := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), 32)}}
		if err := g.h.AddrAdd(link, a); err != nil {
			t.Fatalf("gateway address %s: %v", p, err)
		}
	}
}

// arpCapture is an AF_PACKET socket on the gateway's interface receiving ARP only.
type arpCapture struct{ fd int }

func (g *gw) captureARP(t testing.TB) *arpCapture {
	t.Helper()
	c := &arpCapture{fd: -1}
	err := inNamespace(g.fd, func() error {
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ARP)))
		if err != nil {
			return err
		}
		c.fd = fd
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ARP), Ifindex: g.ifindex})
	})
	if c.fd >= 0 {
		t.Cleanup(func() { unix.Close(c.fd) })
	}
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// waitGratuitous waits for an ARP whose sender and target protocol addresses are both ip and
// whose sender hardware address is mac, and returns it.
func (c *arpCapture) waitGratuitous(t testing.TB, ip netip.Addr, mac net.HardwareAddr) []byte {
	t.Helper()
	deadline := time.Now().Add(failAfter)
	buf := make([]byte, 1500)
	a := ip.As4()
	seen := 0
	for {
		left := time.Until(deadline)
		if left <= 0 {
			t.Fatalf("no gratuitous ARP for %s from %s within %v (%d other ARP packets)", ip, mac, failAfter, seen)
		}
		pfd := []unix.PollFd{{Fd: int32(c.fd), Events: unix.POLLIN}}
		if _, err := unix.Poll(pfd, int(left/time.Millisecond)+1); err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			t.Fatal(err)
		}
		for {
			n, _, err := unix.Recvfrom(c.fd, buf, unix.MSG_DONTWAIT)
			if errors.Is(err, unix.EAGAIN) {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			p := buf[:n]
			if n >= 28 && binary.BigEndian.Uint16(p[0:]) == 1 && binary.BigEndian.Uint16(p[2:]) == unix.ETH_P_IP &&
				p[4] == 6 && p[5] == 4 && bytes.Equal(p[8:14], mac) && bytes.Equal(p[14:18], a[:]) && bytes.Equal(p[24:28], a[:]) {
				return append([]byte(nil), p...)
			}
			seen++
		}
	}
}

// checkServes proves the tenant reachable from the gateway side: a TCP listener opened inside
// the tenant namespace echoes what a client in the gateway namespace sends, from the gateway
// address (on-link) and from offLink (only through the tenant's default route).
func checkServes(t testing.TB, g *gw, n *Net) {
	t.Helper()
	tfd := openNs(t, n.Path())
	defer unix.Close(tfd)
	var ln net.Listener
	if err := inNamespace(tfd, func() (err error) {
		ln, err = net.Listen("tcp4", netip.AddrPortFrom(n.Spec().Address.Addr(), 0).String())
		return
	}); err != nil {
		t.Fatalf("listen inside tenant %s: %v", n.Name(), err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()
	sources := []netip.Addr{g.addr.Addr()}
	if n.Spec().Gateway.IsValid() {
		sources = append(sources, offLink.Addr())
	}
	for _, src := range sources {
		var c net.Conn
		err := inNamespace(g.fd, func() (err error) {
			d := net.Dialer{Timeout: failAfter, LocalAddr: &net.TCPAddr{IP: src.AsSlice()}}
			c, err = d.Dial("tcp4", ln.Addr().String())
			return
		})
		if err != nil {
			t.Fatalf("tenant %s: connect from %s to %s: %v", n.Name(), src, ln.Addr(), err)
		}
		c.SetDeadline(time.Now().Add(failAfter))
		msg := []byte("hello " + n.Name())
		got := make([]byte, len(msg))
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("tenant %s: echo from %s: %q, %v", n.Name(), src, got, err)
		}
		c.Close()
	}
}

// checkConfigured looks inside the tenant namespace: eth0 up with the address and MTU, lo up,
// the default route via the gateway, and no other link.
func checkConfigured(t testing.TB, n *Net, wantMTU int) {
	t.Helper()
	fd := openNs(t, n.Path())
	defer unix.Close(fd)
	h := handleIn(t, fd)
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	up := map[string]bool{}
	for _, l := range links {
		up[l.Attrs().Name] = l.Attrs().Flags&net.FlagUp != 0
	}
	for _, name := range []string{"lo", IfName} {
		if !up[name] {
			t.Errorf("tenant %s: %s missing or not up", n.Name(), name)
		}
	}
	if got := tenantLinksIn(t, fd); !slices.Equal(got, []string{IfName + "/" + n.Spec().Mode}) {
		t.Errorf("tenant %s: vlan/macvlan links %v, want only %s", n.Name(), got, IfName)
	}
	eth, err := h.LinkByName(IfName)
	if err != nil {
		t.Fatal(err)
	}
	spec := n.Spec()
	if eth.Type() != spec.Mode {
		t.Errorf("tenant %s: %s is a %s, want %s", n.Name(), IfName, eth.Type(), spec.Mode)
	}
	if v, ok := eth.(*netlink.Vlan); ok && v.VlanId != spec.VLAN {
		t.Errorf("tenant %s: vlan id %d, want %d", n.Name(), v.VlanId, spec.VLAN)
	}
	if m, ok := eth.(*netlink.Macvlan); ok && m.Mode != netlink.MACVLAN_MODE_BRIDGE {
		t.Errorf("tenant %s: macvlan mode %v, want bridge", n.Name(), m.Mode)
	}
	if eth.Attrs().MTU != wantMTU {
		t.Errorf("tenant %s: MTU %d, want %d", n.Name(), eth.Attrs().MTU, wantMTU)
	}
	if !bytes.Equal(eth.Attrs().HardwareAddr, n.HardwareAddr()) {
		t.Errorf("tenant %s: MAC %s, Net says %s", n.Name(), eth.Attrs().HardwareAddr, n.HardwareAddr())
	}
	addrs, err := h.AddrList(eth, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	if len(addrs) != 1 || addrs[0].IPNet.String() != spec.Address.String() {
		t.Errorf("tenant %s: addresses %v, want %s", n.Name(), addrs, spec.Address)
	}
	routes, err := h.RouteList(eth, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, r := range routes {
		if (r.Dst == nil || r.Dst.IP.IsUnspecified()) && r.Gw != nil {
			gw, _ := netip.AddrFromSlice(r.Gw.To4())
			found = gw == spec.Gateway
		}
	}
	if found != spec.Gateway.IsValid() {
		t.Errorf("tenant %s: default route via %v: found=%v in %v", n.Name(), spec.Gateway, found, routes)
	}
}

// snapshot is what the leak checks compare: mounts under the tenant directory, files in it, and
// the root namespace's links that sit on a lab parent or carry the lab's prefix.
func (l *lab) checkNothingLeft(t testing.TB) {
	t.Helper()
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(mi), "\n") {
		if strings.Contains(line, " "+l.dir+"/") {
			t.Errorf("mount left behind: %s", line)
		}
	}
	ents, err := os.ReadDir(l.dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		t.Errorf("file left behind: %s", filepath.Join(l.dir, e.Name()))
	}
	links, err := netlink.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	ours := map[string]bool{}
	for _, v := range l.veths {
		ours[v] = true
	}
	for _, k := range links {
		a := k.Attrs()
		if l.parIdx[a.ParentIndex] || (strings.HasPrefix(a.Name, fmt.Sprintf("tn%d", l.pid)) && !ours[a.Name]) {
			t.Errorf("link left in the root namespace: %s (%s, parent index %d)", a.Name, k.Type(), a.ParentIndex)
		}
	}
}

// tenantLinksIn lists the vlan and macvlan links of a namespace held open by fd.
func tenantLinksIn(t testing.TB, fd int) []string {
	t.Helper()
	h := handleIn(t, fd)
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, k := range links {
		if k.Type() == "vlan" || k.Type() == "macvlan" {
			out = append(out, k.Attrs().Name+"/"+k.Type())
		}
	}
	return out
}

func macvlanSpec(parent, addr, gateway string) Spec {
	s := Spec{Parent: parent, Mode: ModeMacvlan, Address: netip.MustParsePrefix(addr)}
	if gateway != "" {
		s.Gateway = netip.MustParseAddr(gateway)
	}
	return s
}
