# Test script: log in, make ext4, keep rewriting fsynced files (the writer's fixed set of slots)
# while the host restarts the target (it acts on E2E-IO-RUNNING). The kernel must see the
# connection fail and open-iscsi must log in again within the replacement timeout; the writes block
# meanwhile but none fails. Afterwards the file system is clean and every slot intact.
start_io 3
t0=$(cut -d. -f1 /proc/uptime)
seen=""
disrupted=""
recovered=""
while :; do
	[ -e /tmp/werr ] && fail "writer failed"
	st=$(session_state)
	[ "$st" = "$seen" ] || { echo "E2E-SESSION $st at $(cut -d' ' -f1 /proc/uptime) after $(count) writes"; seen=$st; }
	# The restart shows as a failed session, a connection error, or a new connection.
	if [ -z "$disrupted" ]; then
		if [ "$st" != LOGGED_IN ] || [ "$(conn_errors)" -gt 0 ] || [ "$(conn_port)" != "$port0" ]; then
			disrupted=$(count)
			echo "E2E-DISRUPTED after $disrupted writes (state $st, $(conn_errors) conn errors, port $port0 -> $(conn_port))"
		fi
	fi
	# Recovered: logged in on a connection with a new local port (empty while it is down).
	port=$(conn_port)
	if [ -n "$disrupted" ] && [ -z "$recovered" ] && [ -n "$port" ] && [ "$(session_state)" = LOGGED_IN ] && [ "$port" != "$port0" ]; then
		recovered=$(count)
		echo "E2E-RECOVERED after $recovered writes on a new connection (port $port)"
	fi
	# Three more writes after recovery show the session carries I/O again.
	[ -n "$recovered" ] && [ "$(count)" -ge $((recovered + 3)) ] && break
	[ $(($(cut -d. -f1 /proc/uptime) - t0)) -gt ${E2E_MAX_SECONDS:-90} ] && fail "no recovery seen within ${E2E_MAX_SECONDS:-90}s (state $st, $(conn_errors) conn errors)"
	sleep 0.2
done
touch /tmp/stop
wait $wpid || fail "writer failed"
echo "E2E-IO-DONE $(count) writes"
(cd /mnt && sha256sum -c -s /tmp/sums) || fail "checksums differ after recovery"
umount /mnt
fsck_clean /dev/sda
mount -t ext4 -o ro /dev/sda /mnt
(cd /mnt && sha256sum -c -s /tmp/sums) || fail "checksums differ after remount"
umount /mnt
logout
no_io_errors
echo "E2E-VERIFIED $(wc -l </tmp/sums) slots after $(count) writes"
