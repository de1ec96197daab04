package target

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

type testServer struct {
	srv    *Server
	addr   string
	iqn    string
	dev    *ramDevice
	tenant *Tenant
}

func startRAMServer(t *testing.T, opts Options) *testServer {
	t.Helper()
	return startRAMServerLimited(t, opts, Limits{})
}

// startRAMServerLimited serves tenant t1 with its own limits.
func startRAMServerLimited(t *testing.T, opts Options, lim Limits) *testServer {
	t.Helper()
	return startRAMServerWith(t, opts, lim, nil)
}

// startRAMServerWith lets setup change the target's configuration before anything is served.
func startRAMServerWith(t *testing.T, opts Options, lim Limits, setup func(cfg *TargetConfig, tn *Tenant)) *testServer {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	s := NewServer(opts)
	dev := newRAMDevice(64 << 20)
	iqn := "iqn.2026-01.test.nstarget:ram"
	cfg := TargetConfig{IQN: iqn, Alias: "ram"}
	tenant := s.NewTenant("t1", lim)
	if setup != nil {
		setup(&cfg, tenant)
	}
	tg := newTarget(cfg, dev)
	tenant.Targets = []*Target{tg}
	// Another tenant's target: never visible from t1.
	s.NewTenant("t2", Limits{}).Targets = []*Target{newTarget(TargetConfig{IQN: "iqn.2026-01.test.nstarget:other-tenant"}, newRAMDevice(1<<20))}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go s.ServeConn(ctx, c, tenant)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		sctx, c2 := context.WithTimeout(context.Background(), 5*time.Second)
		defer c2()
		s.Shutdown(sctx)
		cancel()
	})
	return &testServer{srv: s, addr: ln.Addr().String(), iqn: iqn, dev: dev, tenant: tenant}
}

func needTool(t *testing.T, name, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s not found: install %s (scripts/deps.sh)", name, pkg)
	}
	return p
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func TestLibiscsiToolsDiscoverAndInquireOverLoopback(t *testing.T) {
	needTool(t, "iscsi-ls", "libiscsi-bin")
	ts := startRAMServer(t, Options{})
	out := run(t, "iscsi-ls", "-s", "iscsi://"+ts.addr)
	if !strings.Contains(out, ts.iqn) || strings.Contains(out, "other-tenant") {
		t.Fatalf("iscsi-ls output should list only the tenant's target:\n%s", out)
	}
	if !strings.Contains(out, ts.addr) {
		t.Fatalf("iscsi-ls should report portal %s:\n%s", ts.addr, out)
	}
	url := fmt.Sprintf("iscsi://%s/%s/0", ts.addr, ts.iqn)
	out = run(t, "iscsi-inq", url)
	if !strings.Contains(out, "RAMDISK") {
		t.Fatalf("iscsi-inq: %s", out)
	}
	t.Logf("%s", out)
	out = run(t, "iscsi-readcapacity16", url)
	if !strings.Contains(out, "131072") && !strings.Contains(out, "131071") {
		t.Fatalf("iscsi-readcapacity16: %s", out)
	}
}

func TestQemuIOWritesAndReadsBackPatternOverLoopback(t *testing.T) {
	needTool(t, "qemu-io", "qemu-utils qemu-block-extra")
	ts := startRAMServer(t, Options{})
	url := fmt.Sprintf("iscsi://%s/%s/0", ts.addr, ts.iqn)
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0xab 0 1M", "-c", "write -P 0x5c 4M 3M", url)
	out := run(t, "qemu-io", "-f", "raw", "-c", "read -P 0xab 0 1M", "-c", "read -P 0x5c 4M 3M", "-c", "read -P 0 1M 1M", url)
	t.Logf("%s", out)
	if strings.Contains(out, "Pattern verification failed") || strings.Count(out, "read ") != 3 {
		t.Fatalf("pattern mismatch:\n%s", out)
	}
}
