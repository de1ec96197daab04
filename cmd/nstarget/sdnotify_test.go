//go:build linux

package main

import (
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"nstarget/conf"
	"nstarget/netnsmux"
)

// listenNotify is a stand-in for systemd's notification socket.
func listenNotify(t *testing.T, name string) *net.UnixConn {
	t.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func readDatagram(t *testing.T, c *net.UnixConn) string {
	t.Helper()
	// Sent before this is called, so it is queued: the deadline only turns a missing one into
	// a failure.
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	buf := make([]byte, 4096)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("no notification: %v", err)
	}
	return string(buf[:n])
}

func TestNotifierSendsStatesToPathAndAbstractSockets(t *testing.T) {
	for _, name := range []string{
		filepath.Join(t.TempDir(), "notify"),
		fmt.Sprintf("@nstarget-test-%d", os.Getpid()),
	} {
		c := listenNotify(t, name)
		t.Setenv("NOTIFY_SOCKET", name)
		n := newNotifier(slog.Default())
		n.Ready()
		if got := readDatagram(t, c); !strings.HasPrefix(got, "READY=1\n") {
			t.Errorf("%s: Ready sent %q", name, got)
		}
		n.Reloading()
		if got := readDatagram(t, c); !strings.HasPrefix(got, "RELOADING=1\n") || !strings.Contains(got, "\nMONOTONIC_USEC=") {
			t.Errorf("%s: Reloading sent %q", name, got)
		}
		n.Stopping()
		if got := readDatagram(t, c); !strings.HasPrefix(got, "STOPPING=1\n") {
			t.Errorf("%s: Stopping sent %q", name, got)
		}
	}
}

func TestNotifierWithoutSystemdDoesNothing(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	n := newNotifier(slog.Default())
	n.Ready()
	n.Stopping()
	var nilNotifier *notifier
	nilNotifier.Ready()
}

func TestReadyWaitsForEveryExistingNamespaceToListenOrFail(t *testing.T) {
	dir := t.TempDir()
	// Namespaces "up", "taken" and "deleted" exist (plain files stand in for them, with a
	// check that accepts any file), "missing" does not.
	for _, name := range []string{"up", "taken", "deleted"} {
		if err := os.WriteFile(filepath.Join(dir, name), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cfg := &conf.Config{Server: conf.Server{NetnsDir: dir}}
	for _, name := range []string{"up", "taken", "deleted", "missing"} {
		cfg.Tenants = append(cfg.Tenants, &conf.Tenant{Name: name, Netns: name})
	}
	exists := func(path string) bool { _, err := os.Stat(path); return err == nil }
	fired := 0
	r := newReadinessWith(cfg, exists, func() { fired++ })

	steps := []struct {
		what string
		do   func()
	}{
		{"up listens", func() { r.event(netnsmux.Event{Kind: netnsmux.ListenerUp, Namespace: "up"}) }},
		{"serve registered every listener", r.started},
		{"taken's listen fails (retried)", func() { r.event(netnsmux.Event{Kind: netnsmux.ListenerFailed, Namespace: "taken"}) }},
		{"an unrelated event", func() { r.event(netnsmux.Event{Kind: netnsmux.NamespaceAdded, Namespace: "deleted"}) }},
	}
	for _, s := range steps {
		s.do()
		if fired != 0 {
			t.Fatalf("READY after %q, with deleted still waiting", s.what)
		}
	}
	r.event(netnsmux.Event{Kind: netnsmux.NamespaceRemoved, Namespace: "deleted"})
	if fired != 1 {
		t.Fatalf("READY sent %d times once every existing namespace had an outcome, want 1", fired)
	}
	r.event(netnsmux.Event{Kind: netnsmux.ListenerUp, Namespace: "missing"})
	if fired != 1 {
		t.Fatalf("READY sent again (%d times)", fired)
	}
}

func TestReadyWithNoNamespaceYetComesWhenServing(t *testing.T) {
	cfg := &conf.Config{Server: conf.Server{NetnsDir: t.TempDir()}, Tenants: []*conf.Tenant{{Name: "a", Netns: "a"}}}
	fired := 0
	r := newReadinessWith(cfg, namespaceExists, func() { fired++ })
	r.started()
	if fired != 1 {
		t.Fatalf("READY sent %d times with no namespace to wait for, want 1", fired)
	}
}
