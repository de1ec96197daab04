package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sync"

	"nstarget/backend"
	"nstarget/backend/rbd"
	"nstarget/conf"
)

// volumeStore is where the LUNs' volumes live: the file pool under data_dir, or a Ceph pool
// of RBD images. serve opens one and closes it last.
type volumeStore interface {
	Open(name string, size int64) (backend.Volume, error)
	// Check reports whether name could be opened at size (a bad name, a shrink) without
	// creating anything.
	Check(name string, size int64) error
	Close() error
}

// rbdStore opens images on one rados client. In a cluster every Open fences: the node that
// takes a tenant over must take its images from a previous owner that may still be alive
// (the blocklist stops it writing); a planned move releases the locks first, so nothing is
// fenced then. A node that was fenced itself (it lost its lease) needs a new client: the
// blocklist covers the whole client (reconnect).
type rbdStore struct {
	cfg   rbd.Config
	fence bool

	mu sync.RWMutex
	c  *rbd.Cluster
}

func (s *rbdStore) client() *rbd.Cluster {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.c
}

func (s *rbdStore) Open(name string, size int64) (backend.Volume, error) {
	img, err := s.client().Open(name, size, rbd.OpenOptions{Fence: s.fence})
	if err != nil {
		return nil, err
	}
	return img, nil
}

func (s *rbdStore) Check(name string, size int64) error { return s.client().Check(name, size) }
func (s *rbdStore) Close() error                        { return s.client().Close() }

// reconnect replaces the rados client; every image of the old one must be closed already.
func (s *rbdStore) reconnect() error {
	c, err := rbd.Connect(s.cfg)
	if err != nil {
		return err
	}
	s.mu.Lock()
	old := s.c
	s.c = c
	s.mu.Unlock()
	return old.Close()
}

// openStore opens cfg's backend. pool is the file pool (nil for rbd), whose fill level serve
// watches.
func openStore(cfg *conf.Config) (store volumeStore, pool *backend.Pool, err error) {
	switch cfg.Server.Backend {
	case conf.BackendRBD:
		r := cfg.Server.RBD
		rc := rbd.Config{ConfPath: r.Conf, Pool: r.Pool, ClientID: r.Client, OpTimeout: r.OpTimeout}
		c, err := rbd.Connect(rc)
		if err != nil {
			return nil, nil, conf.Errors{{File: cfg.File, Line: cfg.Server.BackendLine, Key: "server.backend",
				Msg: fmt.Sprintf("ceph pool %q (%s): %v", r.Pool, r.Conf, err), Err: err}}
		}
		return &rbdStore{cfg: rc, c: c, fence: cfg.Cluster != nil}, nil, nil
	default:
		p, err := backend.OpenPool(cfg.Server.DataDir)
		if err != nil {
			return nil, nil, cfg.DataDirError(err)
		}
		return p, p, nil
	}
}

// checkPool runs the backend's shrink and name checks without creating anything: if data_dir
// does not exist yet, no volume exists that could be shrunk.
func checkPool(cfg *conf.Config) error {
	if cfg.Server.Backend == conf.BackendFile {
		if _, err := os.Stat(cfg.Server.DataDir); errors.Is(err, fs.ErrNotExist) {
			return nil
		}
	}
	store, _, err := openStore(cfg)
	if err != nil {
		return err
	}
	defer store.Close()
	return cfg.CheckVolumes(store.Check)
}
