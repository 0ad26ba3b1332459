//! A kernel nobody here configured: Debian 12's packaged cloud kernel
//! (`linux-image-cloud-amd64`, fetched with `apt-get download` by
//! resources/distro/build-distro.sh) finds its CPUs, devices and power-off
//! only through moat's ACPI tables: it has no MP table parser and no
//! `virtio_mmio.device=` support, and loads virtio as modules (the test
//! initramfs modprobes them from /etc/modules), virtio-pci's among them.

use std::time::Duration;

use moat_tests::net::{fill, HOST_TAP_SETUP};
use moat_tests::{debugfs_cat, fsck, image, make_ext4, Backend, Guest, Scratch};

fn distro() -> Guest {
    Guest::new(image("DISTRO_KERNEL"))
        .initramfs(image("DISTRO_INITRAMFS"))
        .args(["--memory", "size=512M"])
        .timeout(Duration::from_secs(300))
}

#[test]
fn the_distribution_kernel_sees_both_vcpus_and_boots_without_warnings() {
    let out = distro()
        .args(["--cpus", "boot=2"])
        .script("echo cpus=$(cat /sys/devices/system/cpu/online); uname -r")
        .run()
        .unwrap();
    out.assert_success();
    assert!(out.test_output.contains("cpus=0-1"), "{}", out.test_output);
    assert!(
        out.test_output.contains("-cloud-amd64"),
        "{}",
        out.test_output
    );
    // The console carries the kernel's log.
    let problems = moat_tests::kernel_problems(
        &out.console,
        &[
            "WARNING",
            "BUG",
            "ACPI Error",
            "ACPI BIOS Error",
            "failed with error",
            "Call Trace",
            "RSDP",
        ],
        Backend::detect(),
    );
    let problems: Vec<&String> = problems
        .iter()
        .filter(|l| !l.contains("ACPI: RSDP 0x"))
        .collect();
    assert!(problems.is_empty(), "{problems:#?}\n{}", out.tail(60));
}

#[test]
fn the_distribution_kernel_mounts_a_virtio_disk_and_its_file_survives() {
    let scratch = Scratch::new("distro-disk");
    let data = scratch.path("data.ext4");
    make_ext4(&data, 16);
    let out = distro()
        .disk(&data, "")
        .script(
            "mount /dev/vda /mnt && echo written-by-debian-kernel > /mnt/hello.txt && \
             umount /mnt && echo disk-ok",
        )
        .run()
        .unwrap();
    out.assert_success();
    assert!(out.test_output.contains("disk-ok"), "{}", out.test_output);
    fsck(&data);
    assert_eq!(
        debugfs_cat(&data, "/hello.txt"),
        b"written-by-debian-kernel\n"
    );
}

#[test]
fn the_distribution_kernel_finds_its_disk_on_virtio_pci() {
    let scratch = Scratch::new("distro-pci");
    let data = scratch.path("data.ext4");
    make_ext4(&data, 16);
    let cmdline = moat_tests::CMDLINE.replace(" pci=off", "");
    let out = distro()
        .args(["--transport", "pci", "--cmdline", &cmdline])
        .disk(&data, "")
        .script(
            "grep -c PCI-MSI /proc/interrupts | sed 's/^/msi=/'; \
             mount /dev/vda /mnt && echo over-pci > /mnt/pci.txt && umount /mnt && echo disk-ok",
        )
        .run()
        .unwrap();
    out.assert_success();
    assert!(out.test_output.contains("disk-ok"), "{}", out.test_output);
    assert!(!out.test_output.contains("msi=0"), "{}", out.test_output);
    fsck(&data);
    assert_eq!(debugfs_cat(&data, "/pci.txt"), b"over-pci\n");
}

#[test]
fn the_distribution_kernel_pings_the_host_over_virtio_net() {
    let host = r#"
"$@" & moat=$!
tap_up @TAP0@ @H0@
ping_until @G0@ && say HOST-PING-OK
tell_done @G0@
wait $moat; rc=$?
report
exit $rc
"#;
    let guest = r#"
ip addr add @G0@/26 dev eth0 && ip link set eth0 up || exit 1
ping -c 3 -W 5 @H0@ >/dev/null && echo GUEST-PING-OK
nc -l -p 5003 </dev/null >/dev/null
"#;
    let out = distro()
        .args(["--net", &fill("tap=@TAP0@", 3, 1)])
        .host_script(&fill(&format!("{HOST_TAP_SETUP}{host}"), 3, 1))
        .script(&fill(guest, 3, 1))
        .run()
        .unwrap();
    out.assert_success();
    assert!(out.console.contains("GUEST-PING-OK"), "{}", out.tail(30));
    assert!(out.console.contains("HOST-PING-OK"), "{}", out.tail(30));
}

#[test]
fn the_distribution_kernel_powers_off_and_reboots_with_status_0() {
    for (command, line) in [
        ("poweroff -f", "reboot: Power down"),
        ("reboot -f", "reboot: Restarting system"),
    ] {
        let out = distro()
            .script(&format!("{command}; sleep 100"))
            .run()
            .unwrap();
        assert_eq!(out.status, 0, "{command}: {}", out.tail(20));
        assert!(out.console.contains(line), "{command}: {}", out.tail(20));
    }
}

#[test]
fn a_guest_kernel_panic_with_two_vcpus_restarts_and_ends_moat_with_status_0() {
    // panic=1 (in moat's default command line, here without reboot=k): the
    // kernel stops the other vCPU, waits a second and restarts. On a
    // hardware-reduced ACPI machine without EFI it falls back to the BIOS's
    // reset vector, where moat's code writes the ACPI reset register.
    let out = distro()
        .args(["--cpus", "boot=2", "--cmdline"])
        .args([moat_tests::CMDLINE.replace(" reboot=k", "")])
        .script("echo 1 > /proc/sys/kernel/sysrq; echo c > /proc/sysrq-trigger; sleep 100")
        .timeout(Duration::from_secs(240))
        .run()
        .unwrap();
    assert!(
        out.console.contains("Kernel panic"),
        "no panic: {}",
        out.tail(20)
    );
    assert_eq!(out.status, 0, "{}", out.tail(20));
}
