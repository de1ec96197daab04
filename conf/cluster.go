package conf

import (
	"net/netip"
	"slices"
	"strings"
	"time"

	"nstarget/backend/rbd"
	"nstarget/tenantnet"
)

// Backends, as server.backend names them.
const (
	BackendFile = "file" // the pool of sparse files under data_dir (default)
	BackendRBD  = "rbd"  // Ceph RBD images, reachable from every node ([server.rbd])
)

// RBD is [server.rbd]: the Ceph cluster and pool that hold the volumes.
type RBD struct {
	Conf      string        // ceph.conf (absolute)
	Pool      string        // RADOS pool of the images
	Client    string        // cephx user without "client."
	OpTimeout time.Duration // bound on every cluster operation
}

// Cluster is [cluster]: this node's part in a cluster of nstarget nodes that share the
// tenants published in etcd (`nstarget cluster apply`). A node's own file has no tenants.
type Cluster struct {
	Endpoints []string      // etcd client URLs
	Name      string        // this node, unique in the cluster
	Address   string        // shown by `cluster status`; optional
	Prefix    string        // etcd key prefix
	LeaseTTL  time.Duration // how long a silent node keeps its tenants
	// Uplink is this node's interface for tenant networks that name no parent: nodes need
	// not name their NICs alike for a tenant to move between them.
	Uplink string
	// Standby keeps the images of the tenants this node would take over if another node
	// died open without their locks (a hot standby), so a takeover only fences, locks and
	// serves. It costs one open image handle (and its watch on the OSDs) per such image.
	Standby bool
	Line    int
}

// DefaultClusterPrefix and DefaultLeaseTTL are [cluster]'s defaults.
const (
	DefaultClusterPrefix = "/nstarget"
	DefaultLeaseTTL      = 10 * time.Second
)

// backendKeys reads server.backend and [server.rbd].
func (v *validator) backendKeys(st *table, srv *Server) {
	srv.Backend = st.str("backend", BackendFile, false)
	srv.BackendLine = v.lines.line(st.key("backend"))
	switch srv.Backend {
	case BackendFile:
	case BackendRBD:
		if !rbd.Compiled {
			v.errorf(st.key("backend"), "this nstarget binary was built without the rbd backend (`make build` builds it with -tags rbd; `nstarget version` lists the backends)")
		}
	default:
		v.errorf(st.key("backend"), "%q is not a backend: %q or %q", srv.Backend, BackendFile, BackendRBD)
	}
	rt := st.sub("rbd")
	if rt == nil {
		if srv.Backend == BackendRBD {
			v.errorf(st.key("backend"), "backend \"rbd\" needs a [server.rbd] table (conf, pool)")
		}
		return
	}
	if srv.Backend != BackendRBD {
		v.errorf(rt.path, "[server.rbd] is only read with server.backend = \"rbd\"")
	}
	srv.RBD.Conf = v.dir(rt, "conf", "/etc/ceph/ceph.conf")
	srv.RBD.Pool = rt.str("pool", "rbd", false)
	srv.RBD.Client = rt.str("client", "admin", false)
	if strings.HasPrefix(srv.RBD.Client, "client.") {
		v.errorf(rt.key("client"), "%q: give the cephx user without \"client.\"", srv.RBD.Client)
	}
	srv.RBD.OpTimeout = rt.duration("op_timeout", rbd.DefaultOpTimeout)
	rt.done()
}

// cluster reads [cluster].
func (v *validator) cluster(t *table, srv *Server) *Cluster {
	c := &Cluster{Line: v.lines.line(t.path), Prefix: DefaultClusterPrefix, LeaseTTL: DefaultLeaseTTL}
	c.Endpoints = t.strings("endpoints")
	if len(c.Endpoints) == 0 {
		v.errorf(t.key("endpoints"), "at least one etcd endpoint (\"http://10.0.0.1:2379\") is required")
	}
	c.Name = t.str("name", "", true)
	if _, set := t.m["name"]; set {
		if err := checkFileName("cluster node name", c.Name); err != nil {
			v.errorf(t.key("name"), "%v", err)
		}
	}
	c.Address = t.str("address", "", false)
	c.Prefix = t.str("prefix", c.Prefix, false)
	if !strings.HasPrefix(c.Prefix, "/") || strings.HasSuffix(c.Prefix, "/") {
		v.errorf(t.key("prefix"), "%q must start with / and not end with it", c.Prefix)
	}
	c.Uplink = t.str("uplink", "", false)
	c.Standby = t.boolean("standby", true)
	c.LeaseTTL = t.duration("lease_ttl", c.LeaseTTL)
	if c.LeaseTTL%time.Second != 0 || c.LeaseTTL < 2*time.Second {
		v.errorf(t.key("lease_ttl"), "%s: etcd leases are whole seconds, at least 2s", c.LeaseTTL)
	}
	if srv.Backend != BackendRBD {
		v.errorf(t.path, "a cluster needs volumes every node can open: set server.backend = \"rbd\"")
	}
	t.done()
	return c
}

// network reads [tenant.network]: the tenant's network, made by the node that serves it.
func (v *validator) network(t *table) *tenantnet.Spec {
	s := &tenantnet.Spec{Parent: t.str("parent", "", false), Mode: t.str("mode", tenantnet.ModeMacvlan, false)}
	if x, ok := t.get("vlan"); ok {
		if n, ok := x.(int64); ok {
			s.VLAN = int(n)
		} else {
			v.errorf(t.key("vlan"), "must be an integer, not %s", tomlType(x))
		}
	}
	if a := t.str("address", "", true); a != "" {
		p, err := netip.ParsePrefix(a)
		if err != nil {
			v.errorf(t.key("address"), "%q is not an address with its prefix length (\"10.0.0.1/24\")", a)
		}
		s.Address = p
	}
	if g := t.str("gateway", "", false); g != "" {
		a, err := netip.ParseAddr(g)
		if err != nil {
			v.errorf(t.key("gateway"), "%q is not an IP address", g)
		}
		s.Gateway = a
	}
	s.MTU = t.count("mtu", 0, 0)
	check := *s
	if check.Parent == "" {
		check.Parent = "uplink" // the serving node's [cluster] uplink, checked when it is known
	}
	if err := check.Validate(); err != nil && s.Address.IsValid() {
		v.errorf(t.path, "%v", err)
	}
	t.done()
	return s
}

// Same reports whether two [cluster] sections say the same.
func (c *Cluster) Same(o *Cluster) bool {
	return slices.Equal(c.Endpoints, o.Endpoints) && c.Name == o.Name && c.Address == o.Address &&
		c.Prefix == o.Prefix && c.LeaseTTL == o.LeaseTTL && c.Uplink == o.Uplink &&
		c.Standby == o.Standby
}
