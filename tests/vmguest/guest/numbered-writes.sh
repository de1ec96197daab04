# Guest script: numbered writes that must survive the target failing over.
#
# Once the host says "go" (the tenant is served), the guest logs in to $E2E_IQN at $E2E_PORTAL and
# writes numbered 4 KiB blocks straight to the disk (O_DIRECT, then fsync: a cache flush), round
# robin over $E2E_SLOTS slots from block $E2E_BASE, until the host says "stop". Block n is the line
# "nstc seq=<n> slot=<k>" repeated, so a block read back names the write that put it there; after
# write n is acknowledged the guest prints "E2E-ACK n". A write that fails fails the test: however
# the target fails, open-iscsi must log in again (to the same portal) within the replacement
# timeout and the write goes on. A watcher prints E2E-CONN whenever the iSCSI connection is new
# (another local port), with the address it is connected to, and E2E-SESSION on state changes.
# At the end the slots are read back (O_DIRECT) and each must hold its last acknowledged write:
# a lost or stale one prints E2E-LOST and fails the test.
#
# Timeouts ($E2E_LOGIN_TIMEOUT, $E2E_NOOP_INTERVAL, $E2E_NOOP_TIMEOUT, with /init's
# e2e.replacement_timeout) only bound how soon a dead connection is noticed and retried.
host_listen
iscsid_set "node.conn[0].timeo.login_timeout" "${E2E_LOGIN_TIMEOUT:-5}"
iscsid_set "node.conn[0].timeo.noop_out_interval" "${E2E_NOOP_INTERVAL:-2}"
iscsid_set "node.conn[0].timeo.noop_out_timeout" "${E2E_NOOP_TIMEOUT:-3}"
iscsid_start
base=${E2E_BASE:-2048}
slots=${E2E_SLOTS:-256}
echo "E2E-WAITING for the host's go"
wait_host go "${E2E_MAX_SECONDS:-300}"
discover
login
wait_disk /dev/sda

step watching
(
	seen=""
	port=""
	while [ ! -e /tmp/done ]; do
		st=$(session_state)
		[ "$st" = "$seen" ] || { echo "E2E-SESSION $st at $(cut -d' ' -f1 /proc/uptime)"; seen=$st; }
		p=$(conn_port)
		if [ -n "$p" ] && [ "$p" != "$port" ] && [ "$st" = LOGGED_IN ]; then
			echo "E2E-CONN local port $p to $(conn_addr) at $(cut -d' ' -f1 /proc/uptime)"
			port=$p
		fi
		sleep 0.2
	done
) &
watcher=$!

# /tmp/expect holds, slot by slot, the last acknowledged block: what the disk must read back.
dd if=/dev/zero of=/tmp/expect bs=4096 count="$slots" 2>/dev/null
n=0
while ! host_said stop; do
	n=$((n + 1))
	k=$((n % slots))
	yes "$(printf 'nstc seq=%010d slot=%06d' "$n" "$k")" | head -c 4096 >/tmp/blk
	if ! dd if=/tmp/blk of=/dev/sda bs=4096 seek=$((base + k)) count=1 oflag=direct conv=fsync 2>/tmp/dd.err; then
		fail "write $n (slot $k) failed: $(cat /tmp/dd.err)"
	fi
	dd if=/tmp/blk of=/tmp/expect bs=4096 seek="$k" count=1 conv=notrunc 2>/dev/null
	echo "E2E-ACK $n"
	if [ "$n" -eq 3 ]; then echo "E2E-IO-RUNNING"; fi
done
touch /tmp/done
wait $watcher || true
echo "E2E-IO-DONE $n writes over $slots slots"

dd if=/dev/sda of=/tmp/got bs=4096 skip="$base" count="$slots" iflag=direct 2>/tmp/dd.err ||
	fail "reading the slots back failed: $(cat /tmp/dd.err)"
if ! cmp -s /tmp/expect /tmp/got; then
	cmp -l /tmp/expect /tmp/got | awk '{ s = int(($1 - 1) / 4096) } !seen[s]++ { print s }' | head -n 20 |
		while read -r k; do
			want=$(dd if=/tmp/expect bs=4096 skip="$k" count=1 2>/dev/null | head -c 31 | tr -c 'a-zA-Z0-9= ' '.')
			got=$(dd if=/tmp/got bs=4096 skip="$k" count=1 2>/dev/null | head -c 31 | tr -c 'a-zA-Z0-9= ' '.')
			echo "E2E-LOST slot $k: acknowledged \"$want\", the disk has \"$got\""
		done
	fail "acknowledged writes are missing"
fi
logout
no_io_errors
echo "E2E-VERIFIED every slot holds its last acknowledged write after $n writes"
