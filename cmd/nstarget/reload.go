package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"nstarget/backend"
	"nstarget/conf"
	"nstarget/netnsmux"
	"nstarget/target"
	"nstarget/target/scsi"
)

// service is what serve runs, as far as a reload needs it: the configuration in force and
// the tenants built from it. Reloads are serialised by reloadMu; mu guards cfg and byNetns
// against the accept loop, status and event logging, which read them.
type service struct {
	log   *slog.Logger
	store volumeStore
	pool  *backend.Pool // the file pool whose fill level is watched; nil for rbd
	srv   *target.Server
	mux   *netnsmux.Mux

	reloadMu sync.Mutex
	retiring sync.WaitGroup // tenants and volumes being taken out of service in the background
	// drained is closed by serve once every session has ended, so that nothing retiring
	// waits any longer.
	drained chan struct{}
	// reloading and reloaded, if set, bracket every reload (systemd's RELOADING=1, READY=1);
	// set before the service is shared.
	reloading, reloaded func()

	mu      sync.RWMutex
	cfg     *conf.Config
	byNetns map[string]*tenantRun
}

// retireTimeout bounds how long the sessions of a removed tenant get to log out.
const retireTimeout = 10 * time.Second

func (s *service) lookup(netns string) *tenantRun {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.byNetns[netns]
}

// lu is the LU serving a tenant's LUN now, or nil.
func (s *service) lu(netns, iqn string, lun uint64) *scsi.LU {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if rt := s.byNetns[netns]; rt != nil {
		if tr := rt.targets[iqn]; tr != nil {
			return tr.luns[lun].lu
		}
	}
	return nil
}

func (s *service) current() *conf.Config {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.cfg
}

// errRestartNeeded marks findings that a reload cannot apply: the file is valid, but only a
// restart can apply it.
var errRestartNeeded = errors.New("needs a restart")

// reload re-reads the file serve was started with and applies the difference. A file that
// fails validation (exactly as check does) or asks for something only a restart can do
// changes nothing; otherwise only what differs is touched: tenants added are served, tenants
// removed are asked to log out and closed after retireTimeout, portals move, targets come and
// go, allow-lists apply to new logins and end the sessions they no longer allow. It returns
// one line per change (none: the file says what already runs).
func (s *service) reload() ([]string, error) {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	if s.reloading != nil {
		s.reloading()
		defer s.reloaded()
	}
	old := s.current()
	cfg, err := conf.Load(old.File)
	if err != nil {
		return nil, indentErrors(err)
	}
	if old.Cluster != nil {
		// A cluster node's tenants come from etcd; its file holds only its own keys.
		if len(cfg.Tenants) > 0 {
			return nil, fmt.Errorf("%s:%d: tenant: a cluster node's file has no tenants: publish them with `nstarget cluster apply`", cfg.File, cfg.Tenants[0].Line)
		}
		cfg.Tenants = old.Tenants
	}
	return s.applyLocked(cfg, nil)
}

// applyLocked makes cfg the configuration in force, touching only what differs (reloadMu
// held). Removed tenants are closed in the background, their sessions given retireTimeout to
// log out; with closeCtx they are closed before it returns, given until closeCtx is done (a
// cluster node's planned release must let go of the volumes before the next owner opens them).
func (s *service) applyLocked(cfg *conf.Config, closeCtx context.Context) ([]string, error) {
	old := s.current()
	// Only volumes the new file names at a new size (or names for the first time) need a
	// check: the others were checked when they were opened, and a check may cost a round
	// trip to the cluster per volume.
	type volume struct {
		name string
		size int64
	}
	inForce := map[volume]bool{}
	for _, tn := range old.Tenants {
		for _, tc := range tn.Targets {
			for _, l := range tc.LUNs {
				inForce[volume{l.Volume, l.Size}] = true
			}
		}
	}
	check := func(name string, size int64) error {
		if inForce[volume{name, size}] {
			return nil
		}
		return s.store.Check(name, size)
	}
	if err := cfg.CheckVolumes(check); err != nil {
		return nil, indentErrors(err)
	}
	if err := restartOnly(old, cfg); err != nil {
		return nil, err
	}
	plan, err := s.plan(old, cfg)
	if err != nil {
		return nil, err
	}
	plan.closeCtx = closeCtx
	if err := plan.build(s); err != nil {
		return nil, err
	}
	return plan.apply(s, cfg), nil
}

// restartOnly reports the keys whose change a running server cannot apply.
func restartOnly(old, cfg *conf.Config) error {
	var why []string
	o, n := old.Server, cfg.Server
	check := func(key string, same bool) {
		if !same {
			why = append(why, fmt.Sprintf("%s: server.%s changed: %v", cfg.File, key, errRestartNeeded))
		}
	}
	check("netns_dir", o.NetnsDir == n.NetnsDir)
	check("data_dir", o.DataDir == n.DataDir)
	check("control_socket", o.ControlSocket == n.ControlSocket)
	check("max_buffer", o.MaxBuffer == n.MaxBuffer)
	check("max_connections", o.MaxConnections == n.MaxConnections)
	check("fair_share", o.FairShare == n.FairShare)
	check("nop_interval", o.NopInterval == n.NopInterval)
	check("nop_timeout", o.NopTimeout == n.NopTimeout)
	check("backend", o.Backend == n.Backend && o.RBD == n.RBD)
	if (old.Cluster == nil) != (cfg.Cluster == nil) || (old.Cluster != nil && !old.Cluster.Same(cfg.Cluster)) {
		why = append(why, fmt.Sprintf("%s: [cluster] changed: %v", cfg.File, errRestartNeeded))
	}
	if len(why) > 0 {
		return fmt.Errorf("%s", strings.Join(why, "\n"))
	}
	return nil
}

// reloadPlan is the difference between the configuration in force and the new one.
type reloadPlan struct {
	closeCtx context.Context // non-nil: close removed tenants before apply returns
	remove   []*tenantRun
	add      []*conf.Tenant
	built    []*tenantRun // add, built
	changes  []tenantChange
}

type tenantChange struct {
	rt        *tenantRun
	cfg       *conf.Tenant
	portal    bool
	targets   bool                    // the target list differs
	addTgts   map[string]*conf.Target // by IQN, to build
	builtTgts map[string]*targetRun
	dropTgts  []*targetRun
	allow     []*targetRun // allow-list changed (the new list is in cfg)
	chap      []*targetRun // CHAP changed (the new credentials are in cfg)
	discovery bool         // discovery CHAP changed
	weight    bool         // limits.weight changed (the only limit a running tenant takes)
	luns      []*lunDiff
}

// lunDiff is what changed in the LUNs of one target that stays.
type lunDiff struct {
	tr    *targetRun
	tc    *conf.Target
	add   []*conf.LUN // new LUN numbers, or a LUN now on another volume
	drop  []uint64    // LUN numbers gone, or on another volume now
	grow  []*conf.LUN // same volume, larger
	ro    []*conf.LUN // read_only changed
	wc    []*conf.LUN // write_cache changed
	built map[uint64]lunRun
}

// diffLUNs compares a target's LUNs; nil when nothing changed.
func diffLUNs(tr *targetRun, tc *conf.Target, old []*conf.LUN) *lunDiff {
	d := &lunDiff{tr: tr, tc: tc}
	byID := make(map[uint64]*conf.LUN, len(old))
	for _, l := range old {
		byID[l.ID] = l
	}
	kept := make(map[uint64]bool, len(tc.LUNs))
	for _, l := range tc.LUNs {
		ol := byID[l.ID]
		kept[l.ID] = ol != nil
		switch {
		case ol == nil:
			d.add = append(d.add, l)
		case ol.Volume != l.Volume:
			d.drop = append(d.drop, l.ID)
			d.add = append(d.add, l)
		default:
			if l.Size > ol.Size {
				d.grow = append(d.grow, l)
			}
			if l.ReadOnly != ol.ReadOnly {
				d.ro = append(d.ro, l)
			}
			if l.WriteCache != ol.WriteCache {
				d.wc = append(d.wc, l)
			}
		}
	}
	for _, l := range old {
		if _, ok := kept[l.ID]; !ok {
			d.drop = append(d.drop, l.ID)
		}
	}
	if len(d.add)+len(d.drop)+len(d.grow)+len(d.ro)+len(d.wc) == 0 {
		return nil
	}
	return d
}

func (s *service) plan(old, cfg *conf.Config) (*reloadPlan, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	p := &reloadPlan{}
	var why []string
	restart := func(line int, key, what string) {
		why = append(why, fmt.Sprintf("%s:%d: %s: %s: %v", cfg.File, line, key, what, errRestartNeeded))
	}
	oldByName := make(map[string]*conf.Tenant, len(old.Tenants))
	for _, tn := range old.Tenants {
		oldByName[tn.Name] = tn
	}
	newByName := make(map[string]bool, len(cfg.Tenants))
	for i, tn := range cfg.Tenants {
		newByName[tn.Name] = true
		ot := oldByName[tn.Name]
		if ot == nil || ot.Netns != tn.Netns {
			// A tenant in another namespace is another tenant to its hosts.
			if ot != nil {
				p.remove = append(p.remove, s.byNetns[ot.Netns])
			}
			p.add = append(p.add, tn)
			continue
		}
		key := fmt.Sprintf("tenant[%d]", i)
		ol, nl := ot.Limits, tn.Limits
		ol.Weight, nl.Weight = 0, 0 // the weight changes live (tenantChange.weight)
		if ol != nl {
			restart(tn.Line, key+".limits", "limits changed")
		}
		ch := tenantChange{rt: s.byNetns[tn.Netns], cfg: tn, portal: ot.Portal != tn.Portal, addTgts: map[string]*conf.Target{},
			discovery: !ot.DiscoveryCHAP.Equal(tn.DiscoveryCHAP), weight: ot.Limits.Weight != tn.Limits.Weight}
		oldTgts := make(map[string]*conf.Target, len(ot.Targets))
		for _, tc := range ot.Targets {
			oldTgts[tc.IQN] = tc
		}
		var order []string
		for j, tc := range tn.Targets {
			order = append(order, tc.IQN)
			otc := oldTgts[tc.IQN]
			if otc == nil {
				ch.addTgts[tc.IQN] = tc
				continue
			}
			tkey := fmt.Sprintf("%s.target[%d]", key, j)
			if otc.Alias != tc.Alias {
				restart(tc.Line, tkey+".alias", "alias changed")
			}
			if !otc.CHAP.Equal(tc.CHAP) {
				ch.chap = append(ch.chap, ch.rt.targets[tc.IQN])
			}
			if d := diffLUNs(ch.rt.targets[tc.IQN], tc, otc.LUNs); d != nil {
				ch.luns = append(ch.luns, d)
			}
			if !slices.Equal(otc.Initiators, tc.Initiators) {
				ch.allow = append(ch.allow, ch.rt.targets[tc.IQN])
			}
		}
		var oldOrder []string
		for _, tc := range ot.Targets {
			oldOrder = append(oldOrder, tc.IQN)
			if !slices.Contains(order, tc.IQN) {
				ch.dropTgts = append(ch.dropTgts, ch.rt.targets[tc.IQN])
			}
		}
		ch.targets = !slices.Equal(order, oldOrder)
		if ch.portal || ch.targets || len(ch.allow) > 0 || len(ch.chap) > 0 || ch.discovery || ch.weight || len(ch.luns) > 0 {
			p.changes = append(p.changes, ch)
		}
	}
	for _, ot := range old.Tenants {
		if !newByName[ot.Name] {
			p.remove = append(p.remove, s.byNetns[ot.Netns])
		}
	}
	if len(why) > 0 {
		return nil, fmt.Errorf("%s", strings.Join(why, "\n"))
	}
	return p, nil
}

// build opens everything new (volumes, targets, tenants) before anything changes, so a volume
// that cannot be opened leaves the running configuration as it was.
func (p *reloadPlan) build(s *service) error {
	undo := func() {
		for _, rt := range p.built {
			closeTenantRun(s, rt, context.Background())
		}
		for _, ch := range p.changes {
			for _, tr := range ch.builtTgts {
				s.closeVolumes(tr)
			}
			for _, d := range ch.luns {
				for _, lr := range d.built {
					lr.vol.Close()
				}
			}
		}
	}
	for _, tn := range p.add {
		rt, err := buildTenant(s.store, s.srv, tn)
		if err != nil {
			undo()
			return err
		}
		p.built = append(p.built, rt)
	}
	for i := range p.changes {
		ch := &p.changes[i]
		ch.builtTgts = make(map[string]*targetRun, len(ch.addTgts))
		for iqn, tc := range ch.addTgts {
			tr, err := buildTarget(s.store, s.srv, ch.cfg, tc)
			if err != nil {
				undo()
				return err
			}
			ch.builtTgts[iqn] = tr
		}
		for _, d := range ch.luns {
			d.built = make(map[uint64]lunRun, len(d.add))
			for _, l := range d.add {
				lr, err := buildLUN(s.store, ch.cfg, d.tc, l)
				if err != nil {
					undo()
					return err
				}
				d.built[l.ID] = lr
			}
		}
	}
	return nil
}

// apply makes the plan so. Removed tenants stop accepting at once and are closed in the
// background (their sessions get retireTimeout to log out), so a reload returns quickly.
func (p *reloadPlan) apply(s *service, cfg *conf.Config) []string {
	var out []string
	s.mu.Lock()
	for _, rt := range p.remove {
		delete(s.byNetns, rt.cfg.Netns)
	}
	for _, rt := range p.built {
		s.byNetns[rt.cfg.Netns] = rt
	}
	s.cfg = cfg
	s.mu.Unlock()

	for _, rt := range p.remove {
		s.mux.Unlisten(rt.cfg.Netns, rt.cfg.Portal)
	}
	for _, rt := range p.remove {
		if p.closeCtx != nil {
			closeTenantRun(s, rt, p.closeCtx)
		} else {
			s.retiring.Add(1)
			go func() {
				defer s.retiring.Done()
				ctx, cancel := context.WithTimeout(context.Background(), retireTimeout)
				defer cancel()
				closeTenantRun(s, rt, ctx)
			}()
		}
		out = append(out, fmt.Sprintf("tenant %s removed (netns %s): its sessions are asked to log out", rt.cfg.Name, rt.cfg.Netns))
	}
	for _, rt := range p.built {
		if err := s.mux.Listen(rt.cfg.Netns, rt.cfg.Portal); err != nil {
			// Only a malformed address fails here, and validation has ruled that out.
			s.log.Error("reload: listen", "tenant", rt.cfg.Name, "netns", rt.cfg.Netns, "portal", rt.cfg.Portal, "err", err)
		}
		out = append(out, fmt.Sprintf("tenant %s added (netns %s, portal %s)", rt.cfg.Name, rt.cfg.Netns, rt.cfg.Portal))
	}
	for _, ch := range p.changes {
		out = append(out, ch.apply(s)...)
	}
	for _, line := range out {
		s.log.Info("reload: " + line)
	}
	return out
}

func (ch *tenantChange) apply(s *service) []string {
	var out []string
	name := ch.cfg.Name
	old := ch.rt.cfg
	if ch.portal {
		s.mux.Unlisten(old.Netns, old.Portal)
		if err := s.mux.Listen(ch.cfg.Netns, ch.cfg.Portal); err != nil {
			s.log.Error("reload: listen", "tenant", name, "portal", ch.cfg.Portal, "err", err)
		}
		out = append(out, fmt.Sprintf("tenant %s: portal %s -> %s", name, old.Portal, ch.cfg.Portal))
	}
	for iqn, tr := range ch.builtTgts {
		ch.rt.targets[iqn] = tr
		out = append(out, fmt.Sprintf("tenant %s: target %s added", name, iqn))
	}
	if ch.targets {
		var tgs []*target.Target
		for _, tc := range ch.cfg.Targets {
			tgs = append(tgs, ch.rt.targets[tc.IQN].tg)
		}
		s.srv.SetTargets(ch.rt.t, tgs) // ends the sessions of dropped targets
	}
	for _, tr := range ch.dropTgts {
		delete(ch.rt.targets, tr.tg.IQN())
		s.closeVolumes(tr)
		out = append(out, fmt.Sprintf("tenant %s: target %s removed", name, tr.tg.IQN()))
	}
	for _, tr := range ch.chap {
		for _, tc := range ch.cfg.Targets {
			if tc.IQN == tr.tg.IQN() {
				s.srv.SetCHAP(tr.tg, tc.CHAP)
				out = append(out, fmt.Sprintf("tenant %s: target %s: CHAP credentials changed (new logins)", name, tc.IQN))
			}
		}
	}
	if ch.weight {
		s.srv.SetWeight(ch.rt.t, ch.cfg.Limits.Weight)
		out = append(out, fmt.Sprintf("tenant %s: weight %d", name, ch.cfg.Limits.Weight))
	}
	if ch.discovery {
		s.srv.SetDiscoveryCHAP(ch.rt.t, ch.cfg.DiscoveryCHAP)
		out = append(out, fmt.Sprintf("tenant %s: discovery CHAP credentials changed (new logins)", name))
	}
	for _, d := range ch.luns {
		out = append(out, d.apply(s, name)...)
	}
	for _, tr := range ch.allow {
		for _, tc := range ch.cfg.Targets {
			if tc.IQN == tr.tg.IQN() {
				s.srv.SetInitiators(tr.tg, tc.Initiators)
				out = append(out, fmt.Sprintf("tenant %s: target %s: allow-list now %d initiators (0: any)", name, tc.IQN, len(tc.Initiators)))
			}
		}
	}
	s.mu.Lock()
	ch.rt.cfg = ch.cfg
	s.mu.Unlock()
	return out
}

// stopServing closes every tenant's listener and connections at once, without waiting for a
// reload in progress; the tenants are then removed by a reload (applyLocked) as usual.
func (s *service) stopServing() {
	s.mu.RLock()
	rts := make([]*tenantRun, 0, len(s.byNetns))
	for _, rt := range s.byNetns {
		rts = append(rts, rt)
	}
	s.mu.RUnlock()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var wg sync.WaitGroup
	for _, rt := range rts {
		s.mux.Unlisten(rt.cfg.Netns, rt.cfg.Portal)
		wg.Go(func() { s.srv.CloseTenant(ctx, rt.t) })
	}
	wg.Wait()
}

// closeTenantRun takes a tenant out of service and closes its volumes once its sessions are
// gone.
func closeTenantRun(s *service, rt *tenantRun, ctx context.Context) {
	s.srv.CloseTenant(ctx, rt.t)
	for _, tr := range rt.targets {
		s.closeVolumes(tr)
	}
}

// closeVolumes closes a target's volumes, logging what fails to close.
func (s *service) closeVolumes(tr *targetRun) {
	if err := tr.closeVolumes(); err != nil {
		s.log.Warn("close volume", "target", tr.tg.IQN(), "err", err)
	}
}

// apply changes one target's LUNs in place: volumes grow and every LU on them says so,
// read_only and write_cache take effect, and the LUN map is swapped with REPORTED LUNS DATA
// HAS CHANGED for the target's sessions. Volumes of removed LUNs are closed once no command
// can still be running on them.
func (d *lunDiff) apply(s *service, tenant string) []string {
	var out []string
	iqn := d.tr.tg.IQN()
	say := func(format string, args ...any) {
		out = append(out, fmt.Sprintf("tenant %s: target %s: ", tenant, iqn)+fmt.Sprintf(format, args...))
	}
	for _, l := range d.grow {
		lr := d.tr.luns[l.ID]
		g, ok := lr.vol.(backend.Grower)
		if !ok {
			say("LUN %d: volume %s cannot grow in place; restart to apply size %d", l.ID, l.Volume, l.Size)
			continue
		}
		if err := g.Grow(l.Size); err != nil {
			s.log.Error("reload: grow volume", "tenant", tenant, "target", iqn, "lun", l.ID, "volume", l.Volume, "err", err)
			say("LUN %d: volume %s NOT grown: %v", l.ID, l.Volume, err)
			continue
		}
		s.resized(l.Volume)
		say("LUN %d: volume %s grown to %d bytes", l.ID, l.Volume, l.Size)
	}
	for _, l := range d.ro {
		d.tr.luns[l.ID].lu.SetReadOnly(l.ReadOnly)
		say("LUN %d: read_only = %v", l.ID, l.ReadOnly)
	}
	for _, l := range d.wc {
		if err := d.tr.luns[l.ID].lu.SetWriteCache(l.WriteCache); err != nil {
			s.log.Error("reload: write cache", "tenant", tenant, "target", iqn, "lun", l.ID, "err", err)
		}
		say("LUN %d: write_cache = %v", l.ID, l.WriteCache)
	}
	if len(d.add)+len(d.drop) == 0 {
		return out
	}
	var retired []backend.Volume
	s.mu.Lock()
	for _, id := range d.drop {
		retired = append(retired, d.tr.luns[id].vol)
		delete(d.tr.luns, id)
	}
	for id, lr := range d.built {
		d.tr.luns[id] = lr
	}
	luns := d.tr.luMap()
	s.mu.Unlock()
	s.srv.SetLUNs(d.tr.tg, luns)
	for _, id := range d.drop {
		say("LUN %d removed", id)
	}
	for _, l := range d.add {
		say("LUN %d added (volume %s)", l.ID, l.Volume)
	}
	s.retireVolumes(retired)
	return out
}

// resized tells every LU on the volume, in every tenant, that it grew.
func (s *service) resized(volume string) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, rt := range s.byNetns {
		for _, tr := range rt.targets {
			for _, lr := range tr.luns {
				if lr.vol.Name() == volume {
					lr.lu.Resized()
				}
			}
		}
	}
}

// retireVolumes closes volumes of removed LUNs in the background: a command that looked its
// LU up just before the swap may still be running, and commands finish within retireTimeout
// (the target's own bound on a stalled connection is shorter), or at shutdown, when every
// session is gone.
func (s *service) retireVolumes(vols []backend.Volume) {
	if len(vols) == 0 {
		return
	}
	s.retiring.Add(1)
	go func() {
		defer s.retiring.Done()
		t := time.NewTimer(retireTimeout)
		defer t.Stop()
		select {
		case <-t.C:
		case <-s.drained:
		}
		for _, v := range vols {
			if err := v.Close(); err != nil {
				s.log.Warn("close volume of a removed LUN", "volume", v.Name(), "err", err)
			}
		}
	}()
}
