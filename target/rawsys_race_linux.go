//go:build linux && race

package target

import "syscall"

// Race builds: the annotated syscall package calls (see rawsys_linux.go). syscall.Read tells the
// race detector what the kernel wrote and pairs with the writers' annotations, so -race sees
// the same happens-before as through net.Conn. Writes keep the net package's path
// (rawSocketCalls false), which carries the matching annotation.

const rawSocketCalls = false

func sysRead(fd int, p []byte) (int, syscall.Errno) {
	n, err := syscall.Read(fd, p)
	if err != nil {
		return n, err.(syscall.Errno)
	}
	return n, 0
}

func sysWritev(fd int, iov []syscall.Iovec) (int, syscall.Errno) {
	panic("target: sysWritev in a race build")
}
