//go:build linux

package e2e

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

const notifyConfig = `
[server]
data_dir = "@POOL@"

[[tenant]]
name   = "ready"
netns  = "@P@-ready"
portal = "10.0.0.1:3260"
  [[tenant.target]]
  iqn = "iqn.2026-11.io.e2e:disk"
    [[tenant.target.lun]]
    volume = "ready-disk"
    size   = "16MiB"

[[tenant]]
name   = "absent"
netns  = "@P@-absent-ns"
  [[tenant.target]]
  iqn = "iqn.2026-11.io.e2e:disk"
    [[tenant.target.lun]]
    volume = "absent-disk"
    size   = "16MiB"
`

// nextNotification returns the next sd_notify datagram. The wait is bounded only so that a
// missing one fails the test instead of hanging it.
func nextNotification(t *testing.T, c *net.UnixConn) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(patience))
	buf := make([]byte, 4096)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("waiting for an sd_notify datagram: %v", err)
	}
	return string(buf[:n])
}

func TestServeNotifiesSystemdReadyOnceListeningAndStoppingOnSIGTERM(t *testing.T) {
	p := newPair(t, "ready")
	dir := t.TempDir()
	cfg := writeConfig(t, dir, "notify.toml", notifyConfig)
	sock := filepath.Join(dir, "notify")
	nc, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()

	cmd := exec.Command(bin, "serve", "-c", cfg, "-log-format", "json", "-log-level", "debug")
	// A file, not a pipe: Wait must not depend on who else holds the pipe open.
	logPath := filepath.Join(dir, "serve.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.Env = append(cmd.Environ(), "NOTIFY_SOCKET="+sock)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		select {
		case <-exited:
		default:
			cmd.Process.Kill()
			<-exited
		}
		out, _ := os.ReadFile(logPath)
		if t.Failed() || bytes.Contains(out, []byte("DATA RACE")) {
			t.Errorf("nstarget serve output:\n%s", out)
		}
	})

	// The first state is READY, sent without waiting for the tenant whose namespace is
	// absent, and only once the present tenant's portal accepts connections.
	if got := nextNotification(t, nc); !strings.HasPrefix(got, "READY=1\n") {
		t.Fatalf("first notification %q, want READY=1", got)
	}
	conns, err := dialIn(p.ini, "10.0.0.1:3260", 1)
	if err != nil {
		t.Fatalf("the portal does not accept after READY=1: %v", err)
	}
	conns[0].Close()

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if got := nextNotification(t, nc); !strings.HasPrefix(got, "STOPPING=1\n") {
		t.Fatalf("notification after SIGTERM %q, want STOPPING=1", got)
	}
	select {
	case <-exited:
		if waitErr != nil {
			t.Fatalf("serve after SIGTERM: %v", waitErr)
		}
	case <-time.After(patience):
		t.Fatal("serve did not exit after SIGTERM")
	}
}
