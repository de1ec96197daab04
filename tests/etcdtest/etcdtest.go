// Package etcdtest runs a throwaway single-member etcd inside the test process (etcd's embed
// package) on random loopback ports, for the tests of the cluster package and of nstarget
// nodes. It must never be used outside tests: it has no persistence worth the name and no
// authentication.
package etcdtest

import (
	"fmt"
	"net"
	"net/url"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Server is a running etcd.
type Server struct {
	URL string // the client URL, http://127.0.0.1:PORT
	e   *embed.Etcd
}

// Start starts etcd with its data in dir and waits until it serves (or fails, or patience
// runs out). Ticks are 10 ms so leases and elections are quick.
func Start(dir string, patience time.Duration) (*Server, error) {
	cfg := embed.NewConfig()
	cfg.Name = "test"
	cfg.Dir = dir
	cfg.TickMs, cfg.ElectionMs = 10, 100
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	var urls [2]url.URL
	for i := range urls {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("etcdtest: %w", err)
		}
		urls[i] = url.URL{Scheme: "http", Host: ln.Addr().String()}
		ln.Close()
	}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = urls[:1], urls[:1]
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = urls[1:], urls[1:]
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("etcdtest: start: %w", err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("etcdtest: %w", err)
	case <-time.After(patience):
		e.Close()
		return nil, fmt.Errorf("etcdtest: not ready within %v", patience)
	}
	return &Server{URL: urls[0].String(), e: e}, nil
}

// Stop stops etcd.
func (s *Server) Stop() { s.e.Close() }
