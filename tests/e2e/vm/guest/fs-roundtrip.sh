# Test script: discover and log in to $E2E_IQN at $E2E_PORTAL, make an ext4 file system, write the
# host's random files (opt/e2e/data, a tar with SHA256SUMS), log out, log in again, check the file
# system with fsck -n and verify every checksum.
iscsid_start
step discovery
discover
step login
login
wait_disk /dev/sda
step "mkfs $(cat /sys/block/sda/size) sectors"
mkfs.ext4 -q -F -E nodiscard /dev/sda
mount -t ext4 /dev/sda /mnt
fw_file data >/tmp/data.tar
step "write $(wc -c </tmp/data.tar) bytes"
tar -x -C /mnt -f /tmp/data.tar
(cd /mnt && sha256sum -c -s SHA256SUMS) || fail "checksums differ right after writing"
umount /mnt
step logout
logout
step relogin
login
wait_disk /dev/sda
fsck_clean /dev/sda
step fsck-clean
mount -t ext4 -o ro /dev/sda /mnt
(cd /mnt && sha256sum -c -s SHA256SUMS) || fail "checksums differ after re-login"
echo "E2E-VERIFIED $(wc -l </mnt/SHA256SUMS) files"
umount /mnt
logout
no_io_errors
step done
