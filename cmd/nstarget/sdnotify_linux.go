package main

import (
	"golang.org/x/sys/unix"
)

// monotonicMicros is CLOCK_MONOTONIC in microseconds, the clock sd_notify's MONOTONIC_USEC uses.
func monotonicMicros() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0
	}
	return ts.Nano() / 1000
}

// namespaceExists reports whether path is a live network namespace (a bind mount of nsfs), as
// netnsmux will find it: a plain file left behind by a crashed `ip netns add` is not one and will
// never start listening, so READY must not wait for it.
func namespaceExists(path string) bool {
	var st unix.Statfs_t
	return unix.Statfs(path, &st) == nil && st.Type == unix.NSFS_MAGIC
}
