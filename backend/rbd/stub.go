//go:build !linux || !rbd

package rbd

import (
	"errors"

	"nstarget/backend"
)

// Compiled reports whether the librbd binding is built in (build with -tags rbd on Linux).
const Compiled = false

var errNotCompiled = errors.New("rbd backend not compiled in; build with -tags rbd")

// Cluster is a connection to a Ceph cluster; without the rbd build tag none can exist.
type Cluster struct{}

// Image is an open RBD image; without the rbd build tag none can exist.
type Image struct{}

var (
	_ backend.Volume     = (*Image)(nil)
	_ backend.Identified = (*Image)(nil)
	_ backend.StateStore = (*Image)(nil)
)

// Connect always fails: the binding is not compiled in.
func Connect(Config) (*Cluster, error) { return nil, errNotCompiled }

func (*Cluster) Open(string, int64, OpenOptions) (*Image, error) { return nil, errNotCompiled }
func (*Cluster) Check(string, int64) error                       { return errNotCompiled }
func (*Cluster) Close() error                                    { return errNotCompiled }
func (*Cluster) Prepare(string) error                            { return errNotCompiled }
func (*Cluster) Unprepare(string)                                {}
func (*Cluster) Standby() []string                               { return nil }

func (*Image) Name() string                       { return "" }
func (*Image) Size() int64                        { return 0 }
func (*Image) ReadAt([]byte, int64) (int, error)  { return 0, errNotCompiled }
func (*Image) WriteAt([]byte, int64) (int, error) { return 0, errNotCompiled }
func (*Image) Sync() error                        { return errNotCompiled }
func (*Image) Unmap(int64, int64) error           { return errNotCompiled }
func (*Image) Mapped(int64) (bool, int64, error)  { return false, 0, errNotCompiled }
func (*Image) Grow(int64) error                   { return errNotCompiled }
func (*Image) Close() error                       { return errNotCompiled }
func (*Image) PoolID() backend.PoolID             { return backend.PoolID{} }
func (*Image) LoadState(string) ([]byte, error)   { return nil, errNotCompiled }
func (*Image) SaveState(string, []byte) error     { return errNotCompiled }
