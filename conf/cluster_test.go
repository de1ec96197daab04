package conf

import (
	"errors"
	"strings"
	"testing"
	"time"

	"nstarget/backend/rbd"
)

const clusterNode = `[server]
backend = "rbd"
  [server.rbd]
  conf = "/etc/ceph/ceph.conf"
  pool = "volumes"

[cluster]
endpoints = ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
name = "node-a"
uplink = "eth1"
lease_ttl = "2s"

[[tenant]]
name = "acme"
  [tenant.network]
  vlan = 100
  mode = "vlan"
  address = "10.0.0.5/24"
  gateway = "10.0.0.254"
`

func TestClusterNodeSectionsParse(t *testing.T) {
	cfg, err := Parse("/etc/nstarget/node.toml", []byte(clusterNode))
	if !rbd.Compiled {
		var es Errors
		if !errors.As(err, &es) || len(es) != 1 || es[0].Line != 2 || es[0].Key != "server.backend" || !strings.Contains(es[0].Msg, "without the rbd backend") {
			t.Fatalf("rbd on a binary without it: %v", err)
		}
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	c := cfg.Cluster
	if c == nil || c.Name != "node-a" || c.Uplink != "eth1" || c.LeaseTTL != 2*time.Second || c.Prefix != DefaultClusterPrefix || len(c.Endpoints) != 2 || !c.Standby {
		t.Fatalf("cluster %+v", c)
	}
	off, err := Parse("/etc/nstarget/node.toml", []byte(strings.Replace(clusterNode, "lease_ttl", "standby = false\nlease_ttl", 1)))
	if err != nil || off.Cluster.Standby || off.Cluster.Same(c) {
		t.Fatalf("standby = false: %v, %+v", err, off.Cluster)
	}
	if r := cfg.Server.RBD; cfg.Server.Backend != BackendRBD || r.Pool != "volumes" || r.Client != "admin" || r.OpTimeout != rbd.DefaultOpTimeout {
		t.Fatalf("rbd %+v", r)
	}
	n := cfg.Tenants[0].Network
	if n == nil || n.Parent != "" || n.VLAN != 100 || n.Address.String() != "10.0.0.5/24" || n.Gateway.String() != "10.0.0.254" {
		t.Fatalf("network %+v", n)
	}
}

func TestClusterAndNetworkMistakesNameTheirKey(t *testing.T) {
	for _, c := range []struct {
		name, doc, key, inMsg string
	}{
		{"cluster on files", "[cluster]\nendpoints = [\"http://e:2379\"]\nname = \"n\"\n", "cluster", `server.backend = "rbd"`},
		{"cluster without endpoints", "[server]\nbackend = \"rbd\"\n[server.rbd]\n[cluster]\nname = \"n\"\n", "cluster.endpoints", "etcd endpoint"},
		{"unknown backend", "[server]\nbackend = \"nfs\"\n", "server.backend", "not a backend"},
		{"rbd table with files", "[server]\n[server.rbd]\npool = \"p\"\n", "server.rbd", "only read with"},
		{"lease in fractions", "[server]\nbackend = \"rbd\"\n[server.rbd]\n[cluster]\nendpoints = [\"http://e:2379\"]\nname = \"n\"\nlease_ttl = \"1500ms\"\n", "cluster.lease_ttl", "whole seconds"},
		{"network address", "[[tenant]]\nname = \"a\"\n[tenant.network]\naddress = \"10.0.0.5\"\n", "tenant[0].network.address", "prefix length"},
		{"network vlan", "[[tenant]]\nname = \"a\"\n[tenant.network]\nmode = \"vlan\"\nvlan = 5000\naddress = \"10.0.0.5/24\"\n", "tenant[0].network", "VLAN 5000"},
	} {
		_, err := Parse("/x.toml", []byte(c.doc))
		var es Errors
		if !errors.As(err, &es) {
			t.Fatalf("%s: %v", c.name, err)
		}
		found := false
		for _, e := range es {
			found = found || (e.Key == c.key && strings.Contains(e.Msg, c.inMsg) && e.Line > 0)
		}
		if !found {
			t.Errorf("%s: want %s: …%s… with a line, got %v", c.name, c.key, c.inMsg, err)
		}
	}
}
