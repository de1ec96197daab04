//go:build linux && rbd

package rbd

/*
#include <rbd/librbd.h>
*/
import "C"

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"nstarget/backend"
)

// image is one open, locked librbd handle shared by every Image of the same name in a Cluster.
type image struct {
	c    *Cluster
	name string
	size atomic.Int64
	refs int // guarded by c.mu

	// mu is held shared by every call into librbd and exclusively by close, so no call ever
	// uses a closed handle. librbd handles are thread-safe, so I/O needs nothing more.
	mu     sync.RWMutex
	h      C.rbd_image_t
	closed bool

	growMu sync.Mutex // serialises Grow's check-then-resize

	// The image's state (our metadata keys) as read at open, in the same breath as the
	// lock, so that the first LoadState of each key (the SCSI layer's, when the LU is made,
	// during a reload that serves hundreds of tenants at once) needs no round trip of its
	// own. Each key is handed out once: later loads read the image again; SaveState drops it.
	stateMu   sync.Mutex
	stateOK   bool              // stateAt holds every state key the image had at open
	stateAt   map[string]string // by full metadata key
	stateUsed map[string]bool
}

// Image is one user's reference to an open RBD image; it implements backend.Volume plus Grow.
// Close is idempotent per reference.
type Image struct {
	img  *image
	once sync.Once
}

var _ backend.Volume = (*Image)(nil)

// Name is the image name.
func (i *Image) Name() string { return i.img.name }

// Size is the current size in bytes.
func (i *Image) Size() int64 { return i.img.size.Load() }

// ReadAt reads len(p) bytes at off; unwritten ranges read as zeros.
func (i *Image) ReadAt(p []byte, off int64) (int, error) {
	return i.img.readAt(p, off)
}

// WriteAt writes p at off and returns when the OSDs have acknowledged it.
func (i *Image) WriteAt(p []byte, off int64) (int, error) {
	return i.img.writeAt(p, off)
}

// Sync waits for writes in flight. Without a client cache (rbd_cache=false) every
// acknowledged write is already on the OSDs, so this is cheap.
func (i *Image) Sync() error { return i.img.sync() }

// Unmap discards [off, off+length); later reads of it return zeros.
func (i *Image) Unmap(off, length int64) error { return i.img.unmap(off, length) }

// Mapped reports the whole rest of the image as mapped: finding holes would need the
// object-map feature and a diff walk, and GET LBA STATUS only needs an honest answer.
func (i *Image) Mapped(off int64) (bool, int64, error) {
	size := i.img.size.Load()
	if off < 0 || off >= size {
		return false, 0, fmt.Errorf("rbd: image %s: offset %d outside size %d", i.img.name, off, size)
	}
	return true, size - off, nil
}

// Grow resizes the image up to size; a smaller size is backend.ErrShrink, the same size a
// no-op. Size reflects the new size once the resize is done.
func (i *Image) Grow(size int64) error { return i.img.grow(size) }

// Close drops this reference; the last one releases the exclusive lock cleanly (nobody is
// blocklisted, the next Open by any client needs no fence) and closes the image.
func (i *Image) Close() error {
	var err error
	i.once.Do(func() { err = i.img.c.release(i.img) })
	return err
}

func (v *image) bounds(off, n int64) error {
	if size := v.size.Load(); off < 0 || n < 0 || off > size-n {
		return fmt.Errorf("rbd: image %s: range [%d,+%d) outside size %d", v.name, off, n, size)
	}
	return nil
}

// fail wraps a librbd error with the image name and what failed, and remembers a fence.
func (v *image) fail(what string, err error) error {
	if errors.Is(err, ErrFenced) {
		v.c.fenced.Store(true)
	}
	return fmt.Errorf("rbd: image %s: %s: %w", v.name, what, err)
}

// failed is fail for an operation at an offset.
func (v *image) failed(op string, off int64, err error) error {
	return v.fail(fmt.Sprintf("%s at %d", op, off), err)
}

// usable is checked, with mu held shared, before every call into librbd.
func (v *image) usable() error {
	if v.closed {
		return fmt.Errorf("rbd: image %s: %w", v.name, backend.ErrClosed)
	}
	if v.c.fenced.Load() {
		return fmt.Errorf("rbd: image %s: this client was fenced: %w", v.name, ErrFenced)
	}
	return nil
}

func (v *image) readAt(p []byte, off int64) (int, error) {
	if err := v.bounds(off, int64(len(p))); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.usable(); err != nil {
		return 0, err
	}
	n, err := rbdRead(v.h, p, off)
	if err != nil {
		return 0, v.failed("read", off, err)
	}
	if n != len(p) {
		return n, v.failed("read", off, io.ErrUnexpectedEOF)
	}
	return n, nil
}

func (v *image) writeAt(p []byte, off int64) (int, error) {
	if err := v.bounds(off, int64(len(p))); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.usable(); err != nil {
		return 0, err
	}
	n, err := rbdWrite(v.h, p, off)
	if err != nil {
		return 0, v.failed("write", off, err)
	}
	return n, nil
}

func (v *image) sync() error {
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.usable(); err != nil {
		return err
	}
	if err := rbdFlush(v.h); err != nil {
		return v.failed("flush", 0, err)
	}
	return nil
}

func (v *image) unmap(off, length int64) error {
	if err := v.bounds(off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.usable(); err != nil {
		return err
	}
	if err := rbdDiscard(v.h, off, length); err != nil {
		return v.failed(fmt.Sprintf("discard +%d", length), off, err)
	}
	return nil
}

func (v *image) grow(size int64) error {
	v.growMu.Lock()
	defer v.growMu.Unlock()
	cur := v.size.Load()
	if size < cur {
		return fmt.Errorf("rbd: image %s: open size %d > configured %d: %w", v.name, cur, size, backend.ErrShrink)
	}
	if size == cur {
		return nil
	}
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.usable(); err != nil {
		return err
	}
	if err := rbdGrow(v.h, size); err != nil {
		return v.fail(fmt.Sprintf("grow %d -> %d", cur, size), err)
	}
	v.size.Store(size)
	return nil
}

// park releases the lock and hands the handle back, still open, for the standby (Cluster.idle);
// callers hold c.mu and have dropped the last reference. If the release fails the handle is
// closed and the error returned.
func (v *image) park() (C.rbd_image_t, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return nil, fmt.Errorf("rbd: image %s: %w", v.name, backend.ErrClosed)
	}
	v.closed = true
	h := v.h
	v.h = nil
	if err := rbdLockRelease(h); err != nil {
		_ = rbdClose(h)
		return nil, fmt.Errorf("rbd: image %s: release lock: %w", v.name, err)
	}
	return h, nil
}

// close releases the lock and closes the handle; callers hold c.mu and have dropped the last
// reference. A fenced client no longer owns the lock, so its release failing is expected and
// not reported (the caller has seen ErrFenced already); anything else is.
func (v *image) close() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return nil
	}
	v.closed = true
	var errs []error
	if err := rbdLockRelease(v.h); err != nil && !v.c.fenced.Load() {
		errs = append(errs, fmt.Errorf("rbd: image %s: release lock: %w", v.name, err))
	}
	if err := rbdClose(v.h); err != nil && !v.c.fenced.Load() {
		errs = append(errs, fmt.Errorf("rbd: image %s: close: %w", v.name, err))
	}
	v.h = nil
	return errors.Join(errs...)
}
