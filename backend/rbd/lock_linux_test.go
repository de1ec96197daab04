//go:build linux && rbd

package rbd

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"nstarget/tests/cephtest"
)

// failAfter is the deadline for events that normally take milliseconds to a few seconds: it
// only turns a hang into a failure, the tests wait for the event itself.
const failAfter = 60 * time.Second

func blocklist(t *testing.T) []string {
	t.Helper()
	out, err := ceph.Ceph("osd", "blocklist", "ls")
	if err != nil {
		t.Fatal(err)
	}
	var entries []string
	for l := range strings.Lines(out) {
		if f := strings.Fields(l); len(f) > 0 {
			entries = append(entries, f[0])
		}
	}
	slices.Sort(entries)
	return entries
}

func TestFenceBlocklistsTheOldOwnerAndKeepsTheNewOwnersWrites(t *testing.T) {
	nodeA := connect(t, 10*time.Second)
	nodeB := connect(t, 10*time.Second)
	name := imageName(t, "")
	const blocks, bs = 64, 4096
	a, err := nodeA.Open(name, 4*mib, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()

	// Without Fence, B is refused and told who holds the image.
	if _, err := nodeB.Open(name, 4*mib, OpenOptions{}); !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), name) || !strings.Contains(err.Error(), "held by 127.0.0.1:") {
		t.Fatalf("Open of a locked image without Fence: %v, want ErrLocked naming the image and the holder", err)
	}

	// A keeps overwriting the blocks B will write, so a late write of A would show.
	oldData := bytes.Repeat([]byte{0xAA}, bs)
	aErr := make(chan error, 1)
	aStarted := make(chan struct{})
	go func() {
		for i := 0; ; i++ {
			if _, err := a.WriteAt(oldData, int64(i%blocks)*bs); err != nil {
				aErr <- err
				return
			}
			if i == blocks {
				close(aStarted)
			}
		}
	}()
	<-aStarted

	start := time.Now()
	b, err := nodeB.Open(name, 4*mib, OpenOptions{Fence: true})
	if err != nil {
		t.Fatalf("Open with Fence: %v", err)
	}
	defer b.Close()
	t.Logf("fenced take-over took %v", time.Since(start))
	newData := bytes.Repeat([]byte{0x55}, bs)
	for i := range blocks {
		if _, err := b.WriteAt(newData, int64(i)*bs); err != nil {
			t.Fatalf("new owner's write %d: %v", i, err)
		}
	}

	select {
	case err := <-aErr:
		if !errors.Is(err, ErrFenced) || !strings.Contains(err.Error(), name) {
			t.Fatalf("old owner's write after the fence: %v, want ErrFenced naming %s", err, name)
		}
	case <-time.After(failAfter):
		t.Fatal("old owner still writing long after the fence")
	}
	if _, err := a.ReadAt(make([]byte, bs), 0); !errors.Is(err, ErrFenced) {
		t.Errorf("old owner's read after the fence: %v, want ErrFenced", err)
	}
	// The blocklist names the client, so the whole node is fenced, not just this image.
	if _, err := nodeA.Open(imageName(t, "-other"), mib, OpenOptions{Fence: true}); !errors.Is(err, ErrFenced) {
		t.Errorf("fenced client opening another image: %v, want ErrFenced", err)
	}

	check := func(v *Image, who string) {
		t.Helper()
		got := make([]byte, blocks*bs)
		if _, err := v.ReadAt(got, 0); err != nil {
			t.Fatalf("%s: %v", who, err)
		}
		for i := range blocks {
			if !bytes.Equal(got[i*bs:(i+1)*bs], newData) {
				t.Fatalf("%s: block %d lost the new owner's acknowledged write", who, i)
			}
		}
	}
	check(b, "new owner")
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	c, err := connect(t, 10*time.Second).Open(name, 4*mib, OpenOptions{})
	if err != nil {
		t.Fatalf("Open after the new owner's planned Close: %v", err)
	}
	defer c.Close()
	check(c, "third client")
}

// hungHolderBound is far above a fenced take-over (milliseconds) and below the ~30 s that
// acquiring without breaking first waits for a holder that does not answer.
const hungHolderBound = 20 * time.Second

// holderProc is a child of this test binary that holds an image's lock (holderEnv) and says
// what happened to it one line at a time on its stdout.
type holderProc struct {
	t     *testing.T
	proc  *os.Process
	stdin io.Writer
	lines chan string
}

// startHolder starts a holder of image name and waits until it says it holds the lock; it is
// killed when the test ends.
func startHolder(t *testing.T, name string) *holderProc {
	t.Helper()
	holder := exec.Command(os.Args[0])
	holder.Env = append(os.Environ(), holderEnv+"="+name, "RBD_TEST_CONF="+ceph.ConfPath, "RBD_TEST_POOL="+ceph.Pool)
	holder.Stderr = os.Stderr
	stdin, err := holder.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := holder.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	h := &holderProc{t: t, proc: holder.Process, stdin: stdin, lines: make(chan string, 4)}
	exited := make(chan error, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			h.lines <- sc.Text()
		}
		close(h.lines)
		exited <- holder.Wait()
	}()
	t.Cleanup(func() {
		holder.Process.Kill() // the holder is this test's own child
		<-exited
	})
	h.expect("locked")
	return h
}

// wakeAndExpectFenced writes through the new owner's image, wakes the (stopped) holder and
// has it write: it must be refused, and the new owner's data must stay.
func (h *holderProc) wakeAndExpectFenced(newOwner interface {
	io.ReaderAt
	io.WriterAt
}) {
	t := h.t
	t.Helper()
	newData := bytes.Repeat([]byte{0x55}, 4096)
	if _, err := newOwner.WriteAt(newData, 0); err != nil {
		t.Fatal(err)
	}
	if err := h.proc.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(h.stdin, "write\n"); err != nil {
		t.Fatal(err)
	}
	h.expect("fenced")
	got := make([]byte, len(newData))
	if _, err := newOwner.ReadAt(got, 0); err != nil || !bytes.Equal(got, newData) {
		t.Fatalf("new owner's data after the old holder woke up: equal=%v, %v", bytes.Equal(got, newData), err)
	}
}

// expect fails the test unless the holder's next line is want.
func (h *holderProc) expect(want string) {
	h.t.Helper()
	select {
	case l := <-h.lines:
		if l != want {
			h.t.Fatalf("holder said %q, want %q", l, want)
		}
	case <-time.After(failAfter):
		h.t.Fatalf("holder did not say %q", want)
	}
}

func TestFenceTakesOverFromAHungHolderWithoutWaitingForIt(t *testing.T) {
	name := imageName(t, "")
	h := startHolder(t, name)
	if err := h.proc.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	b, err := connect(t, 10*time.Second).Open(name, 4*mib, OpenOptions{Fence: true})
	took := time.Since(start)
	if err != nil {
		t.Fatalf("Open with Fence while the holder hangs: %v", err)
	}
	defer b.Close()
	t.Logf("take-over from a hung holder took %v", took)
	if took > hungHolderBound {
		t.Errorf("take-over took %v: it waited for the hung holder instead of breaking its lock first", took)
	}
	h.wakeAndExpectFenced(b)
}

func TestPlannedCloseHandsOverWithoutBlocklistingAnyone(t *testing.T) {
	nodeA := connect(t, 10*time.Second)
	nodeB := connect(t, 10*time.Second)
	name := imageName(t, "")
	before := blocklist(t)

	a, err := nodeA.Open(name, 4*mib, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	data := randomBytes(64 << 10)
	if _, err := a.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := nodeB.Open(name, 4*mib, OpenOptions{}) // no Fence: a released lock needs none
	if err != nil {
		t.Fatalf("Open after a planned Close: %v", err)
	}
	got := make([]byte, len(data))
	if _, err := b.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("data of the previous owner: equal=%v, %v", bytes.Equal(got, data), err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if after := blocklist(t); !slices.Equal(before, after) {
		t.Fatalf("blocklist changed by a planned hand-over: %v -> %v", before, after)
	}
	// And the old owner's client still works: it can open and write another image.
	other, err := nodeA.Open(imageName(t, "-other"), mib, OpenOptions{})
	if err != nil {
		t.Fatalf("old owner opening another image: %v", err)
	}
	defer other.Close()
	if _, err := other.WriteAt(data, 0); err != nil {
		t.Fatalf("old owner writing another image: %v", err)
	}
}

// TestUnavailableClusterFailsWithinTheOpTimeout pauses the test cluster's own daemons: a
// monitor that does not answer must fail Connect, an OSD that does not answer must fail I/O,
// each after about the op timeout, never hang.
func TestUnavailableClusterFailsWithinTheOpTimeout(t *testing.T) {
	const timeout = 2 * time.Second
	node := connect(t, timeout)
	img, err := node.Open(imageName(t, ""), mib, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()

	// within runs f and returns its error, failing the test if it takes far longer than the
	// op timeout (the wait itself ends with f).
	within := func(what string, f func() error) error {
		t.Helper()
		done := make(chan error, 1)
		start := time.Now()
		go func() { done <- f() }()
		select {
		case err := <-done:
			t.Logf("%s returned after %v: %v", what, time.Since(start).Round(time.Millisecond), err)
			return err
		case <-time.After(failAfter):
			t.Fatalf("%s still blocked after %v with an op timeout of %v", what, failAfter, timeout)
			return nil
		}
	}
	pause := func(d cephtest.Daemon) {
		t.Helper()
		if err := ceph.Pause(d); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ceph.Resume(d) }) // even if the test fails half-way
	}

	pause(cephtest.Mon)
	err = within("Connect with the monitor paused", func() error {
		c, err := Connect(Config{ConfPath: ceph.ConfPath, Pool: ceph.Pool, OpTimeout: timeout})
		if err == nil {
			c.Close()
		}
		return err
	})
	if !errors.Is(err, syscall.ETIMEDOUT) {
		t.Fatalf("Connect with the monitor paused: %v, want ETIMEDOUT", err)
	}

	pause(cephtest.OSD)
	p := randomBytes(4096)
	if err := within("WriteAt with the OSD paused", func() error { _, err := img.WriteAt(p, 0); return err }); !errors.Is(err, syscall.ETIMEDOUT) {
		t.Fatalf("WriteAt with the OSD paused: %v, want ETIMEDOUT", err)
	}
	if err := within("ReadAt with the OSD paused", func() error { _, err := img.ReadAt(make([]byte, 4096), 0); return err }); !errors.Is(err, syscall.ETIMEDOUT) {
		t.Fatalf("ReadAt with the OSD paused: %v, want ETIMEDOUT", err)
	}

	// Once the cluster is back, the same handle works again.
	for _, d := range []cephtest.Daemon{cephtest.OSD, cephtest.Mon} {
		if err := ceph.Resume(d); err != nil {
			t.Fatal(err)
		}
	}
	if err := within("WriteAt after resuming", func() error { _, err := img.WriteAt(p, 0); return err }); err != nil {
		t.Fatalf("WriteAt after the cluster came back: %v", err)
	}
	got := make([]byte, len(p))
	if _, err := img.ReadAt(got, 0); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("read back after the cluster came back: equal=%v, %v", bytes.Equal(got, p), err)
	}
}

// BenchmarkImage4KRandWrite and BenchmarkImage1MWrite keep 16 writes in flight from one
// process (one rados client), as the target does with 16 busy initiators.
func BenchmarkImage4KRandWrite(b *testing.B) { benchWrite(b, 4096, 64*mib, true) }

func BenchmarkImage1MWrite(b *testing.B) { benchWrite(b, mib, 128*mib, false) }

func benchWrite(b *testing.B, bs, size int64, random bool) {
	img, err := connect(b, 20*time.Second).Open(imageName(b, ""), size, OpenOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer img.Close()
	var mu sync.Mutex
	next := int64(0)
	blocks := size / bs
	b.SetBytes(bs)
	b.SetParallelism(max(1, 16/runtime.GOMAXPROCS(0)))
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		p := randomBytes(int(bs))
		for pb.Next() {
			mu.Lock()
			n := next
			next++
			mu.Unlock()
			blk := n % blocks
			if random {
				blk = (n * 7919) % blocks // a fixed permutation: 7919 is prime, blocks a power of 2
			}
			if _, err := img.WriteAt(p, blk*bs); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// osdmapEpoch is the cluster's current osdmap epoch.
func osdmapEpoch(t *testing.T) int {
	t.Helper()
	out, err := ceph.Ceph("osd", "stat", "--format", "json")
	if err != nil {
		t.Fatal(err)
	}
	var st struct{ Epoch int }
	if err := json.Unmarshal([]byte(out), &st); err != nil || st.Epoch == 0 {
		t.Fatalf("osd stat %q: %v", out, err)
	}
	return st.Epoch
}

// A takeover of many images of one dead holder asks the monitors once: one blocklist entry,
// one new osdmap, not one per image (which made every OSD and client process hundreds of
// maps during a takeover). Every image is still fenced: the old holder cannot write to any.
func TestFenceOfManyImagesOfOneHolderBlocklistsItOnce(t *testing.T) {
	nodeA := connect(t, 10*time.Second)
	nodeB := connect(t, 10*time.Second)
	const n = 4
	var held []*Image
	var names []string
	for i := range n {
		names = append(names, imageName(t, ""))
		img, err := nodeA.Open(names[i], mib, OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		defer img.Close()
		held = append(held, img)
	}
	before := osdmapEpoch(t)
	for i := range n { // one after the other: each would have been its own osdmap epoch
		img, err := nodeB.Open(names[i], mib, OpenOptions{Fence: true})
		if err != nil {
			t.Fatalf("Open with Fence of image %d: %v", i, err)
		}
		defer img.Close()
	}
	if after := osdmapEpoch(t); after != before+1 {
		t.Errorf("osdmap epoch %d -> %d fencing %d images of one holder, want one new epoch", before, after, n)
	}
	for i, img := range held {
		if _, err := img.WriteAt(make([]byte, 4096), 0); !errors.Is(err, ErrFenced) {
			t.Errorf("old holder's write to image %d after the fence: %v, want ErrFenced", i, err)
		}
	}
}
