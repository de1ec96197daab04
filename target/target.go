// Package target is the iSCSI target (RFC 7143) that speaks to initiators over connections it is
// handed, each tagged with the tenant it belongs to. It owns PDU encoding, login and text-key
// negotiation, discovery limited to the tenant's targets, sessions, command windows, R2T/Data-Out,
// Data-In, task management and access control; SCSI semantics live in target/scsi.
//
// It must never: listen or dial by itself, show one tenant anything of another tenant (targets,
// sessions, LUNs), or let one connection's failure or panic affect another connection.
//
// Design, goroutine ownership, limits and measured numbers: README.md.
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

	"nstarget/target/scsi"
)

// Options configure a Server. The zero value is usable.
type Options struct {
	Logger      *slog.Logger  // default slog.Default()
	NopInterval time.Duration // idle time before the target pings a connection; default 5s
	NopTimeout  time.Duration // no answer within this closes the connection; default 30s
	QueueDepth  int           // commands in flight per session (MaxCmdSN window); default 128
	// Policy overrides the negotiation limits offered to initiators (zero: DefaultPolicy()).
	Policy Policy
}

// Server is shared by all tenants: it holds every target and its sessions.
type Server struct {
	opts   Options
	log    *slog.Logger
	policy Policy
	bufs   bufPool

	bufBytes  atomic.Int64 // data buffer bytes held by all connections' tasks
	bufBudget int64        // limit for bufBytes (serverBufBudget; lowered by tests)

	nextNexus atomic.Uint64

	mu       sync.Mutex
	targets  map[*Target]struct{}
	sessions map[sessionKey]*session
	tsihs    map[uint16]*session
	nextTSIH uint16
	conns    map[*conn]struct{}
	closing  bool
}

type sessionKey struct {
	tg        *Target
	initiator string
	isid      [6]byte
}

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
	pol := opts.Policy
	if pol.MaxRecvDataSegmentLength == 0 {
		pol = DefaultPolicy()
	}
	return &Server{
		opts:      opts,
		log:       opts.Logger,
		bufBudget: serverBufBudget,
		policy:    pol,
		targets:   make(map[*Target]struct{}),
		sessions:  make(map[sessionKey]*session),
		tsihs:     make(map[uint16]*session),
		conns:     make(map[*conn]struct{}),
	}
}

// TargetConfig describes one iSCSI target of one tenant.
type TargetConfig struct {
	IQN        string
	Alias      string
	Initiators []string // allow-list of initiator names; empty allows any initiator of the tenant
	LUNs       map[uint64]*scsi.LU
}

// Target is one iSCSI target with its sessions. The same IQN in two tenants is two Targets.
type Target struct {
	srv    *Server
	cfg    TargetConfig
	dev    device
	allow  map[string]bool
	closed atomic.Bool
}

// IQN returns the target's name.
func (tg *Target) IQN() string { return tg.cfg.IQN }

// NewTarget registers a target with the server.
func (s *Server) NewTarget(cfg TargetConfig) (*Target, error) {
	if cfg.IQN == "" {
		return nil, errors.New("target: empty IQN")
	}
	if len(cfg.IQN) > 223 {
		return nil, fmt.Errorf("target %q: name longer than 223 bytes", cfg.IQN)
	}
	return s.newTarget(cfg, scsi.NewDevice(cfg.LUNs))
}

func (s *Server) newTarget(cfg TargetConfig, dev device) (*Target, error) {
	tg := &Target{srv: s, cfg: cfg, dev: dev}
	if len(cfg.Initiators) > 0 {
		tg.allow = make(map[string]bool, len(cfg.Initiators))
		for _, n := range cfg.Initiators {
			tg.allow[n] = true
		}
	}
	s.mu.Lock()
	s.targets[tg] = struct{}{}
	s.mu.Unlock()
	return tg, nil
}

func (tg *Target) allows(initiator string) bool {
	return tg.allow == nil || tg.allow[initiator]
}

// device is what the iSCSI layer needs of a SCSI target device (*scsi.Device); an interface so
// session logic can be unit-tested with a small in-memory device.
type device interface {
	Execute(cmd *scsi.Command) scsi.Result
	LUNReset(lun uint64, nexus *scsi.Nexus) error
	TargetReset(nexus *scsi.Nexus)
	NexusLoss(nexus *scsi.Nexus)
}

// Tenant is what connections of one tenant may see: only these targets are discovered or
// reachable by login.
type Tenant struct {
	Name    string
	Targets []*Target
}

func (t *Tenant) find(iqn string) *Target {
	for _, tg := range t.Targets {
		if tg.cfg.IQN == iqn && !tg.closed.Load() {
			return tg
		}
	}
	return nil
}

// ServeConn speaks iSCSI on c for tenant t until the connection ends, ctx is done, or the
// server shuts down; it closes c before returning. attrs are added to every log line of the
// connection (e.g. namespace and its id). The portal reported by SendTargets is c.LocalAddr(),
// the address the initiator dialled.
func (s *Server) ServeConn(ctx context.Context, c net.Conn, t *Tenant, attrs ...slog.Attr) error {
	cn := newConn(s, c, t, attrs)
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		c.Close()
		return errors.New("target: server shutting down")
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

// CloseTarget ends every session of tg (used when its tenant goes offline) and unregisters it.
func (s *Server) CloseTarget(tg *Target) {
	tg.closed.Store(true)
	s.mu.Lock()
	delete(s.targets, tg)
	var victims []*conn
	for k, ss := range s.sessions {
		if k.tg == tg {
			victims = append(victims, ss.conn)
		}
	}
	s.mu.Unlock()
	for _, c := range victims {
		c.kill()
	}
	for _, c := range victims {
		<-c.done
	}
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

// admit registers a new normal session, reinstating (closing) an older one with the same
// initiator name and ISID on the same target; it returns the session with its TSIH.
func (s *Server) admit(ss *session) (uint16, uint16) {
	key := ss.key
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return 0, 0x0301 // service unavailable
	}
	if ss.tg.closed.Load() {
		s.mu.Unlock()
		return 0, 0x0204 // target removed
	}
	old := s.sessions[key]
	if old != nil {
		delete(s.sessions, key)
		delete(s.tsihs, old.tsih)
	}
	s.mu.Unlock()
	if old != nil {
		ss.conn.log.Info("reinstating session: closing the old one with the same initiator and ISID", "old_tsih", old.tsih)
		old.conn.kill()
		select {
		case <-old.conn.done:
		case <-time.After(10 * time.Second):
			return 0, loginTargetError
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := 0; i < 65536; i++ {
		s.nextTSIH++
		if s.nextTSIH == 0 {
			continue
		}
		if _, used := s.tsihs[s.nextTSIH]; !used {
			break
		}
	}
	ss.tsih = s.nextTSIH
	s.tsihs[ss.tsih] = ss
	s.sessions[key] = ss
	return ss.tsih, 0
}

// release removes ss from the registry if it is still the registered session.
func (s *Server) release(ss *session) {
	s.mu.Lock()
	if s.sessions[ss.key] == ss {
		delete(s.sessions, ss.key)
	}
	if s.tsihs[ss.tsih] == ss {
		delete(s.tsihs, ss.tsih)
	}
	s.mu.Unlock()
}
