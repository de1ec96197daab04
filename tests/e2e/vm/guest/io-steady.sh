# Test script: log in, make ext4, write fsynced files for $E2E_SECONDS seconds after announcing
# E2E-IO-RUNNING (the host disturbs other tenants meanwhile). The session must stay LOGGED_IN
# the whole time, the kernel must see no connection error, and every file must verify.
start_io 2
t0=$(cut -d. -f1 /proc/uptime)
while [ $(($(cut -d. -f1 /proc/uptime) - t0)) -lt ${E2E_SECONDS:-15} ]; do
	[ -e /tmp/werr ] && fail "writer failed"
	st=$(session_state)
	[ "$st" = LOGGED_IN ] || fail "session state $st after $(count) files"
	[ "$(conn_errors)" -eq 0 ] || fail "connection error after $(count) files"
	[ "$(conn_port)" = "$port0" ] || fail "the connection was replaced after $(count) files"
	sleep 0.2
done
touch /tmp/stop
wait $wpid || fail "writer failed"
echo "E2E-IO-DONE $(count) files"
(cd /mnt && sha256sum -c -s /tmp/sums) || fail "checksums differ"
umount /mnt
fsck_clean /dev/sda
logout
no_io_errors
echo "E2E-VERIFIED $(count) files"
