package tenantnet

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"nstarget/fleet"
)

// netSys holds what a Net keeps inside its namespace. Both sockets were created on a thread
// inside the namespace and stay bound to it wherever they are used from, so Down and Announce
// need no setns.
type netSys struct {
	h     *netlink.Handle // rtnetlink, inside the tenant namespace
	arpFd int             // AF_PACKET/SOCK_DGRAM, protocol 0 (sends only, never queues input)
}

// testHook, if set (by tests only), is called before each step of Up; an error fails that step.
var testHook func(step string) error

// Steps of Up, as named in its errors.
const (
	stepParent    = "look up parent"
	stepLeftovers = "remove leftovers"
	stepNamespace = "create namespace"
	stepOpen      = "open namespace"
	stepEnter     = "open sockets inside namespace"
	stepLink      = "create link"
	stepLookup    = "look up " + IfName
	stepAddress   = "add address"
	stepRoute     = "add default route"
	stepARP       = "send gratuitous ARP"
)

func up(dir, name string, spec Spec) (*Net, error) {
	if name == "" || name == "." || name == ".." || filepath.Base(name) != name {
		return nil, fmt.Errorf("tenantnet: tenant name %q: not a valid file name", name)
	}
	if err := spec.Validate(); err != nil {
		return nil, fmt.Errorf("tenantnet: tenant %q: invalid spec: %w", name, err)
	}
	if err := checkHome(); err != nil {
		return nil, fmt.Errorf("tenantnet: tenant %q: %w", name, err)
	}
	n := &Net{dir: dir, name: name, path: filepath.Join(dir, name), spec: spec, sys: netSys{arpFd: -1}}
	var undo []func() error
	fail := func(step string, err error) (*Net, error) {
		err = fmt.Errorf("tenantnet: tenant %q: %s: %w", name, step, err)
		var uerrs []error
		for i := len(undo) - 1; i >= 0; i-- {
			if uerr := undo[i](); uerr != nil {
				uerrs = append(uerrs, uerr)
			}
		}
		if len(uerrs) > 0 {
			err = fmt.Errorf("%w; undo: %w", err, errors.Join(uerrs...))
		}
		return nil, err
	}
	hook := func(step string) error {
		if testHook != nil {
			return testHook(step)
		}
		return nil
	}

	// The parent, read through a socket of the calling thread's namespace: the root one, since
	// no thread of this process runs elsewhere unlocked.
	if err := hook(stepParent); err != nil {
		return fail(stepParent, err)
	}
	parent, err := netlink.LinkByName(spec.Parent)
	if err != nil {
		return fail(stepParent, fmt.Errorf("Spec.Parent %q: %w", spec.Parent, err))
	}
	pa := parent.Attrs()
	if pa.Flags&net.FlagUp == 0 {
		return fail(stepParent, fmt.Errorf("Spec.Parent %q is down (tenantnet never changes the parent)", spec.Parent))
	}
	if spec.MTU > pa.MTU {
		return fail(stepParent, fmt.Errorf("Spec.MTU %d is above the MTU %d of Spec.Parent %q", spec.MTU, pa.MTU, spec.Parent))
	}

	if err := hook(stepLeftovers); err != nil {
		return fail(stepLeftovers, err)
	}
	if err := removeLeftovers(dir, name); err != nil {
		return fail(stepLeftovers, err)
	}

	if err := hook(stepNamespace); err != nil {
		return fail(stepNamespace, err)
	}
	if n.id, err = fleet.Add(dir, name); err != nil {
		return fail(stepNamespace, err)
	}
	undo = append(undo, func() error { return fleet.Delete(dir, name) })

	if err := hook(stepOpen); err != nil {
		return fail(stepOpen, err)
	}
	nsFd, err := openNamespace(n.path, n.id)
	if err != nil {
		return fail(stepOpen, err)
	}
	defer unix.Close(nsFd)

	if err := hook(stepEnter); err != nil {
		return fail(stepEnter, err)
	}
	if err := inNamespace(nsFd, func() error {
		var err error
		if n.sys.h, err = netlink.NewHandle(unix.NETLINK_ROUTE); err != nil {
			return fmt.Errorf("rtnetlink socket: %w", err)
		}
		// Protocol 0: the socket receives nothing; sendto names the protocol per packet.
		if n.sys.arpFd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0); err != nil {
			return fmt.Errorf("AF_PACKET socket: %w", err)
		}
		return nil
	}); err != nil {
		n.closeSockets()
		return fail(stepEnter, err)
	}
	undo = append(undo, func() error { n.closeSockets(); return nil })

	if err := hook(stepLink); err != nil {
		return fail(stepLink, err)
	}
	undo = append(undo, func() error { return deleteTenantLinks(n.sys.h) })
	if err := newLinkIn(nsFd, pa.Index, spec); err != nil {
		return fail(stepLink, linkAddError(spec, err))
	}

	if err := hook(stepLookup); err != nil {
		return fail(stepLookup, err)
	}
	eth, err := n.sys.h.LinkByName(IfName)
	if err != nil {
		return fail(stepLookup, err)
	}
	n.ifindex, n.mac = eth.Attrs().Index, eth.Attrs().HardwareAddr
	if len(n.mac) != 6 {
		return fail(stepLookup, fmt.Errorf("%s has no Ethernet address (%v)", IfName, n.mac))
	}

	if err := hook(stepAddress); err != nil {
		return fail(stepAddress, err)
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{
		IP:   spec.Address.Addr().AsSlice(),
		Mask: net.CIDRMask(spec.Address.Bits(), 32),
	}}
	if err := n.sys.h.AddrAdd(eth, addr); err != nil {
		return fail(stepAddress, fmt.Errorf("%s: %w", spec.Address, err))
	}

	if spec.Gateway.IsValid() {
		if err := hook(stepRoute); err != nil {
			return fail(stepRoute, err)
		}
		r := &netlink.Route{LinkIndex: n.ifindex, Gw: spec.Gateway.AsSlice()}
		if err := n.sys.h.RouteAdd(r); err != nil {
			return fail(stepRoute, fmt.Errorf("via %s: %w", spec.Gateway, err))
		}
	}

	if err := hook(stepARP); err != nil {
		return fail(stepARP, err)
	}
	if err := n.announceLocked(); err != nil {
		return fail(stepARP, err)
	}
	return n, nil
}

// newLinkIn creates eth0, up, on the parent, directly inside the tenant namespace nsFd: the
// request goes to the root namespace, where IFLA_LINK (the parent's index) is resolved, and
// IFLA_NET_NS_FD places the new link in the tenant namespace under its final name. No temporary
// name, no move, no rename, one request, and never a moment where a crash leaves the link in the
// root namespace. (The request is built here rather than by netlink.LinkAdd, which afterwards
// looks the new link's name up again in the root namespace, where "eth0" is likely the host's
// own interface: a wasted round trip that yields the wrong index.)
func newLinkIn(nsFd, parentIndex int, spec Spec) error {
	req := nl.NewNetlinkRequest(unix.RTM_NEWLINK, unix.NLM_F_CREATE|unix.NLM_F_EXCL|unix.NLM_F_ACK)
	msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
	msg.Flags, msg.Change = unix.IFF_UP, unix.IFF_UP
	req.AddData(msg)
	req.AddData(nl.NewRtAttr(unix.IFLA_LINK, nl.Uint32Attr(uint32(parentIndex))))
	req.AddData(nl.NewRtAttr(unix.IFLA_IFNAME, nl.ZeroTerminated(IfName)))
	if spec.MTU > 0 {
		req.AddData(nl.NewRtAttr(unix.IFLA_MTU, nl.Uint32Attr(uint32(spec.MTU))))
	}
	req.AddData(nl.NewRtAttr(unix.IFLA_NET_NS_FD, nl.Uint32Attr(uint32(nsFd))))
	info := nl.NewRtAttr(unix.IFLA_LINKINFO, nil)
	info.AddRtAttr(unix.IFLA_INFO_KIND, nl.NonZeroTerminated(spec.Mode))
	data := info.AddRtAttr(unix.IFLA_INFO_DATA, nil)
	if spec.Mode == ModeVLAN {
		data.AddRtAttr(unix.IFLA_VLAN_ID, nl.Uint16Attr(uint16(spec.VLAN)))
	} else {
		data.AddRtAttr(unix.IFLA_MACVLAN_MODE, nl.Uint32Attr(macvlanModeBridge))
	}
	req.AddData(info)
	_, err := req.Execute(unix.NETLINK_ROUTE, 0)
	return err
}

const macvlanModeBridge = 4 // MACVLAN_MODE_BRIDGE, linux/if_link.h

// homeID is the id of the process's own network namespace, read by package initialisation,
// before any thread of this package could have left it. (Not /proc/self/ns/net: that is the main
// thread's, and the main thread may be the one a goroutine locked for a moment into a tenant
// namespace, unless something like netnsmux keeps it locked.)
var homeID, homeErr = threadNamespaceID()

func threadNamespaceID() (uint64, error) {
	fd, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	return unix.IoctlGetUint64(fd, unix.NS_GET_ID)
}

// checkHome refuses to run on a thread that is not in the process's own network namespace, e.g.
// from inside netnsmux's Do: Up creates its root-namespace sockets on the calling thread.
func checkHome() error {
	id, err := threadNamespaceID()
	if err == nil {
		err = homeErr
	}
	if err != nil {
		return fmt.Errorf("identify the calling thread's network namespace: %w", err)
	}
	if id != homeID {
		return errors.New("called on a thread outside the process's network namespace (from inside netnsmux.Do?)")
	}
	return nil
}

// linkAddError makes the usual RTM_NEWLINK failures say what they mean here.
func linkAddError(spec Spec, err error) error {
	what := fmt.Sprintf("%s on %q", spec.Mode, spec.Parent)
	if spec.Mode == ModeVLAN {
		what = fmt.Sprintf("vlan %d on %q", spec.VLAN, spec.Parent)
	}
	switch {
	case errors.Is(err, unix.EOPNOTSUPP):
		return fmt.Errorf("%s: the kernel has no %s support: %w", what, spec.Mode, err)
	case errors.Is(err, unix.EEXIST) && spec.Mode == ModeVLAN:
		return fmt.Errorf("%s: that VLAN already exists on the parent (another tenant, the root namespace, or a leftover not reachable through its path): %w", what, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

func (n *Net) downLocked() error {
	var errs []error
	if n.sys.h != nil {
		err := n.sys.h.LinkDel(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: n.ifindex}})
		if err != nil && !errors.Is(err, unix.ENODEV) {
			errs = append(errs, fmt.Errorf("delete %s: %w", IfName, err))
		}
	}
	n.closeSockets()
	// Unmount and remove only if the path still holds our namespace.
	if fd, err := unix.Open(n.path, unix.O_RDONLY|unix.O_CLOEXEC, 0); err == nil {
		id, err := unix.IoctlGetUint64(fd, unix.NS_GET_ID)
		unix.Close(fd)
		if err == nil && id == n.id {
			if err := fleet.Delete(n.dir, n.name); err != nil {
				errs = append(errs, err)
			}
		}
	} else if !errors.Is(err, unix.ENOENT) {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("tenantnet: tenant %q: down: %w", n.name, err)
	}
	return nil
}

func (n *Net) closeSockets() {
	if n.sys.h != nil {
		n.sys.h.Close()
		n.sys.h = nil
	}
	if n.sys.arpFd >= 0 {
		unix.Close(n.sys.arpFd)
		n.sys.arpFd = -1
	}
}

// announceLocked broadcasts a gratuitous ARP request for the tenant's address on eth0 (the
// RFC 5227 announcement form the kernel's arp_notify also sends: sender and target protocol
// address both the tenant's, target hardware address zero). The AF_PACKET socket was opened
// inside the namespace, so the ifindex is resolved there, from whatever thread sends.
func (n *Net) announceLocked() error {
	var p [28]byte
	binary.BigEndian.PutUint16(p[0:], unix.ARPHRD_ETHER)
	binary.BigEndian.PutUint16(p[2:], unix.ETH_P_IP)
	p[4], p[5] = 6, 4
	binary.BigEndian.PutUint16(p[6:], 1) // ARPOP_REQUEST
	ip := n.spec.Address.Addr().As4()
	copy(p[8:14], n.mac)
	copy(p[14:18], ip[:])
	copy(p[24:28], ip[:])
	sa := &unix.SockaddrLinklayer{
		Protocol: htons(unix.ETH_P_ARP),
		Ifindex:  n.ifindex,
		Halen:    6,
		Addr:     [8]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff},
	}
	// ENOBUFS is a full queue on the way out (a veth's backlog, while hundreds of tenants
	// come up at once): it drains within milliseconds, so the announcement is tried again
	// for a while rather than failing the tenant's whole network over it.
	var err error
	for wait := time.Millisecond; ; wait *= 2 {
		if err = unix.Sendto(n.sys.arpFd, p[:], 0, sa); !errors.Is(err, unix.ENOBUFS) || wait > 128*time.Millisecond {
			return err
		}
		time.Sleep(wait)
	}
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// openNamespace opens the namespace file at path and checks it is still namespace id.
func openNamespace(path string, id uint64) (int, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	got, err := unix.IoctlGetUint64(fd, unix.NS_GET_ID)
	if err == nil && got != id {
		err = fmt.Errorf("%s now holds namespace %d, not the %d just created", path, got, id)
	}
	if err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// removeLeftovers clears dir/name for a new namespace: if a namespace is mounted there (a
// previous owner on this node that crashed or never called Down), its tenant links are deleted
// first — at once, freeing the VLAN id on the parent and silencing the old address even if
// something still pins that namespace — then fleet.Delete detaches the mount and removes the
// file (or an empty placeholder; anything else there is an error and left alone).
func removeLeftovers(dir, name string) error {
	path := filepath.Join(dir, name)
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return err
	}
	if st.Type == unix.NSFS_MAGIC {
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		var h *netlink.Handle
		err = inNamespace(fd, func() error {
			var err error
			h, err = netlink.NewHandle(unix.NETLINK_ROUTE)
			return err
		})
		unix.Close(fd)
		if err != nil {
			return fmt.Errorf("old namespace: %w", err)
		}
		err = deleteTenantLinks(h)
		h.Close()
		if err != nil {
			return fmt.Errorf("old namespace: %w", err)
		}
	}
	return fleet.Delete(dir, name)
}

// deleteTenantLinks deletes, through h, every vlan and macvlan link of h's namespace: the kinds
// tenantnet creates, and the ones that hold something on a parent (a VLAN id, a MAC address).
// Other links are left to die with the namespace.
func deleteTenantLinks(h *netlink.Handle) error {
	if h == nil {
		return nil
	}
	links, err := h.LinkList()
	if err != nil {
		return fmt.Errorf("list links: %w", err)
	}
	var errs []error
	for _, l := range links {
		switch l.Type() {
		case "vlan", "macvlan":
			if err := h.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
				errs = append(errs, fmt.Errorf("delete %s: %w", l.Attrs().Name, err))
			}
		}
	}
	return errors.Join(errs...)
}

// inNamespace runs fn inside the namespace nsFd on a thread of its own (fleet.In). fn should
// only create sockets (they keep this namespace wherever they are used later).
func inNamespace(nsFd int, fn func() error) error { return fleet.In(nsFd, fn) }
