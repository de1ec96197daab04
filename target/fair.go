package target

import (
	"sync"
	"sync/atomic"
	"time"
)

// Fair shares of the command window between busy tenants.
//
// The server runs whatever arrives, so a tenant that keeps hundreds of commands in flight
// takes the CPU and the backend from tenants that send a few at a time. While more than one
// tenant is busy, each busy tenant may have weight/Σweights of Options.FairCommands commands
// in flight, split among its sessions (at least one each), and the CmdSN window (RFC 7143's
// flow control, window.go) makes its initiators wait at home rather than queue on the server.
// A tenant busy alone is not limited, and the shares follow the busy set within fairEvery.
//
// Nothing here runs a goroutine or takes a lock per command: a reader reports its tenant busy
// with one clock read and one atomic load per SCSI command, the report is stored at most once
// per fairEvery per tenant, and whichever reader first finds the shares older than fairEvery
// recomputes them, over the tenants reported busy only.

const (
	// fairEvery is how often shares may be recomputed and a tenant's busy mark refreshed.
	fairEvery = 10 * time.Millisecond
	// fairIdle is how long after its last command a tenant stops counting as busy: several
	// gaps of a tenant that waits for its window, or of an initiator's think time.
	fairIdle = 100 * time.Millisecond
	// DefaultFairCommands is Options.FairCommands when unset: enough to keep a page-cached
	// backend busy on a few cores, small enough that sixteen busy tenants get four each.
	DefaultFairCommands = 64
)

type fairShare struct {
	total int64     // commands shared among busy tenants; 0: no shares
	base  time.Time // monotonic origin of the nanosecond marks below
	next  atomic.Int64

	mu   sync.Mutex
	busy []*Tenant // reported busy and not yet found idle; each has fairListed set
}

func newFairShare(total int) *fairShare {
	return &fairShare{total: int64(max(total, 0)), base: time.Now()}
}

// note records a SCSI command of t, and recomputes the shares when they are due.
func (f *fairShare) note(t *Tenant) {
	if f.total == 0 {
		return
	}
	now := int64(time.Since(f.base))
	if now-t.lastBusy.Load() >= int64(fairEvery) {
		t.lastBusy.Store(now)
		f.mu.Lock()
		if !t.fairListed {
			t.fairListed = true
			f.busy = append(f.busy, t)
		}
		f.mu.Unlock()
	}
	if n := f.next.Load(); now >= n && f.next.CompareAndSwap(n, now+int64(fairEvery)) {
		f.recompute(now)
	}
}

// recompute sets the window of every tenant reported busy and drops those gone idle.
func (f *fairShare) recompute(now int64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	live := f.busy[:0]
	var sum int64
	for _, t := range f.busy {
		if now-t.lastBusy.Load() > int64(fairIdle) || t.closed.Load() {
			t.fairListed = false
			t.setSessWindow(0)
			continue
		}
		live = append(live, t)
		sum += int64(t.weight.Load())
	}
	clear(f.busy[len(live):])
	f.busy = live
	for _, t := range live {
		var w int64 // alone: no limit
		if len(live) > 1 {
			share := max(1, f.total*int64(t.weight.Load())/sum)
			w = max(1, share/max(1, t.acct.used[resSessions].Load()))
		}
		t.setSessWindow(uint32(w))
	}
}

func (t *Tenant) setSessWindow(w uint32) {
	if t.sessWindow.Load() != w {
		t.sessWindow.Store(w)
	}
}

// MaxWeight bounds a tenant's weight: a thousand to one is already "this tenant first".
const MaxWeight = 1000

// SetWeight changes the tenant's share of the commands of busy tenants (1..MaxWeight) while
// it serves; it takes effect at the next recompute.
func (s *Server) SetWeight(t *Tenant, w int) {
	t.weight.Store(uint32(min(max(w, 1), MaxWeight)))
}
