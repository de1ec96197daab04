//go:build !linux

package target

import "net"

// sockWriter: only Linux writes through the raw path (sockwrite_linux.go); elsewhere writes
// take net.Buffers.WriteTo.
type sockWriter struct{}

func newSockWriter(net.Conn) *sockWriter { return nil }

func (*sockWriter) writeBuffers([][]byte) error { panic("target: no raw socket writer here") }
