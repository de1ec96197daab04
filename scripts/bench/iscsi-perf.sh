#!/usr/bin/env bash
# iscsi-perf.sh — the iSCSI data-path benchmark of `make bench`: nstarget vs Debian's tgtd.
#
# Same machine, same run, same 1 GiB page-cached volume file (pre-filled with random data once),
# same initiator (libiscsi's iscsi-perf, run with `ip netns exec` inside the server's namespace),
# each server alone in its own test namespace (prefix bnch) on 127.0.0.1:3260. The servers never
# run at the same time: every measurement starts a fresh server, runs the initiator(s), stops it.
# Each case runs for both servers alternately (the order flips every run) for ROUNDS rounds, and
# loopback TCP (iperf3, one stream, in a namespace) is measured in every round of the same run.
# It prints medians (IOPS, MiB/s, server CPU% from /proc/PID/stat utime+stime deltas, server
# threads), the nstarget/tgtd ratio next to the goal, 1M-sequential vs loopback TCP, and saves the
# raw runs as CSV. It asserts nothing about speed; it exits non-zero only when a run fails.
#
# nstarget is run the way an operator runs it: `go build -o BIN ./cmd/nstarget; BIN serve -c cfg`.
#
# Environment (all optional):
#   ROUNDS=3            rounds; every round runs every case once per server
#   RUNTIME=10          seconds per iscsi-perf / iperf3 run
#   CASES="..."         subset of: 4k-rand-qd32 4k-rand-qd1 64k-rand-qd8 1m-seq-qd4 4k-rand-qd16x2
#   RESULTS_DIR=/tmp/nstarget-bench   where the CSV, the table and failure logs are written
#   NST_BIN=path        use this nstarget binary instead of building one
#   PEER_REV=rev        before/after: the peer is nstarget built from git revision rev (e.g.
#                       HEAD~1) instead of tgtd; goal ratio 0.97 (no row may regress > 3%)
#   PEER_BIN=path       the same with a ready nstarget binary as the peer
#   NST_METRICS=ip:port nstarget (not the peer) serves Prometheus metrics there and is scraped
#                       every second while it runs: with PEER_BIN=the same binary, the ratio is
#                       the data-path cost of metrics (goal 0.98: under 2%)
#   NST_FALLBACK=0      0: nstarget must serve, else fail; 1: run tgtd in nstarget's place
#                       (harness validation only, loudly marked); auto: fall back if serve fails
#   NST_START_TIMEOUT=60  seconds to wait for a server (nstarget, tgtd) to serve the LUN; only a
#                       server that never comes up waits this long
#   PROFILE=0           1: capture a CPU profile of nstarget per case (round 1) if its `serve`
#                       has a pprof flag (NST_PPROF_FLAG, default -pprof, value host:port)
#   KEEP_WORK=0         1: keep the work dir (volume, configs, logs) for inspection
#   BENCH_NICE=0        e.g. -10: run servers, initiators and iperf3 at this nice level (both
#                       servers alike) so other load on a shared machine disturbs them less
#
# Default runtime: 5 cases x 2 servers x 3 rounds x 10 s + 3 x 10 s iperf3 + setup ~ 6-7 min.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-10}
ALL_CASES="4k-rand-qd32 4k-rand-qd1 64k-rand-qd8 1m-seq-qd4 4k-rand-qd16x2"
CASES=${CASES:-$ALL_CASES}
RESULTS_DIR=${RESULTS_DIR:-/tmp/nstarget-bench}
NST_FALLBACK=${NST_FALLBACK:-0}
NST_START_TIMEOUT=${NST_START_TIMEOUT:-60}
NST_PPROF_FLAG=${NST_PPROF_FLAG:--pprof}
PROFILE=${PROFILE:-0}
KEEP_WORK=${KEEP_WORK:-0}
BENCH_NICE=${BENCH_NICE:-0}
[[ $BENCH_NICE =~ ^-?[0-9]+$ ]] || { echo "BENCH_NICE must be an integer" >&2; exit 1; }
NICE=(nice -n "$BENCH_NICE") # nice execs its command: the PID we hold stays the server's
GOAL_RATIO=1.20
PEER_REV=${PEER_REV:-}
PEER_BIN=${PEER_BIN:-}
PEER_KIND=tgtd
PEER_NAME=tgtd
if [[ -n $PEER_REV || -n $PEER_BIN ]]; then
	PEER_KIND=nstarget
	PEER_NAME=base
	GOAL_RATIO=0.97
fi
NST_METRICS=${NST_METRICS:-}
if [[ -n $NST_METRICS ]]; then
	PEER_NAME=no-metrics
	GOAL_RATIO=0.98
fi
GOAL_LOOPBACK_PCT=80

IQN=iqn.2026-11.io.nstarget:bench
INI_PREFIX=iqn.2026-11.io.nstarget:bench-initiator
VOL_NAME=bench
VOL_BYTES=$((1024 * 1024 * 1024))
PORTAL=127.0.0.1:3260
# Namespaces carry the PID so a concurrent or crashed earlier run can never collide with this one.
NS_NST=bnch-nst-$$
NS_TGT=bnch-tgt-$$
NS_IPF=bnch-ipf-$$

declare -A C_BS=([4k-rand-qd32]=4096 [4k-rand-qd1]=4096 [64k-rand-qd8]=65536 [1m-seq-qd4]=1048576 [4k-rand-qd16x2]=4096)
declare -A C_QD=([4k-rand-qd32]=32 [4k-rand-qd1]=1 [64k-rand-qd8]=8 [1m-seq-qd4]=4 [4k-rand-qd16x2]=16)
declare -A C_RAND=([4k-rand-qd32]=1 [4k-rand-qd1]=1 [64k-rand-qd8]=1 [1m-seq-qd4]=0 [4k-rand-qd16x2]=1)
declare -A C_NINIT=([4k-rand-qd32]=1 [4k-rand-qd1]=1 [64k-rand-qd8]=1 [1m-seq-qd4]=1 [4k-rand-qd16x2]=2)

log() { printf '[iscsi-perf %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for c in $CASES; do [[ -n ${C_BS[$c]:-} ]] || die "unknown case $c (known: $ALL_CASES)"; done
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "RUNTIME must be a positive integer (seconds)"
[[ $(id -u) == 0 ]] || die "needs root (network namespaces)"

# ---- tools: only scripts/deps.sh installs anything ----
export PATH=$PATH:/usr/sbin:/sbin
need=(ip iscsi-perf iscsi-readcapacity16 tgtd tgtadm iperf3 qemu-img timeout)
[[ -n ${NST_BIN:-} && -z $PEER_REV ]] || need+=(go)
missing() { local t; for t in "${need[@]}"; do command -v "$t" >/dev/null 2>&1 || echo "$t"; done; }
if [[ -n $(missing) ]]; then
	log "missing: $(missing | tr '\n' ' ')— running scripts/deps.sh"
	bash "$ROOT/scripts/deps.sh"
	[[ -z $(missing) ]] || die "still missing after scripts/deps.sh: $(missing | tr '\n' ' ')"
fi

# ---- state owned by this run; the EXIT trap undoes all of it ----
WORK=$(mktemp -d /tmp/bnch-iscsi.XXXXXX)
STARTED_PIDS=() # every process this script started in the background
CREATED_NS=()   # every namespace this script created
TGT_CP=""       # tgtd control port (names our /var/run/tgtd/socket.N)
# The server currently running (at most one at a time).
SRV_PID="" SRV_NS="" SRV_URL="" SRV_BLOCK="" SRV_LOG="" SRV_KIND="" SRV_STARTS=0

stop_pid() { # stop_pid PID: TERM, then KILL after 10 s; only PIDs we started
	stop_pid_quiet "$@" 2>/dev/null # bash's "Killed" job notices are noise here
}
stop_pid_quiet() {
	local pid=$1 i
	kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < 100; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	kill -0 "$pid" 2>/dev/null && { kill -KILL "$pid" 2>/dev/null || true; }
	wait "$pid" 2>/dev/null || true
}

cleanup() {
	local rc=$? pid ns
	trap - EXIT INT TERM
	((rc < 128)) || log "interrupted; cleaning up"
	if declare -F stop_server >/dev/null; then stop_server; fi
	for pid in "${STARTED_PIDS[@]}"; do stop_pid "$pid"; done
	for ns in "${CREATED_NS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
	if [[ -n $TGT_CP ]]; then rm -f "/var/run/tgtd/socket.$TGT_CP" "/var/run/tgtd/socket.$TGT_CP.lock"; fi
	if [[ $KEEP_WORK == 1 ]]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

add_ns() {
	ip netns add "$1"
	CREATED_NS+=("$1")
	ip -n "$1" link set lo up
}

forget_pid() { # drop a PID we already stopped from the trap's list
	local keep=() p
	for p in "${STARTED_PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
	STARTED_PIDS=("${keep[@]}")
}

# ---- measurement helpers ----
now_ns() { date +%s%N; }
proc_ticks() { # utime+stime of a live process (all its threads), in clock ticks
	local s
	s=$(<"/proc/$1/stat") || return 1
	s=${s##*) }
	set -- $s
	echo $((${12} + ${13}))
}
child_ticks() { # cutime+cstime of the main shell: CPU of the children it has waited for
	local s
	s=$(<"/proc/$$/stat")
	s=${s##*) }
	set -- $s
	echo $((${14} + ${15}))
}
host_ticks() { # "busy total" jiffies over all CPUs
	local _cpu user nice sys idle iow irq sirq steal _rest
	read -r _cpu user nice sys idle iow irq sirq steal _rest </proc/stat
	echo "$((user + nice + sys + irq + sirq + steal)) $((user + nice + sys + idle + iow + irq + sirq + steal))"
}
HZ=$(getconf CLK_TCK)
NCPU=$(nproc)

# ---- the volume: one file, random data, page-cached, shared by both servers ----
POOL=$WORK/pool
VOL=$POOL/$VOL_NAME
mkdir -p "$POOL" "$RESULTS_DIR"
STAMP=$(date +%Y%m%d-%H%M%S)
CSV=$RESULTS_DIR/iscsi-perf-$STAMP.csv
TABLE=$RESULTS_DIR/iscsi-perf-$STAMP.txt

# ---- servers ----

wait_served() { # wait_served TIMEOUT_S: until the LUN answers READ CAPACITY 16 with our size
	local deadline=$(($(date +%s) + $1)) out
	while :; do
		kill -0 "$SRV_PID" 2>/dev/null || { log "server exited; log tail:"; tail -n 20 "$SRV_LOG" >&2; return 1; }
		if out=$(ip netns exec "$SRV_NS" timeout 5 iscsi-readcapacity16 -i "$INI_PREFIX-probe" "$SRV_URL" 2>&1); then
			local size blk
			size=$(awk -F: '/^Total size/ {print $2+0}' <<<"$out")
			blk=$(awk -F: '/LOGICAL BLOCK LENGTH IN BYTES/ {print $2+0}' <<<"$out")
			[[ $size == "$VOL_BYTES" ]] || { log "LUN size is '$size', want $VOL_BYTES"; return 1; }
			[[ $blk =~ ^[0-9]+$ && $blk -gt 0 ]] || { log "bad block length '$blk'"; return 1; }
			SRV_BLOCK=$blk
			break
		fi
		(($(date +%s) < deadline)) || { log "LUN not served after $1 s: $out"; tail -n 20 "$SRV_LOG" >&2; return 1; }
		sleep 0.2
	done
	# Same data for both: the server must have our pre-filled file open, not a volume of its own.
	local fd
	for fd in /proc/"$SRV_PID"/fd/*; do
		[[ $(readlink "$fd" 2>/dev/null) == "$VOL" ]] && return 0
	done
	log "server PID $SRV_PID does not have $VOL open; its files:"
	ls -l /proc/"$SRV_PID"/fd >&2 || true
	return 1
}

verify_data() { # verify_data LUN: 8 MiB read through the running server at a random offset == the file
	local lun=$1 off got=$WORK/verify.bin
	off=$((((RANDOM << 15 | RANDOM) % (VOL_BYTES / 4096 - 2048)) * 4096))
	rm -f "$got"
	ip netns exec "$SRV_NS" timeout 60 qemu-img dd --image-opts -O raw bs=1048576 count=8 \
		"if=driver=raw,offset=$off,size=8388608,file.driver=iscsi,file.transport=tcp,file.portal=$PORTAL,file.target=$IQN,file.lun=$lun" \
		"of=$got" >>"$SRV_LOG" 2>&1 || { log "qemu-img read through $SRV_KIND failed"; tail -n 5 "$SRV_LOG" >&2; return 1; }
	if ! cmp -s "$got" <(dd if="$VOL" bs=1M iflag=skip_bytes,count_bytes skip="$off" count=8388608 status=none); then
		log "$SRV_KIND returned different data than the volume file at offset $off"
		return 1
	fi
	log "$SRV_KIND serves the volume's data (8 MiB at offset $off compared)"
}

start_tgtd() { # start_tgtd NS: Debian's tgtd alone in NS, LUN 1 = our volume
	local ns=$1 i
	SRV_STARTS=$((SRV_STARTS + 1))
	SRV_NS=$ns SRV_KIND=tgtd SRV_LOG=$WORK/tgtd-$SRV_STARTS.log
	ip netns exec "$ns" "${NICE[@]}" tgtd -f -C "$TGT_CP" --iscsi portal="$PORTAL" >>"$SRV_LOG" 2>&1 &
	SRV_PID=$!
	STARTED_PIDS+=("$SRV_PID")
	for ((i = 0; i < NST_START_TIMEOUT * 10; i++)); do
		tgtadm -C "$TGT_CP" --lld iscsi --mode target --op new --tid 1 --targetname "$IQN" >>"$SRV_LOG" 2>&1 && break
		kill -0 "$SRV_PID" 2>/dev/null || break
		sleep 0.1
	done
	tgtadm -C "$TGT_CP" --lld iscsi --mode logicalunit --op new --tid 1 --lun 1 --backing-store "$VOL" >>"$SRV_LOG" 2>&1 &&
		tgtadm -C "$TGT_CP" --lld iscsi --mode target --op bind --tid 1 --initiator-address ALL >>"$SRV_LOG" 2>&1 ||
		{ log "tgtadm setup failed; log tail:"; tail -n 20 "$SRV_LOG" >&2; return 1; }
	SRV_URL=iscsi://$PORTAL/$IQN/1 # tgtd's LUN 0 is its controller
	wait_served "$NST_START_TIMEOUT"
}

NST_CFG=$WORK/nstarget.toml
PEER_CFG=$WORK/nstarget-base.toml
PPROF_ADDR=""
start_nstarget() {
	SRV_STARTS=$((SRV_STARTS + 1))
	SRV_NS=$NS_NST SRV_KIND=nstarget SRV_LOG=$WORK/nstarget-$SRV_STARTS.log
	local extra=()
	[[ -n $PPROF_ADDR ]] && extra=("$NST_PPROF_FLAG" "$PPROF_ADDR")
	"${NICE[@]}" "$NST_BIN" serve -c "$NST_CFG" "${extra[@]}" >>"$SRV_LOG" 2>&1 &
	SRV_PID=$!
	STARTED_PIDS+=("$SRV_PID")
	SRV_URL=iscsi://$PORTAL/$IQN/0
	wait_served "$NST_START_TIMEOUT"
}

NST_IS_TGTD=0 # fallback: tgtd plays nstarget's part (harness validation only)
# start_peer_nstarget: the base nstarget of a before/after run, alone in the peer's namespace.
start_peer_nstarget() {
	SRV_STARTS=$((SRV_STARTS + 1))
	SRV_NS=$NS_TGT SRV_KIND=nstarget-base SRV_LOG=$WORK/nstarget-base-$SRV_STARTS.log
	"${NICE[@]}" "$PEER_BIN" serve -c "$PEER_CFG" >>"$SRV_LOG" 2>&1 &
	SRV_PID=$!
	STARTED_PIDS+=("$SRV_PID")
	SRV_URL=iscsi://$PORTAL/$IQN/0
	wait_served "$NST_START_TIMEOUT"
}

start_server() { # start_server nst|tgt
	if [[ $1 == tgt && $PEER_KIND == nstarget ]]; then
		start_peer_nstarget
	elif [[ $1 == tgt ]]; then
		start_tgtd "$NS_TGT"
	elif [[ $NST_IS_TGTD == 1 ]]; then
		start_tgtd "$NS_NST"
	else
		start_nstarget
	fi
}
stop_server() {
	[[ -n $SRV_PID ]] || return 0
	# tgtd ignores SIGTERM while it has targets; it holds no state worth a clean stop here.
	[[ $SRV_KIND == tgtd ]] && { kill -KILL "$SRV_PID" 2>/dev/null || true; }
	stop_pid "$SRV_PID"
	forget_pid "$SRV_PID"
	SRV_PID=""
}
label() { if [[ $1 == tgt ]]; then echo "$PEER_NAME"; elif [[ $NST_IS_TGTD == 1 ]]; then echo "tgtd-as-nstarget(FALLBACK)"; else echo nstarget; fi; }

FAILED=0
echo "kind,round,case,server,label,initiators,bs,qd,pattern,runtime_s,iops,mib_s,server_cpu_pct,server_threads,client_cpu_pct,host_busy_pct,wall_s,status" >"$CSV"

run_case() { # run_case SERVER CASE ROUND
	local srv=$1 cs=$2 round=$3
	local bs=${C_BS[$cs]} qd=${C_QD[$cs]} rnd=${C_RAND[$cs]} n=${C_NINIT[$cs]}
	local pattern=seq lbl status=ok
	((rnd)) && pattern=rand
	lbl=$(label "$srv")
	if ! start_server "$srv"; then
		log "$lbl did not come up for $cs round $round (log: $RESULTS_DIR/$STAMP-$(basename "$SRV_LOG"))"
		cp "$SRV_LOG" "$RESULTS_DIR/$STAMP-$(basename "$SRV_LOG")" 2>/dev/null || true
		stop_server
		FAILED=1
		echo "iscsi,$round,$cs,$srv,$lbl,$n,$bs,$qd,$pattern,$RUNTIME,,,,,,,,server-start-failed" >>"$CSV"
		return 0
	fi
	((bs % SRV_BLOCK == 0)) || die "$lbl block size $SRV_BLOCK does not divide $bs"
	local args=(-m "$qd" -b "$((bs / SRV_BLOCK))" -t "$RUNTIME")
	((rnd)) && args+=(-r)

	local prof_pid=""
	if [[ $srv == nst && -n $PPROF_ADDR && $round == 1 ]]; then
		local secs=$((RUNTIME > 3 ? RUNTIME - 2 : 1))
		curl -fsS -o "$RESULTS_DIR/pprof-$STAMP-$cs.pb.gz" "http://$PPROF_ADDR/debug/pprof/profile?seconds=$secs" &
		prof_pid=$!
		STARTED_PIDS+=("$prof_pid")
	fi

	local t0 s0 c0 h0 pids=() outs=() k
	s0=$(proc_ticks "$SRV_PID")
	c0=$(child_ticks)
	h0=$(host_ticks)
	t0=$(now_ns)
	for ((k = 1; k <= n; k++)); do
		local out=$WORK/perf-$srv-$cs-$round-$k.out
		timeout -k 5 $((RUNTIME + 30)) ip netns exec "$SRV_NS" \
			"${NICE[@]}" iscsi-perf -i "$INI_PREFIX-$k" "${args[@]}" "$SRV_URL" >"$out" 2>&1 &
		pids+=($!)
		outs+=("$out")
		STARTED_PIDS+=($!)
	done
	if [[ $srv == nst && -n $NST_METRICS ]]; then
		# A Prometheus server's scrape, every second while the initiators run.
		(while kill -0 "${pids[0]}" 2>/dev/null; do curl -fsS -o /dev/null "http://$NST_METRICS/metrics" || true; sleep 1; done) &
		STARTED_PIDS+=($!)
	fi
	sleep "$(awk -v r="$RUNTIME" 'BEGIN { print r / 2 }')" &
	wait $! || true # a wait, unlike a foreground sleep, lets INT/TERM traps run at once
	local threads
	threads=$(ls "/proc/$SRV_PID/task" 2>/dev/null | wc -l)
	local rc=0 p
	for p in "${pids[@]}"; do
		wait "$p" || rc=$?
		forget_pid "$p"
	done
	local t1 s1 c1 h1
	t1=$(now_ns)
	s1=$(proc_ticks "$SRV_PID" || echo "$s0")
	c1=$(child_ticks)
	h1=$(host_ticks)
	if [[ -n $prof_pid ]]; then
		wait "$prof_pid" || log "pprof capture for $cs failed"
		forget_pid "$prof_pid"
	fi
	stop_server

	local iops=0 o v
	for o in "${outs[@]}"; do
		v=$(grep -ao 'iops average [0-9]*' "$o" | tail -n 1 | awk '{print $3}')
		if [[ -z $v ]]; then
			status=initiator-failed
			break
		fi
		iops=$((iops + v))
	done
	((rc == 0)) || status=initiator-failed
	if [[ $status != ok ]]; then
		FAILED=1
		log "$lbl $cs round $round: initiator failed (rc=$rc); output and server log kept in $RESULTS_DIR"
		for o in "${outs[@]}"; do tr '\r' '\n' <"$o" | tail -n 5 >&2; cp "$o" "$RESULTS_DIR/"; done
		cp "$SRV_LOG" "$RESULTS_DIR/$STAMP-$(basename "$SRV_LOG")"
		iops=""
	fi
	local line mib scpu ccpu hbusy wall
	line=$(awk -v iops="$iops" -v bs="$bs" -v ds="$((s1 - s0))" -v dc="$((c1 - c0))" -v hz="$HZ" \
		-v ncpu="$NCPU" -v wall="$((t1 - t0))" -v h0="$h0" -v h1="$h1" 'BEGIN {
		split(h0, a, " "); split(h1, b, " "); w = wall / 1e9
		mib = (iops == "") ? "" : sprintf("%.1f", iops * bs / 1048576)
		hb = (b[2] - a[2] > 0) ? 100 * ncpu * (b[1] - a[1]) / (b[2] - a[2]) : 0
		printf "%s,%.1f,%.1f,%.1f,%.2f", mib, 100 * ds / hz / w, 100 * dc / hz / w, hb, w }')
	IFS=, read -r mib scpu ccpu hbusy wall <<<"$line"
	echo "iscsi,$round,$cs,$srv,$lbl,$n,$bs,$qd,$pattern,$RUNTIME,$iops,$mib,$scpu,$threads,$ccpu,$hbusy,$wall,$status" >>"$CSV"
	log "round $round  $(printf '%-15s %-27s' "$cs" "$lbl") IOPS ${iops:-FAIL}  ${mib:-?} MiB/s  srvCPU ${scpu}%  thr $threads  cliCPU ${ccpu}%  host ${hbusy}%"
}

run_loopback() { # run_loopback ROUND: one iperf3 stream over lo inside a namespace
	local round=$1 srvpid json=$WORK/iperf-$1.json i bits
	ip netns exec "$NS_IPF" "${NICE[@]}" iperf3 -s -B 127.0.0.1 -p 5201 >"$WORK/iperf-server-$round.log" 2>&1 &
	srvpid=$!
	STARTED_PIDS+=("$srvpid")
	for ((i = 0; i < NST_START_TIMEOUT * 10; i++)); do
		ip netns exec "$NS_IPF" ss -Hltn 'sport = :5201' 2>/dev/null | grep -q . && break
		kill -0 "$srvpid" 2>/dev/null || break
		sleep 0.1
	done
	timeout -k 5 $((RUNTIME + 30)) ip netns exec "$NS_IPF" "${NICE[@]}" iperf3 -c 127.0.0.1 -p 5201 -t "$RUNTIME" -P 1 -J >"$json" 2>&1 || true
	stop_pid "$srvpid"
	forget_pid "$srvpid"
	bits=$(awk '/"sum_received"/ { f = 1 } f && /"bits_per_second"/ { gsub(/[^0-9.]/, "", $2); print $2; exit }' "$json")
	if [[ -z $bits ]]; then
		FAILED=1
		log "iperf3 round $round failed:"
		tail -n 5 "$json" "$WORK/iperf-server-$round.log" >&2
		echo "loopback,$round,loopback-tcp,iperf3,iperf3,1,,,,$RUNTIME,,,,,,,,failed" >>"$CSV"
		return 0
	fi
	local mib
	mib=$(awk -v b="$bits" 'BEGIN { printf "%.1f", b / 8 / 1048576 }')
	echo "loopback,$round,loopback-tcp,iperf3,iperf3,1,,,,$RUNTIME,,$mib,,,,,,ok" >>"$CSV"
	log "round $round  loopback TCP (iperf3, 1 stream)              $mib MiB/s"
}

# ---- setup ----
log "load before start: $(cut -d' ' -f1-3 /proc/loadavg) on $NCPU CPUs; results -> $CSV"
add_ns "$NS_NST"
add_ns "$NS_TGT"
add_ns "$NS_IPF"
TGT_CP=$((20000 + $$ % 9000)) # tgtd refuses control ports above 32767
while [[ -e /var/run/tgtd/socket.$TGT_CP || -e /var/run/tgtd/socket.$TGT_CP.lock ]]; do TGT_CP=$((TGT_CP + 1)); done

log "filling the 1 GiB volume with random data (once, shared by both servers)"
# 64 MiB of urandom repeated: random enough for a read benchmark, and quick on a busy machine.
dd if=/dev/urandom of="$WORK/chunk" bs=1M count=64 status=none
for ((i = 0; i < VOL_BYTES / (64 * 1048576); i++)); do cat "$WORK/chunk"; done >"$VOL"
rm -f "$WORK/chunk"
[[ $(stat -c %s "$VOL") == "$VOL_BYTES" ]] || die "volume fill produced a wrong size"
sync "$VOL" 2>/dev/null || sync
cat "$VOL" >/dev/null # page-cached from here on

cat >"$NST_CFG" <<EOF
[server]
netns_dir = "/run/netns"
data_dir  = "$POOL"

[[tenant]]
name   = "bench"
netns  = "$NS_NST"
portal = "$PORTAL"
  [[tenant.target]]
  iqn = "$IQN"
    [[tenant.target.lun]]
    id     = 0
    volume = "$VOL_NAME"
    size   = "1GiB"
EOF

nst_unavailable() { # nst_unavailable REASON: fail, or fall back when asked to
	if [[ $NST_FALLBACK == auto ]]; then
		log "nstarget unavailable ($1): NST_FALLBACK=auto -> tgtd takes its place"
		NST_IS_TGTD=1
	else
		die "nstarget unavailable: $1 (NST_FALLBACK=1 or auto runs tgtd in its place to validate the harness)"
	fi
}

if [[ $NST_FALLBACK == 1 ]]; then
	NST_IS_TGTD=1
else
	if [[ -z ${NST_BIN:-} ]]; then
		NST_BIN=$WORK/nstarget
		log "go build -o $NST_BIN ./cmd/nstarget"
		(cd "$ROOT" && go build -o "$NST_BIN" ./cmd/nstarget) >"$WORK/build.log" 2>&1 ||
			{ tail -n 20 "$WORK/build.log" >&2; nst_unavailable "go build failed"; }
	fi
	if [[ $NST_IS_TGTD == 0 ]]; then
		# One probe start: a nstarget that cannot serve fails (or falls back) before any timing.
		if start_nstarget && verify_data 0; then stop_server; else
			stop_server
			cp "$SRV_LOG" "$RESULTS_DIR/$STAMP-nstarget-probe.log" 2>/dev/null || true
			nst_unavailable "serve -c did not serve $IQN/0 on $PORTAL in $NS_NST (log: $RESULTS_DIR/$STAMP-nstarget-probe.log)"
		fi
	fi
fi
if [[ $PEER_KIND == nstarget ]]; then
	sed "s/^netns  = \"$NS_NST\"/netns  = \"$NS_TGT\"/" "$NST_CFG" >"$PEER_CFG"
	# Only nstarget exports metrics; the peer runs the same file without them.
	[[ -z $NST_METRICS ]] || sed -i "s/^\[server\]/[server]\nmetrics = \"$NST_METRICS\"/" "$NST_CFG"
	if [[ -n $PEER_REV ]]; then
		PEER_BIN=$WORK/nstarget-base
		log "go build -o $PEER_BIN ./cmd/nstarget at $PEER_REV"
		git -C "$ROOT" worktree add -q --detach "$WORK/base-src" "$PEER_REV" >"$WORK/base-build.log" 2>&1 &&
			(cd "$WORK/base-src" && go build -o "$PEER_BIN" ./cmd/nstarget) >>"$WORK/base-build.log" 2>&1 ||
			{ tail -n 20 "$WORK/base-build.log" >&2; die "cannot build nstarget at $PEER_REV"; }
		git -C "$ROOT" worktree remove --force "$WORK/base-src" >/dev/null 2>&1 || true
		PEER_NAME="base@$(git -C "$ROOT" rev-parse --short "$PEER_REV")"
	fi
	start_peer_nstarget && verify_data 0 || die "the base nstarget does not serve the volume (log: $SRV_LOG)"
else
	start_tgtd "$NS_TGT" && verify_data 1 || die "tgtd does not serve the volume (log: $SRV_LOG)"
fi
stop_server
if [[ $PROFILE == 1 ]]; then
	if [[ $NST_IS_TGTD == 0 ]] && "$NST_BIN" help 2>&1 | grep -qE -- "-{1,2}${NST_PPROF_FLAG##*-}\b"; then
		command -v curl >/dev/null || die "PROFILE=1 needs curl"
		PPROF_ADDR=127.0.0.1:$((16000 + $$ % 10000))
		log "PROFILE=1: nstarget serve $NST_PPROF_FLAG $PPROF_ADDR; CPU profiles of round 1 -> $RESULTS_DIR/pprof-$STAMP-*.pb.gz"
	else
		log "PROFILE=1: nstarget serve has no $NST_PPROF_FLAG flag; profiling skipped"
	fi
fi
if [[ $NST_IS_TGTD == 1 ]]; then
	log "########################################################################"
	log "# FALLBACK: the 'nstarget' column is tgtd. This validates the harness  #"
	log "# only; it says nothing about nstarget.                                #"
	log "########################################################################"
fi

# ---- the measurement ----
log "$ROUNDS round(s) x ($(wc -w <<<"$CASES") cases x 2 servers + loopback) x ${RUNTIME}s"
run_idx=0
for ((round = 1; round <= ROUNDS; round++)); do
	run_loopback "$round"
	for cs in $CASES; do
		# Flip who goes first every time so slow drift of the machine hits both servers alike.
		if ((run_idx % 2 == 0)); then order="nst tgt"; else order="tgt nst"; fi
		run_idx=$((run_idx + 1))
		for srv in $order; do run_case "$srv" "$cs" "$round"; done
	done
done

# ---- the table of medians ----
summarize() {
	awk -F, -v cases="$CASES" -v goal="$GOAL_RATIO" -v lgoal="$GOAL_LOOPBACK_PCT" \
		-v nstlabel="$(label nst)" -v peer="$PEER_NAME" -v nicelvl="$BENCH_NICE" -v rounds="$ROUNDS" -v runtime="$RUNTIME" '
	function median(list,   v, n, i, j, t) {
		n = split(list, v, " ")
		if (n == 0) return ""
		for (i = 2; i <= n; i++) { t = v[i] + 0; for (j = i - 1; j >= 1 && v[j] + 0 > t; j--) v[j + 1] = v[j]; v[j + 1] = t }
		return (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
	}
	function add(k, x) { if (x != "") vals[k] = vals[k] " " x }
	NR == 1 { next }
	$1 == "loopback" && $18 == "ok" { add("lo", $12) }
	$1 == "iscsi" {
		k = $3 SUBSEP $4
		if ($18 == "ok") { add("host", $16); o = $16 - $13 - $15; add("other", o > 0 ? o : 0) } # tick rounding can go below 0
		if ($18 == "ok") { add(k SUBSEP "iops", $11); add(k SUBSEP "mib", $12); add(k SUBSEP "cpu", $13); add(k SUBSEP "thr", $14) }
		else fails[k]++
		per[k] = per[k] (per[k] == "" ? "" : "/") ($18 == "ok" ? $11 : "FAIL")
	}
	END {
		printf "iscsi-perf (libiscsi), 1 GiB page-cached volume, %d round(s) x %d s, medians; MiB/s = 2^20 B/s; CPU%% = server utime+stime / wall (100%% = one core)\n", rounds, runtime
		printf "nstarget column: %s; nice level of servers and initiators: %s\n\n", nstlabel, nicelvl
		printf "%-15s | %9s %8s %6s %6s %4s | %9s %8s %6s %6s %4s | %-7s %-7s %-5s | %s\n", "case", "nst IOPS", "MiB/s", "CPU%", "us/IO", "thr", substr(peer, 1, 9) " IOPS", "MiB/s", "CPU%", "us/IO", "thr", "ratio", "goal", "", "per-round IOPS nst vs " peer
		n = split(cases, cs, " ")
		for (i = 1; i <= n; i++) {
			c = cs[i]; a = c SUBSEP "nst"; b = c SUBSEP "tgt"
			ni = median(vals[a SUBSEP "iops"]); ti = median(vals[b SUBSEP "iops"])
			# Truncated, not rounded, so the printed ratio never reads as meeting a goal it misses.
			r = (ni != "" && ti > 0) ? int(100 * ni / ti) / 100 : ""
			mark = (r == "") ? "n/a" : (r >= goal ? "ok" : "BELOW")
			nc = median(vals[a SUBSEP "cpu"]); tc = median(vals[b SUBSEP "cpu"])
			# Server CPU time per I/O: CPU% of one core over IOPS, in microseconds.
			nu = (nc != "" && ni > 0) ? 1e4 * nc / ni : ""; tu = (tc != "" && ti > 0) ? 1e4 * tc / ti : ""
			printf "%-15s | %9s %8s %6s %6s %4s | %9s %8s %6s %6s %4s | %-7s %-7s %-5s | %s vs %s\n", c,
				fmt(ni, "%.0f"), fmt(median(vals[a SUBSEP "mib"]), "%.0f"), fmt(nc, "%.0f"), fmt(nu, "%.1f"), fmt(median(vals[a SUBSEP "thr"]), "%.0f"),
				fmt(ti, "%.0f"), fmt(median(vals[b SUBSEP "mib"]), "%.0f"), fmt(tc, "%.0f"), fmt(tu, "%.1f"), fmt(median(vals[b SUBSEP "thr"]), "%.0f"),
				fmt(r, "%.2fx"), ">=" goal "x", mark, per[a], per[b]
		}
		lo = median(vals["lo"])
		other = median(vals["other"]); hb = median(vals["host"])
		if (hb != "") {
			printf "\nhost CPU busy during iSCSI runs (median, 100%% = one core): %.0f%%, of which neither server nor initiator: %.0f%%\n", hb, other
			if (other > 20) printf "WARNING: other processes used the CPUs during the runs; these numbers are noisy.\n"
		}
		printf "loopback TCP (iperf3, 1 stream, same run): %s MiB/s (per round:%s)\n", fmt(lo, "%.0f"), vals["lo"]
		for (s = 1; s <= 2; s++) {
			who = (s == 1) ? "nst" : "tgt"; name = (s == 1) ? "nstarget" : peer
			m = median(vals["1m-seq-qd4" SUBSEP who SUBSEP "mib"])
			pct = (m != "" && lo > 0) ? int(100 * m / lo) : ""
			if (pct != "") printf "1m-seq-qd4 %-8s vs loopback TCP: %d%% (goal >= %d%%) %s\n", name, pct, lgoal, (s == 1) ? (pct >= lgoal ? "ok" : "BELOW") : "(reference)"
		}
	}
	function fmt(x, f) { return (x == "") ? "-" : sprintf(f, x) }
	' "$CSV"
}
echo
summarize | tee "$TABLE"
echo
log "raw runs: $CSV   table: $TABLE"
log "load after: $(cut -d' ' -f1-3 /proc/loadavg) — host_busy_pct in the CSV shows what else ran (100% = one core)"
((FAILED == 0)) || die "some runs failed (see above); their rows are marked in the CSV"
