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

// reloadConfig is the configuration of the reload test: tenant "a" always, plus the extra
// tenant and target sections given.
func reloadConfig(sock, aInitiators, extra string) string {
	return fmt.Sprintf(`
[server]
data_dir = "@POOL@"
control_socket = %q

[[tenant]]
name = "a"
netns = "@P@-rla"
portal = "10.0.0.1:3260"
  [[tenant.target]]
  iqn = "iqn.2026-11.org.nstarget:a"
  initiators = [%s]
    [[tenant.target.lun]]
    volume = "a"
    size = "8MiB"
%s`, sock, aInitiators, extra)
}

const (
	reloadTargetA2 = `
  [[tenant.target]]
  iqn = "iqn.2026-11.org.nstarget:a2"
    [[tenant.target.lun]]
    volume = "a2"
    size = "8MiB"
`
	// reloadLUNA1 is a second LUN of tenant a's first target.
	reloadLUNA1 = `
    [[tenant.target.lun]]
    id = 1
    volume = "a-1"
    size = "4MiB"
`
	reloadTargetA2RO = `
  [[tenant.target]]
  iqn = "iqn.2026-11.org.nstarget:a2"
    [[tenant.target.lun]]
    volume = "a2"
    size = "8MiB"
    read_only = true
`
	reloadTenantB = `
[[tenant]]
name = "b"
netns = "@P@-rlb"
portal = "10.0.0.1:3260"
  [[tenant.target]]
  iqn = "iqn.2026-11.org.nstarget:b"
    [[tenant.target.lun]]
    volume = "b"
    size = "8MiB"
`
	reloadTenantC = `
[[tenant]]
name = "c"
netns = "@P@-rlc"
portal = "10.0.0.1:3260"
  [[tenant.target]]
  iqn = "iqn.2026-11.org.nstarget:c"
    [[tenant.target.lun]]
    volume = "c"
    size = "8MiB"
`
)

// sessionOf returns tenant's only session (TSIH, remote, initiator) from `status -o json`.
func sessionOf(t *testing.T, sock, tenant string) (int, string, string, error) {
	t.Helper()
	code, out, errOut := runBin(t, "status", "-socket", sock, "-o", "json", tenant)
	if code != 0 {
		return 0, "", "", fmt.Errorf("status %s: exit %d: %s", tenant, code, errOut)
	}
	var st statusJSON
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		return 0, "", "", err
	}
	if len(st.Tenants) != 1 || len(st.Tenants[0].Sessions) != 1 {
		return 0, "", "", fmt.Errorf("status %s: want one session, have %d", tenant, len(st.Tenants[0].Sessions))
	}
	s := st.Tenants[0].Sessions[0]
	return s.TSIH, s.Remote, s.Initiator, nil
}

func TestReloadAppliesOnlyTheDifferenceAndRefusesBadFilesWithoutTouchingAnything(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "ctl.sock")
	pa, pb, pc := newPair(t, "rla"), newPair(t, "rlb"), newPair(t, "rlc")
	write := func(doc string) string { return writeConfig(t, dir, "c.toml", doc) }
	cfg := write(reloadConfig(sock, "", reloadTenantC))
	s := startServe(t, cfg)
	s.listening(pa.tenant, 1)
	s.listening(pc.tenant, 1)

	// A session on tenant a that must live through every reload: qemu-io keeps it open and
	// writes through it before and after.
	q := startQIO(t, "/run/netns/"+pa.ini, "iscsi://10.0.0.1/iqn.2026-11.org.nstarget:a/0")
	if err := q.Do("write -P 0x5a 0 64k"); err != nil {
		t.Fatal(err)
	}
	var tsih0 int
	var remote0, ini string
	waitFor(t, "the qemu-io session in status", func() (err error) {
		tsih0, remote0, ini, err = sessionOf(t, sock, "a")
		return err
	})
	pc.session(t, "iscsi://10.0.0.1/iqn.2026-11.org.nstarget:c/0")
	waitFor(t, "tenant c's session", func() error { _, _, _, err := sessionOf(t, sock, "c"); return err })

	reload := func() (int, string, string) { return runBin(t, "reload", "-socket", sock) }

	// 1. Add tenant b and a target of a, remove tenant c, restrict a's allow-list to the host
	// that is logged in.
	write(reloadConfig(sock, fmt.Sprintf("%q", ini), reloadTargetA2+reloadTenantB))
	code, out, errOut := reload()
	if code != 0 {
		t.Fatalf("reload: exit %d\n%s%s", code, out, errOut)
	}
	for _, want := range []string{"tenant b added", "tenant c removed", "target iqn.2026-11.org.nstarget:a2 added", "allow-list now 1"} {
		if !strings.Contains(out, want) {
			t.Fatalf("reload output lacks %q:\n%s", want, out)
		}
	}
	s.listening(pb.tenant, 1)
	if got := pb.mustIni(t, "iscsi-ls", "iscsi://10.0.0.1"); !strings.Contains(got, "iqn.2026-11.org.nstarget:b") {
		t.Fatalf("added tenant b does not serve: %s", got)
	}
	if got := pa.mustIni(t, "iscsi-ls", "-i", ini, "iscsi://10.0.0.1"); !strings.Contains(got, "iqn.2026-11.org.nstarget:a2") {
		t.Fatalf("added target a2 is not discovered: %s", got)
	}
	if got, err := pc.run("iscsi-ls", "iscsi://10.0.0.1"); err == nil {
		t.Fatalf("removed tenant c still answers: %s", got)
	}
	s.waitLog("tenant c's session to end", 1, msgIs("connection ended", "tenant", "c"))
	if code, _, _ := runBin(t, "status", "-socket", sock, "c"); code == 0 {
		t.Fatal("removed tenant c is still listed by status")
	}

	// 2. A file that fails check, and one that changes what needs a restart: nothing changes.
	write(reloadConfig(sock, fmt.Sprintf("%q", ini), reloadTargetA2+reloadTenantB+"\n[[tenant]]\nname = \"bad\"\nbogus = 1\n"))
	code, _, errOut = reload()
	if code != 1 || !strings.Contains(errOut, "c.toml:") || !strings.Contains(errOut, "bogus") {
		t.Fatalf("invalid file: exit %d: %s", code, errOut)
	}
	write(strings.Replace(reloadConfig(sock, fmt.Sprintf("%q", ini), reloadTargetA2+reloadTenantB), `data_dir = "@POOL@"`, `data_dir = "@POOL@2"`, 1))
	code, _, errOut = reload()
	if code != 1 || !strings.Contains(errOut, "server.data_dir changed: needs a restart") {
		t.Fatalf("data_dir change: exit %d: %s", code, errOut)
	}

	// 3. LUN changes under the running session: tenant a's volume grows, a LUN is added, a2's
	// LUN turns read-only. The session stays; libiscsi (in qemu-io) is told of each change by
	// a unit attention and retries.
	// Tenant b's weight changes too: the one limit a running tenant takes without a restart.
	grown := strings.Replace(reloadConfig(sock, fmt.Sprintf("%q", ini), reloadLUNA1+reloadTargetA2RO+reloadTenantB), `size = "8MiB"`, `size = "16MiB"`, 1)
	grown = strings.Replace(grown, "name = \"b\"\n", "name = \"b\"\nlimits = { weight = 3 }\n", 1)
	write(grown)
	code, out, errOut = reload()
	if code != 0 {
		t.Fatalf("LUN changes: exit %d: %s%s", code, out, errOut)
	}
	for _, want := range []string{"LUN 0: volume a grown to 16777216 bytes", "LUN 1 added (volume a-1)", "LUN 0: read_only = true", "tenant b: weight 3"} {
		if !strings.Contains(out, want) {
			t.Fatalf("reload output lacks %q:\n%s", want, out)
		}
	}
	if err := q.Do("write -P 0x5a 64k 64k"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "qemu-io to hear of the new capacity and LUN", func() error {
		if o := q.Output(); !strings.Contains(o, "0x2a09") || !strings.Contains(o, "0x3f0e") {
			return fmt.Errorf("qemu-io said:\n%s", o)
		}
		return nil
	})
	if got := pa.mustIni(t, "iscsi-readcapacity16", "-i", ini, "iscsi://10.0.0.1/iqn.2026-11.org.nstarget:a/0"); !strings.Contains(got, "Total size:16777216") {
		t.Fatalf("grown volume: %s", got)
	}
	if got := pa.mustIni(t, "iscsi-ls", "-s", "-i", ini, "iscsi://10.0.0.1"); !strings.Contains(got, "Lun:1") {
		t.Fatalf("added LUN 1 is not listed: %s", got)
	}
	if out, err := pa.run("qemu-io", "-f", "raw", "-c", "write 0 4k", "iscsi://10.0.0.1/iqn.2026-11.org.nstarget:a2/0"); err == nil && !strings.Contains(out, "failed") {
		t.Fatalf("a write to the read-only LUN succeeded:\n%s", out)
	}
	// Back to the LUNs of step 1: LUN 1 goes (the session hears of it), a2 writable again.
	write(strings.Replace(reloadConfig(sock, fmt.Sprintf("%q", ini), reloadTargetA2+reloadTenantB), `size = "8MiB"`, `size = "16MiB"`, 1))
	if code, out, errOut := reload(); code != 0 || !strings.Contains(out, "LUN 1 removed") {
		t.Fatalf("LUN removal: exit %d: %s%s", code, out, errOut)
	}
	pa.mustIni(t, "qemu-io", "-f", "raw", "-c", "write 0 4k", "iscsi://10.0.0.1/iqn.2026-11.org.nstarget:a2/0")

	// 4. The same file again changes nothing.
	if code, out, errOut := reload(); code != 0 || !strings.Contains(out, "nothing changed") {
		t.Fatalf("identical file: exit %d: %s%s", code, out, errOut)
	}

	// 5. SIGHUP does the same as reload: tenant c comes back.
	write(strings.Replace(reloadConfig(sock, fmt.Sprintf("%q", ini), reloadTargetA2+reloadTenantB+reloadTenantC), `size = "8MiB"`, `size = "16MiB"`, 1))
	s.cmd.Process.Signal(syscall.SIGHUP)
	s.waitLog("SIGHUP reload", 1, msgIs("reloaded"))
	s.listening(pc.tenant, 2)

	// Tenant a's session lived through all of it, on the same connection, and still works.
	tsih, remote, _, err := sessionOf(t, sock, "a")
	if err != nil || tsih != tsih0 || remote != remote0 {
		t.Fatalf("tenant a's session changed: TSIH %d -> %d, remote %s -> %s (%v)", tsih0, tsih, remote0, remote, err)
	}
	if err := q.Do("read -P 0x5a 0 64k"); err != nil || !strings.Contains(q.Output(), "wrote 65536/65536") ||
		!strings.Contains(q.Output(), "read 65536/65536") || strings.Contains(q.Output(), "Pattern verification failed") {
		t.Fatalf("qemu-io on tenant a: %v\n%s", err, q.Output())
	}
	if _, err := os.Stat(sock); err != nil {
		t.Fatal(err)
	}
}
