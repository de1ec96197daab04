//go:build linux && !race

package backend

import (
	"math/bits"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// noWaitReads: this build reads page-cache hits with readCached (race builds do not).
const noWaitReads = true

// readCached reads what it can of p at off from the page cache with preadv2(RWF_NOWAIT), a raw
// call that keeps the goroutine's P: the kernel answers EAGAIN instead of waiting for a disk
// (or a lock), so the call is a memory copy, as cheap for the scheduler as Go code. Through the
// ordinary syscall path a 1 MiB copy outlasts a sysmon tick, and a thread preempted inside or
// right after any pread looks "in syscall" to the runtime, which hands its P to another
// thread (made if none is idle) and keeps that thread forever. ReadAt does the rest, if any,
// the ordinary way (bounded by the pool's io slots).
//
// done is how many bytes of p were read (up to len(p)), eof whether the file ended at off+done
// (shorter than recorded: the caller fills zeros), err a failure other than "would block".
func (v *fileVol) readCached(p []byte, off int64) (done int, eof bool, err error) {
	if v.blockingReads.Load() {
		return 0, false, nil
	}
	for done < len(p) {
		iov := unix.Iovec{Base: &p[done]}
		iov.SetLen(len(p) - done)
		pos := off + int64(done)
		// preadv2(fd, iov, iovcnt, pos_l, pos_h, flags): the offset split in two halves of a
		// word (on 64-bit, pos_l is all of it and pos_h 0), as x/sys/unix does it.
		n, _, e := syscall.RawSyscall6(unix.SYS_PREADV2, uintptr(v.fd), uintptr(unsafe.Pointer(&iov)), 1,
			uintptr(pos), uintptr(uint64(pos)>>(bits.UintSize-1)>>1), unix.RWF_NOWAIT)
		switch e {
		case 0:
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return done, false, nil
		case unix.EOPNOTSUPP, unix.ENOSYS, unix.EINVAL:
			// No RWF_NOWAIT here (old kernel, file system without it): stop trying.
			v.blockingReads.Store(true)
			return done, false, nil
		default:
			return done, false, e
		}
		if n == 0 {
			return done, true, nil
		}
		done += int(n)
	}
	return done, false, nil
}
