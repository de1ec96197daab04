// Package vm_test runs the Linux initiator almost every user attaches with — open-iscsi (iscsid,
// iscsiadm, the kernel's iscsi_tcp) — in small qemu guests whose network card is a tap device
// inside a tenant's network namespace, against `nstarget serve` started as an operator would:
// the built binary and a TOML config file.
//
// It owns: the cached guest image (build-image.sh, guest/), namespaces named vme2e-*, their tap
// devices, and the nstarget, qemu (and, for bring-up, tgtd) processes it starts.
// It must never: touch namespaces or processes it did not create (everything is stopped by PID and
// deleted by name in t.Cleanup), send traffic anywhere but into its own namespaces, or install
// anything on the host beyond the Debian packages build-image.sh names.
package vm_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// suite is what every test shares: built once per test binary.
type suite struct {
	here    string   // this package's directory (guest scripts live under it)
	image   string   // directory with vmlinux and initramfs.cpio.gz
	accel   []string // qemu accelerator and CPU arguments
	bin     string   // the nstarget binary, built with -race
	runID   string   // makes namespace names unique per test binary
	cpus    *cpuSlots
	setupIn time.Duration
	// accelWhy says why KVM is not used (empty when it is).
	accelWhy string
}

var (
	suiteOnce sync.Once
	suiteVal  *suite
	suiteErr  error
)

// TestMain removes the nstarget binary the suite built (a -race build is tens of MB).
func TestMain(m *testing.M) {
	code := m.Run()
	if suiteVal != nil {
		os.RemoveAll(filepath.Dir(suiteVal.bin))
	}
	os.Exit(code)
}

// getSuite builds the guest image and nstarget and probes KVM, once; every test fails with the
// same message if that did not work.
func getSuite(t *testing.T) *suite {
	t.Helper()
	first := false
	suiteOnce.Do(func() { suiteVal, suiteErr = newSuite(); first = true })
	if suiteErr != nil {
		t.Fatalf("vm e2e setup: %v", suiteErr)
	}
	if first {
		t.Logf("suite setup %.1fs: image %s, qemu %s %s, nstarget %s", suiteVal.setupIn.Seconds(),
			suiteVal.image, strings.Join(suiteVal.accel, " "), suiteVal.accelWhy, suiteVal.bin)
	}
	return suiteVal
}

func newSuite() (*suite, error) {
	start := time.Now()
	if os.Geteuid() != 0 {
		return nil, errors.New("must run as root (namespaces, tap devices); run `make test` as root")
	}
	for _, tool := range []string{"ip", "qemu-system-x86_64", "iscsi-ls", "bash"} {
		if _, err := lookPath(tool); err != nil {
			return nil, fmt.Errorf("%s not found: run `bash scripts/deps.sh` (Debian: apt-get install iproute2 qemu-system-x86 libiscsi-bin)", tool)
		}
	}
	here, err := os.Getwd()
	if err != nil {
		return nil, err
	}
	// The test binary's PID names this run's namespaces, so namespaces left by a run that was
	// killed (no t.Cleanup) can be told from those of a run still going.
	s := &suite{here: here, runID: strconv.Itoa(os.Getpid()), cpus: newCPUSlots(runtime.NumCPU())}
	sweepStaleNetns()

	// The image build is cached outside the repository; it prints the image directory last.
	var stderr bytes.Buffer
	cmd := exec.Command("bash", filepath.Join(here, "build-image.sh"))
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("build-image.sh: %w\n%s", err, stderr.String())
	}
	lines := strings.Fields(strings.TrimSpace(string(out)))
	if len(lines) == 0 {
		return nil, fmt.Errorf("build-image.sh printed no image directory\n%s", stderr.String())
	}
	s.image = lines[len(lines)-1]

	root, err := moduleRoot()
	if err != nil {
		return nil, err
	}
	binDir, err := os.MkdirTemp("", "vme2e-bin-")
	if err != nil {
		return nil, err
	}
	s.bin = filepath.Join(binDir, "nstarget")
	// -race: the real initiator's traffic is a good race detector workload; reports fail the test.
	build := exec.Command("go", "build", "-race", "-o", s.bin, "./cmd/nstarget")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		os.RemoveAll(binDir)
		return nil, fmt.Errorf("go build ./cmd/nstarget: %w\n%s", err, out)
	}

	s.accel, s.accelWhy = probeAccel(s)
	s.setupIn = time.Since(start)
	return s, nil
}

// probeAccel tries KVM with a guest that passes at once. /dev/kvm exists on hosts (like nested
// cloud VMs) where it cannot run this kernel; qemu then aborts or hangs, and TCG is used.
func probeAccel(s *suite) (accel []string, why string) {
	kvm := []string{"-accel", "kvm", "-cpu", "host"}
	tcg := []string{"-accel", "tcg", "-cpu", "max"}
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return tcg, fmt.Sprintf("(no KVM: %v)", err)
	}
	f.Close()
	dir, err := os.MkdirTemp("", "vme2e-kvm-")
	if err != nil {
		return tcg, fmt.Sprintf("(KVM not probed: %v)", err)
	}
	defer os.RemoveAll(dir)
	script := filepath.Join(dir, "probe.sh")
	if err := os.WriteFile(script, []byte("step kvm-probe\n"), 0o644); err != nil {
		return tcg, fmt.Sprintf("(KVM not probed: %v)", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	args := append(append([]string{}, kvm...), qemuBaseArgs(s.image, "e2e.ip=10.0.0.2/24")...)
	args = append(args, "-nic", "none", "-fw_cfg", "name=opt/e2e/script,file="+script)
	start := time.Now()
	out, err := exec.CommandContext(ctx, "qemu-system-x86_64", args...).CombinedOutput()
	if bytes.Contains(out, []byte("E2E-RESULT PASS")) {
		return kvm, ""
	}
	last := strings.TrimSpace(string(out))
	if i := strings.LastIndex(last, "\n"); i >= 0 {
		last = last[i+1:]
	}
	return tcg, fmt.Sprintf("(KVM probe failed after %.1fs: %v: %s)", time.Since(start).Seconds(), err, last)
}

// kernelArgs trims the guest's boot under TCG: no mitigations, no TSC calibration, no LSMs.
const kernelArgs = "console=ttyS0 quiet loglevel=4 printk.time=0 panic=-1 mitigations=off tsc=reliable no_timer_check " +
	"apparmor=0 security=none audit=0 rcupdate.rcu_expedited=1 nokaslr"

func qemuBaseArgs(image, appendArgs string) []string {
	return []string{
		"-m", "256", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
		"-serial", "stdio", "-no-reboot",
		"-kernel", filepath.Join(image, "vmlinux"), "-initrd", filepath.Join(image, "initramfs.cpio.gz"),
		"-append", kernelArgs + " " + appendArgs,
	}
}

// sweepStaleNetns deletes vme2e-<pid>-* namespaces whose test binary no longer runs.
func sweepStaleNetns() {
	entries, err := os.ReadDir("/run/netns")
	if err != nil {
		return
	}
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), "vme2e-")
		if !ok {
			continue
		}
		pid, _, ok := strings.Cut(rest, "-")
		if _, err := strconv.Atoi(pid); !ok || err != nil {
			continue
		}
		if _, err := os.Stat("/proc/" + pid); errors.Is(err, os.ErrNotExist) {
			delNetns(e.Name())
		}
	}
}

func moduleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("not inside the nstarget module")
	}
	return filepath.Dir(gomod), nil
}

func lookPath(tool string) (string, error) {
	if p, err := exec.LookPath(tool); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin", "/sbin"} {
		p := filepath.Join(d, tool)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: not found", tool)
}

// run runs a command and fails the test with its output if it fails.
func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// --- namespaces ---------------------------------------------------------------------------

// Every tenant namespace looks the same from inside: tap0 with the target address 10.0.0.1/24;
// the guest on the other end of tap0 is 10.0.0.2.
const (
	targetAddr = "10.0.0.1"
	guestCIDR  = "10.0.0.2/24"
	portal     = targetAddr + ":3260"
)

// nsName is the namespace name of a tenant in this test binary.
func (s *suite) nsName(tenant string) string { return "vme2e-" + s.runID + "-" + tenant }

// addNetns creates a tenant namespace the way an operator would (ip netns add), with lo and a tap
// device carrying the target address. The namespace is deleted at cleanup even if the test fails.
func addNetns(t *testing.T, ns string) {
	t.Helper()
	run(t, "ip", "netns", "add", ns)
	t.Cleanup(func() { delNetns(ns) })
	setupNetns(t, ns)
}

func setupNetns(t *testing.T, ns string) {
	t.Helper()
	run(t, "ip", "-n", ns, "link", "set", "lo", "up")
	run(t, "ip", "-n", ns, "tuntap", "add", "dev", "tap0", "mode", "tap")
	run(t, "ip", "-n", ns, "addr", "add", targetAddr+"/24", "dev", "tap0")
	run(t, "ip", "-n", ns, "link", "set", "tap0", "up")
}

// delNetns deletes a namespace this package created; its tap goes with it. Missing is fine.
func delNetns(ns string) {
	if _, err := os.Stat(filepath.Join("/run/netns", ns)); err == nil {
		_ = exec.Command("ip", "netns", "del", ns).Run()
	}
}

// patience bounds every wait for the server, the kernel or a tool on the host side. It only turns
// a hang into a failure: a wait that succeeds is as fast as the event it waits for, and `make test`
// runs TCG guests, a -race server and other packages on the same two cores.
const patience = 90 * time.Second

// waitPortal waits until something accepts TCP connections on the portal inside ns.
func waitPortal(ns string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		err := exec.Command("ip", "netns", "exec", ns, "bash", "-c",
			"exec 3<>/dev/tcp/"+targetAddr+"/3260").Run()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("nothing accepts on %s in namespace %s after %v", portal, ns, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// --- processes ----------------------------------------------------------------------------

// proc is a child process this package started; stop and kill act on its PID only.
type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	err  error // valid after done
}

// startProc starts cmd; the child dies with the test binary (a timeout panic skips t.Cleanup).
func startProc(cmd *exec.Cmd, name string) (*proc, error) {
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *proc) kill() {
	_ = p.cmd.Process.Kill()
	<-p.done
}

// stop sends SIGTERM and waits up to grace for the exit, then SIGKILL.
func (p *proc) stop(grace time.Duration) (killed bool) {
	if p.exited() {
		return false
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return false
	case <-time.After(grace):
	}
	_ = p.cmd.Process.Kill()
	<-p.done
	return true
}

// --- guests -------------------------------------------------------------------------------

// guestSpec says what one VM runs and where.
type guestSpec struct {
	name   string            // for logs
	ns     string            // the tenant namespace its NIC (tap0) lives in
	script string            // file under guest/ run by /init
	params map[string]string // become e2e.KEY=VALUE on the kernel command line ($E2E_KEY)
	data   []byte            // optional, readable in the guest as `fw_file data`
}

// guest is a running VM; its serial console is collected line by line.
type guest struct {
	spec  guestSpec
	t     *testing.T
	start time.Time
	proc  *proc
	stdin io.WriteCloser // the guest's serial input: lines for host_listen in guest/lib.sh

	mu      sync.Mutex
	lines   []string
	stamps  []time.Duration
	changed chan struct{} // closed and replaced on every new line
	readers sync.WaitGroup
}

// cpuSlots limits how many TCG guests run at once to the number of CPUs: more would not finish
// sooner, only stretch every guest's timings. acquire(n) takes n slots at once, so a test that
// needs two guests side by side never holds one slot while waiting for another.
type cpuSlots struct {
	mu       sync.Mutex
	cond     *sync.Cond
	free     int
	capacity int
}

func newCPUSlots(n int) *cpuSlots {
	c := &cpuSlots{free: max(n, 1), capacity: max(n, 1)}
	c.cond = sync.NewCond(&c.mu)
	return c
}

func (c *cpuSlots) acquire(n int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	n = min(n, c.capacity)
	for c.free < n {
		c.cond.Wait()
	}
	c.free -= n
}

func (c *cpuSlots) release() {
	c.mu.Lock()
	c.free++
	c.mu.Unlock()
	c.cond.Broadcast()
}

// bootGuests boots the guests side by side once there are CPUs for all of them; each one's CPU
// slot is given back when its qemu exits.
func (s *suite) bootGuests(t *testing.T, specs ...guestSpec) []*guest {
	t.Helper()
	s.cpus.acquire(len(specs))
	gs := make([]*guest, 0, len(specs))
	booted := 0
	defer func() {
		for ; booted < len(specs); booted++ {
			s.cpus.release() // a boot failed (t.Fatal): free what was not handed to a guest
		}
	}()
	for _, spec := range specs {
		g := s.bootGuest(t, spec)
		booted++
		go func() {
			<-g.proc.done
			s.cpus.release()
		}()
		gs = append(gs, g)
	}
	return gs
}

// bootGuest starts qemu inside spec.ns (ip netns exec … qemu-system-x86_64) with the tap as its
// NIC. The VM is killed and its console dumped (on failure) at cleanup.
func (s *suite) bootGuest(t *testing.T, spec guestSpec) *guest {
	t.Helper()
	dir := t.TempDir()
	var kv []string
	for k, v := range spec.params {
		kv = append(kv, "e2e."+k+"="+v)
	}
	args := []string{"netns", "exec", spec.ns, "qemu-system-x86_64"}
	args = append(args, s.accel...)
	args = append(args, qemuBaseArgs(s.image, "e2e.ip="+guestCIDR+" e2e.portal="+portal+" "+strings.Join(kv, " "))...)
	args = append(args,
		"-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
		"-device", "virtio-net-pci,netdev=n0",
		"-fw_cfg", "name=opt/e2e/lib,file="+filepath.Join(s.here, "guest", "lib.sh"),
		"-fw_cfg", "name=opt/e2e/script,file="+filepath.Join(s.here, "guest", spec.script))
	if spec.data != nil {
		f := filepath.Join(dir, "data")
		if err := os.WriteFile(f, spec.data, 0o644); err != nil {
			t.Fatal(err)
		}
		args = append(args, "-fw_cfg", "name=opt/e2e/data,file="+f)
	}
	cmd := exec.Command("ip", args...)
	// A pipe of our own rather than cmd.StdoutPipe: Wait (which startProc calls at once) closes
	// that one as soon as qemu exits, dropping whatever the reader has not read yet, which is the
	// guest's last lines and its verdict whenever the reader is behind on a loaded machine. This
	// one is read to EOF and closed by the reader.
	console, consoleW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = consoleW, consoleW // qemu's own errors land in the same log
	// -serial stdio: what the host writes here arrives on the guest's console.
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	g := &guest{spec: spec, t: t, stdin: stdin, changed: make(chan struct{})}
	g.start = time.Now()
	// ip netns exec execs qemu in place: the PID is qemu's.
	p, err := startProc(cmd, "qemu "+spec.name)
	consoleW.Close() // qemu has its own copy: EOF comes when it exits
	if err != nil {
		console.Close()
		t.Fatal(err)
	}
	g.proc = p
	g.readers.Add(1)
	go g.read(console)
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		<-p.done
		g.readers.Wait()
		if t.Failed() || os.Getenv("NSTARGET_E2E_LOGS") != "" {
			g.mu.Lock()
			t.Logf("console of guest %s:\n%s", spec.name, strings.Join(g.lines, "\n"))
			g.mu.Unlock()
		}
	})
	return g
}

func (g *guest) read(r io.ReadCloser) {
	defer g.readers.Done()
	defer r.Close()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		g.mu.Lock()
		g.lines = append(g.lines, line)
		g.stamps = append(g.stamps, time.Since(g.start))
		close(g.changed)
		g.changed = make(chan struct{})
		g.mu.Unlock()
	}
	g.mu.Lock()
	close(g.changed) // wake waiters on EOF; the last channel stays closed
	g.mu.Unlock()
}

// waitLine waits for the first console line starting with prefix and returns it with the time
// since boot it arrived. It fails early if the guest ends (a result line) first.
func (g *guest) waitLine(prefix string, timeout time.Duration) (string, time.Duration, error) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		g.mu.Lock()
		for i, l := range g.lines {
			if strings.HasPrefix(l, prefix) {
				at := g.stamps[i]
				g.mu.Unlock()
				return l, at, nil
			}
			if strings.HasPrefix(l, "E2E-RESULT") {
				g.mu.Unlock()
				return "", 0, fmt.Errorf("guest %s ended before %q: %s", g.spec.name, prefix, l)
			}
		}
		ch := g.changed
		g.mu.Unlock()
		select {
		case <-ch:
			if !g.proc.exited() {
				// After EOF the channel stays closed: don't spin while qemu is being reaped.
				time.Sleep(10 * time.Millisecond)
			} else {
				// Let the reader drain before the final scan.
				g.readers.Wait()
				g.mu.Lock()
				found := ""
				var at time.Duration
				for i, l := range g.lines {
					if strings.HasPrefix(l, prefix) {
						found, at = l, g.stamps[i]
						break
					}
				}
				g.mu.Unlock()
				if found != "" {
					return found, at, nil
				}
				return "", 0, fmt.Errorf("guest %s exited (%v) before %q", g.spec.name, g.proc.err, prefix)
			}
		case <-deadline.C:
			return "", 0, fmt.Errorf("guest %s: no %q within %v", g.spec.name, prefix, timeout)
		}
	}
}

// result waits for the guest's verdict and logs it with its timings.
func (g *guest) result(timeout time.Duration) (pass bool, summary string) {
	line, at, err := g.waitLine("E2E-RESULT", timeout)
	if err != nil {
		g.t.Log(err)
		return false, err.Error()
	}
	select {
	case <-g.proc.done:
	case <-time.After(10 * time.Second):
	}
	g.mu.Lock()
	var steps []string
	for i, l := range g.lines {
		if strings.HasPrefix(l, "E2E-STEP ") {
			f := strings.Fields(l)
			if len(f) >= 3 {
				steps = append(steps, fmt.Sprintf("%s@%ss", f[2], f[1]))
			}
		} else if strings.HasPrefix(l, "E2E-") && !strings.HasPrefix(l, "E2E-RESULT") && !strings.HasPrefix(l, "E2E-DISCOVERED") {
			steps = append(steps, fmt.Sprintf("[%.1fs] %s", g.stamps[i].Seconds(), l))
		}
	}
	g.mu.Unlock()
	summary = fmt.Sprintf("guest %s (ns %s, %s): %s after %.1fs wall; guest uptime: %s",
		g.spec.name, g.spec.ns, g.spec.script, strings.TrimPrefix(line, "E2E-RESULT "), at.Seconds(), strings.Join(steps, " "))
	g.t.Log(summary)
	return strings.HasPrefix(line, "E2E-RESULT PASS"), summary
}

// send writes one line to the guest's serial console; a script that called host_listen sees it
// with host_said.
func (g *guest) send(line string) error {
	if _, err := io.WriteString(g.stdin, line+"\n"); err != nil {
		return fmt.Errorf("guest %s: send %q: %w", g.spec.name, line, err)
	}
	return nil
}

// consoleHas reports whether any console line contains s.
func (g *guest) consoleHas(s string) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, l := range g.lines {
		if strings.Contains(l, s) {
			return true
		}
	}
	return false
}
