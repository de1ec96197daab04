#!/usr/bin/env bash
# netnsmux torture at the issue's full size: 2,000 destroy-and-recreate cycles of the same names
# while clients connect from inside them and report their own namespace id in-band.
# (`make test` runs the same 2,000 under -race; this runs them without -race.) Prints a table.
set -euo pipefail
cd "$(dirname "$0")/../.."
cycles="${NETNSMUX_TORTURE_CYCLES:-2000}"
out=$(NETNSMUX_TORTURE_CYCLES="$cycles" go test -count=1 -run '^TestTortureRecreateSameNamesWhileClientsConnect$' -v ./netnsmux/ 2>&1) || {
	echo "$out"
	exit 1
}
line=$(grep -o 'TORTURE .*' <<<"$out")
get() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<" ${line#TORTURE }"; }
printf 'netnsmux torture: destroy/re-create cycles while clients connect\n'
printf '%-34s %14s   %s\n' metric measured goal
printf '%-34s %14s   %s\n' cycles "$(get cycles)" 2000
printf '%-34s %14s   %s\n' "wall time (s)" "$(get seconds)" -
printf '%-34s %14s   %s\n' "conns checked (client id == tag)" "$(get checked)" "> 0"
printf '%-34s %14s   %s\n' "mismatches" "$(get mismatches)" 0
printf '%-34s %14s   %s\n' "fds before -> after Close" "$(get fds_before) -> $(get fds_after)" "no growth"
printf '%-34s %14s   %s\n' "goroutines before -> after" "$(get goroutines_before) -> $(get goroutines_after)" "no growth"
