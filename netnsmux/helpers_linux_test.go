package netnsmux

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// testPrefix makes every namespace name this test binary creates unique per run.
var testPrefix = fmt.Sprintf("nsmx%d", os.Getpid())

// patience bounds every wait for something that must happen (an event, a close, an answer). It
// only turns a hang into a failure: a passing test waits as long as the event takes, and `make
// test` runs this package beside the race-enabled e2e suites on two cores.
const patience = 60 * time.Second

func TestMain(m *testing.M) {
	switch os.Getenv("NETNSMUX_HELPER") {
	case "server":
		os.Exit(helperServer())
	case "mainthread":
		os.Exit(helperMainThread())
	}
	code := m.Run()
	removeBenchPool()
	os.Exit(code)
}

// onThreadIn runs fn on a fresh locked thread inside the namespace at path (or a new namespace if
// path is ""), then brings the thread home. If that fails the goroutine exits locked and the thread
// dies with it, exactly the rule the package follows.
func onThreadIn(path string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		home, err := unix.Open("/proc/self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- err
			runtime.UnlockOSThread()
			return
		}
		defer unix.Close(home)
		if path == "" {
			err = unix.Unshare(unix.CLONE_NEWNET)
		} else {
			var fd int
			fd, err = unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
			if err == nil {
				if _, err = checkNSFD(fd, false); err == nil {
					err = unix.Setns(fd, unix.CLONE_NEWNET)
				}
				unix.Close(fd)
			}
		}
		if err != nil {
			errc <- err
			runtime.UnlockOSThread()
			return
		}
		ferr := fn()
		if err := unix.Setns(home, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("restore: %w", err)
			return // exit locked
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// threadNetnsID is NS_GET_ID of the calling thread's network namespace.
func threadNetnsID() (ID, error) {
	fd, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	id, err := unix.IoctlGetUint64(fd, unix.NS_GET_ID)
	return ID(id), err
}

func setLoUp() error {
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(s)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(s, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	return unix.IoctlIfreq(s, unix.SIOCSIFFLAGS, ifr)
}

// makeNS creates a named namespace the way `ip netns add` does, in-process: a mode-000
// placeholder first, then a new namespace bind-mounted onto it. gap delays the mount to widen
// the placeholder window. Returns the new namespace's id.
func makeNS(path string, loUp bool, gap time.Duration) (ID, error) {
	id, _, err := makeNSTimed(path, loUp, gap)
	return id, err
}

// makeNSTimed is makeNS that also returns when the bind mount completed.
func makeNSTimed(path string, loUp bool, gap time.Duration) (ID, time.Time, error) {
	var mounted time.Time
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0)
	if err != nil {
		return 0, mounted, err
	}
	f.Close()
	if gap > 0 {
		time.Sleep(gap)
	}
	var id ID
	err = onThreadIn("", func() error {
		if loUp {
			if err := setLoUp(); err != nil {
				return fmt.Errorf("lo up: %w", err)
			}
		}
		var err error
		if id, err = threadNetnsID(); err != nil {
			return err
		}
		err = unix.Mount("/proc/thread-self/ns/net", path, "none", unix.MS_BIND, "")
		mounted = time.Now()
		return err
	})
	if err != nil {
		os.Remove(path)
		return 0, mounted, fmt.Errorf("make namespace %s: %w", path, err)
	}
	return id, mounted, nil
}

// dropNS removes a named namespace the way `ip netns del` does.
func dropNS(path string) error {
	err := unix.Unmount(path, unix.MNT_DETACH)
	if rerr := os.Remove(path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
		return rerr
	}
	if err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return err
	}
	return nil
}

// nsDir is a private namespace directory whose contents are always unmounted at the end.
func nsDir(t testing.TB) string {
	dir := t.TempDir()
	t.Cleanup(func() {
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			dropNS(filepath.Join(dir, e.Name()))
		}
	})
	return dir
}

func mustMakeNS(t testing.TB, dir, name string) ID {
	t.Helper()
	id, err := makeNS(filepath.Join(dir, name), true, 0)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// dialFrom connects to addr from inside the namespace at path and writes the namespace id the
// client itself observes (NS_GET_ID of its own thread) as the first 8 bytes.
func dialFrom(path, addr string) (net.Conn, ID, error) {
	var c net.Conn
	var id ID
	err := onThreadIn(path, func() error {
		var err error
		if id, err = threadNetnsID(); err != nil {
			return err
		}
		// The socket is created on this thread, so in this namespace; connect completes later
		// on whatever thread, which does not matter any more.
		c, err = net.DialTimeout("tcp", addr, patience)
		return err
	})
	if err != nil {
		return nil, 0, err
	}
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], uint64(id))
	if _, err := c.Write(b[:]); err != nil {
		c.Close()
		return nil, 0, err
	}
	return c, id, nil
}

// readClientID reads the id a dialFrom client sent.
func readClientID(c net.Conn) (ID, error) {
	var b [8]byte
	c.SetReadDeadline(time.Now().Add(patience))
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return 0, err
	}
	c.SetReadDeadline(time.Time{})
	return ID(binary.LittleEndian.Uint64(b[:])), nil
}

func countFDs(t testing.TB) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func procStatus(pid int, key string) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, key+":"); ok {
			f := strings.Fields(v)
			if len(f) > 0 {
				n, _ := strconv.Atoi(f[0])
				return n
			}
		}
	}
	return -1
}

// threadsAway lists the threads of this process whose network namespace is not the process's.
func threadsAway() []string {
	home, _ := os.Readlink("/proc/self/ns/net")
	ents, _ := os.ReadDir("/proc/self/task")
	var out []string
	for _, e := range ents {
		l, err := os.Readlink("/proc/self/task/" + e.Name() + "/ns/net")
		if err == nil && l != home {
			out = append(out, e.Name()+"="+l)
		}
	}
	return out
}

// checkNoLeaks fails unless fds and goroutines are back to the baseline taken before a Mux was
// made, and no thread of the process is left in another network namespace.
func checkNoLeaks(t testing.TB, fds0, g0 int) {
	t.Helper()
	waitFor(t, patience, "fd count back to baseline", func() bool { return countFDs(t) <= fds0 })
	waitFor(t, patience, "goroutines back to baseline", func() bool { return runtime.NumGoroutine() <= g0 })
	if away := threadsAway(); len(away) != 0 {
		t.Fatalf("threads left in tenant namespaces: %v", away)
	}
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	end := time.Now().Add(d)
	for !cond() {
		if time.Now().After(end) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// recorder keeps every event.
type recorder struct {
	mu  sync.Mutex
	evs []Event
}

func (r *recorder) add(e Event) {
	r.mu.Lock()
	r.evs = append(r.evs, e)
	r.mu.Unlock()
}

func (r *recorder) all() []Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Event(nil), r.evs...)
}

func (r *recorder) count(kind EventKind, name string) int {
	n := 0
	for _, e := range r.all() {
		if e.Kind == kind && (name == "" || e.Namespace == name) {
			n++
		}
	}
	return n
}

// has reports whether an event of kind for name with the given id (0: any) was seen.
func (r *recorder) has(kind EventKind, name string, id ID) bool {
	for _, e := range r.all() {
		if e.Kind == kind && e.Namespace == name && (id == 0 || e.ID == id) {
			return true
		}
	}
	return false
}

// replaced reports whether name was seen replaced from namespace old to id.
func (r *recorder) replaced(name string, id, old ID) bool {
	for _, e := range r.all() {
		if e.Kind == NamespaceReplaced && e.Namespace == name && e.ID == id && e.OldID == old {
			return true
		}
	}
	return false
}

// closedByServer returns nil if the peer of c closed it (EOF or reset) within patience.
func closedByServer(c net.Conn) error {
	c.SetReadDeadline(time.Now().Add(patience))
	_, err := c.Read(make([]byte, 1))
	switch {
	case err == nil:
		return errors.New("still open: read data")
	case errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Errorf("not closed by the server within %v", patience)
	}
	return nil
}

// serve starts a Mux on dir and returns it with its event recorder; Close runs in Cleanup.
func serve(t testing.TB, dir string, tweak func(*Mux)) (*Mux, *recorder) {
	t.Helper()
	rec := &recorder{}
	m, err := New(Options{Dir: dir, OnEvent: rec.add, RetryMin: 10 * time.Millisecond, RetryMax: 200 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if tweak != nil {
		tweak(m)
	}
	done := make(chan error, 1)
	go func() { done <- m.Run(context.Background()) }()
	t.Cleanup(func() {
		m.Close()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return m, rec
}

// checker accepts conns (startChecker) and verifies the id each client reports against the tag.
type checker struct {
	mu         sync.Mutex
	ok, bad    int
	lastErr    error
	byNS       map[string]int
	wg         sync.WaitGroup
	keepOpen   bool
	mismatches []string
}

func startChecker(ctx context.Context, m *Mux, keepOpen bool) *checker {
	ck := &checker{byNS: map[string]int{}, keepOpen: keepOpen}
	ck.wg.Add(1)
	go func() {
		defer ck.wg.Done()
		for {
			c, err := m.Accept(ctx)
			if err != nil {
				return
			}
			ck.wg.Add(1)
			go func() {
				defer ck.wg.Done()
				id, err := readClientID(c)
				ck.mu.Lock()
				switch {
				case err != nil:
					ck.lastErr = err // client gave up or namespace went away: not a mismatch
				case id == c.ID:
					ck.ok++
					ck.byNS[c.Namespace]++
				default:
					ck.bad++
					ck.mismatches = append(ck.mismatches, fmt.Sprintf("%s: tagged %d, client says %d", c.Namespace, c.ID, id))
				}
				ck.mu.Unlock()
				if err == nil {
					var b [1]byte
					c.Write(b[:]) // ack
				}
				if !keepOpen || err != nil {
					c.Close()
				}
			}()
		}
	}()
	return ck
}

func (ck *checker) counts() (ok, bad int) {
	ck.mu.Lock()
	defer ck.mu.Unlock()
	return ck.ok, ck.bad
}

// ackedDial dials from the namespace at path and waits for the server's ack, so the caller knows
// the connection was accepted and checked.
func ackedDial(path, addr string) (net.Conn, ID, error) {
	c, id, err := dialFrom(path, addr)
	if err != nil {
		return nil, 0, err
	}
	var b [1]byte
	c.SetReadDeadline(time.Now().Add(patience))
	if _, err := io.ReadFull(c, b[:]); err != nil {
		c.Close()
		return nil, 0, fmt.Errorf("no ack: %w", err)
	}
	c.SetReadDeadline(time.Time{})
	return c, id, nil
}

// dialAndCheck dials portal from the namespace at path, waits for the server's ack (the conn was
// accepted and its tag checked) and closes it; it fails unless the client's own namespace id is
// want (0: any).
func dialAndCheck(t testing.TB, path string, want ID) {
	t.Helper()
	c, got, err := ackedDial(path, portal)
	if err != nil {
		t.Fatalf("dial from %s: %v", path, err)
	}
	c.Close()
	if want != 0 && got != want {
		t.Fatalf("client in %s is in namespace %d, want %d", path, got, want)
	}
}

func ipNetns(t testing.TB, args ...string) {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"netns"}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns %v: %v: %s (install iproute2: apt-get install iproute2)", args, err, out)
	}
}

// helperMainThread runs on the main goroutine of a fresh process and reports whether it ever ran
// on a thread other than the main thread (tid == pid) while other goroutines keep every P busy.
func helperMainThread() int {
	stop := make(chan struct{})
	for i := 0; i < 4; i++ {
		go func() {
			for {
				select {
				case <-stop:
					return
				default:
					time.Sleep(10 * time.Microsecond)
				}
			}
		}()
	}
	// Main is woken by short-lived goroutines: an unlocked main goroutine would next run on the
	// waker's thread (measured: ~96% of wake-ups without the lock).
	moved := 0
	for i := 0; i < 1000; i++ {
		ch := make(chan struct{})
		go func() { time.Sleep(time.Microsecond); close(ch) }()
		<-ch
		if unix.Gettid() != os.Getpid() {
			moved++
		}
	}
	close(stop)
	fmt.Printf("moved=%d\n", moved)
	return 0
}

// helperServer is this test binary re-executed as a standalone server, so thread counts and RSS
// are the server's alone. It reads commands on stdin and answers one line each:
//
//	listen NAME ADDR | listenmany PREFIX N ADDR | golisten PREFIX FROM TO ADDR | run | wait N (listeners up; prints ms since run)
//	stats | quit
func helperServer() int {
	var up atomic.Int64 // ListenerUp events: polled without touching the Mux's lock
	m, err := New(Options{Dir: os.Getenv("NETNSMUX_DIR"), Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		OnEvent: func(e Event) {
			if e.Kind == ListenerUp {
				up.Add(1)
			}
		}})
	if err != nil {
		fmt.Println("error", err)
		return 1
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var started time.Time
	runDone := make(chan error, 1)
	var mismatches, goListeners int
	var mu sync.Mutex
	go func() {
		for {
			c, err := m.Accept(ctx)
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				id, err := readClientID(c)
				if err != nil {
					return
				}
				verdict := "ok"
				if id != c.ID {
					verdict = "mismatch"
					mu.Lock()
					mismatches++
					mu.Unlock()
				}
				fmt.Fprintf(c, "%s %d %s %s\n", c.Namespace, c.ID, c.LocalAddr(), verdict)
			}()
		}
	}()
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "listen":
			err = m.Listen(f[1], f[2])
			fmt.Println("ok", err)
		case "listenmany":
			n, _ := strconv.Atoi(f[2])
			for i := 0; i < n; i++ {
				m.Listen(fmt.Sprintf("%s%d", f[1], i), f[3])
			}
			fmt.Println("ok")
		case "golisten":
			// The alternative design, for comparison only: one goroutine per listener blocked
			// in Go's own netpoller (sockets still created inside each namespace via Do).
			from, _ := strconv.Atoi(f[2])
			to, _ := strconv.Atoi(f[3])
			for i := from; i < to; i++ {
				var l net.Listener
				if err := m.Do(ctx, fmt.Sprintf("%s%d", f[1], i), func() error {
					var err error
					l, err = net.Listen("tcp", f[4])
					return err
				}); err != nil {
					fmt.Println("error", err)
					continue
				}
				goListeners++
				go func() {
					for {
						c, err := l.Accept()
						if err != nil {
							return
						}
						c.Close()
					}
				}()
			}
			fmt.Println("ok")
		case "run":
			started = time.Now()
			go func() { runDone <- m.Run(ctx) }()
			fmt.Println("ok")
		case "wait":
			n, _ := strconv.Atoi(f[1])
			for up.Load() < int64(n) {
				time.Sleep(50 * time.Microsecond)
			}
			fmt.Printf("ok %.3f\n", float64(time.Since(started).Microseconds())/1000)
		case "stats":
			// Idle footprint: what the heap holds after GC, with freed pages handed back
			// (the background scavenger would do the same, only later).
			debug.FreeOSMemory()
			s := m.Stats()
			mu.Lock()
			mm := mismatches
			mu.Unlock()
			ents, _ := os.ReadDir("/proc/self/fd")
			fmt.Printf("ok threads=%d rss_kb=%d fds=%d listeners=%d namespaces=%d mismatches=%d switches=%d skips=%d goroutines=%d\n",
				procStatus(os.Getpid(), "Threads"), procStatus(os.Getpid(), "VmRSS"), len(ents), s.Listeners+goListeners,
				s.Namespaces, mm+int(s.Mismatches), s.Switches, s.Skips, runtime.NumGoroutine())
		case "quit":
			cancel()
			m.Close()
			fmt.Println("ok")
			return 0
		default:
			fmt.Println("error unknown command")
		}
	}
	m.Close()
	return 0
}

// helperProc drives a helperServer subprocess.
type helperProc struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Scanner
}

func startHelper(t testing.TB, dir string) *helperProc {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "NETNSMUX_HELPER=server", "NETNSMUX_DIR="+dir, "GOMAXPROCS=2")
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	outp, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	h := &helperProc{cmd: cmd, in: in, out: bufio.NewScanner(outp)}
	t.Cleanup(func() {
		in.Close()
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	return h
}

// call sends one command and returns the fields of the answer after "ok".
func (h *helperProc) call(t testing.TB, cmd string) map[string]string {
	t.Helper()
	fmt.Fprintln(h.in, cmd)
	if !h.out.Scan() {
		t.Fatalf("helper server died during %q", cmd)
	}
	line := h.out.Text()
	f := strings.Fields(line)
	if len(f) == 0 || f[0] != "ok" {
		t.Fatalf("helper server: %q -> %q", cmd, line)
	}
	kv := map[string]string{}
	for i, x := range f[1:] {
		if k, v, ok := strings.Cut(x, "="); ok {
			kv[k] = v
		} else {
			kv[strconv.Itoa(i)] = x
		}
	}
	return kv
}

func atoi(t testing.TB, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatalf("not a number: %q", s)
	}
	return n
}
