package conf

import (
	"strconv"
	"testing"
)

// checkLinesAgree: the Line fields of a valid configuration, taken from the cheap scan
// (scanLines), are what the full scan (scanPositions) gives for the same paths.
func checkLinesAgree(t *testing.T, doc string, cfg *Config) {
	t.Helper()
	full := scanPositions(doc)
	want := func(what string, got int, path string) {
		t.Helper()
		if w := full.line(path); got != w {
			t.Errorf("%s: line %d from the cheap scan, %d from the full one (%s)", path, got, w, what)
		}
	}
	want("data_dir", cfg.Server.DataDirLine, "server.data_dir")
	want("backend", cfg.Server.BackendLine, "server.backend")
	if cfg.Cluster != nil {
		want("cluster", cfg.Cluster.Line, "cluster")
	}
	for i, tn := range cfg.Tenants {
		tp := "tenant[" + strconv.Itoa(i) + "]"
		want("tenant", tn.Line, tp)
		for j, tg := range tn.Targets {
			gp := tp + ".target[" + strconv.Itoa(j) + "]"
			want("target", tg.Line, gp)
			for k, l := range tg.LUNs {
				lp := gp + ".lun[" + strconv.Itoa(k) + "]"
				want("lun", l.Line, lp)
				want("size", cfg.line(l.sizeKey), lp+".size")
			}
		}
	}
}

func TestCheapLineScanAgreesWithTheFullOne(t *testing.T) {
	docs := []string{good, `
[server]
data_dir = "/p"
backend = "file"

[[tenant]]
name = "a"
target = [ { iqn = "iqn.2026-11.io.example:a", lun = [ { volume = "a0", size = "1MiB" },
  { volume = "a1", size = 4096 } ] } ]

[[tenant]]
name = "b"
  [tenant.limits]
  commands = 8
  [[tenant.target]]
  iqn = "iqn.2026-11.io.example:b"
  lun = [{ volume = "b0", size = "1MiB" }]
  [[tenant.target]]
  iqn = "iqn.2026-11.io.example:c"
    [[tenant.target.lun]]
    volume = "c0"
    # a comment [[tenant]]
    size = """1MiB"""
`, `
tenant = [ { name = "x", target = [ { iqn = "iqn.2026-11.io.example:x", lun = [ { volume = "x0", size = "1MiB" } ] } ] } ]
`}
	for i, doc := range docs {
		cfg, err := Parse("d"+strconv.Itoa(i)+".toml", []byte(doc))
		if err != nil {
			t.Fatalf("doc %d: %v", i, err)
		}
		checkLinesAgree(t, doc, cfg)
	}
}

// TestPeekPortalsGuessesWhatParseSays: for files it reads, PeekPortals gives exactly the
// netns_dir and (netns, portal) pairs Parse gives, defaults included; for a file with
// anything it does not read with certainty it says so rather than guess.
func TestPeekPortalsGuessesWhatParseSays(t *testing.T) {
	fleet := "[server]\nnetns_dir = \"/run/x-netns\" # a comment\ndata_dir = \"/tmp/x\"\n"
	for i := range 50 {
		fleet += "\n[[tenant]]\nname = \"t-" + strconv.Itoa(i) + "\"\nportal = '127.0.0.1:3260'\n  [[tenant.target]]\n" +
			"  iqn = \"iqn.2026-12.org.nstarget:fleet\"\n    [[tenant.target.lun]]\n    volume = \"t-" + strconv.Itoa(i) + "\"\n    size = \"1MiB\"\n"
	}
	docs := map[string]string{"good": good, "fleet": fleet, "relative dir and defaults": `
[server]
netns_dir = "ns"
[server.limits]
connections = 8

[[tenant]]
name = "a"
netns = "other"
  [tenant.limits]
  connections = 2
  [[tenant.target]]
  iqn = "iqn.2026-12.org.nstarget:a"
  alias = """multi
[[tenant]]
name = "not a tenant"
line"""
    [[tenant.target.lun]]
    volume = "a"
    size = "1MiB"

[[tenant]]
name = "b"
portal = "[::]:3260"
  [[tenant.target]]
  iqn = "iqn.2026-12.org.nstarget:b"
    [[tenant.target.lun]]
    volume = "b"
    size = "1MiB"
`}
	for what, doc := range docs {
		file := "/etc/nstarget/x.toml"
		cfg, err := Parse(file, []byte(doc))
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		dir, ps, ok := PeekPortals(file, []byte(doc))
		if !ok {
			t.Errorf("%s: PeekPortals gave up on a file it should read", what)
			continue
		}
		if dir != cfg.Server.NetnsDir {
			t.Errorf("%s: netns_dir %q, Parse says %q", what, dir, cfg.Server.NetnsDir)
		}
		var want []Portal
		for _, tn := range cfg.Tenants {
			want = append(want, Portal{Netns: tn.Netns, Addr: tn.Portal})
		}
		if len(ps) != len(want) {
			t.Fatalf("%s: %d portals %v, Parse says %d %v", what, len(ps), ps, len(want), want)
		}
		for i := range ps {
			if ps[i] != want[i] {
				t.Errorf("%s: portal %d is %v, Parse says %v", what, i, ps[i], want[i])
			}
		}
	}

	for what, doc := range map[string]string{
		"cluster":            "[cluster]\nendpoints = [\"http://127.0.0.1:2379\"]\n[[tenant]]\nname = \"a\"\n",
		"key outside tables": "tenant = []\n",
		"escaped portal":     "[[tenant]]\nname = \"a\"\nportal = \"127.0.0.1:32\\u0036\"\n",
		"dotted tenant key":  "[[tenant]]\nname.x = \"a\"\n",
		"array of servers":   "[[server]]\nnetns_dir = \"/x\"\n",
		"unterminated":       "[[tenant]]\nname = \"a\n",
	} {
		if _, ps, ok := PeekPortals("/x.toml", []byte(doc)); ok {
			t.Errorf("%s: PeekPortals guessed %v instead of giving up", what, ps)
		}
	}
	// A tenant Parse refuses is left out of the guess.
	if _, ps, ok := PeekPortals("/x.toml", []byte("[[tenant]]\nname = \"../a\"\n[[tenant]]\nname = \"b\"\nportal = \"x\"\n[[tenant]]\nname = \"c\"\n")); !ok || len(ps) != 1 || ps[0] != (Portal{"c", DefaultPortal}) {
		t.Errorf("invalid tenants: %v %v, want only c", ps, ok)
	}
}

func BenchmarkPeekPortals1024Tenants(b *testing.B) {
	doc := "[server]\nnetns_dir = \"/run/netns\"\n"
	for i := range 1024 {
		doc += "\n[[tenant]]\nname = \"t-" + strconv.Itoa(i) + "\"\nportal = \"127.0.0.1:3260\"\n  [[tenant.target]]\n" +
			"  iqn = \"iqn.2026-12.org.nstarget:fleet\"\n    [[tenant.target.lun]]\n    volume = \"t-" + strconv.Itoa(i) + "\"\n    size = \"1MiB\"\n"
	}
	data := []byte(doc)
	for b.Loop() {
		if _, ps, ok := PeekPortals("/x.toml", data); !ok || len(ps) != 1024 {
			b.Fatal(ps, ok)
		}
	}
}
