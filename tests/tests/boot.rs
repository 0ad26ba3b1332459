//! Guest tests: boot real Linux under moat and check what the guest sees.

use std::time::Duration;

use moat_tests::{image, Guest};

/// The guest's MemTotal in KiB, from `grep MemTotal /proc/meminfo` output.
fn mem_total_kib(output: &str) -> u64 {
    output
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {output}"))
}

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
    let kib = mem_total_kib(&out.test_output);
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

#[test]
fn ctrl_c_goes_to_the_guest_not_to_moat() {
    // setsid -c makes the console the script's controlling terminal, so the
    // guest's tty turns the ^C byte into SIGINT for the foreground job.
    let script = "setsid -c sh -c 'trap \"echo guest-got-sigint; exit 0\" INT; \
                  echo ready-for-ctrl-c; while :; do sleep 1; done' </dev/console >/dev/console 2>&1";
    let out = Guest::vmlinux()
        .script(script)
        .type_after("ready-for-ctrl-c", b"\x03")
        .run()
        .unwrap();
    out.assert_success();
    assert!(
        out.test_output.contains("guest-got-sigint"),
        "{}",
        out.test_output
    );
}

#[test]
fn guest_larger_than_3_gib_gets_ram_above_4_gib() {
    let out = Guest::vmlinux()
        .args(["--memory", "size=3584M"])
        .rig_memory_mib(5120)
        .script("grep MemTotal /proc/meminfo; grep -i 'system ram' /proc/iomem")
        .run()
        .unwrap();
    out.assert_success();
    assert!(
        out.test_output.contains("100000000-11fffffff : System RAM"),
        "{}",
        out.test_output
    );
    let kib = mem_total_kib(&out.test_output);
    assert!(kib > 3300 * 1024, "MemTotal {kib} KiB");
}

#[test]
fn a_triple_fault_is_an_error_with_a_message() {
    let scratch = moat_tests::Scratch::new("triplefault");
    let kernel = scratch.path("ud2.elf");
    // ud2 with an empty IDT: #UD, then #GP, then #DF, then shutdown.
    std::fs::write(
        &kernel,
        moat_tests::elf::tiny_elf(0x100_0000, &[0x0f, 0x0b], None),
    )
    .unwrap();
    let out = Guest::new(&kernel)
        .no_initramfs()
        .args(["--boot-protocol", "linux"])
        .timeout(Duration::from_secs(120))
        .run()
        .unwrap();
    assert_eq!(out.status, 1, "{}", out.tail(10));
    assert!(
        out.console.contains("moat: vCPU 0 triple-faulted"),
        "{}",
        out.tail(10)
    );
}

#[test]
fn sigterm_with_no_shutdown_timeout_stops_moat_at_once_with_status_143() {
    // The host side waits until the guest is up, then asks moat to stop.
    let host = r#"log=/tmp/moat-term.log
"$@" >"$log" 2>&1 & moat=$!
until grep -q guest-is-up "$log"; do kill -0 $moat || break; sleep 0.2; done
kill -TERM $moat; wait $moat; rc=$?
cat "$log"; exit $rc"#;
    let out = Guest::vmlinux()
        .args(["--shutdown-timeout", "0"])
        .host_script(host)
        .script("echo guest-is-up; sleep 100000")
        .run()
        .unwrap();
    assert_eq!(out.status, 143, "{}", out.tail(10));
    assert!(
        out.console.contains("moat: stopped by signal 15"),
        "{}",
        out.tail(10)
    );
}

#[test]
fn a_stdout_nobody_reads_costs_console_output_not_the_vm() {
    // moat's stdout is a pipe held open and never read, so it is full
    // after 64 KiB. The guest writes 96 KiB to its console and powers off:
    // moat must end (a vCPU blocked writing to stdout would hold the UART
    // lock, and the guest with it, for ever).
    let host = r#"fifo=/tmp/moat-unread-$$.fifo err=/tmp/moat-unread-$$.err
mkfifo "$fifo"
exec 3<>"$fifo"
"$@" >&3 2>"$err" & moat=$!
stop_if_stuck $moat 120
wait $moat; rc=$?
cat "$err"; rm -f "$fifo" "$err"
exit $rc"#;
    let out = Guest::vmlinux()
        .host_script(host)
        .script("head -c 98304 /dev/zero | tr '\\0' x")
        .run()
        .unwrap();
    assert!(!out.console.contains("HOST-MOAT-STUCK"), "{}", out.tail(10));
    assert_eq!(out.status, 0, "{}", out.tail(10));
}

/// moat's boot-timer line: (first KVM_RUN, marker) in ms since moat started.
fn boot_timer_ms(console: &str) -> Option<(f64, f64)> {
    let line = console
        .lines()
        .find(|l| l.starts_with("moat: boot timer:"))?;
    let after = |key: &str| -> Option<f64> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.split_whitespace().next()?.parse().ok()
    };
    Some((after("first KVM_RUN at ")?, after("guest marker at ")?))
}

/// The benchmark guest with the benchmark cmdline (reboot at once).
fn bench_guest() -> Guest {
    Guest::vmlinux()
        .initramfs(image("BENCH_INITRAMFS"))
        .args(["--memory", "size=128M"])
        .args(["--cmdline", moat_tests::CMDLINE])
}

#[test]
fn boot_timer_reports_when_the_benchmark_init_starts() {
    let out = bench_guest().args(["--boot-timer"]).run().unwrap();
    assert_eq!(out.status, 0, "{}", out.tail(20));
    assert!(out.console.contains("MOAT-BENCH-INIT"), "{}", out.tail(20));
    let (first_run, marker) = boot_timer_ms(&out.console)
        .unwrap_or_else(|| panic!("no boot timer line:\n{}", out.tail(20)));
    assert!(
        0.0 < first_run && first_run < marker,
        "first KVM_RUN {first_run} ms, marker {marker} ms"
    );
    assert!(marker < out.elapsed.as_secs_f64() * 1e3);
    assert_eq!(out.console.matches("boot timer:").count(), 1);
}

#[test]
fn without_boot_timer_the_marker_port_is_ignored() {
    let out = bench_guest().run().unwrap();
    assert_eq!(out.status, 0, "{}", out.tail(20));
    assert!(out.console.contains("MOAT-BENCH-INIT"), "{}", out.tail(20));
    assert!(!out.console.contains("boot timer"), "{}", out.tail(20));
}

#[test]
fn the_guest_sees_the_host_processor_model_name() {
    let model = "grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2-";
    let out = Guest::vmlinux()
        .host_script(&format!("echo \"HOST-MODEL=$({model})\"; exec \"$@\""))
        .script(&format!("echo \"GUEST-MODEL=$({model})\""))
        .run()
        .unwrap();
    out.assert_success();
    let value = |key: &str| {
        out.console
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {key} in:\n{}", out.tail(20)))
    };
    let host = value("HOST-MODEL=");
    assert!(!host.is_empty());
    assert_eq!(value("GUEST-MODEL="), host);
}
