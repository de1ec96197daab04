package fleet

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// loFlagsIn reads the loopback's flags inside the namespace at path.
func loFlagsIn(path string) (uint16, error) {
	errc := make(chan error, 1)
	var flags uint16
	go func() {
		runtime.LockOSThread()
		home, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer unix.Close(home)
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		err = unix.Setns(fd, unix.CLONE_NEWNET)
		unix.Close(fd)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		var ferr error
		s, ferr := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if ferr == nil {
			ifr, _ := unix.NewIfreq("lo")
			if ferr = unix.IoctlIfreq(s, unix.SIOCGIFFLAGS, ifr); ferr == nil {
				flags = ifr.Uint16()
			}
			unix.Close(s)
		}
		if err := unix.Setns(home, unix.CLONE_NEWNET); err != nil {
			errc <- err
			return // the thread dies
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return flags, <-errc
}

func mountsUnder(t *testing.T, dir string) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(b), " "+dir+"/")
}

func TestAddMakesDistinctNamespacesWithLoopbackUpAndDeleteLeavesNothing(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root: namespaces and mounts")
	}
	dir := t.TempDir()
	const n = 64
	t.Cleanup(func() {
		for i := range n {
			Delete(dir, fmt.Sprintf("t%03d", i))
		}
	})
	ids := map[uint64]bool{}
	for i := range n {
		id, err := Add(dir, fmt.Sprintf("t%03d", i))
		if err != nil {
			t.Fatal(err)
		}
		if id == 0 || ids[id] {
			t.Fatalf("namespace %d: id %d not new", i, id)
		}
		ids[id] = true
	}
	if _, err := Add(dir, "t000"); err == nil {
		t.Fatal("an existing name was created again")
	}
	for _, name := range []string{"t000", "t063"} {
		flags, err := loFlagsIn(dir + "/" + name)
		if err != nil || flags&unix.IFF_UP == 0 {
			t.Fatalf("%s: lo flags %#x, %v", name, flags, err)
		}
	}
	if got := mountsUnder(t, dir); got != n {
		t.Fatalf("%d mounts under %s, want %d", got, dir, n)
	}
	// A file that is not a namespace mount is not removed.
	os.WriteFile(dir+"/plain", []byte("x"), 0o644)
	if err := Delete(dir, "plain"); err == nil {
		t.Fatal("a plain file was taken for a namespace")
	}
	os.Remove(dir + "/plain")
	for i := range n {
		if err := Delete(dir, fmt.Sprintf("t%03d", i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := Delete(dir, "t000"); err != nil {
		t.Fatalf("deleting a missing namespace: %v", err)
	}
	if got := mountsUnder(t, dir); got != 0 {
		t.Fatalf("%d mounts left under %s", got, dir)
	}
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Fatalf("%d files left in %s", len(left), dir)
	}
	if _, err := Add(dir, "../escape"); err == nil {
		t.Fatal("a name with a path was accepted")
	}
}

// BenchmarkAddDelete is one namespace made (placeholder, unshare, lo up, bind mount) and
// removed; compare with `ip netns add` (2-4 ms, a fork and exec each).
func BenchmarkAddDelete(b *testing.B) {
	dir := b.TempDir()
	for i := 0; b.Loop(); i++ {
		name := fmt.Sprintf("b%d", i)
		if _, err := Add(dir, name); err != nil {
			b.Fatal(err)
		}
		if err := Delete(dir, name); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkAdd is one namespace made; they are removed after the timing.
func BenchmarkAdd(b *testing.B) {
	dir := b.TempDir()
	n := 0
	for b.Loop() {
		if _, err := Add(dir, fmt.Sprintf("b%d", n)); err != nil {
			b.Fatal(err)
		}
		n++
	}
	b.StopTimer()
	for i := range n {
		Delete(dir, fmt.Sprintf("b%d", i))
	}
}
