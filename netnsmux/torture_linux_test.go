package netnsmux

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// tortureCycles is how many destroy-and-recreate cycles the torture test runs: the 2,000
// (measured under -race on 2 cores: 9-12 s idle, 20 s at load average 14, with paced clients).
// NETNSMUX_TORTURE_CYCLES overrides; scripts/bench/netnsmux-torture.sh prints it as a table.
func tortureCycles() int {
	if n, err := strconv.Atoi(os.Getenv("NETNSMUX_TORTURE_CYCLES")); err == nil && n > 0 {
		return n
	}
	return 2000
}

// Names are destroyed and re-created over and over while clients keep connecting from inside
// them. Every accepted conn must carry the id of the namespace its client really dialled from
// (the client sends its own NS_GET_ID), and nothing may leak.
func TestTortureRecreateSameNamesWhileClientsConnect(t *testing.T) {
	cycles := tortureCycles()
	const nNames, nClients = 8, 3
	dir := nsDir(t)
	var names, paths []string
	for i := 0; i < nNames; i++ {
		names = append(names, fmt.Sprintf("%s-t%d", testPrefix, i))
		paths = append(paths, filepath.Join(dir, names[i]))
	}
	runtime.GC()
	fds0, g0 := countFDs(t), runtime.NumGoroutine()

	m, err := New(Options{Dir: dir, Logger: discardLogger(), RetryMin: 5 * time.Millisecond, RetryMax: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	runDone := make(chan error, 1)
	go func() { runDone <- m.Run(ctx) }()
	for _, n := range names {
		m.Listen(n, portal)
	}
	ck := startChecker(ctx, m, false)
	for _, p := range paths {
		if _, err := makeNS(p, true, 0); err != nil {
			t.Fatal(err)
		}
	}

	var stop atomic.Bool
	var dialled, acked atomic.Int64
	var wg sync.WaitGroup
	for c := 0; c < nClients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(c), 7))
			for !stop.Load() {
				p := paths[r.IntN(nNames)]
				// Paced, so clients do not starve the destroy/re-create loop on 2 cores.
				time.Sleep(500 * time.Microsecond)
				conn, _, err := ackedDial(p, portal)
				if err != nil {
					continue // placeholder, gone, refused, reset by a replace: all legitimate
				}
				dialled.Add(1)
				acked.Add(1)
				conn.Close()
			}
		}()
	}
	// Every gateEvery cycles the churn waits until at least one more conn has been served and
	// checked, so how much serving the torture exercises is set here, not by how fast the churn
	// runs compared with the clients and the Mux on this machine.
	const gateEvery = 20
	start := time.Now()
	served, _ := ck.counts()
	for i := 0; i < cycles; i++ {
		if i%gateEvery == 0 {
			waitFor(t, patience, fmt.Sprintf("a conn served during cycles %d-%d", i, i+gateEvery-1), func() bool {
				ok, _ := ck.counts()
				return ok > served
			})
			served, _ = ck.counts()
		}
		p := paths[i%nNames]
		if err := dropNS(p); err != nil {
			t.Fatal(err)
		}
		if _, err := makeNS(p, true, 0); err != nil {
			t.Fatal(err)
		}
	}
	elapsed := time.Since(start)
	// Let the Mux converge on the final generation, then make sure every name still serves.
	for _, p := range paths {
		var last error
		ok := false
		for deadline := time.Now().Add(patience); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
			c, _, err := ackedDial(p, portal)
			if err == nil {
				c.Close()
				ok = true
				break
			}
			last = err
		}
		if !ok {
			t.Fatalf("%s not serving after the torture: %v", p, last)
		}
	}
	stop.Store(true)
	wg.Wait()
	good, bad := ck.counts()
	st := m.Stats()
	t.Logf("%d cycles in %v; %d conns checked, %d acked by clients; stats %+v", cycles, elapsed, good, acked.Load(), st)
	if bad != 0 || st.Mismatches != 0 {
		t.Fatalf("%d mismatched tags, %d cookie mismatches: %v", bad, st.Mismatches, ck.mismatches)
	}
	if good < cycles/20 {
		t.Fatalf("only %d conns checked in %d cycles: the torture did not exercise serving", good, cycles)
	}

	cancel()
	if err := <-runDone; err != nil {
		t.Fatal(err)
	}
	ck.wg.Wait()
	for _, p := range paths {
		dropNS(p)
	}
	checkNoLeaks(t, fds0, g0)
	t.Logf("TORTURE cycles=%d seconds=%.1f checked=%d mismatches=%d fds_before=%d fds_after=%d goroutines_before=%d goroutines_after=%d",
		cycles, elapsed.Seconds(), good, bad+int(st.Mismatches), fds0, countFDs(t), g0, runtime.NumGoroutine())
}

// 512 namespaces all listen on 127.0.0.1:3260 in one (separate) server process; a client in each
// is answered with the right tag, and the server's OS thread count is the same as with one.
func TestFiveHundredTwelveNamespacesOnOneAddressWithoutMoreThreads(t *testing.T) {
	const n = 512
	dir := nsDir(t)
	prefix := testPrefix + "-s"
	ids := make([]ID, n)
	for i := 0; i < n; i++ {
		ids[i] = mustMakeNS(t, dir, fmt.Sprintf("%s%d", prefix, i))
	}
	h := startHelper(t, dir)
	h.call(t, "listen "+prefix+"0 "+portal)
	h.call(t, "run")
	h.call(t, "wait 1")
	check := func(i int) error {
		c, id, err := dialFrom(filepath.Join(dir, fmt.Sprintf("%s%d", prefix, i)), portal)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(patience))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return fmt.Errorf("ns %d: %w", i, err)
		}
		want := fmt.Sprintf("%s%d %d %s ok\n", prefix, i, ids[i], portal)
		if id != ids[i] || line != want {
			return fmt.Errorf("ns %d: server said %q, want %q", i, line, want)
		}
		return nil
	}
	// Same client load at 1 namespace as later at 512, so the runtime has had the same chance
	// to start spare threads for blocking syscalls.
	run := func(n int) {
		var wg sync.WaitGroup
		errs := make(chan error, n)
		sem := make(chan struct{}, 8)
		for i := 0; i < n; i++ {
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				if err := check(i); err != nil {
					errs <- err
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	}
	for r := 0; r < 64; r++ {
		run(1)
	}
	one := h.call(t, "stats")

	h.call(t, fmt.Sprintf("listenmany %s %d %s", prefix, n, portal))
	h.call(t, fmt.Sprintf("wait %d", n))
	run(n)
	many := h.call(t, "stats")
	t.Logf("server with 1 namespace: %v", one)
	t.Logf("server with %d namespaces: %v", n, many)
	if many["mismatches"] != "0" || many["listeners"] != strconv.Itoa(n) {
		t.Fatalf("stats %v", many)
	}
	// A thread per namespace would add 511. The runtime may start a few spare Ms for blocking
	// syscalls when the machine is loaded (other suites share the 2 cores): allow 16.
	if t1, tn := atoi(t, one["threads"]), atoi(t, many["threads"]); tn > t1+16 {
		t.Fatalf("server threads grew from %d (1 namespace) to %d (%d namespaces)", t1, tn, n)
	}
}
