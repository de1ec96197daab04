//go:build linux

package e2e

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

const (
	sharedIQN  = "iqn.2026-11.io.e2e:shared"
	onlyAlpha  = "iqn.2026-11.io.e2e:only-alpha"
	guardedIQN = "iqn.2026-11.io.e2e:guarded"
	allowedIni = "iqn.2026-11.io.e2e:allowed"
	strangeIni = "iqn.2026-11.io.e2e:stranger"
)

// Two tenants at the same address with the same IQN; alpha also has a target beta lacks and a
// target guarded by an initiator allow-list.
const isolationConfig = `
[server]
data_dir = "@POOL@"

[[tenant]]
name   = "alpha"
netns  = "@P@-alpha"
portal = "10.0.0.1:3260"
  [[tenant.target]]
  iqn = "iqn.2026-11.io.e2e:shared"
    [[tenant.target.lun]]
    volume = "alpha-shared"
    size   = "64MiB"
  [[tenant.target]]
  iqn = "iqn.2026-11.io.e2e:only-alpha"
    [[tenant.target.lun]]
    volume = "alpha-only"
    size   = "16MiB"
  [[tenant.target]]
  iqn        = "iqn.2026-11.io.e2e:guarded"
  initiators = ["iqn.2026-11.io.e2e:allowed"]
    [[tenant.target.lun]]
    volume = "alpha-guarded"
    size   = "16MiB"

[[tenant]]
name   = "beta"
netns  = "@P@-beta"
portal = "10.0.0.1:3260"
  [[tenant.target]]
  iqn = "iqn.2026-11.io.e2e:shared"
    [[tenant.target.lun]]
    volume = "beta-shared"
    size   = "32MiB"
`

var discovered = regexp.MustCompile(`Target:(\S+) Portal:(\S+)`)

func discover(t *testing.T, p *pair) []string {
	t.Helper()
	var iqns []string
	for _, m := range discovered.FindAllStringSubmatch(p.mustIni(t, "iscsi-ls", "iscsi://10.0.0.1"), -1) {
		if !strings.HasPrefix(m[2], "10.0.0.1:3260") {
			t.Errorf("portal %q reported to %s, want the address it dialled (10.0.0.1:3260)", m[2], p.ini)
		}
		iqns = append(iqns, m[1])
	}
	slices.Sort(iqns)
	return iqns
}

var totalSize = regexp.MustCompile(`Total size:(\d+)`)

func capacity(t *testing.T, p *pair, iqn string) string {
	t.Helper()
	m := totalSize.FindStringSubmatch(p.mustIni(t, "iscsi-readcapacity16", "iscsi://10.0.0.1/"+iqn+"/0"))
	if m == nil {
		t.Fatalf("no Total size from iscsi-readcapacity16 in %s", p.ini)
	}
	return m[1]
}

func TestTenantsWithSameAddressAndIQNAreIsolated(t *testing.T) {
	dir := t.TempDir()
	alpha, beta := newPair(t, "alpha"), newPair(t, "beta")
	srv := startServe(t, writeConfig(t, dir, "iso.toml", isolationConfig))
	srv.listening(alpha.tenant, 1)
	srv.listening(beta.tenant, 1)

	t.Run("each tenant discovers only its own targets", func(t *testing.T) {
		a := discover(t, alpha)
		if !slices.Contains(a, sharedIQN) || !slices.Contains(a, onlyAlpha) {
			t.Errorf("alpha discovered %v, want %s and %s among them", a, sharedIQN, onlyAlpha)
		}
		if b := discover(t, beta); !slices.Equal(b, []string{sharedIQN}) {
			t.Errorf("beta discovered %v, want only [%s]", b, sharedIQN)
		}
	})

	t.Run("the same IQN is a different volume in each tenant", func(t *testing.T) {
		if got := capacity(t, alpha, sharedIQN); got != "67108864" {
			t.Errorf("alpha's %s has %s bytes, want 64MiB", sharedIQN, got)
		}
		if got := capacity(t, beta, sharedIQN); got != "33554432" {
			t.Errorf("beta's %s has %s bytes, want 32MiB", sharedIQN, got)
		}
	})

	t.Run("data written through alpha reads back through alpha and is absent from beta", func(t *testing.T) {
		url := "iscsi://10.0.0.1/" + sharedIQN + "/0"
		alpha.mustIni(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", url)
		if out := alpha.mustIni(t, "qemu-io", "-f", "raw", "-c", "read -P 0x5a 1M 64k", url); strings.Contains(out, "verification failed") {
			t.Fatalf("alpha does not read back its pattern:\n%s", out)
		}
		if out := beta.mustIni(t, "qemu-io", "-f", "raw", "-c", "read -P 0x00 1M 64k", url); strings.Contains(out, "verification failed") {
			t.Fatalf("beta sees data at alpha's offset:\n%s", out)
		}
		pool := filepath.Join(dir, "pool")
		want := bytes.Repeat([]byte{0x5a}, 64<<10)
		if got := readFileAt(t, filepath.Join(pool, "alpha-shared"), 1<<20, 64<<10); !bytes.Equal(got, want) {
			t.Errorf("alpha's volume file does not hold the pattern at 1MiB")
		}
		b, err := os.ReadFile(filepath.Join(pool, "beta-shared"))
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(b, want[:4096]) {
			t.Errorf("beta's volume file contains alpha's pattern")
		}
	})

	t.Run("login to another tenant's IQN is refused", func(t *testing.T) {
		url := "iscsi://10.0.0.1/" + onlyAlpha + "/0"
		alpha.mustIni(t, "iscsi-inq", url) // the target works where it belongs
		if out, err := beta.run("iscsi-inq", url); err == nil || !strings.Contains(out, "Target not found") {
			t.Errorf("beta's login to alpha's %s: want 'Target not found', got err %v:\n%s", onlyAlpha, err, out)
		}
		if out, err := beta.run("qemu-io", "-f", "raw", "-c", "read 0 4k", url); err == nil && !strings.Contains(out, "Could not open") {
			t.Errorf("qemu-io in beta opened alpha's %s:\n%s", onlyAlpha, out)
		}
	})

	t.Run("discovery lists a guarded target to its allowed initiator only", func(t *testing.T) {
		// iscsiadm discovers before it logs in: the allowed initiator must see the target.
		out := alpha.mustIni(t, "iscsi-ls", "-i", allowedIni, "iscsi://10.0.0.1")
		if !strings.Contains(out, "Target:"+guardedIQN+" ") {
			t.Errorf("discovery by the allowed initiator %s does not list %s:\n%s", allowedIni, guardedIQN, out)
		}
		out = alpha.mustIni(t, "iscsi-ls", "-i", strangeIni, "iscsi://10.0.0.1")
		if strings.Contains(out, guardedIQN) {
			t.Errorf("discovery by %s lists %s, which it may not log in to:\n%s", strangeIni, guardedIQN, out)
		}
	})

	t.Run("an initiator not on the allow-list is refused", func(t *testing.T) {
		url := "iscsi://10.0.0.1/" + guardedIQN + "/0"
		alpha.mustIni(t, "iscsi-inq", "-i", allowedIni, url)
		// The session's log lines carry who and where: tenant, namespace and its id, initiator.
		srv.waitLog("a log line of the allowed session with its attributes", 1, func(l logLine) bool {
			return l.str("initiator") == allowedIni && l.str("tenant") == "alpha" &&
				l.str("netns") == alpha.tenant && l.str("netns_id") != ""
		})
		if out, err := alpha.run("iscsi-inq", "-i", strangeIni, url); err == nil || !strings.Contains(out, "Login Failed") {
			t.Errorf("initiator %s vs the allow-list of %s: want a failed login, got err %v:\n%s", strangeIni, guardedIQN, err, out)
		}
		if out, err := alpha.run("iscsi-inq", url); err == nil {
			t.Errorf("libiscsi's default initiator name logged in to %s despite the allow-list:\n%s", guardedIQN, out)
		}
	})

	if code := srv.stop(); code != 0 {
		t.Errorf("serve exited %d after SIGTERM, want 0", code)
	}
}

func readFileAt(t *testing.T, path string, off int64, n int) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	return b
}
