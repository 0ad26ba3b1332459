#!/usr/bin/env bash
# moat test rig: run COMMAND inside a small Linux VM ("L1") that has a working
# /dev/kvm, under QEMU microvm with TCG and emulated SVM (this host's own
# /dev/kvm cannot run a Linux guest to userspace).
#
#   rig.sh [--timeout SECS] [--diag-after SECS] [--file PATH]...
#          [--disk PATH]... [--mem MiB] [--cpus N] -- COMMAND [ARGS...]
#
# COMMAND (with the shared libraries and loader that ldd lists, if it is a
# dynamic ELF) and each --file PATH are copied into L1 at their absolute host
# paths; L1 starts COMMAND in the host's current directory, on the console
# as its controlling terminal. The console is QEMU's stdio, passed through
# untouched (signal=off: Ctrl-C goes to L1).
# Each --disk PATH (an existing, writable regular file) is NOT copied: it is
# L1's virtio-blk disk /dev/vda, vdb, ... (in --disk order), and PATH in L1 is
# a symlink to that device, so writes reach the host file (in it when rig.sh
# returns; not on timeout). COMMAND sees a block device: get the size with
# lseek(SEEK_END) or BLKGETSIZE64, not st_size.
#
# --mem sets L1's memory (default 2048 MiB), --cpus its vCPUs (default 1;
# TCG runs each in its own host thread).
# --diag-after SECS: if COMMAND still runs SECS after it started, L1 prints
# "RIG-DIAG" lines to its console (every thread's state, wait channel,
# syscall, kernel stack and guest time; twice, 10 s apart).
# Exit status: COMMAND's exit status in L1; 124 on timeout (default 300 s,
# 0 for none);
# 125 if the rig itself failed (images, QEMU, L1 crash/panic).
# RIG_VERBOSE=1 prints timings (time to /rig/cmd start) and disks on stderr.
# RIG_L1_LOG=FILE keeps L1's kernel console (the side channel, with \r\n
# line ends) in FILE.
set -euo pipefail

start=$EPOCHREALTIME
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
verbose=${RIG_VERBOSE:-0}
[[ $verbose == 0 ]] && verbose=

die() { echo "rig: $*" >&2; exit 125; }
usage() { sed -n '2,28p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 125; }
elapsed() { printf '%.2f' "$(bc <<<"$EPOCHREALTIME - $start")"; }

timeout_s=300
diag_after=
mem=2048
cpus=1
files=()
disks=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --timeout) [[ $# -ge 2 ]] || usage; timeout_s=$2; shift 2 ;;
        --timeout=*) timeout_s=${1#*=}; shift ;;
        --diag-after) [[ $# -ge 2 ]] || usage; diag_after=$2; shift 2 ;;
        --diag-after=*) diag_after=${1#*=}; shift ;;
        --file) [[ $# -ge 2 ]] || usage; files+=("$2"); shift 2 ;;
        --file=*) files+=("${1#*=}"); shift ;;
        --disk) [[ $# -ge 2 ]] || usage; disks+=("$2"); shift 2 ;;
        --disk=*) disks+=("${1#*=}"); shift ;;
        --mem) [[ $# -ge 2 ]] || usage; mem=$2; shift 2 ;;
        --mem=*) mem=${1#*=}; shift ;;
        --cpus) [[ $# -ge 2 ]] || usage; cpus=$2; shift 2 ;;
        --cpus=*) cpus=${1#*=}; shift ;;
        --) shift; break ;;
        -h|--help) usage ;;
        *) echo "rig: unexpected argument: $1 (COMMAND goes after --)" >&2; usage ;;
    esac
done
[[ $# -ge 1 ]] || usage
# timeout(1) treats 0 as "no time limit", which interactive use wants.
[[ $timeout_s =~ ^[0-9]+$ ]] || die "--timeout wants a number of seconds (0: no limit)"
[[ $mem =~ ^[0-9]+$ ]] || die "--mem wants MiB"
[[ -z $diag_after || $diag_after =~ ^[0-9]+$ ]] || die "--diag-after wants a number of seconds"
[[ $cpus =~ ^[1-8]$ ]] || die "--cpus wants 1 to 8"

abspath() { if [[ $1 == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi; }
ident() { stat -L -c '%d:%i' -- "$1"; }

# --disk PATH: L1's /dev/vda, vdb, ... in order; PATH (made absolute, "."
# and ".." removed without resolving symlinks) becomes a symlink to it in L1.
disk_paths=() disk_ids=() disk_devs=()
for d in "${disks[@]}"; do
    p=$(realpath -s -m -- "$(abspath "$d")")
    [[ $p != *$'\n'* ]] || die "--disk: newline in path: $p"
    [[ -e $p ]] || die "--disk: no such file: $p (create the image first)"
    [[ -f $p ]] || die "--disk: not a regular file: $p"
    [[ -r $p && -w $p ]] || die "--disk: not readable and writable: $p"
    id=$(ident "$p")
    for i in "${!disk_ids[@]}"; do
        [[ ${disk_ids[i]} != "$id" ]] || die "--disk given twice for one file: ${disk_paths[i]} and $p"
    done
    (( ${#disk_paths[@]} < 26 )) || die "--disk: at most 26 disks (vda..vdz)"
    letters=abcdefghijklmnopqrstuvwxyz
    disk_devs+=("vd${letters:${#disk_paths[@]}:1}")
    disk_paths+=("$p")
    disk_ids+=("$id")
done
for f in "${files[@]}"; do
    fp=$(abspath "$f")
    [[ -f $fp ]] || continue
    id=$(ident "$fp")
    for i in "${!disk_ids[@]}"; do
        [[ ${disk_ids[i]} != "$id" ]] ||
            die "$f is given as both --file and --disk (${disk_paths[i]}): a disk is not copied, L1 writes to it; drop the --file"
    done
done

if [[ -n $verbose ]]; then quiet_cached=0; else quiet_cached=1; fi
images=$(MOAT_QUIET_CACHED=$quiet_cached "$here/build-images.sh") || die "build-images.sh failed"
RIG_KERNEL='' RIG_INITRAMFS=''
while IFS='=' read -r k v; do
    case $k in
        RIG_KERNEL) RIG_KERNEL=$v ;;
        RIG_INITRAMFS) RIG_INITRAMFS=$v ;;
    esac
done <<<"$images"
[[ -f $RIG_KERNEL && -f $RIG_INITRAMFS ]] || die "build-images.sh gave no RIG_KERNEL/RIG_INITRAMFS"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/moat-rig.XXXXXX")
feeder='' watcher='' stall_watcher='' monitor_reader='' saved_tty=''
# shellcheck disable=SC2317  # called from the EXIT trap
cleanup() {
    if [[ -n $watcher ]]; then kill "$watcher" 2>/dev/null || true; fi
    if [[ -n $stall_watcher ]]; then kill "$stall_watcher" 2>/dev/null || true; fi
    if [[ -n $monitor_reader ]]; then kill "$monitor_reader" 2>/dev/null || true; fi
    # The feeder runs in its own process group (setsid): end all of it.
    if [[ -n $feeder ]]; then kill -- "-$feeder" 2>/dev/null || true; fi
    if [[ -n $saved_tty ]]; then stty "$saved_tty" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

stage=$tmp/stage
mkdir -p "$stage/rig"

is_elf() { [[ -f $1 && "$(head -c 4 "$1" | tr -d '\0')" == $'\x7fELF' ]]; }

# add_path ABSPATH: copy a host file (following symlinks) or directory into
# the overlay at the same path; for a dynamic ELF also its libraries + loader.
add_path() {
    local p=$1 dst=$stage$1
    [[ -e $p ]] || die "no such file: $p"
    mkdir -p "$(dirname "$dst")"
    if [[ -d $p ]]; then
        mkdir -p "$dst"
        cp -rL "$p/." "$dst/"
    else
        cp -L --preserve=mode "$p" "$dst"
        is_elf "$p" && add_elf_deps "$p"
    fi
    return 0
}
add_elf_deps() {
    local out lib
    out=$(ldd "$1" 2>/dev/null) || return 0   # static, or not for this host
    while read -r lib; do
        [[ -n $lib && ! -e $stage$lib ]] || continue
        mkdir -p "$stage$(dirname "$lib")"
        cp -L --preserve=mode "$lib" "$stage$lib"
    done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$out")
}

# The command: a path (absolute or relative) or a name looked up in PATH.
cmd=("$@")
if [[ ${cmd[0]} == */* ]]; then
    add_path "$(abspath "${cmd[0]}")"
elif p=$(type -P "${cmd[0]}"); then
    add_path "$p"
fi
for f in "${files[@]}"; do
    add_path "$(abspath "$f")"
done
mkdir -p "$stage$PWD"
# A --file directory may hold a --disk image: the disk's symlink replaces it.
for i in "${!disk_paths[@]}"; do
    rm -rf "${stage:?}${disk_paths[i]}"
    printf '%s %s\n' "${disk_devs[i]}" "${disk_paths[i]}" >>"$stage/rig/disks"
done

# POSIX single-quoting (safe for busybox sh).
q() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }
{
    echo '#!/bin/busybox sh'
    echo "cd $(q "$PWD") 2>/dev/null || cd /"
    while IFS='=' read -r k _; do
        [[ $k =~ ^(TERM|COLORTERM|RUST_[A-Z_]+|MOAT_[A-Z_]+)$ ]] || continue
        [[ $k == MOAT_CACHE ]] && continue
        echo "export $k=$(q "${!k}")"
    done < <(env)
    if [[ -t 0 ]] && size=$(stty size 2>/dev/null) && [[ $size =~ ^([0-9]+)\ ([0-9]+)$ ]]; then
        echo "stty rows ${BASH_REMATCH[1]} cols ${BASH_REMATCH[2]} 2>/dev/null"
    fi
    printf 'exec'
    for a in "${cmd[@]}"; do printf ' %s' "$(q "$a")"; done
    echo
} >"$stage/rig/cmd"
chmod 0755 "$stage/rig/cmd"

initrd=$tmp/initrd.cpio
cp "$RIG_INITRAMFS" "$initrd"
"$here/lib/pack-cpio.sh" "$stage" >>"$initrd"

# oops=panic: an oops in L1 (seen: a double fault in a task, a BUG in
# kernel/entry) left L1 hung until --timeout; as a panic it ends the rig at
# once, with the console kept, and the caller can run it again.
append="console=ttyS1 reboot=t panic=-1 oops=panic 8250.nr_uarts=2 i8042.noaux i8042.nokbd tsc=reliable no_timer_check"
# A periodic tick (no high-resolution one-shot timer, no tickless idle): a
# timer interrupt lost by TCG's nested SVM would otherwise leave L1 halted
# with no timer armed, for good (docs/testing.md).
append+=" highres=off nohz=off"
[[ -n $diag_after ]] && append+=" rig.diag=$diag_after"
# TCG's TSC runs at the host's rate. L1 calibrates it against the PIT, which
# under TCG fails about one boot in six; L1 then marks its TSC unstable and
# its KVM gives L2 a clock that stalls L2's boot. Tell L1 the rate instead.
host_mhz=$(awk -F: '/^cpu MHz/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)
if [[ $host_mhz =~ ^[[:space:]]*[0-9]+(\.[0-9]+)?$ ]]; then
    append+=" tsc_early_khz=$(awk -v m="$host_mhz" 'BEGIN { printf "%d", m * 1000 }')"
fi
# The side channel; RIG_L1_LOG keeps it (written as L1 runs, so it is
# there even if rig.sh is killed).
rcfile=${RIG_L1_LOG:-$tmp/rc}
: >"$rcfile" || die "cannot write RIG_L1_LOG=$rcfile"
# shellcheck disable=SC2054  # commas belong to QEMU options
qemu=(
    qemu-system-x86_64
    -M microvm,acpi=off,x-option-roms=off,rtc=off -accel tcg -cpu max -m "$mem" -smp "$cpus"
    -nodefaults -no-user-config -display none -no-reboot
    -kernel "$RIG_KERNEL" -initrd "$initrd" -append "$append"
    -chardev stdio,id=con,signal=off -serial chardev:con
    # microvm creates only one ISA serial port itself; add COM2 by hand.
    -chardev "file,id=rc,path=$rcfile" -device isa-serial,chardev=rc,iobase=0x2f8,irq=3
)
# Disks: virtio-blk over virtio-mmio. The kernel learns of virtio-mmio devices
# only from the command line (virtio_mmio.device=, which QEMU adds with
# acpi=off). cache=writeback: QEMU pwrite()s each guest write into the host
# file (the guest's sync, run by L1's init before `reboot -f`, also makes QEMU
# fdatasync) and flushes on exit.
for i in "${!disk_paths[@]}"; do
    qemu+=(-drive "file=${disk_paths[i]//,/,,},if=none,id=disk$i,format=raw,cache=writeback"
           -device "virtio-blk-device,drive=disk$i")
    if [[ -n $verbose ]]; then
        echo "rig: disk /dev/${disk_devs[i]} = ${disk_paths[i]} ($(stat -L -c %s -- "${disk_paths[i]}") bytes)" >&2
    fi
done

if [[ -n $verbose ]]; then
    echo "rig: starting QEMU after $(elapsed) s" >&2
    (
        while ! grep -q RIG-START "$rcfile" 2>/dev/null; do sleep 0.05; done
        echo "rig: /rig/cmd started $(elapsed) s after rig.sh start ($(grep -ao -m1 'RIG-START.*' "$rcfile" | tr -d '\r') of L1)" >&2
    ) &
    watcher=$!
fi

# --diag-after: if L1 has not reported on its threads 20 s after it was
# asked to, L1 itself is stalled; then QEMU's monitor (on a pipe pair) tells
# where L1's processor is: three samples of its instruction pointer (an
# address in moat's kernel, L1's or, in guest mode, L2's) and whether it is
# halted, printed on stderr.
if [[ -n $diag_after ]]; then
    mkfifo "$tmp/monitor.in" "$tmp/monitor.out"
    # shellcheck disable=SC2054  # commas belong to QEMU options
    qemu+=(-chardev "pipe,id=monitor,path=$tmp/monitor" -mon chardev=monitor,mode=readline)
    cat "$tmp/monitor.out" >"$tmp/monitor.log" 2>/dev/null &
    monitor_reader=$!
    (
        set +e
        # ($$ is rig.sh: the watcher ends with it.)
        for ((i = 0; i < diag_after + 20; i++)); do
            sleep 1
            kill -0 $$ 2>/dev/null || exit 0
        done
        grep -q 'RIG-DIAG report 1' "$rcfile" 2>/dev/null && exit 0
        echo "rig: L1 did not report on its threads $diag_after s after /rig/cmd started: L1 is stalled; where its processor is:" >&2
        for sample in 1 2 3; do
            echo 'info registers' >"$tmp/monitor.in"
            sleep 1
            line=$(tr -d '\r' <"$tmp/monitor.log" | grep -a 'RIP=' | tail -n1)
            rip=$(grep -o 'RIP=[0-9a-f]*' <<<"$line" | cut -d= -f2)
            sym=$(nm -n "$RIG_KERNEL" 2>/dev/null |
                awk -v a="$rip" '$1 <= a { s = $3 } $1 > a { exit } END { print s }')
            echo "rig: L1 processor sample $sample: RIP=$rip (${sym:-?}) $(grep -o 'CPL=[0-9].*' <<<"$line")" >&2
        done
    ) &
    stall_watcher=$!
fi

[[ -t 0 ]] && saved_tty=$(stty -g 2>/dev/null || true)
set +e
if [[ -t 0 ]]; then
    timeout --foreground -k 5 "$timeout_s" "${qemu[@]}"
    qrc=$?
else
    # QEMU's stdio chardev spins at 100% CPU once stdin hits EOF: feed it our
    # stdin, then keep the pipe open. Input is held back until L1's init has
    # the console open (the "start" line), as a UART drops what nobody reads.
    # (A background job's stdin is /dev/null: hand ours over as fd 3.)
    mkfifo "$tmp/stdin"
    exec 3<&0
    # shellcheck disable=SC2016  # $1 expands in the child shell
    # It also ends by itself once rig.sh is gone, even if rig.sh was SIGKILLed.
    setsid bash -c 'until grep -q RIG-START "$1" 2>/dev/null; do
                        kill -0 "$2" 2>/dev/null || exit 0; sleep 0.05; done
                    cat <&3 2>/dev/null; exec 3<&-
                    while kill -0 "$2" 2>/dev/null; do sleep 1; done' feeder "$rcfile" "$$" >"$tmp/stdin" &
    feeder=$!
    exec 3<&-
    timeout --foreground -k 5 "$timeout_s" "${qemu[@]}" <"$tmp/stdin"
    qrc=$?
fi
set -e

if [[ -n $verbose ]]; then
    echo "rig: ---- L1 kernel console ----" >&2
    tr -d '\r' <"$rcfile" >&2
    echo "rig: ----" >&2
fi
if [[ $qrc == 124 || $qrc == 137 ]] && ! grep -q RIG-RC= "$rcfile"; then
    echo "rig: timed out after $timeout_s s" >&2
    exit 124
fi
grep -a '^RIG-ERROR' "$rcfile" | tr -d '\r' | sed 's/^RIG-ERROR:* */rig: L1: /' >&2 || true
rc=$(grep -aoE 'RIG-RC=[0-9]+' "$rcfile" | tail -n1 | cut -d= -f2 || true)
if [[ -z $rc ]]; then
    [[ -n $verbose ]] || tail -n 30 "$rcfile" | tr -d '\r' | sed 's/^/rig: L1: /' >&2
    panic=$(grep -a -m1 'Kernel panic' "$rcfile" | tr -d '\r' || true)
    if [[ -n $panic ]]; then
        echo "rig: L1 panicked: $panic" >&2
    fi
    if grep -q RIG-START "$rcfile"; then
        echo "rig: L1 ended without reporting the command's exit status (L1 crash/panic? qemu exit $qrc)" >&2
    else
        echo "rig: L1 never started /rig/cmd (qemu exit $qrc)" >&2
    fi
    exit 125
fi
[[ -n $verbose ]] && echo "rig: done after $(elapsed) s, command exit status $rc" >&2
exit "$rc"
