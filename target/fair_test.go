package target

import (
	"testing"
	"time"
)

func fairTenants(f *fairShare, weights ...int) []*Tenant {
	var ts []*Tenant
	for _, w := range weights {
		t := &Tenant{}
		t.weight.Store(uint32(w))
		t.acct.used[resSessions].Store(1)
		f.busy = append(f.busy, t)
		t.fairListed = true
		ts = append(ts, t)
	}
	return ts
}

func windows(ts []*Tenant) []uint32 {
	var w []uint32
	for _, t := range ts {
		w = append(w, t.sessWindow.Load())
	}
	return w
}

// A tenant busy alone keeps its whole window; busy tenants split FairCommands by weight and
// then among their sessions, at least one command per session; a tenant idle for fairIdle
// leaves the busy set and gets its whole window back.
func TestFairSharesSplitCommandsByWeightAmongBusyTenants(t *testing.T) {
	f := newFairShare(64)
	now := int64(time.Hour)
	ts := fairTenants(f, 1)
	ts[0].lastBusy.Store(now)
	f.recompute(now)
	if w := windows(ts); w[0] != 0 {
		t.Fatalf("a tenant busy alone is limited to %d", w[0])
	}

	ts = append(ts, fairTenants(f, 1, 2)...)
	for _, x := range ts {
		x.lastBusy.Store(now)
	}
	ts[2].acct.used[resSessions].Store(4)
	f.recompute(now)
	// 64 * 1/4 = 16 for each weight-1 tenant; 64 * 2/4 = 32 over 4 sessions = 8 each.
	if w := windows(ts); w[0] != 16 || w[1] != 16 || w[2] != 8 {
		t.Fatalf("windows %v, want [16 16 8]", w)
	}

	ts[1].acct.used[resSessions].Store(100) // more sessions than its share: one each
	ts[0].lastBusy.Store(now - int64(fairIdle) - 1)
	f.recompute(now)
	if w := windows(ts); w[0] != 0 || w[1] != 1 || w[2] != 10 {
		t.Fatalf("windows %v, want [0 1 10]: the idle tenant freed, 64*1/3=21 over 100 sessions -> 1, 64*2/3=42 over 4 -> 10", w)
	}
	if len(f.busy) != 2 || ts[0].fairListed {
		t.Fatalf("the idle tenant is still listed busy (%d listed)", len(f.busy))
	}
}

// Shares off (FairCommands < 0) never mark or limit anyone.
func TestFairSharesOffLimitNobody(t *testing.T) {
	f := newFairShare(-1)
	a, b := &Tenant{}, &Tenant{}
	f.note(a)
	f.note(b)
	if len(f.busy) != 0 || a.sessWindow.Load() != 0 || b.sessWindow.Load() != 0 {
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

// Two tenants sending commands at once get a window of their weighted share of
// FairCommands; a tenant's window returns to the full queue depth once it is busy alone again.
// Real sessions over TCP: the shares follow what the readers see, not a test hook.
func TestBusyTenantsShareTheCommandWindowByWeight(t *testing.T) {
	const depth, shared = 32, 8
	ts := startRAMServer(t, Options{QueueDepth: depth, FairCommands: shared})
	tenantB, tsB := serveTenantB(t, ts)
	a := dialTest(t, ts)
	a.login("iqn.i:a", 1)
	b := dialTest(t, tsB)
	b.login("iqn.i:b", 1)

	if w := a.window(); w != depth {
		t.Fatalf("tenant A busy alone is granted %d, want the full window %d", w, depth)
	}
	// The window closes only as granted CmdSNs are used, so keep both busy until it shows.
	until := func(what string, want uint32, busy ...*testInitiator) {
		t.Helper()
		deadline := time.Now().Add(testTimeout)
		for {
			w := a.window()
			for _, o := range busy {
				o.window()
			}
			if w == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: tenant A's window is %d, want %d", what, w, want)
			}
		}
	}
	until("two busy tenants of weight 1", shared/2, b)
	ts.srv.SetWeight(tenantB, 3)
	until("B weighs 3", shared/4, b)
	until("B went idle", depth)
}
