#!/usr/bin/env bash
# Build the moat guest images into OUTDIR:
#   initramfs.cpio  uncompressed newc cpio: busybox tree, /init = busybox init
#                   with inittab and scripts from this directory (no /test.sh;
#                   a harness appends a second cpio archive holding /test.sh)
#   rootfs.ext4     64 MiB ext4 image of the same tree (/sbin/init is busybox
#                   init too; boot with root=/dev/vda)
#   vsock           the tree's /bin/vsock, for hosts (the test rig) to use
set -euo pipefail

out=$1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
stage=$(mktemp -d "${out%/}.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT

root=$stage/root
"$here/stage-guest.sh" "$root"

mkdir -p "$out"
"$here/../lib/pack-cpio.sh" "$root" >"$out/initramfs.cpio"
cp "$root/bin/vsock" "$out/vsock"

# Root fs: the same tree (the kernel's default /sbin/init is busybox init).
mkdir -p "$root/lost+found"
mkfs.ext4 -q -F -L moat-root -E root_owner=0:0 -d "$root" "$out/rootfs.ext4" 64M
