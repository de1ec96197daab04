// Package vmguest boots the small qemu guests in which the suites run the Linux initiator almost
// every user attaches with: open-iscsi (iscsid, iscsiadm, the kernel's iscsi_tcp). It is shared by
// tests/e2e/vm (guests on a tap in a tenant's namespace, one node) and tests/cluster (a guest on a
// tap in the cluster's switch namespace, failing over between nodes). Tests only; Linux only.
//
// It owns:
//   - the cached guest image: build-image.sh (a PVH vmlinux from Debian's kernel .deb, a busybox
//     initramfs with the host's open-iscsi and e2fsprogs), guest/init.sh (the guest's /init) and
//     guest/lib.sh (helpers every guest script may use), all embedded in the test binary;
//   - the KVM probe and its TCG fallback, and the CPU slots that keep TCG guests from
//     outnumbering the host's CPUs;
//   - tap devices made with AddTap, the qemu processes it starts (stopped by PID, and dying with
//     the test binary), their serial consoles (read line by line, written to by Send);
//   - the guest scripts shared by suites (guest/*.sh other than init.sh and lib.sh).
//
// It must never touch namespaces or processes it did not create, or install anything on the host
// beyond the Debian packages build-image.sh names. A missing image is built; an image that cannot
// be built is an error the caller turns into a failed test, never a skip.
package vmguest
