// Package target is the iSCSI target (RFC 7143) that speaks to initiators over connections it is
// handed, each tagged with the tenant it belongs to. It owns PDU encoding, login and text-key
// negotiation, discovery limited to the tenant's targets, sessions, command windows, R2T/Data-Out,
// Data-In, task management and access control; SCSI semantics live in target/scsi.
//
// It must never: listen or dial by itself, show one tenant anything of another tenant (targets,
// sessions, LUNs), let one connection's failure or panic affect another connection, or let one
// tenant hold what another tenant needs: every connection, session, command and buffer byte is
// charged to its tenant, bounded by the tenant's limits and its fair share of the server's, and
// given back on every path.
//
// The session logic is a pure state machine (core) that the connection's I/O edge feeds with
// events. Design, resource ownership, goroutines, limits and measured numbers: README.md.
package target

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"nstarget/target/chap"
	"nstarget/target/iscsiname"
	"nstarget/target/scsi"
)

// ErrRefused wraps the error of a connection that was refused because its tenant, or the
// server, is at a limit; the refusal itself is already logged, rate-limited.
var ErrRefused = errors.New("refused at a limit")

// Options configure a Server. The zero value is usable.
type Options struct {
	Logger      *slog.Logger  // default slog.Default()
	NopInterval time.Duration // idle time before the target pings a connection; default 5s
	// NopTimeout: a connection that completes no PDU for NopInterval+NopTimeout (no answer
	// to pings, or stalled in the middle of a PDU), or writes nothing of what it owes the
	// initiator for NopTimeout, is closed. Default 30s.
	NopTimeout time.Duration
	QueueDepth int // commands in flight per session (MaxCmdSN window); default 128
	// Policy overrides the negotiation limits offered to initiators (zero: DefaultPolicy()).
	Policy Policy
	// TenantLimits apply to every tenant that does not set its own (zero fields:
	// DefaultTenantLimits()).
	TenantLimits Limits
	// MaxBufferBytes bounds data buffers of all tenants together; default 2 GiB.
	MaxBufferBytes int64
	// MaxConnections bounds open connections of all tenants together; default RLIMIT_NOFILE
	// less FDReserve, so accepting never runs the process out of descriptors.
	MaxConnections int
	// FDReserve is how many descriptors are kept free of connections for listeners, volumes
	// and logs when MaxConnections is derived; default 256.
	FDReserve int
	// AuthFailDelay is how long a login that failed authentication waits before its
	// refusal is sent: the same for every failure, so neither timing nor rate tells an
	// attacker which check failed or lets it guess quickly. Default 1s.
	AuthFailDelay time.Duration
	// NoFairShare turns off the fair shares between busy tenants (fair.go).
	NoFairShare bool
}

// Server is shared by all tenants: it holds every tenant, target and session, and the
// ledger that keeps each tenant within its limits and its fair share.
type Server struct {
	opts   Options
	log    *slog.Logger
	policy Policy
	bufs   bufPool
	ledger *ledger
	limits *refusalLog
	fair   *fairShare

	nextNexus  atomic.Uint64
	challenges *challengeLog

	mu       sync.Mutex
	tenants  map[*Tenant]struct{}
	sessions map[sessionKey]*session
	tsihs    map[uint16]*session
	conns    map[*conn]struct{}
	closing  bool
}

const (
	defaultMaxBufferBytes = 2 << 30
	defaultFDReserve      = 256
)

// NewServer makes a Server.
func NewServer(opts Options) *Server {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.NopInterval <= 0 {
		opts.NopInterval = 5 * time.Second
	}
	if opts.NopTimeout <= 0 {
		opts.NopTimeout = 30 * time.Second
	}
	if opts.QueueDepth <= 0 {
		opts.QueueDepth = 128
	}
	if opts.MaxBufferBytes <= 0 {
		opts.MaxBufferBytes = defaultMaxBufferBytes
	}
	if opts.AuthFailDelay <= 0 {
		opts.AuthFailDelay = time.Second
	}
	if opts.FDReserve <= 0 {
		opts.FDReserve = defaultFDReserve
	}
	if opts.MaxConnections <= 0 {
		opts.MaxConnections = max(64, openFileLimit()-opts.FDReserve)
	}
	opts.TenantLimits = opts.TenantLimits.orDefault(DefaultTenantLimits())
	pol := opts.Policy
	if pol.MaxRecvDataSegmentLength == 0 {
		pol = DefaultPolicy()
	}
	conns := int64(opts.MaxConnections)
	return &Server{
		opts:   opts,
		log:    opts.Logger,
		policy: pol,
		// Sessions and commands are bounded per tenant and, through connections and the
		// CmdSN window, per server; their server-wide limits only need to be no tighter.
		ledger:     newLedger([numResources]int64{conns, conns, conns * int64(opts.QueueDepth+maxImmediate), opts.MaxBufferBytes}),
		limits:     newRefusalLog(refusalLogEvery),
		fair:       newFairShare(!opts.NoFairShare, opts.QueueDepth),
		challenges: newChallengeLog(),
		tenants:    make(map[*Tenant]struct{}),
		sessions:   make(map[sessionKey]*session),
		tsihs:      make(map[uint16]*session),
		conns:      make(map[*conn]struct{}),
	}
}

// TargetConfig describes one iSCSI target of one tenant.
type TargetConfig struct {
	IQN        string
	Alias      string
	Initiators []string // allow-list of initiator names; empty allows any initiator of the tenant
	// CHAP, when set, is what an initiator must prove in the security stage; with an
	// allow-list too, both must pass.
	CHAP *chap.Credentials
	LUNs map[uint64]*scsi.LU
}

// Target is one iSCSI target with its sessions. The same IQN in two tenants is two Targets.
type Target struct {
	cfg    TargetConfig
	dev    device
	allow  map[string]bool
	closed atomic.Bool
	// allowLive replaces allow once SetInitiators has been called (a live change).
	allowLive atomic.Pointer[map[string]bool]
	// lunStats are the per-LUN counters, by LUN number; replaced whole when the LUNs change
	// (SetLUNs), keeping the counters of LUNs that stay.
	lunStats atomic.Pointer[map[uint64]*lunCounters]
	// chapLive replaces cfg.CHAP once SetCHAP has been called (a live change).
	chapLive atomic.Pointer[chapSetting]
}

// chapSetting is credentials that may be nil (no CHAP), behind an atomic pointer.
type chapSetting struct{ creds *chap.Credentials }

// credentials is what a login to the target must prove now (nil: nothing).
func (tg *Target) credentials() *chap.Credentials {
	if p := tg.chapLive.Load(); p != nil {
		return p.creds
	}
	return tg.cfg.CHAP
}

// IQN returns the target's name.
func (tg *Target) IQN() string { return tg.cfg.IQN }

// NewTarget makes a target; add it to a Tenant's Targets to serve it.
func (s *Server) NewTarget(cfg TargetConfig) (*Target, error) {
	if err := iscsiname.Check(cfg.IQN); err != nil {
		return nil, fmt.Errorf("target: %w", err)
	}
	return newTarget(cfg, scsi.NewDevice(cfg.LUNs)), nil
}

func newTarget(cfg TargetConfig, dev device) *Target {
	tg := &Target{cfg: cfg, dev: dev}
	tg.setLUNStats(cfg.LUNs)
	if len(cfg.Initiators) > 0 {
		tg.allow = make(map[string]bool, len(cfg.Initiators))
		for _, n := range cfg.Initiators {
			tg.allow[n] = true
		}
	}
	return tg
}

// stats is the target's per-LUN counters.
func (tg *Target) stats() map[uint64]*lunCounters { return *tg.lunStats.Load() }

// setLUNStats makes counters for the LUNs of luns, keeping those of LUNs already counted.
func (tg *Target) setLUNStats(luns map[uint64]*scsi.LU) {
	var old map[uint64]*lunCounters
	if p := tg.lunStats.Load(); p != nil {
		old = *p
	}
	next := make(map[uint64]*lunCounters, len(luns))
	for n := range luns {
		if next[n] = old[n]; next[n] == nil {
			next[n] = new(lunCounters)
		}
	}
	tg.lunStats.Store(&next)
}

func (tg *Target) allows(initiator string) bool {
	allow := tg.allow
	if p := tg.allowLive.Load(); p != nil {
		allow = *p
	}
	return allow == nil || allow[initiator]
}

// device is what the iSCSI layer needs of a SCSI target device (*scsi.Device); an interface so
// session logic can be unit-tested with a small in-memory device.
type device interface {
	Execute(cmd *scsi.Command) scsi.Result
	LUNReset(lun uint64, nexus *scsi.Nexus) error
	TargetReset(nexus *scsi.Nexus)
	NexusLoss(nexus *scsi.Nexus)
	// Attach registers the nexus of a session that logged in (it is told of LUN changes).
	Attach(nexus *scsi.Nexus)
	// SetLUNs replaces the LUN map while sessions run.
	SetLUNs(luns map[uint64]*scsi.LU)
}

// Tenant is what connections of one tenant may see (only these targets are discovered or
// reachable by login) and what they may hold. Make it with Server.NewTenant and set Targets
// before serving it.
type Tenant struct {
	Name    string
	Targets []*Target
	Limits  Limits // resolved: the tenant's own, server defaults filled in
	// DiscoveryCHAP, when set, is what discovery sessions of this tenant must prove.
	DiscoveryCHAP *chap.Credentials
	acct          account
	closed        atomic.Bool
	// discLive replaces DiscoveryCHAP once SetDiscoveryCHAP has been called.
	discLive atomic.Pointer[chapSetting]
	// busyReaders counts the tenant's connections whose input is never drained (conn.go's
	// fair turns); changed when a connection starts or stops being busy, not per command.
	busyReaders atomic.Int32
	// live replaces Targets once SetTargets has been called (a live change).
	live  atomic.Pointer[[]*Target]
	stats tenantCounters
	// fair is the tenant's part of the fair shares (fair.go); its weight is set from
	// Limits.Weight and by SetWeight.
	fair fairState
}

// NewTenant registers a tenant; lim's zero fields take Options.TenantLimits.
func (s *Server) NewTenant(name string, lim Limits) *Tenant {
	t := &Tenant{Name: name, Limits: lim.orDefault(s.opts.TenantLimits)}
	t.acct.limit = t.Limits.array()
	s.SetWeight(t, t.Limits.Weight)
	s.mu.Lock()
	s.tenants[t] = struct{}{}
	s.mu.Unlock()
	return t
}

func (t *Tenant) usage() Usage {
	u := usageOf(&t.acct.used)
	u.FairWindow = int(t.fair.sessWindow.Load())
	u.FairPace = time.Duration(t.fair.pace.Load())
	return u
}

// discoveryCredentials is what a discovery login of the tenant must prove now.
func (t *Tenant) discoveryCredentials() *chap.Credentials {
	if p := t.discLive.Load(); p != nil {
		return p.creds
	}
	return t.DiscoveryCHAP
}

func (t *Tenant) find(iqn string) *Target {
	for _, tg := range t.targets() {
		if tg.cfg.IQN == iqn && !tg.closed.Load() {
			return tg
		}
	}
	return nil
}

// Stats is what is held right now, server-wide and by each tenant (by name).
type Stats struct {
	Total   Usage            `json:"total"`
	Tenants map[string]Usage `json:"tenants"`
}

// Stats reports current holdings.
func (s *Server) Stats() Stats {
	st := Stats{Total: usageOf(&s.ledger.used), Tenants: make(map[string]Usage)}
	s.mu.Lock()
	for t := range s.tenants {
		st.Tenants[t.Name] = t.usage()
	}
	s.mu.Unlock()
	return st
}

// ServeConn speaks iSCSI on c for tenant t until the connection ends, ctx is done, or the
// server shuts down; it closes c before returning. attrs are added to every log line of the
// connection (e.g. namespace and its id). The portal reported by SendTargets is c.LocalAddr(),
// the address the initiator dialled. A connection beyond the tenant's limit or its fair share
// of the server's is closed at once.
func (s *Server) ServeConn(ctx context.Context, c net.Conn, t *Tenant, attrs ...slog.Attr) error {
	if t.closed.Load() {
		c.Close()
		return fmt.Errorf("target: tenant %s is closed", t.Name)
	}
	if r := s.ledger.take(&t.acct, resConns, 1); r != granted {
		c.Close()
		s.refused(s.log.With(slog.String("tenant", t.Name), slog.String("remote", c.RemoteAddr().String())), t, slog.LevelInfo,
			"connection-limit", "connection refused: too many connections", "refused_by", r.String(),
			"tenant_limit", t.acct.limit[resConns])
		return fmt.Errorf("target: tenant %s: connection %w: %s", t.Name, ErrRefused, r)
	}
	cn := newConn(s, c, t, attrs) // gives the connection unit back when it ends
	s.mu.Lock()
	// Checked again under mu: CloseTenant marks the tenant closed, then lists its
	// connections under mu, so a connection is either listed or refused here.
	if s.closing || t.closed.Load() {
		s.mu.Unlock()
		c.Close()
		s.ledger.give(&t.acct, resConns, 1)
		return errors.New("target: server shutting down or tenant closed")
	}
	s.conns[cn] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.conns, cn)
		s.mu.Unlock()
	}()
	return cn.serve(ctx)
}

// Shutdown asks every session to log out (Async Message), waits for them until ctx is done,
// then closes what remains.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closing = true
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.requestLogout()
	}
	var err error
	for _, c := range conns {
		select {
		case <-c.done:
		case <-ctx.Done():
			err = ctx.Err()
			c.kill()
			<-c.done
		}
	}
	return err
}

// refused logs a refusal (a limit reached) at most once per refusalLogEvery per tenant and
// reason, with how many were suppressed since the last line.
func (s *Server) refused(log *slog.Logger, t *Tenant, level slog.Level, reason, msg string, attrs ...any) {
	ok, suppressed := s.limits.allow(t.Name + "\x00" + reason)
	if !ok {
		return
	}
	if suppressed > 0 {
		attrs = append(attrs, "suppressed", suppressed)
	}
	log.Log(context.Background(), level, msg, append(attrs, "reason", reason)...)
}
