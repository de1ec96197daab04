package cluster

import (
	"fmt"
	"maps"
	"slices"
	"testing"
)

func tenantNames(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("tenant-%04d", i+1)
	}
	return out
}

func loads(p map[string]string) map[string]int {
	l := map[string]int{}
	for _, n := range p {
		l[n]++
	}
	return l
}

func spread(p map[string]string, nodes []string) (lo, hi int) {
	l := loads(p)
	lo, hi = len(p), 0
	for _, n := range nodes {
		lo, hi = min(lo, l[n]), max(hi, l[n])
	}
	return lo, hi
}

func moved(a, b map[string]string) []string {
	var out []string
	for t, n := range a {
		if b[t] != n {
			out = append(out, t)
		}
	}
	slices.Sort(out)
	return out
}

func TestPlaceEven(t *testing.T) {
	for _, tc := range []struct{ tenants, nodes int }{
		{300, 3}, {301, 3}, {10, 4}, {1000, 7}, {2, 5}, {1, 1}, {97, 13},
	} {
		nodes := []string{}
		for i := range tc.nodes {
			nodes = append(nodes, fmt.Sprintf("node-%c", 'a'+i))
		}
		p := Place(tenantNames(tc.tenants), nodes)
		if len(p) != tc.tenants {
			t.Fatalf("%d tenants on %d nodes: placed %d", tc.tenants, tc.nodes, len(p))
		}
		lo, hi := spread(p, nodes)
		if hi-lo > 1 {
			t.Errorf("%d tenants on %d nodes: loads %v, max-min %d > 1", tc.tenants, tc.nodes, loads(p), hi-lo)
		}
	}
}

func TestPlaceEmpty(t *testing.T) {
	if p := Place(tenantNames(3), nil); len(p) != 0 {
		t.Errorf("no nodes: got %v", p)
	}
	if p := Place(nil, []string{"a"}); len(p) != 0 {
		t.Errorf("no tenants: got %v", p)
	}
}

func TestPlaceDeterministic(t *testing.T) {
	ts := tenantNames(300)
	nodes := []string{"a", "b", "c"}
	p := Place(ts, nodes)
	rts := slices.Clone(ts)
	slices.Reverse(rts)
	dup := append(slices.Clone(rts), ts[:10]...)
	for _, q := range []map[string]string{
		Place(rts, []string{"c", "a", "b"}),
		Place(dup, []string{"b", "c", "a", "a"}),
	} {
		if !maps.Equal(p, q) {
			t.Fatalf("order or duplicates changed the placement: %d tenants moved", len(moved(p, q)))
		}
	}
}

// TestPlaceGolden pins the hash and the algorithm: a change here moves tenants of running
// clusters and makes nodes of two versions disagree (see Place).
func TestPlaceGolden(t *testing.T) {
	p := Place(tenantNames(6), []string{"node-a", "node-b", "node-c"})
	got := fmt.Sprint(p)
	const golden = "map[tenant-0001:node-a tenant-0002:node-c tenant-0003:node-a tenant-0004:node-b tenant-0005:node-c tenant-0006:node-b]"
	if got != golden {
		t.Errorf("placement changed:\n got %s\nwant %s", got, golden)
	}
}

// TestPlaceMovement checks that a change of membership moves few tenants: a node leaving
// moves all of its own and, because of the load bound, only a few others; a node joining
// takes about 1/N and the rest barely move.
func TestPlaceMovement(t *testing.T) {
	const T = 300
	ts := tenantNames(T)
	three := []string{"node-a", "node-b", "node-c"}
	before := Place(ts, three)

	for _, gone := range three {
		rest := slices.DeleteFunc(slices.Clone(three), func(n string) bool { return n == gone })
		after := Place(ts, rest)
		own, others := 0, 0
		for _, tn := range moved(before, after) {
			if before[tn] == gone {
				own++
			} else {
				others++
			}
		}
		if own != loads(before)[gone] {
			t.Errorf("%s left: %d of its %d tenants moved", gone, own, loads(before)[gone])
		}
		// The load bound's price (see Place): tenants that had been pushed off a full
		// first choice. Unbounded this is 0; 3% of the tenants is the budget.
		if others > T*3/100 {
			t.Errorf("%s left: %d tenants of other nodes moved too (budget %d)", gone, others, T*3/100)
		}
		t.Logf("%s left: its %d tenants moved, plus %d of other nodes", gone, own, others)
	}

	four := append(slices.Clone(three), "node-d")
	after := Place(ts, four)
	toNew, others := 0, 0
	for _, tn := range moved(before, after) {
		if after[tn] == "node-d" {
			toNew++
		} else {
			others++
		}
	}
	if toNew != loads(after)["node-d"] {
		t.Fatalf("node-d holds %d tenants but %d moved to it", loads(after)["node-d"], toNew)
	}
	// About 1/N moves to the new node; the others must barely move among themselves.
	if toNew < T/4-1 || toNew > T/4+1 {
		t.Errorf("node-d joined: %d tenants moved to it, want about %d", toNew, T/4)
	}
	if others > T*3/100 {
		t.Errorf("node-d joined: %d tenants moved between old nodes (budget %d)", others, T*3/100)
	}
	t.Logf("node-d joined: %d tenants moved to it (1/N = %d), %d between old nodes", toNew, T/4, others)
}

// Standby is exactly what each node gets when another one dies: with two nodes all of the
// other's tenants; with three, each dead node's tenants split between the two others' standby
// sets, never a tenant the node already owns.
func TestStandbyIsWhatANodeGetsWhenAnotherDies(t *testing.T) {
	ts := tenantNames(300)
	for _, nodes := range [][]string{{"a", "b"}, {"a", "b", "c"}, {"n1", "n2", "n3", "n4"}} {
		place := Place(ts, nodes)
		covered := map[string]int{}
		for _, self := range nodes {
			sb := Standby(ts, nodes, self)
			want := map[string]bool{}
			for _, gone := range nodes {
				if gone == self {
					continue
				}
				after := Place(ts, slices.DeleteFunc(slices.Clone(nodes), func(n string) bool { return n == gone }))
				for t, n := range after {
					if n == self && place[t] == gone {
						want[t] = true
					}
				}
			}
			if got := slices.Sorted(maps.Keys(want)); !slices.Equal(sb, got) {
				t.Errorf("nodes %v, %s: Standby has %d tenants, want %d", nodes, self, len(sb), len(got))
			}
			for _, tn := range sb {
				if place[tn] == self {
					t.Errorf("nodes %v, %s: stands by for %s, which it owns", nodes, self, tn)
				}
			}
			for _, tn := range sb {
				covered[tn]++
			}
			if len(nodes) == 2 && len(sb) != len(ts)-loads(place)[self] {
				t.Errorf("nodes %v, %s: stands by for %d tenants, want all %d of the other node", nodes, self, len(sb), len(ts)-loads(place)[self])
			}
		}
		// Whichever node dies, each of its tenants has exactly one standby: the node it goes to.
		for _, tn := range ts {
			if covered[tn] != 1 {
				t.Errorf("nodes %v: tenant %s (on %s) has %d standby nodes, want 1", nodes, tn, place[tn], covered[tn])
			}
		}
	}
	if sb := Standby(ts, []string{"a"}, "a"); len(sb) != 0 {
		t.Errorf("a lone node stands by for %d tenants", len(sb))
	}
	if sb := Standby(ts, []string{"a", "b"}, "c"); sb != nil {
		t.Errorf("a node not in the set stands by for %d tenants", len(sb))
	}
}
