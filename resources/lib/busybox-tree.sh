#!/usr/bin/env bash
# Stage a minimal busybox root tree into DIR (which must not exist or be empty):
#   busybox-tree.sh DIR
# Uses Debian's busybox-static (/bin/busybox). Every applet becomes a symlink
# to /bin/busybox, so poweroff/reboot/halt are busybox's: they ask init to
# shut down, and the kernel then powers off through ACPI (or resets).
set -euo pipefail

dir=$1
bb=/bin/busybox
[[ -x $bb ]] || { echo "busybox-tree: $bb missing (install busybox-static)" >&2; exit 1; }

mkdir -p "$dir"
cd "$dir"
mkdir -p bin sbin usr/bin usr/sbin etc proc sys dev tmp run root mnt var/log
chmod 1777 tmp
cp "$bb" bin/busybox
while IFS= read -r applet; do
    [[ $applet == bin/busybox ]] && continue
    # Absolute target: valid wherever the link lives.
    ln -sfn /bin/busybox "$applet"
done < <("$bb" --list-full)

cat >etc/passwd <<'F'
root:x:0:0:root:/root:/bin/sh
F
cat >etc/group <<'F'
root:x:0:
tty:x:5:
F
cat >etc/hostname <<'F'
moat
F
cat >etc/profile <<'F'
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
export HOME=/root
export PS1='\h:\w\$ '
F
: >etc/fstab
