package main

import (
	"path/filepath"
	"sync"

	"nstarget/conf"
	"nstarget/netnsmux"
)

// readiness decides when serve is ready in systemd's sense (READY=1): serve has registered every
// listener, and every tenant whose namespace exists at start has had its first listen outcome.
// A listen that failed counts (it is logged and retried): one tenant's port taken by someone
// else must not keep the whole service, and every other tenant, from starting. Tenants whose
// namespace is missing are not waited for; they are served when it appears.
type readiness struct {
	ready func()

	mu      sync.Mutex
	pending map[string]bool // namespace names still without a listen outcome
	serving bool
	done    bool
}

func newReadiness(cfg *conf.Config, ready func()) *readiness {
	return newReadinessWith(cfg, namespaceExists, ready)
}

// newReadinessWith takes the namespace check, so tests need no real namespaces.
func newReadinessWith(cfg *conf.Config, exists func(path string) bool, ready func()) *readiness {
	r := &readiness{ready: ready, pending: make(map[string]bool)}
	for _, tn := range cfg.Tenants {
		if exists(filepath.Join(cfg.Server.NetnsDir, tn.Netns)) {
			r.pending[tn.Netns] = true
		}
	}
	return r
}

// event takes netnsmux's events (serveOptions.OnEvent); it does not block beyond one datagram.
func (r *readiness) event(ev netnsmux.Event) {
	switch ev.Kind {
	case netnsmux.ListenerUp, netnsmux.ListenerFailed, netnsmux.NamespaceRemoved:
		r.mu.Lock()
		delete(r.pending, ev.Namespace)
		r.mu.Unlock()
		r.check()
	}
}

// started says serve has asked for every tenant's listener (serveOptions.OnService).
func (r *readiness) started() {
	r.mu.Lock()
	r.serving = true
	r.mu.Unlock()
	r.check()
}

func (r *readiness) check() {
	r.mu.Lock()
	fire := !r.done && r.serving && len(r.pending) == 0
	if fire {
		r.done = true
	}
	r.mu.Unlock()
	if fire {
		r.ready()
	}
}
