# Helpers for the guest test scripts, sourced by /init before the script (busybox sh).

iscsid_start() { iscsid -n || fail "iscsid did not start"; }

# wait_disk DEV: the SCSI disk shows up asynchronously after login.
wait_disk() {
	_i=0
	# The node appears before the capacity is known: wait for both.
	while [ ! -b "$1" ] || [ "$(cat "/sys/block/${1#/dev/}/size" 2>/dev/null || echo 0)" = 0 ]; do
		_i=$((_i + 1))
		[ $_i -gt 200 ] && fail "$1 did not appear"
		sleep 0.1
	done
}

# session_state prints the kernel's state of the first iSCSI session (LOGGED_IN, FAILED, FREE).
session_state() { cat /sys/class/iscsi_session/session*/state 2>/dev/null | head -n1; }

login() { # login [iscsiadm args...]: node record from discovery, then log in
	iscsiadm -m node -T "$E2E_IQN" -p "$E2E_PORTAL" "$@" --login >/dev/null || fail "login to $E2E_IQN failed (rc=$?)"
}
logout() { iscsiadm -m node -T "$E2E_IQN" -p "$E2E_PORTAL" "$@" --logout >/dev/null || fail "logout failed (rc=$?)"; }

discover() { # discover [iscsiadm args...]: SendTargets; fails unless $E2E_IQN is among the answers
	_rc=0
	_found=$(iscsiadm -m discovery -t sendtargets -p "$E2E_PORTAL" "$@" 2>&1) || _rc=$?
	[ $_rc -eq 21 ] && fail "discovery returned no targets (SendTargets empty for $E2E_IQN)"
	[ $_rc -eq 0 ] || fail "discovery failed (iscsiadm rc=$_rc): $_found"
	echo "$_found" | sed 's/^/E2E-DISCOVERED /'
	case "$_found" in *" $E2E_IQN"*) ;; *) fail "discovery did not return $E2E_IQN" ;; esac
}

fsck_clean() { # fsck_clean DEV: read-only full check
	fsck.ext4 -n -f "$1" >/tmp/fsck.log 2>&1 || { sed 's/^/E2E-FSCK /' /tmp/fsck.log; fail "fsck.ext4 -n not clean"; }
}

# no_io_errors fails if the kernel logged a block, SCSI or ext4 error.
no_io_errors() {
	if dmesg | grep -E 'I/O error|EXT4-fs error|EXT4-fs warning|Buffer I/O|rejecting I/O|blk_update_request' >/tmp/errs; then
		sed 's/^/E2E-KERNEL /' /tmp/errs
		fail "kernel logged I/O errors"
	fi
}

# writer DIR: writes 256 KiB files of random content with fsync until /tmp/stop exists; records
# their checksums in /tmp/sums and the count in /tmp/count; a failed write leaves /tmp/werr.
writer() {
	_n=0
	while [ ! -e /tmp/stop ]; do
		_n=$((_n + 1))
		if ! dd if=/dev/urandom of="$1/w$_n" bs=64k count=4 conv=fsync 2>/tmp/dd.err; then
			echo "E2E-ERR write w$_n failed: $(cat /tmp/dd.err)"
			touch /tmp/werr
			return 1
		fi
		(cd "$1" && sha256sum "w$_n") >>/tmp/sums
		echo $_n >/tmp/count
	done
}
count() { cat /tmp/count 2>/dev/null || echo 0; }
# wait_count N: until the writer has written N files (or failed).
wait_count() {
	while [ "$(count)" -lt "$1" ]; do
		[ -e /tmp/werr ] && fail "writer failed"
		sleep 0.2
	done
}
# conn_errors counts the connection failures the kernel saw.
conn_errors() { dmesg | grep -c 'detected conn error' || true; }
# conn_port prints the local TCP port of the first iSCSI connection: a new one means a new login.
conn_port() { cat /sys/class/iscsi_connection/connection*/local_port 2>/dev/null | head -n1; }

# start_io N: log in, make and mount ext4 on the LUN, start the fsynced writer, wait for N files,
# record the connection's local port in port0 (before the host acts on the marker) and announce
# E2E-IO-RUNNING. Sets wpid and port0.
start_io() {
	iscsid_start
	discover
	login
	wait_disk /dev/sda
	mkfs.ext4 -q -F -E nodiscard /dev/sda
	mount -t ext4 /dev/sda /mnt
	writer /mnt &
	wpid=$!
	wait_count "$1"
	port0=$(conn_port)
	[ -n "$port0" ] || fail "no local port for the iSCSI connection in sysfs"
	echo "E2E-IO-RUNNING"
}
