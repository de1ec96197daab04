//go:build linux

package e2e

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"strings"
	"testing"
)

func freeLoopbackPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func TestMetricsExposeCountersPerTenantTargetAndLUN(t *testing.T) {
	dir := t.TempDir()
	addr := freeLoopbackPort(t)
	p := newPair(t, "met")
	cfg := writeConfig(t, dir, "c.toml", fmt.Sprintf(`
[server]
data_dir = "@POOL@"
metrics = %q
control_socket = %q

[[tenant]]
name = "met"
netns = "@P@-met"
portal = "10.0.0.1:3260"
  [[tenant.target]]
  iqn = "iqn.2026-11.org.nstarget:met"
    [[tenant.target.lun]]
    volume = "met"
    size = "8MiB"
`, addr, dir+"/ctl.sock"))
	s := startServe(t, cfg)
	s.listening(p.tenant, 1)
	p.mustIni(t, "qemu-io", "-f", "raw", "-c", "write -P 0x11 0 128k", "-c", "read -P 0x11 0 128k",
		"iscsi://10.0.0.1/iqn.2026-11.org.nstarget:met/0")
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	text := string(body)
	value := func(series string) string {
		m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(series) + ` (\S+)$`).FindStringSubmatch(text)
		if m == nil {
			t.Fatalf("no %s in /metrics:\n%s", series, text)
		}
		return m[1]
	}
	lbl := `{lun="0",target="iqn.2026-11.org.nstarget:met",tenant="met"}`
	if v := value("nstarget_write_bytes_total" + lbl); v != "131072" {
		t.Fatalf("write bytes %s, want 131072", v)
	}
	if v := value("nstarget_read_bytes_total" + lbl); v == "0" {
		t.Fatal("no read bytes counted")
	}
	value("nstarget_commands_total" + lbl)
	if v := value(`nstarget_logins_total{result="ok",tenant="met"}`); v == "0" {
		t.Fatal("no login counted")
	}
	value(`nstarget_command_duration_seconds_count{tenant="met"}`)
	value(`nstarget_namespace_events_total{kind="listener_up"}`)
	value("nstarget_netns_setns_total")
	// A tenant busy alone is never limited by the fair shares.
	for _, series := range []string{`nstarget_fair_window{tenant="met"}`, `nstarget_fair_pace_seconds{tenant="met"}`} {
		if v := value(series); v != "0" {
			t.Fatalf("%s = %s for a tenant busy alone, want 0", series, v)
		}
	}
	for _, want := range []string{"go_goroutines", "process_resident_memory_bytes", `nstarget_sessions{tenant="met"}`} {
		if !strings.Contains(text, want) {
			t.Fatalf("/metrics lacks %s", want)
		}
	}
}
