package target

import (
	"sync"
	"time"
)

// refusalLogEvery is the least time between two log lines about the same refusal of the
// same tenant: enough for an operator to see it, too little for a tenant to flood the log.
const refusalLogEvery = 10 * time.Second

// refusalLog rate-limits log lines by key, counting what it suppressed.
type refusalLog struct {
	every time.Duration
	mu    sync.Mutex
	last  map[string]*refusalEntry
}

type refusalEntry struct {
	at         time.Time
	suppressed int
}

// maxRefusalKeys bounds the map: tenants × reasons is small, but keys must not grow forever.
const maxRefusalKeys = 1 << 14

func newRefusalLog(every time.Duration) *refusalLog {
	return &refusalLog{every: every, last: make(map[string]*refusalEntry)}
}

// allow reports whether a line for key may be logged now, and how many were suppressed.
func (r *refusalLog) allow(key string) (bool, int) {
	now := time.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.last[key]
	if e == nil {
		if len(r.last) >= maxRefusalKeys {
			clear(r.last)
		}
		r.last[key] = &refusalEntry{at: now}
		return true, 0
	}
	if now.Sub(e.at) < r.every {
		e.suppressed++
		return false, 0
	}
	n := e.suppressed
	e.at, e.suppressed = now, 0
	return true, n
}
