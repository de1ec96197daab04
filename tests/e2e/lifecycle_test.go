//go:build linux

package e2e

import (
	"errors"
	"strings"
	"testing"
)

const twoTenantConfig = `
[server]
data_dir = "@POOL@"

[[tenant]]
name   = "gone"
netns  = "@P@-gone"
portal = "10.0.0.1:3260"
  [[tenant.target]]
  iqn = "iqn.2026-11.io.e2e:disk"
    [[tenant.target.lun]]
    volume = "gone-disk"
    size   = "16MiB"

[[tenant]]
name   = "kept"
netns  = "@P@-kept"
portal = "10.0.0.1:3260"
  [[tenant.target]]
  iqn = "iqn.2026-11.io.e2e:disk"
    [[tenant.target.lun]]
    volume = "kept-disk"
    size   = "16MiB"
`

const diskURL = "iscsi://10.0.0.1/iqn.2026-11.io.e2e:disk/0"

func TestDeletedNamespaceGoesOfflineOthersKeepServingAndItComesBack(t *testing.T) {
	dir := t.TempDir()
	gone, kept := newPair(t, "gone"), newPair(t, "kept")
	srv := startServe(t, writeConfig(t, dir, "two.toml", twoTenantConfig))
	oldID := srv.listening(gone.tenant, 1)
	srv.listening(kept.tenant, 1)

	// One open session in each tenant.
	accepted := func(tenant string) func(logLine) bool { return msgIs("connection accepted", "tenant", tenant) }
	ended := func(tenant string) func(logLine) bool { return msgIs("connection ended", "tenant", tenant) }
	gone.session(t, diskURL)
	srv.waitLog("gone's session", 1, accepted("gone"))
	kept.session(t, diskURL)
	srv.waitLog("kept's session", 1, accepted("kept"))
	if l := srv.waitLog("gone's session", 1, accepted("gone")); l.str("netns_id") != oldID {
		t.Fatalf("gone's connection logged netns_id %s, its namespace is %s", l.str("netns_id"), oldID)
	}

	if err := ipRun("netns", "del", gone.tenant); err != nil {
		t.Fatal(err)
	}
	srv.waitLog("gone's namespace removal", 1, msgIs("tenant namespace gone; tenant offline", "netns", gone.tenant))
	srv.waitLog("gone's session to be closed", 1, ended("gone"))

	// The other tenant is untouched: its session is still open and new ones work.
	if n := srv.count(ended("kept")); n != 0 {
		t.Errorf("kept's session ended when gone's namespace was deleted")
	}
	if out := kept.mustIni(t, "iscsi-readcapacity16", diskURL); !strings.Contains(out, "Total size:16777216") {
		t.Errorf("kept's capacity after gone was deleted:\n%s", out)
	}
	// gone is offline: its initiator has no path any more.
	if out, err := gone.run("iscsi-ls", "iscsi://10.0.0.1"); err == nil {
		t.Errorf("gone's initiator still discovers targets after its tenant namespace was deleted:\n%s", out)
	}

	// Re-create: a new namespace under the same name is served again, under its new id. The
	// kernel tears the old namespace (and with it the initiator's veth end) down asynchronously.
	waitFor(t, "the old veth to vanish", func() error {
		if ipRun("-n", gone.ini, "link", "show", "e2e1") == nil {
			return errors.New("e2e1 still present")
		}
		return nil
	})
	addNetns(t, gone.tenant)
	gone.link(t)
	// The next listener up in gone's namespace must be in the new namespace: the old handle
	// is never used again (waitLog fails the test if none comes).
	newID := srv.listening(gone.tenant, 2)
	if newID == oldID {
		t.Fatalf("re-created namespace listened under the old id %s", oldID)
	}
	before := srv.count(accepted("gone"))
	if out := gone.mustIni(t, "iscsi-readcapacity16", diskURL); !strings.Contains(out, "Total size:16777216") {
		t.Errorf("gone's capacity after re-creation:\n%s", out)
	}
	l := srv.waitLog("a connection in the re-created namespace", before+1, accepted("gone"))
	if l.str("netns_id") != newID {
		t.Errorf("connection after re-creation served in netns_id %s, want the new namespace %s (old %s)", l.str("netns_id"), newID, oldID)
	}
	if code := srv.stop(); code != 0 {
		t.Errorf("serve exited %d after SIGTERM, want 0", code)
	}
}

const oneTenantConfig = `
[server]
data_dir = "@POOL@"

[[tenant]]
name   = "solo"
netns  = "@P@-solo"
portal = "10.0.0.1:3260"
  [[tenant.target]]
  iqn = "iqn.2026-11.io.e2e:disk"
    [[tenant.target.lun]]
    volume = "solo-disk"
    size   = "16MiB"
`

func TestRestartUnderSameConfigKeepsDataAndSIGTERMExitsZero(t *testing.T) {
	dir := t.TempDir()
	solo := newPair(t, "solo")
	cfg := writeConfig(t, dir, "solo.toml", oneTenantConfig)

	srv := startServe(t, cfg)
	srv.listening(solo.tenant, 1)
	solo.mustIni(t, "qemu-io", "-f", "raw", "-c", "write -P 0x77 0 256k", "-c", "write -P 0x78 8M 4k", diskURL)
	// A session is open while the signal arrives: serve must still end cleanly.
	solo.session(t, diskURL)
	srv.waitLog("the open session", 2, msgIs("connection accepted", "tenant", "solo"))
	if code := srv.stop(); code != 0 {
		t.Fatalf("serve exited %d after SIGTERM with a session open, want 0", code)
	}
	if srv.count(msgIs("connection ended", "tenant", "solo")) < 2 {
		t.Errorf("the open session was not ended by shutdown")
	}

	srv = startServe(t, cfg)
	srv.listening(solo.tenant, 1)
	out := solo.mustIni(t, "qemu-io", "-f", "raw", "-c", "read -P 0x77 0 256k", "-c", "read -P 0x78 8M 4k", diskURL)
	if strings.Contains(out, "verification failed") {
		t.Fatalf("data written before the restart is not there after it:\n%s", out)
	}
	if code := srv.stop(); code != 0 {
		t.Errorf("second serve exited %d, want 0", code)
	}
}
