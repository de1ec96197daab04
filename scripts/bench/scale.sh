#!/usr/bin/env bash
# scale.sh — "scale under load" benchmark of `make bench` (issue 11).
#
# Runs the Go driver tests/scalebench (its own iSCSI initiator with per-command latency, run in
# the tenants' namespaces) against `nstarget serve`, one server at a time, with tenant
# namespaces made in-process in a private netns dir (/run/sb<PID>-netns, names sb<PID>-NNNN).
# Prints, with the goal next to each measured value (medians of ROUNDS rounds of the same run):
#   - data path at scale: 16 sessions on 16 tenants, 4K random read QD16 and 1M sequential read,
#     with 1, 16, 64, 512, 1024 tenants configured; the 1024/16 ratio; server CPU per I/O;
#     setns calls during I/O from the Mux Stats counter (metrics endpoint) and from
#     `strace -f -c -e trace=setns -p PID` during a separate (untimed) run;
#   - resources per count, idle and busy: threads, RSS (slope per idle tenant), fds; the kernel's
#     memory per namespace (/proc/meminfo deltas while creating them; not ours);
#   - bring-up: exec -> first / every tenant accepting (a TCP listener in LISTEN state on the
#     portal inside each namespace, seen through sock_diag, batched through io_uring: no
#     connection is made; the prober's own CPU time is reported), -> every tenant answering
#     SendTargets; every binary is started once untimed first; optionally a base binary
#     alternately;
#   - fairness: a noisy tenant (4K writes, QD128 over 4 sessions) vs 15 quiet ones (4K reads
#     QD4), per-tenant IOPS and p99, and a server CPU profile of a noisy run;
#   - churn under load: 300 other tenants' namespaces deleted and re-created in a loop and
#     tenants added/removed by `nstarget reload` while the 16 sessions run I/O; mount ->
#     accepting is seen by sock_diag (LISTEN state, looked at every 0.2 ms by a prober at the
#     servers' nice level), then timed again with a connect from inside the namespace (the
#     earlier prober); every sample goes to RESULTS_DIR/churn-samples-*.tsv.
# Writes SVG plots to bench/results/ (see bench/results/README.md), the table and raw JSON to
# RESULTS_DIR. Asserts nothing about speed: exits non-zero only when a run fails (a server
# that does not come up, an I/O error, a lost session, a tenant that does not serve again).
#
# Environment (all optional):
#   ROUNDS=3              rounds (medians over them)
#   RUNTIME=5             seconds per I/O run
#   TENANTS=1,16,64,512,1024   configured-tenant counts of the sweep (16 is the ratio's base)
#   PHASES=sweep,bringup,fair,churn
#   CHURN_SECONDS=20      churn phase length (the issue's full run: 60)
#   CHURN_TENANTS=300     tenants whose namespaces are deleted and re-created
#   RELOAD_TENANTS=32     tenants added and removed through `nstarget reload`
#   BRINGUP_ROUNDS=3      starts per count for the bring-up table
#   ACCEPT_METHOD=sock_diag   how bring-up sees a tenant accepting; connect: a connection from
#                         inside the namespace, which the server accepts (the earlier prober)
#   PROBE_PAUSE=2ms       least pause between the prober's sweeps (never shorter than twice
#                         its CPU time in the sweep before: at most a third of a core)
#   ACCEPT_AB=0           1: bring-up also times this binary under the earlier prober (connect,
#                         0.5 ms between sweeps), alternating, to show what probing costs
#   BASE_BIN=path         also time this nstarget binary's bring-up (before/after, alternating
#                         starts) and churn (a churn phase of its own just before this one's), or
#   BASE_REV=rev          build it from git revision rev (git archive; the work tree is untouched)
#   STRACE=1              0: skip the strace check
#   NST_BIN=path          use this nstarget binary instead of building one
#   RESULTS_DIR=/tmp/nstarget-bench   tables, raw JSON, CPU profiles
#   PLOTS_DIR=bench/results           SVG plots
#   KEEP_WORK=0           1: keep the work dir (pool, configs, server logs)
#   BENCH_NICE=0          e.g. -10: run servers, load clients and the bring-up prober and
#                         discovery threads at this nice level, so other load on a shared
#                         machine disturbs them less (as iscsi-perf.sh)
#
# Default runtime on the 2-core VM: ~5-6 min (sweep ~3 min, bring-up ~1 min, fairness ~40 s,
# churn ~40 s, setup ~15 s).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-5}
TENANTS=${TENANTS:-1,16,64,512,1024}
PHASES=${PHASES:-sweep,bringup,fair,churn}
CHURN_SECONDS=${CHURN_SECONDS:-20}
CHURN_TENANTS=${CHURN_TENANTS:-300}
RELOAD_TENANTS=${RELOAD_TENANTS:-32}
BRINGUP_ROUNDS=${BRINGUP_ROUNDS:-3}
ACCEPT_METHOD=${ACCEPT_METHOD:-sock_diag}
PROBE_PAUSE=${PROBE_PAUSE:-2ms}
ACCEPT_AB=${ACCEPT_AB:-0}
STRACE=${STRACE:-1}
RESULTS_DIR=${RESULTS_DIR:-/tmp/nstarget-bench}
PLOTS_DIR=${PLOTS_DIR:-$ROOT/bench/results}
KEEP_WORK=${KEEP_WORK:-0}
BENCH_NICE=${BENCH_NICE:-0}
[[ $BENCH_NICE =~ ^-?[0-9]+$ ]] || { echo "BENCH_NICE must be an integer" >&2; exit 1; }

log() { printf '[scale %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "needs root (network namespaces)"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "RUNTIME must be a positive integer (seconds)"
[[ $CHURN_SECONDS =~ ^[1-9][0-9]*$ ]] || die "CHURN_SECONDS must be a positive integer"
export PATH=$PATH:/usr/sbin:/sbin
command -v go >/dev/null || die "go is missing"
if [[ $STRACE == 1 ]] && ! command -v strace >/dev/null; then
	# scripts/deps.sh does not install strace; the line it would need: [strace]=strace
	log "strace missing: the strace check is skipped (apt-get install strace)"
	STRACE=0
fi

PREFIX=sb$$
NSDIR=/run/$PREFIX-netns
WORK=$(mktemp -d /tmp/sb-scale.XXXXXX)
DRIVER_PID=""
cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	if [[ -n $DRIVER_PID ]] && kill -0 "$DRIVER_PID" 2>/dev/null; then
		kill -TERM "$DRIVER_PID" 2>/dev/null || true # the driver stops its servers, deletes its namespaces
		wait "$DRIVER_PID" 2>/dev/null || true
	fi
	# Whatever the driver left (it was killed hard, say): our prefix only.
	if [[ -d $NSDIR ]]; then
		"${NST_BIN:-$WORK/nstarget}" fleet delete -prefix "$PREFIX" -netns-dir "$NSDIR" 2>/dev/null || true
		rmdir "$NSDIR" 2>/dev/null || true
	fi
	if [[ $KEEP_WORK == 1 ]]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -z ${NST_BIN:-} ]]; then
	log "go build -o $WORK/nstarget ./cmd/nstarget"
	(cd "$ROOT" && go build -o "$WORK/nstarget" ./cmd/nstarget) || die "go build failed"
	NST_BIN=$WORK/nstarget
fi
(cd "$ROOT" && go build -o "$WORK/scalebench" ./tests/scalebench) || die "go build ./tests/scalebench failed"
BASE_ARGS=()
if [[ -n ${BASE_REV:-} ]]; then
	log "building the base nstarget from $BASE_REV (git archive)"
	mkdir -p "$WORK/base-src"
	git -C "$ROOT" archive "$BASE_REV" | tar -x -C "$WORK/base-src" || die "git archive $BASE_REV failed"
	(cd "$WORK/base-src" && go build -o "$WORK/nstarget-base" ./cmd/nstarget) || die "cannot build $BASE_REV"
	BASE_BIN=$WORK/nstarget-base
fi
[[ -n ${BASE_BIN:-} ]] && BASE_ARGS=(-base-nst "$BASE_BIN")
STRACE_ARG=-strace=true
[[ $STRACE == 1 ]] || STRACE_ARG=-strace=false

log "load before start: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs"
mkdir -p "$WORK/run"
(cd "$ROOT" && exec "$WORK/scalebench" -nst "$NST_BIN" "${BASE_ARGS[@]}" -prefix "$PREFIX" -netns-dir "$NSDIR" \
	-work "$WORK/run" -results "$RESULTS_DIR" -plots "$PLOTS_DIR" -tenants "$TENANTS" -rounds "$ROUNDS" \
	-runtime "${RUNTIME}s" -phases "$PHASES" -churn "${CHURN_SECONDS}s" -churn-tenants "$CHURN_TENANTS" \
	-reload-tenants "$RELOAD_TENANTS" -bringup-rounds "$BRINGUP_ROUNDS" -nice "$BENCH_NICE" "$STRACE_ARG" \
	-accept-method "$ACCEPT_METHOD" -probe-pause "$PROBE_PAUSE" -accept-ab="$([[ $ACCEPT_AB == 1 ]] && echo true || echo false)") &
DRIVER_PID=$!
rc=0
wait "$DRIVER_PID" || rc=$?
DRIVER_PID=""
log "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
((rc == 0)) || die "some runs failed (see above)"
