package main

import (
	"context"
	"time"

	"nstarget/backend"
)

// The pool's soft threshold: volumes are thin, so the file system under the pool can fill
// while every volume still has room. Crossing [server] pool_soft_threshold (percent) is logged
// and told to every session as THIN PROVISIONING SOFT THRESHOLD REACHED, once per crossing:
// the warning re-arms only when the pool falls poolHysteresis points below the threshold, so a
// pool hovering at the line does not flood logs or initiators.

const (
	poolCheckEvery = time.Second
	poolHysteresis = 5.0
)

// poolWatch is the threshold state machine, apart from the clock and the file system.
type poolWatch struct {
	threshold float64 // percent; 0: off
	above     bool
}

// observe takes one fill level and reports whether it crossed the threshold upwards now.
func (w *poolWatch) observe(used float64) (crossed, cleared bool) {
	switch {
	case w.threshold <= 0:
	case !w.above && used >= w.threshold:
		w.above = true
		return true, false
	case w.above && used < w.threshold-poolHysteresis:
		w.above = false
		return false, true
	}
	return false, false
}

// watchPool checks the pool's fill level every poolCheckEvery until ctx is done. serve owns
// the goroutine that runs it.
func (s *service) watchPool(ctx context.Context, threshold int) {
	if threshold <= 0 || s.pool == nil {
		return
	}
	w := poolWatch{threshold: float64(threshold)}
	t := time.NewTicker(poolCheckEvery)
	defer t.Stop()
	failing := false
	for {
		sp, err := s.pool.Space()
		switch {
		case err != nil && !failing:
			failing = true
			s.log.Warn("pool: cannot read its fill level", "err", err)
		case err == nil:
			failing = false
			crossed, cleared := w.observe(sp.UsedPercent())
			if crossed {
				s.log.Warn("pool above its soft threshold: sessions are told THIN PROVISIONING SOFT THRESHOLD REACHED; writes fail once it is full",
					"used_percent", int(sp.UsedPercent()), "threshold_percent", threshold, "free_bytes", sp.PoolFree, "size_bytes", sp.PoolSize)
				s.thresholdReached()
			}
			if cleared {
				s.log.Info("pool back below its soft threshold", "used_percent", int(sp.UsedPercent()), "threshold_percent", threshold)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// thresholdReached tells every LU of every tenant (they all share the pool).
func (s *service) thresholdReached() {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, rt := range s.byNetns {
		for _, tr := range rt.targets {
			for _, lr := range tr.luns {
				lr.lu.ThresholdReached()
			}
		}
	}
}

// poolStatus is the pool as status shows it.
type poolStatus struct {
	Dir              string  `json:"dir"`
	SizeBytes        int64   `json:"size_bytes"`
	FreeBytes        int64   `json:"free_bytes"`
	UsedPercent      float64 `json:"used_percent"`
	ThresholdPercent int     `json:"soft_threshold_percent"`
	Error            string  `json:"error,omitempty"`
}

func poolStatusOf(p *backend.Pool, dir string, threshold int) *poolStatus {
	ps := &poolStatus{Dir: dir, ThresholdPercent: threshold}
	sp, err := p.Space()
	if err != nil {
		ps.Error = err.Error()
		return ps
	}
	ps.SizeBytes, ps.FreeBytes, ps.UsedPercent = sp.PoolSize, sp.PoolFree, float64(int(sp.UsedPercent()*10))/10
	return ps
}
