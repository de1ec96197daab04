// Package cephtest runs a throwaway Ceph cluster for tests: one monitor and one memstore OSD,
// listening on a random loopback port, with authentication off and a single pool of size 1.
// Everything lives in the directory given to Start, and Stop kills exactly the daemons Start
// started and removes that directory, so clusters in different directories can run in
// parallel.
//
// It needs the Debian packages ceph-mon, ceph-osd and ceph-common (scripts/deps.sh installs
// them); when a binary is missing, Start fails with an error saying so, and the caller's test
// should fail with it rather than skip: a skipped backend test is a backend nobody tested.
package cephtest

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"nstarget/tests/childproc"
)

// startTimeout bounds each step of Start that waits for the cluster (every step normally
// takes well under a second; a loaded CI machine may need much more).
const startTimeout = 90 * time.Second

// Daemon names one of the cluster's processes for Pause and Resume.
type Daemon int

const (
	Mon Daemon = iota
	OSD
)

func (d Daemon) String() string {
	if d == Mon {
		return "mon.a"
	}
	return "osd.0"
}

// Cluster is a running throwaway cluster.
type Cluster struct {
	// Dir holds the configuration, the daemons' data (the OSD's is in memory) and logs.
	Dir string
	// ConfPath is the ceph.conf clients must use.
	ConfPath string
	// Pool is the pool created for the tests, initialised for RBD.
	Pool string

	procs [2]*childproc.Proc // indexed by Daemon
}

// tools are the binaries Start runs.
var tools = []string{"ceph-mon", "ceph-osd", "monmaptool", "ceph", "rbd"}

// Start creates dir (which must not exist or be empty), starts the cluster in it and returns
// once the pool serves I/O. On error everything started is stopped again and dir removed.
func Start(dir string) (*Cluster, error) {
	for _, t := range tools {
		if _, err := exec.LookPath(t); err != nil {
			return nil, fmt.Errorf("cephtest: %s not found in PATH (the ceph packages are missing): run scripts/deps.sh as root", t)
		}
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("cephtest: %w", err)
	}
	c := &Cluster{Dir: abs, ConfPath: filepath.Join(abs, "ceph.conf"), Pool: "rbd"}
	if err := c.start(); err != nil {
		c.Stop()
		return nil, err
	}
	return c, nil
}

func (c *Cluster) start() error {
	for _, sub := range []string{"mon", "osd", "run", "log"} {
		if err := os.MkdirAll(filepath.Join(c.Dir, sub), 0o750); err != nil {
			return fmt.Errorf("cephtest: %w", err)
		}
	}
	fsid, err := uuid()
	if err != nil {
		return fmt.Errorf("cephtest: fsid: %w", err)
	}
	port, err := freePort()
	if err != nil {
		return fmt.Errorf("cephtest: pick a monitor port: %w", err)
	}
	if err := os.WriteFile(c.ConfPath, []byte(conf(c.Dir, fsid, port)), 0o640); err != nil {
		return fmt.Errorf("cephtest: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()

	monmap := filepath.Join(c.Dir, "monmap")
	if err := run(ctx, "monmaptool", "--create", "--fsid", fsid, "--addv", "a", fmt.Sprintf("[v2:127.0.0.1:%d]", port), monmap); err != nil {
		return err
	}
	// The two mkfs steps are independent; --no-mon-config keeps the OSD's from waiting for a
	// monitor that is not running yet.
	var wg sync.WaitGroup
	var monErr, osdErr error
	wg.Go(func() {
		monErr = run(ctx, "ceph-mon", "-c", c.ConfPath, "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", "/dev/null")
	})
	wg.Go(func() {
		osdErr = run(ctx, "ceph-osd", "-c", c.ConfPath, "--mkfs", "-i", "0", "--no-mon-config")
	})
	wg.Wait()
	if err := errors.Join(monErr, osdErr); err != nil {
		return err
	}
	if err := c.spawn(Mon, "ceph-mon", "-c", c.ConfPath, "-f", "-i", "a"); err != nil {
		return err
	}
	// One `ceph` process for every monitor command (each start of the CLI costs ~0.3 s).
	// The commands wait for the monitor to come up; fsid proves it is ours and not a stale
	// monitor that happened to own the port.
	out, err := c.cli(ctx, "ceph", []string{"-c", c.ConfPath},
		"osd create\n"+
			"osd crush add osd.0 1 root=default\n"+
			"osd pool create "+c.Pool+" 8\n"+
			"osd pool application enable "+c.Pool+" rbd\n"+
			"fsid\n")
	if err != nil {
		return err
	}
	for _, want := range []string{"pool '" + c.Pool + "' created", "enabled application 'rbd'", fsid} {
		if !strings.Contains(out, want) {
			return fmt.Errorf("cephtest: monitor setup: %q missing from output:\n%s\n%s", want, out, c.logTail(Mon))
		}
	}
	if err := c.spawn(OSD, "ceph-osd", "-c", c.ConfPath, "-f", "-i", "0"); err != nil {
		return err
	}
	// Listing the pool reads an object from it, so it returns exactly when the OSD has booted
	// and the pool's placement group is active.
	if _, err := c.cli(ctx, "rbd", []string{"-c", c.ConfPath, "ls", "-p", c.Pool}, ""); err != nil {
		return err
	}
	return nil
}

// conf is the cluster's ceph.conf. Clients read the [global] and [client] sections.
func conf(dir, fsid string, port int) string {
	return fmt.Sprintf(`[global]
fsid = %[2]s
mon host = v2:127.0.0.1:%[3]d
ms bind msgr1 = false
public addr = 127.0.0.1
run dir = %[1]s/run
log file = %[1]s/log/$name.log
admin socket = $run_dir/$name.$pid.asok
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
# commit monitor changes after 50 ms instead of 1 s: cluster start-up is a chain of them
paxos propose interval = 0.05
# the monitor must not stop because the test machine's disk is fuller than a real cluster's
mon data avail crit = 0
# a client waiting for an OSD to come up re-checks every 0.25 s instead of every 5 s
objecter tick interval = 0.25
client mount timeout = 30
rados mon op timeout = 30
rados osd op timeout = 30

[mon]
mon data = %[1]s/mon

[osd]
osd data = %[1]s/osd
osd objectstore = memstore
# held in RAM; tests keep their images far below this, as a nearly full OSD stalls writes
memstore device bytes = 1073741824
osd class load list = *
osd class default list = *
`, dir, fsid, port)
}

// spawn starts a daemon in the foreground (-f) as a child of this process (which it dies
// with: childproc), output to log/.
func (c *Cluster) spawn(d Daemon, name string, args ...string) error {
	logf, err := os.Create(filepath.Join(c.Dir, "log", d.String()+".out"))
	if err != nil {
		return fmt.Errorf("cephtest: %w", err)
	}
	defer logf.Close() // the child has its own copy
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	p, err := childproc.Start(cmd, d.String())
	if err != nil {
		return fmt.Errorf("cephtest: %w", err)
	}
	c.procs[d] = p
	return nil
}

// cli runs a client command, fed stdin, and returns its combined output. It gives up when
// ctx ends or as soon as a daemon dies, so a monitor that could not bind its port fails
// Start at once instead of after the timeout.
func (c *Cluster) cli(ctx context.Context, name string, args []string, stdin string) (string, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stop := make(chan struct{})
	defer close(stop)
	for _, p := range c.procs {
		if p == nil {
			continue
		}
		go func() {
			select {
			case <-p.Done():
				cancel(fmt.Errorf("%s exited: %v", p.Name, p.Err()))
			case <-stop:
			}
		}()
	}
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdin = strings.NewReader(stdin)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if cause := context.Cause(ctx); cause != nil {
		return "", fmt.Errorf("cephtest: %s %s: %w\n%s\n%s", name, strings.Join(args, " "), cause, out.String(), c.logTail(Mon))
	}
	if err != nil {
		return "", fmt.Errorf("cephtest: %s %s: %w\n%s", name, strings.Join(args, " "), err, out.String())
	}
	return out.String(), nil
}

// Ceph runs the ceph CLI against the cluster (e.g. "osd", "blocklist", "ls") and returns its
// standard output.
func (c *Cluster) Ceph(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ceph", append([]string{"-c", c.ConfPath}, args...)...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("cephtest: ceph %s: %w: %s", strings.Join(args, " "), err, errOut.String())
	}
	return out.String(), nil
}

// Pause stops a daemon with SIGSTOP, as a hung node would; Resume continues it.
func (c *Cluster) Pause(d Daemon) error { return c.signal(d, syscall.SIGSTOP) }

// Resume continues a daemon stopped by Pause.
func (c *Cluster) Resume(d Daemon) error { return c.signal(d, syscall.SIGCONT) }

func (c *Cluster) signal(d Daemon, sig syscall.Signal) error {
	p := c.procs[d]
	if p == nil {
		return fmt.Errorf("cephtest: %s is not running", d)
	}
	if p.Exited() {
		return fmt.Errorf("cephtest: %s has exited: %v", d, p.Err())
	}
	if err := p.Cmd.Process.Signal(sig); err != nil {
		return fmt.Errorf("cephtest: signal %s: %w", d, err)
	}
	return nil
}

// Stop kills the daemons Start started (by PID, with SIGKILL, which also ends a paused one),
// waits for them to exit and removes the directory. The data is in memory, so no clean shutdown is
// owed to anyone.
func (c *Cluster) Stop() error {
	for _, p := range c.procs {
		if p == nil {
			continue
		}
		p.Kill()
	}
	if err := os.RemoveAll(c.Dir); err != nil {
		return fmt.Errorf("cephtest: %w", err)
	}
	return nil
}

// logTail is the end of a daemon's log, for errors that need it.
func (c *Cluster) logTail(d Daemon) string {
	var b strings.Builder
	for _, f := range []string{d.String() + ".out", d.String() + ".log"} {
		data, err := os.ReadFile(filepath.Join(c.Dir, "log", f))
		if err != nil || len(data) == 0 {
			continue
		}
		if len(data) > 2000 {
			data = data[len(data)-2000:]
		}
		fmt.Fprintf(&b, "--- %s (tail)\n%s\n", f, data)
	}
	return b.String()
}

// run runs a setup command and returns its output as the error when it fails.
func run(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("cephtest: %s %s: %w\n%s", name, strings.Join(args, " "), err, out)
	}
	return nil
}

// freePort returns a loopback port nobody listens on right now. Another process could take
// it before the monitor binds; the monitor then exits, and Start fails at once saying so.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	_, p, err := net.SplitHostPort(l.Addr().String())
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(p)
}

func uuid() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16]), nil
}
