//go:build linux

package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestFleetMakesTenantsThatServeAndDeleteRemovesEverything(t *testing.T) {
	dir := t.TempDir()
	nsDir := filepath.Join(dir, "netns")
	cfg := filepath.Join(dir, "fleet.toml")
	const n = 32
	fp := prefix + "f"
	t.Cleanup(func() { runBin(t, "fleet", "delete", "-prefix", fp, "-netns-dir", nsDir) })
	code, _, errOut := runBin(t, "fleet", "create", "-prefix", fp, "-count", "32", "-netns-dir", nsDir,
		"-config", cfg, "-data-dir", filepath.Join(dir, "pool"), "-size", "1MiB")
	if code != 0 || !strings.Contains(errOut, "created 32 namespaces") {
		t.Fatalf("fleet create: exit %d: %s", code, errOut)
	}
	if code, out, errOut := runBin(t, "check", "-c", cfg); code != 0 {
		t.Fatalf("the fleet's configuration does not check: %s%s", out, errOut)
	}
	s := startServe(t, cfg)
	for _, i := range []string{"0001", "0032"} {
		s.listening(fp+"-"+i, 1)
	}
	s.waitLog("all 32 tenants listening", n, msgIs("tenant listening"))
	for _, i := range []string{"0001", "0017", "0032"} {
		ctx, cancel := context.WithTimeout(context.Background(), patience)
		out, err := exec.CommandContext(ctx, "nsenter", "--net="+filepath.Join(nsDir, fp+"-"+i), "iscsi-ls", "iscsi://127.0.0.1").CombinedOutput()
		cancel()
		if err != nil || !strings.Contains(string(out), "iqn.2026-12.org.nstarget:fleet") {
			t.Fatalf("tenant %s: iscsi-ls: %v: %s", i, err, out)
		}
	}
	code, _, errOut = runBin(t, "fleet", "delete", "-prefix", fp, "-netns-dir", nsDir)
	if code != 0 || !strings.Contains(errOut, "deleted 32 namespaces") {
		t.Fatalf("fleet delete: exit %d: %s", code, errOut)
	}
	if left, _ := os.ReadDir(nsDir); len(left) != 0 {
		t.Fatalf("%d files left in %s", len(left), nsDir)
	}
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mi), nsDir+"/") {
		t.Fatal("namespace mounts left behind")
	}
	s.waitLog("every tenant offline", n, msgIs("tenant namespace gone; tenant offline"))
}
