//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"nstarget/conf"
	"nstarget/fleet"
	"nstarget/netnsmux"
)

// patience only turns a hang into a failure; nothing here depends on the machine's speed.
const patience = 60 * time.Second

// makeNamespaces makes network namespaces dir/NAME in-process and removes them (mounts
// included) when the test ends.
func makeNamespaces(t *testing.T, dir string, names ...string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces)")
	}
	for _, n := range names {
		if _, err := fleet.Add(dir, n); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := fleet.Delete(dir, n); err != nil {
				t.Error(err)
			}
		})
	}
}

// listening reports whether a TCP connection to addr made inside namespace dir/name gets in.
func listening(t *testing.T, dir, name, addr string) bool {
	t.Helper()
	fd, err := syscall.Open(filepath.Join(dir, name), syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)
	var ok bool
	err = fleet.In(fd, func() error {
		c, err := net.DialTimeout("tcp", addr, patience)
		if errors.Is(err, syscall.ECONNREFUSED) {
			return nil
		}
		if err != nil {
			return err
		}
		ok = true
		return c.Close()
	})
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

// waitListening polls until addr in dir/name is listening (want) or not.
func waitListening(t *testing.T, dir, name, addr string, want bool) {
	t.Helper()
	for deadline := time.Now().Add(patience); listening(t, dir, name, addr) != want; {
		if time.Now().After(deadline) {
			t.Fatalf("%s in %s: listening is not %v after %v", addr, name, want, patience)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func twoTenantConfig(t *testing.T, nsDir string) *conf.Config {
	t.Helper()
	data := t.TempDir()
	doc := fmt.Sprintf("[server]\nnetns_dir = %q\ndata_dir = %q\n", nsDir, data)
	for _, n := range []string{"ea", "eb"} {
		doc += fmt.Sprintf("\n[[tenant]]\nname = %q\nportal = \"127.0.0.1:3260\"\n  [[tenant.target]]\n  iqn = \"iqn.2026-12.org.nstarget:%s\"\n"+
			"    [[tenant.target.lun]]\n    volume = %q\n    size = \"1MiB\"\n", n, n, n)
	}
	cfg, err := conf.Parse(filepath.Join(data, "nstarget.toml"), []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// TestServeMakesTheEarlyMuxListenWhereTheFileSays: serve takes over a mux started from a
// wrong guess (a portal the file does not have, a tenant missing): what the guess had wrong is
// dropped, what it missed is added, and the events the mux held while the file was parsed
// reach serve's OnEvent.
func TestServeMakesTheEarlyMuxListenWhereTheFileSays(t *testing.T) {
	nsDir := t.TempDir()
	makeNamespaces(t, nsDir, "ea", "eb")
	cfg := twoTenantConfig(t, nsDir)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))

	early := startEarlyMux(log, nsDir, []conf.Portal{{Netns: "ea", Addr: "127.0.0.1:3260"}, {Netns: "ea", Addr: "127.0.0.1:3261"}})
	defer early.close()
	waitListening(t, nsDir, "ea", "127.0.0.1:3261", true) // before serve exists

	var mu sync.Mutex
	ups := map[string]int{}
	ready := make(chan struct{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- serve(ctx, cfg, serveOptions{Logger: log, Early: early,
			OnService: func(*service) { close(ready) },
			OnEvent: func(ev netnsmux.Event) {
				if ev.Kind == netnsmux.ListenerUp {
					mu.Lock()
					ups[ev.Namespace+" "+ev.Addr]++
					mu.Unlock()
				}
			}})
	}()
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("serve: %v", err)
	case <-time.After(patience):
		t.Fatal("serve did not build its tenants")
	}
	waitListening(t, nsDir, "ea", "127.0.0.1:3260", true)
	waitListening(t, nsDir, "eb", "127.0.0.1:3260", true)
	waitListening(t, nsDir, "ea", "127.0.0.1:3261", false)
	for deadline := time.Now().Add(patience); ; time.Sleep(5 * time.Millisecond) {
		mu.Lock()
		n1, n2 := ups["ea 127.0.0.1:3260"], ups["eb 127.0.0.1:3260"]
		mu.Unlock()
		if n1 == 1 && n2 == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ListenerUp events seen by serve: %v", ups)
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("serve: %v", err)
	}
	waitListening(t, nsDir, "ea", "127.0.0.1:3260", false)
}

// TestEarlyMuxNotTakenOverIsClosed: a mux serve does not take over (the file was refused, or
// names another netns_dir) stops listening and leaves nothing behind.
func TestEarlyMuxNotTakenOverIsClosed(t *testing.T) {
	nsDir := t.TempDir()
	makeNamespaces(t, nsDir, "ea")
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	p := []conf.Portal{{Netns: "ea", Addr: "127.0.0.1:3260"}}

	early := startEarlyMux(log, nsDir, p)
	waitListening(t, nsDir, "ea", "127.0.0.1:3260", true)
	early.close() // what cmdServe's defer does when the file is refused
	waitListening(t, nsDir, "ea", "127.0.0.1:3260", false)
	early.close() // twice is harmless

	early = startEarlyMux(log, nsDir, p)
	waitListening(t, nsDir, "ea", "127.0.0.1:3260", true)
	if early.adopt(filepath.Join(nsDir, "other"), func(netnsmux.Event) {}) {
		t.Fatal("adopted by a configuration with another netns_dir")
	}
	waitListening(t, nsDir, "ea", "127.0.0.1:3260", false)
	early.close()
}

// TestServeWithARefusedFileExitsOneAndListensNowhere: the early mux of a file that Parse then
// refuses is closed; the exit code and the FILE:LINE finding are those of any refused file.
func TestServeWithARefusedFileExitsOneAndListensNowhere(t *testing.T) {
	nsDir := t.TempDir()
	makeNamespaces(t, nsDir, "ea")
	dir := t.TempDir()
	file := filepath.Join(dir, "nstarget.toml")
	doc := fmt.Sprintf("[server]\nnetns_dir = %q\ndata_dir = %q\n\n[[tenant]]\nname = \"ea\"\nportal = \"127.0.0.1:3260\"\nbogus = 1\n", nsDir, dir)
	if err := os.WriteFile(file, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytesBuffer
	if code := run([]string{"serve", "-c", file}, &stdout, &stderr); code != exitFail {
		t.Fatalf("exit %d, want %d; stderr: %s", code, exitFail, stderr.String())
	}
	if want := file + ":8: tenant[0].bogus: unknown key"; !strings.Contains(stderr.String(), want) {
		t.Errorf("stderr lacks %q:\n%s", want, stderr.String())
	}
	if listening(t, nsDir, "ea", "127.0.0.1:3260") {
		t.Error("the refused file's portal still listens")
	}
}

// bytesBuffer is a bytes.Buffer safe for the logger's writes from other goroutines.
type bytesBuffer struct {
	mu sync.Mutex
	b  []byte
}

func (b *bytesBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.b = append(b.b, p...)
	return len(p), nil
}

func (b *bytesBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return string(b.b)
}
