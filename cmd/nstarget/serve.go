package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"sync"
	"time"

	"nstarget/backend"
	"nstarget/conf"
	"nstarget/netnsmux"
	"nstarget/target"
	"nstarget/target/scsi"
)

type serveOptions struct {
	Logger *slog.Logger
	// OnEvent, if set, also receives every netnsmux event (after it was logged); it must not block.
	OnEvent func(netnsmux.Event)
	// ShutdownTimeout bounds how long sessions get to log out; default 10s.
	ShutdownTimeout time.Duration
	// OnServer, if set, receives the target server as soon as it exists (e.g. to report its
	// Stats).
	OnServer func(*target.Server)
	// OnMux, if set, receives the namespace mux as soon as it exists: listeners accept (and
	// metrics report them) before the tenants' volumes are open.
	OnMux func(*netnsmux.Mux)
	// OnService, if set, receives the running service once every tenant is set up (to reload
	// it); it must not block.
	OnService func(*service)
	// FDLimit is RLIMIT_NOFILE as the caller already raised it (raiseFDLimit); 0: serve raises
	// it.
	FDLimit uint64
	// Early, if set, is a mux the caller started from a guess at the file's portals
	// (startEarlyMux) while it parsed the file: serve takes it over and makes its listeners
	// those of cfg, or closes it and starts its own when it cannot (another netns_dir).
	Early *earlyMux
}

// earlyMux is the namespace mux `nstarget serve` starts before its configuration is parsed,
// from conf.PeekPortals: a 1024-tenant file takes tens of ms to decode and its listeners as
// long again, and on two CPUs the listeners' workers can use the CPU the parse leaves idle.
// The guess is never trusted: serve listens on what cfg says and drops what it does not, and
// if the file is refused the mux is closed (the process exits 1). Its events wait until serve
// takes it over (they then name tenants of cfg) or are dropped if it is closed first.
type earlyMux struct {
	made    chan struct{} // closed once mux is set (nil: New failed; serve tries again itself)
	mux     *netnsmux.Mux
	dir     string
	listens map[conf.Portal]bool // what mux was asked to listen on
	runCtx  context.Context
	stopRun context.CancelFunc
	runDone chan error

	gate     chan struct{} // closed: events go to deliver, or are dropped if it is nil
	gateOnce sync.Once
	deliver  func(netnsmux.Event)
	adopted  bool
}

// startEarlyMux makes a mux for dir in a goroutine (the fd table's growth waits for an RCU
// grace period), asks it to listen on portals and runs it.
func startEarlyMux(log *slog.Logger, dir string, portals []conf.Portal) *earlyMux {
	e := &earlyMux{made: make(chan struct{}), dir: dir, gate: make(chan struct{}), runDone: make(chan error, 1)}
	go func() {
		defer close(e.made)
		mux, err := netnsmux.New(netnsmux.Options{Dir: dir, Logger: log, OnEvent: func(ev netnsmux.Event) {
			<-e.gate
			if e.deliver != nil {
				e.deliver(ev)
			}
		}})
		if err != nil {
			return
		}
		e.listens = make(map[conf.Portal]bool, len(portals))
		for _, p := range portals {
			if mux.Listen(p.Netns, p.Addr) == nil {
				e.listens[p] = true
			}
		}
		e.runCtx, e.stopRun = context.WithCancel(context.Background())
		go func() { e.runDone <- mux.Run(e.runCtx) }()
		e.mux = mux
	}()
	return e
}

// adopt hands the running mux to serve, whose events from now on go to onEvent; false (and
// the mux closed) if it is not for dir or could not be made.
func (e *earlyMux) adopt(dir string, onEvent func(netnsmux.Event)) bool {
	<-e.made
	if e.mux == nil || e.dir != dir {
		e.close()
		return false
	}
	e.deliver = onEvent
	e.adopted = true
	e.gateOnce.Do(func() { close(e.gate) })
	return true
}

// close stops and closes the mux unless serve adopted it (serve then closes it). Its pending
// events are dropped.
func (e *earlyMux) close() {
	<-e.made
	if e.adopted || e.mux == nil {
		return
	}
	e.gateOnce.Do(func() { close(e.gate) })
	e.mux.Close()
	e.stopRun()
	<-e.runDone
	e.mux = nil
}

// tenantRun is a tenant being served: what the accept loop needs to hand a connection to the
// target layer, and what a reload needs to change it.
type tenantRun struct {
	cfg     *conf.Tenant
	t       *target.Tenant
	targets map[string]*targetRun // by IQN
}

// targetRun is one target being served with the LUs of its LUNs and the volumes they hold
// open. luns changes only under the service's reloadMu and mu.
type targetRun struct {
	tg   *target.Target
	luns map[uint64]lunRun
}

type lunRun struct {
	lu  *scsi.LU
	vol backend.Volume
}

// closeVolumes drops the target's references to its volumes.
func (tr *targetRun) closeVolumes() error {
	var errs []error
	for _, l := range tr.luns {
		errs = append(errs, l.vol.Close())
	}
	return errors.Join(errs...)
}

// luMap is the target's LUN map as the SCSI layer takes it.
func (tr *targetRun) luMap() map[uint64]*scsi.LU {
	m := make(map[uint64]*scsi.LU, len(tr.luns))
	for id, l := range tr.luns {
		m[id] = l.lu
	}
	return m
}

// serve runs every tenant of cfg until ctx is done, then shuts down cleanly: listeners first,
// then sessions (logout requests), then namespaces, then the pool (synced). cfg must have
// passed conf.Load; its volumes are checked here.
//
// Start-up is ordered for a fast bring-up: the namespaces' listeners are brought up by netnsmux's
// workers while this goroutine checks and opens the volumes and makes the targets. A connection
// accepted meanwhile waits, in its own goroutine, until every tenant is built (acceptLoop), so no
// login is answered before the LUNs it could see are open; if the volumes fail, serve returns
// their error and such connections are closed unanswered.
func serve(ctx context.Context, cfg *conf.Config, opts serveOptions) (err error) {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	if opts.ShutdownTimeout <= 0 {
		opts.ShutdownTimeout = 10 * time.Second
	}
	nofile := opts.FDLimit
	if nofile == 0 {
		nofile = raiseFDLimit(log)
	}
	// Before the volumes are opened (one fd each): one fd-table expansion now instead of one
	// RCU grace period per doubling while a thousand volumes open (netnsmux.ReserveFDs).
	netnsmux.ReserveFDs(0)
	store, pool, err := openStore(cfg)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := store.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("close volumes: %w", cerr)
		}
	}()

	srv := target.NewServer(targetOptions(log, cfg.Server, nofile))
	if opts.OnServer != nil {
		opts.OnServer(srv)
	}
	svc := &service{log: log, store: store, pool: pool, srv: srv, cfg: cfg, byNetns: make(map[string]*tenantRun, len(cfg.Tenants)), drained: make(chan struct{})}

	// Events name the tenant; until the tenants are built, from the configuration.
	startNames := make(map[string]string, len(cfg.Tenants))
	for _, tn := range cfg.Tenants {
		startNames[tn.Netns] = tn.Name
	}
	built := make(chan struct{}) // closed once every tenant of cfg is in svc
	tenantOf := func(ns string) string {
		if rt := svc.lookup(ns); rt != nil {
			return rt.t.Name
		}
		select {
		case <-built:
			return ""
		default:
			return startNames[ns]
		}
	}
	onEvent := func(ev netnsmux.Event) {
		logEvent(log, tenantOf(ev.Namespace), ev)
		if opts.OnEvent != nil {
			opts.OnEvent(ev)
		}
	}
	// The mux outlives the accept loop so sessions can still log out after we stop accepting.
	var (
		mux     *netnsmux.Mux
		runCtx  context.Context
		stopRun context.CancelFunc
		runDone chan error
		have    map[conf.Portal]bool // listened on already (by the early mux)
	)
	if e := opts.Early; e != nil && e.adopt(cfg.Server.NetnsDir, onEvent) {
		mux, runCtx, stopRun, runDone, have = e.mux, e.runCtx, e.stopRun, e.runDone, e.listens
	} else {
		mux, err = netnsmux.New(netnsmux.Options{Dir: cfg.Server.NetnsDir, Logger: log, OnEvent: onEvent})
		if err != nil {
			return fmt.Errorf("netnsmux: %w", err)
		}
		runCtx, stopRun = context.WithCancel(context.Background())
	}
	defer stopRun()
	svc.mux = mux
	if opts.OnMux != nil {
		opts.OnMux(mux)
	}
	want := make(map[conf.Portal]bool, len(cfg.Tenants))
	for _, tn := range cfg.Tenants {
		p := conf.Portal{Netns: tn.Netns, Addr: tn.Portal}
		want[p] = true
		if have[p] {
			continue
		}
		if err := mux.Listen(tn.Netns, tn.Portal); err != nil {
			mux.Close()
			if runDone != nil {
				stopRun()
				<-runDone
			}
			return fmt.Errorf("tenant %s: listen %s in netns %s: %w", tn.Name, tn.Portal, tn.Netns, err)
		}
	}
	// What the early mux guessed wrong is dropped; a conn it accepted there meanwhile is
	// closed by the accept loop (no tenant owns the namespace).
	for p := range have {
		if !want[p] {
			mux.Unlisten(p.Netns, p.Addr)
		}
	}
	if runDone == nil {
		runDone = make(chan error, 1)
		go func() { runDone <- mux.Run(runCtx) }()
	}

	acceptCtx, stopAccept := context.WithCancel(ctx)
	defer stopAccept()
	connCtx, stopConns := context.WithCancel(context.Background())
	defer stopConns()
	var conns sync.WaitGroup
	acceptDone := make(chan struct{})
	go func() {
		defer close(acceptDone)
		acceptLoop(acceptCtx, log, mux, srv, svc.lookup, built, connCtx, &conns)
	}()

	// The volumes and targets, while the listeners come up where there are CPUs to spare for
	// both, else once they are (the listeners are what every tenant waits for first; logins
	// wait for the volumes in any case). Nothing is opened unless every volume passes the check
	// (no volume is created or grown for a configuration that fails).
	if runtime.GOMAXPROCS(0) <= 2 {
		<-mux.Started()
	}
	if err := buildTenants(cfg, store, srv, svc); err != nil {
		stopAccept()
		<-acceptDone
		stopConns() // connections waiting for the tenants end unanswered
		conns.Wait()
		mux.Close()
		stopRun()
		<-runDone
		return err
	}
	close(built)

	poolDone := make(chan struct{})
	go func() {
		defer close(poolDone)
		svc.watchPool(runCtx, cfg.Server.PoolSoftThreshold)
	}()
	if opts.OnService != nil {
		opts.OnService(svc)
	}
	// A cluster node leaves the cluster first when it stops: every tenant released, so the
	// other nodes take them over without waiting for this node's lease to expire.
	clusterCtx, stopCluster := context.WithCancel(ctx)
	defer stopCluster()
	clusterDone := make(chan error, 1)
	if cfg.Cluster != nil {
		go func() { clusterDone <- runClusterNode(clusterCtx, svc, cfg, log) }()
	}
	log.Info("serving", "version", version(), "tenants", len(cfg.Tenants), "data_dir", cfg.Server.DataDir, "netns_dir", cfg.Server.NetnsDir,
		"max_buffer", cfg.Server.MaxBuffer, "max_connections", cfg.Server.MaxConnections,
		"nop_interval", cfg.Server.NopInterval, "nop_timeout", cfg.Server.NopTimeout)

	var runErr, clusterErr error
	select {
	case <-ctx.Done():
		log.Info("shutting down", "cause", context.Cause(ctx))
	case runErr = <-runDone:
		runDone <- runErr
		log.Error("namespace multiplexer stopped", "err", runErr)
	case clusterErr = <-clusterDone:
		// Only a node that cannot take part (no etcd, a bad [cluster]) stops on its own.
		clusterDone <- clusterErr
		log.Error("cluster node stopped", "err", clusterErr)
	}
	if cfg.Cluster != nil {
		stopCluster()
		clusterErr = <-clusterDone
	}
	stopAccept()
	<-acceptDone
	// No reload runs from here on, and none is half done.
	svc.reloadMu.Lock()
	defer svc.reloadMu.Unlock()
	for _, tn := range svc.current().Tenants {
		mux.Unlisten(tn.Netns, tn.Portal)
	}
	shCtx, cancel := context.WithTimeout(context.Background(), opts.ShutdownTimeout)
	if err := srv.Shutdown(shCtx); err != nil {
		log.Warn("sessions did not all log out in time", "err", err)
	}
	cancel()
	stopConns()
	conns.Wait()
	close(svc.drained)
	svc.retiring.Wait()
	if err := mux.Close(); err != nil {
		log.Warn("close netnsmux", "err", err)
	}
	stopRun()
	<-poolDone
	if err := <-runDone; err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, netnsmux.ErrClosed) {
		runErr = err
	}
	if runErr != nil {
		return fmt.Errorf("netnsmux: %w", runErr)
	}
	if clusterErr != nil {
		return fmt.Errorf("cluster: %w", clusterErr)
	}
	log.Info("stopped")
	return nil
}

// buildTenant opens the tenant's volumes and registers the tenant, with its limits, and its
// targets. Volumes stay open until the pool is closed.
func buildTenant(store volumeStore, srv *target.Server, tn *conf.Tenant) (*tenantRun, error) {
	rt := &tenantRun{cfg: tn, t: srv.NewTenant(tn.Name, targetLimits(tn.Limits)), targets: make(map[string]*targetRun)}
	rt.t.DiscoveryCHAP = tn.DiscoveryCHAP
	for _, tc := range tn.Targets {
		tr, err := buildTarget(store, srv, tn, tc)
		if err != nil {
			// Undo: nothing of the tenant stays open or registered; the error that matters
			// is err.
			for _, done := range rt.targets {
				done.closeVolumes()
			}
			srv.CloseTenant(context.Background(), rt.t)
			return nil, err
		}
		rt.targets[tc.IQN] = tr
		rt.t.Targets = append(rt.t.Targets, tr.tg)
	}
	return rt, nil
}

// buildTarget opens the volumes of tc's LUNs and makes the target. On failure nothing stays
// open.
func buildTarget(store volumeStore, srv *target.Server, tn *conf.Tenant, tc *conf.Target) (*targetRun, error) {
	tr := &targetRun{luns: make(map[uint64]lunRun, len(tc.LUNs))}
	for _, l := range tc.LUNs {
		lr, err := buildLUN(store, tn, tc, l)
		if err != nil {
			tr.closeVolumes() // the error that matters is err
			return nil, err
		}
		tr.luns[l.ID] = lr
	}
	tg, err := srv.NewTarget(target.TargetConfig{IQN: tc.IQN, Alias: tc.Alias, Initiators: tc.Initiators, CHAP: tc.CHAP, LUNs: tr.luMap()})
	if err != nil {
		tr.closeVolumes()
		return nil, fmt.Errorf("tenant %s: target %s: %w", tn.Name, tc.IQN, err)
	}
	tr.tg = tg
	return tr, nil
}

// buildLUN opens the volume of one LUN and makes its LU; on failure nothing stays open.
func buildLUN(store volumeStore, tn *conf.Tenant, tc *conf.Target, l *conf.LUN) (lunRun, error) {
	vol, err := store.Open(l.Volume, l.Size)
	if err != nil {
		return lunRun{}, fmt.Errorf("tenant %s: target %s: LUN %d: %w", tn.Name, tc.IQN, l.ID, err)
	}
	lu, err := scsi.NewLU(vol, scsi.LUConfig{ReadOnly: l.ReadOnly, WriteCache: l.WriteCache})
	if err != nil {
		vol.Close()
		return lunRun{}, fmt.Errorf("tenant %s: target %s: LUN %d on volume %s: %w", tn.Name, tc.IQN, l.ID, l.Volume, err)
	}
	return lunRun{lu: lu, vol: vol}, nil
}

// buildTenants checks every volume of cfg, then opens them and registers each tenant, with its
// targets, in svc.
func buildTenants(cfg *conf.Config, store volumeStore, srv *target.Server, svc *service) error {
	if err := cfg.CheckVolumes(store.Check); err != nil {
		return indentErrors(err)
	}
	for _, tn := range cfg.Tenants {
		rt, err := buildTenant(store, srv, tn)
		if err != nil {
			return err
		}
		svc.mu.Lock()
		svc.byNetns[tn.Netns] = rt
		svc.mu.Unlock()
	}
	return nil
}

// acceptLoop hands every accepted connection to the target layer under the tenant of the
// namespace it arrived in, until ctx is done. Each connection's goroutine is counted in conns
// and ends when connCtx is done or the connection ends. A connection accepted before built is
// closed waits for it in its goroutine (serve is still opening volumes); if connCtx ends first
// it is closed unanswered.
func acceptLoop(ctx context.Context, log *slog.Logger, mux *netnsmux.Mux, srv *target.Server,
	lookup func(netns string) *tenantRun, built <-chan struct{}, connCtx context.Context, conns *sync.WaitGroup) {
	for {
		c, err := mux.Accept(ctx)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, netnsmux.ErrClosed) {
				return
			}
			log.Warn("accept", "err", err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(50 * time.Millisecond):
			}
			continue
		}
		select {
		case <-built:
		default:
			conns.Add(1)
			go func() {
				defer conns.Done()
				select {
				case <-built:
				case <-connCtx.Done():
					c.Close()
					return
				}
				if rt := tenantFor(log, lookup, c); rt != nil {
					serveConn(log, srv, rt, c, connCtx)
				}
			}()
			continue
		}
		rt := tenantFor(log, lookup, c)
		if rt == nil {
			continue
		}
		conns.Add(1)
		go func() {
			defer conns.Done()
			serveConn(log, srv, rt, c, connCtx)
		}()
	}
}

// tenantFor is the tenant a connection came to, or nil (the connection is then closed).
func tenantFor(log *slog.Logger, lookup func(netns string) *tenantRun, c *netnsmux.Conn) *tenantRun {
	rt := lookup(c.Namespace)
	if rt == nil {
		// Only namespaces we asked to Listen in can produce conns; be strict anyway.
		log.Error("connection from a namespace no tenant owns", "netns", c.Namespace, "netns_id", uint64(c.ID))
		c.Close()
	}
	return rt
}

// serveConn serves one connection of tenant rt until it ends or connCtx is done.
func serveConn(log *slog.Logger, srv *target.Server, rt *tenantRun, c *netnsmux.Conn, connCtx context.Context) {
	// The target layer adds tenant and remote itself; it gets what only we know.
	nsAttrs := []slog.Attr{slog.String("netns", c.Namespace), slog.Uint64("netns_id", uint64(c.ID))}
	attrs := append([]slog.Attr{slog.String("tenant", rt.t.Name), slog.String("remote", c.RemoteAddr().String())}, nsAttrs...)
	log.LogAttrs(connCtx, slog.LevelDebug, "connection accepted", attrs...)
	err := srv.ServeConn(connCtx, c, rt.t, nsAttrs...)
	lv := slog.LevelInfo
	switch {
	case errors.Is(err, target.ErrRefused):
		// The target logged the refusal, rate-limited; a flood must not return here.
		lv = slog.LevelDebug
	case err != nil && !errors.Is(err, context.Canceled):
		lv = slog.LevelWarn
	}
	log.LogAttrs(context.Background(), lv, "connection ended", append(attrs, slog.Any("err", err))...)
}

func logEvent(log *slog.Logger, tenant string, ev netnsmux.Event) {
	attrs := []slog.Attr{
		slog.String("tenant", tenant),
		slog.String("netns", ev.Namespace),
		slog.Uint64("netns_id", uint64(ev.ID)),
	}
	switch ev.Kind {
	case netnsmux.NamespaceAdded:
		log.LogAttrs(context.Background(), slog.LevelInfo, "tenant namespace up", attrs...)
	case netnsmux.NamespaceRemoved:
		log.LogAttrs(context.Background(), slog.LevelWarn, "tenant namespace gone; tenant offline", attrs...)
	case netnsmux.NamespaceReplaced:
		log.LogAttrs(context.Background(), slog.LevelWarn, "tenant namespace replaced; old one dropped",
			append(attrs, slog.Uint64("old_netns_id", uint64(ev.OldID)))...)
	case netnsmux.ListenerUp:
		log.LogAttrs(context.Background(), slog.LevelInfo, "tenant listening", append(attrs, slog.String("portal", ev.Addr))...)
	case netnsmux.ListenerFailed:
		log.LogAttrs(context.Background(), slog.LevelWarn, "tenant listen failed; retrying",
			append(attrs, slog.String("portal", ev.Addr), slog.Any("err", ev.Err))...)
	default:
		log.LogAttrs(context.Background(), slog.LevelDebug, "netnsmux event", append(attrs, slog.Int("kind", int(ev.Kind)))...)
	}
}
