package target

import (
	"sync/atomic"
	"time"
)

// resource is one kind of thing a tenant can hold; every holding is counted at three levels:
// the connection that took it (core.held), its tenant (account) and the whole server (ledger).
type resource int

const (
	resConns    resource = iota // open connections, from accept to close
	resSessions                 // logged-in normal sessions
	resCommands                 // SCSI commands from their PDU to their last response byte
	resBytes                    // data buffers, ping echoes and queued text answers
	numResources
)

var resourceNames = [numResources]string{"connections", "sessions", "commands", "buffer bytes"}

func (r resource) String() string { return resourceNames[r] }

// account is one tenant's usage against its limits. Counters are atomic: every connection of
// the tenant takes and gives from its own goroutines.
type account struct {
	used  [numResources]atomic.Int64
	limit [numResources]int64 // > 0
}

// ledger is the server-wide usage. A tenant may grow into capacity nobody uses, up to its own
// limit, but while it holds more than guarantee of a resource it may not take the last
// headroom of the server's limit: that part is kept for tenants within their guaranteed share,
// so a busy tenant can never starve another tenant's next command, connection or session.
type ledger struct {
	used      [numResources]atomic.Int64
	limit     [numResources]int64 // > 0
	guarantee [numResources]int64
	headroom  [numResources]int64
}

// refusal says why a take failed; the zero value means it did not.
type refusal uint8

const (
	granted refusal = iota
	overTenant
	overServer
	overConn
)

func (r refusal) String() string {
	switch r {
	case overTenant:
		return "tenant limit"
	case overServer:
		return "server limit (fair share)"
	case overConn:
		return "connection limit"
	}
	return "granted"
}

func newLedger(limit [numResources]int64) *ledger {
	l := &ledger{limit: limit}
	for r := range numResources {
		// The headroom covers at least one largest command (or a handful of connections),
		// and at most half of the limit so one tenant can still use most of an idle server.
		h := limit[r] / 16
		switch resource(r) {
		case resBytes:
			h = max(h, maxTransfer)
		default:
			h = max(h, 64)
		}
		h = min(h, limit[r]/2)
		l.headroom[r], l.guarantee[r] = h, h
	}
	return l
}

// take reserves n of r for tenant a. Concurrent takes may both be refused near a limit (each
// sees the other's tentative add), never both granted beyond it.
func (l *ledger) take(a *account, r resource, n int64) refusal {
	tu := a.used[r].Add(n)
	if tu > a.limit[r] {
		a.used[r].Add(-n)
		return overTenant
	}
	u := l.used[r].Add(n)
	if u > l.limit[r] || (tu > l.guarantee[r] && l.limit[r]-u < l.headroom[r]) {
		l.used[r].Add(-n)
		a.used[r].Add(-n)
		return overServer
	}
	return granted
}

// give returns n of r taken by tenant a.
func (l *ledger) give(a *account, r resource, n int64) {
	if n == 0 {
		return
	}
	a.used[r].Add(-n)
	l.used[r].Add(-n)
}

// Usage is what is held, of one tenant or of the whole server.
type Usage struct {
	Connections int   `json:"connections"`
	Sessions    int   `json:"sessions"`
	Commands    int   `json:"commands"`
	BufferBytes int64 `json:"buffer_bytes"`
	// FairWindow, of a tenant, is what each of its sessions may have in flight now because
	// other tenants are busy too (fair.go); 0: its whole window.
	FairWindow int `json:"fair_window,omitempty"`
	// FairPace, of a tenant, is how long each of its commands waits before it runs because
	// even one command per session costs more than its share (fair.go); 0: none.
	FairPace time.Duration `json:"fair_pace_ns,omitempty"`
}

func usageOf(c *[numResources]atomic.Int64) Usage {
	return Usage{
		Connections: int(c[resConns].Load()),
		Sessions:    int(c[resSessions].Load()),
		Commands:    int(c[resCommands].Load()),
		BufferBytes: c[resBytes].Load(),
	}
}

// Limits bound what one tenant may hold at once. Zero fields take the server's default.
type Limits struct {
	Connections int   // open connections, discovery and login included
	Sessions    int   // logged-in normal sessions
	Commands    int   // SCSI commands in flight over all its sessions
	BufferBytes int64 // data buffers of its commands, ping echoes and queued answers
	// Weight is the tenant's share of the server while other tenants are busy (fair.go),
	// 1..MaxWeight.
	Weight int
}

// DefaultTenantLimits are generous for one tenant's hosts and small against the server.
func DefaultTenantLimits() Limits {
	return Limits{Connections: 1024, Sessions: 1024, Commands: 4096, BufferBytes: 512 << 20, Weight: 1}
}

func (l Limits) orDefault(d Limits) Limits {
	if l.Connections <= 0 {
		l.Connections = d.Connections
	}
	if l.Sessions <= 0 {
		l.Sessions = d.Sessions
	}
	if l.Commands <= 0 {
		l.Commands = d.Commands
	}
	if l.BufferBytes <= 0 {
		l.BufferBytes = d.BufferBytes
	}
	if l.Weight <= 0 {
		l.Weight = d.Weight
	}
	return l
}

func (l Limits) array() [numResources]int64 {
	return [numResources]int64{int64(l.Connections), int64(l.Sessions), int64(l.Commands), l.BufferBytes}
}
