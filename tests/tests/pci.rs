//! virtio-pci guest tests (`--transport pci`): the guest finds its devices
//! on a PCI bus the ACPI tables describe, drives them with MSI-X, and its
//! I/O reaches the host.

use moat_tests::{Guest, Scratch};

/// The tests' command line without `pci=off`.
fn pci_cmdline() -> String {
    moat_tests::CMDLINE.replace(" pci=off", "")
}

#[test]
fn a_guest_finds_virtio_pci_devices_uses_msix_and_its_disk_writes_reach_the_image() {
    let scratch = Scratch::new("pci");
    let data = scratch.path("data.img");
    std::fs::write(&data, vec![0x5a; 4 << 20]).unwrap();
    let out = Guest::vmlinux()
        .args(["--transport", "pci", "--cmdline", &pci_cmdline()])
        .args(["--rng", "on"])
        .disk(&data, "id=pci-disk")
        .script(
            "for d in /sys/bus/pci/devices/*; do \
               echo \"fn $(basename $d) $(cat $d/vendor) $(cat $d/device) $(cat $d/class)\"; \
             done\n\
             echo serial=$(cat /sys/block/vda/serial)\n\
             echo first=$(dd if=/dev/vda bs=1 count=4 2>/dev/null)\n\
             i=0; while [ $i -lt 64 ]; do echo \"pci $i\"; i=$((i+1)); done > /tmp/p\n\
             dd if=/tmp/p of=/dev/vda bs=4k seek=1 oflag=direct conv=notrunc 2>/dev/null\n\
             sync -d /dev/vda 2>/dev/null || sync\n\
             head -c 16 /dev/hwrng | wc -c | sed 's/^/rng=/'\n\
             grep -E 'virtio' /proc/interrupts | sed 's/  */ /g'",
        )
        .run()
        .unwrap();
    out.assert_success();
    let text = &out.test_output;
    for expected in [
        "fn 0000:00:00.0 0x1b36 0x0008 0x060000",
        "0x1af4 0x1042 0x018000",
        "0x1af4 0x1044 0xff0000",
        "serial=pci-disk",
        "first=ZZZZ",
        "rng=16",
    ] {
        assert!(text.contains(expected), "{expected}: {text}");
    }
    // Each device's vectors are MSI-X ones: configuration, then its queues.
    let msix: Vec<&str> = text.lines().filter(|l| l.contains("PCI-MSI")).collect();
    assert!(
        msix.iter().any(|l| l.contains("-config")) && msix.iter().any(|l| l.contains("-req.0")),
        "{text}"
    );
    assert!(!text.contains("IO-APIC"), "a virtio device on INTx: {text}");
    let image = std::fs::read(&data).unwrap();
    let written: Vec<u8> = (0..64)
        .flat_map(|i| format!("pci {i}\n").into_bytes())
        .collect();
    assert_eq!(&image[4096..4096 + written.len()], &written[..]);
    assert_eq!(image[0], 0x5a);
}
