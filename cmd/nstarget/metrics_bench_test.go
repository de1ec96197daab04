package main

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"

	"nstarget/target"
	"nstarget/target/scsi"
)

// BenchmarkScrape1024Tenants is one /metrics scrape of a server with 1024 tenants of one
// target and one LUN each: its time and its size (bytes/scrape).
func BenchmarkScrape1024Tenants(b *testing.B) {
	srv := target.NewServer(target.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	for i := range 1024 {
		t := srv.NewTenant(fmt.Sprintf("tenant-%04d", i), target.Limits{})
		tg, err := srv.NewTarget(target.TargetConfig{IQN: "iqn.2026-12.org.nstarget:bench", LUNs: map[uint64]*scsi.LU{0: nil}})
		if err != nil {
			b.Fatal(err)
		}
		t.Targets = []*target.Target{tg}
	}
	e := newExporter()
	e.srv.Store(srv)
	reg := prometheus.NewRegistry()
	reg.MustRegister(e)
	var buf bytes.Buffer
	b.ReportAllocs()
	for b.Loop() {
		buf.Reset()
		mfs, err := reg.Gather()
		if err != nil {
			b.Fatal(err)
		}
		enc := expfmt.NewEncoder(&buf, expfmt.NewFormat(expfmt.TypeTextPlain))
		for _, mf := range mfs {
			if err := enc.Encode(mf); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.ReportMetric(float64(buf.Len()), "bytes/scrape")
}
