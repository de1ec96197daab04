//go:build linux

package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Bring-up is timed without connecting: a tenant is "accepting" once a TCP socket in LISTEN
// state exists for its portal (127.0.0.1:3260) inside its namespace, which is when the kernel
// completes handshakes for it. The bench asks the kernel through sock_diag (NETLINK_SOCK_DIAG,
// inet_diag exact lookup of the portal, the same listener lookup an incoming SYN gets), on a
// netlink socket made inside each namespace once, before any server starts: a socket keeps the
// namespace it was made in, so probing needs no setns, no socket per probe, and the server sees
// nothing (no connection to accept and serve, no log line).

const tcpListen = 10 // TCP_LISTEN

// nsHandles holds, per tenant index, an fd on its namespace file and a sock_diag socket made
// inside it, opened before the servers start (setup) so that nothing is opened while a bring-up
// is timed. Both keep the namespace alive: a namespace the bench deletes or re-creates must be
// forgotten first (forget), and the next get opens handles on the new one.
type nsHandles struct {
	b    *bench
	mu   sync.Mutex
	ns   map[int]int
	diag map[int]int
}

func newNSHandles(b *bench) *nsHandles {
	return &nsHandles{b: b, ns: map[int]int{}, diag: map[int]int{}}
}

// get returns the namespace fds and sock_diag sockets of idx, opening the missing ones.
func (h *nsHandles) get(idx []int) (nsfds, diagfds []int, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	var missing []int
	for _, i := range idx {
		if _, ok := h.ns[i]; !ok {
			fd, err := openNS(h.b.nsDir, h.b.nsName(i))
			if err != nil {
				return nil, nil, err
			}
			h.ns[i] = fd
		}
		if _, ok := h.diag[i]; !ok {
			missing = append(missing, i)
		}
	}
	if len(missing) > 0 {
		fds := make([]int, len(missing))
		for k, i := range missing {
			fds[k] = h.ns[i]
		}
		socks, err := diagSocketsIn(fds)
		if err != nil {
			return nil, nil, err
		}
		for k, i := range missing {
			h.diag[i] = socks[k]
		}
	}
	nsfds, diagfds = make([]int, len(idx)), make([]int, len(idx))
	for k, i := range idx {
		nsfds[k], diagfds[k] = h.ns[i], h.diag[i]
	}
	return nsfds, diagfds, nil
}

// forget closes the handles of tenant i (call it before its namespace is deleted).
func (h *nsHandles) forget(i int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if fd, ok := h.ns[i]; ok {
		unix.Close(fd)
		delete(h.ns, i)
	}
	if fd, ok := h.diag[i]; ok {
		unix.Close(fd)
		delete(h.diag, i)
	}
}

func (h *nsHandles) closeAll() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for i, fd := range h.ns {
		unix.Close(fd)
		delete(h.ns, i)
	}
	for i, fd := range h.diag {
		unix.Close(fd)
		delete(h.diag, i)
	}
}

// diagSocketsIn makes one NETLINK_SOCK_DIAG socket inside each namespace of nsfds, on a locked
// thread of its own that then goes home (or dies locked if it cannot).
func diagSocketsIn(nsfds []int) ([]int, error) {
	type res struct {
		fds []int
		err error
	}
	ch := make(chan res, 1)
	go func() {
		runtime.LockOSThread()
		home, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			ch <- res{err: err}
			return
		}
		defer unix.Close(home)
		var r res
		for _, nsfd := range nsfds {
			if err := unix.Setns(nsfd, unix.CLONE_NEWNET); err != nil {
				r.err = fmt.Errorf("setns: %w", err)
				break
			}
			fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
			if err != nil {
				r.err = fmt.Errorf("sock_diag socket: %w", err)
				break
			}
			// A kernel that never answers must not hang the bench.
			unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 2})
			r.fds = append(r.fds, fd)
		}
		if err := unix.Setns(home, unix.CLONE_NEWNET); err != nil {
			for _, fd := range r.fds {
				unix.Close(fd)
			}
			ch <- res{err: fmt.Errorf("return to the home namespace: %w", err)}
			return // exits locked: the thread dies
		}
		runtime.UnlockOSThread()
		if r.err != nil {
			for _, fd := range r.fds {
				unix.Close(fd)
			}
			r.fds = nil
		}
		ch <- r
	}()
	r := <-ch
	return r.fds, r.err
}

// listenDiag looks up TCP listeners of one portal through sock_diag sockets.
type listenDiag struct {
	req []byte
	buf []byte
	seq uint32
}

func newListenDiag(addr [4]byte, port int) *listenDiag {
	// struct nlmsghdr + struct inet_diag_req_v2, exact lookup (no NLM_F_DUMP): the kernel looks
	// the socket up as for a packet from 0.0.0.0:0 to addr:port, which finds the listener.
	b := make([]byte, 16+56)
	binary.NativeEndian.PutUint32(b[0:], uint32(len(b)))
	binary.NativeEndian.PutUint16(b[4:], unix.SOCK_DIAG_BY_FAMILY)
	binary.NativeEndian.PutUint16(b[6:], unix.NLM_F_REQUEST)
	r := b[16:]
	r[0], r[1] = unix.AF_INET, unix.IPPROTO_TCP
	binary.NativeEndian.PutUint32(r[4:], 1<<tcpListen)
	binary.BigEndian.PutUint16(r[8:], uint16(port))   // id.idiag_sport
	copy(r[12:16], addr[:])                           // id.idiag_src[0]
	binary.NativeEndian.PutUint32(r[48:], ^uint32(0)) // id.idiag_cookie: INET_DIAG_NOCOOKIE
	binary.NativeEndian.PutUint32(r[52:], ^uint32(0))
	return &listenDiag{req: b, buf: make([]byte, 4096)}
}

// listening reports whether a socket in LISTEN state exists for the portal in the namespace
// the sock_diag socket fd was made in: one sendto and one recvfrom.
func (d *listenDiag) listening(fd int) (bool, error) {
	d.seq++
	binary.NativeEndian.PutUint32(d.req[8:], d.seq)
	if err := unix.Sendto(fd, d.req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return false, fmt.Errorf("sock_diag send: %w", err)
	}
	for {
		n, _, err := unix.Recvfrom(fd, d.buf, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return false, fmt.Errorf("sock_diag receive: %w", err)
		}
		ok, err := d.parse(d.buf[:n])
		if err == errStale {
			continue // an answer to an earlier request
		}
		return ok, err
	}
}

var errStale = errors.New("sock_diag: answer to an earlier request")

// parse reads the answer to the request with d's current sequence number.
func (d *listenDiag) parse(b []byte) (bool, error) {
	for len(b) >= 16 {
		l := int(binary.NativeEndian.Uint32(b[0:]))
		if l < 16 || l > len(b) {
			return false, fmt.Errorf("sock_diag: bad message length %d", l)
		}
		typ, seq := binary.NativeEndian.Uint16(b[4:]), binary.NativeEndian.Uint32(b[8:])
		m := b[:l]
		b = b[min((l+3)&^3, len(b)):]
		if seq != d.seq {
			return false, errStale
		}
		switch typ {
		case unix.NLMSG_ERROR:
			if len(m) < 20 {
				return false, fmt.Errorf("sock_diag: short error message")
			}
			switch e := unix.Errno(-int32(binary.NativeEndian.Uint32(m[16:]))); e {
			case unix.ENOENT:
				return false, nil // no such socket
			default:
				return false, fmt.Errorf("sock_diag: %w", e)
			}
		case unix.SOCK_DIAG_BY_FAMILY:
			// struct inet_diag_msg: idiag_family, idiag_state, ...
			if len(m) < 18 {
				return false, fmt.Errorf("sock_diag: short answer")
			}
			return m[17] == tcpListen, nil
		default:
			return false, fmt.Errorf("sock_diag: unexpected message type %d", typ)
		}
	}
	return false, fmt.Errorf("sock_diag: empty answer")
}

// threadCPU is the CPU time (user+system) of the calling OS thread.
func threadCPU() time.Duration {
	var ru unix.Rusage
	if unix.Getrusage(unix.RUSAGE_THREAD, &ru) != nil {
		return 0
	}
	return time.Duration(unix.TimevalToNsec(ru.Utime) + unix.TimevalToNsec(ru.Stime))
}

// diagSelfTest checks, in the bench's own namespace, that sock_diag sees a listener of ours
// and does not see a socket that is only bound (a kernel without inet_diag answers ENOENT to
// everything, which would read as "not listening" forever); through ring too if not nil.
func diagSelfTest(ring *diagRing) error {
	l, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(l)
	if err := unix.Bind(l, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		return err
	}
	sa, err := unix.Getsockname(l)
	if err != nil {
		return err
	}
	port := sa.(*unix.SockaddrInet4).Port
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 2})
	d := newListenDiag([4]byte{127, 0, 0, 1}, port)
	check := func(want bool) error {
		if ok, err := d.listening(fd); err != nil || ok != want {
			return fmt.Errorf("listening %v: sock_diag says %v, err %v", want, ok, err)
		}
		if ring != nil {
			up := []bool{!want}
			if err := ring.sweep(d, []int{fd}, up); err != nil || up[0] != want {
				return fmt.Errorf("listening %v: sock_diag through io_uring says %v, err %v", want, up[0], err)
			}
		}
		return nil
	}
	if err := check(false); err != nil {
		return err
	}
	if err := unix.Listen(l, 1); err != nil {
		return err
	}
	return check(true)
}

// threadNice sets the calling (locked) thread's nice level to n, as the servers and load
// clients run (-nice): an observer that waits behind other load on a shared machine would
// report its own delay as the server's. It returns what restores the level before.
func threadNice(n int) (restore func()) {
	tid := unix.Gettid()
	old, err := unix.Getpriority(unix.PRIO_PROCESS, tid)
	if err != nil || n == 0 {
		return func() {}
	}
	old = 20 - old // the system call's value is 20 - nice
	if unix.Setpriority(unix.PRIO_PROCESS, tid, n) != nil {
		return func() {}
	}
	return func() { unix.Setpriority(unix.PRIO_PROCESS, tid, old) }
}

// diagRing sends the sock_diag lookups of a sweep and receives their answers through io_uring:
// two system calls per sweep instead of two per tenant (on the 2-vCPU VM: ~1.5 µs of CPU per
// tenant instead of ~5-10 µs). A linked SEND and RECV per socket; the kernel answers a lookup
// while the SEND runs, so the RECV finds the answer at once.
type diagRing struct {
	fd                     int
	entries                uint32
	sqTail, sqMask         *uint32
	sqArray                []uint32
	cqHead, cqTail, cqMask *uint32
	cqes, sqes             []byte
	maps                   [][]byte
	bufs                   []byte // one answer buffer per probe of a batch
}

const (
	ioringSetup   = 425 // io_uring_setup(2)
	ioringEnter   = 426 // io_uring_enter(2)
	ioringOpSend  = 26
	ioringOpRecv  = 27
	iosqeIOLink   = 1 << 2
	ringAnswerBuf = 1024
)

func ringU32(b []byte, off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&b[off])) }

// newDiagRing sets up a ring of 4096 submissions (2048 probes a batch), or fails where
// io_uring is missing or disabled (the caller then probes with sendto/recvfrom).
func newDiagRing() (*diagRing, error) {
	const entries = 4096
	var p [120]byte // struct io_uring_params
	fd, _, e := unix.Syscall(ioringSetup, entries, uintptr(unsafe.Pointer(&p[0])), 0)
	if e != 0 {
		return nil, fmt.Errorf("io_uring_setup: %w", e)
	}
	le := binary.NativeEndian
	sqEntries, cqEntries, features := le.Uint32(p[0:]), le.Uint32(p[4:]), le.Uint32(p[20:])
	sqo, cqo := p[40:80], p[80:120] // struct io_sqring_offsets, io_cqring_offsets
	sqSize := le.Uint32(sqo[24:]) + sqEntries*4
	cqSize := le.Uint32(cqo[20:]) + cqEntries*16
	const singleMmap = 1 // IORING_FEAT_SINGLE_MMAP
	if features&singleMmap != 0 {
		sqSize = max(sqSize, cqSize)
	}
	r := &diagRing{fd: int(fd), entries: sqEntries}
	mmap := func(off int64, size uint32) ([]byte, error) {
		b, err := unix.Mmap(int(fd), off, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
		if err == nil {
			r.maps = append(r.maps, b)
		}
		return b, err
	}
	sq, err := mmap(0, sqSize)
	if err != nil {
		r.close()
		return nil, err
	}
	cq := sq
	if features&singleMmap == 0 {
		if cq, err = mmap(0x8000000, cqSize); err != nil {
			r.close()
			return nil, err
		}
	}
	if r.sqes, err = mmap(0x10000000, sqEntries*64); err != nil {
		r.close()
		return nil, err
	}
	r.sqTail, r.sqMask = ringU32(sq, le.Uint32(sqo[4:])), ringU32(sq, le.Uint32(sqo[8:]))
	r.sqArray = unsafe.Slice(ringU32(sq, le.Uint32(sqo[24:])), sqEntries)
	r.cqHead, r.cqTail, r.cqMask = ringU32(cq, le.Uint32(cqo[0:])), ringU32(cq, le.Uint32(cqo[4:])), ringU32(cq, le.Uint32(cqo[8:]))
	off := le.Uint32(cqo[20:])
	r.cqes = cq[off : off+cqEntries*16]
	r.bufs = make([]byte, int(sqEntries/2)*ringAnswerBuf)
	return r, nil
}

func (r *diagRing) close() {
	for _, m := range r.maps {
		unix.Munmap(m)
	}
	r.maps = nil
	unix.Close(r.fd)
}

// sweep sends d's request (one sequence number for the whole sweep) on every socket of fds and
// sets up[i] to whether the answer on fds[i] shows the listener.
func (r *diagRing) sweep(d *listenDiag, fds []int, up []bool) error {
	le := binary.NativeEndian
	d.seq++
	le.PutUint32(d.req[8:], d.seq)
	var firstErr error
	for done := 0; done < len(fds); {
		n := min(len(fds)-done, int(r.entries)/2)
		tail, mask := atomic.LoadUint32(r.sqTail), atomic.LoadUint32(r.sqMask)
		for i := 0; i < n; i++ {
			for j := 0; j < 2; j++ {
				idx := tail & mask
				s := r.sqes[idx*64 : idx*64+64] // struct io_uring_sqe
				clear(s)
				le.PutUint32(s[4:], uint32(fds[done+i]))
				if j == 0 {
					s[0], s[1] = ioringOpSend, iosqeIOLink
					le.PutUint64(s[16:], uint64(uintptr(unsafe.Pointer(&d.req[0]))))
					le.PutUint32(s[24:], uint32(len(d.req)))
				} else {
					s[0] = ioringOpRecv
					le.PutUint64(s[16:], uint64(uintptr(unsafe.Pointer(&r.bufs[i*ringAnswerBuf]))))
					le.PutUint32(s[24:], ringAnswerBuf)
				}
				le.PutUint64(s[32:], uint64(i*2+j))
				r.sqArray[idx] = idx
				tail++
			}
		}
		atomic.StoreUint32(r.sqTail, tail)
		want, submitted, got := 2*n, 0, 0
		for got < want {
			const getEvents = 1 // IORING_ENTER_GETEVENTS
			ret, _, e := unix.Syscall6(ioringEnter, uintptr(r.fd), uintptr(want-submitted), uintptr(want-got), getEvents, 0, 0)
			switch e {
			case 0:
				submitted += int(ret)
			case unix.EINTR, unix.EAGAIN, unix.EBUSY:
			default:
				return fmt.Errorf("io_uring_enter: %w", e)
			}
			head, ctail, cm := atomic.LoadUint32(r.cqHead), atomic.LoadUint32(r.cqTail), atomic.LoadUint32(r.cqMask)
			for ; head != ctail; head++ {
				c := r.cqes[(head&cm)*16 : (head&cm)*16+16] // struct io_uring_cqe
				ud, res := le.Uint64(c[0:]), int32(le.Uint32(c[8:]))
				got++
				i := int(ud / 2)
				switch {
				case res < 0 && firstErr == nil:
					firstErr = fmt.Errorf("sock_diag over io_uring: %w", unix.Errno(-res))
				case res >= 0 && ud%2 == 1:
					ok, err := d.parse(r.bufs[i*ringAnswerBuf : i*ringAnswerBuf+int(res)])
					if err != nil && firstErr == nil {
						firstErr = err
					}
					up[done+i] = ok
				}
			}
			atomic.StoreUint32(r.cqHead, head)
		}
		done += n
	}
	runtime.KeepAlive(d.req)
	return firstErr
}
