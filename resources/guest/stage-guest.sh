#!/usr/bin/env bash
# Stage the moat guest's root tree into DIR (which must not exist or be
# empty): the busybox tree, /init = busybox init, the inittab and scripts
# from this directory (rcS, main, shutdown, the power-button action), and
# /bin/vsock (vsock.c, static: busybox has no vsock).
#   stage-guest.sh DIR
set -euo pipefail

root=$1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
"$here/../lib/busybox-tree.sh" "$root"
ln -sfn /bin/busybox "$root/init"
install -m 0644 "$here/inittab" "$root/etc/inittab"
install -D -m 0755 "$here/rcS" "$root/etc/init.d/rcS"
install -m 0755 "$here/main" "$here/shutdown" "$root/etc/init.d/"
install -D -m 0755 "$here/power-button" "$root/etc/acpi/PWRF/00000080"
gcc -static -O2 -s -Wall -Wextra -Werror -o "$root/bin/vsock" "$here/vsock.c"
