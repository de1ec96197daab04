//go:build linux

// Command scalebench is the "scale under load" benchmark (issue 11) of `make bench`, run by
// scripts/bench/scale.sh: many tenant namespaces made in-process (nstarget/fleet) in a private
// netns dir, one `nstarget serve` at a time, a load client of its own (load.go) that measures
// per-command latency from inside the tenants' namespaces. It prints tables with the goal next
// to the measured value (medians of the rounds of the same run), writes SVG plots, and asserts
// nothing about speed: it exits non-zero only when a run fails (a server that does not come up,
// an I/O error, a session lost, a tenant that does not serve again).
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"nstarget/fleet"
)

const (
	portal    = "127.0.0.1:3260"
	iqn       = "iqn.2026-12.org.nstarget:scalebench"
	initiator = "iqn.2026-12.org.nstarget:scalebench-initiator"
	activeVol = 64 << 20 // volumes of the tenants that run I/O (pre-filled)
	idleVol   = 1 << 20  // everyone else's (sparse)
)

type bench struct {
	nst, baseNst, prefix, nsDir, work, results, plots string
	tenantsList                                       []int
	maxN, active                                      int
	rounds                                            int
	runtime                                           time.Duration
	phases                                            map[string]bool
	pprofPort, metricsPort                            int
	sockPath                                          string
	serverStarts                                      int
	servers                                           map[int]*server
	created                                           []string
	failed                                            []string
	out                                               io.Writer
	hz                                                float64
	strace                                            bool
	nice                                              int
	handles                                           *nsHandles
	acceptMethod                                      string    // "sock_diag" or "connect" (waitAcceptingStats)
	acceptAB                                          bool      // bring-up also times the earlier prober on the same binary
	ring                                              *diagRing // made in setup; nil: sweeps use sendto/recvfrom
	ringMu                                            sync.Mutex
	warmed                                            bool // warmAll ran

	mu sync.Mutex
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "load" {
		if err := runLoadCmd(); err != nil {
			fmt.Fprintln(os.Stderr, "scalebench load:", err)
			os.Exit(1)
		}
		return
	}
	os.Exit(run())
}

func (b *bench) logf(f string, a ...any) {
	fmt.Fprintf(os.Stderr, "[scalebench %s] %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(f, a...))
}

func (b *bench) fail(f string, a ...any) {
	msg := fmt.Sprintf(f, a...)
	b.mu.Lock()
	b.failed = append(b.failed, msg)
	b.mu.Unlock()
	b.logf("FAILED: %s", msg)
}

func run() int {
	b := &bench{servers: map[int]*server{}, out: os.Stdout, hz: 100}
	b.handles = newNSHandles(b)
	var tenants, phases string
	flag.StringVar(&b.nst, "nst", "", "nstarget binary")
	flag.StringVar(&b.baseNst, "base-nst", "", "before/after: also time this nstarget binary's bring-up (alternating) and churn (before this binary's)")
	flag.StringVar(&b.prefix, "prefix", fmt.Sprintf("sb%d", os.Getpid()), "namespace name prefix (names PREFIX-0001 …)")
	flag.StringVar(&b.nsDir, "netns-dir", "", "private netns dir (default /run/PREFIX-netns)")
	flag.StringVar(&b.work, "work", "", "work dir (pool, configs, logs)")
	flag.StringVar(&b.results, "results", "/tmp/nstarget-bench", "where tables and raw JSON go")
	flag.StringVar(&b.plots, "plots", "bench/results", "where SVG plots go")
	flag.StringVar(&tenants, "tenants", "1,16,64,512,1024", "tenant counts of the sweep")
	flag.IntVar(&b.active, "active", 16, "tenants (and sessions) running I/O")
	flag.IntVar(&b.rounds, "rounds", 3, "rounds (medians over these)")
	flag.DurationVar(&b.runtime, "runtime", 5*time.Second, "seconds per I/O run")
	flag.StringVar(&phases, "phases", "sweep,bringup,fair,churn", "subset of sweep,bringup,fair,churn")
	flag.IntVar(&b.pprofPort, "pprof-port", 0, "pprof/usage port of the server (default from the PID)")
	flag.BoolVar(&b.strace, "strace", true, "verify zero setns with strace -f -c during a 4K run at the largest count")
	flag.IntVar(&b.nice, "nice", 0, "run servers and load clients at this nice level (e.g. -10 on a shared machine)")
	fairRuntime := flag.Duration("fair-runtime", 0, "seconds per fairness run (default -runtime)")
	churnFor := flag.Duration("churn", 20*time.Second, "churn phase duration")
	churnN := flag.Int("churn-tenants", 300, "tenants deleted and re-created in a loop")
	reloadN := flag.Int("reload-tenants", 32, "tenants added and removed by reload in a loop")
	bringupRounds := flag.Int("bringup-rounds", 3, "starts per count for the discovery bring-up")
	flag.StringVar(&b.acceptMethod, "accept-method", "sock_diag", "how bring-up probes see a tenant accepting: sock_diag (no connection) or connect (a connection the server accepts; the earlier prober)")
	flag.BoolVar(&b.acceptAB, "accept-ab", false, "bring-up: also time this binary with the earlier prober (a connect into every pending namespace, 0.5 ms between sweeps), alternating with the current one, to show what the prober itself costs the start-up")
	flag.DurationVar(&probePause, "probe-pause", probePause, "least pause between two sweeps of the accepting prober (never shorter than twice its CPU time in the sweep before)")
	flag.Parse()
	if os.Getuid() != 0 {
		fmt.Fprintln(os.Stderr, "scalebench: needs root")
		return 1
	}
	for _, f := range strings.Split(tenants, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 || n > 9999 {
			fmt.Fprintf(os.Stderr, "scalebench: -tenants %q\n", tenants)
			return 2
		}
		b.tenantsList = append(b.tenantsList, n)
	}
	sort.Ints(b.tenantsList)
	b.maxN = b.tenantsList[len(b.tenantsList)-1]
	b.phases = map[string]bool{}
	for _, p := range strings.Split(phases, ",") {
		b.phases[strings.TrimSpace(p)] = true
	}
	if b.phases["churn"] && b.maxN < b.active+*churnN+*reloadN {
		b.maxN = b.active + *churnN + *reloadN
	}
	if b.nsDir == "" {
		b.nsDir = "/run/" + b.prefix + "-netns"
	}
	if b.pprofPort == 0 {
		b.pprofPort = 20000 + os.Getpid()%20000
	}
	b.metricsPort = b.pprofPort + 1
	if b.nst == "" {
		fmt.Fprintln(os.Stderr, "scalebench: -nst BINARY is required")
		return 2
	}
	if b.work == "" {
		w, err := os.MkdirTemp("", "scalebench.")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		b.work = w
	}
	b.sockPath = filepath.Join(b.work, "ctl.sock")
	if *fairRuntime == 0 {
		*fairRuntime = b.runtime
	}
	os.MkdirAll(b.results, 0o755)
	os.MkdirAll(b.plots, 0o755)

	// Whatever happens: servers stopped, namespaces deleted, the netns dir removed.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	cleaned := make(chan struct{})
	var once sync.Once
	cleanup := func() {
		once.Do(func() {
			for _, s := range b.servers {
				b.stopServer(s)
			}
			b.handles.closeAll() // they keep the namespaces alive
			n := 0
			for _, name := range b.created {
				if fleet.Delete(b.nsDir, name) == nil {
					n++
				}
			}
			os.Remove(b.nsDir)
			b.logf("cleanup: %d namespaces deleted, %s removed", n, b.nsDir)
			close(cleaned)
		})
	}
	go func() {
		<-sig
		b.logf("interrupted; cleaning up")
		cleanup()
		os.Exit(130)
	}()
	defer cleanup()

	start := time.Now()
	rep := &report{}
	if err := b.setup(rep); err != nil {
		b.fail("setup: %v", err)
	} else {
		if b.phases["sweep"] {
			b.sweep(rep)
		}
		if b.phases["bringup"] {
			b.bringup(rep, *bringupRounds)
		}
		if b.phases["fair"] {
			b.fairness(rep, *fairRuntime)
		}
		if b.phases["churn"] {
			if b.baseNst != "" {
				// Before/after in the same run: the base binary's churn first, back to back.
				saved := b.nst
				b.nst = b.baseNst
				b.churn(rep, *churnFor, *churnN, *reloadN)
				b.nst = saved
				rep.ChurnBase, rep.Churn = rep.Churn, nil
			}
			b.churn(rep, *churnFor, *churnN, *reloadN)
		}
	}
	rep.print(b, os.Stdout)
	stamp := time.Now().Format("20060102-150405")
	if f, err := os.Create(filepath.Join(b.results, "scale-"+stamp+".txt")); err == nil {
		rep.print(b, f)
		f.Close()
		b.logf("table: %s", f.Name())
	}
	if raw, err := json.MarshalIndent(rep, "", " "); err == nil {
		p := filepath.Join(b.results, "scale-"+stamp+".json")
		os.WriteFile(p, raw, 0o644)
		b.logf("raw: %s", p)
	}
	if files := rep.plot(b); len(files) > 0 {
		b.logf("plots: %s", strings.Join(files, " "))
	}
	b.logf("took %v; load average now %s", time.Since(start).Round(time.Second), loadavg())
	if len(b.failed) > 0 {
		fmt.Fprintf(os.Stderr, "scalebench: %d failure(s):\n  %s\n", len(b.failed), strings.Join(b.failed, "\n  "))
		return 1
	}
	return 0
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

func (b *bench) nsName(i int) string { return fmt.Sprintf("%s-%04d", b.prefix, i) }
func (b *bench) nsPath(i int) string { return filepath.Join(b.nsDir, b.nsName(i)) }

// setup makes maxN namespaces (measuring the kernel's memory for them) and their volumes.
func (b *bench) setup(rep *report) error {
	b.logf("load average %s; work %s; netns dir %s; %d namespaces", loadavg(), b.work, b.nsDir, b.maxN)
	rep.LoadStart = loadavg()
	rep.Nice = b.nice
	rep.Start = time.Now().UTC().Format(time.RFC3339)
	pool := filepath.Join(b.work, "pool")
	if err := os.MkdirAll(pool, 0o755); err != nil {
		return err
	}
	// Volumes first (present before any server starts).
	chunk := make([]byte, 1<<20)
	rf, err := os.Open("/dev/urandom")
	if err != nil {
		return err
	}
	io.ReadFull(rf, chunk)
	rf.Close()
	for i := 1; i <= b.maxN; i++ {
		f, err := os.Create(filepath.Join(pool, b.nsName(i)))
		if err != nil {
			return err
		}
		if i <= b.active {
			for k := 0; k < activeVol>>20; k++ {
				chunk[0], chunk[1] = byte(i), byte(k) // not all identical
				f.Write(chunk)
			}
		} else {
			f.Truncate(idleVol)
		}
		f.Close()
	}
	// Namespaces, with the kernel's memory before and after (not ours: reported separately).
	syncDropNothing()
	k0, m0 := kernelMem()
	t0 := time.Now()
	for i := 1; i <= b.maxN; i++ {
		if _, err := fleet.Add(b.nsDir, b.nsName(i)); err != nil {
			return err
		}
		b.created = append(b.created, b.nsName(i))
	}
	took := time.Since(t0)
	k1, m1 := kernelMem()
	rep.KernelPerNS = float64(k1-k0) / float64(b.maxN)
	rep.KernelDetail = fmt.Sprintf("Slab %+.1f KiB (SUnreclaim %+.1f), Percpu %+.1f KiB, KernelStack %+.1f KiB per namespace",
		float64(m1["Slab"]-m0["Slab"])/1024/float64(b.maxN), float64(m1["SUnreclaim"]-m0["SUnreclaim"])/1024/float64(b.maxN),
		float64(m1["Percpu"]-m0["Percpu"])/1024/float64(b.maxN), float64(m1["KernelStack"]-m0["KernelStack"])/1024/float64(b.maxN))
	rep.NSCreate = took.Seconds() / float64(b.maxN)
	b.logf("created %d namespaces in %v; kernel memory %+.1f KiB each (%s)", b.maxN, took.Round(time.Millisecond), rep.KernelPerNS/1024, rep.KernelDetail)
	// The prober's handles (a namespace fd and a sock_diag socket made inside each namespace),
	// opened now so that no bring-up timed later opens any (after the kernel memory above).
	if b.acceptMethod != "connect" {
		b.acceptMethod = "sock_diag"
	}
	if b.acceptMethod == "sock_diag" {
		if err := diagSelfTest(nil); err != nil {
			b.logf("sock_diag does not see our own listener (%v): bring-up probes connect instead", err)
			b.acceptMethod = "connect"
		}
	}
	if b.acceptMethod == "sock_diag" {
		var err error
		if b.ring, err = newDiagRing(); err == nil {
			if err = diagSelfTest(b.ring); err != nil {
				b.ring.close()
				b.ring = nil
			}
		}
		if err != nil {
			b.logf("no io_uring (%v): sock_diag probes use sendto/recvfrom", err)
		}
	}
	t0 = time.Now()
	if _, _, err := b.handles.get(seq(1, b.maxN)); err != nil {
		return fmt.Errorf("namespace handles: %w", err)
	}
	b.logf("opened the prober's handles of %d namespaces in %v (accepting = %s, io_uring %v)", b.maxN, time.Since(t0).Round(time.Millisecond), b.acceptMethod, b.ring != nil)
	return nil
}

func syncDropNothing() { syscall.Sync() }

// writeConfig writes a configuration serving the tenants idx (1-based).
func (b *bench) writeConfig(path string, idx []int) error {
	var sb strings.Builder
	fmt.Fprintf(&sb, "[server]\nnetns_dir = %q\ndata_dir = %q\nmetrics = \"127.0.0.1:%d\"\ncontrol_socket = %q\n", b.nsDir, filepath.Join(b.work, "pool"), b.metricsPort, b.sockPath)
	for _, i := range idx {
		size := idleVol
		if i <= b.active {
			size = activeVol
		}
		fmt.Fprintf(&sb, "\n[[tenant]]\nname = %q\nnetns = %q\nportal = %q\n  [[tenant.target]]\n  iqn = %q\n    [[tenant.target.lun]]\n    id = 0\n    volume = %q\n    size = \"%dMiB\"\n",
			b.nsName(i), b.nsName(i), portal, iqn, b.nsName(i), size>>20)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(sb.String()), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func seq(from, to int) []int {
	var r []int
	for i := from; i <= to; i++ {
		r = append(r, i)
	}
	return r
}

// ---- bring-up probing ----

// probePause is the least pause between two sweeps of the pending tenants; a pause is never
// shorter than twice the prober's CPU time in the sweep before it either, so the prober takes
// at most a third of a core however many tenants are pending.
var probePause = 2 * time.Millisecond

// acceptStats is how a waitAccepting went: each tenant's time (since exec) of its first
// positive probe, the bounds that the probes put on the first and the last tenant to accept,
// and what the prober cost.
type acceptStats struct {
	T []time.Duration
	// Every tenant began accepting after its last negative probe and by its first positive
	// one, so the first tenant accepted in (FirstLo, first T], the last in [AllLo, last T].
	FirstLo, AllLo time.Duration
	CPU            time.Duration // the prober thread's CPU time, exec to all accepting
	Sweeps         int
	Probes         int
}

// waitAccepting probes every tenant in idx until each accepts (or deadline); it returns each
// tenant's time (since exec) of its first positive probe.
func (b *bench) waitAccepting(s *server, idx []int, deadline time.Duration) ([]time.Duration, error) {
	st, err := b.waitAcceptingStats(s, idx, deadline, b.acceptMethod)
	return st.T, err
}

// waitAcceptingStats looks, in sweeps paced by probePause, for each pending tenant's listener:
// by sock_diag (method "sock_diag", no connection made: diag.go), or by a connect from inside
// the namespace where sock_diag does not work ("connect"). Method "connect-0.5ms" is the earlier
// prober, kept for comparison (-accept-ab): a connect into every pending namespace, 0.5 ms
// between sweeps however long they take.
func (b *bench) waitAcceptingStats(s *server, idx []int, deadline time.Duration, method string) (acceptStats, error) {
	nsfds, diagfds, err := b.handles.get(idx)
	if err != nil {
		return acceptStats{}, err
	}
	type res struct {
		st  acceptStats
		err error
	}
	ch := make(chan res, 1)
	go func() {
		var r res
		defer func() { ch <- r }()
		since := func() time.Duration { return time.Since(s.execAt) }
		var try func(k int) (bool, error)
		// sweep probes the tenants ks and calls seen for each with the result and the times
		// before and after its probe (a sweep through io_uring gives all of them the same).
		var sweep func(ks []int, seen func(i int, ok bool, before, after time.Duration)) error
		if method == "sock_diag" {
			// No namespace to enter: the sockets were made in theirs. Locked for the thread's
			// CPU time and nice level.
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			defer threadNice(b.nice)()
			d := newListenDiag([4]byte{127, 0, 0, 1}, 3260)
			try = func(k int) (bool, error) { return d.listening(diagfds[k]) }
			if b.ring != nil {
				fds, up := make([]int, len(idx)), make([]bool, len(idx))
				sweep = func(ks []int, seen func(int, bool, time.Duration, time.Duration)) error {
					for i, k := range ks {
						fds[i], up[i] = diagfds[k], false
					}
					b.ringMu.Lock()
					before := since()
					err := b.ring.sweep(d, fds[:len(ks)], up[:len(ks)])
					b.ringMu.Unlock()
					if err != nil {
						return err
					}
					after := since()
					for i := range ks {
						seen(i, up[i], before, after)
					}
					return nil
				}
			}
		} else {
			p, err := newProber(3260)
			if err != nil {
				r.err = err
				return
			}
			defer func() {
				if err := p.done(); err != nil {
					r.err = err
				}
			}()
			defer threadNice(b.nice)()
			try = func(k int) (bool, error) { return p.try(nsfds[k]) }
		}
		cpu0 := threadCPU()
		times := make([]time.Duration, len(idx))
		lastNo := make([]time.Duration, len(idx)) // last negative probe (0: exec)
		pending := seq(0, len(idx)-1)
		end := s.execAt.Add(deadline)
		for len(pending) > 0 {
			if time.Now().After(end) {
				r.err = fmt.Errorf("%d of %d tenants not accepting %v after exec (first: %s)", len(pending), len(idx), deadline, b.nsName(idx[pending[0]]))
				return
			}
			if !s.alive() {
				r.err = fmt.Errorf("server exited; see %s", s.logPath)
				return
			}
			c0 := threadCPU()
			next := make([]int, 0, len(pending))
			seen := func(i int, ok bool, before, after time.Duration) {
				k := pending[i]
				r.st.Probes++
				if ok {
					times[k] = after
				} else {
					lastNo[k] = before
					next = append(next, k)
				}
			}
			if sweep != nil {
				if err := sweep(pending, seen); err != nil {
					r.err = err
					return
				}
			} else {
				for i, k := range pending {
					before := since()
					ok, err := try(k)
					if err != nil {
						r.err = err
						return
					}
					seen(i, ok, before, since())
				}
			}
			r.st.Sweeps++
			pending = next
			if len(pending) > 0 {
				// Pacing between sweeps (not a wait for an event: the next sweep looks again),
				// so the prober takes little CPU from the bring-up it measures on 2 cores.
				if method == "connect-0.5ms" {
					time.Sleep(500 * time.Microsecond)
				} else {
					time.Sleep(max(probePause, 2*(threadCPU()-c0)))
				}
			}
		}
		r.st.CPU = threadCPU() - cpu0
		r.st.T = times
		r.st.FirstLo = lastNo[0]
		for k := range idx {
			r.st.FirstLo = min(r.st.FirstLo, lastNo[k])
			r.st.AllLo = max(r.st.AllLo, lastNo[k])
		}
	}()
	r := <-ch
	return r.st, r.err
}

// waitDiscovery runs SendTargets in every tenant of idx (4 workers, each on one locked thread
// that moves between the tenants' namespaces with the fds opened beforehand) until each answers
// with our IQN; it returns each tenant's time since exec. A worker pauses 1 ms after an attempt
// that failed (the tenant not up yet) before it tries again.
func (b *bench) waitDiscovery(s *server, idx []int, deadline time.Duration) ([]time.Duration, error) {
	nsfds, _, err := b.handles.get(idx)
	if err != nil {
		return nil, err
	}
	times := make([]time.Duration, len(idx))
	var next atomic.Int64
	errc := make(chan error, 4)
	end := s.execAt.Add(deadline)
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			home, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				runtime.UnlockOSThread()
				errc <- err
				return
			}
			defer unix.Close(home)
			defer threadNice(b.nice)() // as the load clients
			fail := func(err error) {
				select {
				case errc <- err:
				default:
				}
			}
			for {
				k := int(next.Add(1) - 1)
				if k >= len(idx) {
					break
				}
				if err := unix.Setns(nsfds[k], unix.CLONE_NEWNET); err != nil {
					fail(fmt.Errorf("tenant %s: setns: %w", b.nsName(idx[k]), err))
					break
				}
				for {
					// Dialled from this thread: the socket is made in the tenant's namespace.
					ans, err := discoverHere(portal, initiator)
					if err == nil && strings.Contains(ans, "TargetName="+iqn) {
						times[k] = time.Since(s.execAt)
						break
					}
					if time.Now().After(end) || !s.alive() {
						fail(fmt.Errorf("tenant %s: no SendTargets answer %v after exec: %v %q", b.nsName(idx[k]), deadline, err, ans))
						next.Store(int64(len(idx))) // the others stop too
						break
					}
					time.Sleep(time.Millisecond)
				}
			}
			if err := unix.Setns(home, unix.CLONE_NEWNET); err != nil {
				fail(fmt.Errorf("return to the home namespace: %w", err))
				return // exits locked: the thread dies
			}
			runtime.UnlockOSThread()
		}()
	}
	wg.Wait()
	select {
	case err := <-errc:
		return nil, err
	default:
	}
	return times, nil
}

// ---- load processes ----

type loadProc struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Reader
}

func (b *bench) startLoad(spec loadSpec) (*loadProc, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := b.niced(self, "load")
	cmd.Stderr = os.Stderr
	in, _ := cmd.StdinPipe()
	outp, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	lp := &loadProc{cmd: cmd, in: in, out: bufio.NewReader(outp)}
	raw, _ := json.Marshal(spec)
	in.Write(append(raw, '\n'))
	line, err := lp.out.ReadString('\n')
	if err != nil || line != "ready\n" {
		var res loadResult
		json.Unmarshal([]byte(line), &res)
		cmd.Process.Kill()
		cmd.Wait()
		return nil, fmt.Errorf("load client not ready: %v %s", err, strings.TrimSpace(res.LoginErr+" "+line))
	}
	return lp, nil
}

func (lp *loadProc) goNow() { io.WriteString(lp.in, "go\n") }

func (lp *loadProc) windowEnd() error {
	line, err := lp.out.ReadString('\n')
	if err != nil || line != "window-end\n" {
		return fmt.Errorf("load client: want window-end, got %q %v", line, err)
	}
	return nil
}

func (lp *loadProc) result() (loadResult, error) {
	var res loadResult
	line, err := lp.out.ReadString('\n')
	if err != nil {
		lp.cmd.Wait()
		return res, fmt.Errorf("load client result: %v", err)
	}
	err = json.Unmarshal([]byte(line), &res)
	if werr := lp.cmd.Wait(); werr != nil && err == nil {
		err = werr
	}
	return res, err
}

// ioRun is one measured run.
type ioRun struct {
	IOPS, MiBs  float64
	P50, P99    float64 // microseconds
	ServerCPU   float64 // percent of one core
	UsPerIO     float64
	Threads     int
	RSS         int64
	Errors      uint64
	Asyncs      int
	Err         string
	PerTenant   map[string]*tenantRes `json:"-"`
	WallSeconds float64
}

type tenantRes struct {
	Ops  uint64
	Hist hist
}

// runLoad runs the groups of sessions at once (one process each) for d and measures the server.
func (b *bench) runLoad(s *server, d time.Duration, groups ...[]sessSpec) (ioRun, error) {
	var r ioRun
	var lps []*loadProc
	kill := func() {
		for _, lp := range lps {
			lp.cmd.Process.Kill()
			lp.cmd.Wait()
		}
	}
	for _, g := range groups {
		lp, err := b.startLoad(loadSpec{Sessions: g, Duration: d})
		if err != nil {
			kill()
			return r, err
		}
		lps = append(lps, lp)
	}
	t0 := time.Now()
	c0 := procTicks(s.pid)
	for _, lp := range lps {
		lp.goNow()
	}
	// Threads and RSS sampled mid-run.
	mid := time.AfterFunc(d/2, func() {
		st := procStatus(s.pid)
		r.Threads, r.RSS = st.Threads, st.RSS
	})
	for _, lp := range lps {
		if err := lp.windowEnd(); err != nil {
			kill()
			return r, err
		}
	}
	c1 := procTicks(s.pid)
	wall := time.Since(t0).Seconds()
	mid.Stop()
	var all hist
	var ops, bytes uint64
	r.PerTenant = map[string]*tenantRes{}
	for _, lp := range lps {
		res, err := lp.result()
		if err != nil {
			kill()
			return r, err
		}
		for _, sr := range res.Sessions {
			ops += sr.Ops
			bytes += sr.Bytes
			r.Errors += sr.Errors
			r.Asyncs += sr.Asyncs
			if sr.Err != "" && r.Err == "" {
				r.Err = sr.Tenant + ": " + sr.Err
			}
			if sr.Hist != nil {
				all.add(sr.Hist)
				t := r.PerTenant[sr.Tenant]
				if t == nil {
					t = &tenantRes{}
					r.PerTenant[sr.Tenant] = t
				}
				t.Ops += sr.Ops
				t.Hist.add(sr.Hist)
			}
		}
	}
	r.IOPS = float64(ops) / d.Seconds()
	r.MiBs = float64(bytes) / d.Seconds() / (1 << 20)
	r.P50, r.P99 = all.quantile(0.5), all.quantile(0.99)
	r.WallSeconds = wall
	r.ServerCPU = 100 * float64(c1-c0) / b.hz / wall
	if r.IOPS > 0 {
		r.UsPerIO = 1e4 * r.ServerCPU / r.IOPS
	}
	if r.Errors > 0 || r.Err != "" || r.Asyncs > 0 {
		return r, fmt.Errorf("I/O errors %d, async messages %d, first error %q", r.Errors, r.Asyncs, r.Err)
	}
	return r, nil
}

// sessions makes n sessions spread over tenants idx (round robin).
func (b *bench) sessions(idx []int, n int, write bool, bs, qd int, random bool, isidBase int) []sessSpec {
	var out []sessSpec
	for k := 0; k < n; k++ {
		i := idx[k%len(idx)]
		out = append(out, sessSpec{
			Tenant: b.nsName(i), NSPath: b.nsPath(i), Portal: portal, IQN: iqn,
			Initiator: fmt.Sprintf("%s-%d", initiator, isidBase+k), ISID: byte(isidBase + k),
			Write: write, BS: bs, QD: qd, Random: random, Span: activeVol,
		})
	}
	return out
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func pctl(v []time.Duration, q float64) time.Duration {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	i := int(float64(len(s))*q+0.999999) - 1
	return s[max(0, min(i, len(s)-1))]
}

var errStop = errors.New("stop")
