package conformance

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"nstarget/backend"
	"nstarget/target"
	"nstarget/target/scsi"
)

// nsPrefix is this package's namespace prefix: every namespace it makes starts with it.
const nsPrefix = "iscsi-conf"

// testNS creates a network namespace with loopback up and deletes it when the test ends.
func testNS(t *testing.T, tag string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("conformance tests need root (network namespaces)")
	}
	name := fmt.Sprintf("%s-%s-%d", nsPrefix, tag, os.Getpid())
	exec.Command("ip", "netns", "del", name).Run() // leftover of a killed run of this pid
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("lo up in %s: %v: %s", name, err, out)
	}
	return name
}

// listenIn opens a TCP listener inside namespace ns: a locked OS thread switches into it,
// creates the socket (which stays bound to that namespace) and switches back.
func listenIn(t *testing.T, ns, addr string) net.Listener {
	t.Helper()
	type result struct {
		ln  net.Listener
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: err}
			return
		}
		defer orig.Close()
		target, err := os.Open("/run/netns/" + ns)
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: err}
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: fmt.Errorf("setns: %w", err)}
			return
		}
		ln, lerr := net.Listen("tcp", addr)
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			// The thread is stuck in the wrong namespace: leave it locked so it dies with
			// this goroutine instead of being reused.
			ch <- result{err: fmt.Errorf("setns back: %w", err)}
			return
		}
		runtime.UnlockOSThread()
		ch <- result{ln, lerr}
	}()
	r := <-ch
	if r.err != nil {
		t.Fatalf("listen in %s: %v", ns, r.err)
	}
	t.Cleanup(func() { r.ln.Close() })
	return r.ln
}

// lab is one served target: a volume of its own, a target, a listener in the namespace.
type lab struct {
	srv  *target.Server
	addr string
	iqn  string
}

// serveTargets serves one target per name on ns:3260, each on its own volume, for one tenant.
func serveTargets(t *testing.T, ns string, names []string, volSize int64, log *slog.Logger) (*target.Server, string) {
	t.Helper()
	pool, err := backend.OpenPool(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pool.Close() })
	srv := target.NewServer(target.Options{Logger: log})
	tenant := srv.NewTenant(ns, target.Limits{})
	for i, n := range names {
		vol, err := pool.Open(fmt.Sprintf("vol%d", i), volSize)
		if err != nil {
			t.Fatal(err)
		}
		lu, err := scsi.NewLU(vol, scsi.LUConfig{WriteCache: true})
		if err != nil {
			t.Fatal(err)
		}
		tg, err := srv.NewTarget(target.TargetConfig{IQN: n, Alias: "conformance", LUNs: map[uint64]*scsi.LU{0: lu}})
		if err != nil {
			t.Fatal(err)
		}
		tenant.Targets = append(tenant.Targets, tg)
	}
	ln := listenIn(t, ns, "127.0.0.1:3260")
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				srv.ServeConn(ctx, c, tenant, slog.String("netns", ns))
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		sctx, c2 := context.WithTimeout(context.Background(), 5*time.Second)
		srv.Shutdown(sctx)
		c2()
		cancel()
		wg.Wait()
	})
	return srv, ln.Addr().String()
}

func needTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not installed: run scripts/deps.sh (apt: libiscsi-bin qemu-utils qemu-block-extra)", tool)
		}
	}
}

// inNS runs a command inside ns with a timeout and returns its combined output.
func inNS(ctx context.Context, ns string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns}, args...)...)
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func testLogger(t *testing.T) *slog.Logger {
	lvl := slog.LevelWarn
	if os.Getenv("NSTARGET_CONFORMANCE_LOG") != "" {
		lvl = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
}

func lines(s string) []string {
	var out []string
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		out = append(out, sc.Text())
	}
	return out
}
