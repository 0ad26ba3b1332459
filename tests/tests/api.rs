//! The API mode through real clients: a host-side script starts
//! `moat --api-sock` (in the rig's VM, or on a host with KVM), drives it
//! with curl as Firecracker's getting-started guide does, and the guest
//! shows what it got. Also a config-file boot, pause and resume, and a
//! disk swapped under a running guest.

use moat_tests::net::{value, HOST_TAP_SETUP};
use moat_tests::{rootfs_with_script, Guest, Scratch, API_PRELUDE, CMDLINE};

/// The statuses the report gives for `METHOD PATH`, in order.
fn statuses(console: &str, method: &str, path: &str) -> Vec<u16> {
    let prefix = format!("API {method} {path} -> ");
    console
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| rest.split(' ').next()?.parse().ok())
        .collect()
}

fn body_of<'a>(console: &'a str, method: &str, path: &str) -> Vec<&'a str> {
    let prefix = format!("API {method} {path} -> ");
    console
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| rest.split_once(' ').map(|(_, b)| b))
        .collect()
}

#[test]
fn curl_drives_the_getting_started_sequence_to_a_guest_that_uses_its_disk_and_network() {
    let scratch = Scratch::new("api-getting-started");
    // The guest boots from its root disk, configures eth0, pings the host
    // and waits; moat's metrics must then show its disk reads and exits.
    let guest = "ip addr add 192.0.2.2/26 dev eth0 && ip link set eth0 up; \
                 i=0; until ping -c 1 -W 1 192.0.2.1 >/dev/null; do i=$((i+1)); [ $i -ge 60 ] && break; done; \
                 [ $i -lt 60 ] && echo GUEST-PING-OK; echo guest-is-ready; sleep 100000";
    let root = rootfs_with_script(&scratch.path("root.ext4"), guest);
    let host = format!(
        r#"{API_PRELUDE}{HOST_TAP_SETUP}
start_moat --api-sock "$sock" --id getting-started
moat=$pid
api GET /
api PUT /logger '{{"log_path": "/tmp/moat-api-fc.log", "level": "Info", "show_level": true}}'
api PUT /metrics '{{"metrics_path": "/tmp/moat-api-fc.metrics"}}'
api PUT /boot-source "{{\"kernel_image_path\": \"$kernel\", \"boot_args\": \"{CMDLINE}\"}}"
api PUT /drives/rootfs '{{"drive_id": "rootfs", "path_on_host": "{root}", "is_root_device": true, "is_read_only": false}}'
api PUT /network-interfaces/eth0 '{{"iface_id": "eth0", "guest_mac": "06:00:c0:00:02:02", "host_dev_name": "moatapi0"}}'
api PUT /machine-config '{{"vcpu_count": 2, "mem_size_mib": 256}}'
api GET /machine-config
api PUT /actions '{{"action_type": "InstanceStart"}}'
tap_up moatapi0 192.0.2.1
until_console guest-is-ready || echo "HOST: the guest never got ready" >>"$report"
api GET /
api PUT /actions '{{"action_type": "InstanceStart"}}'
api PUT /machine-config '{{"vcpu_count": 1, "mem_size_mib": 128}}'
api PUT /actions '{{"action_type": "FlushMetrics"}}'
api GET /vm/config
api PUT /actions '{{"action_type": "SendCtrlAltDel"}}'
wait_moat; rc=$?
wait $tee; cat "$report"
echo "HOST-METRICS=$(tail -n 2 /tmp/moat-api-fc.metrics | head -n 1)"
echo "HOST-LOG-LINES=$(grep -c INFO /tmp/moat-api-fc.log)"
echo "HOST-SOCKET-LEFT=$([ -e "$sock" ] && echo yes || echo no)"
exit $rc
"#,
        root = root.display()
    );
    let out = Guest::vmlinux()
        .no_initramfs()
        .disk(&root, "")
        .host_file("/usr/bin/curl")
        .host_script(&host)
        .run()
        .unwrap();
    let c = &out.console;
    assert_eq!(
        out.status,
        0,
        "SendCtrlAltDel powered the guest off: {}",
        out.tail(40)
    );
    for (method, path) in [
        ("PUT", "/logger"),
        ("PUT", "/metrics"),
        ("PUT", "/boot-source"),
        ("PUT", "/drives/rootfs"),
        ("PUT", "/network-interfaces/eth0"),
        ("PUT", "/machine-config"),
    ] {
        assert_eq!(
            statuses(c, method, path)[0],
            204,
            "{method} {path}: {}",
            out.tail(40)
        );
    }
    // Start once; the second start and a pre-boot PUT after boot are refused.
    assert_eq!(
        statuses(c, "PUT", "/actions"),
        [204, 400, 204, 204],
        "{}",
        out.tail(40)
    );
    assert_eq!(statuses(c, "PUT", "/machine-config"), [204, 400]);
    let states: Vec<&str> = body_of(c, "GET", "/");
    assert!(
        states[0].contains("\"state\":\"Not started\""),
        "{states:?}"
    );
    assert!(states[1].contains("\"state\":\"Running\"") && states[1].contains("getting-started"));
    assert!(body_of(c, "GET", "/machine-config")[0].contains("\"vcpu_count\":2"));
    let config = body_of(c, "GET", "/vm/config")[0];
    assert!(
        config.contains("\"host_dev_name\":\"moatapi0\""),
        "{config}"
    );
    // The guest booted from the root drive (root=/dev/vda rw added), saw
    // two CPUs' worth of boot, reached the host over the network, and shut
    // down through the power button.
    for marker in [
        "GUEST-PING-OK",
        "guest-is-ready",
        "MOAT-GUEST-SHUTDOWN",
        "reboot: Power down",
    ] {
        assert!(c.contains(marker), "no {marker}: {}", out.tail(40));
    }
    assert!(c.contains("root=/dev/vda rw"), "{}", out.tail(60));
    // Metrics: the disk was read and the serial port written.
    let metrics: serde_json::Value =
        serde_json::from_str(value(c, "HOST-METRICS")).expect("a metrics line");
    assert!(
        metrics["block_rootfs"]["read_count"].as_u64().unwrap() > 0,
        "{metrics}"
    );
    assert!(
        metrics["net_eth0"]["tx_packets_count"].as_u64().unwrap() > 0,
        "{metrics}"
    );
    assert!(
        metrics["vcpu"]["exit_io_out"].as_u64().unwrap() > 0,
        "{metrics}"
    );
    assert!(
        metrics["uart"]["write_count"].as_u64().unwrap() > 0,
        "{metrics}"
    );
    assert_eq!(metrics["uart"]["missed_write_count"], 0, "{metrics}");
    assert!(value(c, "HOST-LOG-LINES").parse::<u32>().unwrap() >= 3);
    assert_eq!(value(c, "HOST-SOCKET-LEFT"), "no");
}

#[test]
fn a_config_file_boots_the_guest_without_an_api() {
    let host = format!(
        r#"{API_PRELUDE}
config=/tmp/moat-vm-$$.json
cat >"$config" <<EOF
{{"boot-source": {{"kernel_image_path": "$kernel", "initrd_path": "$initrd", "boot_args": "{CMDLINE}"}},
  "machine-config": {{"vcpu_count": 2, "mem_size_mib": 192}},
  "entropy": {{}}}}
EOF
start_moat --config-file "$config" --no-api
finish
"#
    );
    let out = Guest::vmlinux()
        .host_file("/usr/bin/curl")
        .script("echo cpus=$(grep -c ^processor /proc/cpuinfo); echo rng=$(cat /sys/class/misc/hw_random/rng_current); grep MemTotal /proc/meminfo")
        .host_script(&host)
        .run()
        .unwrap();
    out.assert_success();
    assert!(out.test_output.contains("cpus=2"), "{}", out.test_output);
    assert!(
        out.test_output.contains("rng=virtio_rng"),
        "{}",
        out.test_output
    );
    let kib: u64 = out
        .test_output
        .split("MemTotal:")
        .nth(1)
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!((150_000..=196_608).contains(&kib), "MemTotal {kib} kB");
}

#[test]
fn a_paused_guest_stops_counting_and_a_resumed_one_goes_on() {
    // The guest counts ten times a second; while paused, no count appears.
    let guest = "i=0; while [ $i -lt 100000 ]; do echo TICK-$i; i=$((i+1)); sleep 0.1; done";
    let host = format!(
        r#"{API_PRELUDE}
ticks() {{ grep -c '^TICK-' "$console"; }}
start_moat --api-sock "$sock"
api PUT /boot-source "{{\"kernel_image_path\": \"$kernel\", \"initrd_path\": \"$initrd\", \"boot_args\": \"{CMDLINE}\"}}"
api PUT /actions '{{"action_type": "InstanceStart"}}'
until_console TICK-20
api PATCH /vm '{{"state": "Paused"}}'
api GET /
sleep 1; a=$(ticks); sleep 4; b=$(ticks)
echo "HOST-PAUSED-TICKS=$a,$b" >>"$report"
api PATCH /vm '{{"state": "Resumed"}}'
api GET /
c=$(ticks); until_console "TICK-$((c + 20))"; d=$(ticks)
echo "HOST-RESUMED-TICKS=$c,$d" >>"$report"
api PUT /actions '{{"action_type": "SendCtrlAltDel"}}'
finish
"#
    );
    let out = Guest::vmlinux()
        .script(guest)
        .host_file("/usr/bin/curl")
        .host_script(&host)
        .run()
        .unwrap();
    let c = &out.console;
    assert_eq!(out.status, 0, "{}", out.tail(30));
    assert_eq!(statuses(c, "PATCH", "/vm"), [204, 204], "{}", out.tail(30));
    let states = body_of(c, "GET", "/");
    assert!(
        states[0].contains("\"Paused\"") && states[1].contains("\"Running\""),
        "{states:?}"
    );
    let paused: Vec<u32> = value(c, "HOST-PAUSED-TICKS")
        .split(',')
        .map(|n| n.trim().parse().unwrap())
        .collect();
    assert_eq!(paused[0], paused[1], "the guest counted while paused");
    let resumed: Vec<u32> = value(c, "HOST-RESUMED-TICKS")
        .split(',')
        .map(|n| n.trim().parse().unwrap())
        .collect();
    assert!(resumed[1] >= resumed[0] + 20, "{resumed:?}");
}

#[test]
fn a_disk_swapped_under_a_running_guest_shows_its_new_size_and_data() {
    let scratch = Scratch::new("api-drive-swap");
    let first = scratch.path("first.img");
    let second = scratch.path("second.img");
    let mut data = b"FIRST-DISK".to_vec();
    data.resize(1 << 20, 0);
    std::fs::write(&first, &data).unwrap();
    let mut data = b"SECOND-DISK".to_vec();
    data.resize(3 << 20, 0);
    std::fs::write(&second, &data).unwrap();
    let guest = "echo before=$(cat /sys/block/vda/size) $(head -c 10 /dev/vda); echo ready-for-swap; \
                 i=0; while [ $(cat /sys/block/vda/size) = 2048 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; \
                 echo 3 > /proc/sys/vm/drop_caches; \
                 echo after=$(cat /sys/block/vda/size) $(head -c 11 /dev/vda); \
                 i=0; while [ $(cat /sys/block/vda/size) = 6144 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; \
                 echo 3 > /proc/sys/vm/drop_caches; \
                 echo back=$(cat /sys/block/vda/size) $(head -c 10 /dev/vda)";
    let host = format!(
        r#"{API_PRELUDE}
start_moat --api-sock "$sock"
api PUT /boot-source "{{\"kernel_image_path\": \"$kernel\", \"initrd_path\": \"$initrd\", \"boot_args\": \"{CMDLINE}\"}}"
api PUT /drives/scratch '{{"drive_id": "scratch", "path_on_host": "{first}", "is_root_device": false, "is_read_only": false}}'
api PATCH /drives/scratch '{{"drive_id": "scratch", "path_on_host": "{second}"}}'
api PUT /actions '{{"action_type": "InstanceStart"}}'
until_console ready-for-swap
api PATCH /drives/scratch '{{"drive_id": "scratch", "path_on_host": "/nonexistent.img"}}'
api PATCH /drives/other '{{"drive_id": "other", "path_on_host": "{second}"}}'
api PATCH /drives/scratch '{{"drive_id": "scratch", "path_on_host": "{second}"}}'
# While the guest waits for the swap back (it ends soon after that).
until_console after=
api GET /vm/config
api PATCH /drives/scratch '{{"drive_id": "scratch", "path_on_host": "{first}"}}'
finish
"#,
        first = first.display(),
        second = second.display()
    );
    let out = Guest::vmlinux()
        .script(guest)
        .host_file(&first)
        .host_file(&second)
        .host_file("/usr/bin/curl")
        .host_script(&host)
        .run()
        .unwrap();
    out.assert_success();
    let c = &out.console;
    // Before boot a PATCH is refused; a missing file or drive is refused
    // and the guest keeps its disk; then the swap, and a swap back.
    assert_eq!(
        statuses(c, "PATCH", "/drives/scratch"),
        [400, 400, 204, 204],
        "{}",
        out.tail(30)
    );
    assert_eq!(statuses(c, "PATCH", "/drives/other"), [400]);
    assert!(
        out.test_output.contains("before=2048 FIRST-DISK"),
        "{}",
        out.test_output
    );
    assert!(
        out.test_output.contains("after=6144 SECOND-DISK"),
        "{}",
        out.test_output
    );
    assert!(
        out.test_output.contains("back=2048 FIRST-DISK"),
        "{}",
        out.test_output
    );
    let config = body_of(c, "GET", "/vm/config");
    assert!(
        config.first().is_some_and(|b| b.contains("second.img")),
        "{config:?}\n{}",
        out.tail(30)
    );
}
