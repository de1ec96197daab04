package conf

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// BenchmarkLoad1024Tenants is what every reload pays before it changes anything: reading and
// validating a file of 1024 tenants.
func BenchmarkLoad1024Tenants(b *testing.B) {
	var s strings.Builder
	s.WriteString("[server]\nnetns_dir = \"/run/netns\"\ndata_dir = \"/var/lib/nstarget\"\n")
	for i := range 1024 {
		fmt.Fprintf(&s, "\n[[tenant]]\nname = \"t-%04d\"\nportal = \"127.0.0.1:3260\"\n  [[tenant.target]]\n"+
			"  iqn = \"iqn.2026-12.org.nstarget:fleet\"\n    [[tenant.target.lun]]\n    volume = \"t-%04d\"\n    size = \"1MiB\"\n", i, i)
	}
	p := filepath.Join(b.TempDir(), "c.toml")
	if err := os.WriteFile(p, []byte(s.String()), 0o600); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Load(p); err != nil {
			b.Fatal(err)
		}
	}
}
