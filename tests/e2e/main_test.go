//go:build linux

package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var (
	bin    string // the nstarget binary under test, built with -race
	prefix string // of every namespace this test process creates
)

// tools the tests drive; scripts/deps.sh installs them.
var tools = map[string]string{
	"ip": "iproute2", "iscsi-ls": "libiscsi-bin", "iscsi-inq": "libiscsi-bin",
	"iscsi-readcapacity16": "libiscsi-bin", "qemu-io": "qemu-utils (+ qemu-block-extra for iscsi://)",
	"busybox": "busybox-static",
}

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "e2e: must run as root: the tests create network namespaces")
		return 1
	}
	for tool, pkg := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			fmt.Fprintf(os.Stderr, "e2e: %s not found: run scripts/deps.sh (apt-get install -y %s)\n", tool, pkg)
			return 1
		}
	}
	if _, err := os.Stat("/usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so"); err != nil && runtime.GOARCH == "amd64" {
		fmt.Fprintln(os.Stderr, "e2e: qemu's iscsi driver missing: apt-get install -y qemu-block-extra (scripts/deps.sh)")
		return 1
	}
	dir, err := os.MkdirTemp("", "nstarget-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	bin = filepath.Join(dir, "nstarget")
	// go test puts its own GOROOT/bin first in PATH: this is the go that runs the test.
	build := exec.Command("go", "build", "-race", "-o", bin, "nstarget/cmd/nstarget")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: go build -race: %v\n%s", err, out)
		return 1
	}
	// A -race binary sleeps 1 s at exit by default: every `nstarget reload`/`status` the
	// tests run would wait for nothing.
	os.Setenv("GORACE", "atexit_sleep_ms=0")
	prefix = fmt.Sprintf("e2e-%d", os.Getpid())
	sweepStaleNetns()
	return m.Run()
}

// ---- namespaces ----

func ipRun(args ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// addNetns creates a named namespace and removes it when the test ends (if it still exists).
func addNetns(t *testing.T, name string) {
	t.Helper()
	if err := ipRun("netns", "add", name); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if _, err := os.Stat("/run/netns/" + name); err == nil {
			if err := ipRun("netns", "del", name); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
	})
}

// pair is a tenant namespace and the initiator namespace wired to it: 10.0.0.1 on the tenant
// side, 10.0.0.2 on the initiator side; every pair uses the same addresses.
type pair struct {
	tenant, ini string
}

func newPair(t *testing.T, name string) *pair {
	t.Helper()
	p := &pair{tenant: prefix + "-" + name, ini: prefix + "-" + name + "-i"}
	addNetns(t, p.tenant)
	addNetns(t, p.ini)
	p.link(t)
	return p
}

// link creates the veth pair inside the two namespaces, so no interface ever appears in the
// root namespace and it dies with either namespace.
func (p *pair) link(t *testing.T) {
	t.Helper()
	for _, s := range [][]string{
		{"-n", p.tenant, "link", "add", "e2e0", "type", "veth", "peer", "name", "e2e1", "netns", p.ini},
		{"-n", p.tenant, "addr", "add", "10.0.0.1/24", "dev", "e2e0"},
		{"-n", p.ini, "addr", "add", "10.0.0.2/24", "dev", "e2e1"},
		{"-n", p.tenant, "link", "set", "lo", "up"},
		{"-n", p.ini, "link", "set", "lo", "up"},
		{"-n", p.tenant, "link", "set", "e2e0", "up"},
		{"-n", p.ini, "link", "set", "e2e1", "up"},
	} {
		if err := ipRun(s...); err != nil {
			t.Fatal(err)
		}
	}
}

// run runs an initiator tool inside the initiator namespace.
func (p *pair) run(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", p.ini}, args...)...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// mustIni runs a tool that must succeed.
func (p *pair) mustIni(t *testing.T, args ...string) string {
	t.Helper()
	out, err := p.run(args...)
	if err != nil {
		t.Fatalf("in %s: %v", p.ini, err)
	}
	return out
}

// session starts an interactive qemu-io on url inside the initiator namespace: it logs in and
// keeps the session open until the process is killed.
func (p *pair) session(t *testing.T, url string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", p.ini, "qemu-io", "-f", "raw", url)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		cmd.Process.Kill()
		cmd.Wait()
	})
	return cmd
}

// ---- the server process ----

type logLine map[string]any

func (l logLine) str(k string) string {
	if v, ok := l[k]; ok {
		return fmt.Sprint(v)
	}
	return ""
}

// serveLog is what a `nstarget serve` process wrote to stderr: every line, and the JSON ones
// parsed, for assertions while it runs.
type serveLog struct {
	mu   sync.Mutex
	logs []logLine
	raw  bytes.Buffer
}

// collect reads r to its end.
func (s *serveLog) collect(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var l logLine
		ok := json.Unmarshal(line, &l) == nil
		s.mu.Lock()
		s.raw.Write(line)
		s.raw.WriteByte('\n')
		if ok {
			s.logs = append(s.logs, l)
		}
		s.mu.Unlock()
	}
}

func (s *serveLog) output() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.raw.String()
}

// count returns how many log lines match.
func (s *serveLog) count(match func(logLine) bool) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, l := range s.logs {
		if match(l) {
			n++
		}
	}
	return n
}

type server struct {
	serveLog
	t    *testing.T
	cmd  *exec.Cmd
	done chan struct{}
	code int
}

// startServe runs `nstarget serve -c cfg` with JSON debug logs collected for assertions.
func startServe(t *testing.T, cfg string) *server {
	t.Helper()
	s := &server{t: t, done: make(chan struct{})}
	s.cmd = exec.Command(bin, "serve", "-c", cfg, "-log-format", "json", "-log-level", "debug")
	stderr, err := s.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	s.cmd.Stdout = io.Discard
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(s.done)
		s.collect(stderr)
		s.cmd.Wait()
		s.code = s.cmd.ProcessState.ExitCode()
	}()
	t.Cleanup(func() {
		select {
		case <-s.done:
		default:
			s.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-s.done:
			case <-time.After(patience):
				s.cmd.Process.Kill()
				<-s.done
			}
		}
		if strings.Contains(s.output(), "DATA RACE") {
			t.Errorf("the race detector fired in nstarget serve:\n%s", s.output())
		}
		if t.Failed() || testing.Verbose() {
			t.Logf("nstarget serve output:\n%s", s.output())
		}
	})
	return s
}

// patience bounds every wait for the server or the kernel. Generous on purpose: make test runs
// the other suites (conformance, VMs) at the same time on two cores, and a -race build of the
// server; a wait that passes is as fast as the event it waits for.
const patience = 90 * time.Second

// waitLog waits for the n-th (1-based) log line that matches and returns it.
func (s *server) waitLog(what string, n int, match func(logLine) bool) logLine {
	s.t.Helper()
	deadline := time.Now().Add(patience)
	for {
		s.mu.Lock()
		seen := 0
		for _, l := range s.logs {
			if match(l) {
				if seen++; seen == n {
					s.mu.Unlock()
					return l
				}
			}
		}
		s.mu.Unlock()
		select {
		case <-s.done:
			s.t.Fatalf("nstarget serve exited (code %d) while waiting for %s", s.code, what)
		default:
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func msgIs(msg string, kv ...string) func(logLine) bool {
	return func(l logLine) bool {
		if l.str("msg") != msg {
			return false
		}
		for i := 0; i+1 < len(kv); i += 2 {
			if l.str(kv[i]) != kv[i+1] {
				return false
			}
		}
		return true
	}
}

// listening waits until the tenant namespace ns has its listener up and returns the namespace
// id it is listening in.
func (s *server) listening(ns string, n int) string {
	s.t.Helper()
	return s.waitLog("listener in "+ns, n, msgIs("tenant listening", "netns", ns)).str("netns_id")
}

// stop sends SIGTERM and returns the exit code.
func (s *server) stop() int {
	s.t.Helper()
	s.cmd.Process.Signal(syscall.SIGTERM)
	// Sessions get up to 10 s to log out; the rest of patience is for a loaded machine.
	select {
	case <-s.done:
	case <-time.After(patience):
		s.t.Errorf("nstarget serve did not exit within %v of SIGTERM", patience)
		s.cmd.Process.Kill()
		<-s.done
	}
	return s.code
}

// writeConfig writes a config with @POOL@ and @P@ (the namespace prefix) filled in.
func writeConfig(t *testing.T, dir, name, doc string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	doc = strings.NewReplacer("@POOL@", filepath.Join(dir, "pool"), "@P@", prefix).Replace(doc)
	if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// runBin runs the binary to completion and returns its exit code and output.
func runBin(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil && cmd.ProcessState == nil {
		t.Fatalf("run %v: %v", args, err)
	}
	if strings.Contains(stderr.String(), "DATA RACE") {
		t.Errorf("the race detector fired in nstarget %v:\n%s", args, stderr.String())
	}
	return cmd.ProcessState.ExitCode(), stdout.String(), stderr.String()
}

// waitFor retries fn until it succeeds or patience runs out.
func waitFor(t *testing.T, what string, fn func() error) {
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

// sweepStaleNetns deletes e2e-<pid>-* namespaces of test binaries that no longer run: a run
// killed on its deadline runs no cleanup, and its namespaces would stay forever.
func sweepStaleNetns() {
	entries, err := os.ReadDir("/run/netns")
	if err != nil {
		return
	}
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), "e2e-")
		if !ok {
			continue
		}
		pid, _, ok := strings.Cut(rest, "-")
		if n, err := strconv.Atoi(strings.TrimRight(pid, "abcdefghijklmnopqrstuvwxyz")); !ok || err != nil || n <= 0 {
			continue
		}
		if _, err := os.Stat("/proc/" + strings.TrimRight(pid, "abcdefghijklmnopqrstuvwxyz")); errors.Is(err, os.ErrNotExist) {
			if err := ipRun("netns", "del", e.Name()); err != nil {
				fmt.Fprintln(os.Stderr, "e2e: removing a stale namespace:", err)
			}
		}
	}
}
