package cluster

import (
	"cmp"
	"slices"
)

// Place assigns every tenant to one of nodes; with no nodes it returns an empty map. It is a
// pure function of the two sets (order and duplicates do not matter), so every node computes
// the same answer from the same view of etcd without talking to the others.
//
// The method is rendezvous (highest random weight) hashing with a load bound. Each tenant
// ranks the nodes by a hash of (tenant, node); tenants are taken in the order of a hash of
// their name and each goes to the best-ranked node that is not full. A node is full at
// ⌊T/N⌋ tenants, except that the first T mod N nodes to reach ⌊T/N⌋ may take one more; so
// node loads differ by at most one, whatever the names.
//
// Why rendezvous rather than a ring: with no bound, a tenant only moves when its best live
// node changes, so a node leaving moves exactly its own tenants and a node joining takes
// exactly the tenants that rank it first (≈1/N), with no virtual-node tuning. Why a bound:
// unbounded hashing leaves loads binomial (300 tenants on 3 nodes: ±8 per node, max-min
// often 20), and a tenant here is real work (volumes, a network, sessions). The price of the
// bound is a few extra moves: a tenant pushed off its first choice because that node was full
// may go back to it when the bound changes with the node count. Those are only tenants hashed
// late in the order, on the order of √T: 300 tenants on 3 nodes, at most 5 besides the
// leaving node's 100 (TestPlaceMovement); 3000 on 8, about 1%.
//
// Changing this function, or the hash, changes where every tenant lives: nodes running
// different versions would disagree (safely — claims are compare-and-set — but with tenants
// parked until they agree). TestPlaceGolden pins it.
func Place(tenants []string, nodes []string) map[string]string {
	out := make(map[string]string, len(tenants))
	ns := uniqueSorted(nodes)
	ts := uniqueSorted(tenants)
	if len(ns) == 0 || len(ts) == 0 {
		return out
	}
	type ranked struct {
		name string
		key  uint64
	}
	order := make([]ranked, len(ts))
	for i, t := range ts {
		order[i] = ranked{t, hash64(t, "")}
	}
	slices.SortFunc(order, func(a, b ranked) int {
		return cmp.Or(cmp.Compare(a.key, b.key), cmp.Compare(a.name, b.name))
	})

	base, extra := len(ts)/len(ns), len(ts)%len(ns)
	load := make([]int, len(ns))
	bigger := 0 // nodes holding base+1
	score := make([]uint64, len(ns))
	idx := make([]int, len(ns))
	for _, t := range order {
		for i, n := range ns {
			score[i] = hash64(t.name, n)
			idx[i] = i
		}
		slices.SortFunc(idx, func(a, b int) int {
			return cmp.Or(cmp.Compare(score[b], score[a]), cmp.Compare(ns[a], ns[b]))
		})
		// Some node always has room: the capacities add up to exactly len(ts).
		for _, i := range idx {
			if load[i] < base || (load[i] == base && bigger < extra) {
				if load[i] == base {
					bigger++
				}
				load[i]++
				out[t.name] = ns[i]
				break
			}
		}
	}
	return out
}

func uniqueSorted(s []string) []string {
	out := slices.Clone(s)
	slices.Sort(out)
	return slices.Compact(out)
}

// hash64 is FNV-1a over a, a separator byte and b, finished with the SplitMix64 mixer so that
// names differing in their last byte (tenant-0001, tenant-0002) still get unrelated ranks.
// It must stay the same on every node and every version (see Place).
func hash64(a, b string) uint64 {
	const (
		offset = 14695981039346656037
		prime  = 1099511628211
	)
	h := uint64(offset)
	for i := 0; i < len(a); i++ {
		h = (h ^ uint64(a[i])) * prime
	}
	h = (h ^ 0xff) * prime // 0xff never occurs in UTF-8, so ("ab","c") ≠ ("a","bc")
	for i := 0; i < len(b); i++ {
		h = (h ^ uint64(b[i])) * prime
	}
	h ^= h >> 30
	h *= 0xbf58476d1ce4e5b9
	h ^= h >> 27
	h *= 0x94d049bb133111eb
	h ^= h >> 31
	return h
}

// Standby is the tenants that node self would be given if any one other node of nodes died:
// those placed on another node that Place, without that node, gives to self. They are what a
// node keeps ready to take over (a hot standby). A node is the standby of about 1/(N-1) of
// each other node's tenants; with two nodes, of all the other's.
func Standby(tenants []string, nodes []string, self string) []string {
	ns := uniqueSorted(nodes)
	if !slices.Contains(ns, self) {
		return nil
	}
	place := Place(tenants, ns)
	var out []string
	for _, gone := range ns {
		if gone == self {
			continue
		}
		without := Place(tenants, slices.DeleteFunc(slices.Clone(ns), func(n string) bool { return n == gone }))
		for t, n := range without {
			if n == self && place[t] == gone {
				out = append(out, t)
			}
		}
	}
	slices.Sort(out)
	return out
}
