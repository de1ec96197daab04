# Helpers for the guest test scripts, sourced by /init before the script (busybox sh).

iscsid_start() { iscsid -n || fail "iscsid did not start"; }

# wait_disk DEV: the SCSI disk shows up asynchronously after login. The bound only turns a
# disk that never comes into a failure; a slow guest is given minutes.
wait_disk() {
	_t0=$(cut -d. -f1 /proc/uptime)
	# The node appears before the capacity is known: wait for both.
	while [ ! -b "$1" ] || [ "$(cat "/sys/block/${1#/dev/}/size" 2>/dev/null || echo 0)" = 0 ]; do
		[ $(($(cut -d. -f1 /proc/uptime) - _t0)) -gt ${E2E_DISK_WAIT:-120} ] && fail "$1 did not appear within ${E2E_DISK_WAIT:-120}s"
		sleep 0.1
	done
}

# no_sessions_within N: until the kernel holds no iSCSI session (a refused login's session is torn
# down by iscsid); fails after N seconds.
no_sessions_within() {
	_t0=$(cut -d. -f1 /proc/uptime)
	while [ -n "$(ls /sys/class/iscsi_session 2>/dev/null)" ]; do
		[ $(($(cut -d. -f1 /proc/uptime) - _t0)) -gt "$1" ] && fail "iSCSI session still present after ${1}s: $(ls /sys/class/iscsi_session)"
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

# writer DIR: rewrites a fixed set of $E2E_SLOTS (32) files of 256 KiB in DIR round-robin with
# fresh random content and fsync until /tmp/stop exists, so the file system never fills however
# fast the guest writes. Before a slot is overwritten, its content is read back from the disk
# (O_DIRECT, past the page cache) and must match the checksum of what was last written to it.
# /tmp/count is the number of writes done; /tmp/sums holds the checksum of every slot's latest
# content (sha256sum -c format, relative to DIR). A failed write or check prints E2E-ERR and
# leaves /tmp/werr.
writer() {
	_n=0
	_slots=${E2E_SLOTS:-32}
	mkdir -p /tmp/slots
	while [ ! -e /tmp/stop ]; do
		_f=w$((_n % _slots))
		if [ -e "/tmp/slots/$_f" ]; then
			if ! dd if="$1/$_f" of=/tmp/rbuf iflag=direct bs=64k 2>/tmp/dd.err; then
				echo "E2E-ERR read-back of $_f before write $((_n + 1)) failed: $(cat /tmp/dd.err)"
				touch /tmp/werr
				return 1
			fi
			_want=$(cut -d' ' -f1 "/tmp/slots/$_f")
			_got=$(sha256sum </tmp/rbuf | cut -d' ' -f1)
			if [ "$_got" != "$_want" ]; then
				echo "E2E-ERR $_f changed on disk since it was written: sha256 $_got, want $_want (before write $((_n + 1)))"
				touch /tmp/werr
				return 1
			fi
		fi
		_n=$((_n + 1))
		# The checksum is taken of the source bytes, not of a read-back through the page cache.
		dd if=/dev/urandom of=/tmp/wbuf bs=64k count=4 2>/dev/null
		if ! dd if=/tmp/wbuf of="$1/$_f" bs=64k conv=fsync 2>/tmp/dd.err; then
			echo "E2E-ERR write $_n ($_f) failed: $(cat /tmp/dd.err)"
			touch /tmp/werr
			return 1
		fi
		echo "$(sha256sum </tmp/wbuf | cut -d' ' -f1)  $_f" >"/tmp/slots/$_f"
		# Both replaced whole (rename), so a reader never sees a half-written file: an empty
		# count would read as an error, not as a number.
		cat /tmp/slots/* >/tmp/sums.new && mv /tmp/sums.new /tmp/sums
		echo $_n >/tmp/count.new && mv /tmp/count.new /tmp/count
	done
}
count() { cat /tmp/count 2>/dev/null || echo 0; }
slots() { echo "${E2E_SLOTS:-32}"; }
# wait_count N: until the writer has done N writes (or failed).
wait_count() {
	while [ "$(count)" -lt "$1" ]; do
		[ -e /tmp/werr ] && fail "writer failed"
		sleep 0.2
	done
}
# host_listen: every line the host writes to the serial console (qemu's stdin) is appended to
# /tmp/host and acknowledged with E2E-HOST-SAID. Echo is switched off first so that the host's
# input never comes back mixed into the guest's output lines.
host_listen() {
	stty -echo </dev/console 2>/dev/null || echo "E2E-WARN stty -echo failed"
	(while read -r _l; do
		echo "$_l" >>/tmp/host
		echo "E2E-HOST-SAID $_l at $(cut -d' ' -f1 /proc/uptime) after $(count) writes"
	done) </dev/console &
}
# host_said WORD: the host has sent the line WORD.
host_said() { grep -qx "$1" /tmp/host 2>/dev/null; }
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

# iscsid_set KEY VALUE: sets KEY in iscsid.conf, replacing /init's value; before iscsid_start and
# discovery, which copy the file into the node record.
iscsid_set() {
	grep -vF "$1 = " /etc/iscsi/iscsid.conf >/tmp/iscsid.conf.new || true
	echo "$1 = $2" >>/tmp/iscsid.conf.new
	mv /tmp/iscsid.conf.new /etc/iscsi/iscsid.conf
}
# conn_addr prints the address:port the first iSCSI connection is connected to.
conn_addr() {
	for _c in /sys/class/iscsi_connection/connection*; do
		echo "$(cat "$_c/persistent_address" 2>/dev/null):$(cat "$_c/persistent_port" 2>/dev/null)"
		return
	done
}
# wait_host WORD SECONDS: until the host has sent WORD (host_listen must be running); fails after
# SECONDS.
wait_host() {
	_t0=$(cut -d. -f1 /proc/uptime)
	until host_said "$1"; do
		[ $(($(cut -d. -f1 /proc/uptime) - _t0)) -gt "$2" ] && fail "the host did not say $1 within ${2}s"
		sleep 0.1
	done
}
