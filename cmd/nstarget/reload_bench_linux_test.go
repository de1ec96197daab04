package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"nstarget/conf"
	"nstarget/fleet"
	"nstarget/netnsmux"
)

// BenchmarkReloadOneTenantChangeOf1024 is the time a reload takes to apply a one-tenant
// change (one tenant added, then removed again) with 1024 tenants configured and listening,
// from reading the file to the change being in force. Goal: under 100 ms.
func BenchmarkReloadOneTenantChangeOf1024(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Fatal("needs root: the tenants live in network namespaces")
	}
	const tenants = 1024
	dir := b.TempDir()
	nsDir := filepath.Join(dir, "netns")
	names := make([]string, tenants+1)
	for i := range names {
		names[i] = fmt.Sprintf("bnrl%d-%04d", os.Getpid(), i)
		if _, err := fleet.Add(nsDir, names[i]); err != nil {
			b.Fatal(err)
		}
	}
	b.Cleanup(func() {
		for _, n := range names {
			fleet.Delete(nsDir, n)
		}
	})
	file := filepath.Join(dir, "c.toml")
	write := func(n int) {
		var s strings.Builder
		fmt.Fprintf(&s, "[server]\nnetns_dir = %q\ndata_dir = %q\npool_soft_threshold = 0\n", nsDir, filepath.Join(dir, "pool"))
		for _, name := range names[:n] {
			fmt.Fprintf(&s, "\n[[tenant]]\nname = %q\nportal = \"127.0.0.1:3260\"\n  [[tenant.target]]\n  iqn = \"iqn.2026-12.org.nstarget:bench\"\n"+
				"    [[tenant.target.lun]]\n    volume = %q\n    size = \"1MiB\"\n", name, name)
		}
		if err := os.WriteFile(file, []byte(s.String()), 0o600); err != nil {
			b.Fatal(err)
		}
	}
	write(tenants)
	cfg, err := conf.Load(file)
	if err != nil {
		b.Fatal(err)
	}
	var listening atomic.Int64
	up := make(chan struct{})
	svcs := make(chan *service, 1)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- serve(ctx, cfg, serveOptions{
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
			OnEvent: func(ev netnsmux.Event) {
				if ev.Kind == netnsmux.ListenerUp && listening.Add(1) == tenants {
					close(up)
				}
			},
			OnService: func(s *service) { svcs <- s },
		})
	}()
	b.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			b.Error(err)
		}
	})
	svc := <-svcs
	select {
	case <-up:
	case err := <-done:
		b.Fatalf("serve: %v", err)
	}
	n := tenants
	var worst time.Duration
	for b.Loop() {
		n = 2*tenants + 1 - n // 1024 -> 1025 -> 1024 ...
		write(n)
		t0 := time.Now()
		changes, err := svc.reload()
		worst = max(worst, time.Since(t0))
		if err != nil || len(changes) != 1 {
			b.Fatalf("reload to %d tenants: %v %q", n, err, changes)
		}
	}
	b.ReportMetric(float64(worst.Microseconds())/1000, "worst-ms")
}
