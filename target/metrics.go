package target

import (
	"maps"
	"slices"
	"sort"
	"sync/atomic"
	"time"
)

// What the exporter (cmd's /metrics) reads. On the data path each connection counts in plain
// fields of its own (per LUN in the session core, latency in the edge), under the lock it holds
// anyway: no atomic shared with other connections per command. Those fold into the tenant's
// and target's atomics when the connection ends; Metrics adds the live ones.

// lunCounters count one LUN's answered commands and the bytes they moved.
type lunCounters struct {
	commands, readBytes, writtenBytes atomic.Uint64
}

// LatencyBuckets are the upper bounds (seconds) of the command latency histogram: from a
// page-cache hit to a stalled backend.
var LatencyBuckets = []float64{50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1, 2.5, 5, 10}

// bucketNs are LatencyBuckets in nanoseconds, for the hot path's search.
var bucketNs = func() []int64 {
	ns := make([]int64, len(LatencyBuckets))
	for i, s := range LatencyBuckets {
		ns[i] = int64(s * 1e9)
	}
	return ns
}()

// latencyHist is a tenant's histogram of command latencies (the last counter is +Inf), fed by
// its connections as they end.
type latencyHist struct {
	counts [18]atomic.Uint64
	sumNs  atomic.Uint64
}

// latencyCounts is one connection's histogram, plain (under conn.mu), folded into its
// tenant's when the connection ends.
type latencyCounts struct {
	counts [18]uint64
	sumNs  uint64
}

func (l *latencyCounts) observe(d time.Duration) {
	ns := int64(d)
	i, _ := slices.BinarySearch(bucketNs, ns)
	l.counts[i]++
	l.sumNs += uint64(max(ns, 0))
}

// lunCounts are one session's counters of one LUN, plain (the core is stepped under
// conn.mu), folded into the target's when the connection ends.
type lunCounts struct {
	commands, readBytes, writtenBytes uint64
}

// foldCountersLocked adds the connection's counters to its tenant's and target's, once. Caller
// holds mu; the connection counts nothing more after this.
func (c *conn) foldCountersLocked() {
	if c.folded {
		return
	}
	c.folded = true
	h := &c.tenant.stats.latency
	for i, n := range c.lat.counts {
		if n > 0 {
			h.counts[i].Add(n)
		}
	}
	h.sumNs.Add(c.lat.sumNs)
	if c.core == nil || c.core.cfg.sess.tg == nil {
		return
	}
	stats := c.core.cfg.sess.tg.stats()
	for lun, lc := range c.core.luns {
		if t := stats[lun]; t != nil {
			t.commands.Add(lc.commands)
			t.readBytes.Add(lc.readBytes)
			t.writtenBytes.Add(lc.writtenBytes)
		}
	}
}

// tenantCounters are a tenant's latency histogram and login outcomes.
type tenantCounters struct {
	latency                latencyHist
	loginsOK, loginsFailed atomic.Uint64
}

// LUNMetrics are one LUN's counters since the target was made.
type LUNMetrics struct {
	Target                            string
	LUN                               uint64
	Commands, ReadBytes, WrittenBytes uint64
}

// TenantMetrics are one tenant's counters and what it holds now.
type TenantMetrics struct {
	Name  string
	Usage Usage
	LUNs  []LUNMetrics
	// Latency: cumulative counts per LatencyBuckets bound (the +Inf count is Count), and the
	// sum, of the device work of every command (from dispatch to result).
	LatencyBuckets         []uint64
	LatencyCount           uint64
	LatencySumSeconds      float64
	LoginsOK, LoginsFailed uint64
}

// Metrics reads every tenant's counters, ordered by tenant name.
func (s *Server) Metrics() []TenantMetrics {
	s.mu.Lock()
	tenants := make([]*Tenant, 0, len(s.tenants))
	for t := range s.tenants {
		tenants = append(tenants, t)
	}
	s.mu.Unlock()
	sort.Slice(tenants, func(i, j int) bool { return tenants[i].Name < tenants[j].Name })
	// What live connections counted and have not folded yet.
	liveLat := make(map[*Tenant]*latencyCounts)
	liveLUN := make(map[*Target]map[uint64]lunCounts)
	s.mu.Lock()
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.mu.Lock()
		if !c.folded {
			l := liveLat[c.tenant]
			if l == nil {
				l = new(latencyCounts)
				liveLat[c.tenant] = l
			}
			for i, n := range c.lat.counts {
				l.counts[i] += n
			}
			l.sumNs += c.lat.sumNs
			if c.core != nil && c.core.cfg.sess.tg != nil {
				tg := c.core.cfg.sess.tg
				m := liveLUN[tg]
				if m == nil {
					m = make(map[uint64]lunCounts)
					liveLUN[tg] = m
				}
				for lun, lc := range c.core.luns {
					x := m[lun]
					x.commands += lc.commands
					x.readBytes += lc.readBytes
					x.writtenBytes += lc.writtenBytes
					m[lun] = x
				}
			}
		}
		c.mu.Unlock()
	}
	out := make([]TenantMetrics, 0, len(tenants))
	for _, t := range tenants {
		tm := TenantMetrics{Name: t.Name, Usage: t.usage(),
			LoginsOK: t.stats.loginsOK.Load(), LoginsFailed: t.stats.loginsFailed.Load()}
		var cum uint64
		tm.LatencyBuckets = make([]uint64, len(LatencyBuckets))
		live := liveLat[t]
		if live == nil {
			live = new(latencyCounts)
		}
		for i := range t.stats.latency.counts {
			cum += t.stats.latency.counts[i].Load() + live.counts[i]
			if i < len(LatencyBuckets) {
				tm.LatencyBuckets[i] = cum
			}
		}
		tm.LatencyCount = cum
		tm.LatencySumSeconds = float64(t.stats.latency.sumNs.Load()+live.sumNs) / 1e9
		for _, tg := range t.targets() {
			stats := tg.stats()
			for _, n := range slices.Sorted(maps.Keys(stats)) {
				lc, lv := stats[n], liveLUN[tg][n]
				tm.LUNs = append(tm.LUNs, LUNMetrics{Target: tg.cfg.IQN, LUN: n, Commands: lc.commands.Load() + lv.commands,
					ReadBytes: lc.readBytes.Load() + lv.readBytes, WrittenBytes: lc.writtenBytes.Load() + lv.writtenBytes})
			}
		}
		out = append(out, tm)
	}
	return out
}
