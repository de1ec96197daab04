// Package target is the iSCSI target (RFC 7143) that speaks to initiators over connections it is
// handed, each tagged with the tenant it belongs to. It owns PDU encoding, login and text-key
// negotiation, discovery limited to the tenant's targets, sessions, command windows, R2T/Data-Out,
// Data-In, task management and access control; SCSI semantics live in target/scsi.
//
// It must never: listen or dial by itself, show one tenant anything of another tenant (targets,
// sessions, LUNs), or let one connection's failure or panic affect another connection.
//
// THIS FILE IS THE CONTRACT other packages compile against. The implementation replaces the stub
// bodies; exported names and meanings stay (additions are fine).
package target

import (
	"context"
	"log/slog"
	"net"
	"time"

	"nstarget/target/scsi"
)

// Options configure a Server. The zero value is usable.
type Options struct {
	Logger      *slog.Logger  // default slog.Default()
	NopInterval time.Duration // idle time before the target pings a connection; default 5s
	NopTimeout  time.Duration // no answer within this closes the connection; default 30s
	QueueDepth  int           // commands in flight per session (MaxCmdSN window); default 128
}

// Server is shared by all tenants: it holds every target and its sessions.
type Server struct{}

// NewServer makes a Server.
func NewServer(opts Options) *Server { panic("target: not implemented") }

// TargetConfig describes one iSCSI target of one tenant.
type TargetConfig struct {
	IQN        string
	Alias      string
	Initiators []string // allow-list of initiator names; empty allows any initiator of the tenant
	LUNs       map[uint64]*scsi.LU
}

// Target is one iSCSI target with its sessions. The same IQN in two tenants is two Targets.
type Target struct{}

// NewTarget registers a target with the server.
func (s *Server) NewTarget(cfg TargetConfig) (*Target, error) { panic("target: not implemented") }

// Tenant is what connections of one tenant may see: only these targets are discovered or
// reachable by login.
type Tenant struct {
	Name    string
	Targets []*Target
}

// ServeConn speaks iSCSI on c for tenant t until the connection ends, ctx is done, or the
// server shuts down; it closes c before returning. attrs are added to every log line of the
// connection (e.g. namespace and its id). The portal reported by SendTargets is c.LocalAddr(),
// the address the initiator dialled.
func (s *Server) ServeConn(ctx context.Context, c net.Conn, t *Tenant, attrs ...slog.Attr) error {
	panic("target: not implemented")
}

// CloseTarget ends every session of tg (used when its tenant goes offline) and unregisters it.
func (s *Server) CloseTarget(tg *Target) { panic("target: not implemented") }

// Shutdown asks every session to log out (Async Message), waits for them until ctx is done,
// then closes what remains.
func (s *Server) Shutdown(ctx context.Context) error { panic("target: not implemented") }
