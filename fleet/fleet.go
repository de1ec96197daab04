// Package fleet creates and removes named network namespaces in-process, the way `ip netns add`
// and `ip netns del` do but without a fork and exec each (well under a millisecond per
// namespace instead of a few): for benchmarks and tests with a thousand tenants, and for
// operators trying nstarget at scale (`nstarget fleet`).
//
// It owns: the placeholder file, the new namespace (its loopback up), the bind mount that keeps
// it alive, and undoing all of that.
//
// It must never: leave a thread of the process in another namespace (the thread that creates
// one goes home before it is reused, or dies locked), or remove a file it cannot identify as a
// namespace mount it would have made.
//
// Linux only; elsewhere every call fails with ErrUnsupported.
package fleet

import "errors"

// ErrUnsupported is returned on systems without network namespaces.
var ErrUnsupported = errors.New("fleet: network namespaces are not supported on this system")
