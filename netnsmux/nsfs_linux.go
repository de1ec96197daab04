package netnsmux

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// fileidNSFS is the file handle type nsfs uses since Linux 6.18 (FILEID_NSFS): its body is
// struct nsfs_file_handle { u64 ns_id; u32 ns_type; u32 ns_inum; }.
const fileidNSFS = 0xf1

// probeKind is what a name under the directory currently is, learned without opening it.
type probeKind int

const (
	probeMissing     probeKind = iota // no such name
	probePlaceholder                  // a file that is not (yet) a namespace bind mount
	probeNamespace                    // an nsfs bind mount of a network namespace
)

// probeResult is what probePath learned about a name.
type probeResult struct {
	kind     probeKind
	id       ID     // handle mode
	dev, ino uint64 // fallback mode
}

// probePath says what path is now. With handles (6.18+) it returns the namespace id carried in
// the nsfs file handle, so no fd is opened. In fallback mode it returns (dev, ino) of the path, to
// be compared with fstat of a held fd: while we hold the fd the inode cannot be reused, so
// equality proves it is still the same namespace.
func probePath(path string, fallback bool) (probeResult, error) {
	if fallback {
		var st unix.Stat_t
		if err := unix.Lstat(path, &st); err != nil {
			if errors.Is(err, unix.ENOENT) {
				return probeResult{kind: probeMissing}, nil
			}
			return probeResult{}, fmt.Errorf("lstat %s: %w", path, err)
		}
		var sfs unix.Statfs_t
		if err := unix.Statfs(path, &sfs); err != nil {
			if errors.Is(err, unix.ENOENT) {
				return probeResult{kind: probeMissing}, nil
			}
			return probeResult{}, fmt.Errorf("statfs %s: %w", path, err)
		}
		if sfs.Type != unix.NSFS_MAGIC {
			return probeResult{kind: probePlaceholder}, nil
		}
		return probeResult{kind: probeNamespace, dev: st.Dev, ino: st.Ino}, nil
	}
	return probeHandleAt(unix.AT_FDCWD, path, path)
}

// probeHandleAt is probePath's handle mode for name relative to dirfd (AT_FDCWD: name is a
// path); path names it in errors.
func probeHandleAt(dirfd int, name, path string) (probeResult, error) {
	h, _, err := unix.NameToHandleAt(dirfd, name, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return probeResult{kind: probeMissing}, nil
		}
		// A file system that cannot export handles is not nsfs: treat as placeholder.
		if errors.Is(err, unix.EOPNOTSUPP) {
			return probeResult{kind: probePlaceholder}, nil
		}
		return probeResult{}, fmt.Errorf("name_to_handle_at %s: %w", path, err)
	}
	b := h.Bytes()
	if h.Type() != fileidNSFS || len(b) < 12 {
		return probeResult{kind: probePlaceholder}, nil
	}
	if binary.NativeEndian.Uint32(b[8:12]) != unix.CLONE_NEWNET {
		// Some other namespace type bind-mounted here: never a network namespace.
		return probeResult{kind: probePlaceholder}, nil
	}
	return probeResult{kind: probeNamespace, id: ID(binary.NativeEndian.Uint64(b[0:8]))}, nil
}

// errNotNetns marks a path that is not (or not yet) a network namespace; callers treat it as a
// placeholder, not as a failure.
var errNotNetns = errors.New("not a network namespace")

// openNS opens path as a network namespace handle and returns the fd and, unless fallback is set
// or the kernel lacks NS_GET_ID, its id. id==0 means "learn it from SO_NETNS_COOKIE".
func openNS(path string, fallback bool) (fd int, id ID, err error) {
	fd, err = unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if err != nil {
		return -1, 0, fmt.Errorf("open %s: %w", path, err)
	}
	id, err = checkNSFD(fd, fallback)
	if err != nil {
		unix.Close(fd)
		return -1, 0, fmt.Errorf("%s: %w", path, err)
	}
	return fd, id, nil
}

// checkNSFD verifies fd refers to a network namespace and returns its NS_GET_ID (0 in fallback
// mode or on kernels without the ioctl).
func checkNSFD(fd int, fallback bool) (ID, error) {
	var sfs unix.Statfs_t
	if err := unix.Fstatfs(fd, &sfs); err != nil {
		return 0, fmt.Errorf("fstatfs: %w", err)
	}
	if sfs.Type != unix.NSFS_MAGIC {
		return 0, errNotNetns
	}
	t, err := unix.IoctlRetInt(fd, unix.NS_GET_NSTYPE)
	if err != nil {
		return 0, fmt.Errorf("NS_GET_NSTYPE: %w", err)
	}
	if t != unix.CLONE_NEWNET {
		return 0, errNotNetns
	}
	if fallback {
		return 0, nil
	}
	id, err := unix.IoctlGetUint64(fd, unix.NS_GET_ID)
	if err != nil {
		if errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EINVAL) {
			return 0, nil // pre-6.18 kernel: caller uses the socket cookie
		}
		return 0, fmt.Errorf("NS_GET_ID: %w", err)
	}
	return ID(id), nil
}

// atHandleMntIDUnique makes name_to_handle_at report the 64-bit unique mount id (Linux 6.12+;
// AT_HANDLE_MNT_ID_UNIQUE, not in x/sys yet).
const atHandleMntIDUnique = 0x1

// handleMntIDUnique is cleared the first time the kernel refuses atHandleMntIDUnique; the
// mount id then comes from statx.
var handleMntIDUnique atomic.Bool

func init() { handleMntIDUnique.Store(true) }

// openNSHandle opens path as a network namespace handle where nsfs gives file handles (Linux
// 6.18+), in two system calls where openNS plus the mount id take five: the file handle of the
// open fd carries the namespace id and type and is only ever of type FILEID_NSFS on nsfs, and
// the same call reports the mount the fd came through. O_NONBLOCK: if the name is swapped for a
// FIFO after its probe, the open must not wait for a writer.
func openNSHandle(path string) (fd int, id ID, mntID uint64, err error) {
	return openNSHandleAt(unix.AT_FDCWD, path, path)
}

// openNSHandleAt is openNSHandle for name relative to dirfd; path names it in errors.
func openNSHandleAt(dirfd int, name, path string) (fd int, id ID, mntID uint64, err error) {
	fd, err = unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW|unix.O_NONBLOCK, 0)
	if err != nil {
		return -1, 0, 0, fmt.Errorf("open %s: %w", path, err)
	}
	id, mntID, err = fdNSHandle(fd)
	if err != nil {
		unix.Close(fd)
		return -1, 0, 0, fmt.Errorf("%s: %w", path, err)
	}
	return fd, id, mntID, nil
}

// fdNSHandle reads the nsfs file handle of fd: the namespace id if fd is a network namespace
// (errNotNetns otherwise), and the unique id of the mount fd was opened through (0: unknown).
func fdNSHandle(fd int) (ID, uint64, error) {
	// struct file_handle {u32 handle_bytes; s32 handle_type; u8 f_handle[]}; nsfs's body is
	// struct nsfs_file_handle {u64 ns_id; u32 ns_type; u32 ns_inum}.
	var buf [8 + 64]byte
	var mnt uint64
	var empty [1]byte
	for {
		binary.NativeEndian.PutUint32(buf[0:4], uint32(len(buf)-8))
		flags := unix.AT_EMPTY_PATH
		unique := handleMntIDUnique.Load()
		if unique {
			flags |= atHandleMntIDUnique
		}
		// Without the flag the kernel writes a 32-bit mount id into the low half of mnt.
		mnt = 0
		_, _, e := unix.Syscall6(unix.SYS_NAME_TO_HANDLE_AT, uintptr(fd), uintptr(unsafe.Pointer(&empty[0])),
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&mnt)), uintptr(flags), 0)
		switch {
		case e == unix.EINVAL && unique:
			handleMntIDUnique.Store(false)
			continue
		case e == unix.EOPNOTSUPP || e == unix.EOVERFLOW:
			return 0, 0, errNotNetns // no handle at all, or one larger than nsfs's: not nsfs
		case e != 0:
			return 0, 0, fmt.Errorf("name_to_handle_at: %w", e)
		}
		break
	}
	n := binary.NativeEndian.Uint32(buf[0:4])
	if int32(binary.NativeEndian.Uint32(buf[4:8])) != fileidNSFS || n < 16 ||
		binary.NativeEndian.Uint32(buf[16:20]) != unix.CLONE_NEWNET {
		return 0, 0, errNotNetns
	}
	id := ID(binary.NativeEndian.Uint64(buf[8:16]))
	if !handleMntIDUnique.Load() {
		mnt = 0
		var stx unix.Statx_t
		if err := unix.Statx(fd, "", unix.AT_EMPTY_PATH, unix.STATX_MNT_ID_UNIQUE, &stx); err == nil &&
			stx.Mask&unix.STATX_MNT_ID_UNIQUE != 0 {
			mnt = stx.Mnt_id
		}
	}
	return id, mnt, nil
}

// threadNSID is the id of the namespace the calling thread is in, from a throw-away socket's
// SO_NETNS_COOKIE (equal to NS_GET_ID on 6.18; the only id available on 5.14-6.17).
func threadNSID() (ID, error) {
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(s)
	return socketCookie(s)
}

// socketCookie is SO_NETNS_COOKIE of a socket: the id of the namespace it was created in.
func socketCookie(fd int) (ID, error) {
	var c uint64
	l := uint32(unsafe.Sizeof(c))
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_NETNS_COOKIE,
		uintptr(unsafe.Pointer(&c)), uintptr(unsafe.Pointer(&l)), 0)
	if e != 0 {
		return 0, fmt.Errorf("SO_NETNS_COOKIE: %w", e)
	}
	return ID(c), nil
}

// fdDevIno is (dev, ino) of an open fd, for the fallback identity check.
func fdDevIno(fd int) (dev, ino uint64, err error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return 0, 0, fmt.Errorf("fstat: %w", err)
	}
	return st.Dev, st.Ino, nil
}

// nsfsHandles reports whether the kernel gives nsfs file handles carrying the namespace id
// (Linux 6.18+), by asking for the handle of our own network namespace.
func nsfsHandles() bool {
	h, _, err := unix.NameToHandleAt(unix.AT_FDCWD, "/proc/self/ns/net", unix.AT_SYMLINK_FOLLOW)
	return err == nil && h.Type() == fileidNSFS
}
