//go:build linux && rbd

package rbd

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"nstarget/tests/cephtest"
)

// ceph is the throwaway cluster every test and benchmark of this package uses; tests do not
// run in parallel with each other because one of them pauses its daemons.
var ceph *cephtest.Cluster

func TestMain(m *testing.M) {
	if name := os.Getenv(holderEnv); name != "" {
		os.Exit(holdLock(name))
	}
	dir, err := os.MkdirTemp("", "rbdtest-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "rbd tests:", err)
		os.Exit(1)
	}
	start := time.Now()
	ceph, err = cephtest.Start(dir)
	if err != nil {
		// Fail, never skip: without a cluster nothing here is tested.
		fmt.Fprintf(os.Stderr, "rbd tests: cannot start a test cluster: %v\n", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "rbd tests: cluster ready in %v (%s)\n", time.Since(start).Round(time.Millisecond), ceph.ConfPath)
	code := m.Run()
	if err := ceph.Stop(); err != nil {
		fmt.Fprintln(os.Stderr, "rbd tests:", err)
	}
	os.Exit(code)
}

// connect is a new rados client (a new "node") closed when the test ends.
func connect(tb testing.TB, timeout time.Duration) *Cluster {
	tb.Helper()
	c, err := Connect(Config{ConfPath: ceph.ConfPath, Pool: ceph.Pool, OpTimeout: timeout})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := c.Close(); err != nil {
			tb.Errorf("close cluster: %v", err)
		}
	})
	return c
}

// imageName is a name no other test, and no other run of the same test (-count), uses.
func imageName(tb testing.TB, suffix string) string {
	var r [4]byte
	rand.Read(r[:])
	return fmt.Sprintf("%s-%x%s", strings.NewReplacer("/", "-", "#", "-").Replace(tb.Name()), r, suffix)
}

func randomBytes(n int) []byte {
	p := make([]byte, n)
	rand.Read(p) // never fails: crypto/rand crashes the program instead
	return p
}

const mib = 1 << 20

// holderEnv makes the test binary a lock holder in its own process (holdLock) instead of
// running tests, so a test can stop a holder with SIGSTOP without stopping itself.
const holderEnv = "RBD_TEST_HOLDER"

// holdLock opens image name, writes, says "locked" and waits for a line on stdin; then it
// writes again and says "fenced" if that write failed with ErrFenced. Its exit code is 0 only
// then. The conf and pool come from RBD_TEST_CONF and RBD_TEST_POOL.
func holdLock(name string) int {
	c, err := Connect(Config{ConfPath: os.Getenv("RBD_TEST_CONF"), Pool: os.Getenv("RBD_TEST_POOL"), OpTimeout: 10 * time.Second})
	if err != nil {
		fmt.Println(err)
		return 1
	}
	defer c.Close()
	img, err := c.Open(name, 4*mib, OpenOptions{})
	if err != nil {
		fmt.Println(err)
		return 1
	}
	defer img.Close()
	p := bytes.Repeat([]byte{0xAA}, 4096)
	if _, err := img.WriteAt(p, 0); err != nil {
		fmt.Println(err)
		return 1
	}
	fmt.Println("locked")
	if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
		fmt.Println(err)
		return 1
	}
	_, err = img.WriteAt(p, 0)
	if !errors.Is(err, ErrFenced) {
		fmt.Println("write after the fence:", err)
		return 1
	}
	fmt.Println("fenced")
	return 0
}
