//go:build linux

package e2e

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Each testdata/bad-*.toml starts with "# want: LINE KEY | MESSAGE" (KEY may be empty).
func TestBadConfigIsReportedWithFileLineAndPoolIsUntouched(t *testing.T) {
	files, err := filepath.Glob("testdata/bad-*.toml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no testdata/bad-*.toml: %v", err)
	}
	for _, f := range files {
		t.Run(strings.TrimSuffix(filepath.Base(f), ".toml"), func(t *testing.T) {
			src, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			first, _, _ := strings.Cut(string(src), "\n")
			want, ok := strings.CutPrefix(first, "# want: ")
			if !ok {
				t.Fatalf("%s: first line must be '# want: LINE KEY | MESSAGE'", f)
			}
			loc, msg, _ := strings.Cut(want, " | ")
			line, key, _ := strings.Cut(loc, " ")
			dir := t.TempDir()
			cfg := writeConfig(t, dir, filepath.Base(f), string(src))
			prefixWant := cfg + ":" + line + ": "
			if key != "" {
				prefixWant += key + ": "
			}
			for _, cmd := range []string{"check", "serve"} {
				code, _, stderr := runBin(t, cmd, "-c", cfg)
				if code != 1 {
					t.Errorf("nstarget %s exited %d, want 1; stderr:\n%s", cmd, code, stderr)
				}
				if !strings.Contains(stderr, prefixWant) || !strings.Contains(stderr, msg) {
					t.Errorf("nstarget %s: want %q ... %q in stderr:\n%s", cmd, prefixWant, msg, stderr)
				}
			}
			if _, err := os.Stat(filepath.Join(dir, "pool")); !os.IsNotExist(err) {
				t.Errorf("the pool directory was created by an invalid config (stat: %v)", err)
			}
		})
	}
}

// snapshot lists every file of dir with its size and modification time.
func snapshot(t *testing.T, dir string) string {
	t.Helper()
	var b strings.Builder
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		fmt.Fprintf(&b, "%s %d %d\n", p, info.Size(), info.ModTime().UnixNano())
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}

func TestSizeSmallerThanExistingVolumeIsRefusedWithoutTouchingIt(t *testing.T) {
	dir := t.TempDir()
	src, err := os.ReadFile("testdata/shrink.toml")
	if err != nil {
		t.Fatal(err)
	}
	big := writeConfig(t, dir, "big.toml", strings.ReplaceAll(string(src), "@SIZE@", "2MiB"))
	// Serving creates the volume; the tenant's namespace need not exist for that.
	srv := startServe(t, big)
	srv.waitLog("serve to start", 1, msgIs("serving"))
	if code := srv.stop(); code != 0 {
		t.Fatalf("serve exited %d", code)
	}
	pool := filepath.Join(dir, "pool")
	if st, err := os.Stat(filepath.Join(pool, "disk")); err != nil || st.Size() != 2<<20 {
		t.Fatalf("volume after first serve: %v %v", st, err)
	}
	before := snapshot(t, pool)

	small := writeConfig(t, dir, "small.toml", strings.ReplaceAll(string(src), "@SIZE@", "1MiB"))
	for _, cmd := range []string{"check", "serve"} {
		code, _, stderr := runBin(t, cmd, "-c", small)
		want := small + ":11: tenant[0].target[0].lun[0].size: "
		if code != 1 || !strings.Contains(stderr, want) || !strings.Contains(stderr, "refusing to shrink") {
			t.Errorf("nstarget %s exited %d, want 1 and %q ... refusing to shrink; stderr:\n%s", cmd, code, want, stderr)
		}
	}
	if after := snapshot(t, pool); after != before {
		t.Errorf("the pool changed:\nbefore:\n%safter:\n%s", before, after)
	}
}

func TestCheckAcceptsAValidConfigWithoutCreatingThePool(t *testing.T) {
	dir := t.TempDir()
	cfg := writeConfig(t, dir, "ok.toml", isolationConfig)
	code, stdout, stderr := runBin(t, "check", "-c", cfg)
	if code != 0 || !strings.Contains(stdout, "ok: 2 tenants, 4 targets, 4 LUNs") {
		t.Fatalf("check exited %d:\n%s%s", code, stdout, stderr)
	}
	if _, err := os.Stat(filepath.Join(dir, "pool")); !os.IsNotExist(err) {
		t.Errorf("check created the pool (stat: %v)", err)
	}
}

func TestUsageErrorsNameTheArgumentAndExitTwo(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{nil, "missing command"},
		{[]string{"frobnicate"}, `unknown command "frobnicate"`},
		{[]string{"serve", "-c", ""}, "missing -c FILE"},
		{[]string{"check", "-c", "x.toml", "-bogus"}, "-bogus"},
		{[]string{"check", "-c", "x.toml", "extra"}, `unexpected argument "extra"`},
		{[]string{"serve", "-c", "x.toml", "-log-level", "loud"}, `"loud"`},
		{[]string{"version", "now"}, `unexpected argument "now"`},
	} {
		code, _, stderr := runBin(t, c.args...)
		if code != 2 || !strings.Contains(stderr, c.want) {
			t.Errorf("nstarget %v exited %d, want 2 and %q in stderr:\n%s", c.args, code, c.want, stderr)
		}
	}
	if code, _, stderr := runBin(t, "check", "-c", filepath.Join(t.TempDir(), "missing.toml")); code != 1 || !strings.Contains(stderr, "missing.toml") {
		t.Errorf("check of a missing file exited %d, want 1 naming the file:\n%s", code, stderr)
	}
}
