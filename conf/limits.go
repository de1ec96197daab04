package conf

import (
	"fmt"
	"math"
	"net/netip"
	"path/filepath"
	"strconv"
	"time"
)

// Defaults of the [server] keys that bound what tenants may hold. They equal the target
// layer's own defaults (cmd/nstarget's tests check it), so a file that omits them behaves like
// a server built without a file.
const (
	DefaultMaxBuffer   = 2 << 30
	DefaultNopInterval = 5 * time.Second
	DefaultNopTimeout  = 30 * time.Second
	// MaxWeight bounds a tenant's weight, as the target layer does.
	MaxWeight = 1000
	// MinNop and MaxNop bound nop_interval and nop_timeout: faster pings are load, not a
	// liveness check, and a connection silent for more than an hour is not "idle" any more.
	MinNop = 100 * time.Millisecond
	MaxNop = time.Hour
	// maxCount bounds the integer limits so they fit an int everywhere.
	maxCount = math.MaxInt32
)

// Limits bound what one tenant may hold at once ([server.limits], [tenant.limits]);
// cmd/nstarget maps them to target.Limits.
type Limits struct {
	Connections int   // open connections, discovery and login included
	Sessions    int   // logged-in normal sessions
	Commands    int   // SCSI commands in flight over all its sessions
	Buffer      int64 // bytes of data buffers, ping echoes and queued answers
	// Weight is the tenant's share of the server while other tenants are busy (fair_share).
	Weight int
}

// DefaultLimits are a tenant's limits when no file sets them: generous for one tenant's hosts,
// small against the server.
func DefaultLimits() Limits {
	return Limits{Connections: 1024, Sessions: 1024, Commands: 4096, Buffer: 512 << 20, Weight: 1}
}

func defaultServer() Server {
	return Server{
		NetnsDir:    DefaultNetnsDir,
		DataDir:     DefaultDataDir,
		MaxBuffer:   DefaultMaxBuffer,
		NopInterval: DefaultNopInterval,
		NopTimeout:  DefaultNopTimeout,
		Limits:      DefaultLimits(),
		FairShare:   true,
		// Early enough to act on (add capacity, trim volumes) before writes start failing.
		PoolSoftThreshold: 80,
		Backend:           BackendFile,
		// The socket's directory is created 0700 by serve; the socket itself is 0600.
		ControlSocket: DefaultControlSocket,
	}
}

// DefaultControlSocket is where serve listens for status and reload requests.
const DefaultControlSocket = "/run/nstarget/nstarget.sock"

// serverRuntime reads the [server] keys that bound connections and memory.
func (v *validator) serverRuntime(st *table, srv *Server) {
	srv.MaxBuffer = st.bytes("max_buffer", srv.MaxBuffer)
	srv.MaxConnections = st.count("max_connections", srv.MaxConnections, 0)
	srv.FairShare = st.boolean("fair_share", srv.FairShare)
	srv.NopInterval = st.duration("nop_interval", srv.NopInterval)
	srv.NopTimeout = st.duration("nop_timeout", srv.NopTimeout)
	srv.PoolSoftThreshold = st.count("pool_soft_threshold", srv.PoolSoftThreshold, 0)
	if srv.PoolSoftThreshold > 100 {
		v.errorf(st.key("pool_soft_threshold"), "%d is not a percentage of the pool (0..100; 0 turns the warning off)", srv.PoolSoftThreshold)
	}
	if m := st.str("metrics", "", false); m != "" {
		if ap, err := netip.ParseAddrPort(m); err != nil || ap.Port() == 0 {
			v.errorf(st.key("metrics"), "%q is not ip:port (e.g. \"127.0.0.1:9470\"; it serves in the root namespace, unauthenticated)", m)
		}
		srv.Metrics = m
	}
	if _, ok := st.get("control_socket"); ok {
		srv.ControlSocketSet = true
		srv.ControlSocket = st.str("control_socket", srv.ControlSocket, false)
		if !filepath.IsAbs(srv.ControlSocket) {
			v.errorf(st.key("control_socket"), "%q is not an absolute path", srv.ControlSocket)
		}
	}
	if lt := st.sub("limits"); lt != nil {
		srv.Limits = v.limits(lt, srv.Limits)
		v.limitsWithinServer(lt, srv.Limits, srv)
	}
}

// limits reads a limits table; every key it omits keeps its value from def.
func (v *validator) limits(t *table, def Limits) Limits {
	l := Limits{
		Connections: t.count("connections", def.Connections, 1),
		Sessions:    t.count("sessions", def.Sessions, 1),
		Commands:    t.count("commands", def.Commands, 1),
		Buffer:      t.bytes("buffer", def.Buffer),
		Weight:      t.count("weight", def.Weight, 1),
	}
	if l.Weight > MaxWeight {
		v.errorf(t.key("weight"), "%d is outside 1..%d (the tenant's share of the server while other tenants are busy)", l.Weight, MaxWeight)
		l.Weight = def.Weight
	}
	t.done()
	return l
}

// limitsWithinServer reports a tenant limit the server-wide bound makes unreachable: almost
// certainly a unit mistake, and silently capping it would hide that.
func (v *validator) limitsWithinServer(t *table, l Limits, srv *Server) {
	if _, set := t.m["buffer"]; set && l.Buffer > srv.MaxBuffer {
		v.errorf(t.key("buffer"), "%d bytes is more than server.max_buffer (%d bytes) allows all tenants together", l.Buffer, srv.MaxBuffer)
	}
	if _, set := t.m["connections"]; set && srv.MaxConnections > 0 && l.Connections > srv.MaxConnections {
		v.errorf(t.key("connections"), "%d is more than server.max_connections (%d) allows all tenants together", l.Connections, srv.MaxConnections)
	}
}

// count reads an integer in min..maxCount.
func (t *table) count(k string, def, min int) int {
	x, ok := t.get(k)
	if !ok {
		return def
	}
	n, ok := x.(int64)
	switch {
	case !ok:
		t.v.errorf(t.key(k), "must be an integer, not %s", tomlType(x))
	case n < int64(min) || n > maxCount:
		t.v.errorf(t.key(k), "%d is outside %d..%d", n, min, maxCount)
	default:
		return int(n)
	}
	return def
}

// bytes reads an amount of memory: a byte count or a size string like "512MiB".
func (t *table) bytes(k string, def int64) int64 {
	x, ok := t.get(k)
	if !ok {
		return def
	}
	var n int64
	var err error
	switch s := x.(type) {
	case string:
		n, err = ParseBytes(s)
	case int64:
		n, err = checkPositive(strconv.FormatInt(s, 10), s)
	default:
		err = fmt.Errorf("must be a size string like \"512MiB\" or a byte count, not %s", tomlType(x))
	}
	if err != nil {
		t.v.errorf(t.key(k), "%v", err)
		return def
	}
	return n
}

// duration reads a Go duration string ("500ms", "5s", "1m") within MinNop..MaxNop.
func (t *table) duration(k string, def time.Duration) time.Duration {
	x, ok := t.get(k)
	if !ok {
		return def
	}
	s, ok := x.(string)
	if !ok {
		t.v.errorf(t.key(k), "must be a duration string like \"5s\", not %s", tomlType(x))
		return def
	}
	d, err := time.ParseDuration(s)
	switch {
	case err != nil:
		t.v.errorf(t.key(k), "%q is not a duration (e.g. \"500ms\", \"5s\", \"1m\")", s)
	case d < MinNop || d > MaxNop:
		t.v.errorf(t.key(k), "%s is outside %s..%s", s, MinNop, MaxNop)
	default:
		return d
	}
	return def
}
