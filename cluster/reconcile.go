package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// owner is a cached owner key.
type owner struct {
	lease clientv3.LeaseID
	node  string
}

type retryState struct {
	failures int
	next     time.Time
}

// reconciler is one session's view of etcd and of this node's tenants. One goroutine (run)
// owns all of its fields; the job workers it starts only read what they are handed and
// return results to it.
type reconciler struct {
	n     *Node
	cli   *clientv3.Client
	lease clientv3.LeaseID
	keys  keys
	self  string
	log   *slog.Logger

	// The view of etcd: rebuilt by resync, kept current by the watch and by our own
	// writes. known[key] is the revision up to which the entry is known: older events for
	// it are stale (our own write may be applied before its watch event arrives).
	doc    Doc
	nodes  map[string]clientv3.LeaseID
	owners map[string]owner
	known  map[string]int64

	held  map[string]bool // acquired and not released
	given int64           // revision of the document the caller last got
	retry map[string]retryState
	wake  time.Time // earliest retry due; zero: none

	placedFor string // cache key of placement
	placement map[string]string
	standFor  string // placedFor when the StandbyHandler was last told

	heard time.Time // when the watch events being reconciled arrived (for the profile)
}

func newReconciler(n *Node, cli *clientv3.Client, lease clientv3.LeaseID, log *slog.Logger) *reconciler {
	return &reconciler{n: n, cli: cli, lease: lease, keys: n.keys, self: n.cfg.Name, log: log,
		nodes: map[string]clientv3.LeaseID{}, owners: map[string]owner{}, known: map[string]int64{},
		held: map[string]bool{}, retry: map[string]retryState{}}
}

// run follows etcd and reconciles until ctx ends (then it leaves in order) or sctx ends (the
// lease is lost: the caller has had Lost, nothing is released).
func (r *reconciler) run(ctx, sctx context.Context) error {
	backoff := 50 * time.Millisecond
	for {
		if ctx.Err() != nil {
			return r.leave(sctx)
		}
		if sctx.Err() != nil {
			return nil
		}
		err := r.resync(sctx)
		if err == nil {
			backoff = 50 * time.Millisecond
			wctx, wcancel := context.WithCancel(clientv3.WithRequireLeader(sctx))
			wch := r.cli.Watch(wctx, r.keys.root(), clientv3.WithPrefix(), clientv3.WithRev(r.rev()+1))
			err = r.follow(ctx, sctx, wch)
			wcancel()
		}
		if err == nil {
			continue // ctx or sctx ended
		}
		r.log.Warn("cluster view out of date; reading it again", "err", err, "in", backoff)
		select {
		case <-ctx.Done():
		case <-sctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, time.Second)
	}
}

// rev is the newest revision the view has seen.
func (r *reconciler) rev() int64 {
	var m int64
	for _, v := range r.known {
		m = max(m, v)
	}
	return m
}

// resync replaces the view with one consistent read of the prefix: at start, and after a
// watch failed (compaction, a leader lost, a dropped stream), when events may be missing.
func (r *reconciler) resync(sctx context.Context) error {
	gctx, cancel := context.WithTimeout(sctx, r.n.cfg.DialTimeout)
	defer cancel()
	resp, err := r.cli.Get(gctx, r.keys.root(), clientv3.WithPrefix())
	if err != nil {
		return fmt.Errorf("read %s: %w", r.keys.root(), err)
	}
	r.nodes = map[string]clientv3.LeaseID{}
	r.owners = map[string]owner{}
	r.known = map[string]int64{r.keys.root(): resp.Header.Revision}
	docSeen := false
	for _, kv := range resp.Kvs {
		docSeen = docSeen || string(kv.Key) == r.keys.tenants()
		r.put(kv)
	}
	if !docSeen {
		r.setDoc(Doc{})
	}
	return nil
}

// follow applies watch events and reconciles after each batch; it returns nil when ctx or
// sctx ends, an error when the watch fails.
func (r *reconciler) follow(ctx, sctx context.Context, wch clientv3.WatchChan) error {
	r.reconcile(ctx, sctx)
	for {
		err := r.next(ctx, sctx, wch)
		if err != nil || ctx.Err() != nil || sctx.Err() != nil {
			return err
		}
		r.reconcile(ctx, sctx)
	}
}

// next waits for watch events (applying every response already queued) or for a retry to
// fall due.
func (r *reconciler) next(ctx, sctx context.Context, wch clientv3.WatchChan) error {
	var wake <-chan time.Time
	if !r.wake.IsZero() {
		t := time.NewTimer(time.Until(r.wake))
		defer t.Stop()
		wake = t.C
	}
	select {
	case <-ctx.Done():
	case <-sctx.Done():
	case <-wake:
	case wr, ok := <-wch:
		r.heard = time.Now()
		for {
			if !ok {
				return errors.New("watch closed")
			}
			if err := wr.Err(); err != nil {
				return fmt.Errorf("watch: %w", err)
			}
			if wr.Canceled {
				return errors.New("watch cancelled")
			}
			r.apply(wr.Events)
			// Take every response already waiting, then reconcile once: a takeover
			// of hundreds of tenants arrives as hundreds of events.
			select {
			case wr, ok = <-wch:
				continue
			default:
			}
			break
		}
	}
	return nil
}

func (r *reconciler) apply(evs []*clientv3.Event) {
	for _, ev := range evs {
		key := string(ev.Kv.Key)
		if ev.Kv.ModRevision <= r.known[key] {
			continue // stale: our own write already applied, or older
		}
		switch ev.Type {
		case mvccpb.PUT:
			r.put(ev.Kv)
		case mvccpb.DELETE:
			r.del(key, ev.Kv.ModRevision)
		}
	}
}

func (r *reconciler) put(kv *mvccpb.KeyValue) {
	key := string(kv.Key)
	r.known[key] = kv.ModRevision
	switch {
	case key == r.keys.tenants():
		d, err := decodeEnvelope(kv.ModRevision, kv.Value)
		if err != nil {
			// Keep placing the last good set: an unreadable document must not stop
			// every tenant of the cluster.
			r.log.Error("published tenant set unreadable; keeping the previous one", "err", err, "previous", r.doc.Revision)
			return
		}
		r.setDoc(d)
	case strings.HasPrefix(key, r.keys.nodes()):
		r.nodes[strings.TrimPrefix(key, r.keys.nodes())] = clientv3.LeaseID(kv.Lease)
	case strings.HasPrefix(key, r.keys.owners()):
		var v ownerValue
		_ = json.Unmarshal(kv.Value, &v) // the lease proves ownership; the name is for logs
		r.owners[strings.TrimPrefix(key, r.keys.owners())] = owner{lease: clientv3.LeaseID(kv.Lease), node: v.Node}
	}
}

func (r *reconciler) del(key string, rev int64) {
	r.known[key] = rev
	switch {
	case key == r.keys.tenants():
		// Deleting the set is publishing an empty one: every tenant is released.
		r.setDoc(Doc{Revision: rev})
	case strings.HasPrefix(key, r.keys.nodes()):
		delete(r.nodes, strings.TrimPrefix(key, r.keys.nodes()))
	case strings.HasPrefix(key, r.keys.owners()):
		delete(r.owners, strings.TrimPrefix(key, r.keys.owners()))
	}
}

func (r *reconciler) setDoc(d Doc) {
	if d.Revision != r.doc.Revision || r.doc.Tenants == nil {
		r.log.Info("tenant set", "revision", d.Revision, "tenants", len(d.Tenants), "sha256", d.SHA256)
	}
	if d.Tenants == nil {
		d.Tenants = []string{}
	}
	r.doc = d
}

// place is Place over the live nodes, cached until the set or the nodes change.
func (r *reconciler) place() map[string]string {
	live := make([]string, 0, len(r.nodes))
	for name := range r.nodes {
		live = append(live, name)
	}
	slices.Sort(live)
	key := fmt.Sprint(r.doc.Revision, live)
	if key != r.placedFor {
		r.placedFor, r.placement = key, Place(r.doc.Tenants, live)
	}
	return r.placement
}

// What a job does to one tenant.
type jobKind int

const (
	jobRelease jobKind = iota // Release, then delete our owner key: a planned move
	jobDrop                   // Release; the key is not ours any more
	jobGiveUp                 // delete our owner key of a tenant we do not hold
	jobClaim                  // create the owner key if absent, then Acquire
	jobAdopt                  // our key exists but we do not hold it: confirm, then Acquire
)

func (k jobKind) String() string {
	return [...]string{"release", "drop", "give up", "claim", "adopt"}[k]
}

type job struct {
	tenant string
	kind   jobKind
}

type result struct {
	job
	claimed  time.Duration // when the claim's answer came, from the start of runJobs
	acquired time.Duration // when Acquire returned, from the start of runJobs
	owned    bool          // after the job, our owner key exists (claim/adopt succeeded)
	deleted  bool          // our owner key was deleted
	held     bool          // the caller serves the tenant
	rev      int64         // revision of our write
	taken    *mvccpb.KeyValue
	err      error // Acquire failed
}

// reconcile makes this node's share match placement. It is the only place callbacks start
// from, apart from Lost.
func (r *reconciler) reconcile(ctx, sctx context.Context) {
	if ctx.Err() != nil || sctx.Err() != nil {
		return
	}
	if _, ok := r.nodes[r.self]; !ok {
		r.reregister(sctx)
	}
	place := r.place()
	inSet := make(map[string]bool, len(r.doc.Tenants))
	for _, t := range r.doc.Tenants {
		inSet[t] = true
	}

	var stops, starts []job
	for t := range r.held {
		o, ok := r.owners[t]
		switch {
		case !ok || o.lease != r.lease:
			// Someone deleted or replaced our key (by hand?): another node may claim it
			// now, so stop serving it without waiting for placement.
			r.log.Error("owner key of a served tenant is gone or not ours; stopping it", "tenant", t, "owner", o.node)
			stops = append(stops, job{t, jobDrop})
		case place[t] != r.self:
			stops = append(stops, job{t, jobRelease})
		}
	}
	for t, o := range r.owners {
		// Our key without the tenant: a claim whose answer was lost, or a delete that
		// failed. Keep it only if we are about to adopt it.
		if o.lease == r.lease && !r.held[t] && place[t] != r.self {
			stops = append(stops, job{t, jobGiveUp})
		}
	}
	for t := range r.retry {
		if !inSet[t] {
			delete(r.retry, t)
		}
	}
	now := time.Now()
	r.wake = time.Time{}
	for t, node := range place {
		if node != r.self || r.held[t] {
			continue
		}
		o, owned := r.owners[t]
		if owned && o.lease != r.lease {
			continue // its owner releases it, or its lease expires; then we claim
		}
		if rs, ok := r.retry[t]; ok && now.Before(rs.next) {
			if r.wake.IsZero() || rs.next.Before(r.wake) {
				r.wake = rs.next
			}
			if owned {
				stops = append(stops, job{t, jobGiveUp})
			}
			continue
		}
		if owned {
			starts = append(starts, job{t, jobAdopt})
		} else {
			starts = append(starts, job{t, jobClaim})
		}
	}

	r.runJobs(ctx, sctx, stops)
	if sctx.Err() != nil {
		return
	}
	if len(r.held) > 0 && r.given != r.doc.Revision {
		r.n.h.Update(r.doc)
		r.given = r.doc.Revision
	}
	if len(starts) > 0 {
		r.runJobs(ctx, sctx, starts)
		r.given = r.doc.Revision
	}
	r.standby(ctx, sctx)
}

// standby tells a StandbyHandler which tenants to stand by for, when placement's inputs (the
// document, the live nodes) have changed since it was last told.
func (r *reconciler) standby(ctx, sctx context.Context) {
	sb, ok := r.n.h.(StandbyHandler)
	if !ok || ctx.Err() != nil || sctx.Err() != nil || r.standFor == r.placedFor {
		return
	}
	r.standFor = r.placedFor
	live := make([]string, 0, len(r.nodes))
	for name := range r.nodes {
		live = append(live, name)
	}
	sb.Standby(Standby(r.doc.Tenants, live, r.self), r.doc)
}

// profile logs where the time of a batch of claims went: one line per batch of more than one
// claim, so a takeover can be read off the log ("takeover profile: claims").
func (r *reconciler) profile(began time.Time, claimedAll time.Duration, results []result) {
	var claims, held, failed int
	var lastClaim, lastHeld time.Duration
	for _, res := range results {
		if res.kind != jobClaim && res.kind != jobAdopt {
			continue
		}
		claims++
		lastClaim = max(lastClaim, res.claimed)
		if res.held {
			held++
			lastHeld = max(lastHeld, res.acquired)
		} else if res.err != nil {
			failed++
		}
	}
	if claims < 2 {
		return
	}
	var sinceHeard time.Duration
	if !r.heard.IsZero() {
		sinceHeard = began.Sub(r.heard)
	}
	// Absolute times too, so that a benchmark can line the takeover up with the moment the
	// previous owner's lease expired.
	r.log.Info("takeover profile: claims", "tenants", claims, "held", held, "failed", failed,
		"heard_at", r.heard.UTC().Format(time.RFC3339Nano), "began_at", began.UTC().Format(time.RFC3339Nano),
		"heard_to_start", sinceHeard, "batched_claims", claimedAll, "last_claimed", lastClaim, "last_acquired", lastHeld)
}

// reregister puts our node key back if it vanished while our lease lives (deleted by hand).
func (r *reconciler) reregister(sctx context.Context) {
	key := r.keys.node(r.self)
	val, _ := json.Marshal(nodeValue{Name: r.self, Address: r.n.cfg.Address, Started: time.Now().UTC()})
	c, cancel := context.WithTimeout(sctx, r.n.cfg.DialTimeout)
	defer cancel()
	resp, err := r.cli.Txn(c).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, string(val), clientv3.WithLease(r.lease))).
		Commit()
	switch {
	case err != nil:
		r.log.Warn("node key missing; cannot put it back", "err", err)
	case resp.Succeeded:
		r.log.Warn("node key was missing; put it back")
		r.nodes[r.self] = r.lease
		r.known[key] = resp.Header.Revision
	}
}

// runJobs runs jobs, at most Parallel at once, and applies their results. Acquire's context
// ends with the session (a lost lease) or with ctx (leaving).
func (r *reconciler) runJobs(ctx, sctx context.Context, jobs []job) {
	if len(jobs) == 0 {
		return
	}
	actx, cancel := context.WithCancel(sctx)
	defer cancel()
	defer context.AfterFunc(ctx, cancel)()
	doc := r.doc
	results := make([]result, len(jobs))
	sem := make(chan struct{}, r.n.cfg.Parallel)
	var wg sync.WaitGroup
	began := time.Now()
	claimed := r.claimAll(actx, sctx, jobs)
	claimedAll := time.Since(began)
	for i, j := range jobs {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			results[i] = r.do(actx, sctx, j, doc, began, claimed)
		})
	}
	wg.Wait()
	r.profile(began, claimedAll, results)
	for _, res := range results {
		r.record(res)
	}
}

// do runs one job. It reads only r's immutable fields.
func (r *reconciler) do(actx, sctx context.Context, j job, doc Doc, began time.Time, claimed map[string]int64) result {
	res := result{job: j}
	log := r.log.With("tenant", j.tenant)
	switch j.kind {
	case jobRelease, jobDrop:
		log.Info("releasing tenant", "why", j.kind.String())
		r.n.h.Release(j.tenant)
		if j.kind == jobRelease {
			res.deleted, res.rev = r.deleteOwner(sctx, j.tenant, log)
		}
	case jobGiveUp:
		res.deleted, res.rev = r.deleteOwner(sctx, j.tenant, log)
	case jobClaim, jobAdopt:
		if actx.Err() != nil {
			return res
		}
		if rev, ok := claimed[j.tenant]; ok && j.kind == jobClaim {
			res.owned, res.rev = true, rev // claimed with others in one transaction
		} else {
			res.owned, res.rev, res.taken = r.claim(sctx, j.tenant, j.kind == jobAdopt, log)
		}
		res.claimed = time.Since(began)
		if !res.owned {
			return res
		}
		start := time.Now()
		if err := r.n.h.Acquire(actx, j.tenant, doc); err != nil {
			res.err = err
			if actx.Err() != nil {
				log.Info("acquire abandoned: leaving, or the lease is lost", "err", err)
			} else {
				log.Error("acquire failed; giving the tenant up until a retry", "err", err)
			}
			res.deleted, res.rev = r.deleteOwner(sctx, j.tenant, log)
			res.owned = !res.deleted
			return res
		}
		res.held = true
		res.acquired = time.Since(began)
		log.Info("tenant acquired", "revision", doc.Revision, "took", time.Since(start))
	}
	return res
}

// claimChunk is how many owner keys one transaction of claimAll creates: below etcd's
// default limit of 128 operations per transaction.
const claimChunk = 64

// claimAll claims the tenants of the jobClaim jobs in transactions of claimChunk keys each
// (all created if all are absent, else none), all sent at once, and returns the revision of
// each claimed tenant's key. A takeover of 300 tenants then costs 5 round trips to etcd, not
// 300. A chunk that fails, or is refused because one of its keys exists, is left to the jobs
// to claim one by one, as without it.
func (r *reconciler) claimAll(actx, sctx context.Context, jobs []job) map[string]int64 {
	var names []string
	for _, j := range jobs {
		if j.kind == jobClaim {
			names = append(names, j.tenant)
		}
	}
	if len(names) < 2 || actx.Err() != nil {
		return nil
	}
	val, _ := json.Marshal(ownerValue{Node: r.self, Since: time.Now().UTC()})
	var mu sync.Mutex
	out := make(map[string]int64, len(names))
	var wg sync.WaitGroup
	for chunk := range slices.Chunk(names, claimChunk) {
		wg.Go(func() {
			conds := make([]clientv3.Cmp, len(chunk))
			puts := make([]clientv3.Op, len(chunk))
			for i, t := range chunk {
				key := r.keys.owner(t)
				conds[i] = clientv3.Compare(clientv3.CreateRevision(key), "=", 0)
				puts[i] = clientv3.OpPut(key, string(val), clientv3.WithLease(r.lease))
			}
			c, cancel := context.WithTimeout(sctx, r.n.cfg.DialTimeout)
			defer cancel()
			resp, err := r.cli.Txn(c).If(conds...).Then(puts...).Commit()
			if err != nil {
				// The outcome is unknown; the jobs' own claims find out (a key of ours
				// already there fails their create, and the next round adopts it).
				r.log.Warn("batched claim failed; claiming one by one", "tenants", len(chunk), "err", err)
				return
			}
			if !resp.Succeeded {
				return
			}
			mu.Lock()
			for _, t := range chunk {
				out[t] = resp.Header.Revision
			}
			mu.Unlock()
		})
	}
	wg.Wait()
	return out
}

// claim creates the owner key bound to our lease if it is absent, or (adopt) rewrites it if
// it is already bound to our lease. Either way etcd, not the cache, decides.
func (r *reconciler) claim(sctx context.Context, tenant string, adopt bool, log *slog.Logger) (bool, int64, *mvccpb.KeyValue) {
	key := r.keys.owner(tenant)
	val, _ := json.Marshal(ownerValue{Node: r.self, Since: time.Now().UTC()})
	cond := clientv3.Compare(clientv3.CreateRevision(key), "=", 0)
	if adopt {
		cond = clientv3.Compare(clientv3.LeaseValue(key), "=", r.lease)
	}
	c, cancel := context.WithTimeout(sctx, r.n.cfg.DialTimeout)
	defer cancel()
	resp, err := r.cli.Txn(c).If(cond).
		Then(clientv3.OpPut(key, string(val), clientv3.WithLease(r.lease))).
		Else(clientv3.OpGet(key)).
		Commit()
	if err != nil {
		// The outcome is unknown: if the key was created, the next round sees it bound
		// to our lease and adopts or deletes it.
		log.Warn("claim failed", "err", err)
		return false, 0, nil
	}
	if !resp.Succeeded {
		var kv *mvccpb.KeyValue
		if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) == 1 {
			kv = kvs[0]
		}
		return false, resp.Header.Revision, kv
	}
	return true, resp.Header.Revision, nil
}

// deleteOwner deletes the tenant's owner key if it is bound to our lease.
func (r *reconciler) deleteOwner(sctx context.Context, tenant string, log *slog.Logger) (bool, int64) {
	key := r.keys.owner(tenant)
	c, cancel := context.WithTimeout(sctx, r.n.cfg.DialTimeout)
	defer cancel()
	resp, err := r.cli.Txn(c).
		If(clientv3.Compare(clientv3.LeaseValue(key), "=", r.lease)).
		Then(clientv3.OpDelete(key)).
		Commit()
	if err != nil {
		// It stays bound to our lease: deleted in a later round or by the lease's end.
		log.Warn("owner key not deleted", "err", err)
		return false, 0
	}
	return resp.Succeeded, resp.Header.Revision
}

// record applies a job's result to the view and to this node's state.
func (r *reconciler) record(res result) {
	key := r.keys.owner(res.tenant)
	switch {
	case res.owned:
		r.owners[res.tenant] = owner{lease: r.lease, node: r.self}
		r.known[key] = max(r.known[key], res.rev)
	case res.deleted:
		delete(r.owners, res.tenant)
		r.known[key] = max(r.known[key], res.rev)
	case res.taken != nil && res.taken.ModRevision > r.known[key]:
		r.put(res.taken)
	}
	switch res.kind {
	case jobRelease, jobDrop:
		delete(r.held, res.tenant)
	case jobClaim, jobAdopt:
		if res.held {
			r.held[res.tenant] = true
			delete(r.retry, res.tenant)
		}
		if res.err != nil {
			rs := r.retry[res.tenant]
			rs.failures++
			delay := min(r.n.cfg.retryBase<<min(rs.failures-1, 16), retryMax)
			rs.next = time.Now().Add(delay)
			r.retry[res.tenant] = rs
			if r.wake.IsZero() || rs.next.Before(r.wake) {
				r.wake = rs.next
			}
			r.log.Info("tenant retry scheduled", "tenant", res.tenant, "failures", rs.failures, "in", delay)
		}
	}
}

// leave ends the session in order: the node key goes first so the others place without us
// and stand ready, then each tenant is Released and only then its owner key deleted.
func (r *reconciler) leave(sctx context.Context) error {
	if sctx.Err() != nil {
		return nil // lost: the caller had Lost, nothing to release
	}
	var errs []error
	c, cancel := context.WithTimeout(sctx, r.n.cfg.DialTimeout)
	_, err := r.cli.Txn(c).
		If(clientv3.Compare(clientv3.LeaseValue(r.keys.node(r.self)), "=", r.lease)).
		Then(clientv3.OpDelete(r.keys.node(r.self))).
		Commit()
	cancel()
	if err != nil {
		errs = append(errs, fmt.Errorf("cluster: leave: delete node key: %w", err))
	}
	var jobs []job
	for t := range r.held {
		jobs = append(jobs, job{t, jobRelease})
	}
	for t, o := range r.owners {
		if o.lease == r.lease && !r.held[t] {
			jobs = append(jobs, job{t, jobGiveUp})
		}
	}
	r.log.Info("leaving the cluster", "releasing", len(r.held))
	done, cancelDone := context.WithCancel(context.Background())
	cancelDone() // no claims while leaving
	r.runJobs(done, sctx, jobs)
	for _, j := range jobs {
		if j.kind == jobRelease && r.owners[j.tenant].lease == r.lease {
			errs = append(errs, fmt.Errorf("cluster: leave: owner key of %s not deleted (it goes with the lease)", j.tenant))
		}
	}
	return errors.Join(errs...)
}
