package backend

import (
	"fmt"
	"os"
	"sync"
	"sync/atomic"
)

// fileVol is one open volume file shared by all references.
type fileVol struct {
	pool *Pool
	name string
	f    *os.File
	fd   int
	size atomic.Int64
	refs int // guarded by pool.mu

	// closeMu makes I/O and closing exclusive, so no pread ever hits a recycled fd number.
	closeMu  sync.RWMutex
	isClosed bool

	// writeMu lets one pwrite of this volume into the kernel at a time (writeLocked).
	writeMu sync.Mutex

	// blockingReads is set once preadv2(RWF_NOWAIT) proves unsupported on this volume's file
	// system: its reads then all take the ordinary path (nowait_linux.go).
	blockingReads atomic.Bool

	// stateMu orders LoadState/SaveState (state.go) of this volume.
	stateMu sync.Mutex
}

// volRef is one user's reference; Close is idempotent per reference.
type volRef struct {
	*fileVol
	once sync.Once
}

func (r *volRef) Close() error {
	var err error
	r.once.Do(func() { err = r.pool.release(r.fileVol) })
	return err
}

func (v *fileVol) Name() string { return v.name }

func (v *fileVol) Size() int64 { return v.size.Load() }

func (v *fileVol) bounds(off, n int64) error {
	if off < 0 || n < 0 || off > v.size.Load()-n {
		return fmt.Errorf("backend: volume %q: range [%d,+%d) outside size %d", v.name, off, n, v.size.Load())
	}
	return nil
}
