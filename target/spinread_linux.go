package target

import (
	"io"
	"net"
	"os"
	"runtime"
	"sync/atomic"
	"syscall"
	"time"
)

// spinWait bounds how long a read keeps retrying a non-blocking read(2) before it parks on the
// netpoller. At queue depth 1 the next command arrives a few tens of µs after our response;
// parking the goroutine and waking it through epoll (and an idle vCPU) costs more than that on
// this VM, so a short retry loop turns the wake-up into a plain read (4k QD1: ~8K → ~20K
// IOPS, see README). The loop yields between tries so other goroutines on this P still run.
const spinWait = 50 * time.Microsecond

// maxSpinSkip caps the back-off: after spins that found nothing, the next reads park at once
// (up to this many in a row), so idle or slow initiators cost no spinning.
const maxSpinSkip = 64

// spinReader reads a socket, retrying briefly before it blocks. Only the reader goroutine of
// one connection uses it (through bufio), so its fields need no lock. The per-call state lives
// in the struct and the callback is bound once, so a Read allocates nothing.
type spinReader struct {
	rc      syscall.RawConn
	try     func(fd uintptr) bool // s.tryRead, bound once
	skip    int                   // reads left that park without spinning
	backoff int                   // skip length after the next unsuccessful spin
	// busy counts PDUs the writer still has to send (nil: none tracked). While there are
	// some, the next command waits on them and the writer needs the CPU: no spinning.
	busy *atomic.Int32
	// shared is the tenant's fair window (fair.go; nil: none): non-zero while other tenants
	// are busy too. Spinning buys latency with CPU, and then the CPU is what they share.
	shared *atomic.Uint32
	// spins is off until enableSpin: a login, a discovery session or a text exchange waits
	// for a person or a program, not for a pipelined initiator, and spinning there only takes
	// the CPU from connections that serve I/O (1024 SendTargets discoveries spent 12% of the
	// server's time spinning).
	spins bool

	// state of the Read in progress
	p    []byte
	n    int
	err  syscall.Errno
	spin bool
}

// rawConn is nc's descriptor for the raw read and write paths; false when nc is not a socket.
func rawConn(nc net.Conn) (syscall.RawConn, bool) {
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return nil, false
	}
	rc, err := sc.SyscallConn()
	return rc, err == nil
}

// newSocketReader returns nc itself when it is not a socket this can spin on.
func newSocketReader(nc net.Conn, busy *atomic.Int32, shared *atomic.Uint32) io.Reader {
	rc, ok := rawConn(nc)
	if !ok {
		return nc
	}
	s := &spinReader{rc: rc, busy: busy, shared: shared}
	s.try = s.tryRead
	return s
}

// enableSpin lets reads spin from now on; called by the reader goroutine when a normal session
// enters its full feature phase.
func (s *spinReader) enableSpin() { s.spins = true }

func (s *spinReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	s.p, s.n, s.err = p, 0, 0
	s.spin = s.spins && s.skip == 0 && (s.busy == nil || s.busy.Load() == 0) && (s.shared == nil || s.shared.Load() == 0)
	if s.skip > 0 {
		s.skip--
	}
	err := s.rc.Read(s.try)
	n, rerr := s.n, s.err
	s.p, s.err = nil, 0
	if err != nil {
		return 0, err
	}
	if rerr != 0 {
		return 0, os.NewSyscallError("read", rerr)
	}
	if n == 0 {
		return 0, io.EOF
	}
	return n, nil
}

// tryRead is the RawConn.Read callback: true when read(2) gave an answer, false to park on the
// netpoller (which calls it again once the socket is readable).
func (s *spinReader) tryRead(fd uintptr) bool {
	var start time.Time
	for {
		// sysRead (rawsys_linux.go): no hand-off of the P for a call that cannot sleep; in
		// race builds syscall.Read, whose annotations pair with the net package's writes.
		s.n, s.err = sysRead(int(fd), s.p)
		switch {
		case s.err == syscall.EINTR:
			continue
		case s.err != syscall.EAGAIN:
			if !start.IsZero() {
				s.backoff = 0 // the spin paid off
			}
			return true
		case !s.spin:
			return false
		case start.IsZero():
			start = time.Now()
		case time.Since(start) > spinWait:
			s.spin = false
			s.skip = s.backoff
			s.backoff = min(2*s.backoff+1, maxSpinSkip)
			return false
		}
		runtime.Gosched()
	}
}
