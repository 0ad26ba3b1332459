#!/usr/bin/env bash
# Build (or reuse from the cache) everything moat's tests and the rig need.
#
#   build-images.sh [--separate-guest-kernel] [--docker]
#
# stdout: only KEY=ABSOLUTE_PATH lines (VMLINUX, BZIMAGE, INITRAMFS, ROOTFS,
# VSOCK_TOOL, BENCH_INITRAMFS, RIG_KERNEL, RIG_INITRAMFS, DISTRO_KERNEL,
# DISTRO_INITRAMFS, HOSTILE_KERNEL; with --docker also DOCKER_KERNEL, DOCKER_INITRD,
# DOCKER_ROOTFS, DOCKER_CMDLINE, DOCKER_CLI); progress and timings go to
# stderr. --docker (or MOAT_DOCKER_IMAGE=1) also builds the Docker guest
# (resources/docker), which downloads ~200 MB of Debian packages once.
# Cache: ${MOAT_CACHE:-$HOME/.cache/moat}, one directory per artifact keyed by
# a hash of its inputs (config fragments, build scripts, init scripts and the
# installed Debian package versions). Artifacts are built in a temp dir and
# renamed into place; a flock serialises concurrent builders.
#
# MOAT_QUIET_CACHED=1: no stderr output when everything came from the cache.
# By default ONE kernel (tinyconfig + guest.config + rig.config) serves as
# both the L2 guest kernel and the L1 rig kernel. --separate-guest-kernel
# (or MOAT_SEPARATE_GUEST_KERNEL=1) builds the guest kernel from guest.config
# alone.
set -euo pipefail

start=$EPOCHREALTIME
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${MOAT_CACHE:-$HOME/.cache/moat}
separate=${MOAT_SEPARATE_GUEST_KERNEL:-0}
docker=${MOAT_DOCKER_IMAGE:-0}
for arg in "$@"; do
    case $arg in
        --separate-guest-kernel) separate=1 ;;
        --docker) docker=1 ;;
        -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}" >&2; exit 0 ;;
        *) echo "build-images: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

log() { echo "build-images: $*" >&2; }

"$here/install-deps.sh"
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)

pkgver() { dpkg-query -W -f='${Version}' "$1"; }
ksrc_ver=$(pkgver linux-source-6.1)
bb_ver=$(pkgver busybox-static)
gcc_ver=$(pkgver gcc)
e2fs_ver=$(pkgver e2fsprogs)

# key NAME STRING FILE... -> 16 hex digits over the strings and file contents
key() {
    local s=$1
    shift
    { printf '%s\n' "$s"; cat "$@"; } | sha256sum | cut -c1-16
}

guest_frags=("$here/kernel/guest.config")
rig_frags=("$here/kernel/guest.config" "$here/kernel/rig.config")
kscript=$here/kernel/build-kernel.sh
rig_kernel_dir=$cache/kernel-$(key "v1 $ksrc_ver $gcc_ver rig" "$kscript" "${rig_frags[@]}")
if [[ $separate == 1 ]]; then
    guest_kernel_dir=$cache/kernel-$(key "v1 $ksrc_ver $gcc_ver guest" "$kscript" "${guest_frags[@]}")
else
    guest_kernel_dir=$rig_kernel_dir
fi
guest_dir=$cache/guest-$(key "v1 $bb_ver $e2fs_ver" "$here/lib/busybox-tree.sh" "$here/lib/pack-cpio.sh" \
    "$here"/guest/*)
bench_dir=$cache/bench-$(key "v1 $gcc_ver" "$here/lib/pack-cpio.sh" "$here/bench/init.c" \
    "$here/bench/build-bench.sh")
hostile_dir=$cache/hostile-$(key "v1 $gcc_ver" "$here"/hostile/*)
rig_dir=$cache/rig-$(key "v1 $bb_ver" "$here/lib/busybox-tree.sh" "$here/lib/pack-cpio.sh" \
    "$here/rig/init" "$here/rig/build-rig-initramfs.sh")
# Debian's cloud kernel: the versioned package the metapackage depends on.
distro_meta=linux-image-cloud-amd64
distro_package() { apt-cache depends "$distro_meta" 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }'; }
distro_pkg=$(distro_package)
if [[ -z $distro_pkg ]]; then
    log "apt knows no $distro_meta yet: apt-get update"
    if [[ $(id -u) -ne 0 ]]; then sudo apt-get update -qq >&2; else apt-get update -qq >&2; fi
    distro_pkg=$(distro_package)
fi
[[ -n $distro_pkg ]] || { log "ERROR: cannot find the package $distro_meta depends on"; exit 1; }
distro_dir=$cache/distro-$(key "v1 $distro_pkg $(apt-cache policy "$distro_pkg" | awk '/Candidate:/ { print $2 }') $bb_ver" \
    "$here/lib/busybox-tree.sh" "$here/lib/pack-cpio.sh" "$here"/guest/* "$here/distro/build-distro.sh")
# The Docker guest: keyed by its scripts and the versions apt would install.
docker_dir=
if [[ $docker == 1 ]]; then
    candidates=$(apt-cache policy docker.io containerd runc systemd iptables "$distro_pkg" mmdebstrap |
        awk '/^[^ ]/ { p = $1 } /Candidate:/ { print p, $2 }')
    docker_dir=$cache/docker-$(key "v1 $candidates" "$here"/docker/*)
fi

declare -A status=()
all_present() {
    local d
    for d in "$rig_kernel_dir" "$guest_kernel_dir" "$guest_dir" "$bench_dir" "$rig_dir" "$distro_dir" \
        "$hostile_dir" \
        ${docker_dir:+"$docker_dir"}; do
        [[ -d $d ]] || return 1
    done
}

# Build into a temp dir next to the final one, then rename atomically.
# build_artifact DIR LABEL COMMAND... (COMMAND gets the temp dir appended)
build_artifact() {
    local dir=$1 label=$2
    shift 2
    if [[ -d $dir ]]; then
        status[$label]=cached
        return
    fi
    local t0=$EPOCHREALTIME tmp
    tmp=$(mktemp -d "$cache/.tmp-${dir##*/}.XXXXXX")
    log "building $label -> $dir"
    if ! "$@" "$tmp" >&2; then
        rm -rf "$tmp"
        log "ERROR: building $label failed"
        exit 1
    fi
    chmod 755 "$tmp"
    mv -T "$tmp" "$dir"
    status[$label]=$(printf 'built in %.1f s' "$(bc <<<"$EPOCHREALTIME - $t0")")
}

# Unpacked kernel source, shared by every kernel build of this version.
ksrc_dir=$cache/src/linux-source-6.1_$ksrc_ver
unpack_source() {
    local t=$1
    tar -xJf /usr/src/linux-source-6.1.tar.xz -C "$t"
}
build_kernel() {
    # build_kernel NAME FRAGMENT... OUT
    local name=$1
    shift
    local args=("$@")
    local out=${args[-1]}
    unset 'args[-1]'
    "$kscript" "$ksrc_dir/linux-source-6.1" "$cache/kobj/$ksrc_ver-$name" "$out" "${args[@]}"
}

if all_present; then
    for l in kernel guest-images bench-initramfs rig-initramfs distro-kernel hostile-guest \
        ${docker_dir:+docker-guest}; do
        status[$l]=cached
    done
else
    exec 9>"$cache/.lock"
    if ! flock -n 9; then
        log "waiting for another build-images.sh (lock $cache/.lock)"
        flock 9
    fi
    rm -rf "$cache"/.tmp-* 2>/dev/null || true
    if [[ ! -d $rig_kernel_dir || ! -d $guest_kernel_dir ]]; then
        mkdir -p "$cache/src" "$cache/kobj"
        build_artifact "$ksrc_dir" "kernel-source" unpack_source
    fi
    build_artifact "$rig_kernel_dir" kernel build_kernel rig "${rig_frags[@]}"
    if [[ $separate == 1 ]]; then
        build_artifact "$guest_kernel_dir" guest-kernel build_kernel guest "${guest_frags[@]}"
    fi
    build_artifact "$guest_dir" guest-images "$here/guest/build-guest.sh"
    build_artifact "$bench_dir" bench-initramfs "$here/bench/build-bench.sh"
    build_artifact "$rig_dir" rig-initramfs "$here/rig/build-rig-initramfs.sh"
    build_artifact "$hostile_dir" hostile-guest "$here/hostile/build-hostile.sh"
    build_artifact "$distro_dir" distro-kernel "$here/distro/build-distro.sh" "$distro_pkg"
    if [[ -n $docker_dir ]]; then
        build_artifact "$docker_dir" docker-guest "$here/docker/build-docker-guest.sh"
    fi
    flock -u 9
fi

# MOAT_QUIET_CACHED=1 (set by rig.sh): say nothing when nothing was built.
if [[ ${MOAT_QUIET_CACHED:-0} != 1 ]] || [[ ${status[*]} == *built* ]]; then
    for l in $(printf '%s\n' "${!status[@]}" | sort); do
        log "$l: ${status[$l]}"
    done
    log "$(printf 'done in %.2f s (cache %s)' "$(bc <<<"$EPOCHREALTIME - $start")" "$cache")"
fi

echo "VMLINUX=$guest_kernel_dir/vmlinux"
echo "BZIMAGE=$guest_kernel_dir/bzImage"
echo "INITRAMFS=$guest_dir/initramfs.cpio"
echo "ROOTFS=$guest_dir/rootfs.ext4"
echo "VSOCK_TOOL=$guest_dir/vsock"
echo "BENCH_INITRAMFS=$bench_dir/initramfs.cpio"
echo "RIG_KERNEL=$rig_kernel_dir/vmlinux"
echo "RIG_INITRAMFS=$rig_dir/rig-initramfs.cpio"
echo "DISTRO_KERNEL=$distro_dir/vmlinuz"
echo "DISTRO_INITRAMFS=$distro_dir/initramfs.cpio"
echo "HOSTILE_KERNEL=$hostile_dir/hostile.elf"
if [[ -n $docker_dir ]]; then
    echo "DOCKER_KERNEL=$docker_dir/vmlinuz"
    echo "DOCKER_INITRD=$docker_dir/initrd.img"
    echo "DOCKER_ROOTFS=$docker_dir/rootfs.ext4"
    echo "DOCKER_CMDLINE=$docker_dir/cmdline"
    echo "DOCKER_CLI=$docker_dir/docker"
fi
