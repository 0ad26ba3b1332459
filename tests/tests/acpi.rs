//! ACPI guest tests with moat's own kernel (which has ACPI, the MP table
//! parser and virtio-mmio command-line devices all built in): what the
//! guest finds through ACPI, with and without `acpi=off`, powering off and
//! resetting through ACPI, and a clean shutdown when moat is asked to stop
//! (promptly, however busy the guest keeps moat).

use std::time::Duration;

use moat_tests::net::value;
use moat_tests::{debugfs_cat, fsck, make_ext4, Backend, Guest, Scratch, CMDLINE};

/// moat's default command line without `reboot=k`, so a reboot goes
/// through the ACPI reset register (Linux's default on ACPI machines).
fn acpi_reboot_cmdline() -> String {
    CMDLINE.replace(" reboot=k", "")
}

/// Prints what the guest found: CPUs online, ACPI tables, the virtio
/// devices and which bus they came from, and any probe failures.
const INVENTORY: &str = r#"
echo cpus=$(cat /sys/devices/system/cpu/online)
echo tables=$(cd /sys/firmware/acpi/tables 2>/dev/null && ls -p | grep -v / | sort | tr '\n' ,)
echo virtio=$(ls /sys/bus/virtio/devices | wc -l)
for d in /sys/bus/virtio/devices/*; do
    echo "device $(basename $d) id=$(cat $d/device) parent=$(basename $(readlink -f $d/..))"
done
echo blocks=$(ls /sys/block | tr '\n' ,)
echo inventory-done
"#;

/// What in a kernel log says something went wrong with ACPI or a device.
const PROBLEMS: &[&str] = &[
    "WARNING",
    "ACPI Error",
    "ACPI BIOS Error",
    "virtio_mmio: probe",
    "virtio-mmio: probe",
    "virtio_rng: probe",
    "failed with error",
    "Call Trace",
];

/// The kernel's complaints on the console, the rig's own aside.
fn problems(out: &moat_tests::Outcome, ignore: &[&str]) -> Vec<String> {
    moat_tests::kernel_problems(&out.console, PROBLEMS, Backend::detect())
        .into_iter()
        .filter(|l| !ignore.iter().any(|i| l.contains(i)))
        .collect()
}

/// A guest with two disks, two vCPUs and the inventory script.
fn inventory(cmdline_extra: &str) -> moat_tests::Outcome {
    let scratch = Scratch::new("acpi-inventory");
    let (a, b) = (scratch.path("a.img"), scratch.path("b.img"));
    std::fs::write(&a, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&b, vec![0u8; 1 << 20]).unwrap();
    let out = Guest::vmlinux()
        .args([
            "--cpus",
            "boot=2",
            "--cmdline",
            &format!("{CMDLINE} {cmdline_extra}"),
        ])
        .disk(&a, "")
        .disk(&b, "")
        .script(INVENTORY)
        .run()
        .unwrap();
    out.assert_success();
    out
}

#[test]
fn the_guest_finds_cpus_and_devices_through_acpi_and_registers_each_once() {
    let out = inventory("");
    let o = &out.test_output;
    assert_eq!(value(o, "cpus"), "0-1", "{o}");
    assert_eq!(value(o, "tables"), "APIC,DSDT,FACP,", "{o}");
    assert_eq!(value(o, "virtio"), "3", "one per disk, and the rng: {o}");
    assert_eq!(value(o, "blocks"), "vda,vdb,", "{o}");
    // Both came from the DSDT (LNRO0005 platform devices), none from the
    // command line's virtio_mmio.device= (virtio-mmio.N).
    let parents: Vec<&str> = o.lines().filter(|l| l.starts_with("device ")).collect();
    assert_eq!(parents.len(), 3, "{o}");
    assert!(
        parents.iter().all(|l| l.contains("parent=LNRO0005:")),
        "{o}"
    );
    assert_eq!(
        problems(&out, &[]),
        Vec::<String>::new(),
        "{}",
        out.tail(40)
    );
}

#[test]
fn with_acpi_off_the_mp_table_and_command_line_still_describe_the_machine() {
    let out = inventory("acpi=off");
    let o = &out.test_output;
    assert_eq!(value(o, "cpus"), "0-1", "{o}");
    assert_eq!(value(o, "tables"), "", "{o}");
    assert_eq!(value(o, "virtio"), "3", "{o}");
    assert_eq!(value(o, "blocks"), "vda,vdb,", "{o}");
    let parents: Vec<&str> = o.lines().filter(|l| l.starts_with("device ")).collect();
    assert!(
        parents.iter().all(|l| l.contains("parent=virtio-mmio.")),
        "{o}"
    );
    // Without ACPI the kernel probes the i8042 itself, and moat's (there
    // only for reset) does not answer its self-test.
    assert_eq!(
        problems(&out, &["i8042"]),
        Vec::<String>::new(),
        "{}",
        out.tail(40)
    );
}

#[test]
fn poweroff_in_the_guest_ends_moat_with_status_0() {
    let out = Guest::vmlinux()
        .script("echo powering-off; poweroff -f; sleep 100")
        .timeout(Duration::from_secs(120))
        .run()
        .unwrap();
    assert_eq!(out.status, 0, "{}", out.tail(20));
    assert!(
        out.console.contains("reboot: Power down"),
        "{}",
        out.tail(20)
    );
    assert!(!out.console.contains("MOAT-TEST-END"), "{}", out.tail(20));
}

#[test]
fn poweroff_through_init_shuts_down_cleanly_then_ends_moat() {
    // busybox poweroff (no -f) asks init, which runs the shutdown action.
    let out = Guest::vmlinux()
        .script("poweroff; sleep 100")
        .timeout(Duration::from_secs(120))
        .run()
        .unwrap();
    assert_eq!(out.status, 0, "{}", out.tail(20));
    assert!(
        out.console.contains("MOAT-GUEST-SHUTDOWN"),
        "{}",
        out.tail(20)
    );
    assert!(
        out.console.contains("reboot: Power down"),
        "{}",
        out.tail(20)
    );
}

#[test]
fn reboot_through_the_acpi_reset_register_ends_moat_with_status_0() {
    let out = Guest::vmlinux()
        .args(["--cmdline", &acpi_reboot_cmdline()])
        .script("echo rebooting; reboot -f; sleep 100")
        .timeout(Duration::from_secs(120))
        .run()
        .unwrap();
    assert_eq!(out.status, 0, "{}", out.tail(20));
    assert!(
        out.console.contains("reboot: Restarting system"),
        "{}",
        out.tail(20)
    );
}

#[test]
fn without_acpi_a_powered_off_guest_halts_and_moat_reports_it() {
    let out = Guest::vmlinux()
        .args([
            "--cpus",
            "boot=2",
            "--cmdline",
            &format!("{CMDLINE} acpi=off"),
        ])
        .script("poweroff -f; sleep 100")
        .timeout(Duration::from_secs(120))
        .run()
        .unwrap();
    assert_eq!(out.status, 0, "{}", out.tail(20));
    assert!(
        out.console.contains("moat: the guest halted"),
        "{}",
        out.tail(20)
    );
}

/// Host side: start moat, wait for the guest's marker, SIGTERM moat, and
/// report how long moat took to exit after it.
const SIGTERM_AFTER_READY: &str = r#"log=/tmp/moat-term-$$.log; fifo=/tmp/moat-term-$$.fifo
mkfifo "$fifo"
# The console goes out as it comes (a run that hangs shows where) and
# into the log the script watches.
tee "$log" <"$fifo" & tee=$!
"$@" >"$fifo" 2>&1 & moat=$!
i=0; until grep -q guest-is-ready "$log"; do
    kill -0 $moat 2>/dev/null || break
    i=$((i+1)); [ $i -ge 600 ] && break
    sleep 0.2
done
read -r t0 _ </proc/uptime
kill -TERM $moat
# moat ends within the shutdown timeout; one still running after 60 s is
# stuck: where its threads wait goes on the console, and it is stopped.
stop_if_stuck $moat 60
wait $moat; rc=$?
read -r t1 _ </proc/uptime
wait $tee; rm -f "$log" "$fifo"
echo "HOST-EXIT-AFTER-TERM=$(echo "$t0 $t1" | awk '{ printf "%.1f", $2 - $1 }')"
exit $rc"#;

#[test]
fn sigterm_shuts_the_guest_down_cleanly_and_its_writes_reach_the_disk() {
    let scratch = Scratch::new("sigterm-clean");
    let data = scratch.path("data.ext4");
    make_ext4(&data, 16);
    // The file is written but not synced: only the guest's shutdown path
    // (init's shutdown action syncs and unmounts) puts it on the disk.
    let script = "mount /dev/vda /mnt && echo unflushed-data > /mnt/file.txt && \
                  echo guest-is-ready; sleep 100000";
    let out = Guest::vmlinux()
        .disk(&data, "")
        .host_script(SIGTERM_AFTER_READY)
        .script(script)
        .run()
        .unwrap();
    assert_eq!(
        out.status,
        0,
        "the guest powered off in time: {}",
        out.tail(20)
    );
    for marker in [
        "pressed the power button",
        "MOAT-GUEST-SHUTDOWN",
        "reboot: Power down",
    ] {
        assert!(
            out.console.contains(marker),
            "no {marker}:\n{}",
            out.tail(30)
        );
    }
    fsck(&data);
    assert_eq!(debugfs_cat(&data, "/file.txt"), b"unflushed-data\n");
}

#[test]
fn a_guest_that_ignores_the_power_button_is_stopped_after_the_timeout() {
    let out = Guest::vmlinux()
        .args(["--shutdown-timeout", "2"])
        .host_script(SIGTERM_AFTER_READY)
        .script("killall acpid; echo guest-is-ready; sleep 100000")
        .run()
        .unwrap();
    assert_eq!(out.status, 143, "{}", out.tail(20));
    assert!(
        out.console.contains("did not shut down in time"),
        "{}",
        out.tail(20)
    );
    let waited: f64 = value(&out.console, "HOST-EXIT-AFTER-TERM").parse().unwrap();
    assert!(
        (1.5..10.0).contains(&waited),
        "moat exited {waited} s after SIGTERM"
    );
}

#[test]
fn a_guest_flooding_its_disk_does_not_keep_sigterm_waiting_past_100_ms() {
    // Eight readers re-post 4 KiB direct reads as fast as the guest can;
    // once they have run 2 s, SIGTERM. moat times the signal from its
    // handler to the event loop and logs it (info).
    let scratch = Scratch::new("sigterm-flood");
    let disk = scratch.path("flood.img");
    std::fs::write(&disk, vec![7u8; 8 << 20]).unwrap();
    let script = "for i in 1 2 3 4 5 6 7 8; do \
                      (while :; do dd if=/dev/vda of=/dev/null bs=4k count=64 iflag=direct \
                       2>/dev/null; echo >>/tmp/batches; done) & \
                  done; sleep 2; echo \"GUEST-BATCHES=$(wc -l </tmp/batches)\"; \
                  echo guest-is-ready; sleep 100000";
    let out = Guest::vmlinux()
        .args(["--shutdown-timeout", "0", "--log-level", "info"])
        .disk(&disk, "")
        .host_script(SIGTERM_AFTER_READY)
        .script(script)
        .run()
        .unwrap();
    assert_eq!(out.status, 143, "{}", out.tail(20));
    let batches: u32 = value(&out.console, "GUEST-BATCHES").parse().unwrap_or(0);
    assert!(
        batches >= 4,
        "the guest read only {batches} x 64 blocks in 2 s: no flood\n{}",
        out.tail(20)
    );
    let line = out
        .console
        .lines()
        .find(|l| l.contains("signal 15 reached the event loop"))
        .unwrap_or_else(|| panic!("moat did not time the signal:\n{}", out.tail(20)));
    let micros: u64 = line
        .split("event loop ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    println!("SIGTERM under a flood of {batches} x 64 reads in 2 s: {micros} µs");
    assert!(micros <= 100_000, "{line}");
}
