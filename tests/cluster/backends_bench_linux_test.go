package cluster_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// BenchmarkFileVsRBD serves one 256 MiB volume from each backend in the same run (one
// `nstarget serve` each, alone in its own namespace, one after the other) and reads it with
// libiscsi's iscsi-perf: 4K random at QD16 and 1M sequential at QD4. The volume is written
// through first, so the RBD reads reach the OSD's data (memstore: RAM, as the file pool's
// page cache). Reported: IOPS and MiB/s per backend.
func BenchmarkFileVsRBD(b *testing.B) {
	for _, backend := range []string{"file", "rbd"} {
		for _, c := range []struct {
			name    string
			blocks  int
			qd      int
			random  bool
			seconds int
		}{{"4k-rand-qd16", 8, 16, true, 5}, {"1m-seq-qd4", 2048, 4, false, 5}} {
			b.Run(backend+"/"+c.name, func(b *testing.B) {
				var iops float64
				for b.Loop() {
					iops = perfOnce(b, backend, c.blocks, c.qd, c.random, c.seconds)
				}
				b.ReportMetric(iops, "IOPS")
				b.ReportMetric(iops*float64(c.blocks*512)/(1<<20), "MiB/s")
			})
		}
	}
}

var iopsAverage = regexp.MustCompile(`iops average ([0-9]+)`)

func perfOnce(b *testing.B, backend string, blocks, qd int, random bool, seconds int) float64 {
	dir := b.TempDir()
	ns := fmt.Sprintf("%s-bk%d", prefix, seq.Add(1))
	run(b, "ip", "netns", "add", ns)
	b.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	run(b, "ip", "-n", ns, "link", "set", "lo", "up")
	vol := fmt.Sprintf("%s-perf", prefix)
	cfg := fmt.Sprintf("[server]\ndata_dir = %q\nbackend = %q\n", filepath.Join(dir, "pool"), backend)
	if backend == "rbd" {
		cfg += fmt.Sprintf("  [server.rbd]\n  conf = %q\n  pool = %q\n", ceph.ConfPath, ceph.Pool)
	}
	cfg += fmt.Sprintf("\n[[tenant]]\nname = \"perf\"\nnetns = %q\nportal = \"127.0.0.1:3260\"\n  [[tenant.target]]\n  iqn = \"iqn.2026-12.org.nstarget:perf\"\n"+
		"    [[tenant.target.lun]]\n    volume = %q\n    size = \"256MiB\"\n", ns, vol)
	file := filepath.Join(dir, "c.toml")
	if err := os.WriteFile(file, []byte(cfg), 0o600); err != nil {
		b.Fatal(err)
	}
	srv := exec.Command(bin, "serve", "-c", file, "-socket", filepath.Join(dir, "s.sock"))
	if err := srv.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { srv.Process.Signal(syscall.SIGTERM); srv.Wait() }()
	url := "iscsi://127.0.0.1/iqn.2026-12.org.nstarget:perf/0"
	waitFor(b, backend+" serving", func() error {
		return exec.Command("ip", "netns", "exec", ns, "iscsi-ls", "iscsi://127.0.0.1").Run()
	})
	run(b, "ip", "netns", "exec", ns, "qemu-io", "-f", "raw", "-c", "write -P 7 0 256M", url)
	run(b, "sync") // the file pool's dirty pages go to disk now, not while it is measured
	args := []string{"netns", "exec", ns, "iscsi-perf", "-m", strconv.Itoa(qd), "-b", strconv.Itoa(blocks), "-t", strconv.Itoa(seconds)}
	if random {
		args = append(args, "-r")
	}
	t0 := time.Now()
	out := run(b, append([]string{"ip"}, append(args, url)...)...)
	m := iopsAverage.FindAllStringSubmatch(out, -1)
	if len(m) == 0 {
		b.Fatalf("iscsi-perf said nothing of its IOPS after %v:\n%s", time.Since(t0), out)
	}
	v, _ := strconv.ParseFloat(m[len(m)-1][1], 64)
	return v
}
