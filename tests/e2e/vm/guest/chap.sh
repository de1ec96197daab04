# Test script: CHAP with open-iscsi. Discovery needs the tenant's discovery credentials
# ($E2E_DUSER/$E2E_DSECRET), the target its own ($E2E_USER/$E2E_SECRET) and, for mutual CHAP,
# proves itself with $E2E_MUSER/$E2E_MSECRET. Wrong secrets are refused with iscsiadm rc 24
# (authentication failure) and leave no session and no disk.
iscsid_start

# expect_auth_refused WHAT CMD...: CMD must fail as an authentication failure.
expect_auth_refused() {
	_what=$1
	shift
	_rc=0
	"$@" >/tmp/refused.out 2>&1 || _rc=$?
	sed 's/^/E2E-ISCSIADM /' /tmp/refused.out
	echo "E2E-RC $_what $_rc"
	case $_rc in
	24) ;;
	0) fail "$_what: accepted" ;;
	*) fail "$_what: failed with rc=$_rc, not an authentication failure (24)" ;;
	esac
}

disc() { iscsiadm -m discoverydb -t sendtargets -p "$E2E_PORTAL" "$@"; }
disc_auth() { # disc_auth USER SECRET
	disc -o update -n discovery.sendtargets.auth.authmethod -v CHAP >/dev/null
	disc -o update -n discovery.sendtargets.auth.username -v "$1" >/dev/null
	disc -o update -n discovery.sendtargets.auth.password -v "$2" >/dev/null
}
node() { iscsiadm -m node -T "$E2E_IQN" -p "$E2E_PORTAL" "$@"; }
node_set() { node -o update -n "$1" -v "$2" >/dev/null; }

step discovery-without-credentials
disc -o new >/dev/null
expect_auth_refused discovery-none disc --discover
step discovery-wrong-secret
disc_auth "$E2E_DUSER" "not-the-discovery-secret"
expect_auth_refused discovery-wrong disc --discover
step discovery
disc_auth "$E2E_DUSER" "$E2E_DSECRET"
_found=$(disc --discover 2>&1) || fail "discovery with the right secret failed: $_found"
echo "$_found" | sed 's/^/E2E-DISCOVERED /'
case "$_found" in *" $E2E_IQN"*) ;; *) fail "discovery did not return $E2E_IQN" ;; esac

step login-without-credentials
expect_auth_refused login-none node --login
no_sessions_within 60
step login-wrong-secret
node_set node.session.auth.authmethod CHAP
node_set node.session.auth.chap_algs "SHA3-256,SHA256,SHA1,MD5"
node_set node.session.auth.username "$E2E_USER"
node_set node.session.auth.password "not-the-right-secret"
expect_auth_refused login-wrong node --login
no_sessions_within 60
if dmesg | grep -E 'Attached SCSI|Direct-Access' >/tmp/disks || [ -b /dev/sda ]; then
	sed 's/^/E2E-KERNEL /' /tmp/disks
	fail "a disk appeared after a refused login"
fi

step login-one-way
node_set node.session.auth.password "$E2E_SECRET"
node --login >/dev/null || fail "one-way login failed (rc=$?)"
wait_disk /dev/sda
node --logout >/dev/null || fail "logout failed (rc=$?)"
no_sessions_within 60

step login-mutual
node_set node.session.auth.username_in "$E2E_MUSER"
node_set node.session.auth.password_in "$E2E_MSECRET"
node --login >/dev/null || fail "login with the right secrets failed (rc=$?)"
wait_disk /dev/sda
dd if=/dev/sda of=/dev/null bs=64k count=16 2>/tmp/dd.err || fail "cannot read the disk: $(cat /tmp/dd.err)"
node --logout >/dev/null || fail "logout failed (rc=$?)"
no_sessions_within 60

step target-fails-mutual
# The target cannot prove a secret it does not have: open-iscsi refuses it.
node_set node.session.auth.password_in "not-the-target-secret"
_rc=0
node --login >/tmp/mutual.out 2>&1 || _rc=$?
sed 's/^/E2E-ISCSIADM /' /tmp/mutual.out
echo "E2E-RC target-fails-mutual $_rc"
[ $_rc -ne 0 ] || fail "open-iscsi accepted a target that answered with the wrong mutual secret"
no_sessions_within 60

step done
