#!/usr/bin/env bash
# Build the distribution-kernel test guest into OUTDIR: Debian's packaged
# cloud kernel (nobody here configured it) and an initramfs for it.
#   build-distro.sh PACKAGE OUTDIR
#   vmlinuz         the package's bzImage
#   config          its kernel config
#   initramfs.cpio  the moat guest tree (guest/stage-guest.sh) plus the
#                   modules the guest needs and their dependencies under
#                   /lib/modules/VERSION, listed in /etc/modules for rcS to
#                   modprobe in order
# PACKAGE is the versioned image package (linux-image-6.1.0-N-cloud-amd64),
# fetched with `apt-get download`: no other download.
set -euo pipefail

package=$1 out=$2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
stage=$(mktemp -d "${out%/}.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
export PATH=$PATH:/usr/sbin:/sbin

# What a moat guest uses that Debian builds as modules: the virtio-mmio and
# virtio-pci transports and the devices, the ACPI power button and its
# input events.
modules=(virtio_mmio virtio_pci virtio_blk virtio_net virtio-rng vmw_vsock_virtio_transport
    button evdev)

(cd "$stage" && apt-get download -q -o APT::Sandbox::User=root "$package" >&2)
dpkg-deb -x "$stage"/"$package"_*.deb "$stage/pkg"
version=$(basename "$(ls -d "$stage"/pkg/lib/modules/*)")
depmod -b "$stage/pkg" "$version"

root=$stage/root
"$here/../guest/stage-guest.sh" "$root"
mods=lib/modules/$version
mkdir -p "$root/$mods"
cp "$stage/pkg/$mods"/modules.{dep,alias,builtin,order} "$root/$mods/"
# Each module after the ones it depends on (modules.dep lists them).
: >"$root/etc/modules"
declare -A have=()
add() {
    local name=${1//-/_} line path dep
    line=$(grep -E "/${name//_/[-_]}\.ko:" "$stage/pkg/$mods/modules.dep") ||
        { echo "build-distro: no module $1 in $package" >&2; exit 1; }
    path=${line%%:*}
    [[ -z ${have[$path]:-} ]] || return 0
    for dep in ${line#*:}; do
        dep=${dep##*/}
        add "${dep%.ko}"
    done
    have[$path]=1
    install -D -m 0644 "$stage/pkg/$mods/$path" "$root/$mods/$path"
    echo "$name" >>"$root/etc/modules"
}
for m in "${modules[@]}"; do add "$m"; done

mkdir -p "$out"
cp "$stage/pkg/boot/vmlinuz-$version" "$out/vmlinuz"
cp "$stage/pkg/boot/config-$version" "$out/config"
"$here/../lib/pack-cpio.sh" "$root" >"$out/initramfs.cpio"
echo "build-distro: $package ($version), $(wc -l <"$root/etc/modules") modules" >&2
