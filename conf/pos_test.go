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
