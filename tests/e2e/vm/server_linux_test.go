package vm_test

import (
	"bytes"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// tenantSpec is one tenant of the configuration the tests serve.
type tenantSpec struct {
	name          string
	ns            string
	targets       []targetSpec
	discoveryCHAP *chapSpec // [tenant.discovery_chap]; nil: discovery is open
}

type targetSpec struct {
	iqn        string
	initiators []string // allow-list; empty = any
	chap       *chapSpec
	luns       []lunSpec
}

// chapSpec is a chap table. The secret goes into a root-owned 0600 file (secret_file, the way
// an operator keeps it); the mutual secret stays inline, so both forms are served.
type chapSpec struct {
	user, secret             string
	mutualUser, mutualSecret string // empty: one-way
}

type lunSpec struct {
	id     int
	volume string
	size   int64 // bytes
}

// server is the iSCSI target under test, serving every tenant of a configuration.
type server interface {
	// start starts the server and waits until every tenant's portal accepts connections.
	start(t *testing.T)
	// stop sends SIGTERM and waits for the exit.
	stop(t *testing.T)
	// dropped waits until the server has let go of the tenant's namespace for the n-th time
	// (1-based) after it was deleted; a server that does not watch namespaces returns at once.
	dropped(t *testing.T, tenant string, n int)
	// recreated tells the server that the tenant's namespace was deleted and made again. nstarget
	// must notice that by itself (it watches netns_dir); only a bring-up peer needs help.
	recreated(t *testing.T, tenant string)
	// volumePath is the file that holds a volume's bytes.
	volumePath(t *testing.T, volume string) string
	name() string
}

// newServer picks the target under test.
//
// THE SWITCH: nstarget (the product) unless NSTARGET_E2E_PEER=tgtd, which runs Debian's tgtd —
// one per tenant namespace, configured with tgtadm — with the same tenants. tgtd exists only to
// bring up and debug the guest side; what `make test` runs is nstarget.
func newServer(t *testing.T, s *suite, tenants []tenantSpec) server {
	t.Helper()
	if os.Getenv("NSTARGET_E2E_PEER") == "tgtd" {
		return newTgtd(t, tenants)
	}
	return newNstarget(t, s, tenants)
}

// --- nstarget -----------------------------------------------------------------------------

type nstargetServer struct {
	bin, cfg, dir, dataDir, logPath string
	socket                          string // control_socket: `nstarget reload` reaches serve here
	tenants                         []tenantSpec
	proc                            *proc
	starts, reloads                 int
}

// newNstarget writes the operator's config file: a temporary data_dir, the namespaces in
// /run/netns where `ip netns add` puts them, a control socket of its own.
func newNstarget(t *testing.T, s *suite, tenants []tenantSpec) *nstargetServer {
	dir := t.TempDir()
	// A unix socket's path must fit in 108 bytes, which t.TempDir (named after the test) need
	// not: a short directory of its own.
	sockDir, err := os.MkdirTemp("", "vme2e-ctl-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	n := &nstargetServer{bin: s.bin, cfg: filepath.Join(dir, "nstarget.toml"), dir: dir,
		dataDir: filepath.Join(dir, "data"), logPath: filepath.Join(dir, "nstarget.log"),
		socket: filepath.Join(sockDir, "ctl.sock")}
	n.writeConfig(t, tenants)
	t.Cleanup(func() {
		if n.proc != nil {
			n.proc.Stop(patience)
		}
		logs, _ := os.ReadFile(n.logPath)
		if bytes.Contains(logs, []byte("WARNING: DATA RACE")) {
			t.Errorf("nstarget reported a data race:\n%s", logs)
		} else if t.Failed() || os.Getenv("NSTARGET_E2E_LOGS") != "" {
			cfg, _ := os.ReadFile(n.cfg)
			t.Logf("config %s:\n%s\nnstarget log:\n%s", n.cfg, cfg, tail(logs, 200))
		}
	})
	return n
}

// writeConfig (re)writes the config file so that it serves tenants.
func (n *nstargetServer) writeConfig(t *testing.T, tenants []tenantSpec) {
	t.Helper()
	if err := os.WriteFile(n.cfg, []byte(configText(t, n.dir, n.dataDir, n.socket, tenants)), 0o644); err != nil {
		t.Fatal(err)
	}
	n.tenants = tenants
}

// configText is the TOML of a configuration serving tenants; CHAP secrets go to files in dir.
func configText(t *testing.T, dir, dataDir, socket string, tenants []tenantSpec) string {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "[server]\nnetns_dir = %q\ndata_dir  = %q\ncontrol_socket = %q\n", "/run/netns", dataDir, socket)
	for _, tn := range tenants {
		fmt.Fprintf(&b, "\n[[tenant]]\nname   = %q\nnetns  = %q\nportal = %q\n", tn.name, tn.ns, "0.0.0.0:3260")
		if c := tn.discoveryCHAP; c != nil {
			writeChapTable(t, &b, dir, "tenant.discovery_chap", tn.name+"-discovery", c)
		}
		for _, tg := range tn.targets {
			fmt.Fprintf(&b, "\n  [[tenant.target]]\n  iqn = %q\n", tg.iqn)
			if len(tg.initiators) > 0 {
				q := make([]string, len(tg.initiators))
				for i, in := range tg.initiators {
					q[i] = strconv.Quote(in)
				}
				fmt.Fprintf(&b, "  initiators = [%s]\n", strings.Join(q, ", "))
			}
			if c := tg.chap; c != nil {
				// A table after the target's own keys, or they would land in it.
				writeChapTable(t, &b, dir, "tenant.target.chap", tn.name+"-"+tg.iqn, c)
			}
			for _, l := range tg.luns {
				fmt.Fprintf(&b, "\n    [[tenant.target.lun]]\n    id     = %d\n    volume = %q\n    size   = \"%dMiB\"\n",
					l.id, l.volume, l.size>>20)
			}
		}
	}
	return b.String()
}

// reconfigure rewrites the config file for tenants and has the running server apply the
// difference (`nstarget reload -socket`, as an operator would). It fails the test, with the
// command's output, unless reload exits 0, and returns what reload printed: one line per change.
func (n *nstargetServer) reconfigure(t *testing.T, tenants []tenantSpec) string {
	t.Helper()
	n.writeConfig(t, tenants)
	n.reloads++
	if logf, err := os.OpenFile(n.logPath, os.O_WRONLY|os.O_APPEND, 0o644); err == nil {
		fmt.Fprintf(logf, "=== reload %d: %s reload -socket %s\n", n.reloads, n.bin, n.socket)
		logf.Close()
	}
	cmd := exec.Command(n.bin, "reload", "-socket", n.socket)
	// The -race build would otherwise sleep a second before exiting (atexit_sleep_ms=1000).
	cmd.Env = append(os.Environ(), "GORACE=atexit_sleep_ms=0")
	out, err := cmd.CombinedOutput()
	if err != nil {
		logs, _ := os.ReadFile(n.logPath)
		cfg, _ := os.ReadFile(n.cfg)
		t.Fatalf("reload %d: %s reload -socket %s: %v\n%s\nconfig:\n%s\nnstarget log:\n%s",
			n.reloads, n.bin, n.socket, err, out, cfg, tail(logs, 50))
	}
	return string(out)
}

// writeChapTable writes a chap table, its secret in a file of its own next to the config.
func writeChapTable(t *testing.T, b *strings.Builder, dir, table, fileName string, c *chapSpec) {
	t.Helper()
	f := filepath.Join(dir, strings.NewReplacer(":", "_", "/", "_").Replace(fileName)+".secret")
	if err := os.WriteFile(f, []byte(c.secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(b, "\n  [%s]\n  user = %q\n  secret_file = %q\n", table, c.user, f)
	if c.mutualUser != "" {
		fmt.Fprintf(b, "  mutual_user = %q\n  mutual_secret = %q\n", c.mutualUser, c.mutualSecret)
	}
}

func (n *nstargetServer) name() string { return "nstarget" }

func (n *nstargetServer) start(t *testing.T) {
	t.Helper()
	logf, err := os.OpenFile(n.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	n.starts++
	fmt.Fprintf(logf, "=== start %d: %s serve -c %s\n", n.starts, n.bin, n.cfg)
	cmd := exec.Command(n.bin, "serve", "-c", n.cfg)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), "GORACE=halt_on_error=0")
	p, err := startProc(cmd, "nstarget")
	if err != nil {
		t.Fatal(err)
	}
	n.proc = p
	for _, tn := range n.tenants {
		if err := waitPortal(tn.ns, patience); err != nil {
			logs, _ := os.ReadFile(n.logPath)
			if p.Exited() {
				t.Fatalf("nstarget serve exited (%v):\n%s", p.Err(), tail(logs, 50))
			}
			t.Fatalf("%v\nnstarget log:\n%s", err, tail(logs, 50))
		}
	}
}

func (n *nstargetServer) stop(t *testing.T) {
	t.Helper()
	if n.proc == nil {
		return
	}
	// SIGTERM gives sessions up to 10 s to log out before they are closed; the rest of patience
	// is for a loaded machine, so only a hung shutdown is reported.
	if n.proc.Stop(patience) {
		t.Errorf("nstarget did not exit within %v of SIGTERM (killed)", patience)
	} else if n.proc.Err() != nil {
		logs, _ := os.ReadFile(n.logPath)
		t.Errorf("nstarget exited with %v after SIGTERM:\n%s", n.proc.Err(), tail(logs, 30))
	}
	n.proc = nil
}

func (n *nstargetServer) recreated(*testing.T, string) {}

// dropped waits for the n-th "tenant namespace gone" line of the tenant in the server's log.
func (n *nstargetServer) dropped(t *testing.T, tenant string, want int) {
	t.Helper()
	deadline := time.Now().Add(patience)
	for {
		logs, err := os.ReadFile(n.logPath)
		if err != nil {
			t.Fatal(err)
		}
		seen := 0
		for _, l := range strings.Split(string(logs), "\n") {
			if strings.Contains(l, `msg="tenant namespace gone; tenant offline"`) && strings.Contains(l, " tenant="+tenant+" ") {
				seen++
			}
		}
		if seen >= want {
			return
		}
		if n.proc != nil && n.proc.Exited() {
			t.Fatalf("nstarget exited (%v) while waiting for it to drop tenant %s's namespace:\n%s", n.proc.Err(), tenant, tail(logs, 50))
		}
		if time.Now().After(deadline) {
			t.Fatalf("nstarget did not drop tenant %s's deleted namespace (%d of %d times) within %v:\n%s", tenant, seen, want, patience, tail(logs, 50))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// volumePath finds the volume's file in data_dir; the pool's layout inside it is the backend's
// business, so search for a regular file named after the volume.
func (n *nstargetServer) volumePath(t *testing.T, volume string) string {
	t.Helper()
	var found []string
	_ = filepath.WalkDir(n.dataDir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			base := d.Name()
			if base == volume || strings.HasPrefix(base, volume+".") {
				found = append(found, p)
			}
		}
		return nil
	})
	if len(found) != 1 {
		t.Fatalf("volume %q: want one file in %s, found %v", volume, n.dataDir, found)
	}
	return found[0]
}

// --- tgtd (bring-up peer) -----------------------------------------------------------------

type tgtdServer struct {
	dataDir string
	tenants []tenantSpec
	mu      sync.Mutex
	procs   map[string]*proc // by tenant
}

func newTgtd(t *testing.T, tenants []tenantSpec) *tgtdServer {
	if _, err := lookPath("tgtd"); err != nil {
		t.Fatal("tgtd not found: apt-get install tgt")
	}
	g := &tgtdServer{dataDir: t.TempDir(), tenants: tenants, procs: map[string]*proc{}}
	for _, tn := range tenants {
		for _, tg := range tn.targets {
			for _, l := range tg.luns {
				f, err := os.OpenFile(filepath.Join(g.dataDir, l.volume), os.O_CREATE|os.O_RDWR, 0o644)
				if err != nil {
					t.Fatal(err)
				}
				if err := f.Truncate(l.size); err != nil {
					t.Fatal(err)
				}
				f.Close()
			}
		}
	}
	t.Cleanup(func() {
		g.mu.Lock()
		defer g.mu.Unlock()
		for _, p := range g.procs {
			p.Kill()
		}
	})
	return g
}

func (g *tgtdServer) name() string { return "tgtd" }

func (g *tgtdServer) start(t *testing.T) {
	t.Helper()
	for _, tn := range g.tenants {
		g.startTenant(t, tn)
	}
}

func (g *tgtdServer) startTenant(t *testing.T, tn tenantSpec) {
	t.Helper()
	// Control sockets live in the file system, shared by all namespaces, and a stopped tgtd may
	// leave its socket behind: a fresh index for every start.
	ctl := strconv.Itoa(1000 + rand.IntN(31000)) // tgtd accepts 0..32767
	cmd := exec.Command("ip", "netns", "exec", tn.ns, "tgtd", "-f", "-C", ctl)
	p, err := startProc(cmd, "tgtd "+tn.name)
	if err != nil {
		t.Fatal(err)
	}
	g.mu.Lock()
	g.procs[tn.name] = p
	g.mu.Unlock()
	adm := func(args ...string) error {
		out, err := exec.Command("tgtadm", append([]string{"-C", ctl, "--lld", "iscsi"}, args...)...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("tgtadm %v: %w: %s", args, err, out)
		}
		return nil
	}
	deadline := time.Now().Add(patience)
	for adm("--op", "show", "--mode", "system") != nil {
		if time.Now().After(deadline) {
			t.Fatalf("tgtd for %s did not come up", tn.name)
		}
		time.Sleep(50 * time.Millisecond)
	}
	for i, tg := range tn.targets {
		tid := strconv.Itoa(i + 1)
		must := func(err error) {
			if err != nil {
				t.Fatal(err)
			}
		}
		must(adm("--op", "new", "--mode", "target", "--tid", tid, "-T", tg.iqn))
		for _, l := range tg.luns {
			// tgtd keeps LUN 0 for its controller: disks start at 1.
			must(adm("--op", "new", "--mode", "logicalunit", "--tid", tid, "--lun", strconv.Itoa(l.id+1),
				"-b", filepath.Join(g.dataDir, l.volume)))
		}
		if len(tg.initiators) == 0 {
			must(adm("--op", "bind", "--mode", "target", "--tid", tid, "-I", "ALL"))
		}
		for _, in := range tg.initiators {
			must(adm("--op", "bind", "--mode", "target", "--tid", tid, "--initiator-name", in))
		}
	}
	if err := waitPortal(tn.ns, patience); err != nil {
		t.Fatal(err)
	}
}

func (g *tgtdServer) stop(t *testing.T) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for name, p := range g.procs {
		p.Kill() // tgtd ignores SIGTERM (tgtadm stops it cleanly; a restart test wants it gone)
		delete(g.procs, name)
	}
}

// recreated starts a new tgtd in the new namespace; the old one keeps the deleted namespace alive
// until it is stopped.
func (g *tgtdServer) recreated(t *testing.T, tenant string) {
	t.Helper()
	for _, tn := range g.tenants {
		if tn.name == tenant {
			g.mu.Lock()
			if p := g.procs[tenant]; p != nil {
				p.Kill()
			}
			g.mu.Unlock()
			g.startTenant(t, tn)
		}
	}
}

// dropped: tgtd runs inside the namespace and keeps it alive until recreated stops it.
func (g *tgtdServer) dropped(*testing.T, string, int) {}

func (g *tgtdServer) volumePath(_ *testing.T, volume string) string {
	return filepath.Join(g.dataDir, volume)
}

func tail(b []byte, n int) string {
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
