# Test script: log in, make ext4, write fsynced files for $E2E_SECONDS seconds after announcing
# E2E-IO-RUNNING (the host disturbs other tenants meanwhile). The session must stay LOGGED_IN
# the whole time, the kernel must see no connection error, and every file must verify.
iscsid_start
discover
login
wait_disk /dev/sda
mkfs.ext4 -q -F -E nodiscard /dev/sda
mount -t ext4 /dev/sda /mnt
writer /mnt &
wpid=$!
wait_count 2
port0=$(conn_port) # before the host acts on the marker
[ -n "$port0" ] || fail "no local port for the iSCSI connection in sysfs"
echo "E2E-IO-RUNNING"
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
