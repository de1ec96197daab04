package conf

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

// limitsDoc is a server with limits and three tenants: one without limits, one overriding a
// single key, one overriding everything (an inline table).
const limitsDoc = `[server]
data_dir        = "/tmp/pool"
max_buffer      = "1000MB"
max_connections = 5000
nop_interval    = "500ms"
nop_timeout     = "2s"
  [server.limits]
  connections = 100
  commands    = 50
[[tenant]]
name = "plain"
[[tenant]]
name = "one-key"
  [tenant.limits]
  connections = 10
[[tenant]]
name = "all-keys"
limits = { connections = 3, sessions = 2, commands = 7, buffer = 1000 }
`

func TestLimitsResolveTenantThenServerThenDefaultKeyByKey(t *testing.T) {
	cfg, err := Parse("l.toml", []byte(limitsDoc))
	if err != nil {
		t.Fatal(err)
	}
	s := cfg.Server
	if s.MaxBuffer != 1e9 || s.MaxConnections != 5000 || s.NopInterval != 500*time.Millisecond || s.NopTimeout != 2*time.Second {
		t.Errorf("server = %+v", s)
	}
	def := DefaultLimits()
	want := map[string]Limits{
		"plain":    {Connections: 100, Sessions: def.Sessions, Commands: 50, Buffer: def.Buffer, Weight: 1},
		"one-key":  {Connections: 10, Sessions: def.Sessions, Commands: 50, Buffer: def.Buffer, Weight: 1},
		"all-keys": {Connections: 3, Sessions: 2, Commands: 7, Buffer: 1000, Weight: 1},
	}
	if s.Limits != want["plain"] {
		t.Errorf("server.limits resolved to %+v, want %+v", s.Limits, want["plain"])
	}
	for _, tn := range cfg.Tenants {
		if tn.Limits != want[tn.Name] {
			t.Errorf("tenant %s limits = %+v, want %+v", tn.Name, tn.Limits, want[tn.Name])
		}
	}
}

func TestLimitsAndRuntimeKeysDefaultWhenOmitted(t *testing.T) {
	cfg, err := Parse("d.toml", []byte("[server]\n[[tenant]]\nname = \"a\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	s := cfg.Server
	if s.MaxBuffer != 2<<30 || s.MaxConnections != 0 || s.NopInterval != 5*time.Second || s.NopTimeout != 30*time.Second {
		t.Errorf("server defaults = %+v", s)
	}
	want := Limits{Connections: 1024, Sessions: 1024, Commands: 4096, Buffer: 512 << 20, Weight: 1}
	if !s.FairShare {
		t.Errorf("fair_share defaults to false, want true")
	}
	if s.Limits != want || cfg.Tenants[0].Limits != want {
		t.Errorf("limits: server %+v tenant %+v, want %+v", s.Limits, cfg.Tenants[0].Limits, want)
	}
	// No [server] at all is the same.
	cfg, err = Parse("e.toml", []byte("[[tenant]]\nname = \"a\"\n"))
	if err != nil || cfg.Server.NopTimeout != DefaultNopTimeout || cfg.Tenants[0].Limits != want {
		t.Errorf("without [server]: %+v, %v", cfg, err)
	}
}

func TestMemoryAmountsNeedNotBeWholeBlocks(t *testing.T) {
	for in, want := range map[string]int64{`"1000"`: 1000, `1000`: 1000, `"3GB"`: 3e9, `"1536MiB"`: 1536 << 20, `"1 K"`: 1024} {
		cfg, err := Parse("m.toml", []byte("[server]\nmax_buffer = "+in+"\n"))
		if err != nil || cfg.Server.MaxBuffer != want {
			t.Errorf("max_buffer = %s: got %+v, %v; want %d", in, cfg, err, want)
		}
	}
}

func TestEveryLimitsErrorNamesFileLineAndKey(t *testing.T) {
	cases := []struct {
		name  string
		edit  map[int]string // 1-based line of limitsDoc → replacement
		line  int
		key   string
		inMsg string
	}{
		{"max_buffer zero", map[int]string{3: `max_buffer = "0"`}, 3, "server.max_buffer", "positive"},
		{"max_buffer fraction", map[int]string{3: `max_buffer = "1.5G"`}, 3, "server.max_buffer", "fractions"},
		{"max_buffer unit", map[int]string{3: `max_buffer = "2 lots"`}, 3, "server.max_buffer", "unknown unit"},
		{"max_buffer float", map[int]string{3: `max_buffer = 2.5`}, 3, "server.max_buffer", "a float"},
		{"max_buffer negative", map[int]string{3: `max_buffer = -1`}, 3, "server.max_buffer", "positive"},
		{"max_connections negative", map[int]string{4: `max_connections = -1`}, 4, "server.max_connections", "outside 0.."},
		{"max_connections string", map[int]string{4: `max_connections = "many"`}, 4, "server.max_connections", "must be an integer"},
		{"nop_interval without unit", map[int]string{5: `nop_interval = "5"`}, 5, "server.nop_interval", "not a duration"},
		{"nop_interval integer", map[int]string{5: `nop_interval = 5`}, 5, "server.nop_interval", "duration string"},
		{"nop_interval zero", map[int]string{5: `nop_interval = "0s"`}, 5, "server.nop_interval", "outside 100ms..1h0m0s"},
		{"nop_timeout negative", map[int]string{6: `nop_timeout = "-1s"`}, 6, "server.nop_timeout", "outside"},
		{"nop_timeout too long", map[int]string{6: `nop_timeout = "2h"`}, 6, "server.nop_timeout", "outside"},
		{"server connections zero", map[int]string{8: `  connections = 0`}, 8, "server.limits.connections", "outside 1.."},
		{"server commands float", map[int]string{9: `  commands = 1.5`}, 9, "server.limits.commands", "must be an integer"},
		{"server commands huge", map[int]string{9: `  commands = 9999999999`}, 9, "server.limits.commands", "outside"},
		{"server limits unknown key", map[int]string{9: `  comands = 5`}, 9, "server.limits.comands", "unknown key"},
		{"server limits not a table", map[int]string{7: `limits = 5`, 8: ``, 9: ``}, 7, "server.limits", "must be a table"},
		{"server buffer over max_buffer", map[int]string{9: `  buffer = "2GB"`}, 9, "server.limits.buffer", "more than server.max_buffer"},
		{"tenant connections negative", map[int]string{15: `  connections = -3`}, 15, "tenant[1].limits.connections", "outside 1.."},
		{"tenant connections over max_connections", map[int]string{15: `  connections = 6000`}, 15, "tenant[1].limits.connections", "more than server.max_connections"},
		{"tenant sessions string", map[int]string{15: `  sessions = "2"`}, 15, "tenant[1].limits.sessions", "must be an integer"},
		{"tenant buffer not a size", map[int]string{15: `  buffer = "lots"`}, 15, "tenant[1].limits.buffer", "expected a number"},
		{"tenant buffer bool", map[int]string{15: `  buffer = true`}, 15, "tenant[1].limits.buffer", "a boolean"},
		{"tenant buffer over max_buffer", map[int]string{15: `  buffer = "1GiB"`}, 15, "tenant[1].limits.buffer", "more than server.max_buffer"},
		{"fair_share not a boolean", map[int]string{4: `fair_share = 1`}, 4, "server.fair_share", "true or false"},
		{"tenant weight zero", map[int]string{15: `  weight = 0`}, 15, "tenant[1].limits.weight", "outside 1.."},
		{"tenant weight too big", map[int]string{15: `  weight = 5000`}, 15, "tenant[1].limits.weight", "outside 1..1000"},
		{"tenant limits unknown key", map[int]string{15: `  colour = "red"`}, 15, "tenant[1].limits.colour", "unknown key"},
		{"inline tenant limits zero", map[int]string{18: `limits = { connections = 3, sessions = 0 }`}, 18, "tenant[2].limits.sessions", "outside 1.."},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			lines := strings.Split(limitsDoc, "\n")
			for n, s := range c.edit {
				lines[n-1] = s
			}
			_, err := Parse("/etc/nstarget.toml", []byte(strings.Join(lines, "\n")))
			var es Errors
			if !errors.As(err, &es) {
				t.Fatalf("want located findings, got %v", err)
			}
			want := fmt.Sprintf("/etc/nstarget.toml:%d: %s: ", c.line, c.key)
			for _, e := range es {
				if strings.HasPrefix(e.Error(), want) && strings.Contains(e.Msg, c.inMsg) {
					return
				}
			}
			t.Fatalf("want an error starting %q containing %q, got:\n%v", want, c.inMsg, err)
		})
	}
}

func TestControlSocketDefaultsAndMustBeAbsolute(t *testing.T) {
	cfg, err := Parse("c.toml", []byte(`[server]
data_dir = "/tmp/x"
`))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Server.ControlSocket != DefaultControlSocket || cfg.Server.ControlSocketSet {
		t.Fatalf("default control socket %q set=%v", cfg.Server.ControlSocket, cfg.Server.ControlSocketSet)
	}
	cfg, err = Parse("c.toml", []byte(`[server]
data_dir = "/tmp/x"
control_socket = "/run/x/ctl.sock"
`))
	if err != nil || cfg.Server.ControlSocket != "/run/x/ctl.sock" || !cfg.Server.ControlSocketSet {
		t.Fatalf("explicit control socket: %v %+v", err, cfg)
	}
	_, err = Parse("c.toml", []byte(`[server]
control_socket = "ctl.sock"
`))
	if err == nil || !strings.Contains(err.Error(), "c.toml:2: server.control_socket:") {
		t.Fatalf("relative control socket: %v", err)
	}
}

func TestMetricsAddressIsOptionalAndMustBeIPAndPort(t *testing.T) {
	cfg, err := Parse("c.toml", []byte("[server]\nmetrics = \"127.0.0.1:9470\"\n"))
	if err != nil || cfg.Server.Metrics != "127.0.0.1:9470" {
		t.Fatalf("%v %+v", err, cfg)
	}
	for _, bad := range []string{"localhost:9470", "127.0.0.1", "127.0.0.1:0"} {
		_, err := Parse("c.toml", []byte("[server]\nmetrics = \""+bad+"\"\n"))
		if err == nil || !strings.Contains(err.Error(), "c.toml:2: server.metrics:") {
			t.Fatalf("%q: %v", bad, err)
		}
	}
}
