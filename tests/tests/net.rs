//! virtio-net guest tests. A host-side script (in the rig's VM, or on a
//! host with KVM) gives moat's TAP an address and plays the far end; the
//! guest configures its card and talks to it. Addresses come from a
//! documentation range (RFC 5737), so nothing here can reach a real network.
//! Each test has its own TAP names and /26 subnets, so the tests can run at
//! once on one host (with hardware KVM they share the host's network stack).

use moat_tests::net::{fill, value, GUEST_TRANSFER, HOST_TAP_SETUP, HOST_TRANSFER};
use moat_tests::Guest;

/// Pings both ways and moves 64 MiB each way; returns the run's wall time
/// and the feature bits the guest's driver accepted.
fn transfer(subnet: u8, net_options: &str) -> (std::time::Duration, String) {
    let net = fill(&format!("tap=@TAP0@{net_options}"), subnet, 1);
    let out = Guest::vmlinux()
        .args(["--memory", "size=512M", "--net", &net])
        .host_script(&fill(
            &format!("{HOST_TAP_SETUP}{HOST_TRANSFER}"),
            subnet,
            1,
        ))
        .script(&fill(GUEST_TRANSFER, subnet, 1))
        .run()
        .unwrap();
    out.assert_success();
    let c = &out.console;
    assert!(c.contains("GUEST-PING-OK"), "{}", out.tail(30));
    assert!(c.contains("HOST-PING-OK"), "{}", out.tail(30));
    assert_eq!(value(c, "GUEST-GOT-SHA"), value(c, "HOST-BLOB-SHA"));
    assert_eq!(value(c, "HOST-GOT-SHA"), value(c, "GUEST-BLOB-SHA"));
    assert_eq!(value(c, "HOST-BLOB-SHA").len(), 64);
    (out.elapsed, value(c, "GUEST-FEATURES").to_string())
}

/// Whether feature bit `bit` is set in a virtio sysfs feature string.
fn feature(bits: &str, bit: usize) -> bool {
    bits.as_bytes().get(bit) == Some(&b'1')
}

#[test]
fn guest_and_host_ping_each_other_and_move_64_mib_each_way() {
    let (elapsed, features) = transfer(0, "");
    // Checksum and TSO offloads in both directions, mergeable buffers,
    // EVENT_IDX and VERSION_1 were negotiated.
    for bit in [0, 1, 7, 8, 11, 12, 15, 29, 32] {
        assert!(
            feature(&features, bit),
            "feature {bit} not accepted: {features}"
        );
    }
    eprintln!(
        "64 MiB each way with offloads: {:.1} s (whole run)",
        elapsed.as_secs_f64()
    );
}

#[test]
fn transfers_also_work_without_offloads() {
    let (elapsed, features) = transfer(1, ",offload=off");
    for bit in [0, 1, 7, 8, 11, 12] {
        assert!(
            !feature(&features, bit),
            "offload {bit} offered with offload=off: {features}"
        );
    }
    assert!(feature(&features, 15), "MRG_RXBUF: {features}");
    eprintln!(
        "64 MiB each way without offloads: {:.1} s (whole run)",
        elapsed.as_secs_f64()
    );
}

#[test]
fn two_cards_each_reach_their_own_tap() {
    let host = r#"
"$@" & moat=$!
tap_up @TAP0@ @H0@
tap_up @TAP1@ @H1@
ping_until @G0@ && say HOST-TAP0-OK
ping_until @G1@ && say HOST-TAP1-OK
tell_done @G0@
wait $moat; rc=$?
report
exit $rc
"#;
    let guest = r#"
ip addr add @G0@/26 dev eth0 && ip link set eth0 up || exit 1
ip addr add @G1@/26 dev eth1 && ip link set eth1 up || exit 1
echo eth0=$(cat /sys/class/net/eth0/address) eth1=$(cat /sys/class/net/eth1/address)
ping -c 2 -W 5 -I eth0 @H0@ >/dev/null && echo GUEST-ETH0-OK
ping -c 2 -W 5 -I eth1 @H1@ >/dev/null && echo GUEST-ETH1-OK
nc -l -p 5003 </dev/null >/dev/null
"#;
    let out = Guest::vmlinux()
        .args([
            "--net".to_string(),
            fill("tap=@TAP0@", 2, 2),
            "--net".to_string(),
            fill("tap=@TAP1@,mac=02:00:00:00:00:42", 2, 2),
        ])
        .host_script(&fill(&format!("{HOST_TAP_SETUP}{host}"), 2, 2))
        .script(&fill(guest, 2, 2))
        .run()
        .unwrap();
    out.assert_success();
    for marker in [
        "GUEST-ETH0-OK",
        "GUEST-ETH1-OK",
        "HOST-TAP0-OK",
        "HOST-TAP1-OK",
    ] {
        assert!(
            out.console.contains(marker),
            "{marker} missing:\n{}",
            out.tail(30)
        );
    }
    assert!(
        out.console.contains("eth1=02:00:00:00:00:42"),
        "{}",
        out.tail(30)
    );
    let eth0 = value(&out.console, "eth0")
        .split_whitespace()
        .next()
        .unwrap_or("");
    assert!(
        eth0.starts_with("02:"),
        "default MAC is locally administered: {eth0}"
    );
}
