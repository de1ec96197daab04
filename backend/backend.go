// Package backend owns the shared volume pool that every tenant's LUNs live on: one directory of
// sparse files, each volume opened once however many LUNs or sessions use it.
//
// It must never: truncate or shrink an existing volume (a config mistake is refused with an
// error naming the volume), know about tenants, SCSI or iSCSI, or copy I/O buffers it can avoid.
//
// THIS FILE IS THE CONTRACT other packages compile against. The implementation replaces the stub
// bodies; exported names and meanings stay (additions are fine).
package backend

import "errors"

// ErrShrink is wrapped by Open and Check when the configured size is below the existing file's.
var ErrShrink = errors.New("volume is larger than the configured size; refusing to shrink")

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
type Pool struct{}

// OpenPool opens (creating if missing) the pool directory.
func OpenPool(dir string) (*Pool, error) { panic("backend: not implemented") }

// Check validates that name/size could be opened without touching anything on disk: a bad
// name, or an existing file larger than size (ErrShrink), is an error naming the volume.
func (p *Pool) Check(name string, size int64) error { panic("backend: not implemented") }

// Open returns the volume called name, creating it sparse at size if missing and growing it if
// smaller; the same *file* is shared by every Open of the same name (reference counted).
func (p *Pool) Open(name string, size int64) (Volume, error) { panic("backend: not implemented") }

// Close syncs and closes every volume still open.
func (p *Pool) Close() error { panic("backend: not implemented") }
