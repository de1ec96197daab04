// Package cluster_test runs nstarget as a cluster: three node processes, a throwaway Ceph
// cluster (tests/cephtest) for the volumes, an etcd in the test process (tests/etcdtest) for
// ownership, and a shared "switch" namespace where the initiators live, reached by each node
// through its own uplink (a veth into the switch's bridge). Each node reaches etcd through a
// proxy of the test's, so the test can cut one node off (a partition) without touching etcd.
// Besides libiscsi (qemu-io) initiators in the switch namespace, an open-iscsi initiator runs in
// a qemu guest (tests/vmguest) whose tap is a port of the switch's bridge.
package cluster_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"nstarget/tests/cephtest"
	"nstarget/tests/etcdtest"
	"nstarget/tests/qemuio"
	"nstarget/tests/vmguest"
)

var (
	bin    string
	ceph   *cephtest.Cluster
	etcd   *etcdtest.Server
	prefix string // namespaces, interfaces, volumes and keys of this run

	// The open-iscsi guest's image, prepared (built or found in its cache, KVM probed) while
	// Ceph starts; guestImageErr says why there is none.
	guestImage    *vmguest.Image
	guestImageErr error
	guestReady    = make(chan struct{})
)

// standby is the nodes' [cluster] standby: on unless NSTARGET_CLUSTER_STANDBY=off, which
// times (BenchmarkFailover) and tests takeovers that open every image at the takeover.
var standby = os.Getenv("NSTARGET_CLUSTER_STANDBY") != "off"

// patience bounds every wait for an event; a wait that passes is as fast as the event.
const patience = 90 * time.Second

func TestMain(m *testing.M) { os.Exit(runTests(m)) }

func runTests(m *testing.M) int {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "tests/cluster: needs root (namespaces, veths)")
		return 1
	}
	dir, err := os.MkdirTemp("", "nstc")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	bin = filepath.Join(dir, "nstarget")
	flag.Parse()
	// The guest image is prepared meanwhile, unless no test runs (benchmarks only).
	if f := flag.Lookup("test.run"); f != nil && f.Value.String() == "^$" {
		guestImageErr = errors.New("not prepared: no test was to run")
		close(guestReady)
	} else {
		go func() {
			defer close(guestReady)
			guestImage, guestImageErr = vmguest.Prepare()
		}()
	}
	defer func() {
		<-guestReady
		if guestImage != nil {
			guestImage.Remove()
		}
	}()
	// Tests run a -race server; benchmarks time a server built as operators run it.
	build := []string{"build", "-race", "-tags", "rbd", "-o", bin, "nstarget/cmd/nstarget"}
	if f := flag.Lookup("test.bench"); f != nil && f.Value.String() != "" {
		build = slices.DeleteFunc(build, func(a string) bool { return a == "-race" })
	}
	if out, err := exec.Command("go", build...).CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "tests/cluster: go build -tags rbd (librbd-dev: run scripts/deps.sh): %v\n%s", err, out)
		return 1
	}
	if ceph, err = cephtest.Start(filepath.Join(dir, "ceph")); err != nil {
		fmt.Fprintf(os.Stderr, "tests/cluster: ceph (run scripts/deps.sh): %v\n", err)
		return 1
	}
	defer ceph.Stop()
	if etcd, err = etcdtest.Start(filepath.Join(dir, "etcd"), patience); err != nil {
		fmt.Fprintln(os.Stderr, "tests/cluster:", err)
		return 1
	}
	defer etcd.Stop()
	// A -race binary sleeps 1 s at exit by default; the CLI commands would wait for nothing.
	os.Setenv("GORACE", "atexit_sleep_ms=0")
	prefix = fmt.Sprintf("nc%d", os.Getpid())
	sweepStale()
	return m.Run()
}

// sweepStale removes the switch namespaces and uplinks of runs of this suite whose process is
// gone: a run killed on its deadline runs no cleanup.
func sweepStale() {
	stale := func(name, sep string) bool {
		rest, ok := strings.CutPrefix(name, "nc")
		if !ok {
			return false
		}
		pid, _, ok := strings.Cut(rest, sep)
		if n, err := strconv.Atoi(pid); !ok || err != nil || n <= 0 {
			return false
		}
		_, err := os.Stat("/proc/" + pid)
		return errors.Is(err, os.ErrNotExist)
	}
	if ents, err := os.ReadDir("/run/netns"); err == nil {
		for _, e := range ents {
			if stale(e.Name(), "-") {
				exec.Command("ip", "netns", "del", e.Name()).Run()
			}
		}
	}
	if ents, err := os.ReadDir("/sys/class/net"); err == nil {
		for _, e := range ents {
			if stale(e.Name(), "u") {
				exec.Command("ip", "link", "del", e.Name()).Run()
			}
		}
	}
}

func run(t testing.TB, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), patience)
	defer cancel()
	out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func waitFor(t testing.TB, what string, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(patience)
	for {
		err := fn()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s: %v", what, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ---- the network: a switch namespace with a bridge, one uplink per node ----

const initiatorAddr = "10.7.0.100"

// seq makes the names of each switch and cluster of a run unique.
var seq atomic.Int32

func makeSwitch(t testing.TB) string {
	sw := fmt.Sprintf("%s-sw%d", prefix, seq.Add(1))
	run(t, "ip", "netns", "add", sw)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", sw).Run() })
	run(t, "ip", "-n", sw, "link", "set", "lo", "up")
	run(t, "ip", "-n", sw, "link", "add", "br0", "type", "bridge")
	run(t, "ip", "-n", sw, "addr", "add", initiatorAddr+"/16", "dev", "br0")
	run(t, "ip", "-n", sw, "link", "set", "br0", "up")
	return sw
}

// uplink is a veth whose other end is a port of the switch's bridge.
func uplink(t testing.TB, sw, name string) {
	run(t, "ip", "link", "add", name, "type", "veth", "peer", "name", name+"p", "netns", sw)
	t.Cleanup(func() { exec.Command("ip", "link", "del", name).Run() })
	run(t, "ip", "-n", sw, "link", "set", name+"p", "master", "br0")
	run(t, "ip", "-n", sw, "link", "set", name+"p", "up")
	run(t, "ip", "link", "set", name, "up")
}

// ---- a proxy in front of etcd that can go silent (a partition) ----

type proxy struct {
	ln     net.Listener
	target string
	cut    atomic.Bool
	mu     sync.Mutex
	conns  []net.Conn
}

func newProxy(t testing.TB, target string) *proxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, target: strings.TrimPrefix(target, "http://")}
	t.Cleanup(func() { ln.Close(); p.drop() })
	go p.serve()
	return p
}

func (p *proxy) url() string { return "http://" + p.ln.Addr().String() }

func (p *proxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		p.conns = append(p.conns, c)
		p.mu.Unlock()
		go func() {
			u, err := net.Dial("tcp", p.target)
			if err != nil {
				c.Close()
				return
			}
			p.mu.Lock()
			p.conns = append(p.conns, u)
			p.mu.Unlock()
			go p.pipe(u, c)
			p.pipe(c, u)
		}()
	}
}

// pipe copies src to dst, dropping everything while the proxy is cut: silence, not an error,
// as a partitioned network behaves.
func (p *proxy) pipe(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !p.cut.Load() {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			dst.Close()
			return
		}
	}
}

func (p *proxy) drop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

// heal ends the partition; connections that lost bytes are closed so clients reconnect.
func (p *proxy) heal() {
	p.drop()
	p.cut.Store(false)
}

// ---- nodes ----

type node struct {
	t      testing.TB
	name   string
	up     string // its uplink
	cfg    string
	sock   string
	proxy  *proxy
	cmd    *exec.Cmd
	done   chan struct{}
	mu     sync.Mutex
	lines  []string
	starts int
}

// newNode writes the file of node name of the cluster whose etcd keys are under keys.
func newNode(t testing.TB, dir, sockDir, keys, name, up string) *node {
	n := &node{t: t, name: name, up: up, cfg: filepath.Join(dir, name+".toml"), sock: filepath.Join(sockDir, name+".sock"),
		proxy: newProxy(t, etcd.URL)}
	nsDir := filepath.Join(dir, name+"-netns")
	doc := fmt.Sprintf(`[server]
netns_dir = %q
data_dir = %q
control_socket = %q
backend = "rbd"
  [server.rbd]
  conf = %q
  pool = %q
  op_timeout = "10s"

[cluster]
endpoints = [%q]
name = %q
uplink = %q
lease_ttl = "2s"
prefix = %q
standby = %v
`, nsDir, filepath.Join(dir, name+"-data"), n.sock, ceph.ConfPath, ceph.Pool, n.proxy.url(), name, up, keys, standby)
	if err := os.WriteFile(n.cfg, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		n.kill()
		// A killed node leaves its tenants' namespaces mounted: the machine "died".
		if ents, err := os.ReadDir(nsDir); err == nil {
			for _, e := range ents {
				p := filepath.Join(nsDir, e.Name())
				syscall.Unmount(p, syscall.MNT_DETACH)
				os.Remove(p)
			}
		}
		if t.Failed() {
			t.Logf("node %s log:\n%s", name, n.log())
		}
	})
	return n
}

func (n *node) start() {
	n.t.Helper()
	n.starts++
	n.cmd = exec.Command(bin, "serve", "-c", n.cfg, "-log-format", "json")
	stderr, err := n.cmd.StderrPipe()
	if err != nil {
		n.t.Fatal(err)
	}
	if err := n.cmd.Start(); err != nil {
		n.t.Fatal(err)
	}
	n.done = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			n.mu.Lock()
			n.lines = append(n.lines, fmt.Sprintf("[%d] %s", n.starts, sc.Text()))
			n.mu.Unlock()
		}
		cmd.Wait()
		close(done)
	}(n.cmd, n.done)
}

func (n *node) signal(sig syscall.Signal) { n.cmd.Process.Signal(sig) }

func (n *node) kill() {
	if n.cmd == nil {
		return
	}
	n.cmd.Process.Signal(syscall.SIGCONT)
	n.cmd.Process.Kill()
	<-n.done
}

// stop is a planned leave: SIGTERM, and wait for the exit.
func (n *node) stop() {
	n.t.Helper()
	n.signal(syscall.SIGTERM)
	select {
	case <-n.done:
	case <-time.After(patience):
		n.t.Fatalf("node %s did not stop within %v of SIGTERM", n.name, patience)
	}
}

func (n *node) log() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return strings.Join(n.lines, "\n")
}

// count counts log lines of the current start with msg and, if given, tenant.
func (n *node) count(msg, tenant string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	c := 0
	for _, l := range n.lines {
		var m map[string]any
		if !strings.HasPrefix(l, fmt.Sprintf("[%d] ", n.starts)) || json.Unmarshal([]byte(l[strings.Index(l, " ")+1:]), &m) != nil {
			continue
		}
		if m["msg"] == msg && (tenant == "" || m["tenant"] == tenant) {
			c++
		}
	}
	return c
}

// countRaw counts the lines of n's current run that hold every one of parts: for lines that
// are not JSON (librbd's and package rbd's, through the default logger).
func (n *node) countRaw(parts ...string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	c := 0
	cur := fmt.Sprintf("[%d] ", n.starts)
	for _, l := range n.lines {
		if !strings.HasPrefix(l, cur) {
			continue
		}
		all := true
		for _, p := range parts {
			all = all && strings.Contains(l, p)
		}
		if all {
			c++
		}
	}
	return c
}

// session finds the logged-in session of initiator on tenant that n serves (`nstarget status`):
// the bytes it has written through n and when it logged in. ok is false if there is none, or n
// does not answer.
func (n *node) session(tenant, initiator string) (written uint64, since time.Time, ok bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "status", "-socket", n.sock, "-o", "json", tenant).Output()
	if err != nil {
		return 0, time.Time{}, false
	}
	var st struct {
		Tenants []struct {
			Name     string `json:"name"`
			Sessions []struct {
				Initiator    string    `json:"initiator"`
				Since        time.Time `json:"since"`
				WrittenBytes uint64    `json:"written_bytes"`
			} `json:"sessions"`
		} `json:"tenants"`
	}
	if json.Unmarshal(out, &st) != nil {
		return 0, time.Time{}, false
	}
	for _, tn := range st.Tenants {
		for _, s := range tn.Sessions {
			if tn.Name == tenant && s.Initiator == initiator {
				return s.WrittenBytes, s.Since, true
			}
		}
	}
	return 0, time.Time{}, false
}

// ---- the cluster as a whole ----

type status struct {
	Tenants []struct {
		Name, Owner, Placed string
	} `json:"tenants"`
}

// owners returns each tenant's owner, and whether every tenant is owned where placement
// puts it (no move pending).
func owners(t testing.TB, keys string) (map[string]string, bool) {
	t.Helper()
	out := run(t, bin, "cluster", "status", "-endpoints", etcd.URL, "-prefix", keys, "-o", "json")
	var st status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("cluster status: %v: %s", err, out)
	}
	m := map[string]string{}
	settled := true
	for _, tn := range st.Tenants {
		m[tn.Name] = tn.Owner
		settled = settled && tn.Owner != "" && tn.Owner == tn.Placed
	}
	return m, settled
}

// tenantAddr is tenant i's address, in the switch's 10.7.0.0/16 (the initiator is 10.7.0.100).
func tenantAddr(i int) string { return fmt.Sprintf("10.7.%d.%d", 1+i/200, 10+i%200) }

func tenantsDoc(n int) string {
	var b bytes.Buffer
	for i := range n {
		fmt.Fprintf(&b, `
[[tenant]]
name = "t%d"
portal = "%s:3260"
  [tenant.network]
  address = "%s/16"
  [[tenant.target]]
  iqn = "iqn.2026-12.org.nstarget:t%d"
    [[tenant.target.lun]]
    volume = "%s-t%d"
    size = "16MiB"
`, i, tenantAddr(i), tenantAddr(i), i, prefix, i)
	}
	return b.String()
}

// startQIO runs an interactive qemu-io on url in the switch namespace sw: one session that
// stays logged in, and reconnects by itself when its target moves.
func startQIO(t *testing.T, sw, url string) *qemuio.Session {
	q, err := qemuio.Start("/run/netns/"+sw, url, patience)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(q.Close)
	return q
}

// ---- the open-iscsi guest ----

const (
	guestAddr      = "10.7.0.101" // in the switch's 10.7.0.0/16, next to the host's initiators
	guestInitiator = "iqn.2026-12.org.nstarget:open-iscsi-guest"
	// guestReplacementTimeout is how long open-iscsi queues I/O while it logs in again after a
	// failure before it fails it: far above a takeover (seconds), so only a hang fails a write.
	guestReplacementTimeout = 120
)

// bootWriterGuest boots a qemu guest whose tap is a port of the switch sw's bridge, running
// open-iscsi's numbered writer (tests/vmguest/guest/numbered-writes.sh) against target iqn at
// portal. It waits for the host's "go" (g.Send) before it logs in, so it may boot while the
// cluster comes up. It writes to LUN 0 only in its slots 4 KiB blocks from block base on.
func bootWriterGuest(t *testing.T, sw, portal, iqn string, base, slots int) *vmguest.Guest {
	t.Helper()
	<-guestReady
	if guestImageErr != nil {
		t.Fatalf("open-iscsi guest image (tests/vmguest/build-image.sh, run as root; scripts/deps.sh): %v", guestImageErr)
	}
	if err := vmguest.AddTap(sw, "tap0"); err != nil {
		t.Fatal(err)
	}
	run(t, "ip", "-n", sw, "link", "set", "tap0", "master", "br0")
	t.Logf("open-iscsi guest: %s, prepared in %.1fs", guestImage, guestImage.Took.Seconds())
	return guestImage.Boot(t, vmguest.Spec{
		Name: "open-iscsi", NS: sw, Tap: "tap0", IP: guestAddr + "/16", Portal: portal,
		Script: guestImage.Script("numbered-writes.sh"),
		Params: map[string]string{
			"iname": guestInitiator, "iqn": iqn,
			"replacement_timeout": strconv.Itoa(guestReplacementTimeout),
			// A dead owner is noticed within seconds (a NOP-Out unanswered, or answered with a
			// reset by the new owner's kernel), a login to an address nobody holds yet is retried.
			"login_timeout": "5", "noop_interval": "2", "noop_timeout": "3",
			"base": strconv.Itoa(base), "slots": strconv.Itoa(slots),
			"max_seconds": strconv.Itoa(int(patience.Seconds())),
		},
	})[0]
}
