#!/usr/bin/env bash
# metrics-cost.sh — what Prometheus metrics cost the data path: 4K random reads at QD32 against
# the same nstarget binary with `[server] metrics` on and scraped every second, and with it off,
# alternating in the same run (iscsi-perf.sh's before/after mode). Goal: ratio >= 0.98 (under
# 2%). The per-command counters behind the metrics are always kept; their own cost was measured
# against the code before them (target/README.md). Environment: ROUNDS (3), RUNTIME (10 s).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=$(mktemp -d /tmp/bnch-metrics.XXXXXX)
trap 'rm -rf "$BIN"' EXIT
(cd "$ROOT" && go build -o "$BIN/nstarget" ./cmd/nstarget)
NST_BIN=$BIN/nstarget PEER_BIN=$BIN/nstarget NST_METRICS=127.0.0.1:9479 CASES=4k-rand-qd32 \
	RESULTS_DIR=${RESULTS_DIR:-/tmp/nstarget-bench-metrics} bash "$ROOT/scripts/bench/iscsi-perf.sh"
