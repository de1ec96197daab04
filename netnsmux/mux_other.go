//go:build !linux

package netnsmux

import (
	"context"
	"fmt"
	"runtime"
)

// errUnsupported is New's answer where there are no network namespaces to enter: failing at
// New, with the OS named, lets a program that imports this package build and say why it
// cannot serve instead of failing to compile.
var errUnsupported = fmt.Errorf("netnsmux: network namespaces are not supported on %s", runtime.GOOS)

// Mux is the registry, the worker pool and the accept loop on Linux; here New never makes one.
type Mux struct{}

type connTrack struct{}

const fdTableSize = 0

var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

func newMux(Options) (*Mux, error) { return nil, errUnsupported }
func reserveFDs(int)               {}

func (m *Mux) listen(name, addr string) error                 { return errUnsupported }
func (m *Mux) unlisten(name, addr string)                     {}
func (m *Mux) accept(context.Context) (*Conn, error)          { return nil, errUnsupported }
func (m *Mux) do(context.Context, string, func() error) error { return errUnsupported }
func (m *Mux) run(context.Context) error                      { return errUnsupported }
func (m *Mux) stats() Stats                                   { return Stats{} }
func (m *Mux) started() <-chan struct{}                       { return closedChan }
func (m *Mux) close() error                                   { return nil }
func (c *Conn) close() error                                  { return c.TCPConn.Close() }
