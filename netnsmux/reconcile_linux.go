package netnsmux

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// markDirty asks the reconciler to look at name again. addDirty only records it, for callers
// that poke once after recording many names.
func (m *Mux) markDirty(name string) {
	m.addDirty(name)
	m.poke()
}

func (m *Mux) addDirty(name string) {
	m.dirtyMu.Lock()
	m.dirty[name] = struct{}{}
	m.dirtyMu.Unlock()
}

// reconcile makes the held handles and listeners match (wanted names) x (what the directory says
// now). It is level-triggered: events only say WHICH names to look at (and IN_Q_OVERFLOW, a
// re-watch or an unattributable mount event say "all of them"); what a name is gets re-read from
// the file system every time, so a lost or coalesced event costs a rescan, never a wrong state.
// Placeholders and failed listeners are looked at on every pass until they settle. It runs only
// on Run's goroutine and returns when it next wants to run (zero: only on a kick).
func (m *Mux) reconcile(ctx context.Context) time.Time {
	now := time.Now()
	var next time.Time
	later := func(t time.Time) {
		if next.IsZero() || t.Before(next) {
			next = t
		}
	}
	if m.rewatch.Swap(false) {
		if err := m.addWatch(); err != nil {
			m.log.Warn("netnsmux: re-watching namespace directory", "dir", m.dir, "err", err)
			m.rewatch.Store(true)
			later(now.Add(100 * time.Millisecond))
		}
		m.full.Store(true) // events were lost while the directory was gone
	}
	full := m.full.Swap(false)
	if full {
		m.fullPasses.Add(1)
	}
	m.dirtyMu.Lock()
	dirty := m.dirty
	m.dirty = map[string]struct{}{}
	m.dirtyMu.Unlock()

	// The names to look at.
	m.mu.Lock()
	look := map[string]struct{}{}
	if full {
		for name := range m.wanted {
			look[name] = struct{}{}
		}
		for name := range m.nss {
			look[name] = struct{}{}
		}
	} else {
		for name := range dirty {
			look[name] = struct{}{}
		}
	}
	for name := range m.pending {
		look[name] = struct{}{}
	}
	for name := range m.retrying {
		look[name] = struct{}{}
	}
	type item struct {
		name  string
		addrs map[string]netip.AddrPort // nil: not wanted
		ns    *nsState
	}
	items := make([]item, 0, len(look))
	for name := range look {
		it := item{name: name, ns: m.nss[name]}
		if addrs := m.wanted[name]; addrs != nil {
			it.addrs = make(map[string]netip.AddrPort, len(addrs))
			for a, ap := range addrs {
				it.addrs[a] = ap
			}
		}
		items = append(items, it)
	}
	m.mu.Unlock()

	var jobs []*listener
	var fresh []freshItem
	for _, it := range items {
		name, addrs, ns := it.name, it.addrs, it.ns
		if addrs != nil && ns == nil && !m.fallback {
			// Not held yet (start-up, a new namespace): probed, opened and given its listeners
			// by the workers, in parallel (bringUp).
			fresh = append(fresh, freshItem{name: name, path: filepath.Join(m.dir, name), addrs: addrs})
			continue
		}
		if addrs == nil {
			// Nobody wants the name any more: release quietly (the namespace did not change), and
			// leave its accepted conns alone, as Unlisten promises.
			if ns != nil {
				m.remove(ns, false)
			}
			delete(m.pending, name)
			delete(m.retrying, name)
			continue
		}
		path := filepath.Join(m.dir, name)
		pr, err := probePath(path, m.fallback)
		if err != nil {
			m.log.Warn("netnsmux: probing namespace name", "netns", name, "err", err)
			later(m.retryPending(name, now))
			continue
		}
		switch pr.kind {
		case probeMissing:
			delete(m.pending, name)
			delete(m.retrying, name)
			if ns != nil {
				m.remove(ns, true)
				m.emit(Event{Kind: NamespaceRemoved, Namespace: name, ID: ns.id})
			}
			continue
		case probePlaceholder:
			// `ip netns add` in progress (or a name being re-created): not an error, not served.
			delete(m.retrying, name)
			if ns != nil {
				m.remove(ns, true)
				m.emit(Event{Kind: NamespaceRemoved, Namespace: name, ID: ns.id})
			}
			later(m.retryPending(name, now))
			continue
		}
		if ns == nil || !m.same(ns, pr) {
			nns, err := m.openHandle(ctx, name, path)
			if err != nil {
				if ns != nil {
					// The name no longer refers to what we hold, whatever it is now.
					m.remove(ns, true)
					m.emit(Event{Kind: NamespaceRemoved, Namespace: name, ID: ns.id})
				}
				if !errors.Is(err, errNotNetns) && !errors.Is(err, unix.ENOENT) {
					m.log.Warn("netnsmux: opening namespace", "netns", name, "err", err)
				}
				later(m.retryPending(name, now))
				continue
			}
			if ns != nil && nns.id == ns.id {
				// The name moved away and back between the probe and the open: still the
				// namespace we hold, nothing to replace.
				unix.Close(nns.fd)
			} else {
				ns = m.adopt(name, ns, nns)
			}
		}
		delete(m.pending, name)
		delete(m.retrying, name)

		for addr, l := range ns.listeners {
			if _, ok := addrs[addr]; !ok {
				m.closeListener(l)
				m.mu.Lock()
				delete(ns.listeners, addr)
				m.mu.Unlock()
			}
		}
		for addr, ap := range addrs {
			l := ns.listeners[addr]
			if l == nil {
				l = &listener{ns: ns, addr: addr, ap: ap, fd: -1}
				m.mu.Lock()
				ns.listeners[addr] = l
				m.mu.Unlock()
			}
			l.mu.Lock()
			up := l.fd >= 0
			l.mu.Unlock()
			if up {
				continue
			}
			if now.Before(l.nextTry) {
				m.retrying[name] = struct{}{}
				later(l.nextTry)
				continue
			}
			jobs = append(jobs, l)
		}
	}

	// Listeners of namespaces already held first (a replaced namespace, a retry): they are few,
	// and must not wait behind a bulk of new names (a reload that adds 32 tenants delayed a
	// replaced namespace's listener by 20 ms under the churn benchmark).
	if len(jobs) > 0 {
		errs := m.startListeners(ctx, jobs)
		now = time.Now()
		for i, l := range jobs {
			m.listenOutcome(ctx, l, errs[i], now, later)
		}
	}
	if len(fresh) > 0 {
		// Names that were placeholders before (a namespace being re-created, looked at since
		// its IN_CREATE) go first, ahead of names only just wanted (a reload's new tenants):
		// the first are what a client is waiting for.
		slices.SortStableFunc(fresh, func(a, b freshItem) int {
			_, pa := m.pending[a.name]
			_, pb := m.pending[b.name]
			switch {
			case pa && !pb:
				return -1
			case pb && !pa:
				return 1
			}
			return 0
		})
		m.bringUp(ctx, fresh, later)
	}
	return next
}

// listenOutcome records how creating l's socket went: ListenerUp, or ListenerFailed and the
// next try after an exponential backoff.
func (m *Mux) listenOutcome(ctx context.Context, l *listener, err error, now time.Time, later func(time.Time)) {
	if err == nil {
		l.failures = 0
		l.nextTry = time.Time{}
		m.emit(Event{Kind: ListenerUp, Namespace: l.ns.name, ID: l.ns.id, Addr: l.addr})
		return
	}
	if ctx.Err() != nil {
		return
	}
	d := m.opts.RetryMin << min(l.failures, 20)
	if d > m.opts.RetryMax || d <= 0 {
		d = m.opts.RetryMax
	}
	l.failures++
	l.nextTry = now.Add(d)
	if m.retryScheduled != nil {
		m.retryScheduled(l.ns.name, l.addr, now, d)
	}
	m.retrying[l.ns.name] = struct{}{}
	later(l.nextTry)
	m.emit(Event{Kind: ListenerFailed, Namespace: l.ns.name, ID: l.ns.id, Addr: l.addr, Err: err})
}

// freshItem is a wanted name the registry holds no handle for.
type freshItem struct {
	name, path string
	addrs      map[string]netip.AddrPort
}

// freshResult is what a worker made of a freshItem.
type freshResult struct {
	ran   bool      // the worker got to the step (false: Run is shutting down)
	kind  probeKind // what the name is
	err   error     // opening or identifying it failed (looked at again like a placeholder)
	ns    *nsState  // kind == probeNamespace: the handle, not yet adopted
	ls    []*listener
	fds   []int   // per ls: the listening socket, until registered
	lerrs []error // per ls: nil, or why its socket could not be made or registered
}

// errSkipStep tells the worker a fresh name is not (or no longer) a namespace: nothing to enter.
var errSkipStep = errors.New("not a namespace")

// bringUp serves names the registry holds no handle for: at start-up that is every name, so the
// whole per-namespace path runs on the workers, one batch per worker: look at the name
// (probeHandleAt, which opens nothing), open and identify the handle (openNSHandleAt: two
// system calls), enter it and create each listening socket. Once every batch is done, the
// listeners are checked (cookie) and registered with the epoll loop (one goroutine per batch),
// which may accept on them at once; from then on their handle and conns are the registry's to
// close, and every handle a worker opened is adopted, in order, before this returns, with its
// events.
func (m *Mux) bringUp(ctx context.Context, items []freshItem, later func(time.Time)) {
	// Names are looked up relative to the directory, opened once for the pass (a directory
	// replaced meanwhile is re-watched and every name looked at again).
	dirfd, err := unix.Open(m.dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		dirfd = unix.AT_FDCWD // the names' paths are absolute
	} else {
		defer unix.Close(dirfd)
	}
	rel := func(it *freshItem) string {
		if dirfd == unix.AT_FDCWD {
			return it.path
		}
		return it.name
	}
	res := make([]freshResult, len(items))
	steps := make([]step, len(items))
	for i := range items {
		it, r := &items[i], &res[i]
		steps[i] = step{name: it.name,
			open: func() (int, ID, error) {
				r.ran = true
				pr, err := probeHandleAt(dirfd, rel(it), it.path)
				if err != nil {
					r.err = err
					return -1, 0, errSkipStep
				}
				if r.kind = pr.kind; pr.kind != probeNamespace {
					return -1, 0, errSkipStep
				}
				fd, id, mntID, err := openNSHandleAt(dirfd, rel(it), it.path)
				if err != nil {
					r.err = err
					return -1, 0, errSkipStep
				}
				r.ns = &nsState{name: it.name, fd: fd, id: id, mntID: mntID, refs: 1, listeners: make(map[string]*listener, len(it.addrs))}
				return fd, id, nil
			},
			fn: func() error {
				for addr, ap := range it.addrs {
					fd, err := listenSocket(ap)
					if err != nil {
						err = fmt.Errorf("listen on %s in %s: %w", addr, it.name, err)
					}
					r.ls = append(r.ls, &listener{ns: r.ns, addr: addr, ap: ap, fd: -1})
					r.fds, r.lerrs = append(r.fds, fd), append(r.lerrs, err)
				}
				return nil
			}}
	}
	// The listeners are registered with the epoll loop once every batch has made its sockets:
	// a socket listens (the kernel completes handshakes) from the moment it exists, and
	// accepting on the first ones must not compete for the CPUs with making the rest.
	errs := m.runSteps(ctx, steps, func(lo, hi int) {
		for i := lo; i < hi; i++ {
			r := &res[i]
			for j, l := range r.ls {
				if r.lerrs[j] == nil {
					r.lerrs[j] = m.register(l, r.fds[j])
				}
			}
		}
	})
	now := time.Now()
	for i := range items {
		it, r := &items[i], &res[i]
		if !r.ran {
			continue // Run is shutting down: nothing was opened
		}
		switch {
		case r.err != nil:
			if !errors.Is(r.err, errNotNetns) && !errors.Is(r.err, unix.ENOENT) {
				m.log.Warn("netnsmux: opening namespace", "netns", it.name, "err", r.err)
			}
			later(m.retryPending(it.name, now))
			continue
		case r.kind == probeMissing:
			delete(m.pending, it.name)
			delete(m.retrying, it.name)
			continue
		case r.kind == probePlaceholder:
			// `ip netns add` in progress: not an error, not served.
			delete(m.retrying, it.name)
			later(m.retryPending(it.name, now))
			continue
		}
		ns := m.adopt(it.name, nil, r.ns)
		delete(m.pending, it.name)
		delete(m.retrying, it.name)
		m.mu.Lock()
		for _, l := range r.ls {
			ns.listeners[l.addr] = l
		}
		// Entering the namespace failed (errs[i]): its listeners are tried again like any
		// other that failed.
		for addr, ap := range it.addrs {
			if ns.listeners[addr] == nil {
				l := &listener{ns: ns, addr: addr, ap: ap, fd: -1}
				ns.listeners[addr] = l
				r.ls, r.lerrs = append(r.ls, l), append(r.lerrs, fmt.Errorf("listen on %s in %s: %w", addr, it.name, errs[i]))
			}
		}
		m.mu.Unlock()
		for j, l := range r.ls {
			m.listenOutcome(ctx, l, r.lerrs[j], now, later)
		}
	}
}

// adopt makes nns the handle held for name, replacing old (nil: none). The old namespace's
// listeners and conns are closed before the new handle is installed, so nothing of the old
// namespace is served under the name once the new one is. It returns nns.
func (m *Mux) adopt(name string, old, nns *nsState) *nsState {
	if old != nil {
		m.remove(old, true)
	}
	m.mu.Lock()
	m.nss[name] = nns
	m.byID[nns.id]++
	if nns.mntID != 0 {
		m.byMnt[nns.mntID] = name
	}
	m.mu.Unlock()
	if old != nil {
		m.emit(Event{Kind: NamespaceReplaced, Namespace: name, ID: nns.id, OldID: old.id})
	} else {
		m.emit(Event{Kind: NamespaceAdded, Namespace: name, ID: nns.id})
	}
	return nns
}

// retryPending schedules another look at a name that is a placeholder (or could not be opened).
// With a fanotify mount watch the mount itself kicks a rescan, so the timer is only a safety
// net; without it the timer is what notices the bind mount, so it starts at 1 ms (the
// placeholder window measured 2-4 ms p50, 26 ms max) and backs off for names that stay
// placeholders.
func (m *Mux) retryPending(name string, now time.Time) time.Time {
	since, ok := m.pending[name]
	if !ok {
		since = now
		m.pending[name] = now
	}
	age := now.Sub(since)
	lo, hi, d := time.Millisecond, 500*time.Millisecond, age/8
	if m.fanotifyOn.Load() {
		lo, hi, d = 5*time.Millisecond, 2*time.Second, age/2
	}
	return now.Add(min(max(d, lo), hi))
}

// same reports whether the probe shows the name still refers to the held namespace.
func (m *Mux) same(ns *nsState, pr probeResult) bool {
	if m.fallback {
		return pr.dev == ns.dev && pr.ino == ns.ino
	}
	return pr.id == ns.id
}

// openHandle opens and identity-checks the namespace at path.
func (m *Mux) openHandle(ctx context.Context, name, path string) (*nsState, error) {
	if !m.fallback {
		fd, id, mntID, err := openNSHandle(path)
		if err != nil {
			return nil, err
		}
		return &nsState{name: name, fd: fd, id: id, mntID: mntID, refs: 1, listeners: map[string]*listener{}}, nil
	}
	fd, id, err := openNS(path, m.fallback)
	if err != nil {
		return nil, err
	}
	ns := &nsState{name: name, fd: fd, id: id, refs: 1, listeners: map[string]*listener{}}
	if id == 0 {
		// Pre-6.18: the id is the cookie of a socket made inside the namespace.
		err = m.pool.do(ctx, name, fd, 0, func() error {
			var err error
			ns.id, err = threadNSID()
			return err
		})
		if err == nil && ns.id == 0 {
			err = errors.New("namespace cookie is 0")
		}
		if err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("%s: namespace id from socket cookie: %w", path, err)
		}
	}
	var stx unix.Statx_t
	if err := unix.Statx(fd, "", unix.AT_EMPTY_PATH, unix.STATX_MNT_ID_UNIQUE, &stx); err == nil &&
		stx.Mask&unix.STATX_MNT_ID_UNIQUE != 0 {
		ns.mntID = stx.Mnt_id
	}
	if m.fallback {
		if ns.dev, ns.ino, err = fdDevIno(fd); err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("%s: %w", path, err)
		}
	}
	return ns, nil
}

// startListeners creates the listening sockets of jobs in their (held) namespaces, one batch
// per worker, and registers them with the epoll loop as they are made.
func (m *Mux) startListeners(ctx context.Context, jobs []*listener) []error {
	steps := make([]step, len(jobs))
	ran := make([]bool, len(jobs))
	for i, l := range jobs {
		steps[i] = step{name: l.ns.name, fd: l.ns.fd, id: l.ns.id, fn: func() error {
			ran[i] = true
			fd, err := listenSocket(l.ap)
			if err != nil {
				return fmt.Errorf("listen on %s in %s: %w", l.addr, l.ns.name, err)
			}
			return m.register(l, fd)
		}}
	}
	errs := m.runSteps(ctx, steps, nil)
	for i, l := range jobs {
		if errs[i] != nil && !ran[i] {
			errs[i] = fmt.Errorf("listen on %s in %s: %w", l.addr, l.ns.name, errs[i])
		}
	}
	return errs
}

// runSteps runs steps on the workers, one batch per worker, and returns one error per step.
// after, if set, is called with each batch's bounds once every batch has run (in parallel,
// one goroutine per batch).
func (m *Mux) runSteps(ctx context.Context, steps []step, after func(lo, hi int)) []error {
	errs := make([]error, len(steps))
	nb := min(m.opts.Workers, len(steps))
	per := (len(steps) + nb - 1) / nb
	each := func(fn func(lo, hi int)) {
		if nb == 1 {
			// One namespace at a time (churn): no goroutine to hand the wait to.
			fn(0, len(steps))
			return
		}
		var wg sync.WaitGroup
		for lo := 0; lo < len(steps); lo += per {
			hi := min(lo+per, len(steps))
			wg.Add(1)
			go func() {
				defer wg.Done()
				fn(lo, hi)
			}()
		}
		wg.Wait()
	}
	each(func(lo, hi int) { copy(errs[lo:hi], m.pool.doBatch(ctx, steps[lo:hi])) })
	if after != nil {
		each(after)
	}
	return errs
}

// register checks that a new listening socket is in its namespace and adds it to the epoll set.
func (m *Mux) register(l *listener, fd int) error {
	ns := l.ns
	// The socket must be in the namespace we think we entered: cross-check the cookie.
	cookie, err := socketCookie(fd)
	if err == nil && cookie != ns.id {
		err = fmt.Errorf("listener landed in namespace %d, want %d", cookie, ns.id)
		m.mismatches.Add(1)
	}
	if err != nil {
		unix.Close(fd)
		return fmt.Errorf("listen on %s in %s: %w", l.addr, ns.name, err)
	}
	m.mu.Lock()
	tok := m.nextTok
	m.nextTok++
	m.tokens[tok] = l
	m.mu.Unlock()
	l.mu.Lock()
	l.fd = fd
	l.token = tok
	err = epollCtl(m.lepfd, unix.EPOLL_CTL_ADD, fd, unix.EPOLLIN, tok)
	if err != nil {
		unix.Close(fd)
		l.fd = -1
	}
	l.mu.Unlock()
	m.mu.Lock()
	if err != nil {
		delete(m.tokens, tok)
	} else {
		m.nlisten++
	}
	m.mu.Unlock()
	if err != nil {
		return fmt.Errorf("epoll add listener %s in %s: %w", l.addr, ns.name, err)
	}
	return nil
}

// listenSocket creates a non-blocking listening TCP socket in the calling thread's namespace.
func listenSocket(ap netip.AddrPort) (int, error) {
	ip := ap.Addr()
	family := unix.AF_INET
	if ip.Is6() && !ip.Is4In6() {
		family = unix.AF_INET6
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	fail := func(what string, err error) (int, error) {
		unix.Close(fd)
		return -1, fmt.Errorf("%s: %w", what, err)
	}
	// A listener re-created after a failure or an Unlisten/Listen must not be refused while
	// conns of the old one linger in TIME_WAIT in the same namespace.
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return fail("SO_REUSEADDR", err)
	}
	var sa unix.Sockaddr
	if family == unix.AF_INET {
		sa = &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ip.Unmap().As4()}
	} else {
		v6only := 1
		if ip.IsUnspecified() {
			v6only = 0 // "[::]:port" takes IPv4 too, as Go's net.Listen does
		}
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, v6only); err != nil {
			return fail("IPV6_V6ONLY", err)
		}
		sa = &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ip.As16()}
	}
	if err := unix.Bind(fd, sa); err != nil {
		return fail("bind", err)
	}
	// Large backlog: the one epoll loop accepts for every namespace, so a burst in one waits for
	// its turn (the kernel caps this at net.core.somaxconn).
	if err := unix.Listen(fd, 4096); err != nil {
		return fail("listen", err)
	}
	return fd, nil
}
