package target

import (
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"
)

// sockWriter writes the connection's output with writev(2) through the socket's RawConn, with
// the raw call of rawsys_linux.go: a writev of a 1 MiB Data-In on loopback runs for hundreds of
// µs (the copy plus the receiver's TCP stack), and through net.Buffers.WriteTo each such call
// let the runtime hand the writer's P to another thread. A full socket still parks the writer
// on the netpoller (RawConn.Write waits for writability when tryWrite reports false), and
// closing the connection still ends a parked write. Only the goroutine holding the
// connection's wlock uses it; the callback is bound once and the iovec array reused, so a
// write allocates nothing.
type sockWriter struct {
	rc  syscall.RawConn
	try func(fd uintptr) bool // w.tryWrite, bound once
	iov []syscall.Iovec
	i   int   // first iovec not yet fully written
	err error // of the write in progress
}

// maxIOV is IOV_MAX on Linux: longer batches go out in several writev calls.
const maxIOV = 1024

// newSockWriter returns nil when writes must take the net package's path: a connection that is
// not a socket, or a race build (rawSocketCalls).
func newSockWriter(nc net.Conn) *sockWriter {
	if !rawSocketCalls {
		return nil
	}
	rc, ok := rawConn(nc)
	if !ok {
		return nil
	}
	w := &sockWriter{rc: rc}
	w.try = w.tryWrite
	return w
}

// writeBuffers writes every byte of bufs, in order, or returns the error that stopped it.
func (w *sockWriter) writeBuffers(bufs [][]byte) error {
	iov := w.iov[:0]
	for _, b := range bufs {
		if len(b) > 0 {
			v := syscall.Iovec{Base: &b[0]}
			v.SetLen(len(b))
			iov = append(iov, v)
		}
	}
	w.iov, w.i, w.err = iov, 0, nil
	var err error
	if len(iov) > 0 {
		err = w.rc.Write(w.try)
	}
	if err == nil {
		err = w.err
	}
	clear(iov) // the buffers go back to their pools: keep no pointer to them
	w.iov, w.err = iov[:0], nil
	return err
}

// tryWrite is the RawConn.Write callback: false parks the writer until the socket is writable
// (RawConn.Write then calls it again), true ends the write (w.err says how).
func (w *sockWriter) tryWrite(fd uintptr) bool {
	for w.i < len(w.iov) {
		n, e := sysWritev(int(fd), w.iov[w.i:min(len(w.iov), w.i+maxIOV)])
		switch {
		case e == syscall.EINTR:
			continue
		case e == syscall.EAGAIN:
			return false
		case e != 0:
			w.err = os.NewSyscallError("writev", e)
			return true
		case n == 0:
			w.err = io.ErrShortWrite // no progress on a non-empty batch: never loop on it
			return true
		}
		// Skip what went out: whole iovecs, then the written head of a partial one.
		for n > 0 && n >= int(w.iov[w.i].Len) {
			n -= int(w.iov[w.i].Len)
			w.i++
		}
		if n > 0 {
			v := &w.iov[w.i]
			v.Base = (*byte)(unsafe.Add(unsafe.Pointer(v.Base), n))
			v.SetLen(int(v.Len) - n)
		}
	}
	return true
}
