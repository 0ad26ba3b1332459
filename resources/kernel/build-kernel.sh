#!/usr/bin/env bash
# Build a moat kernel: tinyconfig + the given config fragments, out of tree.
#   build-kernel.sh SRCDIR OBJDIR OUTDIR FRAGMENT...
# SRCDIR: unpacked linux-source-6.1 tree (left untouched).
# OBJDIR: kbuild output dir (kept between builds for incremental rebuilds).
# OUTDIR: receives vmlinux, bzImage and config.
# Fails, listing them, if any option requested by a fragment is not in the
# final .config (Kconfig silently drops options whose dependencies are unmet),
# or if vmlinux lacks the PVH ELF note.
set -euo pipefail

if [[ $# -lt 4 ]]; then
    echo "usage: $0 SRCDIR OBJDIR OUTDIR FRAGMENT..." >&2
    exit 2
fi
src=$1 obj=$2 out=$3
shift 3
fragments=("$@")

mkdir -p "$obj" "$out"
kmake() { nice -n 10 make -s -C "$src" O="$obj" ARCH=x86_64 "$@"; }

echo "build-kernel: configuring (tinyconfig + ${fragments[*]##*/})" >&2
kmake tinyconfig >/dev/null
# Later fragments win, exactly like scripts/kconfig/merge_config.sh.
"$src/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "${fragments[@]}" >/dev/null
kmake olddefconfig >/dev/null

# Verify: the last word of each fragment about an option must hold.
declare -A want=()
for f in "${fragments[@]}"; do
    while IFS= read -r line; do
        if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
            want[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
        elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
            want[${BASH_REMATCH[1]}]=n
        fi
    done <"$f"
done
bad=()
for opt in "${!want[@]}"; do
    w=${want[$opt]}
    have=$(grep -E "^${opt}=" "$obj/.config" | head -n1 | cut -d= -f2- || true)
    [[ -z $have ]] && have=n
    if [[ $have != "$w" ]]; then
        bad+=("$opt: wanted $w, got $have")
    fi
done
if [[ ${#bad[@]} -gt 0 ]]; then
    echo "build-kernel: ERROR: ${#bad[@]} requested option(s) did not survive olddefconfig:" >&2
    printf '  %s\n' "${bad[@]}" | sort >&2
    exit 1
fi
echo "build-kernel: all ${#want[@]} requested options are set; compiling" >&2

kmake -j2 vmlinux bzImage

# QEMU microvm (-kernel vmlinux) and PVH-capable VMMs need the
# XEN_ELFNOTE_PHYS32_ENTRY (type 0x12) note of owner "Xen".
if ! readelf -n "$obj/vmlinux" | grep -A3 -E '^\s*Xen\s' | grep -qiE '0x00000012|PHYS32_ENTRY'; then
    echo "build-kernel: ERROR: $obj/vmlinux has no PVH ELF note" >&2
    exit 1
fi
cp "$obj/vmlinux" "$out/vmlinux"
cp "$obj/arch/x86/boot/bzImage" "$out/bzImage"
cp "$obj/.config" "$out/config"
echo "build-kernel: done" >&2
