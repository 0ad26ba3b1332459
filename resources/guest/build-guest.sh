#!/usr/bin/env bash
# Build the moat guest images into OUTDIR:
#   initramfs.cpio  uncompressed newc cpio: busybox tree + /init (no /test.sh;
#                   a harness appends a second cpio archive holding /test.sh)
#   rootfs.ext4     64 MiB ext4 image of the same tree, /sbin/init = /init
#                   (boot with root=/dev/vda; init=/init works too)
set -euo pipefail

out=$1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
stage=$(mktemp -d "${out%/}.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT

"$here/../lib/busybox-tree.sh" "$stage/root"
install -m 0755 "$here/init" "$stage/root/init"

mkdir -p "$out"
"$here/../lib/pack-cpio.sh" "$stage/root" >"$out/initramfs.cpio"

# Root fs: same tree; the kernel's default /sbin/init is our init.
rm -f "$stage/root/sbin/init"
install -m 0755 "$here/init" "$stage/root/sbin/init"
mkdir -p "$stage/root/lost+found"
mkfs.ext4 -q -F -L moat-root -E root_owner=0:0 -d "$stage/root" "$out/rootfs.ext4" 64M
