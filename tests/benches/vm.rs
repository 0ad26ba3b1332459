//! VM benchmarks with a real guest: start-up time, memory overhead and
//! launch rate of moat, and the same guest under peer VMMs side by side
//! (QEMU's microvm machine when it is installed, Firecracker and Cloud
//! Hypervisor when given);
//! then moat's snapshots of that guest: their size, the time to write one,
//! and the time from exec to a restored guest running against a cold boot
//! of the same guest.
//!
//!   cargo bench -p moat-tests --bench vm [-- --runs N --launches N
//!       --peer firecracker=PATH --peer cloud-hypervisor=PATH --peer qemu=PATH
//!       --peer baseline=PATH --no-qemu --transport pci]
//!
//! `--peer baseline=PATH` is another build of moat (say, of the commit
//! before a change), run like the others: the moat/baseline column is then
//! the change's effect, measured in one rig. `--no-qemu` leaves out QEMU,
//! which is otherwise found in PATH. `--transport pci` puts moat's devices
//! on virtio-pci (the baseline keeps virtio-mmio).
//!
//! The guest is the benchmark kernel + initramfs from build-images.sh: its
//! /init (resources/bench/init.c) writes moat's boot-timer port and a
//! console marker first thing, optionally sleeps, and reboots. Start-up
//! figures are medians over `--runs` boots (default 10), 1 vCPU, 128 MiB;
//! the launch rate times `--launches` VMs (default 10). Each run also
//! boots the guest in moat's API mode with /init waiting for a line on the
//! console, snapshots it (`PUT /snapshot/create`), kills that moat and
//! restores the snapshot with `moat run --restore`, typing the line at
//! once: the restored /init answers MOAT-BENCH-RESUMED.
//! Prints a table and writes target/bench/vm.json.
//!
//! On a host with hardware KVM everything runs here. Elsewhere (this
//! project's PVM hosts) the benchmark runs itself inside the test rig
//! (resources/rig.sh, an L1 VM under QEMU TCG with nested KVM): the same
//! measurements, but absolute times are those of a nested, emulated
//! machine; the ratios are what carries over. It runs there in parts, each
//! in an L1 of its own and tried up to three times: the boots (start-up,
//! memory, launch rate, snapshots), then each round of I/O runs (moat and
//! every peer once). An L1 that fails then costs one part, not the run;
//! the host puts the parts' figures together into the table.

use std::fmt::Write as _;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use moat_tests::{image, moat_bin, repo_root, Backend};

#[path = "vm/io.rs"]
mod io;

/// Guest memory for every VM in this benchmark.
const GUEST_MIB: u64 = 128;
/// How long a guest measured for memory stays up after its marker.
const HOLD_MS: u64 = 1500;
/// What the benchmark /init writes to COM1 (resources/bench/init.c).
const CONSOLE_MARKER: &[u8] = b"MOAT-BENCH-INIT";
/// What it writes once a line arrives, when told to wait for one.
const RESUMED_MARKER: &[u8] = b"MOAT-BENCH-RESUMED";
/// Any single boot taking longer than this is a failure.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// The one kernel command line, apart from how each VMM is told to reboot.
const CMDLINE: &str = "console=ttyS0 panic=1 i8042.noaux i8042.nokbd quiet";

/// Where the programs and images are (the same paths inside the rig).
#[derive(Clone, Debug)]
struct Setup {
    moat: PathBuf,
    kernel: PathBuf,
    initramfs: PathBuf,
    /// The test initramfs with the I/O rows' script (see [`io`]).
    io_initramfs: PathBuf,
    /// Boots of the I/O guest per VMM (0: no I/O rows).
    io_runs: usize,
    /// The VMMs measured beside moat, in column order.
    peers: Vec<Peer>,
    qemu_bios: PathBuf,
    runs: usize,
    launches: usize,
    /// MiB to write and free before each timed boot (see [`scrub`]).
    scrub_mib: usize,
    /// `--no-qemu`: no QEMU column even with QEMU in PATH.
    no_qemu: bool,
    /// `--transport pci`: moat's devices on virtio-pci (the baseline
    /// keeps its default, so `--peer baseline=` the same binary measures
    /// the transport).
    pci: bool,
}

impl Setup {
    fn args(&self) -> Vec<String> {
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let mut args = vec![
            "--moat".into(),
            path(&self.moat),
            "--kernel".into(),
            path(&self.kernel),
            "--initramfs".into(),
            path(&self.initramfs),
            "--io-initramfs".into(),
            path(&self.io_initramfs),
            "--io-runs".into(),
            self.io_runs.to_string(),
            "--qemu-bios".into(),
            path(&self.qemu_bios),
            "--runs".into(),
            self.runs.to_string(),
            "--launches".into(),
            self.launches.to_string(),
            "--scrub-mib".into(),
            self.scrub_mib.to_string(),
        ];
        for peer in &self.peers {
            args.extend([
                "--peer".into(),
                format!("{}={}", peer.kind.key(), path(&peer.path)),
            ]);
        }
        if self.no_qemu {
            args.push("--no-qemu".into());
        }
        if self.pci {
            args.extend(["--transport".into(), "pci".into()]);
        }
        args
    }

    /// Parses [`Setup::args`]' output (and the user's `--runs`, `--launches`).
    fn parse(args: &[String], mut setup: Setup) -> Result<Setup, String> {
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = || it.next().cloned().ok_or(format!("{arg} needs a value"));
            let count = |v: String| -> Result<usize, String> {
                v.parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or(format!("{arg} wants a positive whole number, not '{v}'"))
            };
            match arg.as_str() {
                "--moat" => setup.moat = value()?.into(),
                "--kernel" => setup.kernel = value()?.into(),
                "--initramfs" => setup.initramfs = value()?.into(),
                "--io-initramfs" => setup.io_initramfs = value()?.into(),
                "--io-runs" => {
                    let v = value()?;
                    setup.io_runs = v
                        .parse()
                        .map_err(|_| format!("--io-runs wants a whole number, not '{v}'"))?;
                }
                "--peer" => {
                    let peer = Peer::parse(&value()?)?;
                    // A peer given twice (or QEMU, found in PATH, given
                    // again) runs once, from the last path.
                    setup.peers.retain(|p| p.kind != peer.kind);
                    setup.peers.push(peer);
                }
                "--qemu-bios" => setup.qemu_bios = value()?.into(),
                "--no-qemu" => {
                    setup.peers.retain(|p| p.kind != PeerKind::Qemu);
                    setup.no_qemu = true;
                }
                "--transport" => {
                    setup.pci = match value()?.as_str() {
                        "pci" => true,
                        "mmio" => false,
                        other => return Err(format!("--transport: pci or mmio, not '{other}'")),
                    }
                }
                "--runs" => setup.runs = count(value()?)?,
                "--launches" => setup.launches = count(value()?)?,
                "--scrub-mib" => {
                    let v = value()?;
                    setup.scrub_mib = v
                        .parse()
                        .map_err(|_| format!("--scrub-mib wants a whole number, not '{v}'"))?;
                }
                // cargo bench passes --bench; --inside is ours.
                "--bench" | "--inside" => {}
                other => return Err(format!("unknown argument '{other}'")),
            }
        }
        Ok(setup)
    }

    fn moat(&self, hold_ms: u64) -> Command {
        self.moat_build(&self.moat, hold_ms)
    }

    /// [`Setup::moat`] with the moat binary `moat`.
    fn moat_build(&self, moat: &Path, hold_ms: u64) -> Command {
        let cmdline = format!("{CMDLINE} reboot=k -- {hold_ms}");
        let mut cmd = self.moat_vm(moat, &self.initramfs, GUEST_MIB, &cmdline);
        cmd.arg("--boot-timer");
        cmd
    }

    /// `moat run` (the binary `moat`) of this kernel with any initramfs,
    /// memory size and command line, 1 vCPU; the caller adds devices.
    fn moat_vm(&self, moat: &Path, initramfs: &Path, mib: u64, cmdline: &str) -> Command {
        let mut cmd = Command::new(moat);
        cmd.arg("run")
            .arg("--kernel")
            .arg(&self.kernel)
            .arg("--initramfs")
            .arg(initramfs)
            .args(["--cpus", "boot=1", "--memory"])
            .arg(format!("size={mib}M"))
            .arg("--cmdline")
            .arg(cmdline);
        if self.pci && moat == self.moat {
            cmd.args(["--transport", "pci"]);
        }
        cmd
    }

    /// moat in its API mode, booting the same guest from a config file
    /// while it serves the API on [`temp_file`]`(tag, "sock")`: what the
    /// API thread costs in memory, and the VM the snapshots are taken of.
    /// `init_arg` is the benchmark /init's argument: milliseconds to hold,
    /// or "wait".
    fn moat_api(&self, init_arg: &str, tag: &str) -> Command {
        let config = temp_file(tag, "json");
        let sock = temp_file(tag, "sock");
        let text = format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}", "initrd_path": "{}", "boot_args": "{CMDLINE} reboot=k -- {init_arg}"}}, "machine-config": {{"vcpu_count": 1, "mem_size_mib": {GUEST_MIB}}}}}"#,
            self.kernel.display(),
            self.initramfs.display()
        );
        std::fs::write(&config, text).unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
        let mut cmd = Command::new(&self.moat);
        cmd.arg("--api-sock")
            .arg(sock)
            .arg("--config-file")
            .arg(config)
            .arg("--boot-timer");
        if self.pci {
            cmd.arg("--enable-pci");
        }
        cmd
    }

    /// QEMU's microvm machine, configured as close to moat's machine as
    /// it goes: no ACPI, no option ROMs, no RTC, COM1 on stdio. It has no
    /// i8042, so the guest reboots by triple fault and -no-reboot ends QEMU.
    fn qemu(&self, qemu: &Path, hold_ms: u64) -> Command {
        let append = format!("{CMDLINE} reboot=t -- {hold_ms}");
        self.qemu_vm(qemu, &self.initramfs, GUEST_MIB, &append)
    }

    /// [`Setup::qemu`] for any initramfs, memory size and command line;
    /// the caller adds devices.
    fn qemu_vm(&self, qemu: &Path, initramfs: &Path, mib: u64, append: &str) -> Command {
        let mut cmd = Command::new(qemu);
        cmd.args([
            "-M",
            "microvm,acpi=off,x-option-roms=off,rtc=off",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-smp",
            "1",
            "-m",
        ])
        .arg(format!("{mib}M"))
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
            "-bios",
        ])
        .arg(&self.qemu_bios)
        .arg("-kernel")
        .arg(&self.kernel)
        .arg("-initrd")
        .arg(initramfs)
        .arg("-append")
        .arg(append);
        cmd
    }

    /// Firecracker without its API, from a config file: the same guest,
    /// COM1 on stdout. The guest reboots through the i8042 (reboot=k),
    /// which ends Firecracker, as it ends moat.
    fn firecracker(&self, firecracker: &Path, hold_ms: u64, tag: &str) -> Command {
        let boot_args = format!("{CMDLINE} reboot=k -- {hold_ms}");
        let config = self.firecracker_config(&self.initramfs, GUEST_MIB, &boot_args, "[]", "");
        firecracker_vm(firecracker, &format!("fc-{tag}"), &config)
    }

    /// A Firecracker config file's text for this kernel: `drives` is its
    /// JSON list, `more` any further members (each with a leading comma).
    fn firecracker_config(
        &self,
        initramfs: &Path,
        mib: u64,
        boot_args: &str,
        drives: &str,
        more: &str,
    ) -> String {
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}", "initrd_path": "{}", "boot_args": "{boot_args}"}}, "machine-config": {{"vcpu_count": 1, "mem_size_mib": {mib}}}, "drives": {drives}{more}}}"#,
            self.kernel.display(),
            initramfs.display()
        )
    }
}

/// Cloud Hypervisor booting this kernel with any initramfs, memory size
/// and command line, 1 vCPU, COM1 on stdout and no virtio console; the
/// caller adds devices. It restarts a guest that reboots and ends when the
/// guest powers off.
fn cloud_hypervisor_vm(
    setup: &Setup,
    path: &Path,
    initramfs: &Path,
    mib: u64,
    cmdline: &str,
) -> Command {
    let mut cmd = Command::new(path);
    cmd.arg("--kernel")
        .arg(&setup.kernel)
        .arg("--initramfs")
        .arg(initramfs)
        .arg("--cmdline")
        .arg(cmdline)
        .args(["--cpus", "boot=1", "--memory"])
        .arg(format!("size={mib}M"))
        .args(["--serial", "tty", "--console", "off"]);
    cmd
}

/// Firecracker booting from `config` (written to the temporary file of
/// `tag`), logging errors only. The launch rate starts Firecrackers from
/// the same file in parallel, so the file is replaced whole (written
/// beside it, then renamed over it): a Firecracker starting meanwhile
/// reads one complete config, never a truncated one.
fn firecracker_vm(firecracker: &Path, tag: &str, config: &str) -> Command {
    static WRITES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let path = temp_file(tag, "json");
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let partial = temp_file(&format!("{tag}-{n}"), "json.partial");
    std::fs::write(&partial, config)
        .and_then(|()| std::fs::rename(&partial, &path))
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    let mut cmd = Command::new(firecracker);
    cmd.arg("--no-api")
        .arg("--config-file")
        .arg(path)
        .args(["--level", "Error"]);
    cmd
}

/// A VMM the benchmark runs beside moat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PeerKind {
    Qemu,
    Firecracker,
    CloudHypervisor,
    /// Another build of moat.
    Baseline,
}

impl PeerKind {
    const ALL: [PeerKind; 4] = [
        PeerKind::Qemu,
        PeerKind::Firecracker,
        PeerKind::CloudHypervisor,
        PeerKind::Baseline,
    ];

    /// Its name in `--peer` and in vm.json.
    fn key(self) -> &'static str {
        match self {
            PeerKind::Qemu => "qemu",
            PeerKind::Firecracker => "firecracker",
            PeerKind::CloudHypervisor => "cloud-hypervisor",
            PeerKind::Baseline => "baseline",
        }
    }

    /// Its column heading.
    fn title(self) -> &'static str {
        match self {
            PeerKind::Qemu => "QEMU microvm",
            PeerKind::Firecracker => "Firecracker",
            PeerKind::CloudHypervisor => "Cloud Hypervisor",
            PeerKind::Baseline => "moat (baseline)",
        }
    }
}

#[derive(Clone, Debug)]
struct Peer {
    kind: PeerKind,
    path: PathBuf,
}

impl Peer {
    /// `KIND=PATH` of `--peer`.
    fn parse(arg: &str) -> Result<Peer, String> {
        let keys = || PeerKind::ALL.map(PeerKind::key).join(", ");
        let (key, path) = arg.split_once('=').ok_or_else(|| {
            format!(
                "--peer wants KIND=PATH (KIND one of {}), not '{arg}'",
                keys()
            )
        })?;
        let kind = PeerKind::ALL
            .into_iter()
            .find(|k| k.key() == key)
            .ok_or_else(|| format!("--peer: unknown VMM '{key}' (known: {})", keys()))?;
        if path.is_empty() {
            return Err(format!("--peer {key}= needs the path of its binary"));
        }
        Ok(Peer {
            kind,
            path: path.into(),
        })
    }

    /// The command that boots the benchmark guest, holding it `hold_ms`
    /// after its marker; `tag` names the run's temporary files.
    fn command(&self, setup: &Setup, hold_ms: u64, tag: &str) -> Command {
        match self.kind {
            PeerKind::Qemu => setup.qemu(&self.path, hold_ms),
            PeerKind::Firecracker => setup.firecracker(&self.path, hold_ms, tag),
            // The guest powers off rather than rebooting (see
            // [`cloud_hypervisor_vm`]).
            PeerKind::CloudHypervisor => {
                let cmdline = format!("{CMDLINE} -- {hold_ms} off");
                cloud_hypervisor_vm(setup, &self.path, &setup.initramfs, GUEST_MIB, &cmdline)
            }
            PeerKind::Baseline => setup.moat_build(&self.path, hold_ms),
        }
    }
}

/// A file of this benchmark's in the temporary directory.
fn temp_file(tag: &str, extension: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "moat-bench-{}-{tag}.{extension}",
        std::process::id()
    ))
}

fn monotonic_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only to `ts`, a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// One VM from exec to exit. Times are since the moment before spawn.
#[derive(Debug, Default)]
struct Launch {
    console_marker: Option<Duration>,
    /// From moat's --boot-timer line: first KVM_RUN and the port marker.
    first_run: Option<Duration>,
    port_marker: Option<Duration>,
    exit: Duration,
    /// KiB outside guest RAM when the marker was seen, and the most seen.
    rss_after_boot: Option<u64>,
    rss_peak: Option<u64>,
    /// Of `rss_after_boot`, the anonymous KiB: what each VM costs that no
    /// other process shares (the binary's pages are shared).
    anon_after_boot: Option<u64>,
    /// KiB of guest RAM resident when the marker was seen: what the guest
    /// touched, in the host pages that back it.
    guest_ram_after_boot: Option<u64>,
}

/// Reads a child's pipe to the end; reports the first time `marker` shows.
fn reader(
    mut pipe: impl Read + Send + 'static,
    marker: Option<&'static [u8]>,
    seen: mpsc::Sender<Instant>,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        let mut found = marker.is_none();
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            if let (false, Some(m)) = (found, marker) {
                let from = all.len().saturating_sub(n + m.len());
                if all[from..].windows(m.len()).any(|w| w == m) {
                    found = true;
                    let _ = seen.send(Instant::now());
                }
            }
        }
        all
    })
}

/// A child's stdout and stderr, each read to the end by a thread, and when
/// `marker` first showed on stdout.
type Watched = (
    std::thread::JoinHandle<Vec<u8>>,
    std::thread::JoinHandle<Vec<u8>>,
    mpsc::Receiver<Instant>,
);

fn watch(child: &mut Child, marker: &'static [u8]) -> Result<Watched, String> {
    let (marker_tx, marker_rx) = mpsc::channel();
    let stdout = reader(
        child.stdout.take().ok_or("no stdout")?,
        Some(marker),
        marker_tx.clone(),
    );
    let stderr = reader(child.stderr.take().ok_or("no stderr")?, None, marker_tx);
    Ok((stdout, stderr, marker_rx))
}

/// Resident and anonymous KiB of `pid` outside its guest RAM: the sums of
/// Rss and Anonymous over /proc/PID/smaps without the guest's RAM; and the
/// resident KiB of that RAM. Guest RAM is the run of adjacent anonymous
/// mappings of the guest's size (allowing QEMU's few pages of alignment):
/// more than one mapping where the VMM advised parts of it differently
/// (moat's huge pages), as the kernel splits a mapping there.
fn rss_without_guest(pid: u32) -> Result<(u64, u64, u64), String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map_err(|e| format!("read /proc/{pid}/smaps: {e}"))?;
    let guest_kib = GUEST_MIB * 1024;
    struct Mapping {
        start: u64,
        end: u64,
        anonymous: bool,
        rss: u64,
        anon_rss: u64,
    }
    let mut mappings: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if let Some((a, b)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let hex = |v: &str| u64::from_str_radix(v, 16).unwrap_or(0);
            let path = line.split_whitespace().nth(5).unwrap_or("");
            mappings.push(Mapping {
                start: hex(a),
                end: hex(b),
                anonymous: path.is_empty() || path.starts_with("[anon") || path == "/dev/zero",
                rss: 0,
                anon_rss: 0,
            });
        } else if let Some(last) = mappings.last_mut() {
            let mut kib = || {
                words
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            match first {
                "Rss:" => last.rss = kib(),
                "Anonymous:" => last.anon_rss = kib(),
                _ => {}
            }
        }
    }
    // The shortest run [i, j) of adjacent anonymous mappings that spans the
    // guest's size.
    let mut guest: Option<(usize, usize)> = None;
    for i in 0..mappings.len() {
        for j in i + 1..=mappings.len() {
            let m = &mappings[j - 1];
            if !m.anonymous || (j > i + 1 && mappings[j - 2].end != m.start) {
                break;
            }
            let kib = (m.end - mappings[i].start) / 1024;
            if (guest_kib..=guest_kib + 4096).contains(&kib)
                && guest.is_none_or(|(a, b)| j - i < b - a)
            {
                guest = Some((i, j));
            }
        }
    }
    let (first, last) = guest.ok_or(format!("pid {pid}: no {GUEST_MIB} MiB guest RAM mapping"))?;
    let (inside, outside): (Vec<_>, Vec<_>) = mappings
        .iter()
        .enumerate()
        .partition(|(i, _)| (first..last).contains(i));
    let sum = |v: &[(usize, &Mapping)], f: fn(&Mapping) -> u64| v.iter().map(|(_, m)| f(m)).sum();
    Ok((
        sum(&outside, |m| m.rss),
        sum(&outside, |m| m.anon_rss),
        sum(&inside, |m| m.rss),
    ))
}

/// Parses moat's `--boot-timer` line into (first KVM_RUN, marker) since
/// `spawned` on CLOCK_MONOTONIC.
fn boot_timer(stderr: &str, spawned: Duration) -> Option<(Duration, Duration)> {
    let line = stderr.lines().find(|l| l.contains("boot timer:"))?;
    let number_after = |key: &str| -> Option<f64> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.split_whitespace().next()?.parse().ok()
    };
    let start = Duration::from_secs_f64(number_after("CLOCK_MONOTONIC ")?);
    let offset = start.checked_sub(spawned)?;
    let at = |ms: f64| offset + Duration::from_secs_f64(ms / 1e3);
    Some((
        at(number_after("first KVM_RUN at ")?),
        at(number_after("guest marker at ")?),
    ))
}

/// Runs one VM to its end; with `sample_memory`, polls its smaps every few
/// milliseconds meanwhile.
fn launch(cmd: Command, sample_memory: bool) -> Result<Launch, String> {
    launch_until(cmd, sample_memory, CONSOLE_MARKER, b"")
}

/// [`launch`], timing `marker` on the console, with `input` typed on the
/// console right after spawn.
fn launch_until(
    mut cmd: Command,
    sample_memory: bool,
    marker: &'static [u8],
    input: &[u8],
) -> Result<Launch, String> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawned_mono = monotonic_now();
    let spawned = Instant::now();
    let mut child: Child = cmd.spawn().map_err(|e| format!("spawn {cmd:?}: {e}"))?;
    // Hold stdin open: QEMU's stdio chardev spins on end-of-file.
    let mut stdin = child.stdin.take();
    if let Some(pipe) = stdin.as_mut().filter(|_| !input.is_empty()) {
        std::io::Write::write_all(pipe, input).map_err(|e| format!("console input: {e}"))?;
    }
    let (stdout, stderr, marker_rx) = watch(&mut child, marker)?;
    let pid = child.id();
    let (exit_tx, exit_rx) = mpsc::channel::<(Instant, std::io::Result<ExitStatus>)>();
    std::thread::spawn(move || {
        let status = child.wait();
        let _ = exit_tx.send((Instant::now(), status));
    });

    let mut result = Launch::default();
    let mut sample_error = None;
    let (ended, status) = loop {
        let wait = if sample_memory {
            Duration::from_millis(5)
        } else {
            BOOT_TIMEOUT
        };
        match exit_rx.recv_timeout(wait) {
            Ok(done) => break done,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err("lost the VMM".into()),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Ok(at) = marker_rx.try_recv() {
            result.console_marker = Some(at - spawned);
            if sample_memory {
                match rss_without_guest(pid) {
                    Ok((kib, anon, guest)) => {
                        result.rss_after_boot = Some(kib);
                        result.anon_after_boot = Some(anon);
                        result.guest_ram_after_boot = Some(guest);
                    }
                    Err(e) => sample_error = Some(e),
                }
            }
        }
        if sample_memory {
            // Fails once the process is gone; the exit arrives next.
            if let Ok((kib, _, _)) = rss_without_guest(pid) {
                result.rss_peak = Some(result.rss_peak.unwrap_or(0).max(kib));
            }
        }
        if spawned.elapsed() > BOOT_TIMEOUT {
            // SAFETY: kill(2) on a pid we spawned and have not reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    };
    drop(stdin);
    if let Ok(at) = marker_rx.try_recv() {
        result.console_marker = Some(at - spawned);
    }
    result.exit = ended - spawned;
    let out = String::from_utf8_lossy(&stdout.join().unwrap_or_default()).into_owned();
    let err = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
    let status = status.map_err(|e| format!("wait: {e}"))?;
    let tail = |s: &str| {
        s.chars()
            .rev()
            .take(2000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<String>()
    };
    if !status.success() || result.console_marker.is_none() {
        return Err(format!(
            "{:?} ended with {status} after {:.1} s, marker {}\n--- console tail:\n{}\n--- stderr:\n{}",
            cmd.get_program(),
            result.exit.as_secs_f64(),
            if result.console_marker.is_some() { "seen" } else { "not seen" },
            tail(&out),
            tail(&err)
        ));
    }
    if let Some(e) = sample_error {
        return Err(e);
    }
    if let Some((first_run, marker)) = boot_timer(&err, spawned_mono) {
        result.first_run = Some(first_run);
        result.port_marker = Some(marker);
    }
    Ok(result)
}

/// Time from exec of `moat --api-sock` until its socket accepts a
/// connection (what an orchestrator waits for before configuring a VM).
fn api_socket_ready(setup: &Setup) -> Result<Duration, String> {
    let sock = std::env::temp_dir().join(format!("moat-bench-ready-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let started = Instant::now();
    let mut child = Command::new(&setup.moat)
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn moat --api-sock: {e}"))?;
    let ready = loop {
        if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
            break Ok(started.elapsed());
        }
        if started.elapsed() > BOOT_TIMEOUT {
            break Err("moat's API socket never accepted a connection".to_string());
        }
        std::thread::sleep(Duration::from_micros(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&sock);
    ready
}

/// A snapshot of the benchmark guest, taken while its /init waits for a
/// line on the console, and what taking it measured.
struct Snapshot {
    state: PathBuf,
    memory: PathBuf,
    /// exec -> /init marker on the console: the cold boot of this guest.
    cold_boot: Duration,
    /// How long `PUT /snapshot/create` took, the VM paused.
    create: Duration,
    state_bytes: u64,
    /// What the memory file takes on disk (zero pages are holes).
    memory_disk_bytes: u64,
}

impl Snapshot {
    fn remove(&self) {
        let _ = std::fs::remove_file(&self.state);
        let _ = std::fs::remove_file(&self.memory);
    }
}

/// Boots the guest in moat's API mode with /init waiting, pauses it,
/// snapshots it, and kills that moat.
fn take_snapshot(setup: &Setup, run: usize) -> Result<Snapshot, String> {
    let tag = format!("snap-{run}");
    let sock = temp_file(&tag, "sock");
    let state = temp_file(&tag, "state");
    let memory = temp_file(&tag, "mem");
    let _ = std::fs::remove_file(&sock);
    let mut cmd = setup.moat_api("wait", &tag);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawned = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("spawn {cmd:?}: {e}"))?;
    let (stdout, stderr, marker_rx) = watch(&mut child, CONSOLE_MARKER)?;
    let request = |method: &str, path: &str, body: &str| -> Result<(), String> {
        match moat_tests::api_request(&sock, method, path, body) {
            (204, _) => Ok(()),
            (status, reply) => Err(format!("{method} {path}: {status} {reply}")),
        }
    };
    let taken = marker_rx
        .recv_timeout(BOOT_TIMEOUT)
        .map_err(|_| "the guest to snapshot never showed its /init marker".to_string())
        .and_then(|at| {
            request("PATCH", "/vm", r#"{"state": "Paused"}"#)?;
            let started = Instant::now();
            request(
                "PUT",
                "/snapshot/create",
                &format!(
                    r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
                    state.display(),
                    memory.display()
                ),
            )?;
            let create = started.elapsed();
            let size = |path: &Path| {
                std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))
            };
            use std::os::unix::fs::MetadataExt;
            Ok(Snapshot {
                cold_boot: at - spawned,
                create,
                state_bytes: size(&state)?.len(),
                memory_disk_bytes: size(&memory)?.blocks() * 512,
                state: state.clone(),
                memory: memory.clone(),
            })
        });
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(temp_file(&tag, "json"));
    let out = stdout.join().unwrap_or_default();
    let err = stderr.join().unwrap_or_default();
    taken.map_err(|e| {
        format!(
            "snapshot: {e}\n--- console:\n{}\n--- stderr:\n{}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        )
    })
}

/// Restores `snapshot` with `moat run --restore` and types the line its
/// /init waits for: to the restored guest's answer on the console.
fn restore(setup: &Setup, snapshot: &Snapshot) -> Result<Launch, String> {
    let mut cmd = Command::new(&setup.moat);
    cmd.arg("run")
        .arg("--restore")
        .arg(format!(
            "state={},memory={}",
            snapshot.state.display(),
            snapshot.memory.display()
        ))
        .arg("--boot-timer");
    launch_until(cmd, false, RESUMED_MARKER, b"go\n")
}

/// Writes `mib` MiB of fresh memory, then frees it. In the rig this takes
/// a cost out of the next boot that belongs to the rig, not to the VMM:
/// the pages a finished guest ran from hold QEMU TCG's translated code,
/// and the first write to each such page after reuse is slow (TCG drops
/// its translations), which added up to 0.4-0.9 s to the next VMM's
/// kernel load. Without it the order of runs, not the VMM, decides much
/// of the start-up time.
fn scrub(mib: usize) {
    if mib == 0 {
        return;
    }
    let mut pages = vec![0u8; mib << 20];
    for i in (0..pages.len()).step_by(4096) {
        pages[i] = 1;
    }
    std::hint::black_box(&pages);
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// Medians over launches of one field, in milliseconds or KiB.
fn med_ms(runs: &[Launch], f: impl Fn(&Launch) -> Option<Duration>) -> Option<f64> {
    median(
        runs.iter()
            .filter_map(|r| f(r).map(|d| d.as_secs_f64() * 1e3))
            .collect(),
    )
}
fn med_kib(runs: &[Launch], f: impl Fn(&Launch) -> Option<u64>) -> Option<f64> {
    median(runs.iter().filter_map(|r| f(r).map(|k| k as f64)).collect())
}

/// VMs per second when `launches` VMs, each started by `vm()`, run
/// `parallel` at a time.
fn launch_rate(
    vm: &(dyn Fn() -> Command + Sync),
    launches: usize,
    parallel: usize,
) -> Result<f64, String> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..parallel)
            .map(|_| {
                s.spawn(|| -> Result<(), String> {
                    while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < launches {
                        launch(vm(), false)?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().map_err(|_| "a launcher panicked".to_string())?)
    })?;
    Ok(launches as f64 / started.elapsed().as_secs_f64())
}

/// `attempt`, and once more if it fails: in the rig a guest now and then
/// dies of the rig's own flakes (docs/testing.md), whichever VMM runs it.
/// The failure is printed with its console tail; a second one in a row
/// fails the run.
fn once_more<T>(what: &str, mut attempt: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    attempt().or_else(|e| {
        eprintln!("vm bench: {what} failed, once more: {e}");
        attempt()
    })
}

/// One table row: a figure for moat and for each peer (in
/// `Setup::peers`' order; `None` where it has no such figure).
struct Row {
    key: String,
    what: String,
    unit: String,
    moat: Option<f64>,
    peers: Vec<Option<f64>>,
}

impl Row {
    /// The row as a part run in the rig hands it to the host.
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "key": self.key,
            "what": self.what,
            "unit": self.unit,
            "moat": self.moat,
            "peers": self.peers,
        })
    }

    /// [`Row::to_json`]'s row.
    fn from_json(value: &serde_json::Value) -> Option<Row> {
        let text = |key: &str| value[key].as_str().map(str::to_string);
        Some(Row {
            key: text("key")?,
            what: text("what")?,
            unit: text("unit")?,
            moat: value["moat"].as_f64(),
            peers: value["peers"]
                .as_array()?
                .iter()
                .map(serde_json::Value::as_f64)
                .collect(),
        })
    }
}

/// The whole benchmark in this process: the launch rows, then the I/O
/// rounds; the table and the JSON.
fn measure(setup: &Setup, place: &str) -> Result<(String, serde_json::Value), String> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut rows = launch_rows(setup, cpus)?;
    let rounds: Vec<_> = (0..setup.io_runs).map(|r| io_round(setup, r)).collect();
    let (io, counted) = io_rows(setup, &rounds);
    rows.extend(io);
    Ok(render(setup, place, cpus, &rows, counted.as_deref()))
}

/// Start-up, memory, launch rate and snapshot rows: every boot but the
/// I/O guest's. `cpus` VMs at a time for the parallel launch rate.
fn launch_rows(setup: &Setup, cpus: usize) -> Result<Vec<Row>, String> {
    let mut moat_boots = Vec::new();
    let mut traced_boots = Vec::new();
    let mut moat_held = Vec::new();
    let peer_count = setup.peers.len();
    let mut peer_boots: Vec<Vec<Launch>> = (0..peer_count).map(|_| Vec::new()).collect();
    let mut peer_held: Vec<Vec<Launch>> = (0..peer_count).map(|_| Vec::new()).collect();
    let mut api_held = Vec::new();
    let mut api_ready = Vec::new();
    let mut snapshots = Vec::new();
    let mut restores = Vec::new();
    // Interleaved, so that drift in the machine hits every VMM alike.
    for run in 0..setup.runs {
        eprintln!("vm bench: boot {}/{}", run + 1, setup.runs);
        let timed = |cmd: &dyn Fn() -> Command, sample_memory: bool| {
            once_more("a boot", || {
                scrub(setup.scrub_mib);
                launch(cmd(), sample_memory)
            })
        };
        moat_boots.push(timed(&|| setup.moat(0), false)?);
        let traced = || {
            let mut traced = setup.moat(0);
            traced.arg("--trace-exits");
            traced
        };
        traced_boots.push(timed(&traced, false)?);
        moat_held.push(timed(&|| setup.moat(HOLD_MS), true)?);
        api_held.push(timed(
            &|| setup.moat_api(&HOLD_MS.to_string(), &run.to_string()),
            true,
        )?);
        api_ready.push(api_socket_ready(setup)?);
        scrub(setup.scrub_mib);
        let snapshot = take_snapshot(setup, run)?;
        scrub(setup.scrub_mib);
        let restored = restore(setup, &snapshot);
        snapshot.remove();
        restores.push(restored?);
        snapshots.push(snapshot);
        for (i, peer) in setup.peers.iter().enumerate() {
            let tag = run.to_string();
            peer_boots[i].push(timed(&|| peer.command(setup, 0, &tag), false)?);
            peer_held[i].push(timed(&|| peer.command(setup, HOLD_MS, &tag), true)?);
        }
    }
    // Firecracker's config files (see `Setup::firecracker`).
    for run in 0..setup.runs {
        let _ = std::fs::remove_file(temp_file(&format!("fc-{run}"), "json"));
    }
    eprintln!("vm bench: launch rate");
    // (one at a time, all CPUs at a time) for a VMM's command.
    let rates = |vm: &(dyn Fn() -> Command + Sync)| -> Result<(f64, Option<f64>), String> {
        let one = once_more("a launch rate", || launch_rate(vm, setup.launches, 1))?;
        let all = (cpus > 1)
            .then(|| once_more("a launch rate", || launch_rate(vm, setup.launches, cpus)))
            .transpose()?;
        Ok((one, all))
    };
    let moat_rates = rates(&|| setup.moat(0))?;
    let peer_rates = setup
        .peers
        .iter()
        .map(|peer| rates(&|| peer.command(setup, 0, "rate")))
        .collect::<Result<Vec<_>, String>>()?;
    let _ = std::fs::remove_file(temp_file("fc-rate", "json"));

    let none = || vec![None; peer_count];
    let of_peers = |launches: &[Vec<Launch>], f: &dyn Fn(&[Launch]) -> Option<f64>| {
        launches.iter().map(|l| f(l)).collect::<Vec<_>>()
    };

    type Field = fn(&Launch) -> Option<Duration>;
    let ms_rows: [(&'static str, &str, Field); 4] = [
        ("first_kvm_run_ms", "exec -> first KVM_RUN", |l| l.first_run),
        (
            "init_port_marker_ms",
            "exec -> /init marker, boot-timer port",
            |l| l.port_marker,
        ),
        (
            "init_console_marker_ms",
            "exec -> /init marker, seen on the console",
            |l| l.console_marker,
        ),
        ("exit_ms", "exec -> VMM exit (guest reboots at once)", |l| {
            Some(l.exit)
        }),
    ];
    let mut rows: Vec<Row> = ms_rows
        .into_iter()
        .map(|(key, what, f)| Row {
            key: key.into(),
            what: what.to_string(),
            unit: "ms".into(),
            moat: med_ms(&moat_boots, f),
            peers: of_peers(&peer_boots, &|l| med_ms(l, f)),
        })
        .collect();
    rows.push(Row {
        key: "exit_traced_ms".into(),
        what: "exec -> VMM exit, moat run --trace-exits".into(),
        unit: "ms".into(),
        moat: med_ms(&traced_boots, |l| Some(l.exit)),
        peers: none(),
    });
    let memory_row = |key: &str, what: &str, f: fn(&Launch) -> Option<u64>| Row {
        key: key.into(),
        what: what.to_string(),
        unit: "KiB".into(),
        moat: med_kib(&moat_held, f),
        peers: of_peers(&peer_held, &|l| med_kib(l, f)),
    };
    rows.extend([
        memory_row(
            "rss_after_boot_kib",
            "RSS without guest RAM, guest booted",
            |l| l.rss_after_boot,
        ),
        memory_row(
            "anon_after_boot_kib",
            "of which anonymous (not shared)",
            |l| l.anon_after_boot,
        ),
        memory_row(
            "guest_ram_after_boot_kib",
            "guest RAM resident, guest booted",
            |l| l.guest_ram_after_boot,
        ),
        memory_row(
            "rss_peak_kib",
            "peak RSS without guest RAM (5 ms samples)",
            |l| l.rss_peak,
        ),
    ]);
    rows.push(Row {
        key: "api_socket_ready_ms".into(),
        what: "exec -> API socket accepts (moat --api-sock)".into(),
        unit: "ms".into(),
        moat: median(api_ready.iter().map(|d| d.as_secs_f64() * 1e3).collect()),
        peers: none(),
    });
    rows.push(Row {
        key: "api_rss_after_boot_kib".into(),
        what: "RSS w/o guest RAM, booted, API served".into(),
        unit: "KiB".into(),
        moat: med_kib(&api_held, |l| l.rss_after_boot),
        peers: none(),
    });
    rows.push(Row {
        key: "launches_per_s_1".into(),
        what: format!("launch rate, 1 at a time ({} VMs)", setup.launches),
        unit: "VM/s".into(),
        moat: Some(moat_rates.0),
        peers: peer_rates.iter().map(|r| Some(r.0)).collect(),
    });
    if cpus > 1 {
        rows.push(Row {
            key: "launches_per_s_parallel".into(),
            what: format!("launch rate, {cpus} at a time ({} VMs)", setup.launches),
            unit: "VM/s".into(),
            moat: moat_rates.1,
            peers: peer_rates.iter().map(|r| r.1).collect(),
        });
    }
    let per_snapshot = |f: &dyn Fn(&Snapshot) -> f64| median(snapshots.iter().map(f).collect());
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let kib = |bytes: u64| bytes as f64 / 1024.0;
    let moat_only = |key: &str, what: &str, unit: &str, moat| Row {
        key: key.into(),
        what: what.to_string(),
        unit: unit.into(),
        moat,
        peers: none(),
    };
    rows.extend([
        moat_only(
            "snapshot_state_kib",
            "snapshot: state file",
            "KiB",
            per_snapshot(&|s| kib(s.state_bytes)),
        ),
        moat_only(
            "snapshot_memory_kib",
            &format!("snapshot: memory file on disk (of {GUEST_MIB} MiB)"),
            "KiB",
            per_snapshot(&|s| kib(s.memory_disk_bytes)),
        ),
        moat_only(
            "snapshot_create_ms",
            "snapshot: PUT /snapshot/create, VM paused",
            "ms",
            per_snapshot(&|s| ms(s.create)),
        ),
        moat_only(
            "snapshot_cold_boot_ms",
            "its guest's cold boot: exec -> /init, console",
            "ms",
            per_snapshot(&|s| ms(s.cold_boot)),
        ),
        moat_only(
            "restore_first_kvm_run_ms",
            "restore: exec -> first KVM_RUN",
            "ms",
            med_ms(&restores, |l| l.first_run),
        ),
        moat_only(
            "restore_running_ms",
            "restore: exec -> guest answers on the console",
            "ms",
            med_ms(&restores, |l| l.console_marker),
        ),
        // Paired run by run, so that drift cancels.
        moat_only(
            "restore_over_cold_boot",
            "restore to running / cold boot to /init",
            "ratio",
            median(
                snapshots
                    .iter()
                    .zip(&restores)
                    .filter_map(|(s, r)| Some(ms(r.console_marker?) / ms(s.cold_boot)))
                    .collect(),
            ),
        ),
    ]);

    Ok(rows)
}

/// The I/O guest under moat and each peer in turn, once: each VMM's
/// figures, or `None` where its run failed (reported, and left out).
fn io_round(setup: &Setup, round: usize) -> Vec<Option<io::Figures>> {
    let vmms = io_vmms(setup);
    let mut figures = Vec::with_capacity(vmms.len());
    for (i, vmm) in vmms.iter().enumerate() {
        eprintln!(
            "vm bench: I/O run {}/{} under {}",
            round + 1,
            setup.io_runs,
            vmm.name()
        );
        scrub(setup.scrub_mib);
        match io::run(setup, *vmm, &format!("{round}{i}")) {
            Ok(f) => figures.push(Some(f)),
            Err(e) => {
                eprintln!("vm bench: I/O run failed, left out: {e}");
                figures.push(None);
            }
        }
    }
    figures
}

/// moat, then the peers: the order of [`io_round`]'s figures.
fn io_vmms(setup: &Setup) -> Vec<io::Vmm<'_>> {
    std::iter::once(io::Vmm::Moat)
        .chain(setup.peers.iter().map(io::Vmm::Peer))
        .collect()
}

/// The I/O rows: medians over the rounds' figures that exist; and the line
/// that says how many counted (`None` without I/O rounds).
fn io_rows(setup: &Setup, rounds: &[Vec<Option<io::Figures>>]) -> (Vec<Row>, Option<String>) {
    if setup.io_runs == 0 {
        return (Vec::new(), None);
    }
    let vmms = io_vmms(setup);
    let runs_of = |i: usize| -> Vec<&io::Figures> {
        rounds
            .iter()
            .filter_map(|round| round.get(i)?.as_ref())
            .collect()
    };
    let io_median = |i: usize, key: &str| {
        median(
            runs_of(i)
                .iter()
                .filter_map(|f| f.iter().find(|(k, _)| *k == key).map(|(_, v)| *v))
                .collect(),
        )
    };
    let rows = io::ROWS
        .iter()
        .map(|&(key, json_key, what)| Row {
            key: json_key.into(),
            what: what.to_string(),
            unit: "ms".into(),
            moat: io_median(0, key),
            peers: (1..vmms.len()).map(|i| io_median(i, key)).collect(),
        })
        .collect();
    let counted: Vec<String> = vmms
        .iter()
        .enumerate()
        .map(|(i, vmm)| format!("{} {} of {}", vmm.name(), runs_of(i).len(), setup.io_runs))
        .collect();
    (
        rows,
        Some(format!(
            "I/O rows: medians of the runs that completed ({}).",
            counted.join(", ")
        )),
    )
}

/// The table and the JSON of `rows`; `counted` is [`io_rows`]' line.
fn render(
    setup: &Setup,
    place: &str,
    cpus: usize,
    rows: &[Row],
    counted: Option<&str>,
) -> (String, serde_json::Value) {
    let show = |v: Option<f64>, unit: &str| {
        v.map_or("-".to_string(), |v| match unit {
            "ratio" => format!("{v:.3}"),
            _ => format!("{v:.1}"),
        })
    };
    let mut table = String::new();
    let _ = writeln!(
        table,
        "VM benchmark ({place}; 1 vCPU, {GUEST_MIB} MiB; medians of {} runs{})",
        setup.runs,
        if setup.scrub_mib > 0 {
            format!("; {} MiB scrubbed before each", setup.scrub_mib)
        } else {
            String::new()
        }
    );
    let _ = write!(table, "{:<48} {:>6} {:>12}", "", "unit", "moat");
    for peer in &setup.peers {
        let _ = write!(
            table,
            " {:>12} {:>10}",
            peer.kind.title(),
            format!("moat/{}", peer.kind.key())
        );
    }
    table.push('\n');
    // Three decimals are plenty, and keep the file readable.
    let num = |v: Option<f64>| serde_json::json!(v.map(|v| (v * 1e3).round() / 1e3));
    let mut json_rows = Vec::new();
    for row in rows {
        let _ = write!(
            table,
            "{:<48} {:>6} {:>12}",
            row.what,
            row.unit,
            show(row.moat, &row.unit)
        );
        let mut json_row = serde_json::Map::new();
        json_row.insert("key".into(), row.key.clone().into());
        json_row.insert("unit".into(), row.unit.clone().into());
        json_row.insert("moat".into(), num(row.moat));
        for (peer, value) in setup.peers.iter().zip(&row.peers) {
            let ratio = row.moat.zip(*value).map(|(m, p)| m / p);
            let _ = write!(
                table,
                " {:>12} {:>10}",
                show(*value, &row.unit),
                ratio.map_or("-".to_string(), |r| format!("{r:.2}"))
            );
            let key = peer.kind.key();
            json_row.insert(key.into(), num(*value));
            json_row.insert(format!("moat_over_{key}"), num(ratio));
        }
        table.push('\n');
        json_rows.push(serde_json::Value::Object(json_row));
    }
    let json = serde_json::json!({
        "place": place,
        "guest_mib": GUEST_MIB,
        "runs": setup.runs,
        "launches": setup.launches,
        "parallel": cpus,
        "scrub_mib": setup.scrub_mib,
        "rows": json_rows,
    });
    if let Some(counted) = counted {
        let _ = writeln!(table, "{counted}");
    }
    table.push_str("moat/peer below 1 favours moat for times and sizes, above 1 for rates.\n");
    (table, json)
}

fn write_json(json: &serde_json::Value) {
    let dir = repo_root().join("target/bench");
    let out = dir.join("vm.json");
    let written =
        std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&out, format!("{json}\n")));
    match written {
        Ok(()) => println!("wrote {}", out.display()),
        Err(e) => eprintln!("vm bench: cannot write {}: {e}", out.display()),
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--inside") {
        // The results go to a disk of the rig's (`--json-out DISK`), not
        // to the console: L1's serial line once lost the end of the long
        // JSON line.
        let json_out = take_value(&mut args, "--json-out").map(PathBuf::from);
        // In the rig: every path comes on the command line.
        let empty = Setup {
            moat: PathBuf::new(),
            kernel: PathBuf::new(),
            initramfs: PathBuf::new(),
            io_initramfs: PathBuf::new(),
            io_runs: 0,
            peers: Vec::new(),
            qemu_bios: PathBuf::new(),
            runs: 0,
            launches: 0,
            scrub_mib: 0,
            no_qemu: false,
            pci: false,
        };
        let part = take_value(&mut args, "--part")
            .ok_or_else(|| "--inside needs --part".to_string())
            .and_then(|part| Part::parse(&part));
        let outcome = part.and_then(|part| {
            let setup = Setup::parse(&args, empty)?;
            run_part(&setup, part)
        });
        match outcome {
            Ok(json) => {
                let Some(out) = json_out else {
                    eprintln!("vm bench: --inside needs --json-out DISK");
                    std::process::exit(1);
                };
                if let Err(e) = write_results_disk(&out, &json) {
                    eprintln!(
                        "vm bench: cannot write the results to {}: {e}",
                        out.display()
                    );
                    std::process::exit(1);
                }
            }
            Err(e) => {
                eprintln!("vm bench: {e}");
                std::process::exit(1);
            }
        }
        return;
    }

    let setup = Setup {
        moat: moat_bin(),
        kernel: image("VMLINUX"),
        initramfs: image("BENCH_INITRAMFS"),
        io_initramfs: repo_root().join("target/bench/io-initramfs.cpio"),
        io_runs: 3,
        // Debian's QEMU build with only the microvm machine, else the full one.
        peers: find_in_path("qemu-system-x86_64-microvm")
            .or_else(|| find_in_path("qemu-system-x86_64"))
            .map(|path| Peer {
                kind: PeerKind::Qemu,
                path,
            })
            .into_iter()
            .collect(),
        qemu_bios: PathBuf::from("/usr/share/qemu/qboot.rom"),
        runs: 10,
        launches: 10,
        scrub_mib: 0,
        no_qemu: false,
        pci: false,
    };
    let setup = match Setup::parse(&args, setup) {
        Ok(setup) => setup,
        Err(e) => {
            eprintln!("vm bench: {e}");
            std::process::exit(2);
        }
    };
    if !setup.no_qemu && !setup.peers.iter().any(|p| p.kind == PeerKind::Qemu) {
        eprintln!(
            "vm bench: no qemu-system-x86_64 in PATH and no --peer qemu=PATH: no QEMU column"
        );
    }
    if let Some(missing) = setup.peers.iter().find(|p| !p.path.is_file()) {
        eprintln!(
            "vm bench: --peer {}={}: no such file",
            missing.kind.key(),
            missing.path.display()
        );
        std::process::exit(2);
    }
    if setup.io_runs > 0 {
        let made = std::fs::create_dir_all(repo_root().join("target/bench"))
            .map_err(|e| format!("create target/bench: {e}"))
            .and_then(|()| io::make_initramfs(&image("INITRAMFS"), &setup.io_initramfs));
        if let Err(e) = made {
            eprintln!("vm bench: {e}");
            std::process::exit(1);
        }
    }
    match Backend::detect() {
        Backend::Direct => match measure(&setup, "directly on this host's KVM") {
            Ok((table, json)) => {
                print!("{table}");
                write_json(&json);
            }
            Err(e) => {
                eprintln!("vm bench: {e}");
                std::process::exit(1);
            }
        },
        Backend::Rig => run_in_rig(&setup),
    }
}

/// One piece of the benchmark as it runs in the rig: each in its own L1,
/// so that an L1 failure (they come every 10-40 minutes of I/O; see
/// docs/testing.md) costs that piece, not the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    /// [`launch_rows`].
    Launches,
    /// [`io_round`] number N.
    IoRound(usize),
}

impl Part {
    fn arg(self) -> String {
        match self {
            Part::Launches => "launches".into(),
            Part::IoRound(n) => format!("io:{n}"),
        }
    }

    fn parse(arg: &str) -> Result<Part, String> {
        match arg.strip_prefix("io:") {
            None if arg == "launches" => Ok(Part::Launches),
            Some(n) => n
                .parse()
                .map(Part::IoRound)
                .map_err(|_| format!("bad --part {arg}")),
            None => Err(format!("bad --part {arg}")),
        }
    }
}

/// In L1: runs `part`, and returns its raw figures as JSON for the host
/// ([`parse_launches`], [`parse_round`]).
fn run_part(setup: &Setup, part: Part) -> Result<String, String> {
    let value = match part {
        Part::Launches => {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            let rows = launch_rows(setup, cpus)?;
            serde_json::json!({ "parallel": cpus, "rows": rows.iter().map(Row::to_json).collect::<Vec<_>>() })
        }
        Part::IoRound(round) => {
            let figures = io_round(setup, round);
            let runs: Vec<serde_json::Value> = figures
                .iter()
                .map(|f| {
                    f.as_ref().map_or(serde_json::Value::Null, |f| {
                        f.iter()
                            .map(|(k, v)| ((*k).to_string(), serde_json::json!(v)))
                            .collect()
                    })
                })
                .collect();
            serde_json::json!({ "io": runs })
        }
    };
    Ok(value.to_string())
}

/// Takes `flag` and the value after it out of `args`.
fn take_value(args: &mut Vec<String>, flag: &str) -> Option<String> {
    let i = args.iter().position(|a| a == flag)?;
    if i + 1 >= args.len() {
        return None;
    }
    let value = args.remove(i + 1);
    args.remove(i);
    Some(value)
}

fn parse_part_json(json: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(json).map_err(|e| format!("{e}: {json}"))
}

/// The launches part's JSON: how many VMs it launched at a time, its rows.
fn parse_launches(json: &str) -> Result<(usize, Vec<Row>), String> {
    let value = parse_part_json(json)?;
    let rows = value["rows"]
        .as_array()
        .ok_or_else(|| format!("no rows: {json}"))?
        .iter()
        .map(Row::from_json)
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| format!("a row without its fields: {json}"))?;
    let parallel = value["parallel"].as_u64().unwrap_or(1) as usize;
    Ok((parallel, rows))
}

/// An I/O round's JSON: [`io_round`]'s figures.
fn parse_round(json: &str) -> Result<Vec<Option<io::Figures>>, String> {
    let value = parse_part_json(json)?;
    let runs = value["io"]
        .as_array()
        .ok_or_else(|| format!("no I/O runs: {json}"))?;
    Ok(runs
        .iter()
        .map(|run| {
            let run = run.as_object()?;
            io::ROWS
                .iter()
                .map(|&(key, _, _)| Some((key, run.get(key)?.as_f64()?)))
                .collect()
        })
        .collect())
}

/// Runs this benchmark inside the rig, part by part, relaying what each
/// prints; then prints the table and writes the JSON here.
fn run_in_rig(setup: &Setup) {
    // The parts scrub L1's memory before each boot (see [`scrub`]); the
    // table and the JSON say so.
    let setup = &Setup {
        scrub_mib: 256,
        ..setup.clone()
    };
    let launches = run_part_in_rig(setup, Part::Launches).and_then(|json| parse_launches(&json));
    let (cpus, mut rows) = launches.unwrap_or_else(|e| {
        eprintln!("vm bench: {e}");
        std::process::exit(1);
    });
    let mut rounds = Vec::new();
    for round in 0..setup.io_runs {
        let part = Part::IoRound(round);
        match run_part_in_rig(setup, part).and_then(|json| parse_round(&json)) {
            Ok(figures) => rounds.push(figures),
            // A failed I/O round is left out, like a failed I/O run.
            Err(e) => eprintln!("vm bench: I/O round {} left out: {e}", part.arg()),
        }
    }
    let (io, counted) = io_rows(setup, &rounds);
    rows.extend(io);
    let place = "in the rig (nested: QEMU TCG L1, KVM in L1; one L1 per part)";
    let (table, json) = render(setup, place, cpus, &rows, counted.as_deref());
    print!("{table}");
    write_json(&json);
}

/// Runs `part` in the rig, three times at most, and returns its JSON.
fn run_part_in_rig(setup: &Setup, part: Part) -> Result<String, String> {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let mut cmd = Command::new(repo_root().join("resources/rig.sh"));
    cmd.args(["--timeout", "3600", "--mem", "2048", "--cpus", "2"]);
    let mut files = vec![&setup.moat, &setup.kernel, &setup.initramfs];
    // Made only for I/O rounds; QEMU's firmware only for QEMU.
    if setup.io_runs > 0 {
        files.push(&setup.io_initramfs);
    }
    if setup.peers.iter().any(|p| p.kind == PeerKind::Qemu) {
        files.push(&setup.qemu_bios);
    }
    files.extend(setup.peers.iter().map(|p| &p.path));
    for file in files {
        cmd.arg("--file").arg(file);
    }
    // The run in L1 writes its JSON to this file, L1's disk.
    let results = temp_file("results", "disk");
    cmd.arg("--disk").arg(&results);
    cmd.arg("--").arg(exe).arg("--inside").args(setup.args());
    cmd.args(["--part", &part.arg()]);
    cmd.arg("--json-out").arg(&results);
    cmd.stdin(Stdio::null()).stderr(Stdio::inherit());
    // A 2-vCPU L1 crashes now and then under this much I/O (rig.sh exits
    // 125), and its emulated interrupts now and then leave a guest hung
    // (docs/testing.md): the failure, printed with the part's output,
    // costs that part one more go.
    const ATTEMPTS: u32 = 3;
    let mut attempt = 1;
    let (status, json) = loop {
        // Zeros (sparse): no JSON until the run writes it.
        let zeroed = std::fs::File::create(&results).and_then(|f| f.set_len(RESULTS_DISK));
        if let Err(e) = zeroed {
            panic!("create {}: {e}", results.display());
        }
        let status = run_relayed(&mut cmd);
        let json = read_results_disk(&results);
        if status.as_ref().is_ok_and(ExitStatus::success) || attempt == ATTEMPTS {
            break (status, json);
        }
        attempt += 1;
        eprintln!(
            "vm bench: part {} failed in the rig ({}; why above); running it again, attempt {attempt} of {ATTEMPTS}",
            part.arg(),
            describe(&status)
        );
    };
    let _ = std::fs::remove_file(&results);
    match (status.as_ref().is_ok_and(ExitStatus::success), json) {
        (true, Some(json)) => Ok(json),
        (true, None) => Err(format!(
            "part {} ended in the rig without writing its results",
            part.arg()
        )),
        _ => Err(format!(
            "part {} failed in the rig ({})",
            part.arg(),
            describe(&status)
        )),
    }
}

/// How long the run in the rig may print nothing before it counts as hung:
/// longer than any one step (an I/O run is stopped after
/// [`io::RUN_TIMEOUT`], and its servers' reads and writes time out after
/// as long again), far shorter than rig.sh's own timeout for the whole run.
const RIG_STALL: Duration = Duration::from_secs(3 * io::RUN_TIMEOUT.as_secs());

/// Runs rig.sh, relaying each line the benchmark prints in L1 as it comes
/// (its progress, a failed VM's console tail, its table).
/// A run that prints nothing for [`RIG_STALL`] is hung (L1 stalled, or a
/// VMM stuck where no timeout reaches): rig.sh and everything it started
/// are stopped ([`stop_tree`]), and the run has failed.
fn run_relayed(cmd: &mut Command) -> Result<ExitStatus, String> {
    cmd.stdout(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("run resources/rig.sh: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let (line_tx, line_rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).replace('\r', "");
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut stalled = false;
    loop {
        match line_rx.recv_timeout(RIG_STALL) {
            Ok(line) => println!("{line}"),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                eprintln!(
                    "vm bench: the run in the rig printed nothing for {} s: stopping it",
                    RIG_STALL.as_secs()
                );
                stalled = true;
                stop_tree(&mut child);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait().map_err(|e| format!("wait for rig.sh: {e}"));
    if stalled {
        return Err(format!("no output for {} s", RIG_STALL.as_secs()));
    }
    status
}

/// Size of the disk that carries the results out of the rig.
const RESULTS_DISK: u64 = 1 << 20;

/// In L1: writes `json` and a newline at the start of the results disk
/// (a block device there), through to the disk.
fn write_results_disk(disk: &Path, json: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let line = format!("{json}\n");
    if line.len() as u64 > RESULTS_DISK {
        return Err(std::io::Error::other("the results outgrew the disk"));
    }
    let mut file = std::fs::OpenOptions::new().write(true).open(disk)?;
    file.write_all(line.as_bytes())?;
    file.sync_all()
}

/// On the host: the JSON line the run in L1 wrote to the results disk.
fn read_results_disk(disk: &Path) -> Option<String> {
    let bytes = std::fs::read(disk).ok()?;
    let end = bytes.iter().position(|&b| b == b'\n')?;
    String::from_utf8(bytes[..end].to_vec()).ok()
}

/// A run's end, for the messages.
fn describe(status: &Result<ExitStatus, String>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(e) => e.clone(),
    }
}

/// How long a stalled rig.sh gets to end after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Stops `rig` (rig.sh) and every process descended from it (`timeout`,
/// QEMU, rig.sh's helpers): SIGTERM first, so that once QEMU is gone
/// rig.sh's exit trap removes its temporary directory; SIGKILL for what
/// is left after [`STOP_GRACE`]. rig.sh keeps the caller's process group,
/// so ^C still reaches all of them.
fn stop_tree(rig: &mut Child) {
    let tree = descendants(rig.id());
    signal_all(&tree, libc::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if matches!(rig.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("vm bench: rig.sh did not end on SIGTERM: killing it");
    // What it started since, and what it started before (found then).
    let mut all = descendants(rig.id());
    all.extend(tree);
    signal_all(&all, libc::SIGKILL);
}

/// `pid` and every process descended from it, parents first.
fn descendants(pid: u32) -> Vec<u32> {
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        tree.extend(children_of(tree[i]));
        i += 1;
    }
    tree
}

fn signal_all(pids: &[u32], signal: i32) {
    for &pid in pids {
        if let Ok(pid) = i32::try_from(pid) {
            // SAFETY: kill(2) touches no memory of ours.
            unsafe { libc::kill(pid, signal) };
        }
    }
}

/// The pids whose parent is `parent`, from /proc.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // The fields after "(comm) ": state, then ppid.
                    let rest = stat.rsplit_once(") ")?.1;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}
