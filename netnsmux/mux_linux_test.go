package netnsmux

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const portal = "127.0.0.1:3260"

func TestAddDeleteReplaceWhileServing(t *testing.T) {
	dir := nsDir(t)
	a, b := testPrefix+"-a", testPrefix+"-b"
	pa, pb := filepath.Join(dir, a), filepath.Join(dir, b)
	m, rec := serve(t, dir, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ck := startChecker(ctx, m, true)
	if err := m.Listen(a, portal); err != nil {
		t.Fatal(err)
	}
	if err := m.Listen(b, portal); err != nil {
		t.Fatal(err)
	}

	// add while serving
	idA := mustMakeNS(t, dir, a)
	waitFor(t, patience, "listener up in a", func() bool { return rec.has(ListenerUp, a, idA) })
	if !rec.has(NamespaceAdded, a, idA) {
		t.Fatalf("no NamespaceAdded for %s/%d: %v", a, idA, rec.all())
	}
	ca, gotA, err := ackedDial(pa, portal)
	if err != nil {
		t.Fatal(err)
	}
	defer ca.Close()
	if gotA != idA {
		t.Fatalf("client in a sees id %d, created %d", gotA, idA)
	}
	idB := mustMakeNS(t, dir, b)
	waitFor(t, patience, "listener up in b", func() bool { return rec.has(ListenerUp, b, idB) })
	cb, _, err := ackedDial(pb, portal)
	if err != nil {
		t.Fatal(err)
	}
	defer cb.Close()

	// delete a: its conn is closed by the Mux, b keeps serving
	if err := dropNS(pa); err != nil {
		t.Fatal(err)
	}
	waitFor(t, patience, "removal of a", func() bool { return rec.has(NamespaceRemoved, a, idA) })
	if err := closedByServer(ca); err != nil {
		t.Fatalf("conn of removed namespace: %v", err)
	}
	dialAndCheck(t, pb, idB) // b keeps serving

	// replace b: same name, new namespace
	if err := dropNS(pb); err != nil {
		t.Fatal(err)
	}
	idB2 := mustMakeNS(t, dir, b)
	waitFor(t, patience, "listener up in new b", func() bool { return rec.has(ListenerUp, b, idB2) })
	if idB2 == idB {
		t.Fatal("kernel reused a namespace id")
	}
	// Depending on timing the Mux saw the gap (removed + added) or only the swap (replaced).
	if !rec.replaced(b, idB2, idB) && !(rec.has(NamespaceRemoved, b, idB) && rec.has(NamespaceAdded, b, idB2)) {
		t.Fatalf("no replace of b seen: %v", rec.all())
	}
	if err := closedByServer(cb); err != nil {
		t.Fatalf("conn of replaced namespace: %v", err)
	}
	dialAndCheck(t, pb, idB2)
	if _, bad := ck.counts(); bad != 0 {
		t.Fatalf("%d mismatched tags: %v", bad, ck.mismatches)
	}
	if s := m.Stats(); s.Mismatches != 0 || s.Namespaces != 1 || s.Listeners != 1 {
		t.Fatalf("stats %+v", s)
	}
}

// A name that flips to another namespace in one step (a second bind mount stacked on the name,
// so there is no gap in which it is missing or a placeholder) is reported as Replaced.
func TestReplaceInOneStepIsReportedAsReplaced(t *testing.T) {
	dir := nsDir(t)
	name := testPrefix + "-r"
	path := filepath.Join(dir, name)
	m, rec := serve(t, dir, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ck := startChecker(ctx, m, true)
	if err := m.Listen(name, portal); err != nil {
		t.Fatal(err)
	}
	id1 := mustMakeNS(t, dir, name)
	waitFor(t, patience, "first up", func() bool { return rec.has(ListenerUp, name, id1) })
	old, _, err := ackedDial(path, portal)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	var id2 ID
	if err := onThreadIn("", func() error {
		if err := setLoUp(); err != nil {
			return err
		}
		var err error
		if id2, err = threadNetnsID(); err != nil {
			return err
		}
		return unix.Mount("/proc/thread-self/ns/net", path, "none", unix.MS_BIND, "")
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(path, unix.MNT_DETACH) }) // the stacked mount; nsDir drops the rest
	waitFor(t, patience, "replaced", func() bool { return rec.replaced(name, id2, id1) })
	if rec.has(NamespaceRemoved, name, 0) {
		t.Fatalf("one-step replace reported as removal: %v", rec.all())
	}
	waitFor(t, patience, "second up", func() bool { return rec.has(ListenerUp, name, id2) })
	if err := closedByServer(old); err != nil {
		t.Fatalf("conn of the replaced namespace: %v", err)
	}
	dialAndCheck(t, path, id2)
	if _, bad := ck.counts(); bad != 0 {
		t.Fatal(ck.mismatches)
	}
}

func TestPlaceholderIsRetriedNotServedNorReported(t *testing.T) {
	for _, fan := range []bool{true, false} {
		t.Run(fmt.Sprintf("fanotify=%v", fan), func(t *testing.T) {
			dir := nsDir(t)
			name := testPrefix + "-ph"
			path := filepath.Join(dir, name)
			m, rec := serve(t, dir, func(m *Mux) { m.noFanotify = !fan })
			if err := m.Listen(name, portal); err != nil {
				t.Fatal(err)
			}
			// A placeholder that stays a placeholder for 60 ms, like a slow `ip netns add`.
			id, err := makeNS(path, true, 60*time.Millisecond)
			if err != nil {
				t.Fatal(err)
			}
			waitFor(t, patience, "listener up", func() bool { return rec.has(ListenerUp, name, id) })
			if fan {
				// The bind mount must have been resolved (statmount) to the name, not turned into
				// a full rescan. (Counted rather than asserting "no full pass": mounts made by
				// other programs on the machine may legitimately cause some.)
				waitFor(t, patience, "mount attach attributed to the name", func() bool { return m.attachesSeen.Load() >= 1 })
			}
			for _, e := range rec.all() {
				if e.Err != nil || e.Kind == NamespaceRemoved || e.ID != id {
					t.Fatalf("placeholder produced event %+v", e)
				}
			}
		})
	}
}

func TestPlaceholderRaceBurstsIPNetnsAndInProcess(t *testing.T) {
	if _, err := os.Stat("/run/netns"); err != nil {
		os.MkdirAll("/run/netns", 0o755)
	}
	const nIP, nProc = 24, 96
	var ipNames []string
	for i := 0; i < nIP; i++ {
		ipNames = append(ipNames, fmt.Sprintf("%s-ip%d", testPrefix, i))
	}
	t.Cleanup(func() {
		for _, n := range ipNames {
			exec := filepath.Join("/run/netns", n)
			if _, err := os.Lstat(exec); err == nil {
				dropNS(exec)
			}
		}
	})
	// The Mux on the real /run/netns, holding only our names.
	m, rec := serve(t, "", nil)
	for _, n := range ipNames {
		if err := m.Listen(n, "0.0.0.0:3260"); err != nil {
			t.Fatal(err)
		}
	}
	dir := nsDir(t)
	m2, rec2 := serve(t, dir, nil)
	for i := 0; i < nProc; i++ {
		m2.Listen(fmt.Sprintf("%s-p%d", testPrefix, i), portal)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // in-process burst, with random-ish placeholder windows
		defer wg.Done()
		for i := 0; i < nProc; i++ {
			if _, err := makeNS(filepath.Join(dir, fmt.Sprintf("%s-p%d", testPrefix, i)), true, time.Duration(i%5)*time.Millisecond); err != nil {
				t.Error(err)
			}
		}
	}()
	for _, n := range ipNames {
		ipNetns(t, "add", n)
	}
	wg.Wait()
	waitFor(t, patience, "all ip-netns listeners", func() bool { return m.Stats().Listeners == nIP })
	waitFor(t, patience, "all in-process listeners", func() bool { return m2.Stats().Listeners == nProc })
	for _, r := range []*recorder{rec, rec2} {
		for _, e := range r.all() {
			if e.Err != nil || e.Kind == NamespaceRemoved {
				t.Fatalf("placeholder race produced %+v", e)
			}
		}
	}
	// Serve for real inside an `ip netns add` namespace: bring lo up through Do, dial, check tag.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ck := startChecker(ctx, m, false)
	if err := m.Do(ctx, ipNames[0], setLoUp); err != nil {
		t.Fatal(err)
	}
	dialAndCheck(t, filepath.Join("/run/netns", ipNames[0]), 0)
	if ok, bad := ck.counts(); ok != 1 || bad != 0 {
		t.Fatalf("ok=%d bad=%d", ok, bad)
	}
	// Burst delete.
	for _, n := range ipNames {
		ipNetns(t, "del", n)
	}
	waitFor(t, patience, "all ip-netns namespaces released", func() bool {
		s := m.Stats()
		return s.Namespaces == 0 && s.Listeners == 0
	})
	if got := rec.count(NamespaceRemoved, ""); got != nIP {
		t.Fatalf("%d removals, want %d", got, nIP)
	}
}

func TestInotifyOverflowStillConverges(t *testing.T) {
	dir := nsDir(t)
	a, b := testPrefix+"-ova", testPrefix+"-ovb"
	var stall sync.Mutex
	var armed bool
	release := make(chan struct{})
	// No fanotify: the mount of b must be found by the overflow rescan alone.
	m, rec := serve(t, dir, func(m *Mux) {
		m.noFanotify = true
		m.beforeInotifyDrain = func() {
			stall.Lock()
			wait := armed
			stall.Unlock()
			if wait {
				<-release
			}
		}
	})
	m.Listen(a, portal)
	m.Listen(b, portal)
	idA := mustMakeNS(t, dir, a)
	waitFor(t, patience, "a up", func() bool { return rec.has(ListenerUp, a, idA) })

	stall.Lock()
	armed = true
	stall.Unlock()
	// Flood the directory with more events than the queue holds while the reader is stalled.
	limit := 16384
	if v := readInt("/proc/sys/fs/inotify/max_queued_events"); v > 0 {
		limit = v
	}
	flood := filepath.Join(dir, "flood")
	for i := 0; i < limit/2+64; i++ {
		f, err := os.Create(flood)
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
		os.Remove(flood)
	}
	// These changes happen after the queue is full: their events are lost.
	if err := dropNS(filepath.Join(dir, a)); err != nil {
		t.Fatal(err)
	}
	idB := mustMakeNS(t, dir, b)
	stall.Lock()
	armed = false
	stall.Unlock()
	close(release)
	waitFor(t, patience, "convergence after overflow", func() bool {
		return rec.has(NamespaceRemoved, a, idA) && rec.has(ListenerUp, b, idB)
	})
	if s := m.Stats(); s.Overflows == 0 {
		t.Fatalf("no IN_Q_OVERFLOW seen; stats %+v", s)
	}
}

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func readInt(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return -1
	}
	var n int
	fmt.Sscan(strings.TrimSpace(string(b)), &n)
	return n
}

func TestListenFailureRetriesWithBackoffWithoutDisturbingOthers(t *testing.T) {
	dir := nsDir(t)
	good, bad := testPrefix+"-good", testPrefix+"-lodown"
	const retryMin = 50 * time.Millisecond
	type retry struct {
		failedAt time.Time
		delay    time.Duration
	}
	var mu sync.Mutex
	var retries []retry
	m, rec := serve(t, dir, func(m *Mux) {
		m.opts.RetryMin, m.opts.RetryMax = retryMin, time.Second
		m.retryScheduled = func(name, _ string, failedAt time.Time, delay time.Duration) {
			if name == bad {
				mu.Lock()
				retries = append(retries, retry{failedAt, delay})
				mu.Unlock()
			}
		}
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ck := startChecker(ctx, m, false)
	m.Listen(good, portal)
	m.Listen(bad, portal)
	mustMakeNS(t, dir, good)
	// Someone else holds the port inside bad from before the Mux can see it: bind fails with
	// EADDRINUSE until it goes away.
	badPath := filepath.Join(dir, bad)
	var squatter net.Listener
	var idBad ID
	if err := onThreadIn("", func() error {
		if err := setLoUp(); err != nil {
			return err
		}
		var err error
		if idBad, err = threadNetnsID(); err != nil {
			return err
		}
		if squatter, err = net.Listen("tcp", portal); err != nil {
			return err
		}
		if err := os.WriteFile(badPath, nil, 0); err != nil {
			return err
		}
		return unix.Mount("/proc/thread-self/ns/net", badPath, "none", unix.MS_BIND, "")
	}); err != nil {
		t.Fatal(err)
	}
	defer squatter.Close()
	waitFor(t, patience, "first failure", func() bool { return rec.count(ListenerFailed, bad) >= 1 })
	var fails []Event
	for _, e := range rec.all() {
		if e.Kind == ListenerFailed {
			fails = append(fails, e)
		}
	}
	if fails[0].Namespace != bad || fails[0].ID != idBad || !errors.Is(fails[0].Err, unix.EADDRINUSE) ||
		!strings.Contains(fails[0].Err.Error(), bad) {
		t.Fatalf("failure event %+v", fails[0])
	}
	// The good namespace serves while the bad one keeps failing.
	for i := 0; i < 3; i++ {
		dialAndCheck(t, filepath.Join(dir, good), 0)
	}
	// Backoff, judged on the reconciler's own clock rather than on when events reach us (a
	// preempted goroutine would shift those): each retry is scheduled twice as far out as the one
	// before, and no try comes before its scheduled time.
	waitFor(t, patience, "four failures", func() bool { return rec.count(ListenerFailed, bad) >= 4 })
	mu.Lock()
	rs := append([]retry(nil), retries...)
	mu.Unlock()
	if len(rs) < 4 {
		t.Fatalf("%d retries scheduled for %d failures", len(rs), rec.count(ListenerFailed, bad))
	}
	for i, want := range []time.Duration{retryMin, 2 * retryMin, 4 * retryMin, 8 * retryMin} {
		if rs[i].delay != want {
			t.Fatalf("retry %d scheduled after %v, want %v: no exponential backoff", i+1, rs[i].delay, want)
		}
		if i > 0 {
			if gap := rs[i].failedAt.Sub(rs[i-1].failedAt); gap < rs[i-1].delay {
				t.Fatalf("try %d came %v after the previous failure, before its retry delay %v", i+1, gap, rs[i-1].delay)
			}
		}
	}
	// The port is freed; the retry brings the listener up.
	squatter.Close()
	waitFor(t, patience, "listener up after fix", func() bool { return rec.has(ListenerUp, bad, idBad) })
	dialAndCheck(t, filepath.Join(dir, bad), idBad)
	if _, badN := ck.counts(); badN != 0 {
		t.Fatal("mismatch")
	}
}

func TestUnwantedNamespacesAreNeverOpened(t *testing.T) {
	dir := nsDir(t)
	mine, other := testPrefix+"-mine", testPrefix+"-other"
	mustMakeNS(t, dir, other)
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join(dir, other), &st); err != nil {
		t.Fatal(err)
	}
	m, rec := serve(t, dir, nil)
	m.Listen(mine, portal)
	id := mustMakeNS(t, dir, mine)
	waitFor(t, patience, "up", func() bool { return rec.has(ListenerUp, mine, id) })
	link := fmt.Sprintf("net:[%d]", st.Ino)
	ents, _ := os.ReadDir("/proc/self/fd")
	for _, e := range ents {
		if l, _ := os.Readlink("/proc/self/fd/" + e.Name()); l == link {
			t.Fatalf("fd %s pins a namespace nobody listens in", e.Name())
		}
	}
	for _, e := range rec.all() {
		if e.Namespace == other {
			t.Fatalf("event for unwanted namespace: %+v", e)
		}
	}
}

func TestUnlistenClosesListenerAndReleasesHandle(t *testing.T) {
	dir := nsDir(t)
	name := testPrefix + "-ul"
	m, rec := serve(t, dir, nil)
	m.Listen(name, portal)
	m.Listen(name, "127.0.0.1:3261")
	id := mustMakeNS(t, dir, name)
	waitFor(t, patience, "two up", func() bool { return m.Stats().Listeners == 2 && rec.has(ListenerUp, name, id) })
	client, _, err := dialFrom(filepath.Join(dir, name), portal)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := m.Accept(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	m.Unlisten(name, "127.0.0.1:3261")
	waitFor(t, patience, "one listener", func() bool { return m.Stats().Listeners == 1 })
	if err := onThreadIn(filepath.Join(dir, name), func() error {
		c, err := net.DialTimeout("tcp", "127.0.0.1:3261", time.Second)
		if err == nil {
			c.Close()
			return errors.New("3261 still accepting")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	m.Unlisten(name, portal)
	waitFor(t, patience, "handle released", func() bool { s := m.Stats(); return s.Namespaces == 0 && s.Listeners == 0 })
	// The accepted conn is left alone.
	if _, err := server.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1)
	client.SetReadDeadline(time.Now().Add(patience))
	if _, err := io.ReadFull(client, buf); err != nil || buf[0] != 'x' {
		t.Fatalf("conn after Unlisten: %v %q", err, buf)
	}
}

func TestCloseLeavesNoFDsGoroutinesOrThreadsInTenantNamespaces(t *testing.T) {
	dir := nsDir(t)
	const n = 16
	for i := 0; i < n; i++ {
		mustMakeNS(t, dir, fmt.Sprintf("%s-c%d", testPrefix, i))
	}
	runtime.GC()
	fds0, g0 := countFDs(t), runtime.NumGoroutine()
	m, err := New(Options{Dir: dir, Logger: discardLogger()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	for i := 0; i < n; i++ {
		m.Listen(fmt.Sprintf("%s-c%d", testPrefix, i), portal)
	}
	waitFor(t, patience, "listeners", func() bool { return m.Stats().Listeners == n })
	var conns []net.Conn
	for i := 0; i < n; i++ {
		c, _, err := dialFrom(filepath.Join(dir, fmt.Sprintf("%s-c%d", testPrefix, i)), portal)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		// Accepted and left open: the Mux must close it.
		if _, err := m.Accept(ctx); err != nil {
			t.Fatal(err)
		}
	}
	// A worker stays in a held namespace after a Do (lazy setns): stopping must send it home.
	if err := m.Do(ctx, fmt.Sprintf("%s-c%d", testPrefix, 0), func() error { return nil }); err != nil {
		t.Fatal(err)
	}
	if len(threadsAway()) == 0 {
		t.Fatal("no worker thread in a tenant namespace before the stop: the check below would prove nothing")
	}
	cancel() // stop by context
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	for _, c := range conns {
		if err := closedByServer(c); err != nil {
			t.Fatalf("server side of a conn on shutdown: %v", err)
		}
		c.Close()
	}
	if _, err := m.Accept(context.Background()); !errors.Is(err, ErrClosed) {
		t.Fatalf("Accept after stop: %v", err)
	}
	if err := m.Do(context.Background(), fmt.Sprintf("%s-c%d", testPrefix, 0), func() error { return nil }); !errors.Is(err, ErrClosed) {
		t.Fatalf("Do after stop: %v", err)
	}
	m.Close()
	checkNoLeaks(t, fds0, g0)
	if s := m.Stats(); s.Namespaces != 0 || s.Listeners != 0 || s.Conns != 0 {
		t.Fatalf("stats after close %+v", s)
	}
}

func TestFallbackIdentityWithoutNSGetID(t *testing.T) {
	dir := nsDir(t)
	name := testPrefix + "-fb"
	path := filepath.Join(dir, name)
	m, rec := serve(t, dir, func(m *Mux) { m.fallback = true })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ck := startChecker(ctx, m, false)
	m.Listen(name, portal)
	for i := 0; i < 20; i++ {
		id := mustMakeNS(t, dir, name)
		// On 6.18 the socket cookie equals NS_GET_ID, so the fallback's id must be the real one.
		waitFor(t, patience, "up", func() bool { return rec.has(ListenerUp, name, id) })
		dialAndCheck(t, path, id)
		if err := dropNS(path); err != nil {
			t.Fatal(err)
		}
		waitFor(t, patience, "removed", func() bool { return rec.has(NamespaceRemoved, name, id) })
	}
	if ok, bad := ck.counts(); ok != 20 || bad != 0 {
		t.Fatalf("ok=%d bad=%d", ok, bad)
	}
}

// An accepted socket whose SO_NETNS_COOKIE differs from its listener's namespace id is a bug:
// it is logged, counted and closed, never delivered. (A real listener with a deliberately wrong
// recorded id stands in for the bug, since the kernel cannot be made to produce one.)
func TestAcceptedSocketFromWrongNamespaceIsClosedAndCounted(t *testing.T) {
	m, err := New(Options{Dir: t.TempDir(), Logger: discardLogger()})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	fd, err := listenSocket(netip.MustParseAddrPort("127.0.0.1:0"))
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	real, err := socketCookie(fd)
	if err != nil {
		t.Fatal(err)
	}
	l := &listener{ns: &nsState{name: "wrong", id: real + 1}, addr: "127.0.0.1:0", fd: fd}
	c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", sa.(*unix.SockaddrInet4).Port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var out []*Conn
	waitFor(t, patience, "accept attempt", func() bool {
		out = m.acceptOn(l, out)
		return m.Stats().Mismatches > 0 || len(out) > 0
	})
	if len(out) != 0 || m.Stats().Mismatches != 1 {
		t.Fatalf("delivered %d conns, %d mismatches", len(out), m.Stats().Mismatches)
	}
	if err := closedByServer(c); err != nil {
		t.Fatalf("mismatched conn: %v", err)
	}
}

// A conn belongs to its namespace, not to one handle of it: one accepted before an
// Unlisten/Listen cycle of the name is still closed when that namespace is deleted later.
func TestConnsAreClosedWithTheirNamespaceEvenAcrossUnlistenAndListen(t *testing.T) {
	dir := nsDir(t)
	name := testPrefix + "-relisten"
	path := filepath.Join(dir, name)
	m, rec := serve(t, dir, nil)
	m.Listen(name, portal)
	id := mustMakeNS(t, dir, name)
	waitFor(t, patience, "up", func() bool { return rec.has(ListenerUp, name, id) })
	client, _, err := dialFrom(path, portal)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := m.Accept(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	m.Unlisten(name, portal)
	waitFor(t, patience, "handle released", func() bool { s := m.Stats(); return s.Namespaces == 0 && s.Listeners == 0 })
	m.Listen(name, portal)
	// Events, not gauges: the gauges cannot tell the new listener from the old one.
	waitFor(t, patience, "listening again", func() bool { return rec.count(ListenerUp, name) == 2 })
	if err := dropNS(path); err != nil {
		t.Fatal(err)
	}
	if err := closedByServer(client); err != nil {
		t.Fatalf("conn of the deleted namespace: %v", err)
	}
}

// A caller that stops calling Accept must not stall the Mux: once the accept queue is full,
// accepting pauses (clients wait in the kernel backlog) but namespace removals are still seen,
// and when Accept resumes every waiting conn is delivered, correctly tagged.
func TestSlowAcceptDoesNotStallDiscovery(t *testing.T) {
	dir := nsDir(t)
	busy, other := testPrefix+"-busy", testPrefix+"-gone"
	m, rec := serve(t, dir, nil)
	m.Listen(busy, portal)
	m.Listen(other, portal)
	idBusy, idOther := mustMakeNS(t, dir, busy), mustMakeNS(t, dir, other)
	waitFor(t, patience, "up", func() bool { return rec.count(ListenerUp, "") == 2 })
	n := cap(m.acceptq) + 200
	var clients []net.Conn
	t.Cleanup(func() {
		for _, c := range clients {
			c.Close()
		}
	})
	if err := onThreadIn(filepath.Join(dir, busy), func() error {
		for i := 0; i < n; i++ {
			c, err := net.DialTimeout("tcp", portal, patience)
			if err != nil {
				return fmt.Errorf("dial %d: %w", i, err)
			}
			clients = append(clients, c)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, patience, "accept queue full", func() bool { return m.Stats().Conns > cap(m.acceptq) })
	if err := dropNS(filepath.Join(dir, other)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, patience, "removal seen while nobody Accepts", func() bool { return rec.has(NamespaceRemoved, other, idOther) })
	ctx, cancel := context.WithTimeout(context.Background(), patience)
	defer cancel()
	for i := 0; i < n; i++ {
		c, err := m.Accept(ctx)
		if err != nil {
			t.Fatalf("conn %d of %d: %v", i, n, err)
		}
		if c.Namespace != busy || c.ID != idBusy {
			t.Fatalf("conn tagged %s/%d, want %s/%d", c.Namespace, c.ID, busy, idBusy)
		}
		c.Close()
	}
}

// TestStartedAfterTheFirstPassHasServedEveryExistingNamespace: names Listened on before Run
// are brought up by the workers' first pass (the path a start-up takes); when Started is
// closed, every existing namespace listens (its conns are accepted and tagged with its id),
// a placeholder and a missing name were neither served nor reported, and both are served
// once they become namespaces.
func TestStartedAfterTheFirstPassHasServedEveryExistingNamespace(t *testing.T) {
	dir := nsDir(t)
	ids := map[string]ID{}
	placeholder, missing := testPrefix+"-ph", testPrefix+"-missing"
	m, rec := serve(t, dir, func(m *Mux) {
		for i := 0; i < 5; i++ {
			name := fmt.Sprintf("%s-up%d", testPrefix, i)
			ids[name] = mustMakeNS(t, dir, name)
			if err := m.Listen(name, portal); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.WriteFile(filepath.Join(dir, placeholder), nil, 0); err != nil {
			t.Fatal(err)
		}
		m.Listen(placeholder, portal)
		m.Listen(missing, portal)
	})
	select {
	case <-m.Started():
	case <-time.After(patience):
		t.Fatal("Started not closed")
	}
	for name, id := range ids {
		if !rec.has(NamespaceAdded, name, id) || !rec.has(ListenerUp, name, id) {
			t.Fatalf("%s: no NamespaceAdded and ListenerUp (id %d) by Started: %+v", name, id, rec.all())
		}
	}
	if st := m.Stats(); st.Namespaces != len(ids) || st.Listeners != len(ids) {
		t.Fatalf("stats after the first pass: %+v, want %d namespaces and listeners", st, len(ids))
	}
	for _, e := range rec.all() {
		if e.Namespace == placeholder || e.Namespace == missing {
			t.Fatalf("event for a name that is not a namespace: %+v", e)
		}
	}
	// Accepted, and tagged with the right namespace.
	for name, id := range ids {
		c, cid, err := dialFrom(filepath.Join(dir, name), portal)
		if err != nil {
			t.Fatal(err)
		}
		ac, err := m.Accept(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		var b [8]byte
		if _, err := io.ReadFull(ac, b[:]); err != nil {
			t.Fatal(err)
		}
		if got := ID(binary.LittleEndian.Uint64(b[:])); ac.ID != got || ac.Namespace != ids2name(ids, got) || cid != id {
			t.Fatalf("conn from %s (id %d) accepted as %s id %d", name, got, ac.Namespace, ac.ID)
		}
		ac.Close()
		c.Close()
	}
	// The placeholder becomes a namespace, the missing name appears.
	os.Remove(filepath.Join(dir, placeholder))
	for _, name := range []string{placeholder, missing} {
		id := mustMakeNS(t, dir, name)
		waitFor(t, patience, name+" up", func() bool { return rec.has(ListenerUp, name, id) })
	}
	if st := m.Stats(); st.Mismatches != 0 {
		t.Fatalf("mismatches: %+v", st)
	}
}

func ids2name(ids map[string]ID, id ID) string {
	for n, i := range ids {
		if i == id {
			return n
		}
	}
	return ""
}

func TestStartedIsClosedByCloseWithoutRun(t *testing.T) {
	m, err := New(Options{Dir: t.TempDir(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	m.Close()
	select {
	case <-m.Started():
	case <-time.After(patience):
		t.Fatal("Started not closed by Close")
	}
}
