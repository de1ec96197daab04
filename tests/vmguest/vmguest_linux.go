package vmguest

import (
	"bufio"
	"bytes"
	"context"
	"embed"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"nstarget/tests/childproc"
)

//go:embed build-image.sh guest
var files embed.FS

// Image is a built guest image and how qemu runs it on this host.
type Image struct {
	Dir      string        // vmlinux and initramfs.cpio.gz (in build-image.sh's cache)
	Accel    []string      // qemu accelerator and CPU arguments
	AccelWhy string        // why KVM is not used; empty when it is
	Took     time.Duration // how long Prepare took

	files string // this package's embedded files, written out: build-image.sh, guest/
	cpus  *cpuSlots
}

// Prepare builds the guest image, or finds it in build-image.sh's cache (building it installs the
// Debian packages it names and downloads the kernel .deb through apt), and probes KVM. Its error
// says what is missing; callers fail their tests with it.
func Prepare() (*Image, error) {
	start := time.Now()
	if os.Geteuid() != 0 {
		return nil, errors.New("must run as root (namespaces, tap devices); run `make test` as root")
	}
	for _, tool := range []string{"ip", "qemu-system-x86_64", "bash"} {
		if _, err := LookPath(tool); err != nil {
			return nil, fmt.Errorf("%s not found: run `bash scripts/deps.sh` (Debian: apt-get install iproute2 qemu-system-x86)", tool)
		}
	}
	dir, err := os.MkdirTemp("", "vmguest-")
	if err != nil {
		return nil, err
	}
	im := &Image{files: dir, cpus: newCPUSlots(runtime.NumCPU())}
	if err := os.CopyFS(dir, files); err != nil {
		im.Remove()
		return nil, fmt.Errorf("writing out the guest files: %w", err)
	}
	// The build is cached outside the repository; it prints the image directory last.
	var stderr bytes.Buffer
	cmd := exec.Command("bash", filepath.Join(dir, "build-image.sh"))
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		im.Remove()
		return nil, fmt.Errorf("build-image.sh: %w\n%s", err, stderr.String())
	}
	lines := strings.Fields(strings.TrimSpace(string(out)))
	if len(lines) == 0 {
		im.Remove()
		return nil, fmt.Errorf("build-image.sh printed no image directory\n%s", stderr.String())
	}
	im.Dir = lines[len(lines)-1]
	im.Accel, im.AccelWhy = im.probeAccel()
	im.Took = time.Since(start)
	return im, nil
}

// Remove deletes the written-out guest files (not the cached image).
func (im *Image) Remove() { os.RemoveAll(im.files) }

// Script is the path of one of this package's guest scripts (guest/NAME).
func (im *Image) Script(name string) string { return filepath.Join(im.files, "guest", name) }

func (im *Image) String() string {
	return fmt.Sprintf("image %s, qemu %s %s", im.Dir, strings.Join(im.Accel, " "), im.AccelWhy)
}

// probeAccel tries KVM with a guest that passes at once. /dev/kvm exists on hosts (like nested
// cloud VMs) where it cannot run this kernel; qemu then aborts or hangs, and TCG is used.
func (im *Image) probeAccel() (accel []string, why string) {
	kvm := []string{"-accel", "kvm", "-cpu", "host"}
	tcg := []string{"-accel", "tcg", "-cpu", "max"}
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return tcg, fmt.Sprintf("(no KVM: %v)", err)
	}
	f.Close()
	script := filepath.Join(im.files, "kvm-probe.sh")
	if err := os.WriteFile(script, []byte("step kvm-probe\n"), 0o644); err != nil {
		return tcg, fmt.Sprintf("(KVM not probed: %v)", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	args := append(append([]string{}, kvm...), im.baseArgs("e2e.ip=10.0.0.2/24")...)
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

func (im *Image) baseArgs(appendArgs string) []string {
	return []string{
		"-m", "256", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
		"-serial", "stdio", "-no-reboot",
		"-kernel", filepath.Join(im.Dir, "vmlinux"), "-initrd", filepath.Join(im.Dir, "initramfs.cpio.gz"),
		"-append", kernelArgs + " " + appendArgs,
	}
}

// LookPath finds tool in $PATH or in the sbin directories a root shell has but `go test` may not.
func LookPath(tool string) (string, error) {
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

// AddTap makes the tap device name in the network namespace ns and sets it up; it goes with the
// namespace. The caller gives it an address or a bridge.
func AddTap(ns, name string) error {
	for _, args := range [][]string{
		{"-n", ns, "tuntap", "add", "dev", name, "mode", "tap"},
		{"-n", ns, "link", "set", name, "up"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	return nil
}

// --- processes ----------------------------------------------------------------------------

// --- guests -------------------------------------------------------------------------------

// Spec says what one VM runs and where.
type Spec struct {
	Name   string            // for logs
	NS     string            // the network namespace its NIC's tap lives in
	Tap    string            // the tap device in NS; default tap0
	IP     string            // the guest's eth0 address with its prefix (e2e.ip)
	Portal string            // ip:port of the target (e2e.portal, $E2E_PORTAL)
	Script string            // path of the script /init runs (-fw_cfg opt/e2e/script)
	Params map[string]string // become e2e.KEY=VALUE on the kernel command line ($E2E_KEY)
	Data   []byte            // optional, readable in the guest as `fw_file data`
}

// Guest is a running VM; its serial console is collected line by line.
type Guest struct {
	spec  Spec
	t     testing.TB
	start time.Time
	proc  *childproc.Proc
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

// Boot boots the guests side by side once there are CPUs for all of them; each one's CPU slot is
// given back when its qemu exits. Each VM is killed, and its console logged if the test failed
// (or NSTARGET_E2E_LOGS is set), at cleanup.
func (im *Image) Boot(t testing.TB, specs ...Spec) []*Guest {
	t.Helper()
	im.cpus.acquire(len(specs))
	gs := make([]*Guest, 0, len(specs))
	booted := 0
	defer func() {
		for ; booted < len(specs); booted++ {
			im.cpus.release() // a boot failed (t.Fatal): free what was not handed to a guest
		}
	}()
	for _, spec := range specs {
		g := im.boot(t, spec)
		booted++
		go func() {
			<-g.proc.Done()
			im.cpus.release()
		}()
		gs = append(gs, g)
	}
	return gs
}

// boot starts qemu inside spec.NS (ip netns exec … qemu-system-x86_64) with the tap as its NIC.
func (im *Image) boot(t testing.TB, spec Spec) *Guest {
	t.Helper()
	if spec.Tap == "" {
		spec.Tap = "tap0"
	}
	dir := t.TempDir()
	var kv []string
	for k, v := range spec.Params {
		kv = append(kv, "e2e."+k+"="+v)
	}
	args := []string{"netns", "exec", spec.NS, "qemu-system-x86_64"}
	args = append(args, im.Accel...)
	args = append(args, im.baseArgs("e2e.ip="+spec.IP+" e2e.portal="+spec.Portal+" "+strings.Join(kv, " "))...)
	args = append(args,
		"-netdev", "tap,id=n0,ifname="+spec.Tap+",script=no,downscript=no",
		"-device", "virtio-net-pci,netdev=n0",
		"-fw_cfg", "name=opt/e2e/lib,file="+filepath.Join(im.files, "guest", "lib.sh"),
		"-fw_cfg", "name=opt/e2e/script,file="+spec.Script)
	if spec.Data != nil {
		f := filepath.Join(dir, "data")
		if err := os.WriteFile(f, spec.Data, 0o644); err != nil {
			t.Fatal(err)
		}
		args = append(args, "-fw_cfg", "name=opt/e2e/data,file="+f)
	}
	cmd := exec.Command("ip", args...)
	// A pipe of our own rather than cmd.StdoutPipe: Wait (which childproc.Start calls at once) closes
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
	g := &Guest{spec: spec, t: t, stdin: stdin, changed: make(chan struct{})}
	g.start = time.Now()
	// ip netns exec execs qemu in place: the PID is qemu's.
	p, err := childproc.Start(cmd, "qemu "+spec.Name)
	consoleW.Close() // qemu has its own copy: EOF comes when it exits
	if err != nil {
		console.Close()
		t.Fatal(err)
	}
	g.proc = p
	g.readers.Add(1)
	go g.read(console)
	t.Cleanup(func() {
		_ = p.Cmd.Process.Kill()
		<-p.Done()
		g.readers.Wait()
		if t.Failed() || os.Getenv("NSTARGET_E2E_LOGS") != "" {
			g.mu.Lock()
			t.Logf("console of guest %s:\n%s", spec.Name, strings.Join(g.lines, "\n"))
			g.mu.Unlock()
		}
	})
	return g
}

func (g *Guest) read(r io.ReadCloser) {
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

// Name is the spec's name.
func (g *Guest) Name() string { return g.spec.Name }

// Spec is what the guest was booted with.
func (g *Guest) Spec() Spec { return g.spec }

// Exited reports whether qemu has exited.
func (g *Guest) Exited() bool { return g.proc.Exited() }

// Lines returns the console lines so far, from the first on.
func (g *Guest) Lines() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]string(nil), g.lines...)
}

// Started is when qemu was started: console stamps (the durations WaitLine returns) count from it.
func (g *Guest) Started() time.Time { return g.start }

// WaitLine waits for the first console line starting with prefix and returns it with the time
// since boot it arrived. It fails early if the guest ends (a result line) first.
func (g *Guest) WaitLine(prefix string, timeout time.Duration) (string, time.Duration, error) {
	_, l, at, err := g.WaitLineFrom(0, prefix, timeout)
	return l, at, err
}

// WaitLineFrom is WaitLine for the lines from index from on (as Lines counts them); it also
// returns the index of the line found.
func (g *Guest) WaitLineFrom(from int, prefix string, timeout time.Duration) (int, string, time.Duration, error) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	// find returns the index of the line with prefix, or -1 and the result line that ended the
	// guest first, if any.
	find := func() (int, string) {
		for i := max(from, 0); i < len(g.lines); i++ {
			if strings.HasPrefix(g.lines[i], prefix) {
				return i, ""
			}
			if strings.HasPrefix(g.lines[i], "E2E-RESULT") {
				return -1, g.lines[i]
			}
		}
		return -1, ""
	}
	found := func(i int) (int, string, time.Duration, error) { return i, g.lines[i], g.stamps[i], nil }
	for {
		g.mu.Lock()
		i, end := find()
		ch := g.changed
		if i >= 0 {
			defer g.mu.Unlock()
			return found(i)
		}
		g.mu.Unlock()
		if end != "" {
			return -1, "", 0, fmt.Errorf("guest %s ended before %q: %s", g.spec.Name, prefix, end)
		}
		select {
		case <-ch:
			if !g.proc.Exited() {
				// After EOF the channel stays closed: don't spin while qemu is being reaped.
				time.Sleep(10 * time.Millisecond)
				continue
			}
			// Let the reader drain before the final scan.
			g.readers.Wait()
			g.mu.Lock()
			defer g.mu.Unlock()
			if i, _ := find(); i >= 0 {
				return found(i)
			}
			return -1, "", 0, fmt.Errorf("guest %s exited (%v) before %q", g.spec.Name, g.proc.Err(), prefix)
		case <-deadline.C:
			return -1, "", 0, fmt.Errorf("guest %s: no %q within %v", g.spec.Name, prefix, timeout)
		}
	}
}

// Result waits for the guest's verdict and logs it with its timings.
func (g *Guest) Result(timeout time.Duration) (pass bool, summary string) {
	line, at, err := g.WaitLine("E2E-RESULT", timeout)
	if err != nil {
		g.t.Log(err)
		return false, err.Error()
	}
	select {
	case <-g.proc.Done():
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
		} else if strings.HasPrefix(l, "E2E-") && !strings.HasPrefix(l, "E2E-RESULT") && !strings.HasPrefix(l, "E2E-DISCOVERED") &&
			!strings.HasPrefix(l, "E2E-ACK ") {
			steps = append(steps, fmt.Sprintf("[%.1fs] %s", g.stamps[i].Seconds(), l))
		}
	}
	g.mu.Unlock()
	summary = fmt.Sprintf("guest %s (ns %s, %s): %s after %.1fs wall; guest uptime: %s",
		g.spec.Name, g.spec.NS, filepath.Base(g.spec.Script), strings.TrimPrefix(line, "E2E-RESULT "), at.Seconds(), strings.Join(steps, " "))
	g.t.Log(summary)
	return strings.HasPrefix(line, "E2E-RESULT PASS"), summary
}

// Send writes one line to the guest's serial console; a script that called host_listen sees it
// with host_said.
func (g *Guest) Send(line string) error {
	if _, err := io.WriteString(g.stdin, line+"\n"); err != nil {
		return fmt.Errorf("guest %s: send %q: %w", g.spec.Name, line, err)
	}
	return nil
}

// ConsoleHas reports whether any console line contains s.
func (g *Guest) ConsoleHas(s string) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, l := range g.lines {
		if strings.Contains(l, s) {
			return true
		}
	}
	return false
}
