#!/usr/bin/env bash
# Stage a minimal busybox root tree into DIR (which must not exist or be empty):
#   busybox-tree.sh DIR
# Uses Debian's busybox-static (/bin/busybox). Every applet becomes a symlink
# to /bin/busybox; poweroff/halt/reboot become scripts that sync and
# `reboot -f`, because the guests have no ACPI and a halted guest would leave
# the VMM waiting (the VMM boots guests with reboot=k; QEMU uses reboot=t).
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

for cmd in poweroff halt reboot; do
    rm -f "sbin/$cmd"
    cat >"sbin/$cmd" <<'SCRIPT'
#!/bin/busybox sh
# No ACPI in a moat/rig VM: ending the VM means a forced reboot (reboot=k/t).
/bin/busybox sync
exec /bin/busybox reboot -f
SCRIPT
    chmod 0755 "sbin/$cmd"
done

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
# busybox sh runs applets before searching PATH, so wrap these here too:
# no ACPI, so ending the VM means a forced reboot.
poweroff() { /bin/busybox sync; /bin/busybox reboot -f; }
halt() { poweroff; }
reboot() { poweroff; }
F
: >etc/fstab
