//! Guest tests: boot real Linux under moat and check what the guest sees.

use std::time::Duration;

use moat_tests::{image, Guest};

#[test]
fn vmlinux_boots_to_init_and_powers_off() {
    let out = Guest::vmlinux()
        .script("echo marker-from-test-script; cat /proc/cmdline")
        .run()
        .unwrap();
    out.assert_success();
    assert!(out.console.contains("MOAT-GUEST-INIT"), "{}", out.tail(20));
    assert!(out.test_output.contains("marker-from-test-script"));
    assert!(
        out.test_output.contains("console=ttyS0 reboot=k panic=1"),
        "{}",
        out.test_output
    );
}

#[test]
fn vmlinux_boots_through_the_linux_64bit_entry() {
    let out = Guest::vmlinux()
        .args(["--boot-protocol", "linux"])
        .script("echo entered-64bit")
        .run()
        .unwrap();
    out.assert_success();
    assert!(out.test_output.contains("entered-64bit"));
}

#[test]
fn bzimage_boots_to_init_and_powers_off() {
    let out = Guest::new(image("BZIMAGE"))
        .script("echo marker-from-bzimage")
        .run()
        .unwrap();
    out.assert_success();
    assert!(out.test_output.contains("marker-from-bzimage"));
}

#[test]
fn two_vcpus_are_online() {
    let out = Guest::vmlinux()
        .args(["--cpus", "boot=2"])
        .script("echo cpus=$(grep -c ^processor /proc/cpuinfo); cat /sys/devices/system/cpu/online")
        .run()
        .unwrap();
    out.assert_success();
    assert!(out.test_output.contains("cpus=2"), "{}", out.test_output);
    assert!(out.test_output.contains("0-1"), "{}", out.test_output);
}

#[test]
fn memory_size_reaches_the_guest() {
    let out = Guest::vmlinux()
        .args(["--memory", "size=192M"])
        .script("grep MemTotal /proc/meminfo")
        .run()
        .unwrap();
    out.assert_success();
    let kib: u64 = out
        .test_output
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {}", out.test_output));
    // The kernel keeps some for itself; MemTotal is a little under 192 MiB.
    assert!(
        (150 * 1024..192 * 1024).contains(&kib),
        "MemTotal {kib} KiB"
    );
}

#[test]
fn typed_input_reaches_the_guest_shell() {
    let out = Guest::vmlinux()
        .script("echo ready-for-input; read -r line; eval \"$line\"")
        .type_after("ready-for-input", b"echo typed-$((6*7))\r")
        .run()
        .unwrap();
    out.assert_success();
    assert!(out.test_output.contains("typed-42"), "{}", out.test_output);
}

#[test]
fn a_failing_script_reports_its_exit_code() {
    let out = Guest::vmlinux()
        .script("echo about-to-fail; exit 7")
        .run()
        .unwrap();
    assert_eq!(out.status, 0, "moat itself succeeds: {}", out.tail(20));
    assert_eq!(out.test_rc, Some(7));
}

#[test]
fn a_hung_guest_fails_after_its_timeout_with_the_console_tail() {
    let err = Guest::vmlinux()
        .script("echo about-to-hang; sleep 100000")
        .timeout(Duration::from_secs(60))
        .run()
        .unwrap_err();
    assert!(err.contains("timed out after 60 s"), "{err}");
    assert!(err.contains("about-to-hang"), "{err}");
}
