package target

import (
	"context"
	"testing"
	"time"
)

// fairRig drives fairShare.recompute with made-up counts: each step, tenant i sent per[i]
// commands in the last fairEvery.
type fairRig struct {
	t   *testing.T
	f   *fairShare
	ts  []*Tenant
	now int64
}

func newFairRig(t *testing.T, depth int, weights ...int) *fairRig {
	r := &fairRig{t: t, f: newFairShare(true, depth)}
	for _, w := range weights {
		tn := &Tenant{}
		tn.fair.weight.Store(uint32(w))
		tn.fair.listed.Store(true)
		tn.acct.used[resSessions].Store(1)
		tn.acct.used[resCommands].Store(int64(depth))
		r.f.busy = append(r.f.busy, tn)
		r.ts = append(r.ts, tn)
	}
	return r
}

func (r *fairRig) step(per ...int64) []uint32 {
	cost := make([]time.Duration, len(per))
	return r.stepCost(cost, per...)
}

// stepCost is step with commands whose backend calls took cost[i] each, besides
// fairCommandCost.
func (r *fairRig) stepCost(cost []time.Duration, per ...int64) []uint32 {
	r.now += int64(fairEvery)
	for i, n := range per {
		r.ts[i].fair.cmds.Add(n)
		r.ts[i].fair.spent.Add(n * int64(fairCommandCost+cost[i]))
		r.ts[i].fair.lastBusy.Store(r.now)
	}
	r.f.recompute(r.now)
	var w []uint32
	for _, tn := range r.ts {
		w = append(w, tn.fair.sessWindow.Load())
	}
	return w
}

// Tenants busy alike are never limited, however their rates wander; a tenant alone neither.
func TestFairSharesLeaveTenantsBusyAlikeAlone(t *testing.T) {
	r := newFairRig(t, 32, 1, 1, 1, 1)
	for i := range 50 {
		j := int64(i % 3) // rates 100..140 apart by up to 40%
		if w := r.step(100+20*j, 140-20*j, 120, 100); w[0]+w[1]+w[2]+w[3] != 0 {
			t.Fatalf("step %d: windows %v for tenants busy alike", i, w)
		}
	}
	solo := newFairRig(t, 32, 1)
	for range 10 {
		if w := solo.step(10000); w[0] != 0 {
			t.Fatalf("a tenant busy alone is limited to %d", w[0])
		}
	}
}

// A tenant sending ten times what another does has its window cut, never below one command
// per session; the other keeps its whole window. Once it sends no more than the average its
// window grows back to whole.
func TestFairSharesCutATenantFarAboveTheAverageAndGiveItBackAfter(t *testing.T) {
	r := newFairRig(t, 32, 1, 1)
	r.ts[0].acct.used[resSessions].Store(4)
	r.ts[0].acct.used[resCommands].Store(128)
	w := r.step(1000, 100)
	if w[0] == 0 || w[0] >= 32 || w[1] != 0 {
		t.Fatalf("windows %v: want the loud tenant cut below 32 per session, the other whole", w)
	}
	for range 20 {
		w = r.step(1000, 100)
		if w[0] < 1 || w[1] != 0 {
			t.Fatalf("windows %v: the loud tenant must keep at least 1 per session", w)
		}
	}
	for range 40 {
		if w = r.step(100, 100); w[0] == 0 {
			return
		}
	}
	t.Fatalf("windows %v after 40 steps at the average: the cut tenant never got its window back", w)
}

// Rates count per unit of weight: a tenant of weight 10 sending ten times another's is at its
// share, and a tenant that stops reporting leaves the busy set with its whole window.
func TestFairSharesCountPerUnitOfWeightAndForgetIdleTenants(t *testing.T) {
	r := newFairRig(t, 32, 10, 1)
	for range 10 {
		if w := r.step(1000, 100); w[0] != 0 || w[1] != 0 {
			t.Fatalf("windows %v: weight 10 at ten times the rate is its share", w)
		}
	}
	r = newFairRig(t, 32, 1, 1)
	r.step(1000, 100)
	r.now += int64(fairIdle) + 1 // nobody reports for longer than fairIdle
	r.f.recompute(r.now)
	if len(r.f.busy) != 0 || r.ts[0].fair.sessWindow.Load() != 0 || r.ts[0].fair.listed.Load() {
		t.Fatalf("idle tenants still listed (%d) or limited (%d)", len(r.f.busy), r.ts[0].fair.sessWindow.Load())
	}
}

// What counts is what a tenant's commands cost, not how many it sends: a tenant whose
// commands take eight times as long in the backend is cut at the same count as another.
func TestFairSharesWeighWhatCommandsCostNotHowManyThereAre(t *testing.T) {
	r := newFairRig(t, 32, 1, 1)
	cost := []time.Duration{80 * time.Microsecond, 0}
	w := r.stepCost(cost, 100, 100)
	if w[0] == 0 || w[1] != 0 {
		t.Fatalf("windows %v: want the costly tenant cut, the cheap one whole", w)
	}
	r = newFairRig(t, 32, 1, 1)
	for range 10 {
		if w := r.stepCost([]time.Duration{5 * time.Microsecond, 5 * time.Microsecond}, 100, 100); w[0]+w[1] != 0 {
			t.Fatalf("windows %v for tenants sending alike commands alike", w)
		}
	}
}

// A tenant at one command per session that still costs far more than its share has each
// command wait (its pace), never longer than fairMaxPace; back at the average, its pace goes
// first and then its window grows back.
func TestFairSharesPaceATenantStillAboveItsShareAtOneCommandPerSession(t *testing.T) {
	r := newFairRig(t, 32, 1, 1)
	r.ts[0].acct.used[resSessions].Store(4)
	r.ts[0].acct.used[resCommands].Store(128)
	cost := []time.Duration{100 * time.Microsecond, 0}
	for range 30 {
		r.stepCost(cost, 1000, 100)
	}
	s := &r.ts[0].fair
	if w := s.sessWindow.Load(); w != 1 {
		t.Fatalf("window %d per session, want the floor of 1", w)
	}
	if p := time.Duration(s.pace.Load()); p <= 0 || p > fairMaxPace {
		t.Fatalf("pace %v: want a wait per command in (0, %v]", p, fairMaxPace)
	}
	if p := r.ts[1].fair.pace.Load(); p != 0 {
		t.Fatalf("the tenant within its share is paced by %v", time.Duration(p))
	}
	for range 100 {
		r.stepCost(cost, 10, 100)
		if s.pace.Load() != 0 && s.sessWindow.Load() != 1 {
			t.Fatalf("window grew to %d while the pace is still %v", s.sessWindow.Load(), time.Duration(s.pace.Load()))
		}
		if s.pace.Load() == 0 && s.sessWindow.Load() == 0 {
			return
		}
	}
	t.Fatalf("pace %v, window %d after 100 steps below the average: want both gone",
		time.Duration(s.pace.Load()), s.sessWindow.Load())
}

// Shares turned off never list or limit anyone.
func TestFairSharesOffLimitNobody(t *testing.T) {
	f := newFairShare(false, 32)
	a := &Tenant{}
	var fc fairCounter
	for range 3 {
		f.note(a, &fc)
	}
	if len(f.busy) != 0 || a.fair.sessWindow.Load() != 0 {
		t.Fatal("shares turned off still track or limit tenants")
	}
}

// window sends TEST UNIT READY and returns the command window its response grants:
// MaxCmdSN - ExpCmdSN + 1 with nothing of this session in flight.
func (ini *testInitiator) window() uint32 {
	ini.t.Helper()
	ini.scsi(make([]byte, 16), 0, false, false, nil, true)
	f := ini.recv()
	if f.BHS.opcode() != opSCSIResp || f.BHS[3] != 0 {
		ini.t.Fatalf("TEST UNIT READY: op %02x status %02x", f.BHS.opcode(), f.BHS[3])
	}
	ini.statSN = f.BHS.u32(offStatSN) + 1
	return f.BHS.u32(offMaxCmdSN) - f.BHS.u32(offExpCmdSN) + 1
}

// A tenant that pipelines eight commands for every one of another busy tenant has its window
// cut; once it is busy alone its window returns to the full queue depth. Real sessions over
// TCP: the shares follow what the readers see, not a test hook.
func TestATenantSendingFarMoreThanAnotherHasItsWindowCutUntilItIsAlone(t *testing.T) {
	const depth = 32
	ts := startRAMServer(t, Options{QueueDepth: depth})
	_, tsB := serveTenantB(t, ts)
	a := dialTest(t, ts)
	a.login("iqn.i:a", 1)
	b := dialTest(t, tsB)
	b.login("iqn.i:b", 1)

	if w := a.window(); w != depth {
		t.Fatalf("tenant A busy alone is granted %d, want the full window %d", w, depth)
	}
	// A sends up to eight commands at a time within its window, B one; A's window can only
	// close as it uses the CmdSNs it was granted, so keep both busy until the cut shows.
	win := uint32(depth)
	burst := func() uint32 {
		n := min(8, win)
		for range n {
			a.scsi(make([]byte, 16), 0, false, false, nil, true)
		}
		var f *frame
		for range n {
			if f = a.recv(); f.BHS.opcode() != opSCSIResp || f.BHS[3] != 0 {
				t.Fatalf("TEST UNIT READY: op %02x status %02x", f.BHS.opcode(), f.BHS[3])
			}
		}
		a.statSN = f.BHS.u32(offStatSN) + 1
		win = f.BHS.u32(offMaxCmdSN) - f.BHS.u32(offExpCmdSN) + 1
		return win
	}
	deadline := time.Now().Add(testTimeout)
	for burst() > 4 {
		b.window()
		if time.Now().After(deadline) {
			t.Fatalf("tenant A, sending 8 commands to B's 1, still has a window of %d", win)
		}
	}
	for burst() != depth {
		if time.Now().After(deadline) {
			t.Fatalf("tenant A busy alone: window %d, want it back to %d", win, depth)
		}
	}
}

// A paced tenant's command waits its pace before it runs and then completes; taking the
// tenant out of service while its reader waits ends the wait at once, not after the pace.
func TestAPacedTenantsCommandWaitsItsPaceAndClosingTheTenantEndsTheWait(t *testing.T) {
	ts := startRAMServer(t, Options{QueueDepth: 32})
	a := dialTest(t, ts)
	a.login("iqn.i:a", 1)
	const pace = 100 * time.Millisecond
	ts.tenant.fair.pace.Store(int64(pace))
	start := time.Now()
	a.window()
	if took := time.Since(start); took < pace {
		t.Fatalf("a command of a tenant paced by %v completed in %v", pace, took)
	}

	ts.tenant.fair.pace.Store(int64(time.Hour))
	a.scsi(make([]byte, 16), 0, false, false, nil, true)
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // no grace: whatever is connected is closed at once
	closed := make(chan struct{})
	go func() {
		ts.srv.CloseTenant(ctx, ts.tenant)
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(testTimeout):
		t.Fatal("closing the tenant waits for its reader's pace")
	}
}
