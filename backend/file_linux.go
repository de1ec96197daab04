package backend

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// openVolumeFile opens dir/name read-write, creating it if missing; it never follows a symlink
// (a volume name must not lead out of the pool). created reports whether this call made it.
//
// The fd is opened with open(2) and wrapped with os.NewFile: os.OpenFile would first try to
// register the file with Go's poller (four fcntl and an epoll_ctl that fails for a regular
// file), which a pool of a thousand volumes pays at every start.
func openVolumeFile(dir, name string) (f *os.File, created bool, err error) {
	path := filepath.Join(dir, name)
	flags := unix.O_RDWR | unix.O_NOFOLLOW | unix.O_CLOEXEC
	fd, err := openRetry(path, flags, 0)
	if err == unix.ENOENT {
		fd, err = openRetry(path, flags|unix.O_CREAT|unix.O_EXCL, 0o640)
		if err == unix.EEXIST {
			// Created by someone else between the two calls: open what is there.
			fd, err = openRetry(path, flags, 0)
		} else if err == nil {
			created = true
		}
	}
	if err != nil {
		return nil, false, &os.PathError{Op: "open", Path: path, Err: err}
	}
	return os.NewFile(uintptr(fd), path), created, nil
}

// openRetry is open(2), retried when a signal interrupts it (as os.OpenFile does).
func openRetry(path string, flags int, mode uint32) (int, error) {
	for {
		fd, err := unix.Open(path, flags, mode)
		if err != unix.EINTR {
			return fd, err
		}
	}
}

// lockDir takes an exclusive, non-blocking flock on the pool directory itself (no lock file,
// so nothing appears in the pool). The kernel drops it when the process dies.
func lockDir(dir string) (*os.File, error) {
	d, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("open pool %s for locking: %w", dir, err)
	}
	for {
		err = unix.Flock(int(d.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err != unix.EINTR {
			break
		}
	}
	if err == unix.EWOULDBLOCK {
		d.Close()
		return nil, fmt.Errorf("pool %s: %w", dir, ErrPoolBusy)
	}
	if err != nil {
		d.Close()
		return nil, fmt.Errorf("lock pool %s: %w", dir, err)
	}
	return d, nil
}

// syncDir makes the directory's entries durable (after creating a file in it).
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open pool directory for fsync: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync pool directory %s: %w", dir, err)
	}
	return nil
}

func (v *fileVol) closeFile() error {
	v.closeMu.Lock()
	defer v.closeMu.Unlock()
	if v.isClosed {
		return nil
	}
	v.isClosed = true
	var errs []error
	if err := unix.Fdatasync(v.fd); err != nil {
		errs = append(errs, fmt.Errorf("backend: volume %q: fdatasync: %w", v.name, err))
	}
	if err := v.f.Close(); err != nil {
		errs = append(errs, fmt.Errorf("backend: volume %q: close: %w", v.name, err))
	}
	return errors.Join(errs...)
}

// ReadAt reads len(p) bytes at off with pread; short reads are retried, EOF never happens
// inside the volume because the file is at least Size() long.
func (v *fileVol) ReadAt(p []byte, off int64) (int, error) {
	if err := v.bounds(off, int64(len(p))); err != nil {
		return 0, err
	}
	v.closeMu.RLock()
	defer v.closeMu.RUnlock()
	if v.isClosed {
		return 0, ErrClosed
	}
	// Page-cache hits first, without a thread hand-off (nowait_linux.go); what would block is
	// read below, within the pool's io slots.
	done, eof, err := v.readCached(p, off)
	if err != nil {
		return done, fmt.Errorf("backend: volume %q: pread at %d: %w", v.name, off+int64(done), err)
	}
	if eof {
		clear(p[done:])
		return len(p), nil
	}
	if done == len(p) {
		return done, nil
	}
	v.pool.io <- struct{}{}
	defer func() { <-v.pool.io }()
	for done < len(p) {
		n, err := unix.Pread(v.fd, p[done:], off+int64(done))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return done, fmt.Errorf("backend: volume %q: pread at %d: %w", v.name, off+int64(done), err)
		}
		if n == 0 {
			// File shorter than recorded size (someone else truncated it): zeros, as a hole.
			clear(p[done:])
			return len(p), nil
		}
		done += n
	}
	return done, nil
}

// WriteAt writes len(p) bytes at off with pwrite.
func (v *fileVol) WriteAt(p []byte, off int64) (int, error) {
	if err := v.bounds(off, int64(len(p))); err != nil {
		return 0, err
	}
	v.closeMu.RLock()
	defer v.closeMu.RUnlock()
	if v.isClosed {
		return 0, ErrClosed
	}
	return v.writeLocked(p, off)
}

// writeLocked is the pwrite loop (short writes and EINTR retried); closeMu must be held shared.
func (v *fileVol) writeLocked(p []byte, off int64) (int, error) {
	// One pwrite per file at a time: a buffered write holds the inode's lock exclusively
	// (ext4, XFS), so a second one in the kernel gains nothing and waits there, spinning on
	// the lock and then sleeping on a thread of its own; here it waits as a parked goroutine.
	v.writeMu.Lock()
	defer v.writeMu.Unlock()
	v.pool.io <- struct{}{}
	defer func() { <-v.pool.io }()
	done := 0
	for done < len(p) {
		n, err := unix.Pwrite(v.fd, p[done:], off+int64(done))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return done, fmt.Errorf("backend: volume %q: pwrite at %d: %w", v.name, off+int64(done), err)
		}
		if n == 0 {
			return done, fmt.Errorf("backend: volume %q: pwrite at %d: no progress", v.name, off+int64(done))
		}
		done += n
	}
	return done, nil
}

func (v *fileVol) Sync() error {
	v.closeMu.RLock()
	defer v.closeMu.RUnlock()
	if v.isClosed {
		return ErrClosed
	}
	for {
		err := unix.Fdatasync(v.fd)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("backend: volume %q: fdatasync: %w", v.name, err)
		}
		return nil
	}
}

// Unmap punches a hole; KEEP_SIZE guarantees the file never shrinks.
func (v *fileVol) Unmap(off, length int64) error {
	if err := v.bounds(off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	v.closeMu.RLock()
	defer v.closeMu.RUnlock()
	if v.isClosed {
		return ErrClosed
	}
	for {
		err := unix.Fallocate(v.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
		if err == unix.EINTR {
			continue
		}
		if err == unix.EOPNOTSUPP {
			// File system without hole punching: zeros are what a later read must see.
			return v.writeZeros(off, length)
		}
		if err != nil {
			return fmt.Errorf("backend: volume %q: punch hole [%d,+%d): %w", v.name, off, length, err)
		}
		return nil
	}
}

// writeZeros is the fallback of Unmap on file systems without hole punching; closeMu must be
// held shared.
func (v *fileVol) writeZeros(off, length int64) error {
	var zero [64 << 10]byte
	for length > 0 {
		n := min(length, int64(len(zero)))
		if _, err := v.writeLocked(zero[:n], off); err != nil {
			return fmt.Errorf("backend: volume %q: zero fill: %w", v.name, err)
		}
		off += n
		length -= n
	}
	return nil
}

// Mapped uses SEEK_DATA/SEEK_HOLE. Allocation is file-system granular (usually 4 KiB), so a
// partially written block reports mapped.
func (v *fileVol) Mapped(off int64) (bool, int64, error) {
	size := v.size.Load()
	if off < 0 || off >= size {
		return false, 0, fmt.Errorf("backend: volume %q: offset %d outside size %d", v.name, off, size)
	}
	v.closeMu.RLock()
	defer v.closeMu.RUnlock()
	if v.isClosed {
		return false, 0, ErrClosed
	}
	data, err := unix.Seek(v.fd, off, unix.SEEK_DATA)
	if err == unix.ENXIO {
		// No data at or after off: the rest is a hole.
		return false, size - off, nil
	}
	if err != nil {
		return true, size - off, nil
	}
	if data > off {
		return false, min(data, size) - off, nil
	}
	hole, err := unix.Seek(v.fd, off, unix.SEEK_HOLE)
	if err != nil {
		return true, size - off, nil
	}
	return true, min(hole, size) - off, nil
}

func statPool(dir string) (Space, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return Space{}, fmt.Errorf("statfs: %w", err)
	}
	return Space{PoolSize: int64(st.Blocks) * st.Bsize, PoolFree: int64(st.Bfree) * st.Bsize}, nil
}

func allocated(fd int) (int64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return 0, fmt.Errorf("fstat: %w", err)
	}
	return st.Blocks * 512, nil
}
