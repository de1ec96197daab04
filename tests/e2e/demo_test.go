//go:build linux

package e2e

import (
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
)

func TestDemoServesThreeIsolatedTenantsAndRemovesEverything(t *testing.T) {
	code, stdout, stderr := runBin(t, "demo", "-exit")
	if code != 0 {
		t.Fatalf("demo exited %d:\n%s\n%s", code, stdout, stderr)
	}
	for _, tenant := range []string{"a", "b", "c"} {
		found := false
		for _, l := range strings.Split(stdout, "\n") {
			f := strings.Fields(l)
			if len(f) > 0 && f[0] == tenant && strings.Contains(l, "own pattern, intact") {
				found = true
			}
		}
		if !found {
			t.Errorf("tenant %s did not read back its own pattern:\n%s", tenant, stdout)
		}
	}
	// Every tenant discovers the shared IQN; tenant c has an extra target that only c sees
	// (checking that c sees it keeps this from passing when discovery shows nothing at all).
	seen := map[string]string{}
	for _, l := range strings.Split(stdout, "\n") {
		if f := strings.Fields(l); len(f) > 3 {
			seen[f[0]] = f[3] // TENANT NAMESPACE INITIATOR-NS DISCOVERED ...
		}
	}
	for _, tenant := range []string{"a", "b", "c"} {
		disc := strings.Split(seen[tenant], ",")
		if !slices.Contains(disc, "iqn.2026-11.io.nstarget:demo") {
			t.Errorf("tenant %s discovered %q, want the shared demo IQN among them:\n%s", tenant, seen[tenant], stdout)
		}
		if hasC := slices.Contains(disc, "iqn.2026-11.io.nstarget:c-only"); hasC != (tenant == "c") {
			t.Errorf("tenant %s discovered %q: c-only must be listed to c and to no one else:\n%s", tenant, seen[tenant], stdout)
		}
	}
	// Every namespace the demo made (nstdemo-<its pid>-*) is gone.
	i := strings.Index(stdout, "removed namespaces nstdemo-")
	if i < 0 {
		t.Fatalf("demo did not report its cleanup:\n%s", stdout)
	}
	pid := strings.TrimPrefix(strings.Fields(stdout[i:])[2], "nstdemo-")
	pid = strings.TrimSuffix(pid, "-*,")
	if _, err := strconv.Atoi(pid); err != nil {
		t.Fatalf("cannot read the demo's prefix from %q", stdout[i:])
	}
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "nstdemo-"+pid+"-") {
			t.Errorf("demo left namespace %s behind", e.Name())
		}
	}
}
