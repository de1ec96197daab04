package cluster

import (
	"context"
	"encoding/json"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// checkOwners compares the owner keys in etcd with who holds what through the callbacks.
func checkOwners(t *testing.T, c *testCluster, want map[string]string) {
	t.Helper()
	if got := c.owners(); !maps.Equal(got, want) {
		t.Errorf("owner keys in etcd differ from the callbacks:\n etcd %v\nheld %v", got, want)
	}
}

// TestNodesShareTenantsAndLeaveInOrder: three nodes split the tenants as Place says, each
// owner key in etcd matches the callbacks, and a node that stops (ctx cancelled) releases its
// tenants and deletes their keys so the others take them at once: the lease TTL is longer
// than the deadline, so a takeover that waited for expiry would fail the test.
func TestNodesShareTenantsAndLeaveInOrder(t *testing.T) {
	c := newTestCluster(t)
	ts := tenantNames(60)
	c.publish(ts)
	const ttl = 60 * time.Second // > hungTest
	for _, n := range []string{"a", "b", "c"} {
		c.start(n, ttl)
	}
	want := Place(ts, []string{"a", "b", "c"})
	c.rec.waitFor(t, "three nodes to hold their tenants", func() bool { return c.rec.holds(want) })
	checkOwners(t, c, c.rec.snapshot())
	waitStandby(t, c, ts, "a", "b", "c")

	ctx, cancel := context.WithTimeout(context.Background(), hungTest)
	defer cancel()
	st, err := Status(ctx, c.cli, c.prefix)
	if err != nil {
		t.Fatal(err)
	}
	var leaseB int64
	for _, n := range st.Nodes {
		if n.Name == "b" {
			leaseB = n.Lease
		}
		if n.TTL <= 0 || n.Owns != n.Placed {
			t.Errorf("status of node %s: %+v", n.Name, n)
		}
	}

	start := time.Now()
	if err := c.stop("b"); err != nil {
		t.Errorf("b left with an error: %v", err)
	}
	want = Place(ts, []string{"a", "c"})
	c.rec.waitFor(t, "a and c to take b's tenants", func() bool { return c.rec.holds(want) })
	t.Logf("planned leave of b: its tenants served elsewhere %v after the stop began", time.Since(start).Round(time.Millisecond))
	checkOwners(t, c, c.rec.snapshot())
	waitStandby(t, c, ts, "a", "c")
	ttlResp, err := c.cli.TimeToLive(ctx, clientv3.LeaseID(leaseB))
	if err != nil {
		t.Fatal(err)
	}
	if ttlResp.TTL != -1 {
		t.Errorf("b's lease still has %ds after it left; want it revoked", ttlResp.TTL)
	}
	c.rec.check(t)
}

// TestLeaseLossStopsBeforeExpiry cuts one node off etcd (its connections become a black hole:
// no error, just silence) and checks that it calls Lost before etcd expires its lease, that is
// before the others can see its owner keys go, and that the other node then serves all its
// tenants. It logs the takeover time with 300 tenants and a 2 s TTL.
func TestLeaseLossStopsBeforeExpiry(t *testing.T) {
	c := newTestCluster(t)
	ts := tenantNames(300)
	c.publish(ts)
	const ttl = 2 * time.Second
	a := c.start("a", ttl)
	c.start("b", ttl)
	want := Place(ts, []string{"a", "b"})
	c.rec.waitFor(t, "a and b to hold their tenants", func() bool { return c.rec.holds(want) })
	checkOwners(t, c, c.rec.snapshot())
	ofA := 0
	for _, n := range want {
		if n == "a" {
			ofA++
		}
	}

	// Watch, from the test's own client, for a's owner keys going away.
	ctx, cancel := context.WithTimeout(context.Background(), hungTest)
	defer cancel()
	var (
		mu          sync.Mutex
		firstDelete time.Time
	)
	now, err := c.cli.Get(ctx, "/", clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	wch := c.cli.Watch(ctx, keys{c.prefix}.owners(), clientv3.WithPrefix(), clientv3.WithPrevKV(),
		clientv3.WithRev(now.Header.Revision+1))
	go func() {
		for wr := range wch {
			for _, ev := range wr.Events {
				if ev.Type != clientv3.EventTypeDelete || ev.PrevKv == nil {
					continue
				}
				var v ownerValue
				if json.Unmarshal(ev.PrevKv.Value, &v) == nil && v.Node == "a" {
					mu.Lock()
					if firstDelete.IsZero() {
						firstDelete = time.Now()
					}
					mu.Unlock()
				}
			}
		}
	}()

	cut := time.Now()
	a.cut.cut.Store(true)
	everything := map[string]string{}
	for _, tn := range ts {
		everything[tn] = "b"
	}
	c.rec.waitFor(t, "a to call Lost and b to serve everything", func() bool {
		_, lost := c.rec.lostAt["a"]
		return lost && c.rec.holds(everything)
	})
	c.rec.mu.Lock()
	lostAt := c.rec.lostAt["a"]
	var lastAcquire time.Time
	for tn, n := range want {
		if n == "a" && c.rec.acquire[tn].After(lastAcquire) {
			lastAcquire = c.rec.acquire[tn]
		}
	}
	c.rec.mu.Unlock()
	// b can only have claimed a's tenants after their keys were deleted, but the test's
	// own watch may deliver that later than b's did (a loaded machine): wait for it.
	var fd time.Time
	for deadline := time.Now().Add(hungTest); ; time.Sleep(10 * time.Millisecond) {
		mu.Lock()
		fd = firstDelete
		mu.Unlock()
		if !fd.IsZero() || time.Now().After(deadline) {
			break
		}
	}
	if fd.IsZero() || !lostAt.Before(fd) {
		t.Errorf("a called Lost at %v after the cut, its first owner key went at %v: Lost must come first",
			lostAt.Sub(cut), fd.Sub(cut))
	}
	t.Logf("lease loss, %d of 300 tenants on the cut node, TTL %v: Lost after %v, keys expired after %v, all served by b after %v (%v after the expiry)",
		ofA, ttl, lostAt.Sub(cut).Round(time.Millisecond), fd.Sub(cut).Round(time.Millisecond),
		lastAcquire.Sub(cut).Round(time.Millisecond), lastAcquire.Sub(fd).Round(time.Millisecond))
	checkOwners(t, c, c.rec.snapshot())

	// The partition heals: a joins again with a new lease and takes its share back.
	healed := time.Now()
	a.cut.heal()
	c.rec.waitFor(t, "a to rejoin and serve its share again", func() bool { return c.rec.holds(want) })
	t.Logf("after the partition healed, a served its %d tenants again after %v", ofA, time.Since(healed).Round(time.Millisecond))
	checkOwners(t, c, c.rec.snapshot())
	c.rec.check(t)
}

// TestFailedAcquireIsRetried: a tenant whose Acquire fails is given up (its owner key deleted)
// and claimed again after a backoff, until it succeeds; the others are not held up.
func TestFailedAcquireIsRetried(t *testing.T) {
	c := newTestCluster(t)
	ts := tenantNames(5)
	c.publish(ts)
	const bad = "tenant-0003"
	var attempts int
	c.rec.fail = func(node, tenant string) bool {
		if tenant != bad {
			return false
		}
		attempts++
		return attempts <= 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), hungTest)
	defer cancel()
	key := keys{c.prefix}.owner(bad)
	wch := c.cli.Watch(ctx, key)
	var seq []string
	seqDone := make(chan struct{})
	go func() {
		defer close(seqDone)
		for wr := range wch {
			for _, ev := range wr.Events {
				seq = append(seq, ev.Type.String())
				if len(seq) == 5 {
					return
				}
			}
		}
	}()
	c.start("a", 10*time.Second)
	want := Place(ts, []string{"a"})
	c.rec.waitFor(t, "every tenant held, the failing one included", func() bool { return c.rec.holds(want) })
	select {
	case <-seqDone:
	case <-ctx.Done():
		t.Fatal("owner key events did not arrive")
	}
	if got := strings.Join(seq, " "); got != "PUT DELETE PUT DELETE PUT" {
		t.Errorf("owner key of the failing tenant: %s; want it claimed and given up twice, then kept", got)
	}
	c.rec.mu.Lock()
	if attempts != 3 {
		t.Errorf("%d Acquire attempts, want 3", attempts)
	}
	c.rec.mu.Unlock()
	checkOwners(t, c, c.rec.snapshot())
	c.rec.check(t)
}

// TestRemovedTenantIsReleased: a tenant dropped from the published set is released and its
// owner key deleted; the nodes holding the others get the new document through Update.
func TestRemovedTenantIsReleased(t *testing.T) {
	c := newTestCluster(t)
	ts := tenantNames(10)
	c.publish(ts)
	for _, n := range []string{"a", "b"} {
		c.start(n, 10*time.Second)
	}
	want := Place(ts, []string{"a", "b"})
	c.rec.waitFor(t, "tenants held", func() bool { return c.rec.holds(want) })

	ctx, cancel := context.WithTimeout(context.Background(), hungTest)
	defer cancel()
	gone := ts[4]
	wch := c.cli.Watch(ctx, keys{c.prefix}.owner(gone))
	rest := append(ts[:4:4], ts[5:]...)
	p := c.publish(rest)
	deleted := false
	for !deleted {
		select {
		case wr := <-wch:
			for _, ev := range wr.Events {
				deleted = deleted || ev.Type == clientv3.EventTypeDelete
			}
		case <-ctx.Done():
			t.Fatalf("owner key of %s not deleted", gone)
		}
	}
	// The load bound may move another tenant too (see Place).
	want = Place(rest, []string{"a", "b"})
	c.rec.waitFor(t, "the others still held and both nodes updated", func() bool {
		return c.rec.holds(want) && c.rec.updates["a"] == p.Revision && c.rec.updates["b"] == p.Revision
	})
	checkOwners(t, c, c.rec.snapshot())
	c.rec.check(t)
}

func TestPublishAndStatus(t *testing.T) {
	c := newTestCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), hungTest)
	defer cancel()
	p1, err := Publish(ctx, c.cli, c.prefix, []string{"x", "y"}, []byte("doc"))
	if err != nil || !p1.Changed {
		t.Fatalf("first publish: %+v %v", p1, err)
	}
	p2, err := Publish(ctx, c.cli, c.prefix, []string{"y", "x"}, []byte("doc"))
	if err != nil || p2.Changed || p2.Revision != p1.Revision {
		t.Fatalf("same set again: %+v %v; want unchanged at %d", p2, err, p1.Revision)
	}
	for _, bad := range [][]string{{"x", "x"}, {"a/b"}, {""}} {
		if _, err := Publish(ctx, c.cli, c.prefix, bad, nil); err == nil {
			t.Errorf("publish %q: no error", bad)
		}
	}
	if _, err := Publish(ctx, c.cli, "relative", []string{"x"}, nil); err == nil {
		t.Error("relative prefix accepted")
	}

	c.start("a", 10*time.Second)
	c.rec.waitFor(t, "x and y held", func() bool { return c.rec.holds(map[string]string{"x": "a", "y": "a"}) })
	st, err := Status(ctx, c.cli, c.prefix)
	if err != nil {
		t.Fatal(err)
	}
	if st.Doc == nil || st.Doc.Revision != p1.Revision || st.Doc.Tenants != 2 || st.Doc.Bytes != 3 {
		t.Errorf("status doc: %+v", st.Doc)
	}
	if len(st.Nodes) != 1 || st.Nodes[0].Name != "a" || st.Nodes[0].TTL <= 0 || st.Nodes[0].Owns != 2 {
		t.Errorf("status nodes: %+v", st.Nodes)
	}
	for _, tr := range st.Tenants {
		if tr.Owner != "a" || tr.Placed != "a" {
			t.Errorf("status tenant: %+v", tr)
		}
	}
	if len(st.Tenants) != 2 || len(st.Strays) != 0 || len(st.Errors) != 0 {
		t.Errorf("status: %+v", st)
	}
}

// TestResyncAfterCompaction: a node whose watch misses events that etcd has since compacted
// (here: cut off briefly while the set changes, well within its lease) reads the cluster
// again and converges, without losing its lease.
func TestResyncAfterCompaction(t *testing.T) {
	c := newTestCluster(t)
	ts := tenantNames(20)
	c.publish(ts)
	a := c.start("a", 10*time.Second)
	c.start("b", 10*time.Second)
	want := Place(ts, []string{"a", "b"})
	c.rec.waitFor(t, "tenants held", func() bool { return c.rec.holds(want) })

	a.cut.cut.Store(true)
	changed := append(ts[2:], "new-1", "new-2")
	c.publish(changed)
	ctx, cancel := context.WithTimeout(context.Background(), hungTest)
	defer cancel()
	// One more write, so that compacting at its revision removes the set's change from the
	// history a must resume its watch from.
	resp, err := c.cli.Put(ctx, "/elsewhere", "x")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.cli.Compact(ctx, resp.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}
	a.cut.heal()
	want = Place(changed, []string{"a", "b"})
	c.rec.waitFor(t, "a and b to converge on the new set", func() bool { return c.rec.holds(want) })
	c.rec.mu.Lock()
	if at, lost := c.rec.lostAt["a"]; lost {
		t.Errorf("a lost its lease at %v; the cut was far shorter than the lease", at)
	}
	c.rec.mu.Unlock()
	checkOwners(t, c, c.rec.snapshot())
	c.rec.check(t)
}

// waitStandby waits until each of live has been told to stand by for what Standby says it
// would get if another of live died.
func waitStandby(t *testing.T, c *testCluster, ts []string, live ...string) {
	t.Helper()
	for _, n := range live {
		want := Standby(ts, live, n)
		c.rec.waitFor(t, n+"'s standby set", func() bool { return slices.Equal(c.rec.standby[n], want) })
	}
}
