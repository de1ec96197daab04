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
)

// service is what serve runs, as far as a reload needs it: the configuration in force and
// the tenants built from it. Reloads are serialised by reloadMu; mu guards cfg and byNetns
// against the accept loop, status and event logging, which read them.
type service struct {
	log  *slog.Logger
	pool *backend.Pool
	srv  *target.Server
	mux  *netnsmux.Mux

	reloadMu sync.Mutex
	retiring sync.WaitGroup // tenants being taken out of service in the background
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
	if err := cfg.CheckVolumes(s.pool.Check); err != nil {
		return nil, indentErrors(err)
	}
	if err := restartOnly(old, cfg); err != nil {
		return nil, err
	}
	plan, err := s.plan(old, cfg)
	if err != nil {
		return nil, err
	}
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
	check("nop_interval", o.NopInterval == n.NopInterval)
	check("nop_timeout", o.NopTimeout == n.NopTimeout)
	if len(why) > 0 {
		return fmt.Errorf("%s", strings.Join(why, "\n"))
	}
	return nil
}

// reloadPlan is the difference between the configuration in force and the new one.
type reloadPlan struct {
	remove  []*tenantRun
	add     []*conf.Tenant
	built   []*tenantRun // add, built
	changes []tenantChange
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
		if ot.Limits != tn.Limits {
			restart(tn.Line, key+".limits", "limits changed")
		}
		if !ot.DiscoveryCHAP.Equal(tn.DiscoveryCHAP) {
			restart(tn.Line, key+".discovery_chap", "discovery CHAP changed")
		}
		ch := tenantChange{rt: s.byNetns[tn.Netns], cfg: tn, portal: ot.Portal != tn.Portal, addTgts: map[string]*conf.Target{}}
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
				restart(tc.Line, tkey+".chap", "CHAP changed")
			}
			if !sameLUNs(otc.LUNs, tc.LUNs) {
				restart(tc.Line, tkey+".lun", "LUNs changed (live LUN changes are not built yet)")
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
		if ch.portal || ch.targets || len(ch.allow) > 0 {
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

func sameLUNs(a, b []*conf.LUN) bool {
	return slices.EqualFunc(a, b, func(x, y *conf.LUN) bool {
		return x.ID == y.ID && x.Volume == y.Volume && x.Size == y.Size && x.ReadOnly == y.ReadOnly && x.WriteCache == y.WriteCache
	})
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
		}
	}
	for _, tn := range p.add {
		rt, err := buildTenant(s.pool, s.srv, tn)
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
			tr, err := buildTarget(s.pool, s.srv, ch.cfg, tc)
			if err != nil {
				undo()
				return err
			}
			ch.builtTgts[iqn] = tr
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
		s.retiring.Add(1)
		go func() {
			defer s.retiring.Done()
			ctx, cancel := context.WithTimeout(context.Background(), retireTimeout)
			defer cancel()
			closeTenantRun(s, rt, ctx)
		}()
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
