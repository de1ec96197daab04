//go:build linux

package main

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"golang.org/x/sys/unix"

	"nstarget/fleet"
)

// inNS runs fn inside the network namespace file path on a thread of its own (fleet.In).
func inNS(path string, fn func() error) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := fleet.In(fd, fn); err != nil {
		return fmt.Errorf("in %s: %w", path, err)
	}
	return nil
}

// dialNS opens one TCP connection to addr from inside namespace path.
func dialNS(path, addr string, timeout time.Duration) (*net.TCPConn, error) {
	var c net.Conn
	err := inNS(path, func() error {
		var err error
		c, err = net.DialTimeout("tcp", addr, timeout)
		return err
	})
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// prober tells whether a namespace's portal accepts, cheaply: one locked thread that visits
// namespaces by fd (setns), makes a blocking socket and connects once (loopback: refusal or
// accept is immediate), closes. Used to time bring-up without a goroutine per tenant.
type prober struct {
	home int
	sa   unix.SockaddrInet4
}

func newProber(port int) (*prober, error) {
	runtime.LockOSThread()
	home, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	return &prober{home: home, sa: unix.SockaddrInet4{Port: port, Addr: [4]byte{127, 0, 0, 1}}}, nil
}

// try connects once inside the namespace open as nsfd; true if it was accepted (by the kernel's
// listen queue: the portal is listening).
func (p *prober) try(nsfd int) (bool, error) {
	if err := unix.Setns(nsfd, unix.CLONE_NEWNET); err != nil {
		return false, err
	}
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return false, err
	}
	// A normal close (FIN): the probe is a client that goes away politely.
	unix.SetsockoptTimeval(s, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &unix.Timeval{Sec: 2})
	err = unix.Connect(s, &p.sa)
	unix.Close(s)
	switch err {
	case nil:
		return true, nil
	case unix.ECONNREFUSED:
		return false, nil
	case unix.EINTR:
		// The Go runtime's preemption signal landed on this blocking connect: not an
		// answer either way; the caller probes again.
		return false, nil
	}
	return false, err
}

// diagSocket makes a NETLINK_SOCK_DIAG socket inside the namespace open as nsfd (on the
// prober's thread, which stays there until the next setns).
func (p *prober) diagSocket(nsfd int) (int, error) {
	if err := unix.Setns(nsfd, unix.CLONE_NEWNET); err != nil {
		return -1, fmt.Errorf("setns: %w", err)
	}
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return -1, fmt.Errorf("sock_diag socket: %w", err)
	}
	// A kernel that never answers must not hang the bench.
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 2})
	return fd, nil
}

// done brings the thread home and unlocks it (or leaves it locked to die if it cannot).
func (p *prober) done() error {
	defer unix.Close(p.home)
	if err := unix.Setns(p.home, unix.CLONE_NEWNET); err != nil {
		return err
	}
	runtime.UnlockOSThread()
	return nil
}

func openNS(dir, name string) (int, error) {
	return unix.Open(filepath.Join(dir, name), unix.O_RDONLY|unix.O_CLOEXEC, 0)
}

// kernelMem returns Slab + Percpu + KernelStack of /proc/meminfo in bytes.
func kernelMem() (int64, map[string]int64) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, nil
	}
	m := map[string]int64{}
	var tot int64
	for _, l := range splitLines(string(b)) {
		var k string
		var v int64
		if n, _ := fmt.Sscanf(l, "%s %d", &k, &v); n == 2 {
			k = k[:len(k)-1]
			switch k {
			case "Slab", "Percpu", "KernelStack", "SUnreclaim", "SReclaimable":
				m[k] = v << 10
			}
		}
	}
	tot = m["Slab"] + m["Percpu"] + m["KernelStack"]
	return tot, m
}

func splitLines(s string) []string {
	var out []string
	for len(s) > 0 {
		i := 0
		for i < len(s) && s[i] != '\n' {
			i++
		}
		out = append(out, s[:i])
		if i < len(s) {
			i++
		}
		s = s[i:]
	}
	return out
}
