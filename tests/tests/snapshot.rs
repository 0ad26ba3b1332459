//! Snapshots through the rig: a guest that counts, writes each count to
//! its disk and pings the host is paused and snapshotted over the API, its
//! moat killed; `moat run --restore` brings it back, and it goes on from
//! where it was; two clones of the same snapshot run side by side (one
//! restored from the command line, one through `PUT /snapshot/load`), each
//! with its own disk copy and TAP; bad snapshots are refused with one line
//! and status 2; the same on virtio-pci (`--enable-pci`). A guest of two vCPUs with a vsock connection open is
//! snapshotted too and restored in a jail: both CPUs go on, and the guest
//! sees the connection reset (moat tells it through the event queue) and
//! connects anew.

use moat_tests::net::{value, HOST_TAP_SETUP};
use moat_tests::{image, Guest, API_PRELUDE, CMDLINE};

/// The guest: every 0.1 s prints TICK-i and writes "COUNT-i" (16 bytes)
/// at offset 16 i of its disk, synchronously; every 10th tick pings the
/// host and says PING-OK-i. when it answers.
const GUEST: &str = "ip addr add 192.0.2.2/26 dev eth0; ip link set eth0 up; \
    i=0; while [ $i -lt 4000 ]; do \
        echo TICK-$i; \
        printf 'COUNT-%08d\\n\\0' $i | dd of=/dev/vda bs=16 seek=$i conv=notrunc,fsync 2>/dev/null; \
        if [ $((i % 10)) = 0 ] && ping -c 1 -W 1 192.0.2.1 >/dev/null 2>&1; then echo PING-OK-$i.; fi; \
        i=$((i+1)); sleep 0.1; \
    done";

/// The counts a disk holds, in order ("COUNT-i" records).
fn counts(text: &str) -> Vec<u32> {
    text.split_whitespace()
        .filter_map(|w| w.strip_prefix("COUNT-")?.parse().ok())
        .collect()
}

/// The counts `PREFIX-i` in `text`, its last word left out (an excerpt
/// may have cut it).
fn counts_in(text: &str, prefix: &str) -> Vec<u32> {
    let mut words: Vec<&str> = text.split_whitespace().collect();
    words.pop();
    words
        .iter()
        .filter_map(|w| w.strip_prefix(prefix)?.parse().ok())
        .collect()
}

/// Checks that the counts `PREFIX-i` run on across a restore without a gap
/// or a repeat: `paused` is the end of the paused guest's console,
/// `joined` that followed by the start of the restored one (see `JOINED`),
/// so that a line the snapshot cut in two is whole again.
fn assert_continues(paused: &str, joined: &str, prefix: &str) {
    let before = counts_in(paused, prefix);
    let across = counts_in(joined, prefix);
    assert!(
        !before.is_empty()
            && across.len() > before.len() + 1
            && across.windows(2).all(|w| w[1] == w[0] + 1),
        "{prefix}: counts before the snapshot {before:?}, across the restore {across:?} in {joined:?}"
    );
}

/// Shell: `paused_end` prints the end of the paused guest's console
/// (`$paused`), `joined FILE` that and the start of FILE, each as one line.
const JOINED: &str = r#"
paused_end() { tail -c 300 $paused | tr '\n\r' '  '; }
joined() { printf '%s%s' "$(paused_end)" "$(head -c 600 $1 | tr '\n\r' '  ')"; }
"#;

/// Prints the host script's report and API calls (each cut at 300
/// characters) to the test's output.
fn show_report(console: &str) {
    for l in console
        .lines()
        .filter(|l| l.starts_with("HOST") || l.starts_with("API "))
    {
        eprintln!("{}", &l[..l.len().min(300)]);
    }
}

/// The whole rest of the line `KEY=...` (values with spaces).
fn line<'a>(console: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}=");
    console
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {key} in the output"))
}

fn number(console: &str, key: &str) -> u32 {
    let text = value(console, key);
    let digits: String = text
        .trim_start_matches(|c: char| !c.is_ascii_digit())
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("{key}: {:?}", value(console, key)))
}

#[test]
fn a_snapshot_restored_goes_on_counting_with_its_disk_and_network_and_clones_run_side_by_side() {
    goes_on_counting_and_clones_run_side_by_side("", CMDLINE);
}

/// The same on virtio-pci: the restored functions' MSI-X routes and
/// notifications are set up again from the state.
#[test]
fn a_snapshot_on_virtio_pci_goes_on_counting_with_its_disk_and_network() {
    let cmdline = CMDLINE.replace(" pci=off", "");
    goes_on_counting_and_clones_run_side_by_side("--enable-pci", &cmdline);
}

/// The test above, with `flags` on the first moat (API mode) and
/// `cmdline` for its guest.
fn goes_on_counting_and_clones_run_side_by_side(flags: &str, cmdline: &str) {
    let host = format!(
        r#"{API_PRELUDE}{HOST_TAP_SETUP}
dir=/tmp/moat-snap-$$; mkdir -p $dir
disk=$dir/disk.img; truncate -s 1M $disk
state=$dir/vm.state; mem=$dir/vm.mem
last_tick() {{ grep -o 'TICK-[0-9]*' "$1" | tail -1 | cut -d- -f2; }}
wait_for() {{ # FILE TEXT PID
    i=0; until grep -q "$2" "$1"; do
        kill -0 $3 2>/dev/null || return 1
        i=$((i+1)); [ $i -ge 1200 ] && return 1
        sleep 0.1
    done
}}
start_moat --api-sock "$sock" {flags}
api PUT /boot-source "{{\"kernel_image_path\": \"$kernel\", \"initrd_path\": \"$initrd\", \"boot_args\": \"{cmdline}\"}}"
# The disk's requests go through io_uring (io_engine Async): the snapshot
# waits for those in flight, and the restored disks use the engine too.
api PUT /drives/data "{{\"drive_id\": \"data\", \"path_on_host\": \"$disk\", \"is_root_device\": false, \"is_read_only\": false, \"io_engine\": \"Async\"}}"
api PUT /network-interfaces/eth0 '{{"iface_id": "eth0", "guest_mac": "06:00:c0:00:02:02", "host_dev_name": "moatsnap0"}}'
api PUT /machine-config '{{"vcpu_count": 1, "mem_size_mib": 128}}'
api PUT /actions '{{"action_type": "InstanceStart"}}'
(moat=$pid; tap_up moatsnap0 192.0.2.1)
# The TAP goes with the moat that made it; the next one makes it again,
# with the same address, as an operator's persistent TAP would keep it
# (else the guest's ARP cache holds a dead address for a minute).
ip link set moatsnap0 address 02:00:c0:00:02:01
# A ping from tick 10 on has come back, and the guest has counted to 20.
# (Waiting for "PING-OK-20." matched tick 20's ping, or else tick 1020's:
# one ping lost while the rig was loaded once cost 100 s and the run.)
{{ until_console 'PING-OK-[1-9][0-9]*\.' && until_console 'TICK-2[0-9]'; }} ||
    echo "HOST: the guest never pinged" >>"$report"
api PATCH /vm '{{"state": "Paused"}}'
api PUT /snapshot/create "{{\"snapshot_path\": \"$state\", \"mem_file_path\": \"$mem\"}}"
api PUT /snapshot/create "{{\"snapshot_path\": \"$state.diff\", \"mem_file_path\": \"$mem.diff\", \"snapshot_type\": \"Diff\"}}"
kill -9 $pid; wait $pid; wait $tee
# The last tick the paused guest printed, from its whole console (a look
# while the rig is loaded may come before the last line is through).
echo "HOST-SNAPSHOT-TICK=$(last_tick $console)" >>"$report"
echo "HOST-STATE-BYTES=$(stat -c %s $state)" >>"$report"
echo "HOST-STATE-ASYNC=$(grep -a -o '"io_async":[a-z]*' $state)" >>"$report"
echo "HOST-STATE-TRANSPORT=$(grep -a -o '"transport":"[a-z]*"' $state)" >>"$report"
echo "HOST-MEM-BLOCKS=$(du -k $mem | cut -f1)" >>"$report"
cp $disk $dir/clone1.img; cp $disk $dir/clone2.img

# Bad snapshots: one line on stderr, status 2.
bad() {{ # NAME ARGS...
    name=$1; shift
    "$moat" run "$@" >/dev/null 2>$dir/err </dev/null; rc=$?
    echo "HOST-BAD-$name=$rc $(wc -l <$dir/err) $(head -c 300 $dir/err)" >>"$report"
}}
head -c 100 $state >$dir/short.state
cp $state $dir/corrupt.state; printf 'X' | dd of=$dir/corrupt.state bs=1 seek=2000 conv=notrunc 2>/dev/null
cp $state $dir/version.state; printf '\011' | dd of=$dir/version.state bs=1 seek=8 conv=notrunc 2>/dev/null
head -c 4096 $mem >$dir/short.mem
truncate -s 512K $dir/small.img
bad truncated --restore state=$dir/short.state,memory=$mem
bad corrupt --restore state=$dir/corrupt.state,memory=$mem
bad version --restore state=$dir/version.state,memory=$mem
bad no-memory --restore state=$state,memory=$dir/nonexistent.mem
bad short-memory --restore state=$state,memory=$dir/short.mem
bad no-disk --restore state=$state,memory=$mem --disk path=$dir/nonexistent.img
bad disk-size --restore state=$state,memory=$mem --disk path=$dir/small.img
bad with-kernel --restore state=$state,memory=$mem --kernel "$kernel"

# The restore: the same disk and TAP; it must go on counting, writing and
# pinging.
console=$dir/restored.log
rm -f /tmp/moat-fifo-$$
start_moat run --restore state=$state,memory=$mem --shutdown-timeout 60
(moat=$pid; tap_up moatsnap0 192.0.2.1 2>/dev/null)
ip link set moatsnap0 address 02:00:c0:00:02:01
a=$(grep HOST-SNAPSHOT-TICK "$report" | cut -d= -f2)
until_console "TICK-$((a + 80))" || echo "HOST: the restored guest did not count on" >>"$report"
kill -TERM $pid
wait_moat 120; echo "HOST-RESTORED-STATUS=$?" >>"$report"
wait $tee
echo "HOST-RESTORED-FIRST=$(grep -m1 -o 'TICK-[0-9]*' $console)" >>"$report"
echo "HOST-RESTORED-LAST=$(last_tick $console)" >>"$report"
echo "HOST-RESTORED-PING=$(grep -o 'PING-OK-[0-9]*' $console | head -1)" >>"$report"
echo "HOST-DISK=$(tr -d '\000' <$disk | tr '\n' ' ')" >>"$report"

# Two clones at once, each with its own disk copy and TAP: one restored by
# `moat run --restore`, one through the API's PUT /snapshot/load (with
# Firecracker's body; drives keep their paths there, so the second copy
# is put at the snapshot's disk path first).
cp $dir/clone2.img $disk
"$moat" run --restore state=$state,memory=$mem --disk path=$dir/clone1.img \
    --net tap=moatclone1 --shutdown-timeout 60 >$dir/clone1.log 2>&1 </dev/null &
clone1=$!
sock2=$dir/api2.sock
"$moat" --api-sock $sock2 >$dir/clone2.log 2>&1 </dev/null &
clone2=$!
i=0; until [ -S $sock2 ] || [ $i -ge 200 ]; do sleep 0.05; i=$((i+1)); done
load=$(curl -s -o $dir/load.out -w '%{{http_code}}' --max-time 60 --unix-socket $sock2 -X PUT \
    -d "{{\"snapshot_path\": \"$state\", \"mem_backend\": {{\"backend_type\": \"File\", \"backend_path\": \"$mem\"}}, \"resume_vm\": true, \"network_overrides\": [{{\"iface_id\": \"eth0\", \"host_dev_name\": \"moatclone2\"}}]}}" \
    http://localhost/snapshot/load)
echo "HOST-LOAD=$load $(cat $dir/load.out)" >>"$report"
for n in 1 2; do
    eval p=\$clone$n
    wait_for $dir/clone$n.log "TICK-$((a + 30))" $p || echo "HOST: clone $n did not count on" >>"$report"
done
kill -TERM $clone1
curl -s --max-time 60 --unix-socket $sock2 -X PUT -d '{{"action_type": "SendCtrlAltDel"}}' http://localhost/actions
for n in 1 2; do
    eval p=\$clone$n
    stop_if_stuck $p 120; wait $p; echo "HOST-CLONE$n-STATUS=$?" >>"$report"
    echo "HOST-CLONE$n-FIRST=$(grep -m1 -o 'TICK-[0-9]*' $dir/clone$n.log)" >>"$report"
done
echo "HOST-CLONE1-DISK=$(tr -d '\000' <$dir/clone1.img | tr '\n' ' ')" >>"$report"
echo "HOST-CLONE2-DISK=$(tr -d '\000' <$disk | tr '\n' ' ')" >>"$report"
cat "$report"
"#
    );
    let out = Guest::vmlinux()
        .script(GUEST)
        .host_file("/usr/bin/curl")
        .host_script(&host)
        .run()
        .unwrap();
    let c = &out.console;
    show_report(c);
    let status = |method: &str, path: &str| -> Vec<u16> {
        let prefix = format!("API {method} {path} -> ");
        c.lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|rest| rest.split(' ').next()?.parse().ok())
            .collect()
    };
    assert_eq!(status("PATCH", "/vm"), [204], "{}", out.tail(60));
    // A full snapshot is taken; a diff one is refused.
    assert_eq!(
        status("PUT", "/snapshot/create"),
        [204, 400],
        "{}",
        out.tail(60)
    );
    for complaint in ["the guest never pinged", "did not count on"] {
        assert!(!c.contains(complaint), "{complaint}: {}", out.tail(60));
    }
    let snapshot_tick = number(c, "HOST-SNAPSHOT-TICK");
    assert!(snapshot_tick >= 20, "{}", out.tail(60));
    assert!(number(c, "HOST-STATE-BYTES") > 10_000, "{}", out.tail(60));
    assert_eq!(
        value(c, "HOST-STATE-ASYNC"),
        "\"io_async\":true",
        "the snapshot's disk records its engine"
    );
    let transport = if flags.is_empty() { "mmio" } else { "pci" };
    assert_eq!(
        value(c, "HOST-STATE-TRANSPORT"),
        format!("\"transport\":\"{transport}\""),
        "the snapshot records the transport"
    );
    // 128 MiB of RAM, most of it never touched: holes.
    assert!(number(c, "HOST-MEM-BLOCKS") < 100_000, "{}", out.tail(60));

    for bad in [
        "truncated",
        "corrupt",
        "version",
        "no-memory",
        "short-memory",
        "no-disk",
        "disk-size",
        "with-kernel",
    ] {
        let said = line(c, &format!("HOST-BAD-{bad}"));
        assert!(said.starts_with("2 1 moat: "), "{bad}: {said}");
    }
    assert!(line(c, "HOST-BAD-version").contains("version 9"));
    assert!(line(c, "HOST-BAD-corrupt").contains("checksum"));
    assert!(line(c, "HOST-BAD-disk-size").contains("bytes"));

    // The restored guest went on from the tick it was paused at (the first
    // it prints is the next one, or the paused one if it was mid-line),
    // wrote on, pinged the host, and powered off when asked.
    assert_eq!(value(c, "HOST-RESTORED-STATUS"), "0", "{}", out.tail(60));
    let first = number(c, "HOST-RESTORED-FIRST");
    assert!(
        first == snapshot_tick || first == snapshot_tick + 1,
        "paused at {snapshot_tick}, restored at {first}"
    );
    let last = number(c, "HOST-RESTORED-LAST");
    assert!(last >= snapshot_tick + 80, "{}", out.tail(60));
    // The network works at once: the first ping after the restore (every
    // tenth tick) is answered, or the second.
    let ping = number(c, "HOST-RESTORED-PING");
    assert!(
        ping > snapshot_tick && ping <= snapshot_tick + 20,
        "paused at {snapshot_tick}, first ping answered at {ping}"
    );
    let disk = counts(line(c, "HOST-DISK"));
    assert!(disk.len() as u32 >= last, "{disk:?}");
    assert!(
        disk.iter().enumerate().all(|(i, n)| *n == i as u32),
        "the disk's counts are not 0, 1, 2, ...: {disk:?}"
    );
    assert!(
        line(c, "HOST-LOAD").starts_with("204"),
        "{}",
        line(c, "HOST-LOAD")
    );
    for n in [1, 2] {
        assert_eq!(
            value(c, &format!("HOST-CLONE{n}-STATUS")),
            "0",
            "{}",
            out.tail(60)
        );
        let first = number(c, &format!("HOST-CLONE{n}-FIRST"));
        assert!(
            first == snapshot_tick || first == snapshot_tick + 1,
            "clone {n}: {first}"
        );
        let disk = counts(line(c, &format!("HOST-CLONE{n}-DISK")));
        assert!(
            disk.len() as u32 >= snapshot_tick + 30,
            "clone {n}: {disk:?}"
        );
        assert!(
            disk.iter().enumerate().all(|(i, k)| *k == i as u32),
            "clone {n}: {disk:?}"
        );
    }
}

/// Two vCPUs, each counting in its own pinned loop (CPU0-i, CPU1-i); a
/// vsock connection to the host that stays open and idle (the guest has
/// sent HELLO and its end of file, the host sends nothing and keeps its
/// end open), so only a reset ends it; then a new connection.
const TWO_CPU_GUEST: &str = "echo CPUS-$(nproc); \
    for c in 0 1; do \
        taskset -c $c sh -c \"i=0; while [ \\$i -lt 3000 ]; do echo CPU$c-\\$i; i=\\$((i+1)); sleep 0.1; done\" & \
    done; \
    echo HELLO | vsock 2 5000; echo VSOCK-ENDED-$?; \
    echo AFTER | vsock 2 5001; echo VSOCK-AGAIN-$?; \
    wait";

#[test]
fn a_two_vcpu_guest_restored_in_a_jail_runs_on_both_and_sees_its_vsock_connection_reset() {
    let tool = image("VSOCK_TOOL");
    let host = format!(
        r#"{API_PRELUDE}{JOINED}
VSOCK={}
dir=/tmp/moat-snap2-$$; mkdir -p $dir
vs=$dir/v.sock; state=$dir/vm.state; mem=$dir/vm.mem
last() {{ grep -o "$2-[0-9]*" "$1" | tail -1 | cut -d- -f2; }}
# The host's end of the guest's connection: silent, and open until the end.
sleep 100000 | $VSOCK -U ${{vs}}_5000 >$dir/from-guest 2>$dir/listen1 &
until grep -q listening $dir/listen1; do sleep 0.1; done
start_moat --api-sock "$sock"
api PUT /boot-source "{{\"kernel_image_path\": \"$kernel\", \"initrd_path\": \"$initrd\", \"boot_args\": \"{CMDLINE}\"}}"
api PUT /machine-config '{{"vcpu_count": 2, "mem_size_mib": 128}}'
api PUT /vsock "{{\"guest_cid\": 3, \"uds_path\": \"$vs\"}}"
api PUT /actions '{{"action_type": "InstanceStart"}}'
until_console CPU1-10 || echo "HOST: the second CPU never counted" >>"$report"
i=0; until grep -q HELLO $dir/from-guest || [ $i -ge 600 ]; do sleep 0.1; i=$((i+1)); done
echo "HOST-GOT=$(cat $dir/from-guest)" >>"$report"
api PATCH /vm '{{"state": "Paused"}}'
api PUT /snapshot/create "{{\"snapshot_path\": \"$state\", \"mem_file_path\": \"$mem\"}}"
kill -9 $pid; wait $pid; wait $tee
# What the paused guest printed last, from its whole console.
echo "HOST-SNAPSHOT-CPU0=$(last $console CPU0)" >>"$report"
echo "HOST-SNAPSHOT-CPU1=$(last $console CPU1)" >>"$report"
echo "HOST-ENDED-BEFORE=$(grep -c VSOCK-ENDED $console)" >>"$report"

# The restored moat runs jailed, as nobody: the listener it connects to
# for the guest must let nobody in.
(umask 0; exec $VSOCK -U ${{vs}}_5001 >$dir/again 2>$dir/listen2 </dev/null) &
until grep -q listening $dir/listen2; do sleep 0.1; done
paused=$console
console=$dir/restored.log
rm -f /tmp/moat-fifo-$$
mkdir $dir/jail
start_moat run --restore state=$state,memory=$mem --shutdown-timeout 60 \
    --jail $dir/jail --uid 65534 --gid 65534
until_console VSOCK-AGAIN || echo "HOST: the restored guest did not connect again" >>"$report"
jailed=$(grep -l "^PPid:[[:space:]]*$pid\$" /proc/[0-9]*/status 2>/dev/null | head -1)
echo "HOST-JAILED-UID=$(awk '/^Uid:/ {{print $2}}' $jailed)" >>"$report"
echo "HOST-JAILED-SECCOMP=$(awk '/^Seccomp:/ {{print $2}}' $jailed)" >>"$report"
a=$(grep HOST-SNAPSHOT-CPU0 "$report" | cut -d= -f2)
b=$(grep HOST-SNAPSHOT-CPU1 "$report" | cut -d= -f2)
until_console "CPU0-$((a + 30))" && until_console "CPU1-$((b + 30))" \
    || echo "HOST: a restored CPU did not count on" >>"$report"
kill -TERM $pid
wait_moat 120; echo "HOST-RESTORED-STATUS=$?" >>"$report"
wait $tee
echo "HOST-PAUSED-END=$(paused_end)" >>"$report"
echo "HOST-RESTORED-JOINED=$(joined $console)" >>"$report"
echo "HOST-ENDED=$(grep -o 'VSOCK-ENDED-[0-9]*' $console)" >>"$report"
echo "HOST-AGAIN=$(cat $dir/again)" >>"$report"
cat "$report"
"#,
        tool.display()
    );
    let out = Guest::vmlinux()
        .script(TWO_CPU_GUEST)
        .host_file("/usr/bin/curl")
        .host_file(&tool)
        .host_script(&host)
        .run()
        .unwrap();
    let c = &out.console;
    show_report(c);
    for complaint in ["never counted", "did not connect again", "did not count on"] {
        assert!(!c.contains(complaint), "{complaint}: {}", out.tail(60));
    }
    assert!(c.contains("CPUS-2"), "{}", out.tail(60));
    assert_eq!(value(c, "HOST-GOT"), "HELLO", "{}", out.tail(60));
    // Both CPUs go on from where they were paused.
    for cpu in [0, 1] {
        assert_continues(
            line(c, "HOST-PAUSED-END"),
            line(c, "HOST-RESTORED-JOINED"),
            &format!("CPU{cpu}-"),
        );
    }
    // The restore ran in the jail, as nobody, filtered.
    assert_eq!(value(c, "HOST-JAILED-UID"), "65534", "{}", out.tail(60));
    assert_eq!(value(c, "HOST-JAILED-SECCOMP"), "2", "{}", out.tail(60));
    // The connection the guest held was reset by the restore (its read
    // ended), and a new one went through.
    assert_eq!(value(c, "HOST-ENDED"), "VSOCK-ENDED-0", "{}", out.tail(60));
    assert_eq!(value(c, "HOST-ENDED-BEFORE"), "0", "{}", out.tail(60));
    assert_eq!(value(c, "HOST-AGAIN"), "AFTER", "{}", out.tail(60));
    assert_eq!(value(c, "HOST-RESTORED-STATUS"), "0", "{}", out.tail(60));
}
