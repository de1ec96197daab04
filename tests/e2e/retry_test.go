//go:build linux

package e2e

import (
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"testing"
)

const troubleConfig = `
[server]
data_dir = "@POOL@"

[[tenant]]
name   = "fine"
netns  = "@P@-fine"
portal = "10.0.0.1:3260"
  [[tenant.target]]
  iqn = "iqn.2026-11.io.e2e:disk"
    [[tenant.target.lun]]
    volume = "fine-disk"
    size   = "16MiB"

[[tenant]]
name   = "noaddr"
netns  = "@P@-noaddr"
portal = "10.0.0.1:3260"
  [[tenant.target]]
  iqn = "iqn.2026-11.io.e2e:disk"
    [[tenant.target.lun]]
    volume = "noaddr-disk"
    size   = "16MiB"

[[tenant]]
name   = "busy"
netns  = "@P@-busy"
portal = "10.0.0.1:3260"
  [[tenant.target]]
  iqn = "iqn.2026-11.io.e2e:disk"
    [[tenant.target.lun]]
    volume = "busy-disk"
    size   = "16MiB"

[[tenant]]
name   = "later"
netns  = "@P@-later"
portal = "10.0.0.1:3260"
  [[tenant.target]]
  iqn = "iqn.2026-11.io.e2e:disk"
    [[tenant.target.lun]]
    volume = "later-disk"
    size   = "16MiB"
`

func TestTenantTroubleIsLoggedAndRetriedWhileOthersServe(t *testing.T) {
	dir := t.TempDir()
	fine := newPair(t, "fine")
	// busy's port is taken by another process; noaddr's namespace exists but 10.0.0.1 is not
	// configured in it yet; later's namespace does not exist yet.
	busy := newPair(t, "busy")
	squatter := exec.Command("ip", "netns", "exec", busy.tenant, "busybox", "nc", "-l", "-p", "3260")
	if err := squatter.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { squatter.Process.Kill(); squatter.Wait() })
	// Start returns before nc has bound: serve must find the port already taken.
	waitFor(t, "the squatter to listen on :3260 in "+busy.tenant, func() error {
		out, err := exec.Command("ip", "netns", "exec", busy.tenant, "cat", "/proc/net/tcp", "/proc/net/tcp6").Output()
		if err != nil {
			return err
		}
		for _, l := range strings.Split(string(out), "\n") {
			// local_address is hex ADDR:PORT; state 0A is LISTEN.
			if f := strings.Fields(l); len(f) > 3 && strings.HasSuffix(f[1], fmt.Sprintf(":%04X", 3260)) && f[3] == "0A" {
				return nil
			}
		}
		return errors.New("not listening yet")
	})
	noaddr := &pair{tenant: prefix + "-noaddr", ini: prefix + "-noaddr-i"}
	addNetns(t, noaddr.tenant)
	addNetns(t, noaddr.ini)
	later := &pair{tenant: prefix + "-later", ini: prefix + "-later-i"}

	srv := startServe(t, writeConfig(t, dir, "trouble.toml", troubleConfig))
	srv.listening(fine.tenant, 1)
	srv.waitLog("busy's listen failure", 1, msgIs("tenant listen failed; retrying", "tenant", "busy", "netns", busy.tenant))
	if out := fine.mustIni(t, "iscsi-readcapacity16", diskURL); !strings.Contains(out, "Total size:16777216") {
		t.Errorf("fine tenant does not serve while the others are in trouble:\n%s", out)
	}

	squatter.Process.Kill()
	squatter.Wait()
	srv.listening(busy.tenant, 1)
	busy.mustIni(t, "iscsi-readcapacity16", diskURL)

	noaddr.link(t)
	waitFor(t, "noaddr to serve once its address exists", func() error {
		_, err := noaddr.run("iscsi-readcapacity16", diskURL)
		return err
	})

	addNetns(t, later.tenant)
	addNetns(t, later.ini)
	later.link(t)
	srv.listening(later.tenant, 1)
	later.mustIni(t, "iscsi-readcapacity16", diskURL)

	if code := srv.stop(); code != 0 {
		t.Errorf("serve exited %d after SIGTERM, want 0", code)
	}
}
