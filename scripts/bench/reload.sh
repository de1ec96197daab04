#!/usr/bin/env bash
# reload.sh — a one-tenant change with 1024 tenants configured: how long `nstarget reload` takes
# (goal: under 100 ms), and whether another tenant's I/O pauses meanwhile (goal: none).
#
# 1024 tenant namespaces are made in-process (`nstarget fleet create`, in a directory of this
# run's own), served by one `nstarget serve`. Tenant 1 runs libiscsi's iscsi-perf (4K random
# reads, QD1, per-second IOPS) twice in the same run: once with nothing else happening (the
# baseline), once while tenant 1025 is added and removed again by RELOADS reloads back to back.
# It prints the reload times (as serve reports them, and around the `nstarget reload` command,
# exec included),
# the I/O tenant's IOPS in both phases, and its worst second during the reloads. It asserts
# nothing about speed; it exits non-zero only when something fails.
#
# Environment: TENANTS=1024, RELOADS=40, RUNTIME=10 (seconds per iscsi-perf phase), NST_BIN.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TENANTS=${TENANTS:-1024}
RELOADS=${RELOADS:-40}
RUNTIME=${RUNTIME:-10}
log() { printf '[reload %s] %s\n' "$(date +%T)" "$*" >&2; }
[[ $(id -u) == 0 ]] || { log "needs root (network namespaces)"; exit 1; }
command -v iscsi-perf >/dev/null || bash "$ROOT/scripts/deps.sh"

WORK=$(mktemp -d /tmp/bnch-reload.XXXXXX)
P=bnrl$$
SRV=""
cleanup() {
	[[ -z $SRV ]] || { kill -TERM "$SRV" 2>/dev/null || true; wait "$SRV" 2>/dev/null || true; }
	[[ ! -x $WORK/nstarget ]] || "$WORK/nstarget" fleet delete -prefix "$P" -netns-dir "$WORK/ns" >/dev/null 2>&1 || true
	rm -rf "$WORK"
}
trap cleanup EXIT

if [[ -n ${NST_BIN:-} ]]; then cp "$NST_BIN" "$WORK/nstarget"; else (cd "$ROOT" && go build -o "$WORK/nstarget" ./cmd/nstarget); fi
NST=$WORK/nstarget
"$NST" fleet create -prefix "$P" -count $((TENANTS + 1)) -netns-dir "$WORK/ns" -config "$WORK/all.toml" \
	-data-dir "$WORK/pool" -size 64MiB >/dev/null
# The file without the last tenant, and with it: each reload switches between the two.
sed "s|^\[server\]|[server]\ncontrol_socket = \"$WORK/ctl.sock\"\npool_soft_threshold = 0|" "$WORK/all.toml" >"$WORK/with.toml"
awk -v last="$P-$(printf %04d $((TENANTS + 1)))" '
	/^\[\[tenant\]\]/ { flush(); buf = $0 "\n"; intenant = 1; next }
	intenant { buf = buf $0 "\n"; if ($0 ~ "name *= *\"" last "\"") drop = 1; next }
	{ print }
	function flush() { if (buf != "" && !drop) printf "%s", buf; buf = ""; drop = 0 }
	END { flush() }' "$WORK/with.toml" >"$WORK/without.toml"
cp "$WORK/without.toml" "$WORK/c.toml"
"$NST" serve -c "$WORK/c.toml" >"$WORK/serve.log" 2>&1 &
SRV=$!
for ((i = 0; i < 600; i++)); do
	[[ $(grep -c 'msg="tenant listening"' "$WORK/serve.log") -ge $TENANTS ]] && break
	kill -0 "$SRV" 2>/dev/null || { tail -n 20 "$WORK/serve.log" >&2; exit 1; }
	sleep 0.1
done
[[ $(grep -c 'msg="tenant listening"' "$WORK/serve.log") -ge $TENANTS ]] || { log "not every tenant listens"; exit 1; }

perf() { # perf OUT: per-second IOPS of tenant 1, one number per line
	timeout $((RUNTIME + 30)) nsenter --net="$WORK/ns/$P-0001" iscsi-perf -r -m 1 -t "$RUNTIME" \
		"iscsi://127.0.0.1/iqn.2026-12.org.nstarget:fleet/0" 2>&1 | tr '\r' '\n' |
		grep -o 'iops current [0-9]*' | awk '{print $3}' >"$1"
}
log "baseline: ${RUNTIME}s of 4K random reads at QD1 on tenant 1, nothing else"
perf "$WORK/base.iops"
log "the same while tenant $((TENANTS + 1)) is added and removed by $RELOADS reloads"
perf "$WORK/during.iops" &
PERF=$!
sleep 1 # let the initiator log in and settle before the first reload (a warm-up, not a wait for an event)
: >"$WORK/reload.ms"
: >"$WORK/applied.ms"
for ((r = 1; r <= RELOADS; r++)); do
	if ((r % 2)); then cp "$WORK/with.toml" "$WORK/c.toml"; else cp "$WORK/without.toml" "$WORK/c.toml"; fi
	t0=$(date +%s%N)
	"$NST" reload -socket "$WORK/ctl.sock" >"$WORK/reload.out" || { cat "$WORK/reload.out" >&2; exit 1; }
	echo $((($(date +%s%N) - t0) / 1000)) >>"$WORK/reload.ms"
	sed -n 's/^applied in \([0-9.]*\) ms$/\1/p' "$WORK/reload.out" >>"$WORK/applied.ms"
	grep -q "tenant $P-$(printf %04d $((TENANTS + 1))) \(added\|removed\)" "$WORK/reload.out" || { log "reload $r: unexpected: $(cat "$WORK/reload.out")"; exit 1; }
done
wait "$PERF"
[[ -s $WORK/base.iops && -s $WORK/during.iops ]] || { log "iscsi-perf reported nothing"; exit 1; }

med() { sort -n "$1" | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
pct() { sort -n "$1" | awk -v p="$2" '{a[NR]=$1} END {i=int(NR*p/100+0.999); if (i<1) i=1; print a[i]}'; }
rm_med=$(med "$WORK/reload.ms")
base=$(med "$WORK/base.iops")
during=$(med "$WORK/during.iops")
worst=$(sort -n "$WORK/during.iops" | head -n 1)
printf '\nreload of a one-tenant change with %d tenants configured (%d reloads; load avg %s)\n' "$TENANTS" "$RELOADS" "$(cut -d' ' -f1 /proc/loadavg)"
printf '%-44s %12s %12s\n' metric measured goal
printf '%-44s %12.1f %12s\n' "reload applied by serve, median (ms)" "$(med "$WORK/applied.ms")" "< 100"
printf '%-44s %12.1f %12s\n' "reload applied by serve, max (ms)" "$(sort -n "$WORK/applied.ms" | tail -n 1)" ""
printf '%-44s %12.1f %12s\n' "nstarget reload command, median (ms)" "$(awk -v v="$rm_med" 'BEGIN{print v/1000}')" ""
printf '%-44s %12.1f %12s\n' "nstarget reload command, p90 (ms)" "$(awk -v v="$(pct "$WORK/reload.ms" 90)" 'BEGIN{print v/1000}')" ""
printf '%-44s %12.1f %12s\n' "nstarget reload command, max (ms)" "$(awk -v v="$(sort -n "$WORK/reload.ms" | tail -n 1)" 'BEGIN{print v/1000}')" ""
printf '%-44s %12s %12s\n' "tenant 1 IOPS, baseline (median/s)" "$base" ""
printf '%-44s %12s %12s\n' "tenant 1 IOPS, during reloads (median/s)" "$during" ""
printf '%-44s %12.2f %12s\n' "during / baseline" "$(awk -v a="$during" -v b="$base" 'BEGIN{print a/b}')" ">= 0.97"
printf '%-44s %12.2f %12s\n' "worst second during reloads / baseline" "$(awk -v a="$worst" -v b="$base" 'BEGIN{print a/b}')" "no pause"
