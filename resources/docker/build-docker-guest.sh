#!/usr/bin/env bash
# Build the Docker guest into OUTDIR from Debian 12 packages (mmdebstrap;
# nothing is downloaded but Debian's packages):
#   build-docker-guest.sh OUTDIR
#   rootfs.ext4   the root filesystem (sparse, 4 GiB): systemd, docker.io,
#                 containerd, runc, iptables, apparmor, socat and Debian's
#                 cloud kernel with its modules; root logs in on the serial
#                 console without a password; eth0 has a static address
#                 (docker/net.env, matching scripts/moat-tap); dockerd's socket
#                 is served on vsock port 2375; /root/busybox-image.tar is a
#                 local image for `docker load`
#   vmlinuz       the image's kernel
#   initrd.img    its initramfs (virtio-mmio and virtio-blk, to mount root)
#   cmdline       the kernel command line to boot it with
#   docker        the image's docker CLI, for the host (Debian has no
#                 CLI-only package; this one needs no daemon on the host)
# .deb files are kept in $MOAT_CACHE/debs between builds.
set -euo pipefail

start=$EPOCHREALTIME
out=$1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${MOAT_CACHE:-$HOME/.cache/moat}
debs=$cache/debs
stage=$(mktemp -d "${out%/}.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
export PATH=$PATH:/usr/sbin:/sbin
mkdir -p "$debs" "$out"

packages=(
    systemd systemd-sysv udev dbus kmod procps iproute2 iputils-ping
    linux-image-cloud-amd64 initramfs-tools
    docker.io containerd runc iptables apparmor ca-certificates socat
)
root=$stage/root
mmdebstrap --variant=minbase --mode=root --format=directory \
    --components=main --include="$(IFS=,; echo "${packages[*]}")" \
    --setup-hook="mkdir -p \"\$1/var/cache/apt/archives\"; cp $debs/*.deb \"\$1/var/cache/apt/archives/\" 2>/dev/null || true" \
    --customize-hook="cp \"\$1\"/var/cache/apt/archives/*.deb $debs/ 2>/dev/null || true" \
    --customize-hook="$here/customize.sh \"\$1\" $here" \
    --skip=cleanup/apt/cache \
    bookworm "$root" \
    "deb http://deb.debian.org/debian bookworm main" \
    "deb http://deb.debian.org/debian bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main" >&2
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*

kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -n1)
cp "$kernel" "$out/vmlinuz"
cp "$root/boot/initrd.img-${kernel##*/vmlinuz-}" "$out/initrd.img"
cp "$root/usr/bin/docker" "$out/docker"
"$here/busybox-image.sh" "$root/root/busybox-image.tar"
echo "console=ttyS0 root=/dev/vda rw pci=off panic=1 quiet" >"$out/cmdline"
size=$(du -sm "$root" | cut -f1)
mkfs.ext4 -q -F -L moat-docker -E root_owner=0:0 -d "$root" "$out/rootfs.ext4" 4G
used=$(du -m "$out/rootfs.ext4" | cut -f1)
printf 'build-docker-guest: %s MiB of files, %s MiB used of the 4 GiB rootfs.ext4; kernel %s; built in %.0f s\n' \
    "$size" "$used" "${kernel##*/vmlinuz-}" "$(bc <<<"$EPOCHREALTIME - $start")" >&2
