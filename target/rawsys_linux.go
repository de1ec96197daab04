//go:build linux && !race

package target

import (
	"syscall"
	"unsafe"
)

// The connection's socket calls (the reader's read(2), the writer's writev(2)) go to the
// kernel without telling the Go scheduler (RawSyscall). Both are made on non-blocking sockets,
// so they never sleep: they only spend CPU, copying bytes and, on loopback or veth, running the
// receiver's TCP stack inline. Through the ordinary syscall path every such call marks its P
// "in syscall", and once the thread has been in that state for one sysmon tick (~20 µs) the
// runtime hands the P to another thread, making one if none is idle; on a host whose cores are
// oversubscribed a thread is routinely preempted inside or right after a syscall for
// milliseconds, so each busy connection ended up costing a thread the process keeps forever
// (measured: 8 of 8 threads made during busy I/O came from sysmon's retake -> handoffp).
// A raw call keeps its P, as the same work done in Go code would: no hand-off, no new thread.
//
// Race builds use the annotated calls instead (rawsys_race_linux.go): the race detector learns
// about socket hand-offs only through the syscall package's annotations.

const rawSocketCalls = true

// sysRead is read(2) on a non-blocking fd, without entering the scheduler's syscall state.
func sysRead(fd int, p []byte) (int, syscall.Errno) {
	var ptr unsafe.Pointer
	if len(p) > 0 {
		ptr = unsafe.Pointer(&p[0])
	}
	n, _, e := syscall.RawSyscall(syscall.SYS_READ, uintptr(fd), uintptr(ptr), uintptr(len(p)))
	return int(n), e
}

// sysWritev is writev(2) on a non-blocking fd, without entering the scheduler's syscall state.
func sysWritev(fd int, iov []syscall.Iovec) (int, syscall.Errno) {
	n, _, e := syscall.RawSyscall(syscall.SYS_WRITEV, uintptr(fd), uintptr(unsafe.Pointer(&iov[0])), uintptr(len(iov)))
	return int(n), e
}
