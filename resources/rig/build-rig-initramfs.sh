#!/usr/bin/env bash
# Build the rig's L1 base initramfs into OUTDIR/rig-initramfs.cpio:
# busybox tree + rig/init as /init. rig.sh appends a per-call cpio with the
# command, its libraries, --file paths and /rig/cmd.
set -euo pipefail

out=$1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
stage=$(mktemp -d "${out%/}.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT

"$here/../lib/busybox-tree.sh" "$stage/root"
install -m 0755 "$here/init" "$stage/root/init"
mkdir -p "$stage/root/rig" "$out"
"$here/../lib/pack-cpio.sh" "$stage/root" >"$out/rig-initramfs.cpio"
