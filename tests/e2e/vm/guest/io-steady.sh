# Test script: log in, make ext4, keep rewriting fsynced files after announcing E2E-IO-RUNNING while
# the host disturbs other tenants. The writes go on until the host says "stop" (it is done
# disturbing), for at least $E2E_SECONDS seconds and until every slot of the writer has been
# rewritten once (so each slot was read back from the disk and verified at least once); the
# writer's footprint is fixed, so a fast guest cannot fill the volume. The session must stay
# LOGGED_IN on the same connection the whole time, the kernel must see no connection error, and
# every slot must verify, before and after a remount. If the host says "rescan" (it grew this LUN),
# the kernel rescans the disk once, and E2E-SIZE tells the host the size it sees now, in bytes.
host_listen
start_io 2
t0=$(cut -d. -f1 /proc/uptime)
min=$((2 * $(slots)))
rescanned=""
while :; do
	[ -e /tmp/werr ] && fail "writer failed"
	st=$(session_state)
	[ "$st" = LOGGED_IN ] || fail "session state $st after $(count) writes"
	[ "$(conn_errors)" -eq 0 ] || fail "connection error after $(count) writes"
	[ "$(conn_port)" = "$port0" ] || fail "the connection was replaced after $(count) writes"
	if [ -z "$rescanned" ] && host_said rescan; then
		echo 1 >/sys/block/sda/device/rescan
		rescanned=$(($(cat /sys/block/sda/size) * 512))
		echo "E2E-SIZE $rescanned after $(count) writes"
		# A kernel that saw the target's CAPACITY DATA HAS CHANGED may have said so; not required.
		dmesg | grep -iE 'capacity data has changed|capacity change' | sed 's/^/E2E-DMESG /' || true
	fi
	if host_said stop && [ "$(count)" -ge $min ] && [ $(($(cut -d. -f1 /proc/uptime) - t0)) -ge ${E2E_SECONDS:-15} ]; then
		break
	fi
	sleep 0.2
done
touch /tmp/stop
wait $wpid || fail "writer failed"
echo "E2E-IO-DONE $(count) writes over $(slots) slots in $(($(cut -d. -f1 /proc/uptime) - t0))s"
(cd /mnt && sha256sum -c -s /tmp/sums) || fail "checksums differ"
umount /mnt
fsck_clean /dev/sda
# A fresh mount reads from the disk, not from the page cache the writes went through.
mount -t ext4 -o ro /dev/sda /mnt
(cd /mnt && sha256sum -c -s /tmp/sums) || fail "checksums differ after remount"
umount /mnt
logout
no_io_errors
echo "E2E-VERIFIED $(wc -l </tmp/sums) slots after $(count) writes"
