package netnsmux

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

func taskAlive(tid int) bool {
	_, err := os.Stat(fmt.Sprintf("/proc/self/task/%d", tid))
	return err == nil
}

// A worker whose switch back home fails must end with its thread still locked, so the runtime
// kills the thread; a fresh worker takes over and Do keeps working.
func TestFailedSwitchBackDiscardsTheThread(t *testing.T) {
	dir := nsDir(t)
	name := testPrefix + "-rt"
	id := mustMakeNS(t, dir, name)
	m, err := New(Options{Dir: dir, Workers: 1, Logger: discardLogger()})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	var failOnce atomic.Bool
	failOnce.Store(true)
	m.pool.failRestore = func() error {
		if failOnce.Swap(false) {
			return errors.New("injected switch-back failure")
		}
		return nil
	}
	// name is not held by any Listen, so after fn the worker must leave it: that switch fails.
	tid, seen := doWhere(t, m, name)
	if seen != id {
		t.Fatalf("fn ran in namespace %d, want %d", seen, id)
	}
	waitFor(t, patience, "thread discarded", func() bool { return m.Stats().Discarded == 1 })
	waitFor(t, patience, "thread gone", func() bool { return !taskAlive(tid) })
	// A fresh worker on a fresh thread serves the next call, in the right namespace.
	tid2, seen := doWhere(t, m, name)
	if tid2 == tid || seen != id {
		t.Fatalf("second Do on tid %d (first %d) in ns %d", tid2, tid, seen)
	}
	// And it went home afterwards (name not held): no thread of ours is left in the tenant.
	waitFor(t, patience, "worker home", func() bool { return len(threadsAway()) == 0 })
	if away := threadsAway(); len(away) != 0 {
		t.Fatal(away)
	}
}

// Do skips setns when the worker is already in the namespace and counts both cases.
func TestDoIsLazyAndCountsSwitchesAndSkips(t *testing.T) {
	dir := nsDir(t)
	a, b := testPrefix+"-la", testPrefix+"-lb"
	idA, idB := mustMakeNS(t, dir, a), mustMakeNS(t, dir, b)
	m, rec := serve(t, dir, func(m *Mux) {})
	m.Listen(a, portal)
	m.Listen(b, portal)
	waitFor(t, patience, "up", func() bool { return rec.has(ListenerUp, a, idA) && rec.has(ListenerUp, b, idB) })
	check := func(name string, want ID) {
		t.Helper()
		if _, got := doWhere(t, m, name); got != want {
			t.Fatalf("Do in %s ran in namespace %d, want %d", name, got, want)
		}
	}
	s0 := m.Stats()
	for i := 0; i < 50; i++ {
		check(a, idA)
	}
	s1 := m.Stats()
	// 2 workers: each enters a at most once, the rest are skips.
	if sw := s1.Switches - s0.Switches; sw > 2 {
		t.Fatalf("%d switches for 50 calls into one namespace", sw)
	}
	if sk := s1.Skips - s0.Skips; sk < 48 {
		t.Fatalf("%d skips", sk)
	}
	for i := 0; i < 20; i++ {
		check(a, idA)
		check(b, idB)
	}
	if s2 := m.Stats(); s2.Switches == s1.Switches {
		t.Fatal("alternating namespaces made no switches")
	}
	// Removing a namespace sends workers that sit in it home (nothing may pin a deleted one).
	if err := dropNS(filepath.Join(dir, a)); err != nil {
		t.Fatal(err)
	}
	if err := dropNS(filepath.Join(dir, b)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, patience, "workers home", func() bool { return m.Stats().Namespaces == 0 && len(threadsAway()) == 0 })
}

func TestWorkersRunConcurrentlyAndStayLocked(t *testing.T) {
	dir := nsDir(t)
	var names []string
	ids := map[string]ID{}
	for i := 0; i < 8; i++ {
		n := fmt.Sprintf("%s-w%d", testPrefix, i)
		names = append(names, n)
		ids[n] = mustMakeNS(t, dir, n)
	}
	m, rec := serve(t, dir, nil)
	for _, n := range names {
		m.Listen(n, portal)
	}
	waitFor(t, patience, "up", func() bool { return rec.count(ListenerUp, "") == len(names) })
	var wg sync.WaitGroup
	var bad atomic.Int32
	var mu sync.Mutex
	var tids []int
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 200; i++ {
				n := names[(g+i)%len(names)]
				err := m.Do(context.Background(), n, func() error {
					mu.Lock()
					if !slices.Contains(tids, gettid()) {
						tids = append(tids, gettid())
					}
					mu.Unlock()
					got, err := threadNetnsID()
					if err == nil && got != ids[n] {
						err = fmt.Errorf("in namespace %d, want %d", got, ids[n])
					}
					return err
				})
				if err != nil {
					bad.Add(1)
					t.Errorf("Do in %s: %v", n, err)
				}
			}
		}()
	}
	wg.Wait()
	if bad.Load() != 0 {
		t.Fatalf("%d Do calls failed or ran in the wrong namespace", bad.Load())
	}
	// Every Do ran on one of the 2 pool threads, never on a caller's thread.
	if len(tids) > 2 {
		t.Fatalf("Do ran on %d threads: %v", len(tids), tids)
	}
}

func gettid() int { return unix.Gettid() }

// doWhere runs an empty Do in name and reports the thread and the namespace it ran in.
func doWhere(t *testing.T, m *Mux, name string) (tid int, in ID) {
	t.Helper()
	if err := m.Do(context.Background(), name, func() error {
		tid = gettid()
		var err error
		in, err = threadNetnsID()
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return tid, in
}

// The package's init locks the main goroutine to the main thread: a process importing it keeps
// main on tid == pid however busy the scheduler is.
func TestMainGoroutineIsLockedToMainThreadByInit(t *testing.T) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "NETNSMUX_HELPER=mainthread", "GOMAXPROCS=2")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if strings.TrimSpace(string(out)) != "moved=0" {
		t.Fatalf("main goroutine left the main thread: %s", out)
	}
}

// Removing the watched directory itself (self events) re-creates and re-watches it.
func TestWatchedDirectoryRemovedAndRecreated(t *testing.T) {
	parent := t.TempDir()
	dir := filepath.Join(parent, "netns")
	name := testPrefix + "-dir"
	m, rec := serve(t, dir, nil)
	m.Listen(name, portal)
	waitFor(t, patience, "Run watching", func() bool { return m.fullPasses.Load() >= 1 })
	if err := os.Remove(dir); err != nil {
		t.Fatal(err)
	}
	waitFor(t, patience, "dir re-created", func() bool { _, err := os.Stat(dir); return err == nil })
	id, err := makeNS(filepath.Join(dir, name), true, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dropNS(filepath.Join(dir, name)) })
	waitFor(t, patience, "served in re-created dir", func() bool { return rec.has(ListenerUp, name, id) })
}
