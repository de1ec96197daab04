//go:build !linux

package target

import (
	"io"
	"net"
	"sync/atomic"
)

// newSocketReader: only Linux spins before blocking (spinread_linux.go).
func newSocketReader(nc net.Conn, _ *atomic.Int32, _ *atomic.Uint32) io.Reader { return nc }
