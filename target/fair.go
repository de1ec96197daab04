package target

import (
	"sync"
	"sync/atomic"
	"time"
)

// Fair shares of the server between busy tenants.
//
// The server runs whatever arrives, so a tenant that keeps a hundred commands in flight gets
// far more of the CPU and the backend than tenants that send a few at a time. Every fairEvery
// what each busy tenant cost the server is compared, per unit of weight. A command costs
// fairCommandCost for the protocol plus the time its backend call took: four-kilobyte writes
// that make the filesystem allocate and journal cost several times a read from the page cache,
// and counting commands alone let such a tenant take a third of the server at a sixteenth of
// the commands. A tenant that costs more than fairAbove times the busy tenants' average has its
// window cut in proportion, down to one command per session; if that is still too much, each of
// its commands waits before it runs (its pace), which is how a tenant of few sessions and costly
// commands is held to its share. Once it is back near the average (fairBack) the pace shrinks
// away and the window grows a quarter at a time, then to whole. The window travels as iSCSI's
// own flow control (window.go): MaxCmdSN stops advancing, so its initiators wait at home;
// nothing is refused. Tenants that are busy alike, or a tenant busy alone, are never limited:
// their aggregate throughput is what it would be without shares. The price of the rule: next to
// a tenant that sends one command at a time, a busy one is held to under twice its cost even
// when the server has capacity to spare (weights, or fair_share = false, are the operator's
// answer).
//
// Nothing here takes a lock or touches a shared cache line per command: a reader counts its
// connection's commands in its own fairCounter and adds them to its tenant's at most once per
// fairEvery, and whichever reader then finds the shares due recomputes them, over the tenants
// reported busy only. Only a paced tenant's readers read its pace per command.

const (
	// fairEvery is how often shares may be recomputed and a connection reports its count.
	fairEvery = 10 * time.Millisecond
	// fairIdle is how long after its last report a tenant stops counting as busy.
	fairIdle = 100 * time.Millisecond
	// A tenant is cut while it sends more than fairAbove times the busy tenants' average rate
	// per unit of weight: far enough above that tenants busy alike, whose rates wander by tens
	// of percent, are left alone.
	fairAbove = 1.25
	// A cut tenant's window grows back once it sends no more than fairBack times the average
	// (a smoothed rate only approaches the average, it does not reach it).
	fairBack = 1.05
	// fairCommandCost is what a command costs the server besides its backend call: PDUs in and
	// out, the SCSI decode and the scheduling (measured at ~10 µs of server CPU per 4K read from
	// the page cache, of ~13 µs in all, on the 2-core VM of the README).
	fairCommandCost = 10 * time.Microsecond
	// fairMaxPace bounds a paced tenant's wait per command: far below any initiator's command
	// timeout, and a tenant held that hard costs the others next to nothing already.
	fairMaxPace = 20 * time.Millisecond
	// A pace shorter than fairMinPace is dropped: the timer would cost more than it holds back.
	fairMinPace = 20 * time.Microsecond
)

type fairShare struct {
	on    bool
	depth int64     // a session's full window (Options.QueueDepth)
	base  time.Time // monotonic origin of the nanosecond marks below
	next  atomic.Int64

	mu   sync.Mutex
	last int64     // mark of the last recompute
	busy []*Tenant // reported busy and not yet found idle; each has fair.listed set
}

// fairState is a tenant's part of the shares; the plain fields are under fairShare.mu.
type fairState struct {
	weight     atomic.Uint32
	spent      atomic.Int64  // cost reported by its connections, in nanoseconds
	cmds       atomic.Int64  // commands reported by its connections
	lastBusy   atomic.Int64  // mark of its last report
	sessWindow atomic.Uint32 // what each of its sessions may have in flight; 0: its full window
	pace       atomic.Int64  // nanoseconds each of its commands waits before it runs; 0: none
	listed     atomic.Bool   // in fairShare.busy; changed under fairShare.mu
	counted    int64         // spent at the last recompute
	countedCmd int64         // cmds at the last recompute
	rate       float64       // cost per second per unit of weight (ns/s), smoothed
	cmdRate    float64       // commands per second, smoothed
	window     int64         // over all its sessions; 0: not limited
	hold       int           // recomputes left before the next decision: a cut shows in rate slowly
}

// fairCounter is one connection's commands and cost not yet added to its tenant's. Its reader
// owns n and last; spent is added to by whichever goroutine ran the command.
type fairCounter struct {
	n     int64
	last  int64 // mark of the last report
	spent atomic.Int64
}

// ran charges a command's backend time to its connection.
func (f *fairShare) ran(fc *fairCounter, took time.Duration) {
	if f.on {
		fc.spent.Add(int64(took))
	}
}

func newFairShare(on bool, depth int) *fairShare {
	return &fairShare{on: on, depth: int64(depth), base: time.Now()}
}

// note counts a SCSI command of t's connection fc; at most once per fairEvery it reports the
// count and recomputes the shares when they are due. It returns how long the command must wait
// before it runs: t's pace, 0 for a tenant within its share.
func (f *fairShare) note(t *Tenant, fc *fairCounter) time.Duration {
	if !f.on {
		return 0
	}
	fc.n++
	pace := time.Duration(t.fair.pace.Load())
	now := int64(time.Since(f.base))
	if now-fc.last < int64(fairEvery) {
		return pace
	}
	fc.last = now
	t.fair.cmds.Add(fc.n)
	t.fair.spent.Add(fc.n*int64(fairCommandCost) + fc.spent.Swap(0))
	fc.n = 0
	t.fair.lastBusy.Store(now)
	if !t.fair.listed.Load() {
		f.mu.Lock()
		if !t.fair.listed.Load() {
			t.fair.listed.Store(true)
			t.fair.counted = t.fair.spent.Load()
			t.fair.countedCmd = t.fair.cmds.Load()
			f.busy = append(f.busy, t)
		}
		f.mu.Unlock()
	}
	if n := f.next.Load(); now >= n && f.next.CompareAndSwap(n, now+int64(fairEvery)) {
		f.recompute(now)
	}
	return pace
}

// recompute measures every busy tenant's rate and sets its window.
func (f *fairShare) recompute(now int64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	dt := float64(now-f.last) / 1e9
	f.last = now
	live := f.busy[:0]
	var sum float64
	for _, t := range f.busy {
		s := &t.fair
		if now-s.lastBusy.Load() > int64(fairIdle) || t.closed.Load() {
			s.listed.Store(false)
			s.rate, s.cmdRate, s.window, s.hold = 0, 0, 0, 0
			s.setSessWindow(0)
			s.pace.Store(0)
			continue
		}
		spent, cmds := s.spent.Load(), s.cmds.Load()
		r := float64(spent-s.counted) / dt / float64(max(1, s.weight.Load()))
		s.counted, s.cmdRate = spent, (s.cmdRate+float64(cmds-s.countedCmd)/dt)/2
		s.countedCmd = cmds
		s.rate = (s.rate + r) / 2
		live = append(live, t)
		sum += s.rate
	}
	clear(f.busy[len(live):])
	f.busy = live
	if len(live) == 0 {
		return
	}
	avg := sum / float64(len(live))
	for _, t := range live {
		s := &t.fair
		sess := max(1, t.acct.used[resSessions].Load())
		switch {
		case s.hold > 0:
			s.hold--
		case len(live) > 1 && s.rate > fairAbove*avg && s.window > 0 && s.window <= sess && s.cmdRate > 0:
			// One command per session is still too much: each command waits longer, by what
			// stretches the time between its commands in proportion.
			pace := float64(s.pace.Load()) + float64(sess)/s.cmdRate*(s.rate/avg-1)*1e9
			s.pace.Store(int64(min(pace, float64(fairMaxPace))))
			s.hold = 2
		case len(live) > 1 && s.rate > fairAbove*avg:
			cur := s.window
			if cur == 0 {
				cur = max(sess, t.acct.used[resCommands].Load())
			}
			s.window = max(sess, int64(float64(cur)*avg/s.rate))
			s.hold = 2
		case s.pace.Load() > 0 && s.rate <= fairBack*avg:
			// The pace goes before the window grows back.
			if p := s.pace.Load() * 3 / 4; p >= int64(fairMinPace) {
				s.pace.Store(p)
			} else {
				s.pace.Store(0)
			}
		case s.window > 0 && s.rate <= fairBack*avg:
			// Back near its share: the window grows back; between the two it holds.
			s.window += max(1, s.window/4)
			if s.window >= f.depth*sess {
				s.window = 0
			}
		}
		var w int64
		if s.window > 0 {
			w = max(1, s.window/sess)
		}
		s.setSessWindow(uint32(w))
	}
}

func (s *fairState) setSessWindow(w uint32) {
	if s.sessWindow.Load() != w {
		s.sessWindow.Store(w)
	}
}

// MaxWeight bounds a tenant's weight: a thousand to one is already "this tenant first".
const MaxWeight = 1000

// SetWeight changes the tenant's share of the server while other tenants are busy too
// (1..MaxWeight); it takes effect at the next recompute.
func (s *Server) SetWeight(t *Tenant, w int) {
	t.fair.weight.Store(uint32(min(max(w, 1), MaxWeight)))
}
