//! The VM benchmark's guest I/O rows: the same guest under moat and each
//! peer, with a virtio-blk disk and a virtio-net card on a TAP, times in
//! the guest:
//!
//! - block: `dd` of 32 MiB to and from the raw disk with O_DIRECT, in
//!   1 MiB and in 4 KiB requests (so every request reaches the device);
//! - network: 64 MiB host -> guest (busybox wget from a server in this
//!   process) and guest -> host (busybox nc to a sink in this process).
//!
//! The guest is the test kernel and initramfs with the script below as
//! its /test.sh; each figure comes from /proc/uptime (10 ms steps). Every
//! VMM's disk is a file of its own in the temporary directory, read and
//! written through the host's page cache (moat and Firecracker do so;
//! QEMU with its default cache=writeback).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    cloud_hypervisor_vm, firecracker_vm, temp_file, watch, Peer, PeerKind, Setup, CMDLINE,
};

/// Guest memory of the I/O guest (the test initramfs runs from it).
const IO_GUEST_MIB: u64 = 256;
/// The disk: larger than what the guest writes.
const DISK_MIB: u64 = 64;
/// Bytes moved each way over TCP.
const NET_BYTES: u64 = 64 << 20;
/// The host's and the guest's addresses on the TAP (RFC 5737).
const HOST_IP: &str = "192.0.2.1";
const GUEST_IP: &str = "192.0.2.2";
/// The host's HTTP server (host -> guest) and sink (guest -> host).
const HTTP_PORT: u16 = 8080;
const SINK_PORT: u16 = 5001;
/// One I/O run may take this long (under moat it takes about 2 minutes in
/// the rig).
pub(super) const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// The guest's /test.sh: prints IO-<KEY>-MS=<ms> for each figure.
const GUEST_SCRIPT: &str = r#"
ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }
timed() {
    t0=$(ms); eval "$2" >/dev/null 2>&1 || { echo "IO-FAILED $1"; exit 1; }; t1=$(ms)
    echo "IO-$1-MS=$((t1-t0))"
}
timed BLK-W1M 'dd if=/dev/zero of=/dev/vda bs=1M count=32 oflag=direct'
timed BLK-R1M 'dd if=/dev/vda of=/dev/null bs=1M count=32 iflag=direct'
timed BLK-W4K 'dd if=/dev/zero of=/dev/vda bs=4k count=8192 oflag=direct'
timed BLK-R4K 'dd if=/dev/vda of=/dev/null bs=4k count=8192 iflag=direct'
ip addr add @GUEST@/26 dev eth0 && ip link set eth0 up || exit 1
i=0; until wget -q -O /dev/null http://@HOST@:@HTTP@/ready 2>/dev/null; do
    i=$((i+1)); [ $i -ge 300 ] && { echo "IO-FAILED host unreachable"; exit 1; }; sleep 0.2
done
timed NET-RX 'wget -q -O /dev/null http://@HOST@:@HTTP@/blob'
timed NET-TX 'dd if=/dev/zero bs=64k count=@BLOCKS@ | nc @HOST@ @SINK@'
"#;

/// The figures, in the order the table shows them: (key in the guest's
/// output and in vm.json, what the row says).
pub const ROWS: [(&str, &str, &str); 6] = [
    (
        "BLK-W1M",
        "io_blk_write_1m_ms",
        "guest dd 32 MiB write, 1 MiB O_DIRECT",
    ),
    (
        "BLK-R1M",
        "io_blk_read_1m_ms",
        "guest dd 32 MiB read, 1 MiB O_DIRECT",
    ),
    (
        "BLK-W4K",
        "io_blk_write_4k_ms",
        "guest dd 32 MiB write, 4 KiB O_DIRECT",
    ),
    (
        "BLK-R4K",
        "io_blk_read_4k_ms",
        "guest dd 32 MiB read, 4 KiB O_DIRECT",
    ),
    (
        "NET-TX",
        "io_net_tx_ms",
        "64 MiB TCP guest -> host (busybox nc)",
    ),
    (
        "NET-RX",
        "io_net_rx_ms",
        "64 MiB TCP host -> guest (busybox wget)",
    ),
];

/// The test initramfs with the I/O script as /test.sh, written to `out`.
pub fn make_initramfs(base: &Path, out: &Path) -> Result<(), String> {
    let script = GUEST_SCRIPT
        .replace("@GUEST@", GUEST_IP)
        .replace("@HOST@", HOST_IP)
        .replace("@HTTP@", &HTTP_PORT.to_string())
        .replace("@SINK@", &SINK_PORT.to_string())
        .replace("@BLOCKS@", &(NET_BYTES / 65536).to_string());
    moat_tests::initramfs_with_script(base, &script, out)
}

/// Which VMM an I/O run boots.
#[derive(Clone, Copy)]
pub enum Vmm<'a> {
    Moat,
    Peer(&'a Peer),
}

impl Vmm<'_> {
    pub fn name(&self) -> &'static str {
        match self {
            Vmm::Moat => "moat",
            Vmm::Peer(p) => p.kind.title(),
        }
    }
}

/// One I/O run: the guest's figures in milliseconds, by key.
pub type Figures = Vec<(&'static str, f64)>;

/// Boots the I/O guest under `vmm` once; `tag` tells runs apart.
pub fn run(setup: &Setup, vmm: Vmm<'_>, tag: &str) -> Result<Figures, String> {
    let tap = format!("mbio{tag}");
    let disk = temp_file(&format!("io-{tag}"), "img");
    let file = std::fs::File::create(&disk).map_err(|e| format!("{}: {e}", disk.display()))?;
    file.set_len(DISK_MIB << 20)
        .map_err(|e| format!("{}: {e}", disk.display()))?;
    drop(file);
    let outcome = boot(setup, vmm, &tap, &disk, tag);
    let _ = std::fs::remove_file(&disk);
    let _ = std::fs::remove_file(temp_file(&format!("fc-io-{tag}"), "json"));
    let console = outcome?;
    let mut figures = Vec::new();
    for (key, _, _) in ROWS {
        let prefix = format!("IO-{key}-MS=");
        let value = console
            .lines()
            .find_map(|l| l.split_once(&prefix).map(|(_, v)| v))
            .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| format!("no {prefix} on the console:\n{}", tail(&console)))?;
        figures.push((key, value));
    }
    Ok(figures)
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The command booting the I/O guest under `vmm`.
fn command(setup: &Setup, vmm: Vmm<'_>, tap: &str, disk: &Path, tag: &str) -> Command {
    let initramfs = &setup.io_initramfs;
    match vmm {
        Vmm::Moat => moat(setup, &setup.moat, tap, disk),
        Vmm::Peer(peer) => match peer.kind {
            PeerKind::Baseline => moat(setup, &peer.path, tap, disk),
            PeerKind::Qemu => {
                let append = format!("{CMDLINE} reboot=t");
                let mut cmd = setup.qemu_vm(&peer.path, initramfs, IO_GUEST_MIB, &append);
                cmd.arg("-drive")
                    .arg(format!("id=d0,file={},format=raw,if=none", disk.display()))
                    .args(["-device", "virtio-blk-device,drive=d0", "-netdev"])
                    .arg(format!("tap,id=n0,ifname={tap},script=no,downscript=no"))
                    .args(["-device", "virtio-net-device,netdev=n0"]);
                cmd
            }
            PeerKind::Firecracker => {
                let drives = format!(
                    r#"[{{"drive_id": "d0", "path_on_host": "{}", "is_root_device": false, "is_read_only": false}}]"#,
                    disk.display()
                );
                let card = format!(
                    r#", "network-interfaces": [{{"iface_id": "n0", "host_dev_name": "{tap}"}}]"#
                );
                let boot_args = format!("{CMDLINE} reboot=k");
                let config =
                    setup.firecracker_config(initramfs, IO_GUEST_MIB, &boot_args, &drives, &card);
                firecracker_vm(&peer.path, &format!("fc-io-{tag}"), &config)
            }
            PeerKind::CloudHypervisor => {
                let mut cmd =
                    cloud_hypervisor_vm(setup, &peer.path, initramfs, IO_GUEST_MIB, CMDLINE);
                // Raw, said explicitly: a guessed raw image has sector 0
                // read-only.
                cmd.arg("--disk")
                    .arg(format!("path={},image_type=raw", disk.display()))
                    .arg("--net")
                    .arg(format!("tap={tap}"));
                cmd
            }
        },
    }
}

/// The command booting the I/O guest under the moat binary `moat`.
fn moat(setup: &Setup, moat: &Path, tap: &str, disk: &Path) -> Command {
    let cmdline = format!("{CMDLINE} reboot=k");
    let mut cmd = setup.moat_vm(moat, &setup.io_initramfs, IO_GUEST_MIB, &cmdline);
    cmd.arg("--disk")
        .arg(format!("path={}", disk.display()))
        .arg("--net")
        .arg(format!("tap={tap}"));
    cmd
}

/// Boots, serves the guest's network peer, and returns the console.
fn boot(setup: &Setup, vmm: Vmm<'_>, tap: &str, disk: &Path, tag: &str) -> Result<String, String> {
    let mut cmd = command(setup, vmm, tap, disk, tag);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("spawn {cmd:?}: {e}"))?;
    // Held open: QEMU's stdio chardev spins on end-of-file.
    let stdin = child.stdin.take();
    let (stdout, stderr, test_end) = watch(&mut child, b"MOAT-TEST-END")?;
    let stop = Arc::new(AtomicBool::new(false));
    let served = serve(tap, &stop, || matches!(child.try_wait(), Ok(None)));
    // Cloud Hypervisor boots the guest again when it reboots: it is
    // stopped once the test has ended (its line given time to arrive).
    let restarts = matches!(vmm, Vmm::Peer(p) if p.kind == PeerKind::CloudHypervisor);
    let mut test_ended = None;
    let mut stopped = false;
    let status = loop {
        if restarts && test_ended.is_none() && test_end.try_recv().is_ok() {
            test_ended = Some(Instant::now());
        }
        if test_ended.is_some_and(|at| at.elapsed() > Duration::from_millis(500)) {
            let _ = child.kill();
            stopped = true;
            break child.wait().map_err(|e| format!("wait: {e}"));
        }
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if started.elapsed() > RUN_TIMEOUT => {
                // What the VMM's threads do, twice: a vCPU that runs
                // (its CPU time grows) and one asleep in KVM tell a guest
                // spinning from one waiting for an interrupt.
                let first = threads(child.id());
                std::thread::sleep(Duration::from_secs(2));
                let second = threads(child.id());
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!(
                    "timed out after {} s; its threads (name state CPU-ticks wait-channel), 2 s apart:\n{first}\n{second}",
                    RUN_TIMEOUT.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => break Err(format!("wait: {e}")),
        }
    };
    stop.store(true, Ordering::SeqCst);
    let server_result = served.and_then(|threads| {
        threads
            .into_iter()
            .try_for_each(|t| t.join().map_err(|_| "a server thread panicked".to_string()))
    });
    drop(stdin);
    let out = String::from_utf8_lossy(&stdout.join().unwrap_or_default()).into_owned();
    let err = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
    let failed = |why: String| {
        format!(
            "I/O guest under {:?}: {why}\n--- console tail:\n{}\n--- stderr:\n{}",
            cmd.get_program(),
            tail(&out),
            tail(&err)
        )
    };
    let status = status.map_err(&failed)?;
    server_result.map_err(&failed)?;
    if !(status.success() || stopped) || !out.contains("MOAT-TEST-END rc=0") {
        return Err(failed(format!("ended with {status}")));
    }
    Ok(out)
}

/// One line per thread of `pid`: its name, state, user + system CPU ticks
/// and wait channel, from /proc.
fn threads(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("(no /proc/{pid}/task)");
    };
    let mut lines: Vec<String> = tasks
        .flatten()
        .map(|task| {
            let path = task.path();
            let read = |name: &str| std::fs::read_to_string(path.join(name)).unwrap_or_default();
            let stat = read("stat");
            // The fields after the name, which is in parentheses.
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
            let ticks: u64 = [11, 12]
                .iter()
                .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<u64>().ok()))
                .sum();
            format!(
                "  {} {} {ticks} {}",
                read("comm").trim(),
                fields.first().unwrap_or(&"?"),
                read("wchan").trim()
            )
        })
        .collect();
    lines.sort();
    lines.join("\n")
}

/// Once the VMM has made `tap`, gives it the host's address and starts the
/// HTTP server and the sink on it; they stop when `stop` is set.
fn serve(
    tap: &str,
    stop: &Arc<AtomicBool>,
    mut alive: impl FnMut() -> bool,
) -> Result<Vec<std::thread::JoinHandle<()>>, String> {
    let dev = PathBuf::from(format!("/sys/class/net/{tap}"));
    let waited = Instant::now();
    while !dev.exists() {
        if !alive() || waited.elapsed() > RUN_TIMEOUT {
            return Err(format!("the VMM never made TAP {tap}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for args in [
        vec!["addr", "add", &format!("{HOST_IP}/26"), "dev", tap],
        vec!["link", "set", tap, "up"],
    ] {
        let status = Command::new("ip")
            .args(&args)
            .status()
            .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
        if !status.success() {
            return Err(format!("ip {}: {status}", args.join(" ")));
        }
    }
    let listen = |port: u16| {
        let listener = TcpListener::bind((HOST_IP, port))
            .map_err(|e| format!("listen on {HOST_IP}:{port}: {e}"))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("listen on {HOST_IP}:{port}: {e}"))?;
        Ok::<_, String>(listener)
    };
    let http = listen(HTTP_PORT)?;
    let sink = listen(SINK_PORT)?;
    let stop_http = stop.clone();
    let stop_sink = stop.clone();
    Ok(vec![
        std::thread::spawn(move || accept_each(&http, &stop_http, http_reply)),
        std::thread::spawn(move || accept_each(&sink, &stop_sink, drain)),
    ])
}

/// Serves each connection to `listener` with `handle` until `stop`.
fn accept_each(listener: &TcpListener, stop: &AtomicBool, handle: fn(TcpStream)) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                // Both ways: a guest that dies mid-transfer must not hold
                // the run (and the joins after it) until TCP gives up.
                let _ = stream.set_read_timeout(Some(RUN_TIMEOUT));
                let _ = stream.set_write_timeout(Some(RUN_TIMEOUT));
                handle(stream);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// HTTP/1.0: `/blob` gets [`NET_BYTES`] zero bytes, anything else none.
fn http_reply(mut stream: TcpStream) {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let blob = request.starts_with(b"GET /blob ");
    let len = if blob { NET_BYTES } else { 0 };
    let header = format!("HTTP/1.0 200 OK\r\nContent-Length: {len}\r\n\r\n");
    if stream.write_all(header.as_bytes()).is_err() {
        return;
    }
    let chunk = vec![0u8; 1 << 16];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        if stream.write_all(&chunk[..n]).is_err() {
            return;
        }
        left -= n as u64;
    }
}

/// Reads [`NET_BYTES`] (or to the end), then closes: nc in the guest ends
/// when the host does, whatever it does at the end of its input.
fn drain(mut stream: TcpStream) {
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0u64;
    while got < NET_BYTES {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => got += n as u64,
        }
    }
}
