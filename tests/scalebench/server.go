//go:build linux

package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// server is one running `nstarget serve`.
type server struct {
	cmd      *exec.Cmd
	pid      int
	execAt   time.Time
	logPath  string
	pprof    string
	metrics  string
	exited   chan error
	cfgPath  string
	sockPath string
}

var httpc = &http.Client{Timeout: 30 * time.Second}

func (b *bench) startServer(cfgPath string, tag string) (*server, error) {
	b.serverStarts++
	s := &server{
		logPath:  filepath.Join(b.work, fmt.Sprintf("serve-%03d-%s.log", b.serverStarts, tag)),
		pprof:    fmt.Sprintf("127.0.0.1:%d", b.pprofPort),
		metrics:  fmt.Sprintf("127.0.0.1:%d", b.metricsPort),
		exited:   make(chan error, 1),
		cfgPath:  cfgPath,
		sockPath: b.sockPath,
	}
	lf, err := os.Create(s.logPath)
	if err != nil {
		return nil, err
	}
	s.cmd = b.niced(b.nst, "serve", "-c", cfgPath, "-pprof", s.pprof)
	s.cmd.Stdout, s.cmd.Stderr = lf, lf
	s.cmd.Env = append(os.Environ(), "GOTRACEBACK=all")
	s.execAt = time.Now()
	if err := s.cmd.Start(); err != nil {
		lf.Close()
		return nil, err
	}
	s.pid = s.cmd.Process.Pid
	b.servers[s.pid] = s
	go func() { s.exited <- s.cmd.Wait(); lf.Close() }()
	return s, nil
}

// niced is exec.Command, under `nice -n b.nice` when set (nice execs: the PID is the command's).
func (b *bench) niced(bin string, args ...string) *exec.Cmd {
	if b.nice == 0 {
		return exec.Command(bin, args...)
	}
	return exec.Command("nice", append([]string{"-n", strconv.Itoa(b.nice), bin}, args...)...)
}

// stop sends SIGTERM and waits (KILL after 20 s).
func (b *bench) stopServer(s *server) error {
	if s == nil {
		return nil
	}
	delete(b.servers, s.pid)
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-s.exited:
		return err
	case <-time.After(20 * time.Second):
		s.cmd.Process.Kill()
		<-s.exited
		return fmt.Errorf("server %d did not stop in 20 s; killed", s.pid)
	}
}

func (s *server) alive() bool {
	select {
	case err := <-s.exited:
		s.exited <- err
		return false
	default:
		return true
	}
}

// ticks is utime+stime of the server (all threads) in clock ticks.
func procTicks(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	s = s[strings.LastIndexByte(s, ')')+2:]
	f := strings.Fields(s)
	u, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return u + st
}

type procState struct {
	Threads int
	RSS     int64
	FDs     int
}

func procStatus(pid int) procState {
	var p procState
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return p
	}
	for _, l := range splitLines(string(b)) {
		k, v, ok := strings.Cut(l, ":")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) == 0 {
			continue
		}
		n, _ := strconv.ParseInt(f[0], 10, 64)
		switch k {
		case "VmRSS":
			p.RSS = n << 10
		case "Threads":
			p.Threads = int(n)
		}
	}
	if ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid)); err == nil {
		p.FDs = len(ents)
	}
	return p
}

// usage reads /debug/usage?gc=1 (process part): RSS after a GC and returning memory to the OS.
func (s *server) usage() (procState, error) {
	var u struct {
		Process struct {
			FDs      int   `json:"fds"`
			RSSBytes int64 `json:"rss_bytes"`
			Threads  int   `json:"threads"`
		} `json:"process"`
	}
	resp, err := httpc.Get("http://" + s.pprof + "/debug/usage?gc=1")
	if err != nil {
		return procState{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		return procState{}, fmt.Errorf("/debug/usage: %s: %s", resp.Status, b)
	}
	if err := json.NewDecoder(resp.Body).Decode(&u); err != nil {
		return procState{}, err
	}
	return procState{Threads: u.Process.Threads, RSS: u.Process.RSSBytes, FDs: u.Process.FDs}, nil
}

// setnsCount reads nstarget_netns_setns_total (netnsmux Stats.Switches) from the metrics
// endpoint.
func (s *server) setnsCount() (int64, error) {
	resp, err := httpc.Get("http://" + s.metrics + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if strings.HasPrefix(l, "nstarget_netns_setns_total ") {
			f, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimPrefix(l, "nstarget_netns_setns_total ")), 64)
			return int64(f), err
		}
	}
	return 0, fmt.Errorf("nstarget_netns_setns_total not in /metrics")
}

// waitHTTP waits until the pprof endpoint answers /debug/usage (it is served before tenants
// are set up, the usage only once the server exists).
func (s *server) waitHTTP(deadline time.Duration) error {
	end := time.Now().Add(deadline)
	for time.Now().Before(end) {
		if !s.alive() {
			return fmt.Errorf("server exited; see %s", s.logPath)
		}
		if _, err := s.usage(); err == nil {
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("server's /debug/usage did not answer in %v", deadline)
}

// logTimes returns, from the server's text log, the times (relative to exec) of the "serving"
// line and of every "tenant listening" line.
func (s *server) logTimes() (serving time.Duration, listening []time.Duration) {
	f, err := os.Open(s.logPath)
	if err != nil {
		return 0, nil
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if !strings.HasPrefix(l, "time=") {
			continue
		}
		ts, _, _ := strings.Cut(l[5:], " ")
		t, err := time.Parse(time.RFC3339Nano, ts)
		if err != nil {
			continue
		}
		d := t.Sub(s.execAt)
		switch {
		case strings.Contains(l, `msg="tenant listening"`):
			listening = append(listening, d)
		case strings.Contains(l, "msg=serving"):
			serving = d
		}
	}
	return serving, listening
}
