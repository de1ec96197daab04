package netnsmux

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// fdTableSize is how far New grows the fd table up front: the kernel doubles the table as fds
// are allocated and every doubling of a multi-threaded process waits for an RCU grace period
// (measured: 512 listeners 48-65 ms without, 12-16 ms with). 16384 slots cost 128 KiB once.
const fdTableSize = 16384

// Mux is the registry, the worker pool and the accept loop. Create with New, start with Run.
type Mux struct {
	opts Options
	dir  string
	log  *slog.Logger
	pool *pool

	// Knobs set by tests before Run.
	fallback           bool   // use the pre-6.18 identity scheme (cookie + dev/ino)
	noFanotify         bool   // behave as on a kernel without FAN_MARK_MNTNS
	beforeInotifyDrain func() // called by the epoll loop before it reads inotify events
	// retryScheduled is called by the reconciler when a failed listen is scheduled for another
	// try delay after failedAt (the time the next try is measured from).
	retryScheduled func(name, addr string, failedAt time.Time, delay time.Duration)

	kick      chan struct{} // cap 1: "something changed, rescan"
	acceptq   chan *Conn
	done      chan struct{} // closed when the Mux shuts down
	closeOnce sync.Once
	runExited chan struct{}
	// startedCh is closed after Run's first reconcile pass (or when Run returns, or on Close
	// without Run).
	startedCh   chan struct{}
	startedOnce sync.Once
	rewatch     atomic.Bool // the watched directory went away: re-create and re-watch it
	dirReal     atomicString

	resourceLog everyFew // accept failing for want of fds or memory

	mismatches, overflows atomic.Uint64
	fullPasses            atomic.Uint64 // reconcile passes that looked at every name (tests)
	attachesSeen          atomic.Uint64 // fanotify attaches resolved to a name in dir (tests)
	fanotifyOn            atomic.Bool
	acceptWaiting         atomic.Bool // the epoll loop has a backlog and paused accepting

	mu      sync.Mutex
	running bool
	wanted  map[string]map[string]netip.AddrPort // name -> addr as given -> parsed
	nss     map[string]*nsState                  // written only by the reconciler (under mu)
	byID    map[ID]int                           // held namespace id -> number of names holding it
	tokens  map[uint64]*listener
	nextTok uint64
	conns   map[*Conn]struct{}
	nlisten int

	byMnt map[uint64]string // unique mount id of a held namespace's bind mount -> name

	dirtyMu sync.Mutex
	dirty   map[string]struct{} // names to look at on the next pass
	full    atomic.Bool         // look at every name on the next pass

	// Owned by Run's goroutine.
	epfd, lepfd, wakefd, inofd, fanfd int
	pending                           map[string]time.Time // names seen as placeholder (or unopenable) since
	retrying                          map[string]struct{}  // names with a listener waiting for its retry
}

// nsState is one held namespace handle.
type nsState struct {
	name      string
	fd        int
	id        ID
	dev, ino  uint64 // fallback identity
	mntID     uint64 // unique id of the bind mount the handle was opened through (0: unknown)
	refs      int    // registry + in-flight Do calls; fd closed at 0 (under Mux.mu)
	listeners map[string]*listener
}

type listener struct {
	ns    *nsState
	addr  string
	ap    netip.AddrPort
	token uint64

	mu sync.Mutex // serialises accept with close, so a closed fd number is never accepted on
	fd int        // -1 while not listening

	failures int
	nextTry  time.Time
}

// connTrack is the hidden part of a Conn.
type connTrack struct {
	m    *Mux
	once sync.Once
}

func (c *Conn) close() error {
	if c.track != nil {
		c.track.once.Do(func() {
			m := c.track.m
			m.mu.Lock()
			delete(m.conns, c)
			m.mu.Unlock()
		})
	}
	return c.TCPConn.Close()
}

// newMux, listen, unlisten, accept, do, stats, close and run are New and the Mux methods of
// netnsmux.go, where they are documented.
func newMux(opts Options) (*Mux, error) {
	if opts.Dir == "" {
		opts.Dir = "/run/netns"
	}
	if opts.Workers <= 0 {
		opts.Workers = 2
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.RetryMin <= 0 {
		opts.RetryMin = 50 * time.Millisecond
	}
	if opts.RetryMax <= 0 {
		opts.RetryMax = 5 * time.Second
	}
	if opts.RetryMax < opts.RetryMin {
		opts.RetryMax = opts.RetryMin
	}
	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("netnsmux: dir %q: %w", opts.Dir, err)
	}
	m := &Mux{
		opts: opts, dir: dir, log: opts.Logger,
		kick: make(chan struct{}, 1),
		// Absorbs bursts while the caller's Accept loop is busy. When it is full the epoll loop
		// pauses accepting (back-pressure into the kernel's listen backlogs) but goes on
		// watching the directory; see epollLoop.
		acceptq:   make(chan *Conn, 1024),
		done:      make(chan struct{}),
		runExited: make(chan struct{}),
		startedCh: make(chan struct{}),
		wanted:    map[string]map[string]netip.AddrPort{},
		nss:       map[string]*nsState{},
		byID:      map[ID]int{},
		tokens:    map[uint64]*listener{},
		conns:     map[*Conn]struct{}{},
		nextTok:   tokFirstListener,
		epfd:      -1, lepfd: -1, wakefd: -1, inofd: -1, fanfd: -1,
		pending: map[string]time.Time{}, retrying: map[string]struct{}{},
		byMnt: map[uint64]string{}, dirty: map[string]struct{}{},
	}
	// Done here rather than in Run: one RCU grace period (measured 15 ms on this VM) paid while
	// the program starts, not while hundreds of listeners are being brought up.
	growFDTable(fdTableSize)
	// Without nsfs file handles (before 6.18) the identity comes from socket cookies and (dev,
	// ino) of the path compared with the held fd; see README "Fallback".
	m.pool, err = newPool(opts.Workers, m.log, m.isHeld, !nsfsHandles())
	if err != nil {
		return nil, err
	}
	m.fallback = m.pool.homeIDFromCookie
	return m, nil
}

func (m *Mux) isHeld(id ID) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.byID[id] > 0
}

func validName(name string) error {
	if name == "" || name == "." || name == ".." || strings.ContainsRune(name, '/') {
		return fmt.Errorf("netnsmux: bad namespace name %q", name)
	}
	return nil
}

// parseAddr accepts "ip:port" with a literal IP (an empty host means 0.0.0.0). Host names are
// refused: resolving them would depend on which namespace the resolver runs in.
func parseAddr(addr string) (netip.AddrPort, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("netnsmux: listen address %q: %w", addr, err)
	}
	if host == "" {
		host = "0.0.0.0"
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("netnsmux: listen address %q: host must be a literal IP: %w", addr, err)
	}
	ap, err := netip.ParseAddrPort(net.JoinHostPort(ip.String(), port))
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("netnsmux: listen address %q: %w", addr, err)
	}
	return ap, nil
}

func (m *Mux) listen(name, addr string) error {
	if err := validName(name); err != nil {
		return err
	}
	ap, err := parseAddr(addr)
	if err != nil {
		return err
	}
	if m.closed() {
		return ErrClosed
	}
	m.mu.Lock()
	addrs := m.wanted[name]
	if addrs == nil {
		addrs = map[string]netip.AddrPort{}
		m.wanted[name] = addrs
	}
	addrs[addr] = ap
	m.mu.Unlock()
	m.markDirty(name)
	return nil
}

func (m *Mux) unlisten(name, addr string) {
	m.mu.Lock()
	if addrs := m.wanted[name]; addrs != nil {
		delete(addrs, addr)
		if len(addrs) == 0 {
			delete(m.wanted, name)
		}
	}
	m.mu.Unlock()
	m.markDirty(name)
}

// closed reports whether Close was called or Run's context ended.
func (m *Mux) closed() bool {
	select {
	case <-m.done:
		return true
	default:
		return false
	}
}

// shutdown marks the Mux closed; every later Listen/Accept/Do/Run returns ErrClosed.
func (m *Mux) shutdown() { m.closeOnce.Do(func() { close(m.done) }) }

func (m *Mux) poke() bool {
	select {
	case m.kick <- struct{}{}:
		return true
	default:
		return false
	}
}

func (m *Mux) accept(ctx context.Context) (*Conn, error) {
	// Checked first: once closed, Accept says so even while conns (closed by teardown) are still
	// queued; the select alone would pick at random between them and done.
	if m.closed() {
		return nil, ErrClosed
	}
	select {
	case c := <-m.acceptq:
		if m.acceptWaiting.Load() && m.acceptWaiting.CompareAndSwap(true, false) {
			m.wakeForRoom()
		}
		return c, nil
	case <-m.done:
		return nil, ErrClosed
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (m *Mux) do(ctx context.Context, name string, fn func() error) error {
	if err := validName(name); err != nil {
		return err
	}
	if m.closed() {
		return ErrClosed
	}
	m.mu.Lock()
	ns := m.nss[name]
	if ns != nil {
		ns.refs++
	}
	m.mu.Unlock()
	if ns != nil {
		defer m.unref(ns)
		return m.pool.do(ctx, name, ns.fd, ns.id, fn)
	}
	fd, id, err := openNS(filepath.Join(m.dir, name), m.fallback)
	if err != nil {
		if errors.Is(err, errNotNetns) || errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("netnsmux: %s: %w", name, err)
		}
		return fmt.Errorf("netnsmux: %w", err)
	}
	defer unix.Close(fd)
	return m.pool.do(ctx, name, fd, id, fn)
}

// unref drops one reference to a handle; the last one closes the fd. Under no lock.
func (m *Mux) unref(ns *nsState) {
	m.mu.Lock()
	ns.refs--
	last := ns.refs == 0
	m.mu.Unlock()
	if last {
		unix.Close(ns.fd)
		m.pool.pingAll()
	}
}

func (m *Mux) stats() Stats {
	m.mu.Lock()
	s := Stats{Namespaces: len(m.nss), Listeners: m.nlisten, Conns: len(m.conns)}
	m.mu.Unlock()
	s.Switches = m.pool.switches.Load()
	s.Skips = m.pool.skips.Load()
	s.Discarded = m.pool.discarded.Load()
	s.Mismatches = m.mismatches.Load()
	s.Overflows = m.overflows.Load()
	return s
}

func (m *Mux) close() error {
	m.shutdown()
	m.mu.Lock()
	running := m.running
	m.mu.Unlock()
	if running {
		<-m.runExited
		return nil
	}
	m.markStarted()
	m.pool.close()
	return nil
}

func (m *Mux) started() <-chan struct{} { return m.startedCh }

func (m *Mux) markStarted() { m.startedOnce.Do(func() { close(m.startedCh) }) }

func (m *Mux) run(ctx context.Context) error {
	m.mu.Lock()
	if m.closed() {
		m.mu.Unlock()
		return ErrClosed
	}
	if m.running {
		m.mu.Unlock()
		return errors.New("netnsmux: Run called twice")
	}
	m.running = true
	m.mu.Unlock()
	defer close(m.runExited)
	defer m.markStarted()

	m.full.Store(true)
	if err := m.setup(); err != nil {
		m.shutdown()
		m.teardown()
		return err
	}
	loopDone := make(chan struct{})
	go func() {
		defer close(loopDone)
		m.epollLoop()
	}()

	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		next := m.reconcile(ctx)
		m.markStarted()
		if !next.IsZero() {
			timer.Reset(time.Until(next))
		} else {
			timer.Reset(time.Hour)
		}
		select {
		case <-m.kick:
		case <-timer.C:
		case <-ctx.Done():
		case <-m.done:
		}
		if ctx.Err() != nil {
			m.shutdown()
		}
		if m.closed() {
			m.wake()
			<-loopDone
			m.teardown()
			return nil
		}
	}
}

// growFDTable makes the kernel size the fd table for n fds now, by duplicating an fd to a slot
// near n (F_DUPFD picks the lowest free slot >= n, so no fd is ever clobbered) and closing it.
func growFDTable(n int) {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err == nil && rl.Cur < uint64(n) {
		n = int(rl.Cur) - 1
	}
	if n < 64 {
		return
	}
	src, err := unix.Open("/", unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		return // best effort
	}
	defer unix.Close(src)
	fd, err := unix.FcntlInt(uintptr(src), unix.F_DUPFD_CLOEXEC, n-1)
	if err != nil {
		return
	}
	unix.Close(fd)
}

func reserveFDs(n int) { growFDTable(n) }

// teardown releases everything Run acquired, in an order that never leaves a worker in a
// namespace: handles first (workers get pinged and go home), then the pool (which sends every
// worker home and ends it).
func (m *Mux) teardown() {
	m.mu.Lock()
	var all []*nsState
	for _, ns := range m.nss {
		all = append(all, ns)
	}
	m.mu.Unlock()
	for _, ns := range all {
		m.remove(ns, true)
	}
	m.mu.Lock()
	var stray []*Conn
	for c := range m.conns {
		stray = append(stray, c)
	}
	m.mu.Unlock()
	for _, c := range stray {
		c.Close()
	}
	for {
		select {
		case c := <-m.acceptq:
			c.Close()
			continue
		default:
		}
		break
	}
	m.pool.close()
	// Under mu: Accept may still be in wakeForRoom.
	m.mu.Lock()
	for _, fd := range []*int{&m.inofd, &m.fanfd, &m.wakefd, &m.lepfd, &m.epfd} {
		if *fd >= 0 {
			unix.Close(*fd)
			*fd = -1
		}
	}
	m.mu.Unlock()
}

// remove closes a held namespace's listeners (and, if closeConns, its accepted conns) and
// releases its handle.
func (m *Mux) remove(ns *nsState, closeConns bool) {
	m.mu.Lock()
	if m.nss[ns.name] != ns {
		m.mu.Unlock()
		return // already removed
	}
	delete(m.nss, ns.name)
	if m.byMnt[ns.mntID] == ns.name {
		delete(m.byMnt, ns.mntID)
	}
	if m.byID[ns.id]--; m.byID[ns.id] <= 0 {
		delete(m.byID, ns.id)
	}
	ls := ns.listeners
	ns.listeners = nil
	m.mu.Unlock()
	for _, l := range ls {
		m.closeListener(l)
	}
	if !closeConns {
		m.unref(ns)
		return
	}
	// Matched by (name, id), not by *nsState: a conn accepted before an Unlisten/Listen cycle of
	// the same name belongs to the same namespace and must go with it too.
	m.mu.Lock()
	var victims []*Conn
	for c := range m.conns {
		if c.Namespace == ns.name && c.ID == ns.id {
			victims = append(victims, c)
		}
	}
	m.mu.Unlock()
	for _, c := range victims {
		c.Close()
	}
	m.unref(ns)
}

func (m *Mux) closeListener(l *listener) {
	l.mu.Lock()
	if l.fd >= 0 {
		unix.EpollCtl(m.lepfd, unix.EPOLL_CTL_DEL, l.fd, nil)
		unix.Close(l.fd)
		l.fd = -1
		m.mu.Lock()
		delete(m.tokens, l.token)
		m.nlisten--
		m.mu.Unlock()
	}
	l.mu.Unlock()
}

func (m *Mux) emit(ev Event) {
	if m.opts.OnEvent != nil {
		// The consumer reports the event itself, with context the Mux lacks (the tenant); logging
		// it here too would print every event twice.
		m.opts.OnEvent(ev)
		return
	}
	attrs := []any{"event", ev.Kind.String(), "netns", ev.Namespace, "netns_id", uint64(ev.ID)}
	if ev.OldID != 0 {
		attrs = append(attrs, "old_netns_id", uint64(ev.OldID))
	}
	if ev.Addr != "" {
		attrs = append(attrs, "addr", ev.Addr)
	}
	if ev.Err != nil {
		attrs = append(attrs, "err", ev.Err)
		m.log.Warn("netnsmux: "+ev.Kind.String(), attrs...)
	} else {
		m.log.Debug("netnsmux: "+ev.Kind.String(), attrs...)
	}
}

// atomicString is a string read by the epoll loop and written by the reconciler.
type atomicString struct{ v atomic.Pointer[string] }

func (a *atomicString) Store(s string) { a.v.Store(&s) }
func (a *atomicString) Load() string {
	if p := a.v.Load(); p != nil {
		return *p
	}
	return ""
}

// everyFew lets a recurring condition be logged once per resourceLogEvery, counting the rest.
type everyFew struct {
	mu         sync.Mutex
	last       time.Time
	suppressed int
}

const resourceLogEvery = 5 * time.Second

func (e *everyFew) allow(now time.Time) (suppressed int, ok bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.last.IsZero() && now.Sub(e.last) < resourceLogEvery {
		e.suppressed++
		return 0, false
	}
	n := e.suppressed
	e.last, e.suppressed = now, 0
	return n, true
}
