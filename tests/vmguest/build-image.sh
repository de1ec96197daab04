#!/usr/bin/env bash
# Builds (or reuses) the cached guest for the VM end-to-end tests: a PVH vmlinux taken from Debian's
# linux-image-<ver>-amd64 .deb (downloaded with apt-get download, never installed on this host) and a
# busybox initramfs with the host's open-iscsi (iscsid, iscsiadm), e2fsprogs and their libraries.
#
# Usage: build-image.sh            prints the image directory (…/<kernel-version>/<input-hash>) last
# Env:   NSTARGET_E2E_CACHE        cache root (default /var/cache/nstarget-e2e; outside the repo)
#        NSTARGET_E2E_KERNEL_PKG   kernel package (default: what linux-image-amd64 depends on)
#
# Idempotent: the kernel .deb and its extraction are cached per package version; the initramfs is
# rebuilt only when this script, guest/init.sh or the host tools change (their hash names the dir).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${NSTARGET_E2E_CACHE:-/var/cache/nstarget-e2e}
export PATH=$PATH:/usr/sbin:/sbin
log() { echo "build-image: $*" >&2; }

# Host tools the image copies or the build uses; installed through apt when missing.
declare -A need=([busybox]=busybox-static [iscsid]=open-iscsi [iscsiadm]=open-iscsi
  [mke2fs]=e2fsprogs [e2fsck]=e2fsprogs [modprobe]=kmod [depmod]=kmod [cpio]=cpio [xz]=xz-utils
  [dpkg-deb]=dpkg [gzip]=gzip)
missing=()
for c in "${!need[@]}"; do command -v "$c" >/dev/null || missing+=("${need[$c]}"); done
if ((${#missing[@]})); then
  pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
  log "installing $pkgs"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi
# busybox must be the static one: the guest has no libc for it to link against otherwise.
bb=$(command -v busybox)
if [[ $(LC_ALL=C ldd "$bb" 2>&1 || true) != *"not a dynamic"* ]]; then
  log "$bb is not static: apt-get install busybox-static"; exit 1
fi

pkg=${NSTARGET_E2E_KERNEL_PKG:-}
if [[ -z $pkg ]]; then
  resolve() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'; }
  pkg=$(resolve)
  [[ -n $pkg ]] || { apt-get update -qq >&2 && pkg=$(resolve); }
  [[ -n $pkg ]] || { log "cannot resolve linux-image-amd64 through apt"; exit 1; }
fi
kver=${pkg#linux-image-}
kdir=$cache/$kver
mkdir -p "$kdir"
exec 9>"$kdir/.lock"
flock 9 # concurrent test binaries share the cache

# 1. Kernel package: download once, extract once.
if [[ ! -f $kdir/kernel/.done ]]; then
  rm -rf "$kdir/kernel" "$kdir/dl"; mkdir -p "$kdir/dl"
  log "downloading $pkg"
  (cd "$kdir/dl" && apt-get download "$pkg" >/dev/null 2>&1) ||
    { apt-get update -qq && (cd "$kdir/dl" && apt-get download "$pkg" >/dev/null); }
  dpkg-deb -x "$kdir"/dl/*.deb "$kdir/kernel"
  rm -rf "$kdir/dl"
  touch "$kdir/kernel/.done"
fi
kroot=$kdir/kernel
vmlinuz=$kroot/boot/vmlinuz-$kver

# 2. vmlinux (PVH ELF): find the compressed payload inside the bzImage by its magic and unpack it.
# Booting it directly skips the decompressor, which is slow under TCG.
if [[ ! -s $kdir/vmlinux ]]; then
  try() { # try MAGIC_REGEX DECOMPRESSOR...
    local magic=$1; shift
    local off
    for off in $(LC_ALL=C grep -aboP "$magic" "$vmlinuz" | cut -d: -f1); do
      tail -c +$((off + 1)) "$vmlinuz" | "$@" >"$kdir/vmlinux.tmp" 2>/dev/null || true
      if [[ $(head -c4 "$kdir/vmlinux.tmp" | od -An -tx1 | tr -d ' ') == 7f454c46 ]]; then return 0; fi
    done
    return 1
  }
  try '\xfd7zXZ\x00' xz -dc || try '\x1f\x8b\x08' gzip -dc || try '\x28\xb5\x2f\xfd' zstd -dc ||
    { log "no known compressed ELF payload in $vmlinuz"; exit 1; }
  mv "$kdir/vmlinux.tmp" "$kdir/vmlinux"
fi

# 3. Initramfs, keyed by everything that goes into it.
bins=(/usr/sbin/iscsid /usr/sbin/iscsiadm /usr/sbin/mke2fs /usr/sbin/e2fsck)
hash=$(cat "${BASH_SOURCE[0]}" "$here/guest/init.sh" "${bins[@]}" "$bb" | sha256sum | cut -c1-16)
out=$kdir/$hash
if [[ -f $out/.done ]]; then echo "$out"; exit 0; fi
log "building initramfs for $kver in $out"
# Older builds of this kernel's initramfs (other input hashes) are dropped once they are stale.
find "$kdir" -mindepth 1 -maxdepth 1 -type d -name '????????????????' ! -name "$hash" -mmin +60 -exec rm -rf {} +
rm -rf "$out"; mkdir -p "$out"
root=$(mktemp -d "$kdir/root.XXXXXX")
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,etc/iscsi,dev,proc,sys,run,tmp,mnt,var/lib/iscsi,var/lock,lib/modules}

# Modules in load order, dependencies resolved by kmod against the extracted tree. crc32c is
# requested through the crypto API (no modinfo dependency) and has to be loaded by name.
depmod -b "$kroot" "$kver"
mods=(virtio_pci virtio_net qemu_fw_cfg crc32c_generic crc32c-intel sd_mod iscsi_tcp ext4)
: >"$root/lib/modules/order"
for m in "${mods[@]}"; do
  modprobe -d "$kroot" -S "$kver" --show-depends "$m" | awk '$1=="insmod"{print $2}'
done | awk '!seen[$0]++' | while read -r ko; do
  cp "$ko" "$root/lib/modules/"
  basename "$ko" >>"$root/lib/modules/order"
done

# Busybox applets as symlinks; the real tools and every library they load.
cp "$bb" "$root/bin/busybox"
for a in $("$bb" --list); do [[ -e $root/bin/$a ]] || ln -s busybox "$root/bin/$a"; done
for b in "${bins[@]}"; do cp "$b" "$root/sbin/"; done
ln -sf e2fsck "$root/sbin/fsck.ext4"
ln -sf mke2fs "$root/sbin/mkfs.ext4"
for lib in $(ldd "${bins[@]}" | awk '$2=="=>" && $3 ~ /^\//{print $3} $1 ~ /^\// && $2 ~ /^\(/{print $1}' | sort -u); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
# iscsid accepts requests only from a peer uid it can name (getpwuid).
echo "root:x:0:0:root:/:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"
# e2fsprogs wants /etc/mtab to tell whether a device is mounted.
ln -s /proc/mounts "$root/etc/mtab"
cp "$here/guest/init.sh" "$root/init"
chmod 755 "$root/init"

(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1) >"$out/initramfs.cpio.gz"
ln -f "$kdir/vmlinux" "$out/vmlinux"
echo "$kver" >"$out/kernel-version"
touch "$out/.done"
log "done: $(du -sh "$out/initramfs.cpio.gz" | cut -f1) initramfs"
echo "$out"
