//! `moat run --trace-exits`: a guest that writes to its console and reads
//! its disk, and the table and JSON moat makes of its exits.

use moat_tests::{Guest, Scratch};

/// Where moat writes the trace (in the rig's VM, or on a host with KVM),
/// and the host script that prints it on the console once moat has ended.
const TRACE: &str = "/tmp/moat-trace-exits-test.json";
const PRINT_TRACE: &str = r#"rm -f /tmp/moat-trace-exits-test.json
"$@"; rc=$?
echo "TRACE-SUMMARY $(tail -n 1 /tmp/moat-trace-exits-test.json)"
rm -f /tmp/moat-trace-exits-test.json
exit $rc"#;

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
    let line = out
        .console
        .lines()
        .find_map(|l| l.split_once("TRACE-SUMMARY ").map(|(_, json)| json))
        .unwrap_or_else(|| panic!("no trace summary:\n{}", out.tail(40)));
    let json: serde_json::Value =
        serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{e}: {line}"));
    let summary = &json["summary"];
    let rows = summary["rows"].as_array().unwrap();
    let count = |exit: &str, device: &str| -> u64 {
        rows.iter()
            .filter(|r| r["exit"] == exit && r["device"] == device)
            .map(|r| r["count"].as_u64().unwrap())
            .sum()
    };
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
