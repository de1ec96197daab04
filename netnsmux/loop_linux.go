package netnsmux

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// epoll tokens (the 64-bit user data of an epoll event). Listeners get increasing tokens, never
// fd numbers: an fd number may be reused the moment it is closed.
const (
	tokWake          = 1
	tokInotify       = 2
	tokFanotify      = 3
	tokListeners     = 4  // the listeners' own epoll set, nested in the loop's
	tokFirstListener = 16 // room for more fixed tokens without renumbering
)

// inotify mask: creations, deletions and renames in the directory, and the directory itself going
// away. Never IN_OPEN/IN_CLOSE_*: our own opens would feed back into rescans.
const inotifyMask = unix.IN_CREATE | unix.IN_DELETE | unix.IN_MOVED_FROM | unix.IN_MOVED_TO |
	unix.IN_DELETE_SELF | unix.IN_MOVE_SELF | unix.IN_ONLYDIR

// setup creates the epoll instances, the wake-up eventfd, the inotify watch and, where the
// kernel has it, the fanotify mount watch. Listening sockets go into an epoll set of their own
// (lepfd) that is itself watched by the loop's set: one epoll_ctl pauses or resumes accepting on
// every namespace at once, while the directory watches keep being served.
func (m *Mux) setup() error {
	var err error
	if m.epfd, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC); err != nil {
		return fmt.Errorf("netnsmux: epoll_create1: %w", err)
	}
	if m.lepfd, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC); err != nil {
		return fmt.Errorf("netnsmux: epoll_create1: %w", err)
	}
	if err := m.epollAdd(m.lepfd, tokListeners); err != nil {
		return err
	}
	if m.wakefd, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		return fmt.Errorf("netnsmux: eventfd: %w", err)
	}
	if err := m.epollAdd(m.wakefd, tokWake); err != nil {
		return err
	}
	if m.inofd, err = unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK); err != nil {
		return fmt.Errorf("netnsmux: inotify_init1: %w", err)
	}
	if err := m.addWatch(); err != nil {
		return err
	}
	if err := m.epollAdd(m.inofd, tokInotify); err != nil {
		return err
	}
	if !m.noFanotify {
		if err := m.setupFanotify(); err != nil {
			m.log.Info("netnsmux: no fanotify mount watch; placeholders are re-checked on a short timer",
				"err", err)
		} else {
			m.fanotifyOn.Store(true)
		}
	}
	return nil
}

func (m *Mux) epollAdd(fd int, tok uint64) error {
	if err := epollCtl(m.epfd, unix.EPOLL_CTL_ADD, fd, unix.EPOLLIN, tok); err != nil {
		return fmt.Errorf("netnsmux: epoll_ctl add: %w", err)
	}
	return nil
}

// epollCtl registers fd with a 64-bit token as its user data.
func epollCtl(epfd, op, fd int, events uint32, tok uint64) error {
	ev := unix.EpollEvent{Events: events, Fd: int32(uint32(tok)), Pad: int32(uint32(tok >> 32))}
	return unix.EpollCtl(epfd, op, fd, &ev)
}

func epollToken(ev *unix.EpollEvent) uint64 {
	return uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
}

// addWatch creates the directory if missing (as `ip netns` does) and watches it.
func (m *Mux) addWatch() error {
	var err error
	for try := 0; try < 10; try++ { // someone may remove the directory between the two calls
		if err = os.MkdirAll(m.dir, 0o755); err != nil {
			return fmt.Errorf("netnsmux: %w", err)
		}
		if _, err = unix.InotifyAddWatch(m.inofd, m.dir, inotifyMask); !errors.Is(err, unix.ENOENT) {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("netnsmux: inotify_add_watch %s: %w", m.dir, err)
	}
	// statmount reports mount points with symlinks resolved.
	real, err := filepath.EvalSymlinks(m.dir)
	if err != nil {
		return fmt.Errorf("netnsmux: %w", err)
	}
	m.dirReal.Store(real)
	return nil
}

// setupFanotify watches mount attach/detach in our mount namespace (Linux 6.15+): `ip netns add`
// bind-mounts the namespace onto its placeholder a few ms after creating it, and that mount makes
// no inotify event. Any mount event just kicks a rescan.
func (m *Mux) setupFanotify() error {
	fd, err := unix.FanotifyInit(unix.FAN_CLASS_NOTIF|unix.FAN_CLOEXEC|unix.FAN_NONBLOCK|unix.FAN_REPORT_MNT,
		unix.O_RDONLY|unix.O_CLOEXEC)
	if err != nil {
		return fmt.Errorf("fanotify_init(FAN_REPORT_MNT): %w", err)
	}
	mnt, err := unix.Open("/proc/self/ns/mnt", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Close(fd)
		return fmt.Errorf("open mount namespace: %w", err)
	}
	err = unix.FanotifyMark(fd, unix.FAN_MARK_ADD|unix.FAN_MARK_MNTNS, unix.FAN_MNT_ATTACH|unix.FAN_MNT_DETACH, mnt, "")
	unix.Close(mnt)
	if err != nil {
		unix.Close(fd)
		return fmt.Errorf("fanotify_mark(FAN_MARK_MNTNS): %w", err)
	}
	if err := m.epollAdd(fd, tokFanotify); err != nil {
		unix.Close(fd)
		return err
	}
	m.fanfd = fd
	return nil
}

// wake interrupts EpollWait so the loop notices shutdown.
func (m *Mux) wake() {
	if m.wakefd < 0 {
		return
	}
	var one = [8]byte{1}
	unix.Write(m.wakefd, one[:])
}

// wakeForRoom tells the loop that Accept made room for its backlog. Called from the caller's
// goroutine, so under mu: teardown closes the eventfd under mu, and a write to a closed (maybe
// already reused) fd number must never happen.
func (m *Mux) wakeForRoom() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.wake()
}

// epollLoop is the only goroutine that waits for connections: one EpollWait over the listening
// sockets of every namespace (through their nested set) plus the directory watches. It never
// blocks on the caller: conns that do not fit in the accept queue wait in a backlog while
// accepting is paused (new connections then wait in the kernel's listen backlogs), so the
// directory keeps being watched however slowly the caller Accepts. It exits when the Mux is done;
// teardown closes whatever conns are left.
func (m *Mux) epollLoop() {
	evs := make([]unix.EpollEvent, 16)
	levs := make([]unix.EpollEvent, 256)
	buf := make([]byte, 64<<10)
	var ready []*Conn
	paused := false
	for {
		n, err := unix.EpollWait(m.epfd, evs, -1)
		kicked := false
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			m.log.Error("netnsmux: epoll_wait failed; accept loop stops", "err", err)
			return
		}
		for i := 0; i < n; i++ {
			switch epollToken(&evs[i]) {
			case tokWake:
				unix.Read(m.wakefd, buf[:8])
				if m.closed() {
					return
				}
			case tokInotify:
				if m.beforeInotifyDrain != nil {
					m.beforeInotifyDrain()
				}
				kicked = m.drainInotify(buf) || kicked
			case tokFanotify:
				kicked = m.drainFanotify(buf) || kicked
			case tokListeners:
				// Timeout 0: the nested set said it has ready listeners. EINTR or an empty
				// answer is harmless, level triggering brings them back.
				ln, _ := unix.EpollWait(m.lepfd, levs, 0)
				for j := 0; j < ln; j++ {
					m.mu.Lock()
					l := m.tokens[epollToken(&levs[j])]
					m.mu.Unlock()
					if l != nil {
						ready = m.acceptOn(l, ready)
					}
				}
			}
		}
		ready = m.offer(ready)
		if len(ready) > 0 {
			m.acceptWaiting.Store(true)
			// Accept may have made room before it could see the flag, and would not wake us.
			ready = m.offer(ready)
		}
		if len(ready) == 0 {
			m.acceptWaiting.Store(false)
		}
		if kicked {
			// The reconciler was just made runnable on this goroutine's P, and the next
			// EpollWait is a system call that keeps the P while it blocks: the reconciler
			// would wait until sysmon takes the P back (up to 10 ms, measured 9 ms under the
			// churn benchmark) unless the P is handed to it now.
			runtime.Gosched()
		}
		if full := len(ready) > 0; full != paused {
			ev := uint32(unix.EPOLLIN)
			if full {
				ev = 0 // the nested set stays registered but reports nothing
			}
			if err := epollCtl(m.epfd, unix.EPOLL_CTL_MOD, m.lepfd, ev, tokListeners); err != nil {
				m.log.Error("netnsmux: pausing/resuming accept", "pause", full, "err", err)
			} else {
				paused = full
			}
		}
	}
}

// offer hands conns to Accept without blocking and returns those that did not fit.
func (m *Mux) offer(ready []*Conn) []*Conn {
	for i, c := range ready {
		select {
		case m.acceptq <- c:
			ready[i] = nil
		default:
			return append(ready[:0], ready[i:]...)
		}
	}
	return ready[:0]
}

// drainInotify reads every queued event. An event only names what to look at again; the
// reconciler re-reads the name itself. Overflow means events were lost: look at everything.
// It reports whether it kicked the reconciler.
func (m *Mux) drainInotify(buf []byte) bool {
	for {
		k, err := unix.Read(m.inofd, buf)
		if k <= 0 || err != nil {
			break
		}
		for off := 0; off+unix.SizeofInotifyEvent <= k; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			switch {
			case ev.Mask&unix.IN_Q_OVERFLOW != 0:
				m.overflows.Add(1)
				m.log.Warn("netnsmux: inotify queue overflowed; rescanning", "dir", m.dir)
				m.full.Store(true)
			case ev.Mask&(unix.IN_IGNORED|unix.IN_DELETE_SELF|unix.IN_MOVE_SELF) != 0:
				m.rewatch.Store(true)
			case ev.Len > 0:
				name := unix.ByteSliceToString(buf[off+unix.SizeofInotifyEvent : off+unix.SizeofInotifyEvent+int(ev.Len)])
				m.addDirty(name)
			}
			off += unix.SizeofInotifyEvent + int(ev.Len)
		}
	}
	return m.poke()
}

// drainFanotify reads mount events. An attach is resolved to its mount point (statmount): only a
// mount directly in our directory matters. A detach is matched against the mounts our handles
// came through. Anything unresolvable falls back to looking at every name. It reports whether
// it kicked the reconciler.
func (m *Mux) drainFanotify(buf []byte) bool {
	// struct fanotify_event_metadata: u32 event_len, u8 vers, u8 reserved, u16 metadata_len,
	// u64 mask, s32 fd, s32 pid; then info records, each with a 4-byte header {type, pad, len}.
	const metaSize = 24
	sm := make([]byte, 4096) // statmount answer: fixed part (512 bytes) + the mount point string
	for {
		k, err := unix.Read(m.fanfd, buf)
		if k <= 0 || err != nil {
			break
		}
		for off := 0; off+metaSize <= k; {
			evLen := int(binary.NativeEndian.Uint32(buf[off:]))
			metaLen := int(binary.NativeEndian.Uint16(buf[off+6:]))
			mask := binary.NativeEndian.Uint64(buf[off+8:])
			if evLen < metaSize || off+evLen > k {
				m.full.Store(true)
				break
			}
			var mnt uint64
			for r := off + metaLen; r+4 <= off+evLen; {
				typ, rlen := buf[r], int(binary.NativeEndian.Uint16(buf[r+2:]))
				if rlen < 4 || r+rlen > off+evLen {
					break
				}
				if typ == unix.FAN_EVENT_INFO_TYPE_MNT && rlen >= 16 {
					mnt = binary.NativeEndian.Uint64(buf[r+8:])
				}
				r += rlen
			}
			switch {
			case mask&unix.FAN_Q_OVERFLOW != 0 || mnt == 0:
				m.full.Store(true)
			case mask&unix.FAN_MNT_ATTACH != 0:
				mp, err := mountPoint(mnt, sm)
				switch {
				case err == nil:
					if filepath.Dir(mp) == m.dirReal.Load() {
						m.addDirty(filepath.Base(mp))
						m.attachesSeen.Add(1)
					}
				case errors.Is(err, unix.ENOENT):
					// already gone again; its detach event follows
				default:
					m.full.Store(true)
				}
			case mask&unix.FAN_MNT_DETACH != 0:
				m.mu.Lock()
				name, ok := m.byMnt[mnt]
				m.mu.Unlock()
				if ok {
					m.addDirty(name)
				}
			}
			off += evLen
		}
	}
	return m.poke()
}

// mountPoint asks statmount(2) (Linux 6.8+) where the mount with this unique id is mounted.
func mountPoint(mntID uint64, buf []byte) (string, error) {
	const (
		statmountMntPoint = 0x10 // STATMOUNT_MNT_POINT
		offMask           = 8    // struct statmount.mask
		offMntPoint       = 108  // struct statmount.mnt_point (offset into str)
		offStr            = 512  // struct statmount.str
	)
	var req [24]byte // struct mnt_id_req, MNT_ID_REQ_SIZE_VER0
	binary.NativeEndian.PutUint32(req[0:], 24)
	binary.NativeEndian.PutUint64(req[8:], mntID)
	binary.NativeEndian.PutUint64(req[16:], statmountMntPoint)
	_, _, e := unix.Syscall6(unix.SYS_STATMOUNT, uintptr(unsafe.Pointer(&req[0])), uintptr(unsafe.Pointer(&buf[0])),
		uintptr(len(buf)), 0, 0, 0)
	if e != 0 {
		return "", e
	}
	if binary.NativeEndian.Uint64(buf[offMask:])&statmountMntPoint == 0 {
		return "", errors.New("statmount: no mount point")
	}
	start := offStr + int(binary.NativeEndian.Uint32(buf[offMntPoint:]))
	if start >= len(buf) {
		return "", errors.New("statmount: bad string offset")
	}
	return unix.ByteSliceToString(buf[start:]), nil
}

// acceptOn accepts what is queued on one listener (bounded, so one busy namespace cannot starve
// the others: epoll is level-triggered and comes back to it).
func (m *Mux) acceptOn(l *listener, out []*Conn) []*Conn {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.fd < 0 {
		return out
	}
	for i := 0; i < 64; i++ {
		// Blocking fd on purpose: os.NewFile of a blocking fd does not register it with the Go
		// poller (net.FileConn registers its own dup, which it makes non-blocking).
		nfd, _, errno := unix.Syscall6(unix.SYS_ACCEPT4, uintptr(l.fd), 0, 0, unix.SOCK_CLOEXEC, 0, 0)
		if errno != 0 {
			switch errno {
			case unix.EAGAIN, unix.ECONNABORTED, unix.EINTR, unix.EPROTO:
				if errno == unix.EAGAIN {
					return out
				}
				continue
			case unix.EMFILE, unix.ENFILE, unix.ENOBUFS, unix.ENOMEM:
				// Out of fds or memory: level-triggered epoll would spin; give the system a moment.
				// The condition lasts while it lasts: say so every few seconds, not every pass.
				if n, ok := m.resourceLog.allow(time.Now()); ok {
					m.log.Error("netnsmux: accept", "netns", l.ns.name, "addr", l.addr, "err", errno, "suppressed", n)
				}
				time.Sleep(10 * time.Millisecond)
				return out
			default:
				m.log.Error("netnsmux: accept", "netns", l.ns.name, "addr", l.addr, "err", errno)
				return out
			}
		}
		fd := int(nfd)
		cookie, err := socketCookie(fd)
		if err != nil || cookie != l.ns.id {
			m.mismatches.Add(1)
			m.log.Error("netnsmux: BUG: accepted socket is not in its listener's namespace; closed",
				"netns", l.ns.name, "netns_id", uint64(l.ns.id), "cookie", uint64(cookie), "addr", l.addr, "err", err)
			unix.Close(fd)
			continue
		}
		f := os.NewFile(uintptr(fd), "netnsmux-conn")
		nc, err := net.FileConn(f)
		f.Close()
		if err != nil {
			m.log.Error("netnsmux: wrapping accepted socket", "netns", l.ns.name, "addr", l.addr, "err", err)
			continue
		}
		tc, ok := nc.(*net.TCPConn)
		if !ok || tc.RemoteAddr() == nil {
			// No peer address: the client reset the connection between the handshake and
			// accept (getpeername fails). Nothing can be served on it, and no caller should
			// ever have to expect a Conn without a RemoteAddr.
			nc.Close()
			continue
		}
		c := &Conn{TCPConn: tc, Namespace: l.ns.name, ID: l.ns.id, ListenAddr: l.addr, track: &connTrack{m: m}}
		m.mu.Lock()
		m.conns[c] = struct{}{}
		m.mu.Unlock()
		out = append(out, c)
	}
	return out
}
