package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"nstarget/backend"
	"nstarget/netnsmux"
	"nstarget/target"
)

// The Prometheus exporter of [server] metrics = "ip:port" (opt-in). Everything is read at
// scrape time from counters the target and netnsmux keep anyway, so the data path pays for
// no exporter: only for a few atomic adds per command.

var (
	descCommands = prometheus.NewDesc("nstarget_commands_total", "SCSI commands answered.", []string{"tenant", "target", "lun"}, nil)
	descRead     = prometheus.NewDesc("nstarget_read_bytes_total", "Bytes read by initiators (Data-In).", []string{"tenant", "target", "lun"}, nil)
	descWrite    = prometheus.NewDesc("nstarget_write_bytes_total", "Bytes written by initiators.", []string{"tenant", "target", "lun"}, nil)
	descLatency  = prometheus.NewDesc("nstarget_command_duration_seconds", "Device time of SCSI commands, from dispatch to result.", []string{"tenant"}, nil)
	descSessions = prometheus.NewDesc("nstarget_sessions", "Logged-in sessions.", []string{"tenant"}, nil)
	descConns    = prometheus.NewDesc("nstarget_connections", "Open connections.", []string{"tenant"}, nil)
	descInFlight = prometheus.NewDesc("nstarget_commands_in_flight", "SCSI commands received and not yet fully answered.", []string{"tenant"}, nil)
	descWindow   = prometheus.NewDesc("nstarget_fair_window", "Commands each session of the tenant may have in flight now because other tenants are busy too; 0: not limited.", []string{"tenant"}, nil)
	descPace     = prometheus.NewDesc("nstarget_fair_pace_seconds", "How long each command of the tenant waits before it runs because even one command per session costs more than its share; 0: none.", []string{"tenant"}, nil)
	descBuffers  = prometheus.NewDesc("nstarget_buffer_bytes", "Buffer bytes held for commands and queued answers.", []string{"tenant"}, nil)
	descLogins   = prometheus.NewDesc("nstarget_logins_total", "Logins by result.", []string{"tenant", "result"}, nil)
	descNSEvents = prometheus.NewDesc("nstarget_namespace_events_total", "Namespace and listener events.", []string{"kind"}, nil)
	descSetns    = prometheus.NewDesc("nstarget_netns_setns_total", "setns calls made by netnsmux (never on the data path).", nil, nil)
	descSkips    = prometheus.NewDesc("nstarget_netns_setns_skipped_total", "Namespace switches avoided: the thread was there already.", nil, nil)
	descMismatch = prometheus.NewDesc("nstarget_netns_identity_mismatches_total", "Accepted sockets whose namespace was not their listener's (closed).", nil, nil)
	descNS       = prometheus.NewDesc("nstarget_netns_held", "Namespace handles held.", nil, nil)
	descLn       = prometheus.NewDesc("nstarget_netns_listeners", "Listening sockets open.", nil, nil)
	descNSConns  = prometheus.NewDesc("nstarget_netns_accepted_open", "Accepted connections not yet closed.", nil, nil)
	descPoolSize = prometheus.NewDesc("nstarget_pool_size_bytes", "Size of the file system under the volume pool.", nil, nil)
	descPoolFree = prometheus.NewDesc("nstarget_pool_free_bytes", "Free bytes in the volume pool's file system (volumes are thin: writes fail at 0).", nil, nil)
)

var nsEventKinds = map[netnsmux.EventKind]string{
	netnsmux.NamespaceAdded: "namespace_added", netnsmux.NamespaceRemoved: "namespace_removed",
	netnsmux.NamespaceReplaced: "namespace_replaced", netnsmux.ListenerUp: "listener_up",
	netnsmux.ListenerFailed: "listener_failed",
}

// exporter is a prometheus.Collector over the running server.
type exporter struct {
	srv  atomic.Pointer[target.Server]
	mux  atomic.Pointer[netnsmux.Mux]
	pool atomic.Pointer[backend.Pool]

	mu     sync.Mutex
	events map[string]uint64
}

func newExporter() *exporter { return &exporter{events: make(map[string]uint64)} }

func (e *exporter) event(ev netnsmux.Event) {
	kind := nsEventKinds[ev.Kind]
	if kind == "" {
		kind = "other"
	}
	e.mu.Lock()
	e.events[kind]++
	e.mu.Unlock()
}

func (e *exporter) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descCommands, descRead, descWrite, descLatency, descSessions, descConns,
		descInFlight, descBuffers, descWindow, descPace, descLogins, descNSEvents, descSetns, descSkips, descMismatch, descNS, descLn, descNSConns, descPoolSize, descPoolFree} {
		ch <- d
	}
}

func (e *exporter) Collect(ch chan<- prometheus.Metric) {
	if srv := e.srv.Load(); srv != nil {
		for _, tm := range srv.Metrics() {
			for _, l := range tm.LUNs {
				lun := strconv.FormatUint(l.LUN, 10)
				ch <- prometheus.MustNewConstMetric(descCommands, prometheus.CounterValue, float64(l.Commands), tm.Name, l.Target, lun)
				ch <- prometheus.MustNewConstMetric(descRead, prometheus.CounterValue, float64(l.ReadBytes), tm.Name, l.Target, lun)
				ch <- prometheus.MustNewConstMetric(descWrite, prometheus.CounterValue, float64(l.WrittenBytes), tm.Name, l.Target, lun)
			}
			buckets := make(map[float64]uint64, len(target.LatencyBuckets))
			for i, b := range target.LatencyBuckets {
				buckets[b] = tm.LatencyBuckets[i]
			}
			ch <- prometheus.MustNewConstHistogram(descLatency, tm.LatencyCount, tm.LatencySumSeconds, buckets, tm.Name)
			ch <- prometheus.MustNewConstMetric(descSessions, prometheus.GaugeValue, float64(tm.Usage.Sessions), tm.Name)
			ch <- prometheus.MustNewConstMetric(descConns, prometheus.GaugeValue, float64(tm.Usage.Connections), tm.Name)
			ch <- prometheus.MustNewConstMetric(descInFlight, prometheus.GaugeValue, float64(tm.Usage.Commands), tm.Name)
			ch <- prometheus.MustNewConstMetric(descBuffers, prometheus.GaugeValue, float64(tm.Usage.BufferBytes), tm.Name)
			ch <- prometheus.MustNewConstMetric(descWindow, prometheus.GaugeValue, float64(tm.Usage.FairWindow), tm.Name)
			ch <- prometheus.MustNewConstMetric(descPace, prometheus.GaugeValue, tm.Usage.FairPace.Seconds(), tm.Name)
			ch <- prometheus.MustNewConstMetric(descLogins, prometheus.CounterValue, float64(tm.LoginsOK), tm.Name, "ok")
			ch <- prometheus.MustNewConstMetric(descLogins, prometheus.CounterValue, float64(tm.LoginsFailed), tm.Name, "failed")
		}
	}
	e.mu.Lock()
	for kind, n := range e.events {
		ch <- prometheus.MustNewConstMetric(descNSEvents, prometheus.CounterValue, float64(n), kind)
	}
	e.mu.Unlock()
	if m := e.mux.Load(); m != nil {
		st := m.Stats()
		ch <- prometheus.MustNewConstMetric(descSetns, prometheus.CounterValue, float64(st.Switches))
		ch <- prometheus.MustNewConstMetric(descSkips, prometheus.CounterValue, float64(st.Skips))
		ch <- prometheus.MustNewConstMetric(descMismatch, prometheus.CounterValue, float64(st.Mismatches))
		ch <- prometheus.MustNewConstMetric(descNS, prometheus.GaugeValue, float64(st.Namespaces))
		ch <- prometheus.MustNewConstMetric(descLn, prometheus.GaugeValue, float64(st.Listeners))
		ch <- prometheus.MustNewConstMetric(descNSConns, prometheus.GaugeValue, float64(st.Conns))
	}
	if p := e.pool.Load(); p != nil {
		// A pool whose file system cannot be read is left out of this scrape; status says why.
		if sp, err := p.Space(); err == nil {
			ch <- prometheus.MustNewConstMetric(descPoolSize, prometheus.GaugeValue, float64(sp.PoolSize))
			ch <- prometheus.MustNewConstMetric(descPoolFree, prometheus.GaugeValue, float64(sp.PoolFree))
		}
	}
}

// serveMetrics listens on addr (in the root namespace) and serves /metrics until ctx is done.
// The listener is bound before it returns, so a bad address is a start-up error.
func serveMetrics(ctx context.Context, addr string, e *exporter, log *slog.Logger) (func(), error) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(e, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorLog: slogErrorLog{log}}))
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := hs.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server", "err", err)
		}
	}()
	log.Info("metrics serving", "addr", ln.Addr().String())
	return func() {
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		hs.Shutdown(sctx)
		<-done
	}, nil
}

// slogErrorLog adapts slog to promhttp's error logger.
type slogErrorLog struct{ log *slog.Logger }

func (l slogErrorLog) Println(v ...any) { l.log.Warn("metrics", "err", fmt.Sprint(v...)) }
