package rbd

import (
	"errors"
	"time"
)

// ErrFenced is wrapped by every error that says this client was blocklisted (-ESHUTDOWN /
// -EBLOCKLISTED): another node has taken an image over, and this client (the whole Cluster)
// must never write again. Serving again takes a new Connect.
var ErrFenced = errors.New("fenced: this client was blocklisted by another owner of the image")

// ErrLocked is wrapped by Open when another client holds the image's exclusive lock and
// OpenOptions.Fence was not set.
var ErrLocked = errors.New("image is locked by another client")

// DefaultOpTimeout bounds every cluster operation when Config.OpTimeout is zero. It is below
// the 30 s a Linux initiator waits for a SCSI command, so the initiator sees our error rather
// than its own abort.
const DefaultOpTimeout = 20 * time.Second

// Config says how to reach the cluster.
type Config struct {
	// ConfPath is the ceph.conf to read; empty means librados' default search path.
	ConfPath string
	// Pool holds the images.
	Pool string
	// ClientID is the cephx user without the "client." prefix; empty means "admin".
	ClientID string
	// OpTimeout bounds connecting, each monitor command and each OSD operation (whole
	// seconds, rounded up); zero means DefaultOpTimeout.
	OpTimeout time.Duration
}

// OpenOptions tunes Cluster.Open.
type OpenOptions struct {
	// Fence takes the exclusive lock from its current holder: the holder is blocklisted (its
	// next I/O fails with ErrFenced) before this client acquires the lock. Only the caller
	// knows that the holder is dead or must be stopped, so it is never the default.
	Fence bool
}
