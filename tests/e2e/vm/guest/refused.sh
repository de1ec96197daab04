# Test script: this guest's initiator name ($E2E_INAME) is not on the target's allow-list, so the
# login must be refused and no disk may appear. Then the same guest logs in through an iface that
# carries an allowed name ($E2E_ALLOWED), proving the refusal was about the name.
iscsid_start
step discovery
iscsiadm -m discovery -t sendtargets -p "$E2E_PORTAL" 2>&1 | sed 's/^/E2E-DISCOVERED /' || true
# The target may hide what this initiator may not see: make the node record by hand.
iscsiadm -m node -o new -T "$E2E_IQN" -p "$E2E_PORTAL" >/dev/null
step login-unlisted
rc=0
iscsiadm -m node -T "$E2E_IQN" -p "$E2E_PORTAL" --login >/tmp/login.out 2>&1 || rc=$?
sed 's/^/E2E-ISCSIADM /' /tmp/login.out
echo "E2E-LOGIN-RC $rc"
# 24: login refused, authorization failure; 19: non-retryable login failure (target refused).
case $rc in 24 | 19) ;; 0) fail "unlisted initiator was logged in" ;; *) fail "login failed with rc=$rc, not a refusal" ;; esac
# No waiting for a disk that should not come: once iscsid has torn the refused session down, no
# disk can appear any more, and the kernel log tells whether one ever did.
no_sessions_within 60
if dmesg | grep -E 'Attached SCSI|Direct-Access' >/tmp/disks || [ -b /dev/sda ]; then
	sed 's/^/E2E-KERNEL /' /tmp/disks
	fail "a disk appeared after a refused login"
fi
step login-allowed
iscsiadm -m iface -I allowed -o new >/dev/null
iscsiadm -m iface -I allowed -o update -n iface.transport_name -v tcp >/dev/null
iscsiadm -m iface -I allowed -o update -n iface.initiatorname -v "$E2E_ALLOWED" >/dev/null
discover -I allowed
login -I allowed
wait_disk /dev/sda
dd if=/dev/sda of=/dev/null bs=64k count=16 2>/tmp/dd.err || fail "cannot read the disk: $(cat /tmp/dd.err)"
logout -I allowed
step done
