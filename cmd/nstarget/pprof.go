package main

import (
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
)

// listenPprof serves Go's profiler on addr so the data path can be profiled in place
// (scripts/bench/iscsi-perf.sh PROFILE=1 uses it), and usage on /debug/usage. It listens from
// the calling goroutine, which netnsmux guarantees is in the root namespace: no goroutine of
// this process is ever left in a tenant's. The returned listener's Close stops it.
func listenPprof(addr string, usage http.Handler) (net.Listener, error) {
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return nil, usageError{fmt.Sprintf("-pprof %q: want ip:port: %v", addr, err)}
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("-pprof %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	mux.Handle("/debug/usage", usage)
	go http.Serve(ln, mux) // ends with an error when ln is closed
	return ln, nil
}
