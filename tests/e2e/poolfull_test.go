//go:build linux

package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func TestFullPoolWarnsAtTheThresholdAnswersSpaceAllocationFailedAndKeepsOtherTenantsData(t *testing.T) {
	dir := t.TempDir()
	pool := filepath.Join(dir, "pool")
	if err := os.MkdirAll(pool, 0o755); err != nil {
		t.Fatal(err)
	}
	// A small file system under thin volumes that promise more than it has.
	if err := syscall.Mount("tmpfs", pool, "tmpfs", 0, "size=6m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Unmount(pool, syscall.MNT_DETACH) })
	pa, pb := newPair(t, "fulla"), newPair(t, "fullb")
	cfg := writeConfig(t, dir, "c.toml", `
[server]
data_dir = "@POOL@"
control_socket = "`+dir+`/ctl.sock"
pool_soft_threshold = 50

[[tenant]]
name = "a"
netns = "@P@-fulla"
portal = "10.0.0.1:3260"
  [[tenant.target]]
  iqn = "iqn.2026-11.org.nstarget:full"
    [[tenant.target.lun]]
    volume = "a"
    size = "16MiB"

[[tenant]]
name = "b"
netns = "@P@-fullb"
portal = "10.0.0.1:3260"
  [[tenant.target]]
  iqn = "iqn.2026-11.org.nstarget:full"
    [[tenant.target.lun]]
    volume = "b"
    size = "16MiB"
`)
	s := startServe(t, cfg)
	s.listening(pa.tenant, 1)
	s.listening(pb.tenant, 1)
	url := "iscsi://10.0.0.1/iqn.2026-11.org.nstarget:full/0"
	pb.mustIni(t, "qemu-io", "-f", "raw", "-c", "write -P 0x22 0 1M", url)
	// A session of tenant b that stays logged in while the pool fills: it must be told.
	bq := startQIO(t, "/run/netns/"+pb.ini, url)
	if err := bq.Do("read -P 0x22 0 4k"); err != nil || !strings.Contains(bq.Output(), "read 4096/4096") {
		t.Fatalf("tenant b's session: %v: %s", err, bq.Output())
	}

	// Tenant a writes more than the pool holds: the write fails, and says why.
	out, _ := pa.run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 12M", url)
	if !strings.Contains(out, "failed") {
		t.Fatalf("a write beyond the pool did not fail:\n%s", out)
	}
	s.waitLog("the pool-full warning for tenant a", 1, msgIs("write refused: the volume pool is out of space (SPACE ALLOCATION FAILED)", "tenant", "a"))
	s.waitLog("the soft threshold warning", 1, msgIs("pool above its soft threshold: sessions are told THIN PROVISIONING SOFT THRESHOLD REACHED; writes fail once it is full"))
	if err := bq.Do("read -P 0x22 0 4k"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "tenant b's session to be told THIN PROVISIONING SOFT THRESHOLD REACHED", func() error {
		if !strings.Contains(bq.Output(), "0x3807") {
			return fmt.Errorf("qemu-io: %s", bq.Output())
		}
		return nil
	})
	code, out, errOut := runBin(t, "status", "-socket", dir+"/ctl.sock", "-o", "json")
	var st struct {
		Pool struct {
			UsedPercent float64 `json:"used_percent"`
			Threshold   int     `json:"soft_threshold_percent"`
		} `json:"pool"`
	}
	if err := json.Unmarshal([]byte(out), &st); code != 0 || err != nil || st.Pool.UsedPercent < 90 || st.Pool.Threshold != 50 {
		t.Fatalf("status of a full pool: exit %d, %v: %s%s", code, err, out, errOut)
	}

	// Tenant b's data is intact, and b gets the same clear answer when it writes.
	if out := pb.mustIni(t, "qemu-io", "-f", "raw", "-c", "read -P 0x22 0 1M", url); strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("tenant b's data changed:\n%s", out)
	}
	if out, _ := pb.run("qemu-io", "-f", "raw", "-c", "write -P 0x33 4M 8M", url); !strings.Contains(out, "failed") {
		t.Fatalf("tenant b's write to a full pool did not fail:\n%s", out)
	}
	s.waitLog("the pool-full warning for tenant b", 1, msgIs("write refused: the volume pool is out of space (SPACE ALLOCATION FAILED)", "tenant", "b"))
	if strings.Contains(s.output(), "WRITE ERROR") {
		t.Fatal("a full pool was reported as a medium error")
	}
}
