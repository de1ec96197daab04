//go:build linux

package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// TestReadmeTenantNetworkRecipeMakesATenantReachable runs contrib/tenant-network.sh, the
// README's recipe for giving a tenant its network, with a veth standing in for the host's NIC:
// the tenant is served on its address, and a host on the other side of the "NIC" discovers it.
func TestReadmeTenantNetworkRecipeMakesATenantReachable(t *testing.T) {
	_, here, _, _ := runtime.Caller(0)
	script := filepath.Join(filepath.Dir(here), "..", "..", "contrib", "tenant-network.sh")
	nic := fmt.Sprintf("tnic%d", os.Getpid()%100000)
	sw, tenant := prefix+"-tnsw", prefix+"-tnet"
	addNetns(t, sw)
	if err := ipRun("link", "add", nic, "type", "veth", "peer", "name", nic+"p", "netns", sw); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ipRun("link", "del", nic) // takes its peer with it
		if _, err := os.Stat("/run/netns/" + tenant); err == nil {
			ipRun("netns", "del", tenant)
		}
	})
	for _, c := range [][]string{
		{"link", "set", nic, "up"},
		{"-n", sw, "addr", "add", "10.9.0.2/24", "dev", nic + "p"},
		{"-n", sw, "link", "set", nic + "p", "up"},
	} {
		if err := ipRun(c...); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := exec.Command("sh", script, tenant, nic, "10.9.0.1/24").CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", script, err, out)
	}
	dir := t.TempDir()
	s := startServe(t, writeConfig(t, dir, "c.toml", `
[server]
data_dir = "@POOL@"
control_socket = "`+dir+`/ctl.sock"

[[tenant]]
name = "acme"
netns = "@P@-tnet"
portal = "10.9.0.1:3260"
  [[tenant.target]]
  iqn = "iqn.2026-12.com.example:acme.db"
    [[tenant.target.lun]]
    volume = "acme-db"
    size = "4MiB"
`))
	s.listening(tenant, 1)
	out, err := exec.Command("ip", "netns", "exec", sw, "iscsi-ls", "-s", "iscsi://10.9.0.1").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "iqn.2026-12.com.example:acme.db") || !strings.Contains(string(out), "Lun:0") {
		t.Fatalf("a host on the tenant's network does not reach it: %v\n%s", err, out)
	}
	// A bad parent leaves nothing behind.
	if out, err := exec.Command("sh", script, prefix+"-tnbad", "no-such-nic", "10.9.0.1/24").CombinedOutput(); err == nil {
		t.Fatalf("the recipe accepted a missing parent NIC:\n%s", out)
	}
	if _, err := os.Stat("/run/netns/" + prefix + "-tnbad"); err == nil {
		t.Fatal("a failed recipe left its namespace behind")
	}
}
