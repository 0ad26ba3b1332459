#!/usr/bin/env bash
# mmdebstrap customize hook for the Docker guest: customize.sh ROOT HERE.
# Console login, static network, dockerd on vsock, a lean boot, and an
# initramfs that can mount a virtio-blk root.
set -euo pipefail
r=$1 here=$2
# shellcheck source=net.env
. "$here/net.env"

# root logs in on the serial console without a password (local use only).
chroot "$r" passwd -d root >/dev/null
mkdir -p "$r/etc/systemd/system/serial-getty@ttyS0.service.d"
cat >"$r/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<UNIT
[Unit]
# A test script (below) has the console to itself.
ConditionPathExists=!/etc/moat-test.sh

[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,57600,38400,9600 %I \$TERM
UNIT

# Tests write /etc/moat-test.sh into the image (debugfs, no mount): it runs
# once dockerd is up, between MOAT-TEST-BEGIN and MOAT-TEST-END rc=N on the
# console, and the guest then powers off.
cat >"$r/etc/systemd/system/moat-test.service" <<'UNIT'
[Unit]
Description=moat test script
ConditionPathExists=/etc/moat-test.sh
After=docker.service docker-vsock.service systemd-networkd.service
Wants=docker.service

[Service]
Type=oneshot
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
ExecStart=/bin/sh -c 'echo MOAT-TEST-BEGIN; sh /etc/moat-test.sh; echo "MOAT-TEST-END rc=$?"'
ExecStartPost=/bin/systemctl --no-block poweroff

[Install]
WantedBy=multi-user.target
UNIT
echo moat-docker >"$r/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 moat-docker\n' >"$r/etc/hosts"
printf '/dev/vda / ext4 rw,relatime 0 1\n' >"$r/etc/fstab"

# eth0: the address the host helper expects, the host as the gateway.
mkdir -p "$r/etc/systemd/network"
cat >"$r/etc/systemd/network/10-eth0.network" <<NET
[Match]
Name=eth0

[Network]
Address=$DOCKER_GUEST_ADDR/$DOCKER_PREFIX
Gateway=$DOCKER_HOST_ADDR
NET
rm -f "$r/etc/resolv.conf"
for ns in $DOCKER_DNS; do echo "nameserver $ns"; done >"$r/etc/resolv.conf"

# dockerd's API on vsock: the host reaches it with --forward.
cat >"$r/etc/systemd/system/docker-vsock.service" <<UNIT
[Unit]
Description=Docker API on vsock port $DOCKER_VSOCK_PORT
After=docker.service
Requires=docker.service

[Service]
ExecStart=/usr/bin/socat VSOCK-LISTEN:$DOCKER_VSOCK_PORT,fork,reuseaddr UNIX-CONNECT:/run/docker.sock
Restart=always

[Install]
WantedBy=multi-user.target
UNIT
mkdir -p "$r/etc/docker"
echo '{"storage-driver": "overlay2", "log-driver": "local"}' >"$r/etc/docker/daemon.json"
chroot "$r" systemctl enable systemd-networkd docker.service docker-vsock.service \
    moat-test.service >/dev/null 2>&1

# A lean boot: no timers or jobs a short-lived VM does not need, no VT.
chroot "$r" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
    e2scrub_reap.service fstrim.timer dpkg-db-backup.timer getty@tty1.service \
    systemd-networkd-wait-online.service >/dev/null 2>&1 || true

# udev loads modules for what the CPU advertises; in a moat guest these
# drive nothing (frequency scaling, EDAC) or nested KVM, which costs ~15 s
# of boot in the nested test rig. Blacklisting stops only that automatic
# loading: `modprobe kvm_amd` (or kvm_intel) still works.
cat >"$r/etc/modprobe.d/moat-guest.conf" <<'CONF'
blacklist kvm_amd
blacklist kvm_intel
blacklist powernow_k8
blacklist acpi_cpufreq
blacklist amd64_edac
blacklist edac_mce_amd
CONF

# The root disk is virtio-blk over virtio-mmio, both modules in Debian.
sed -i 's/^MODULES=.*/MODULES=list/' "$r/etc/initramfs-tools/initramfs.conf"
printf 'virtio_mmio\nvirtio_blk\n' >>"$r/etc/initramfs-tools/modules"
chroot "$r" update-initramfs -u -k all >/dev/null
