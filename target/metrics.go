package target

import (
	"slices"
	"sort"
	"sync/atomic"
	"time"
)

// What the exporter (cmd's /metrics) reads. Counters are atomics bumped on the data path
// without a lock or an allocation: per LUN of each target by the session core when it answers
// a command, per tenant by the I/O edge when a command's device work ends and when a login
// ends.

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

// latencyHist is a histogram of command latencies: the last counter is +Inf.
type latencyHist struct {
	counts [18]atomic.Uint64
	sumNs  atomic.Uint64
}

func (h *latencyHist) observe(d time.Duration) {
	ns := int64(d)
	i, _ := slices.BinarySearch(bucketNs, ns)
	h.counts[i].Add(1)
	h.sumNs.Add(uint64(max(ns, 0)))
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
	out := make([]TenantMetrics, 0, len(tenants))
	for _, t := range tenants {
		tm := TenantMetrics{Name: t.Name, Usage: usageOf(&t.acct.used),
			LoginsOK: t.stats.loginsOK.Load(), LoginsFailed: t.stats.loginsFailed.Load()}
		var cum uint64
		tm.LatencyBuckets = make([]uint64, len(LatencyBuckets))
		for i := range t.stats.latency.counts {
			cum += t.stats.latency.counts[i].Load()
			if i < len(LatencyBuckets) {
				tm.LatencyBuckets[i] = cum
			}
		}
		tm.LatencyCount = cum
		tm.LatencySumSeconds = float64(t.stats.latency.sumNs.Load()) / 1e9
		for _, tg := range t.targets() {
			luns := make([]uint64, 0, len(tg.lunStats))
			for n := range tg.lunStats {
				luns = append(luns, n)
			}
			slices.Sort(luns)
			for _, n := range luns {
				lc := tg.lunStats[n]
				tm.LUNs = append(tm.LUNs, LUNMetrics{Target: tg.cfg.IQN, LUN: n, Commands: lc.commands.Load(),
					ReadBytes: lc.readBytes.Load(), WrittenBytes: lc.writtenBytes.Load()})
			}
		}
		out = append(out, tm)
	}
	return out
}
