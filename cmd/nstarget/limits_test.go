package main

import (
	"bytes"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"nstarget/conf"
	"nstarget/target"
)

// conf cannot import target, so it repeats the target's defaults; this keeps the two equal.
func TestConfDefaultsAreTheTargetDefaults(t *testing.T) {
	if got, want := targetLimits(conf.DefaultLimits()), target.DefaultTenantLimits(); got != want {
		t.Errorf("conf.DefaultLimits() maps to %+v, target.DefaultTenantLimits() is %+v", got, want)
	}
	if conf.MaxWeight != target.MaxWeight {
		t.Errorf("conf's weight bound drifted from the target's")
	}
	if conf.DefaultMaxBuffer != 2<<30 || conf.DefaultNopInterval != 5*time.Second || conf.DefaultNopTimeout != 30*time.Second {
		t.Errorf("conf server defaults drifted from target.Options' documented defaults (2GiB, 5s, 30s)")
	}
}

func TestConfigMapsOntoTargetOptions(t *testing.T) {
	cfg, err := conf.Parse("m.toml", []byte(`[server]
max_buffer = "1GiB"
max_connections = 300
nop_interval = "250ms"
nop_timeout = "1s"
fair_share = false
  [server.limits]
  commands = 9
[[tenant]]
name = "a"
  [tenant.limits]
  buffer = 4096
  weight = 3
`))
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	o := targetOptions(log, cfg.Server, 20000)
	def := target.DefaultTenantLimits()
	// Field by field: Options may grow fields that are not comparable.
	if o.Logger != log || o.NopInterval != 250*time.Millisecond || o.NopTimeout != time.Second ||
		o.MaxBufferBytes != 1<<30 || o.MaxConnections != 300 || !o.NoFairShare ||
		o.TenantLimits != (target.Limits{Connections: def.Connections, Sessions: def.Sessions, Commands: 9, BufferBytes: def.BufferBytes, Weight: 1}) {
		t.Errorf("options = %+v", o)
	}
	if got := targetLimits(cfg.Tenants[0].Limits); got != (target.Limits{Connections: def.Connections, Sessions: def.Sessions, Commands: 9, BufferBytes: 4096, Weight: 3}) {
		t.Errorf("tenant limits = %+v", got)
	}
}

// Every commented key of the example is valid once uncommented.
func TestExampleIsValidWithEveryOptionalKeyUncommented(t *testing.T) {
	commented := regexp.MustCompile(`(?m)^(\s*)# ?(\[[a-z_.]+\]|[a-z_]+\s*=)`)
	doc := commented.ReplaceAllString(exampleConfig, "$1$2")
	if doc == exampleConfig {
		t.Fatal("no commented keys found in example.toml")
	}
	// The example's secret files, as an operator would create them (root, mode 0600).
	dir := t.TempDir()
	for _, f := range regexp.MustCompile(`/etc/nstarget/([a-z-]+\.secret)`).FindAllStringSubmatch(doc, -1) {
		if err := os.WriteFile(filepath.Join(dir, f[1]), []byte(f[1]+" is long enough\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	doc = strings.ReplaceAll(doc, "/etc/nstarget/", dir+"/")
	cfg, err := conf.Parse("example.toml (uncommented)", []byte(doc))
	if err != nil {
		t.Fatalf("%v\n%s", err, doc)
	}
	if c := cfg.Tenants[0].Targets[0].CHAP; c == nil || !c.Mutual() || cfg.Tenants[0].DiscoveryCHAP == nil {
		t.Errorf("chap tables of the example not read: %+v", c)
	}
	if cfg.Tenants[0].Limits.Connections != 64 || cfg.Tenants[1].Limits != cfg.Server.Limits {
		t.Errorf("limits: acme %+v globex %+v server %+v", cfg.Tenants[0].Limits, cfg.Tenants[1].Limits, cfg.Server.Limits)
	}
}

func TestUsageEndpointReportsTenantsAndProcess(t *testing.T) {
	u := &usageHandler{}
	rec := httptest.NewRecorder()
	u.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/debug/usage", nil))
	if rec.Code != http.StatusServiceUnavailable {
		t.Errorf("before the server exists: %d, want 503", rec.Code)
	}
	srv := target.NewServer(target.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	srv.NewTenant("acme", target.Limits{})
	u.srv.Store(srv)
	rec = httptest.NewRecorder()
	u.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/debug/usage", nil))
	if rec.Code != http.StatusOK || rec.Header().Get("Content-Type") != "application/json" {
		t.Fatalf("status %d, content type %q: %s", rec.Code, rec.Header().Get("Content-Type"), rec.Body)
	}
	var doc map[string]map[string]any
	if err := json.Unmarshal(rec.Body.Bytes(), &doc); err != nil {
		t.Fatalf("%v: %s", err, rec.Body)
	}
	for _, k := range []string{"connections", "sessions", "commands", "buffer_bytes"} {
		if _, ok := doc["total"][k]; !ok {
			t.Errorf("total lacks %q: %s", k, rec.Body)
		}
	}
	if _, ok := doc["tenants"]["acme"]; !ok {
		t.Errorf("tenants lacks acme: %s", rec.Body)
	}
	p := doc["process"]
	if p["fds"].(float64) < 3 || p["rss_bytes"].(float64) < 1<<20 || p["threads"].(float64) < 1 {
		t.Errorf("implausible process usage: %s", rec.Body)
	}
	rec = httptest.NewRecorder()
	u.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/debug/usage", nil))
	if rec.Code != http.StatusMethodNotAllowed {
		t.Errorf("POST: %d, want 405", rec.Code)
	}
}

func TestDashHPrintsUsageAndExitsZero(t *testing.T) {
	for _, cmd := range []string{"serve", "check", "demo"} {
		var out, errOut bytes.Buffer
		if code := run([]string{cmd, "-h"}, &out, &errOut); code != exitOK || !strings.Contains(out.String(), "/debug/usage") {
			t.Errorf("%s -h: exit %d, stdout %q, stderr %q", cmd, code, out.String(), errOut.String())
		}
	}
}
