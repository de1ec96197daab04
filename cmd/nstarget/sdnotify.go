package main

import (
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"time"
)

// notifier speaks systemd's sd_notify protocol (sd_notify(3)) itself: one unixgram datagram of
// newline-separated assignments per state change, to the socket named by $NOTIFY_SOCKET. A
// notifier without a socket (not started by systemd, or Type≠notify) does nothing, so callers
// never check. Safe for concurrent use; a failed send is logged, never fatal: the service must
// not stop serving because its supervisor went away.
type notifier struct {
	log  *slog.Logger
	addr *net.UnixAddr // nil: not under systemd

	mu sync.Mutex // one datagram at a time, in call order
}

// newNotifier reads $NOTIFY_SOCKET: an absolute path, or an abstract socket name written with a
// leading '@' (systemd's spelling of the leading NUL byte).
func newNotifier(log *slog.Logger) *notifier {
	n := &notifier{log: log}
	name := os.Getenv("NOTIFY_SOCKET")
	switch {
	case name == "":
	case strings.HasPrefix(name, "@"), strings.HasPrefix(name, "/"):
		// Go's net package maps a leading '@' to the abstract namespace on Linux.
		n.addr = &net.UnixAddr{Name: name, Net: "unixgram"}
	default:
		log.Warn("NOTIFY_SOCKET is neither a path nor an abstract name; not notifying systemd", "notify_socket", name)
	}
	return n
}

// Ready says the service is up (Type=notify's start-up is complete, or a reload is done).
func (n *notifier) Ready() { n.send("READY=1\nSTATUS=serving") }

// Reloading says a reload began; Ready must follow when it ends. MONOTONIC_USEC is what
// Type=notify-reload (systemd 253+) matches the reload with; older versions ignore it.
func (n *notifier) Reloading() {
	n.send(fmt.Sprintf("RELOADING=1\nSTATUS=reloading\nMONOTONIC_USEC=%d", monotonicMicros()))
}

// Stopping says the service is shutting down (sessions are being logged out).
func (n *notifier) Stopping() { n.send("STOPPING=1\nSTATUS=stopping") }

func (n *notifier) send(state string) {
	if n == nil || n.addr == nil {
		return
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if err := n.sendOnce(state); err != nil {
		n.log.Warn("notify systemd", "notify_socket", n.addr.Name, "err", err)
	}
}

func (n *notifier) sendOnce(state string) error {
	c, err := net.DialUnix("unixgram", nil, n.addr)
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	// systemd reads datagrams from a socket it never lets fill up; the deadline only keeps a
	// wedged receiver from stalling start-up or shutdown.
	c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte(state)); err != nil {
		return fmt.Errorf("send %q: %w", strings.SplitN(state, "\n", 2)[0], err)
	}
	return nil
}
