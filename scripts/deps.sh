#!/usr/bin/env bash
# Installs what the tests, the demo and the benchmarks need on a fresh Debian machine (as root).
# Only missing tools trigger apt; Go modules come through the module proxy via `go mod download`.
set -euo pipefail
declare -A need=(
  [iscsi-test-cu]=libiscsi-bin [iscsi-ls]=libiscsi-bin [iscsi-perf]=libiscsi-bin
  [tgtd]=tgt [qemu-io]=qemu-utils [qemu-system-x86_64]=qemu-system-x86
  [iscsiadm]=open-iscsi [busybox]=busybox-static [mke2fs]=e2fsprogs [modinfo]=kmod
  [cpio]=cpio [xz]=xz-utils [ip]=iproute2 [ps]=procps [iperf3]=iperf3 [curl]=curl
  [ceph-mon]=ceph-mon [ceph-osd]=ceph-osd [monmaptool]=ceph-base [ceph]=ceph-common [rbd]=ceph-common
)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
# qemu's iscsi:// driver is a loadable module from qemu-block-extra.
if ! ls /usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so >/dev/null 2>&1; then missing+=(qemu-block-extra); fi
# The rbd backend (-tags rbd) links librbd/librados through cgo: it needs their headers.
if ! ls /usr/include/rbd/librbd.h >/dev/null 2>&1; then missing+=(librbd-dev); fi
if ! ls /usr/include/rados/librados.h >/dev/null 2>&1; then missing+=(librados-dev); fi
if ((${#missing[@]})); then
  pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
  echo "deps: installing $pkgs"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi
go mod download
