package conf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"nstarget/backend"
)

const good = `# the example of the issue
[server]
netns_dir = "/run/netns"          # where tenant namespaces appear (ip netns add NAME)
data_dir  = "/var/lib/nstarget"   # the shared volume pool

[[tenant]]
name   = "acme"                   # unique
netns  = "acme"                   # file name under netns_dir
portal = "0.0.0.0:3260"           # listen address inside the namespace; default 0.0.0.0:3260

  [[tenant.target]]
  iqn        = "iqn.2026-11.com.example:acme.db"
  initiators = ["iqn.1993-08.org.debian:01:host1"]  # optional allow-list; empty = any initiator of this tenant

    [[tenant.target.lun]]
    id     = 0                    # optional, default: position from 0
    volume = "acme-db"            # volume name, unique in the pool
    size   = "1GiB"               # created sparse if missing; never shrunk
`

func TestIssueExampleParsesExactly(t *testing.T) {
	cfg, err := Parse("x.toml", []byte(good))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Server.NetnsDir != "/run/netns" || cfg.Server.DataDir != "/var/lib/nstarget" {
		t.Fatalf("server = %+v", cfg.Server)
	}
	if len(cfg.Tenants) != 1 {
		t.Fatalf("tenants = %d", len(cfg.Tenants))
	}
	tn := cfg.Tenants[0]
	if tn.Name != "acme" || tn.Netns != "acme" || tn.Portal != "0.0.0.0:3260" || tn.Line != 6 {
		t.Fatalf("tenant = %+v", tn)
	}
	tg := tn.Targets[0]
	if tg.IQN != "iqn.2026-11.com.example:acme.db" || len(tg.Initiators) != 1 || tg.Initiators[0] != "iqn.1993-08.org.debian:01:host1" || tg.Line != 11 {
		t.Fatalf("target = %+v", tg)
	}
	l := tg.LUNs[0]
	if l.ID != 0 || l.Volume != "acme-db" || l.Size != 1<<30 || l.Line != 15 {
		t.Fatalf("lun = %+v", l)
	}
}

func TestDefaultsApplyWhenKeysAreOmitted(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "c.toml")
	doc := `
[server]
data_dir = "pool"
[[tenant]]
name = "a"
  [[tenant.target]]
  iqn = "iqn.2026-11.io.example:a"
    [[tenant.target.lun]]
    volume = "v0"
    size = "512MiB"
    [[tenant.target.lun]]
    volume = "v1"
    size = 4096
`
	if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Server.NetnsDir != DefaultNetnsDir {
		t.Errorf("netns_dir default = %q", cfg.Server.NetnsDir)
	}
	if cfg.Server.DataDir != filepath.Join(dir, "pool") {
		t.Errorf("relative data_dir = %q, want it next to the file", cfg.Server.DataDir)
	}
	tn := cfg.Tenants[0]
	if tn.Netns != "a" || tn.Portal != DefaultPortal {
		t.Errorf("tenant defaults: netns %q portal %q", tn.Netns, tn.Portal)
	}
	luns := tn.Targets[0].LUNs
	if luns[0].ID != 0 || luns[1].ID != 1 || luns[0].Size != 512<<20 || luns[1].Size != 4096 || !luns[0].WriteCache || luns[0].ReadOnly {
		t.Errorf("luns = %+v %+v", luns[0], luns[1])
	}
	if len(tn.Targets[0].Initiators) != 0 {
		t.Errorf("initiators default = %v", tn.Targets[0].Initiators)
	}
}

func TestEmptyFileGivesServerDefaults(t *testing.T) {
	cfg, err := Parse("e.toml", nil)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Server.DataDir != DefaultDataDir || len(cfg.Tenants) != 0 {
		t.Fatalf("%+v", cfg)
	}
}

// base builds a two-tenant config; edits replace whole lines by their 1-based number.
func base() []string {
	return strings.Split(`[server]
data_dir = "/tmp/pool"
[[tenant]]
name = "a"
netns = "ns-a"
portal = "10.0.0.1:3260"
  [[tenant.target]]
  iqn = "iqn.2026-11.io.example:t"
  initiators = ["iqn.2026-11.io.example:host"]
    [[tenant.target.lun]]
    volume = "va"
    size = "1GiB"
[[tenant]]
name = "b"
netns = "ns-b"
  [[tenant.target]]
  iqn = "iqn.2026-11.io.example:t"
    [[tenant.target.lun]]
    id = 3
    volume = "vb"
    size = "10G"`, "\n")
}

func TestEveryValidationErrorNamesFileLineAndKey(t *testing.T) {
	cases := []struct {
		name  string
		edit  map[int]string
		line  int
		key   string
		inMsg string
	}{
		{"duplicate tenant", map[int]string{14: `name = "a"`}, 14, "tenant[1].name", "duplicate tenant name"},
		{"duplicate netns", map[int]string{15: `netns = "ns-a"`}, 15, "tenant[1].netns", "duplicate netns"},
		{"netns defaulting to a taken name", map[int]string{5: `netns = "b"`, 15: ``}, 14, "tenant[1].name", "duplicate netns"},
		{"duplicate volume across tenants", map[int]string{20: `    volume = "va"`}, 20, "tenant[1].target[0].lun[0].volume", "duplicate volume"},
		{"duplicate iqn in one tenant", map[int]string{18: `  [[tenant.target]]
  iqn = "iqn.2026-11.io.example:t"
    [[tenant.target.lun]]`}, 19, "tenant[1].target[1].iqn", "duplicate target iqn"},
		{"duplicate lun id", map[int]string{12: `    size = "1GiB"
    [[tenant.target.lun]]
    id = 0
    volume = "va2"
    size = "1GiB"`}, 14, "tenant[0].target[0].lun[1].id", "duplicate LUN id"},
		{"iqn without date", map[int]string{8: `  iqn = "iqn.example.com:t"`}, 8, "tenant[0].target[0].iqn", "date yyyy-mm"},
		{"iqn bad month", map[int]string{8: `  iqn = "iqn.2026-13.io.example:t"`}, 8, "tenant[0].target[0].iqn", "month"},
		{"iqn upper case", map[int]string{17: `  iqn = "iqn.2026-11.io.Example:t"`}, 17, "tenant[1].target[0].iqn", "lower case"},
		{"iqn bad char", map[int]string{8: `  iqn = "iqn.2026-11.io.example:t_1"`}, 8, "tenant[0].target[0].iqn", "not allowed"},
		{"iqn no domain", map[int]string{8: `  iqn = "iqn.2026-11.:t"`}, 8, "tenant[0].target[0].iqn", "domain"},
		{"iqn too long", map[int]string{8: `  iqn = "iqn.2026-11.io.example:` + strings.Repeat("x", 210) + `"`}, 8, "tenant[0].target[0].iqn", "limit is 223"},
		{"eui wrong length", map[int]string{8: `  iqn = "eui.02004567A425678"`}, 8, "tenant[0].target[0].iqn", "16 hex"},
		{"naa not hex", map[int]string{8: `  iqn = "naa.52004567BA64678Z"`}, 8, "tenant[0].target[0].iqn", "hex"},
		{"unknown scheme", map[int]string{8: `  iqn = "target0"`}, 8, "tenant[0].target[0].iqn", "iqn., eui. or naa."},
		{"bad initiator", map[int]string{9: `  initiators = ["host1"]`}, 9, "tenant[0].target[0].initiators", "initiator"},
		{"size not multiple of 512", map[int]string{12: `    size = "1000"`}, 12, "tenant[0].target[0].lun[0].size", "multiple of 512"},
		{"size zero", map[int]string{21: `    size = "0G"`}, 21, "tenant[1].target[0].lun[0].size", "positive"},
		{"size negative integer", map[int]string{21: `    size = -512`}, 21, "tenant[1].target[0].lun[0].size", "positive"},
		{"size unknown unit", map[int]string{12: `    size = "1 parsec"`}, 12, "tenant[0].target[0].lun[0].size", "unknown unit"},
		{"size with a fraction", map[int]string{12: `    size = "1.5G"`}, 12, "tenant[0].target[0].lun[0].size", "fractions"},
		{"size not a number", map[int]string{12: `    size = "big"`}, 12, "tenant[0].target[0].lun[0].size", "expected a number"},
		{"size overflow", map[int]string{12: `    size = "99999999999PiB"`}, 12, "tenant[0].target[0].lun[0].size", "too large"},
		{"size wrong type", map[int]string{12: `    size = 1.5`}, 12, "tenant[0].target[0].lun[0].size", "a float"},
		{"portal without port", map[int]string{6: `portal = "10.0.0.1"`}, 6, "tenant[0].portal", "not ip:port"},
		{"portal host name", map[int]string{6: `portal = "localhost:3260"`}, 6, "tenant[0].portal", "not ip:port"},
		{"portal port zero", map[int]string{6: `portal = "10.0.0.1:0"`}, 6, "tenant[0].portal", "1..65535"},
		{"unknown key in lun", map[int]string{11: `    volume = "va"
    sise = "1G"`}, 12, "tenant[0].target[0].lun[0].sise", "unknown key"},
		{"unknown key in second tenant", map[int]string{15: `netns = "ns-b"
colour = "blue"`}, 16, "tenant[1].colour", "unknown key"},
		{"unknown section", map[int]string{1: `[servr]`}, 1, "servr", "unknown key"},
		{"unknown server key", map[int]string{2: `datadir = "/x"`}, 2, "server.datadir", "unknown key"},
		{"missing name", map[int]string{4: ``}, 3, "tenant[0]", `missing required key "name"`},
		{"missing iqn", map[int]string{17: ``}, 16, "tenant[1].target[0]", `missing required key "iqn"`},
		{"missing size", map[int]string{21: ``}, 18, "tenant[1].target[0].lun[0]", `missing required key "size"`},
		{"lun id out of range", map[int]string{19: `    id = 16384`}, 19, "tenant[1].target[0].lun[0].id", "outside"},
		{"name with slash", map[int]string{5: `netns = "a/etc"`}, 5, "tenant[0].netns", "not allowed"},
		{"volume with slash", map[int]string{11: `    volume = "a/b"`}, 11, "tenant[0].target[0].lun[0].volume", "only [A-Za-z0-9._-] allowed"},
		{"write_cache wrong type", map[int]string{12: `    size = "1GiB"
    write_cache = "yes"`}, 13, "tenant[0].target[0].lun[0].write_cache", "true or false"},
		{"name wrong type", map[int]string{4: `name = 7`}, 4, "tenant[0].name", "must be a string"},
		{"tenant as plain table", map[int]string{13: `[tenantx]`}, 13, "tenantx", "unknown key"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			lines := base()
			for n, s := range c.edit {
				lines[n-1] = s
			}
			_, err := Parse("/etc/nstarget.toml", []byte(strings.Join(lines, "\n")))
			if err == nil {
				t.Fatal("accepted")
			}
			var es Errors
			if !errors.As(err, &es) {
				t.Fatalf("error %T %v is not Errors", err, err)
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

func TestSyntaxErrorNamesLine(t *testing.T) {
	_, err := Parse("s.toml", []byte("[server]\ndata_dir = \"/x\"\n[[tenant]]\nname = \"a\n"))
	if err == nil || !strings.HasPrefix(err.Error(), "s.toml:4: ") {
		t.Fatalf("got %v", err)
	}
}

func TestPositionsSurviveMultilineValues(t *testing.T) {
	doc := `[server]
data_dir = """
/tmp/x
[[tenant]]
"""
[[tenant]]
name = "a" # [[tenant]] in a comment
  [[tenant.target]]
  iqn = "iqn.2026-11.io.example:t"
  initiators = [
    "iqn.2026-11.io.example:h1", # a comment ]
    "iqn.2026-11.io.example:h2",
  ]
  alias = 'it''s'
    [[tenant.target.lun]]
    volume = "v"
    size = "1M"
    bogus = { a = [1, 2], b = "]" }
`
	_, err := Parse("m.toml", []byte(doc))
	if err == nil {
		t.Fatal("accepted")
	}
	// 'it''s' is not TOML: the error must be a syntax error on line 14.
	if !strings.HasPrefix(err.Error(), "m.toml:14: ") {
		t.Fatalf("got %v", err)
	}
	doc = strings.Replace(doc, `'it''s'`, `'its'`, 1)
	_, err = Parse("m.toml", []byte(doc))
	if err == nil || !strings.HasPrefix(err.Error(), "m.toml:18: tenant[0].target[0].lun[0].bogus: unknown key") {
		t.Fatalf("got %v", err)
	}
}

func TestInlineArrayOfTablesIsAccepted(t *testing.T) {
	doc := `[[tenant]]
name = "a"
target = [{ iqn = "iqn.2026-11.io.example:t", lun = [{ volume = "v", size = "1M", colour = 1 }] }]
`
	_, err := Parse("i.toml", []byte(doc))
	if err == nil || !strings.HasPrefix(err.Error(), "i.toml:3: tenant[0].target[0].lun[0].colour: unknown key") {
		t.Fatalf("got %v", err)
	}
}

func TestAllErrorsAreReportedInLineOrder(t *testing.T) {
	lines := base()
	lines[5] = `portal = "nope"`
	lines[11] = `    size = "7"`
	lines[13] = `name = "a"`
	_, err := Parse("f.toml", []byte(strings.Join(lines, "\n")))
	var es Errors
	if !errors.As(err, &es) || len(es) != 3 {
		t.Fatalf("want 3 errors, got %v", err)
	}
	if es[0].Line != 6 || es[1].Line != 12 || es[2].Line != 14 {
		t.Fatalf("order: %v", err)
	}
}

func TestCheckVolumesReportsShrinkAtSizeKey(t *testing.T) {
	cfg, err := Parse("p.toml", []byte(strings.Join(base(), "\n")))
	if err != nil {
		t.Fatal(err)
	}
	shrink := errors.New("volume is larger than the configured size")
	err = cfg.CheckVolumes(func(name string, size int64) error {
		if name == "vb" {
			return shrink
		}
		return nil
	})
	if err == nil || !errors.Is(err, shrink) || !strings.HasPrefix(err.Error(), "p.toml:21: tenant[1].target[0].lun[0].size: volume is larger") {
		t.Fatalf("got %v", err)
	}
}

func TestSizeUnits(t *testing.T) {
	for in, want := range map[string]int64{
		"512": 512, "1GiB": 1 << 30, "512MiB": 512 << 20, "10G": 10 << 30, "1KiB": 1024,
		"4k": 4096, "1T": 1 << 40, "2GB": 2e9, "1 MiB": 1 << 20, "1024B": 1024,
	} {
		got, err := ParseSize(in)
		if err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
}

func TestExistingVolumeBiggerThanSizeIsRefusedByThePool(t *testing.T) {
	// A plain file stands for the volume: Check only looks at it, and this way the test runs
	// on every OS, not only where the pool can open volumes.
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "vb"), nil, 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(filepath.Join(dir, "vb"), 2<<20); err != nil {
		t.Fatal(err)
	}
	lines := base()
	lines[1] = fmt.Sprintf("data_dir = %q", dir)
	lines[20] = `    size = "1MiB"`
	cfg, err := Parse("s.toml", []byte(strings.Join(lines, "\n")))
	if err != nil {
		t.Fatal(err)
	}
	pool, err := backend.OpenPool(cfg.Server.DataDir)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	err = cfg.CheckVolumes(pool.Check)
	if !errors.Is(err, backend.ErrShrink) || !strings.HasPrefix(err.Error(), "s.toml:21: tenant[1].target[0].lun[0].size: ") {
		t.Fatalf("got %v", err)
	}
	if st, err := os.Stat(filepath.Join(dir, "vb")); err != nil || st.Size() != 2<<20 {
		t.Fatalf("volume changed: %v %v", st, err)
	}
}

func TestPositionsWithCRLFAndDottedAndQuotedKeys(t *testing.T) {
	doc := "server.data_dir = \"/p\"\r\n[[tenant]]\r\n\"name\" = \"a\"\r\n  [[tenant.target]]\r\n  iqn = \"iqn.2026-11.io.example:t\"\r\n  'colour' = 1\r\n"
	_, err := Parse("c.toml", []byte(doc))
	if err == nil || err.Error() != "c.toml:6: tenant[0].target[0].colour: unknown key" {
		t.Fatalf("got %v", err)
	}
}

func TestPoolDirectoryErrorsPointAtDataDir(t *testing.T) {
	cfg, err := Parse("/etc/n.toml", []byte("# pool\n[server]\n\ndata_dir = \"/srv/pool\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	cause := errors.New("mkdir /srv/pool: permission denied")
	got := cfg.DataDirError(cause)
	if !strings.HasPrefix(got.Error(), "/etc/n.toml:4: server.data_dir: ") || !errors.Is(got, cause) {
		t.Fatalf("got %v", got)
	}
}
