package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"slices"
	"sync"
	"time"

	"nstarget/cluster"
	"nstarget/conf"
	"nstarget/tenantnet"
)

// A cluster node serves the tenants etcd says it owns. It applies them the way a reload does:
// the node's own file (its [server] and [cluster] keys) followed by the published tenants is
// one configuration, narrowed to the owned tenants, and applyLocked changes only what differs.
// Taking a tenant over fences the previous owner's images (rbdStore opens with Fence) and
// brings the tenant's network up (tenantnet) before the tenant is served. A node keeps a hot
// standby (Standby, [cluster] standby): the images of the tenants it would get if another
// node died stay open without their locks, so a takeover only fences, locks and serves.

// takeoverParallel is how many tenants a node takes over at once: all of a dead node's, so
// that they are claimed together (cluster claims them in a few transactions) and each goes
// on to its images and network as soon as those have room (openParallel, netParallel); the
// reloads that then serve them are batched (applyPending). It is above the goal's 300
// tenants per dead node: with 256, the claims of the last 44 of 300 waited for whole
// takeovers of others to end (6.2 s).
const takeoverParallel = 1024

// openParallel and netParallel bound the images being opened and the networks being made at
// once by the Acquires of a takeover. Each open is a cgo call holding an OS thread for its
// whole duration, and each network is made on threads of its own. Measured on a loaded
// 2-core machine (one memstore OSD, 300 tenants moving): with every open at once each took
// ~2 s and all ~3 s, but in one of two rounds the node lost its own lease in the middle of
// the takeover (its keepalive went unanswered for 1.5 s), and with it every tenant; with 96,
// the same in one round of one; at 48, each open took 0.3-0.5 s and all 3.5-6 s, and the
// lease held in every round. Opening an image is a dozen round trips to the OSDs, which
// bound the rest. With the hot standby a takeover's "open" is only the fence and the lock
// (about half the OSD ops): 300 of them took ~1.4 s at 48, and the lease held.
const (
	openParallel = 48
	netParallel  = 16
)

var (
	openSem = make(chan struct{}, openParallel)
	netSem  = make(chan struct{}, netParallel)
)

// releaseTimeout bounds how long the sessions of a tenant that moves away get to log out:
// the next owner waits for the release, so it is shorter than a reload's retireTimeout.
const releaseTimeout = 3 * time.Second

// clusterNode is serve's cluster.Handler.
type clusterNode struct {
	svc  *service
	log  *slog.Logger
	file string
	own  []byte // the node's file as read at start: its [server] and [cluster] sections

	mu      sync.Mutex
	owned   map[string]bool
	nets    map[string]*tenantnet.Net // by tenant: the networks this node made
	doc     cluster.Doc
	pending []*pending // ready to be served by the next reload (applyPending)
	// preparing counts the Acquires still opening images or making networks: while there
	// are some, a reload waits up to gatherMax for them (see applyPending).
	preparing int
	gathering bool // a timer will call applyPending

	// parsed is the configuration of the document of revision parsedRev: a takeover of
	// hundreds of tenants parses the published set once, not once per tenant.
	parseMu   sync.Mutex
	parsedRev int64
	parsed    *conf.Config

	prof takeoverProfile

	// The hot standby: the images of the tenants this node would be given if another node
	// died (cluster.StandbyHandler), kept open without their locks by the rados client
	// (rbd.Cluster.Prepare) so that a takeover only fences, locks and serves. standbyLoop
	// follows sbWant.
	sbMu      sync.Mutex
	sbWant    map[string]bool // volume names
	sbTenants int
	sbWake    chan struct{}
}

// runClusterNode joins the cluster and serves what it is given until ctx is done, then
// leaves it cleanly (every tenant released, so the others take them without waiting for the
// lease). serve owns the goroutine that runs it.
func runClusterNode(ctx context.Context, svc *service, cfg *conf.Config, log *slog.Logger) error {
	own, err := os.ReadFile(cfg.File)
	if err != nil {
		return err
	}
	n := &clusterNode{svc: svc, log: log, file: cfg.File, own: own, owned: map[string]bool{}, nets: map[string]*tenantnet.Net{},
		sbWake: make(chan struct{}, 1)}
	if rs, ok := svc.store.(*rbdStore); ok && cfg.Cluster.Standby {
		sctx, stop := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			defer close(done)
			n.standbyLoop(sctx, rs)
		}()
		defer func() { stop(); <-done }()
	}
	c := cfg.Cluster
	node, err := cluster.New(cluster.Config{Endpoints: c.Endpoints, Name: c.Name, Address: c.Address, Prefix: c.Prefix,
		LeaseTTL: c.LeaseTTL, Logger: log, Parallel: takeoverParallel}, n)
	if err != nil {
		return err
	}
	log.Info("joining the cluster", "node", c.Name, "endpoints", c.Endpoints, "prefix", c.Prefix, "lease_ttl", c.LeaseTTL, "standby", c.Standby)
	err = node.Run(ctx)
	n.stopAll() // whatever is still held (nothing after a clean leave) goes now
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// configFor is the configuration with the tenants of doc that are in names.
func (n *clusterNode) configFor(doc cluster.Doc, names map[string]bool) (*conf.Config, error) {
	n.parseMu.Lock()
	all := n.parsed
	if all == nil || n.parsedRev != doc.Revision {
		var err error
		if all, err = conf.Parse(n.file, slices.Concat(n.own, []byte("\n"), doc.Body)); err != nil {
			n.parseMu.Unlock()
			return nil, fmt.Errorf("published tenants (revision %d) behind %s: %w", doc.Revision, n.file, err)
		}
		n.parsed, n.parsedRev = all, doc.Revision
	}
	n.parseMu.Unlock()
	cfg := *all
	cfg.Tenants = slices.DeleteFunc(slices.Clone(all.Tenants), func(t *conf.Tenant) bool { return !names[t.Name] })
	return &cfg, nil
}

func (n *clusterNode) Acquire(ctx context.Context, tenant string, doc cluster.Doc) (err error) {
	t0 := n.prof.begin()
	var marks [nStages]time.Time
	defer func() { n.prof.end(n.log, t0, &marks, err) }()
	n.mu.Lock()
	n.preparing++
	n.mu.Unlock()
	queued := false
	defer func() {
		if !queued { // failed before its turn: the others need not wait for it
			n.mu.Lock()
			n.preparing--
			n.mu.Unlock()
			go n.applyPending()
		}
	}()
	one, err := n.configFor(doc, map[string]bool{tenant: true})
	marks[stageParse] = time.Now()
	if err != nil {
		return err
	}
	if len(one.Tenants) != 1 {
		return fmt.Errorf("tenant %s is not in the published set (revision %d)", tenant, doc.Revision)
	}
	tn := one.Tenants[0]
	// What concerns this tenant alone is done first, for several tenants at once, outside
	// the reload lock: fencing and opening its images (the reload below then finds them
	// open, the store shares them) and, at the same time, making its network. The two
	// overlap because they wait on different things (the OSDs; the kernel): the network is
	// no part of the fence (the storage is what the previous owner must no longer touch),
	// and nothing is served before both are done.
	type netResult struct {
		tnet *tenantnet.Net
		err  error
		at   time.Time
	}
	netc := make(chan netResult, 1)
	go func() {
		var r netResult
		if tn.Network != nil {
			spec := *tn.Network
			if spec.Parent == "" {
				spec.Parent = one.Cluster.Uplink
			}
			if spec.Parent == "" {
				r.err = fmt.Errorf("tenant %s: its network names no parent and [cluster] uplink is not set on node %s", tenant, one.Cluster.Name)
			} else {
				netSem <- struct{}{}
				r.tnet, r.err = tenantnet.Up(one.Server.NetnsDir, tn.Netns, spec)
				<-netSem
			}
		}
		r.at = time.Now()
		netc <- r
	}()
	var openErr error
open:
	for _, tc := range tn.Targets {
		for _, l := range tc.LUNs {
			openSem <- struct{}{}
			vol, err := n.svc.store.Open(l.Volume, l.Size)
			<-openSem
			if err != nil {
				openErr = fmt.Errorf("tenant %s: volume %s: %w", tenant, l.Volume, err)
				break open
			}
			defer vol.Close()
		}
	}
	marks[stageOpen] = time.Now()
	nr := <-netc
	tnet := nr.tnet
	marks[stageNet] = nr.at
	if marks[stageNet].Before(marks[stageOpen]) {
		marks[stageNet] = marks[stageOpen] // the profile's stages are consecutive
	}
	if openErr != nil || nr.err != nil {
		if tnet != nil {
			tnet.Down()
		}
		return errors.Join(openErr, nr.err)
	}
	undo := func(err error) error {
		if tnet != nil {
			tnet.Down()
		}
		return err
	}
	p := &pending{tenant: tenant, ctx: ctx, doc: doc, tnet: tnet, done: make(chan error, 1), queued: time.Now()}
	n.mu.Lock()
	n.pending = append(n.pending, p)
	n.preparing--
	queued = true
	n.mu.Unlock()
	n.applyPending()
	if err := <-p.done; err != nil {
		return undo(err)
	}
	marks[stageQueue], marks[stageApply] = p.applying, p.applied
	n.log.Info("tenant taken over", "tenant", tenant, "netns", tn.Netns, "revision", doc.Revision, "took", time.Since(t0))
	return nil
}

// pending is a tenant ready to be served: its images open, its network up.
type pending struct {
	tenant string
	ctx    context.Context
	doc    cluster.Doc
	tnet   *tenantnet.Net
	done   chan error
	queued time.Time

	applying, applied time.Time // the reload that served it (for the profile)
}

// gatherMax is how long a tenant ready to be served waits for the others of its takeover
// still being prepared, so that they share a reload: a reload serving 300 tenants at once
// costs little more than one serving a few, and reloads run one at a time.
const gatherMax = 150 * time.Millisecond

// applyPending serves every tenant that is ready, in one reload: a takeover of hundreds of
// tenants pays a handful of reloads (each costs in proportion to the tenants in force), not
// one per tenant. If the batch is refused, its tenants are tried one by one, so one bad tenant
// fails alone. A tenant whose lease went meanwhile (its ctx) is not served.
//
// While other Acquires are still preparing, the oldest ready tenant waits up to gatherMax for
// them (a timer serves it then; the last of them to be ready serves them all).
func (n *clusterNode) applyPending() {
	n.mu.Lock()
	if len(n.pending) > 0 && n.preparing > 0 {
		if wait := gatherMax - time.Since(n.pending[0].queued); wait > 0 {
			if !n.gathering {
				n.gathering = true
				time.AfterFunc(wait, func() {
					n.mu.Lock()
					n.gathering = false
					n.mu.Unlock()
					n.applyPending()
				})
			}
			n.mu.Unlock()
			return
		}
	}
	n.mu.Unlock()
	n.svc.reloadMu.Lock()
	defer n.svc.reloadMu.Unlock()
	n.mu.Lock()
	batch := n.pending
	n.pending = nil
	n.mu.Unlock()
	batch = slices.DeleteFunc(batch, func(p *pending) bool {
		if err := p.ctx.Err(); err != nil {
			p.done <- err
			return true
		}
		return false
	})
	if len(batch) == 0 {
		return // another Acquire served this one's batch
	}
	if n.serve(batch) == nil {
		return
	}
	for _, p := range batch {
		if err := n.serve([]*pending{p}); err != nil {
			p.done <- fmt.Errorf("tenant %s: %w", p.tenant, err)
		}
	}
}

// serve applies the tenants in force plus batch (reloadMu held) and, if that works, records
// them as owned and tells each Acquire.
func (n *clusterNode) serve(batch []*pending) error {
	began := time.Now()
	doc := batch[0].doc
	n.mu.Lock()
	names := maps.Clone(n.owned)
	n.mu.Unlock()
	for _, p := range batch {
		names[p.tenant] = true
		if p.doc.Revision > doc.Revision {
			doc = p.doc
		}
	}
	cfg, err := n.configFor(doc, names)
	if err == nil {
		_, err = n.svc.applyLocked(cfg, nil)
	}
	if err != nil {
		return err
	}
	n.mu.Lock()
	n.doc = doc
	for _, p := range batch {
		n.owned[p.tenant] = true
		if p.tnet != nil {
			n.nets[p.tenant] = p.tnet
		}
	}
	n.mu.Unlock()
	end := time.Now()
	var nets []*tenantnet.Net
	for _, p := range batch {
		if p.tnet != nil {
			nets = append(nets, p.tnet)
		}
	}
	if len(nets) > 0 {
		go reannounce(nets)
	}
	n.prof.batch(len(batch), end.Sub(began))
	for _, p := range batch {
		p.applying, p.applied = began, end
		p.done <- nil
	}
	return nil
}

// garpRepeats are when, after a reload starts serving a tenant, its gratuitous ARP is sent
// again (tenantnet.Up sent the first when the address came up, before the listener). One
// announcement can be lost: a takeover announces hundreds of addresses at once, through
// queues that drop under load, and an initiator that missed it keeps the dead node's MAC
// until its neighbour entry fails. Measured without a repeat: 1-3 of 300 moved tenants
// accepted their initiator 1-3 s (whole ARP retransmit periods) after they listened.
//
// Only one, and late: every announcement is a broadcast that each of the node's macvlans on
// the same parent receives and processes (bridge mode), so N tenants announcing cost N² ARP
// receptions. perf of a 300-tenant takeover with repeats at 0, 0.3 and 1 s: a quarter of the
// machine's CPU in macvlan_broadcast/arp_process, in the middle of the takeover.
var garpRepeats = []time.Duration{time.Second}

// reannounce sends the repeats of garpRepeats for nets. A network taken down meanwhile (the
// tenant released) refuses, which is fine.
func reannounce(nets []*tenantnet.Net) {
	var slept time.Duration
	for _, at := range garpRepeats {
		time.Sleep(at - slept)
		slept = at
		for _, tn := range nets {
			_ = tn.Announce()
		}
	}
}

// drop stops serving the tenants not in keep, and closes their sessions before it returns
// (giving them until ctx is done to log out), so their images are unlocked when it returns.
func (n *clusterNode) drop(ctx context.Context, keep map[string]bool) {
	n.mu.Lock()
	doc := n.doc
	var gone []string
	for t := range n.owned {
		if !keep[t] {
			gone = append(gone, t)
		}
	}
	n.mu.Unlock()
	if len(gone) == 0 {
		return
	}
	cur := n.svc.current()
	next := *cur
	next.Tenants = slices.DeleteFunc(slices.Clone(cur.Tenants), func(t *conf.Tenant) bool { return !keep[t.Name] })
	if _, err := n.svc.applyLocked(&next, ctx); err != nil {
		n.log.Error("cluster: releasing tenants", "tenants", gone, "revision", doc.Revision, "err", err)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, t := range gone {
		delete(n.owned, t)
		if tnet := n.nets[t]; tnet != nil {
			if err := tnet.Down(); err != nil {
				n.log.Warn("cluster: tenant network not removed", "tenant", t, "err", err)
			}
			delete(n.nets, t)
		}
	}
}

func (n *clusterNode) Release(tenant string) {
	n.svc.reloadMu.Lock()
	defer n.svc.reloadMu.Unlock()
	n.mu.Lock()
	keep := map[string]bool{}
	for t := range n.owned {
		keep[t] = t != tenant
	}
	n.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), releaseTimeout)
	defer cancel()
	n.drop(ctx, keep)
	n.log.Info("tenant released", "tenant", tenant)
}

func (n *clusterNode) Update(doc cluster.Doc) {
	n.svc.reloadMu.Lock()
	defer n.svc.reloadMu.Unlock()
	n.mu.Lock()
	names := maps.Clone(n.owned)
	n.mu.Unlock()
	cfg, err := n.configFor(doc, names)
	if err == nil {
		_, err = n.svc.applyLocked(cfg, nil)
	}
	if err != nil {
		n.log.Error("cluster: the published tenants cannot be applied; the ones in force keep running", "revision", doc.Revision, "err", err)
		return
	}
	n.mu.Lock()
	n.doc = doc
	n.mu.Unlock()
	n.log.Info("cluster: published tenants applied", "revision", doc.Revision)
}

// Lost stops serving everything at once, and gets a new ceph client for what comes next.
func (n *clusterNode) Lost() {
	n.stopAll()
	// Whoever takes the tenants fences this node's rados client; the next tenants this node
	// acquires need a client that is not blocklisted.
	if rs, ok := n.svc.store.(*rbdStore); ok {
		if err := rs.reconnect(); err != nil {
			n.log.Error("cluster: new ceph client", "err", err)
		}
	}
}

// stopAll stops serving every tenant: listeners and connections first, without waiting for
// a reload in progress (an Acquire may be stuck on an unreachable cluster), then the rest.
func (n *clusterNode) stopAll() {
	n.svc.stopServing()
	n.svc.reloadMu.Lock()
	defer n.svc.reloadMu.Unlock()
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // nobody is asked to log out: the lease is gone
	n.drop(ctx, nil)
}

// standbyParallel bounds the standby opens in flight. They are background work: each is a
// dozen round trips to the OSDs that serving and takeovers need more.
const standbyParallel = 4

// Standby is cluster.StandbyHandler: it records which images to keep open for a takeover and
// wakes standbyLoop.
func (n *clusterNode) Standby(tenants []string, doc cluster.Doc) {
	names := make(map[string]bool, len(tenants))
	for _, t := range tenants {
		names[t] = true
	}
	cfg, err := n.configFor(doc, names)
	if err != nil {
		n.log.Warn("cluster: standby: the published tenants cannot be read; standing by for none", "revision", doc.Revision, "err", err)
		cfg = &conf.Config{}
	}
	vols := map[string]bool{}
	for _, tn := range cfg.Tenants {
		for _, tc := range tn.Targets {
			for _, l := range tc.LUNs {
				vols[l.Volume] = true
			}
		}
	}
	n.sbMu.Lock()
	n.sbWant, n.sbTenants = vols, len(cfg.Tenants)
	n.sbMu.Unlock()
	select {
	case n.sbWake <- struct{}{}:
	default:
	}
}

// standbyLoop keeps the rados client's standby handles (rbd.Cluster.Prepare) matching sbWant
// until ctx ends. It yields to takeovers: no standby open starts while an Acquire is
// preparing. Images that cannot be opened yet (their owner has not created them) are tried
// again with backoff. Each pass ends with a "cluster: standby" line saying how many are ready.
func (n *clusterNode) standbyLoop(ctx context.Context, rs *rbdStore) {
	var had map[string]bool // what the last pass stood by for
	var retry <-chan time.Time
	backoff := 500 * time.Millisecond
	for {
		select {
		case <-ctx.Done():
			return
		case <-n.sbWake:
			backoff = 500 * time.Millisecond
		case <-retry:
		}
		retry = nil
		n.sbMu.Lock()
		want, tenants := n.sbWant, n.sbTenants
		n.sbMu.Unlock()
		c := rs.client() // a new one after a lost lease: it stands by for nothing yet
		began := time.Now()
		for v := range had {
			if !want[v] {
				c.Unprepare(v)
			}
		}
		had = want
		sem := make(chan struct{}, standbyParallel)
		var wg sync.WaitGroup
		var mu sync.Mutex
		var missing []string
		for v := range want {
			if ctx.Err() != nil {
				wg.Wait()
				return
			}
			for n.takingOver() && ctx.Err() == nil {
				time.Sleep(50 * time.Millisecond)
			}
			sem <- struct{}{}
			wg.Go(func() {
				defer func() { <-sem }()
				if err := c.Prepare(v); err != nil {
					mu.Lock()
					missing = append(missing, v)
					mu.Unlock()
					n.log.Debug("cluster: standby: image not opened", "volume", v, "err", err)
				}
			})
		}
		wg.Wait()
		n.log.Info("cluster: standby", "tenants", tenants, "images", len(want), "missing", len(missing), "took", time.Since(began))
		if len(missing) > 0 {
			retry = time.After(backoff)
			backoff = min(2*backoff, 30*time.Second)
		}
	}
}

// takingOver is whether Acquires are preparing (opening images, making networks).
func (n *clusterNode) takingOver() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.preparing > 0
}

// The stages of an Acquire, in order, for the takeover profile.
const (
	stageParse = iota // the published set parsed (once per revision) and narrowed
	stageOpen         // the images fenced and opened
	stageNet          // the tenant's network up
	stageQueue        // waiting for the reload that serves it
	stageApply        // that reload
	nStages
)

var stageNames = [nStages]string{"parse", "open", "net", "queue", "apply"}

// takeoverProfile sums up the Acquires that overlap, for a takeover of many tenants: when the
// last one of a run of overlapping Acquires returns, one "takeover profile: acquire" line says,
// per stage, the total and the longest time spent in it and when (from the first Acquire's
// start) the last tenant finished it, plus the reloads that served them.
type takeoverProfile struct {
	mu       sync.Mutex
	inflight int
	run      profileRun
}

// profileRun is one run of overlapping Acquires.
type profileRun struct {
	first    time.Time
	tenants  int
	failed   int
	sum, max [nStages]time.Duration
	last     [nStages]time.Duration
	reloads  int
	biggest  int
	reloadT  time.Duration
}

func (p *takeoverProfile) begin() time.Time {
	now := time.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.inflight == 0 {
		p.run = profileRun{first: now}
	}
	p.inflight++
	return now
}

func (p *takeoverProfile) batch(size int, took time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.run.reloads++
	p.run.biggest = max(p.run.biggest, size)
	p.run.reloadT += took
}

func (p *takeoverProfile) end(log *slog.Logger, t0 time.Time, marks *[nStages]time.Time, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	r := &p.run
	r.tenants++
	if err != nil {
		r.failed++
	}
	prev := t0
	for i, m := range marks {
		if m.IsZero() {
			break
		}
		d := m.Sub(prev)
		r.sum[i] += d
		r.max[i] = max(r.max[i], d)
		r.last[i] = max(r.last[i], m.Sub(r.first))
		prev = m
	}
	if p.inflight--; p.inflight > 0 || r.tenants < 2 {
		return
	}
	attrs := []any{"tenants", r.tenants, "failed", r.failed, "first_at", r.first.UTC().Format(time.RFC3339Nano), "took", time.Since(r.first),
		"reloads", r.reloads, "biggest_reload", r.biggest, "reload_time", r.reloadT}
	for i, name := range stageNames {
		attrs = append(attrs, name, fmt.Sprintf("last %v sum %v max %v", r.last[i].Round(time.Millisecond),
			r.sum[i].Round(time.Millisecond), r.max[i].Round(time.Millisecond)))
	}
	log.Info("takeover profile: acquire", attrs...)
}
