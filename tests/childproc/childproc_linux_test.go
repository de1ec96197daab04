package childproc

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// A child started by Start lives until it is stopped, even while goroutines lock their
// threads and return (which ends those threads, as netns code does on purpose): Pdeathsig
// follows the thread that forked the child, not the process.
func TestAChildOutlivesGoroutinesThatEndTheirThreads(t *testing.T) {
	p, err := Start(exec.Command("sleep", "600"), "sleep")
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	var (
		mu   sync.Mutex
		tids []int
	)
	for range 20 {
		var wg sync.WaitGroup
		for range 2 * runtime.GOMAXPROCS(0) {
			wg.Add(1)
			go func() {
				defer wg.Done()
				runtime.LockOSThread() // returns locked: the runtime ends this thread
				// The main thread is never ended (the runtime parks it instead), so it
				// cannot fire a pdeath signal: no need to wait for it.
				if tid := unix.Gettid(); tid != os.Getpid() {
					mu.Lock()
					tids = append(tids, tid)
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
	}
	// A thread's pdeath signals are sent before it leaves /proc: once every ended thread is
	// gone, a child killed by one has the SIGKILL pending or is dead already.
	deadline := time.Now().Add(time.Minute)
	for _, tid := range tids {
		for {
			if _, err := os.Stat(fmt.Sprintf("/proc/self/task/%d", tid)); os.IsNotExist(err) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("thread %d of a goroutine that returned locked never ended", tid)
			}
			time.Sleep(time.Millisecond)
		}
	}
	if why := dying(p.Cmd.Process.Pid); why != "" {
		t.Fatalf("the child was killed when threads of the test ended: %s", why)
	}
}

// dying says why process pid is dead or about to be ("" if it is neither).
func dying(pid int) string {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "gone: " + err.Error()
	}
	if f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:])); len(f) > 0 && (f[0] == "Z" || f[0] == "X") {
		return "state " + f[0]
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return "gone: " + err.Error()
	}
	for _, line := range strings.Split(string(status), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || (k != "SigPnd" && k != "ShdPnd") {
			continue
		}
		if m, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64); err == nil && m&(1<<(unix.SIGKILL-1)) != 0 {
			return "SIGKILL pending (" + k + ")"
		}
	}
	return ""
}
