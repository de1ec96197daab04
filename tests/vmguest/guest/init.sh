#!/bin/sh
# /init of the e2e guest (busybox sh, PID 1). It loads the modules, brings up eth0 from the kernel
# command line (e2e.KEY=VALUE becomes $E2E_KEY), configures open-iscsi, then runs the test script
# the host handed in with -fw_cfg name=opt/e2e/script. The host reads ttyS0: every line the guest
# means for it starts with "E2E", and the last one is "E2E-RESULT PASS" or "E2E-RESULT FAIL <why>".
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
mkdir -p /run/lock/iscsi /var/lib/iscsi/nodes /var/lib/iscsi/send_targets /var/lib/iscsi/ifaces

# step prints a progress marker with the guest's uptime so the host can time each phase.
step() { echo "E2E-STEP $(cut -d' ' -f1 /proc/uptime) $*"; }
off() { sync; poweroff -f; sleep 5; echo o >/proc/sysrq-trigger; }
# The verdict also goes through printk, which reaches the console before the power-off; a
# plain echo can still sit in the tty buffer when the VM stops.
result() { echo "E2E-RESULT $*"; echo "<2>E2E-RESULT $*" >/dev/kmsg; off; }

for m in $(cat /lib/modules/order); do
	# crc32c-intel needs SSE4.2; crc32c_generic covers a CPU without it.
	insmod "/lib/modules/$m" 2>/dev/null || echo "E2E-WARN insmod $m failed"
done

for w in $(cat /proc/cmdline); do
	case $w in
	e2e.*=*)
		k=${w%%=*}
		k=$(echo "${k#e2e.}" | tr 'a-z.-' 'A-Z__')
		export "E2E_$k=${w#*=}"
		;;
	esac
done

ip link set lo up
ip link set eth0 up
ip addr add "${E2E_IP:-10.0.0.2/24}" dev eth0
step "init ip=$E2E_IP portal=$E2E_PORTAL iname=$E2E_INAME"

echo "InitiatorName=${E2E_INAME:-iqn.2026-11.org.nstarget:e2e-guest}" >/etc/iscsi/initiatorname.iscsi
# Recovery must finish inside the replacement timeout; NOP-Outs detect a dead target early.
cat >/etc/iscsi/iscsid.conf <<EOF
node.startup = manual
node.session.timeo.replacement_timeout = ${E2E_REPLACEMENT_TIMEOUT:-60}
node.conn[0].timeo.login_timeout = 15
node.conn[0].timeo.logout_timeout = 15
node.conn[0].timeo.noop_out_interval = 5
node.conn[0].timeo.noop_out_timeout = 10
node.session.initial_login_retry_max = 4
node.session.err_timeo.abort_timeout = 15
node.session.err_timeo.lu_reset_timeout = 30
EOF

fw_file() { cat "/sys/firmware/qemu_fw_cfg/by_name/opt/e2e/$1/raw"; }
# Helpers shared by the test scripts come from the host too (opt/e2e/lib), so that editing them
# does not rebuild the image.
[ -e /sys/firmware/qemu_fw_cfg/by_name/opt/e2e/lib/raw ] && fw_file lib >/tmp/lib.sh && . /tmp/lib.sh

if [ -e /sys/firmware/qemu_fw_cfg/by_name/opt/e2e/script/raw ]; then
	fw_file script >/tmp/script.sh
else
	result "FAIL no script (pass one with -fw_cfg name=opt/e2e/script,file=...)"
fi
# The script runs in a subshell with -e: any failing command fails the test; it may also call
# fail "why" to say more.
fail() { echo "E2E-ERR $*"; exit 1; }
(set -e; . /tmp/script.sh)
rc=$?
if [ $rc -eq 0 ]; then result PASS; else result "FAIL rc=$rc"; fi
