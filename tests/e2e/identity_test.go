//go:build linux

package e2e

import (
	"strings"
	"testing"
)

const identityConfig = `
[server]
data_dir = "@POOL@"

[[tenant]]
name   = "ident"
netns  = "@P@-ident"
portal = "10.0.0.1:3260"
  [[tenant.target]]
  iqn = "iqn.2026-11.io.e2e:disk"
    [[tenant.target.lun]]
    volume = "same-name"
    size   = "16MiB"
`

// deviceIDs serves cfg, reads VPD 0x83 (device identification) and 0x80 (unit serial) with
// iscsi-inq from the tenant's network (it takes the page code in decimal), and stops the server.
func deviceIDs(t *testing.T, p *pair, cfg string) (devID, serial string) {
	t.Helper()
	srv := startServe(t, cfg)
	srv.listening(p.tenant, 1)
	devID = p.mustIni(t, "iscsi-inq", "-e", "1", "-c", "131", diskURL)
	serial = p.mustIni(t, "iscsi-inq", "-e", "1", "-c", "128", diskURL)
	if code := srv.stop(); code != 0 {
		t.Fatalf("serve exited %d after SIGTERM, want 0", code)
	}
	if !strings.Contains(devID, "NAA") {
		t.Fatalf("VPD 0x83 shows no NAA designator:\n%s", devID)
	}
	return devID, serial
}

func TestDiskIdentityIsStableAcrossRestartsAndDiffersBetweenPools(t *testing.T) {
	p := newPair(t, "ident")
	cfgA := writeConfig(t, t.TempDir(), "a.toml", identityConfig)
	cfgB := writeConfig(t, t.TempDir(), "b.toml", identityConfig)

	idA, serA := deviceIDs(t, p, cfgA)
	idA2, serA2 := deviceIDs(t, p, cfgA)
	if idA != idA2 || serA != serA2 {
		t.Fatalf("the same pool presented a different disk after a restart:\n%s%s\nthen\n%s%s", idA, serA, idA2, serA2)
	}
	// Another appliance (pool) with a volume of the same name is another disk: a host attached
	// to both must not merge them into one multipath device.
	idB, serB := deviceIDs(t, p, cfgB)
	if idA == idB || serA == serB {
		t.Fatalf("two pools present the same disk for volume same-name:\n%s%s\nand\n%s%s", idA, serA, idB, serB)
	}
}
