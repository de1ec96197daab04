// Package vm_test runs the Linux initiator almost every user attaches with — open-iscsi (iscsid,
// iscsiadm, the kernel's iscsi_tcp) — in small qemu guests whose network card is a tap device
// inside a tenant's network namespace, against `nstarget serve` started as an operator would:
// the built binary and a TOML config file.
//
// It owns: the guest scripts under guest/, namespaces named vme2e-*, their tap devices, and the
// nstarget (and, for bring-up, tgtd) processes it starts. The guest image, booting guests and
// reading their consoles belong to tests/vmguest.
// It must never: touch namespaces or processes it did not create (everything is stopped by PID and
// deleted by name in t.Cleanup), send traffic anywhere but into its own namespaces, or install
// anything on the host beyond the Debian packages tests/vmguest/build-image.sh names.
package vm_test

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"nstarget/tests/childproc"
	"nstarget/tests/vmguest"
)

// suite is what every test shares: built once per test binary.
type suite struct {
	here    string         // this package's directory (guest scripts live under it)
	image   *vmguest.Image // the guest image, the accelerator, the CPU slots
	bin     string         // the nstarget binary, built with -race
	runID   string         // makes namespace names unique per test binary
	setupIn time.Duration
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
		suiteVal.image.Remove()
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
		t.Logf("suite setup %.1fs: %s, nstarget %s", suiteVal.setupIn.Seconds(), suiteVal.image, suiteVal.bin)
	}
	return suiteVal
}

func newSuite() (*suite, error) {
	start := time.Now()
	if os.Geteuid() != 0 {
		return nil, errors.New("must run as root (namespaces, tap devices); run `make test` as root")
	}
	if _, err := lookPath("iscsi-ls"); err != nil {
		return nil, errors.New("iscsi-ls not found: run `bash scripts/deps.sh` (Debian: apt-get install libiscsi-bin)")
	}
	here, err := os.Getwd()
	if err != nil {
		return nil, err
	}
	// The test binary's PID names this run's namespaces, so namespaces left by a run that was
	// killed (no t.Cleanup) can be told from those of a run still going.
	s := &suite{here: here, runID: strconv.Itoa(os.Getpid())}
	sweepStaleNetns()

	// The guest image (tests/vmguest): built once and cached outside the repository.
	if s.image, err = vmguest.Prepare(); err != nil {
		return nil, err
	}
	root, err := moduleRoot()
	if err != nil {
		s.image.Remove()
		return nil, err
	}
	binDir, err := os.MkdirTemp("", "vme2e-bin-")
	if err != nil {
		s.image.Remove()
		return nil, err
	}
	s.bin = filepath.Join(binDir, "nstarget")
	// -race: the real initiator's traffic is a good race detector workload; reports fail the test.
	build := exec.Command("go", "build", "-race", "-o", s.bin, "./cmd/nstarget")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		os.RemoveAll(binDir)
		s.image.Remove()
		return nil, fmt.Errorf("go build ./cmd/nstarget: %w\n%s", err, out)
	}
	s.setupIn = time.Since(start)
	return s, nil
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

func lookPath(tool string) (string, error) { return vmguest.LookPath(tool) }

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
	if err := vmguest.AddTap(ns, "tap0"); err != nil {
		t.Fatal(err)
	}
	run(t, "ip", "-n", ns, "addr", "add", targetAddr+"/24", "dev", "tap0")
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

// --- processes (tests/childproc) and guests (tests/vmguest) -------------------------------------------------

type proc = childproc.Proc

var startProc = childproc.Start

type guest = vmguest.Guest

// guestSpec says what one VM runs and where; every guest is 10.0.0.2 on the tap0 of its tenant's
// namespace, with the portal 10.0.0.1:3260.
type guestSpec struct {
	name   string            // for logs
	ns     string            // the tenant namespace its NIC (tap0) lives in
	script string            // file under guest/ run by /init
	params map[string]string // become e2e.KEY=VALUE on the kernel command line ($E2E_KEY)
	data   []byte            // optional, readable in the guest as `fw_file data`
}

// bootGuests boots the guests side by side once there are CPUs for all of them.
func (s *suite) bootGuests(t *testing.T, specs ...guestSpec) []*guest {
	t.Helper()
	vs := make([]vmguest.Spec, len(specs))
	for i, sp := range specs {
		vs[i] = vmguest.Spec{Name: sp.name, NS: sp.ns, Tap: "tap0", IP: guestCIDR, Portal: portal,
			Script: filepath.Join(s.here, "guest", sp.script), Params: sp.params, Data: sp.data}
	}
	return s.image.Boot(t, vs...)
}
