// Package rbd serves volumes from Ceph RBD images, so that several nstarget nodes can export
// the same disks and hand them over on failure.
//
// It owns: one rados client per Cluster (one per node: the blocklist that fences a dead node
// is per rados client), the images that client has open, the RBD exclusive lock of each open
// image, and the image metadata keys "nstarget.state.*" (backend.StateStore). Every open image
// is locked by this client until Close. An Image implements backend.Volume, Grower,
// Identified and StateStore, so the SCSI layer cannot tell it from a file volume, and its
// identity and state are the same whichever node opens it.
//
// It must never:
//   - shrink an image (a smaller configured size is refused with backend.ErrShrink),
//   - take a lock from another client unless the caller asked for fencing (OpenOptions.Fence);
//     fencing always breaks the lock first, which blocklists the old owner, and only then
//     acquires it, because acquiring while an owner hangs blocks for tens of seconds,
//   - blocklist anyone on a planned hand-over (Close releases the lock cleanly),
//   - let a full or unreachable cluster block a caller for longer than the op timeout,
//   - keep a Go pointer in C after a call returns. Reads land in the caller's buffer; writes
//     are copied once inside librbd, because its zero-copy path can hang a fenced writer.
//
// The librados/librbd binding needs cgo and the Ceph development headers, so it is built only
// with `-tags rbd` on Linux; without the tag, Connect returns an error and Compiled is false.
package rbd
