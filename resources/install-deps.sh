#!/usr/bin/env bash
# Install (idempotently) the Debian packages that build-images.sh and rig.sh need.
# Fast path: if every package is already installed, exit without touching apt.
set -euo pipefail

PACKAGES=(
    linux-source-6.1 busybox-static qemu-system-x86
    bc bison flex libelf-dev libssl-dev cpio e2fsprogs xz-utils make gcc
    libc6-dev binutils util-linux coreutils findutils
    kmod acpica-tools curl
    mmdebstrap iproute2 nftables
    python3 python3-venv
)

missing=()
for p in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    if [[ "$status" != installed ]]; then
        missing+=("$p")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi

echo "install-deps: installing: ${missing[*]}" >&2
if [[ $(id -u) -ne 0 ]]; then
    SUDO=(sudo)
else
    SUDO=()
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq >&2
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
