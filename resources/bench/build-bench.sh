#!/usr/bin/env bash
# Build the benchmark guest's initramfs into OUTDIR/initramfs.cpio: one
# file, /init, compiled from init.c (static, no libc).
set -euo pipefail

out=$1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
stage=$(mktemp -d "${out%/}.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT

mkdir -p "$stage/root" "$out"
gcc -O2 -static -nostdlib -ffreestanding -fno-stack-protector -fno-pie -no-pie \
    -s -Wall -Wextra -Werror -Wl,--build-id=none -o "$stage/root/init" "$here/init.c"
"$here/../lib/pack-cpio.sh" "$stage/root" >"$out/initramfs.cpio"
