// Package netnsmux lets one process accept TCP connections on the same address in many Linux
// network namespaces at once, with no OS thread per namespace.
//
// It owns: discovery of named namespaces in a directory (default /run/netns) by inotify and
// level-triggered rescans; one identity-checked handle per namespace, keyed by the kernel's
// never-reused namespace id (NS_GET_ID); a small pool of locked OS threads that enter a namespace
// with setns only when they are not there already; the listening sockets created inside each
// namespace; and a single epoll loop that accepts on all of them.
//
// It must never: know anything about the protocol spoken on its connections, use mtime, inode
// numbers, fd numbers or NETNSA_NSID as a namespace's identity, leave any goroutine's OS thread
// in a tenant namespace, or call setns on the data path (a socket keeps the namespace it was
// created in).
//
// Importing this package locks the main goroutine to the main OS thread (runtime.LockOSThread
// in init), so that no tenant namespace is ever entered on the main thread; see pool_linux.go.
// Design, identity rules, the pre-6.18 fallback and measured numbers: README.md.
//
// This file is the whole exported API, the same on every OS, so importers build anywhere. It
// works on Linux (the _linux.go files); elsewhere New fails with "not supported" (mux_other.go).
package netnsmux

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"
)

// ID is the kernel's 64-bit network namespace id (ioctl NS_GET_ID; equal to SO_NETNS_COOKIE of
// the namespace's sockets). Compare for equality only: it is unique, never reused, not ordered.
type ID uint64

// ErrClosed is returned by Accept and Do after the Mux was closed.
var ErrClosed = errors.New("netnsmux: closed")

// Options configure a Mux. The zero value is usable.
type Options struct {
	Dir      string        // directory of named namespaces; default "/run/netns" (created if missing)
	Workers  int           // locked OS threads that run Do; default 2
	Logger   *slog.Logger  // default slog.Default()
	RetryMin time.Duration // first retry of a failed listen; default 50ms
	RetryMax time.Duration // backoff cap; default 5s
	// OnEvent, if set, is called for every Event, from the Mux's own goroutines. It must not block
	// and must not call back into the Mux.
	OnEvent func(Event)
}

// EventKind says what happened to a namespace or one of its listeners.
type EventKind int

const (
	NamespaceAdded    EventKind = iota + 1 // a wanted name now refers to a live namespace (handle held)
	NamespaceRemoved                       // the name vanished; its listeners and conns are closed
	NamespaceReplaced                      // the name now refers to a different namespace (ID != OldID)
	ListenerUp                             // Addr is accepting inside Namespace
	ListenerFailed                         // listening on Addr inside Namespace failed; Err says why; retried
)

func (k EventKind) String() string {
	switch k {
	case NamespaceAdded:
		return "namespace-added"
	case NamespaceRemoved:
		return "namespace-removed"
	case NamespaceReplaced:
		return "namespace-replaced"
	case ListenerUp:
		return "listener-up"
	case ListenerFailed:
		return "listener-failed"
	}
	return fmt.Sprintf("EventKind(%d)", int(k))
}

// Event is reported to Options.OnEvent.
type Event struct {
	Kind      EventKind
	Namespace string
	ID        ID
	OldID     ID     // NamespaceReplaced only
	Addr      string // Listener* only
	Err       error
}

// Conn is an accepted connection, tagged with the namespace it arrived in. Closing it is the
// receiver's job; the Mux also closes it when its namespace is removed or replaced, or on Close.
// Close it through (*Conn).Close (not the embedded TCPConn) so the Mux forgets it.
type Conn struct {
	*net.TCPConn
	Namespace  string // the name under Options.Dir
	ID         ID     // identity of that namespace; equals the socket's SO_NETNS_COOKIE
	ListenAddr string // the address as given to Listen (LocalAddr() is the address the client dialled)

	track *connTrack // lets Close tell the Mux the conn is gone
}

// Stats are cumulative counters and current gauges.
type Stats struct {
	Switches   uint64 // setns calls made by the worker pool
	Skips      uint64 // Do calls that found their thread already in the namespace
	Namespaces int    // handles currently held
	Listeners  int    // listening sockets currently open
	Conns      int    // accepted conns not yet closed

	// Added by the implementation.
	Mismatches uint64 // accepted sockets whose SO_NETNS_COOKIE differed from their listener's namespace (closed)
	Overflows  uint64 // IN_Q_OVERFLOW events seen (each triggered a full rescan)
	Discarded  uint64 // worker threads discarded because switching back home failed
}

// Close closes the connection and forgets it.
func (c *Conn) Close() error { return c.close() }

// ReserveFDs sizes this process's fd table for n descriptors now (n <= 0: the 16384 New uses),
// capped by RLIMIT_NOFILE. Every doubling of the table of a multi-threaded process waits for an
// RCU grace period (~15 ms measured), so a program that opens many files before New (a server
// opening a volume per tenant) calls this first: one expansion instead of one per doubling.
// New does it too; a table already that large costs nothing more.
func ReserveFDs(n int) {
	if n <= 0 {
		n = fdTableSize
	}
	reserveFDs(n)
}

// New prepares a Mux; nothing is watched until Run. It starts the worker pool (Do works before
// Run); Close releases it.
func New(opts Options) (*Mux, error) { return newMux(opts) }

// Listen asks for a listener on addr ("ip:port") inside the namespace called name, now if it
// exists and whenever it (re)appears. It may be called before or while Run is running.
func (m *Mux) Listen(name, addr string) error { return m.listen(name, addr) }

// Unlisten withdraws a Listen; the listener is closed, accepted conns are left alone. When a
// name has no listeners left its handle is released.
func (m *Mux) Unlisten(name, addr string) { m.unlisten(name, addr) }

// Accept returns the next accepted connection of any namespace.
func (m *Mux) Accept(ctx context.Context) (*Conn, error) { return m.accept(ctx) }

// Do runs fn on a locked OS thread that is inside the named namespace (entering it only if the
// thread is not there already). Use it to create sockets, netlink handles or open /proc/sys/net
// files; never for I/O on existing sockets. fn must not itself call setns or unshare. A name
// nobody Listens on is opened just for this call, and the thread leaves it afterwards.
func (m *Mux) Do(ctx context.Context, name string, fn func() error) error { return m.do(ctx, name, fn) }

// Run watches the directory and accepts connections until ctx is done or Close is called, then
// releases every listener, conn, handle and thread it holds before returning. It returns nil
// after a normal stop and an error only if it could not start. The Mux cannot be run again.
func (m *Mux) Run(ctx context.Context) error { return m.run(ctx) }

// Started is closed once Run has looked at every name Listened on before it started (each
// existing namespace has its listeners up, or their failures reported), or when Run returns.
// A program with more work to do at start-up can wait for it before competing for CPU with
// the bring-up.
func (m *Mux) Started() <-chan struct{} { return m.started() }

// Stats returns the current counters.
func (m *Mux) Stats() Stats { return m.stats() }

// Close stops Run and releases everything; safe to call more than once.
func (m *Mux) Close() error { return m.close() }
