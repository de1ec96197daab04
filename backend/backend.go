// Package backend owns the shared volume pool that every tenant's LUNs live on: one directory of
// sparse files, each volume opened once however many LUNs or sessions use it.
//
// It must never: truncate or shrink an existing volume (a config mistake is refused with an
// error naming the volume), know about tenants, SCSI or iSCSI, or copy I/O buffers it can avoid.
//
// The Volume interface is small so that a network backend can be added beside the file pool.
package backend

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sync"
)

// ErrShrink is wrapped by Open and Check when the configured size is below the existing file's.
var ErrShrink = errors.New("volume is larger than the configured size; refusing to shrink")

// ErrBadName is wrapped when a volume name is not a plain, safe file name.
var ErrBadName = errors.New("invalid volume name")

// ErrClosed is returned by I/O on a volume whose pool or last reference has been closed.
var ErrClosed = errors.New("volume closed")

// ErrPoolBusy is wrapped by Open when another Pool (normally another nstarget process) has
// volumes of the same directory open: two servers on one pool would hand one volume to two
// initiators that each believe they own it.
var ErrPoolBusy = errors.New("pool directory is in use by another process")

// Volume is a byte-addressed block store. Implementations are safe for concurrent use; ReadAt and
// WriteAt never touch bytes outside [off, off+len(p)).
type Volume interface {
	Name() string
	Size() int64
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Sync makes every completed write durable (fdatasync).
	Sync() error
	// Unmap deallocates [off, off+length); later reads of it return zeros.
	Unmap(off, length int64) error
	// Mapped reports whether off is allocated and how many bytes from off share that state
	// (for GET LBA STATUS); a backend that cannot tell reports (true, Size()-off).
	Mapped(off int64) (mapped bool, length int64, err error)
	// Close drops this user's reference; the file is closed with the last one.
	Close() error
}

// Pool is the directory all volumes live in.
type Pool struct {
	dir string

	mu     sync.Mutex
	open   map[string]*fileVol
	closed bool
	// lock holds an exclusive flock on the directory from the first Open until Close; Check
	// takes none, so a configuration can be checked while a server runs.
	lock *os.File
	// id is the pool's identity (identity.go): read by OpenPool when it exists, created under
	// the flock by the first Open otherwise; never changed once set.
	id    PoolID
	hasID bool
	// io bounds the reads and writes of all volumes in the kernel at once (ioSlots).
	io chan struct{}
}

// ioSlots is how many ordinary pread/pwrite calls (writes, and reads the page cache could not
// answer: nowait_linux.go) may be in the kernel at once. Go gives every call that takes longer
// than ~20 µs (a write waiting on the inode lock or on writeback, a page-cache miss, or any
// call whose thread the kernel preempts) a thread of its own and keeps the thread afterwards,
// so without a bound a burst of busy sessions grows the process by a thread per session. A few calls per core keep the page cache
// and a disk's queue busy; past that, more threads only contend for the same inode and cores.
func ioSlots() int { return max(4, 2*runtime.GOMAXPROCS(0)) }

// OpenPool opens (creating if missing) the pool directory.
func OpenPool(dir string) (*Pool, error) {
	if dir == "" {
		return nil, fmt.Errorf("backend: empty pool directory")
	}
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("backend: create pool %s: %w", dir, err)
	}
	st, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("backend: stat pool %s: %w", dir, err)
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("backend: pool %s is not a directory", dir)
	}
	id, hasID, err := readPoolID(dir)
	if err != nil {
		return nil, fmt.Errorf("backend: pool %s: %w", dir, err)
	}
	return &Pool{dir: dir, open: make(map[string]*fileVol), id: id, hasID: hasID, io: make(chan struct{}, ioSlots())}, nil
}

// ValidName reports whether name can be a volume name: 1..200 characters of [A-Za-z0-9._-],
// not starting with '.' or '-', so it can never escape the pool directory or hide as a dot
// file. It is the one rule for volume names: conf applies it to the configuration, Open and
// Check to every name they are given.
func ValidName(name string) error {
	if name == "" || len(name) > 200 {
		return fmt.Errorf("volume %q: %w: length must be 1..200", name, ErrBadName)
	}
	if name[0] == '.' || name[0] == '-' {
		return fmt.Errorf("volume %q: %w: must not start with '.' or '-'", name, ErrBadName)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '_', c == '-':
		default:
			return fmt.Errorf("volume %q: %w: only [A-Za-z0-9._-] allowed", name, ErrBadName)
		}
	}
	return nil
}

func checkSize(name string, size int64) error {
	if size <= 0 {
		return fmt.Errorf("volume %q: size %d must be positive", name, size)
	}
	return nil
}

// Check validates that name/size could be opened without touching anything on disk: a bad
// name, or an existing file larger than size (ErrShrink), is an error naming the volume.
func (p *Pool) Check(name string, size int64) error {
	if err := ValidName(name); err != nil {
		return fmt.Errorf("backend: %w", err)
	}
	if err := checkSize(name, size); err != nil {
		return fmt.Errorf("backend: %w", err)
	}
	// Lstat, as Open refuses to follow a symlink planted in the pool.
	st, err := os.Lstat(filepath.Join(p.dir, name))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("backend: volume %q: %w", name, err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("backend: volume %q: not a regular file", name)
	}
	if st.Size() > size {
		return fmt.Errorf("backend: volume %q: existing size %d > configured %d: %w", name, st.Size(), size, ErrShrink)
	}
	return nil
}

// Open returns the volume called name, creating it sparse at size if missing and growing it if
// smaller; the same *file* is shared by every Open of the same name (reference counted).
// Opening an already open volume with a larger size grows it; a smaller size is ErrShrink.
func (p *Pool) Open(name string, size int64) (Volume, error) {
	if err := ValidName(name); err != nil {
		return nil, fmt.Errorf("backend: %w", err)
	}
	if err := checkSize(name, size); err != nil {
		return nil, fmt.Errorf("backend: %w", err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, fmt.Errorf("backend: volume %q: pool %w", name, ErrClosed)
	}
	if p.lock == nil {
		lock, err := lockDir(p.dir)
		if err != nil {
			return nil, fmt.Errorf("backend: volume %q: %w", name, err)
		}
		p.lock = lock
	}
	if err := p.ensureIDLocked(); err != nil {
		return nil, fmt.Errorf("backend: pool %s: %w", p.dir, err)
	}
	if v, ok := p.open[name]; ok {
		if err := v.growLocked(size); err != nil {
			return nil, err
		}
		v.refs++
		return &volRef{fileVol: v}, nil
	}
	f, created, err := openVolumeFile(p.dir, name)
	if err != nil {
		return nil, fmt.Errorf("backend: volume %q: %w", name, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("backend: volume %q: %w", name, err)
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("backend: volume %q: not a regular file", name)
	}
	if st.Size() > size {
		f.Close()
		return nil, fmt.Errorf("backend: volume %q: existing size %d > configured %d: %w", name, st.Size(), size, ErrShrink)
	}
	if st.Size() < size {
		// Truncate upwards only: the check above guarantees this never drops data.
		if err := f.Truncate(size); err != nil {
			f.Close()
			return nil, fmt.Errorf("backend: volume %q: grow %d -> %d: %w", name, st.Size(), size, err)
		}
	}
	if created {
		// The new directory entry must survive a crash as well as the data later made
		// durable with fdatasync, which covers the file but not its name.
		if err := syncDir(p.dir); err != nil {
			f.Close()
			return nil, fmt.Errorf("backend: volume %q: %w", name, err)
		}
	}
	v := &fileVol{pool: p, name: name, f: f, fd: int(f.Fd()), refs: 1}
	v.size.Store(size)
	p.open[name] = v
	return &volRef{fileVol: v}, nil
}

// Grower is a volume that can grow in place while it is in use.
type Grower interface {
	// Grow makes the volume size bytes long; a smaller size is ErrShrink, the same size
	// nothing.
	Grow(size int64) error
}

// Grow makes the volume size bytes long for every user of it.
func (v *fileVol) Grow(size int64) error {
	v.pool.mu.Lock()
	defer v.pool.mu.Unlock()
	return v.growLocked(size)
}

// growLocked truncates the file upwards; pool.mu serialises it with Open.
func (v *fileVol) growLocked(size int64) error {
	cur := v.size.Load()
	if size < cur {
		return fmt.Errorf("backend: volume %q: open size %d > configured %d: %w", v.name, cur, size, ErrShrink)
	}
	if size > cur {
		if err := v.f.Truncate(size); err != nil {
			return fmt.Errorf("backend: volume %q: grow to %d: %w", v.name, size, err)
		}
		v.size.Store(size)
	}
	return nil
}

// Close syncs and closes every volume still open.
func (p *Pool) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	var errs []error
	for name, v := range p.open {
		if err := v.closeFile(); err != nil {
			errs = append(errs, err)
		}
		delete(p.open, name)
	}
	if p.lock != nil {
		// Closing the descriptor releases the flock, after every volume is synced and closed.
		if err := p.lock.Close(); err != nil {
			errs = append(errs, fmt.Errorf("backend: pool %s: release lock: %w", p.dir, err))
		}
		p.lock = nil
	}
	return errors.Join(errs...)
}

// release drops one reference to v and closes the file with the last one.
func (p *Pool) release(v *fileVol) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if v.refs <= 0 {
		return nil
	}
	v.refs--
	if v.refs > 0 {
		return nil
	}
	if p.open[v.name] == v {
		delete(p.open, v.name)
	}
	return v.closeFile()
}

// Space is how full a pool is, for thin provisioning: volumes are sparse, so the file system
// under them can fill before any volume does.
type Space struct {
	PoolSize  int64 // bytes of the file system the pool is on
	PoolFree  int64 // bytes still free there (for root, which the server runs as)
	Allocated int64 // bytes the volume occupies (0 for Pool.Space)
}

// UsedPercent is the pool's fill level, 0..100.
func (s Space) UsedPercent() float64 {
	if s.PoolSize <= 0 {
		return 0
	}
	return 100 * float64(s.PoolSize-s.PoolFree) / float64(s.PoolSize)
}

// SpaceReporter is a volume whose pool can tell how full it is.
type SpaceReporter interface {
	Space() (Space, error)
}

// Space reports how full the pool's file system is.
func (p *Pool) Space() (Space, error) {
	s, err := statPool(p.dir)
	if err != nil {
		return Space{}, fmt.Errorf("backend: pool %s: %w", p.dir, err)
	}
	return s, nil
}

// Space reports the pool's fill level and the bytes this volume occupies.
func (v *fileVol) Space() (Space, error) {
	s, err := v.pool.Space()
	if err != nil {
		return s, err
	}
	if s.Allocated, err = allocated(v.fd); err != nil {
		return s, fmt.Errorf("backend: volume %q: %w", v.name, err)
	}
	return s, nil
}
