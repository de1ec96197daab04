//go:build rbd

package cephtest

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Two clusters started at the same time in different directories are independent, and Stop
// leaves neither a process nor a file behind.
func TestTwoClustersStartInParallelAndStopLeavesNothing(t *testing.T) {
	base := t.TempDir()
	var wg sync.WaitGroup
	clusters := make([]*Cluster, 2)
	errs := make([]error, 2)
	for i := range clusters {
		wg.Go(func() {
			start := time.Now()
			clusters[i], errs[i] = Start(filepath.Join(base, string(rune('a'+i))))
			t.Logf("cluster %d ready in %v", i, time.Since(start).Round(time.Millisecond))
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			for _, c := range clusters {
				if c != nil {
					c.Stop()
				}
			}
			t.Fatalf("cluster %d: %v", i, err)
		}
	}
	fsids := map[string]bool{}
	for _, c := range clusters {
		out, err := c.Ceph("fsid")
		if err != nil {
			t.Fatal(err)
		}
		fsids[strings.TrimSpace(out)] = true
		if out, err := c.Ceph("osd", "stat"); err != nil || !strings.Contains(out, "1 up") {
			t.Fatalf("osd stat: %q, %v", out, err)
		}
	}
	if len(fsids) != 2 {
		t.Fatalf("the two clusters answer with the same fsid: %v", fsids)
	}
	for _, c := range clusters {
		var pids []int
		for _, p := range c.procs {
			pids = append(pids, p.Cmd.Process.Pid)
		}
		if err := c.Stop(); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(c.Dir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still exists after Stop: %v", c.Dir, err)
		}
		for _, pid := range pids {
			// Stop reaped the daemons, so the PID is gone (unless reused, which is rare enough).
			if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
				t.Errorf("daemon %d still exists after Stop: %v", pid, err)
			}
		}
	}
}

func TestStartFailsSayingWhatToInstallWhenBinariesAreMissing(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	_, err := Start(filepath.Join(t.TempDir(), "c"))
	if err == nil || !strings.Contains(err.Error(), "scripts/deps.sh") {
		t.Fatalf("Start without ceph binaries: %v, want an error pointing at scripts/deps.sh", err)
	}
}
