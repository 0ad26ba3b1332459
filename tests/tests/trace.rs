//! `moat run --trace-exits`: a guest that writes to its console and reads
//! its disk, and the table and JSON moat makes of its exits.

use moat_tests::{Guest, Outcome, Scratch};

/// Where moat writes the trace (in the rig's VM, or on a host with KVM),
/// and the host script that prints it on the console once moat has ended.
const TRACE: &str = "/tmp/moat-trace-exits-test.json";
const PRINT_TRACE: &str = r#"rm -f /tmp/moat-trace-exits-test.json
"$@"; rc=$?
echo "TRACE-SUMMARY $(tail -n 1 /tmp/moat-trace-exits-test.json)"
rm -f /tmp/moat-trace-exits-test.json
exit $rc"#;

/// The trace's summary, which [`PRINT_TRACE`] put on the console.
fn summary(out: &Outcome) -> serde_json::Value {
    let line = out
        .console
        .lines()
        .find_map(|l| l.split_once("TRACE-SUMMARY ").map(|(_, json)| json))
        .unwrap_or_else(|| panic!("no trace summary:\n{}", out.tail(40)));
    let json: serde_json::Value =
        serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{e}: {line}"));
    json["summary"].clone()
}

/// How many exits of kind `exit` `summary` counts at `device`.
fn exits_of(summary: &serde_json::Value, exit: &str, device: &str) -> u64 {
    summary["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["exit"] == exit && r["device"] == device)
        .map(|r| r["count"].as_u64().unwrap())
        .sum()
}

#[test]
fn traced_exits_name_their_devices_skip_notifications_register_reads_and_acks_and_add_up() {
    let scratch = Scratch::new("trace-exits");
    let disk = scratch.path("disk.img");
    std::fs::write(&disk, vec![1u8; 4 << 20]).unwrap();
    let out = Guest::vmlinux()
        .args([format!("--trace-exits={TRACE}")])
        .disk(&disk, "")
        .host_script(PRINT_TRACE)
        .script(
            "dd if=/dev/vda of=/dev/null bs=4k count=512 iflag=direct 2>&1 | tail -n 1; \
             echo read-done",
        )
        .run()
        .unwrap();
    out.assert_success();
    assert!(out.test_output.contains("read-done"), "{}", out.tail(20));
    // The table, on stderr.
    assert!(
        out.console.contains("VM exits (moat --trace-exits)"),
        "{}",
        out.tail(40)
    );
    let summary = &summary(&out);
    let rows = summary["rows"].as_array().unwrap();
    let count = |exit: &str, device: &str| exits_of(summary, exit, device);
    // The console's bytes went out through the UART's port.
    assert!(count("io_out", "serial") > 100, "{summary}");
    // The guest probed the disk's registers, but its 512 reads sent no
    // notification through moat: KVM's ioeventfd took every one.
    assert!(count("mmio_read", "block_vda") > 0, "{summary}");
    // Each read's interrupt cost no exit either. The guest read
    // InterruptStatus from the window's register page, mapped read-only
    // once the driver claimed it (reads exit only before that: magic,
    // version, DeviceID), and KVM absorbed its InterruptACK write through
    // an ioeventfd. What exits are the driver's setup writes (status,
    // features, queue addresses): a few dozen, not one per read.
    assert!(count("mmio_write", "block_vda") < 64, "{summary}");
    assert!(count("mmio_read", "block_vda") < 16, "{summary}");
    assert_eq!(summary["queue_notify_exits"]["block_vda"], 0, "{summary}");
    // Rows and histogram add up to the total.
    let exits = summary["exits"].as_u64().unwrap();
    let by_rows: u64 = rows.iter().map(|r| r["count"].as_u64().unwrap()).sum();
    assert_eq!(by_rows, exits);
    let by_buckets: u64 = summary["histogram"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|h| h["buckets"].as_array().unwrap().iter())
        .map(|b| b["count"].as_u64().unwrap())
        .sum();
    assert_eq!(by_buckets, exits);
    let handling: u64 = rows
        .iter()
        .map(|r| r["handling_ns"].as_u64().unwrap())
        .sum();
    assert_eq!(handling, summary["handling_ns"].as_u64().unwrap());
}

/// A kernel that writes three lines to COM1 as Linux's console does,
/// polling the line status register before each byte: 32 bytes with the
/// UART's interrupts off (IER 0, as at boot), 16 with its transmit
/// interrupt on, 32 with them off again; then it powers off (ACPI S5).
///
/// ```text
///     lea m1(%rip), %rsi; mov $32, %ecx; call-free loop:
///  1: mov $0x3fd, %dx; 2: in %dx, %al; test $0x20, %al; jz 2b
///     mov $0x3f8, %dx; lodsb; out %al, %dx; loop 1b
///     mov $0x3f9, %dx; mov $2, %al; out %al, %dx      (IER: transmit)
///     (the same loop over m2, 16 bytes)
///     mov $0x3f9, %dx; xor %eax, %eax; out %al, %dx   (IER: 0)
///     (the same loop over m3, 32 bytes)
///     mov $0x600, %dx; mov $0x34, %al; out %al, %dx   (S5)
///  3: hlt; jmp 3b
/// ```
const UART_CODE: [u8; 111] = [
    0x48, 0x8d, 0x35, 0x68, 0x00, 0x00, 0x00, 0xb9, 0x20, 0x00, 0x00, 0x00, 0x66, 0xba, 0xfd, 0x03,
    0xec, 0xa8, 0x20, 0x74, 0xfb, 0x66, 0xba, 0xf8, 0x03, 0xac, 0xee, 0xe2, 0xef, 0x66, 0xba, 0xf9,
    0x03, 0xb0, 0x02, 0xee, 0x48, 0x8d, 0x35, 0x64, 0x00, 0x00, 0x00, 0xb9, 0x10, 0x00, 0x00, 0x00,
    0x66, 0xba, 0xfd, 0x03, 0xec, 0xa8, 0x20, 0x74, 0xfb, 0x66, 0xba, 0xf8, 0x03, 0xac, 0xee, 0xe2,
    0xef, 0x66, 0xba, 0xf9, 0x03, 0x31, 0xc0, 0xee, 0x48, 0x8d, 0x35, 0x50, 0x00, 0x00, 0x00, 0xb9,
    0x20, 0x00, 0x00, 0x00, 0x66, 0xba, 0xfd, 0x03, 0xec, 0xa8, 0x20, 0x74, 0xfb, 0x66, 0xba, 0xf8,
    0x03, 0xac, 0xee, 0xe2, 0xef, 0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xf4, 0xeb, 0xfd,
];
const UART_LINES: [&str; 3] = [
    "batched: 0123456789abcdefghijkl",
    "one by one: XYZ",
    "batched again: 0123456789ABCDEF",
];

#[test]
fn console_bytes_written_with_the_uart_interrupts_off_exit_once_not_twice() {
    let scratch = Scratch::new("trace-uart");
    let mut code = UART_CODE.to_vec();
    for line in UART_LINES {
        code.extend(line.bytes().chain([b'\n']));
    }
    let kernel = moat_tests::tiny_kernel(&scratch.path("uart.elf"), &code);
    let out = Guest::new(kernel)
        .no_initramfs()
        .args([format!("--trace-exits={TRACE}")])
        .host_script(PRINT_TRACE)
        .run()
        .unwrap();
    // It powered off: no test script to report.
    assert_eq!(out.status, 0, "{}", out.tail(20));
    // Every byte, in order, batched or not.
    let at: Vec<usize> = UART_LINES
        .iter()
        .map(|line| {
            out.console
                .find(&format!("{line}\n"))
                .unwrap_or_else(|| panic!("no {line:?} in:\n{}", out.tail(20)))
        })
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{}", out.tail(20));
    let summary = summary(&out);
    let count = |exit: &str| exits_of(&summary, exit, "serial");
    // Each byte's status read exits; of the data writes only the 16 made
    // with the transmit interrupt on do, besides the two IER writes.
    assert_eq!(count("io_in"), 80, "{summary}");
    assert_eq!(count("io_out"), 2 + 16, "{summary}");
}

/// A kernel that polls the status register before each byte but not
/// after the last (as Linux's earlyprintk and many small kernels do),
/// prints "Hello!" with the UART's interrupts off, then idles in HLT,
/// which exits to nobody: its last byte waits in KVM's ring until the
/// halt probe's kick, once a second, plays it.
///
/// ```text
///     lea m(%rip), %rsi; mov $6, %ecx
///  1: mov $0x3fd, %dx; 2: in %dx, %al; test $0x20, %al; jz 2b
///     mov $0x3f8, %dx; lodsb; out %al, %dx; loop 1b
///  3: hlt; jmp 3b
/// ```
const HELLO_CODE: [u8; 32] = [
    0x48, 0x8d, 0x35, 0x19, 0x00, 0x00, 0x00, 0xb9, 0x06, 0x00, 0x00, 0x00, 0x66, 0xba, 0xfd, 0x03,
    0xec, 0xa8, 0x20, 0x74, 0xfb, 0x66, 0xba, 0xf8, 0x03, 0xac, 0xee, 0xe2, 0xef, 0xf4, 0xeb, 0xfd,
];

#[test]
fn the_last_batched_byte_reaches_the_console_without_another_exit() {
    let scratch = Scratch::new("trace-hello");
    let mut code = HELLO_CODE.to_vec();
    code.extend(b"Hello!");
    let kernel = moat_tests::tiny_kernel(&scratch.path("hello.elf"), &code);
    let out = Guest::new(kernel)
        .no_initramfs()
        .kill_after("Hello!")
        .timeout(std::time::Duration::from_secs(60))
        .run()
        .unwrap();
    assert!(out.console.contains("Hello!"), "{}", out.tail(10));
}
