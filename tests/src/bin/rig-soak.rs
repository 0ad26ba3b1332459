//! The rig soak: boots the configurations the guest tests use, many times
//! each, and counts how each run ended, so a flaky rig shows as a rate
//! rather than as a red test now and then.
//!
//!   rig-soak [--runs N] [--parallel P] [--only NAME[,NAME...]] [--list]
//!
//! Each configuration (L1 vCPUs; guest vCPUs and memory; a workload: boot,
//! a 64 MiB TCP transfer each way with offloads and without, a disk write)
//! runs N times (default 10), P runs at a time (default 2, as `cargo test`
//! runs guest tests), with the configurations interleaved. Every run goes
//! through the rig with no retry. The table gives, per configuration, how
//! many runs passed and how many ended in each kind of failure; the guest
//! and L1 consoles of every failure are kept under target/rig-soak/<time>/.
//! `scripts/dev.sh rig-soak` builds what it needs and runs this.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_tests::net::{fill, value, GUEST_TRANSFER, HOST_TAP_SETUP, HOST_TRANSFER};
use moat_tests::{debugfs_cat, fsck, repo_root, rootfs_with_script, Guest, Outcome, Scratch};

/// What a soak run does in the guest.
#[derive(Clone, Copy, Debug)]
enum Workload {
    /// Boot, count the CPUs, reboot.
    Boot,
    /// 64 MiB each way over TCP through a TAP in L1, checksums compared;
    /// without `offload`, plain 1514-byte frames (`offload=off`), as
    /// `net::transfers_also_work_without_offloads` sends them.
    Tcp { offload: bool },
    /// Boot from an ext4 disk, write 32 MiB, sync; checked on the host.
    Disk,
}

/// One configuration of the rig and the guest.
#[derive(Clone, Debug)]
struct Config {
    l1_cpus: u32,
    l1_mib: u32,
    guest_cpus: u32,
    guest_mib: u32,
    workload: Workload,
}

impl Config {
    fn name(&self) -> String {
        let work = match self.workload {
            Workload::Boot => "boot",
            Workload::Tcp { offload: true } => "tcp64",
            Workload::Tcp { offload: false } => "tcp64-nooff",
            Workload::Disk => "disk",
        };
        format!(
            "l1-{}cpu/guest-{}cpu-{}M/{work}",
            self.l1_cpus, self.guest_cpus, self.guest_mib
        )
    }
}

/// The configurations the tests use, for 1 and 2 L1 vCPUs.
fn configs() -> Vec<Config> {
    let mut all = Vec::new();
    for l1_cpus in [1, 2] {
        let c = |guest_cpus, guest_mib, l1_mib, workload| Config {
            l1_cpus,
            l1_mib,
            guest_cpus,
            guest_mib,
            workload,
        };
        all.extend([
            c(1, 128, 2048, Workload::Boot),
            c(2, 512, 2048, Workload::Boot),
            c(4, 4096, 6144, Workload::Boot),
            c(1, 512, 2048, Workload::Tcp { offload: true }),
            c(1, 512, 2048, Workload::Tcp { offload: false }),
            c(1, 256, 2048, Workload::Disk),
        ]);
    }
    all
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Passed,
    TripleFault,
    L1Panic,
    L1Lost,
    Hang,
    Other,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::Passed,
        Kind::TripleFault,
        Kind::L1Panic,
        Kind::L1Lost,
        Kind::Hang,
        Kind::Other,
    ];

    fn label(self) -> &'static str {
        match self {
            Kind::Passed => "passed",
            Kind::TripleFault => "triple fault",
            Kind::L1Panic => "L1 panic",
            Kind::L1Lost => "L1 lost",
            Kind::Hang => "hang",
            Kind::Other => "other",
        }
    }
}

/// Runs one configuration once; returns how it ended, what to keep if it
/// failed (guest console, L1 console, a note), and its wall time.
fn run_once(config: &Config, slot: u8) -> (Kind, Option<(String, String, String)>, Duration) {
    let scratch = Scratch::new("soak");
    let started = Instant::now();
    let mut guest = Guest::vmlinux()
        .no_rig_retry()
        .rig_cpus(config.l1_cpus)
        .rig_memory_mib(config.l1_mib)
        .timeout(Duration::from_secs(300))
        .args([
            "--cpus".to_string(),
            format!("boot={}", config.guest_cpus),
            "--memory".to_string(),
            format!("size={}M", config.guest_mib),
        ]);
    let mut root = None;
    match config.workload {
        Workload::Boot => {
            guest = guest.script("echo SOAK-CPUS=$(grep -c ^processor /proc/cpuinfo)");
        }
        Workload::Tcp { offload } => {
            // One subnet per worker slot, so direct runs do not share TAPs.
            let off = if offload { "" } else { ",offload=off" };
            let net = fill(&format!("tap=@TAP0@{off}"), slot, 1);
            guest = guest
                .args(["--net", &net])
                .host_script(&fill(&format!("{HOST_TAP_SETUP}{HOST_TRANSFER}"), slot, 1))
                .script(&fill(GUEST_TRANSFER, slot, 1));
        }
        Workload::Disk => {
            let path = rootfs_with_script(
                &scratch.path("root.ext4"),
                "dd if=/dev/zero of=/big bs=1M count=32 2>/dev/null; sync; \
                 echo SOAK-SIZE=$(wc -c < /big)",
            );
            guest = guest
                .no_initramfs()
                .args([
                    "--cmdline",
                    &format!("{} root=/dev/vda rw", moat_tests::CMDLINE),
                ])
                .disk(&path, "");
            root = Some(path);
        }
    }
    let outcome = guest.run();
    let elapsed = started.elapsed();
    let out = match outcome {
        Ok(out) => out,
        Err(e) => {
            let kind = if e.contains("timed out") {
                Kind::Hang
            } else {
                Kind::Other
            };
            return (kind, Some((e, String::new(), String::new())), elapsed);
        }
    };
    let (kind, note) = classify(config, &out, root.as_deref());
    let kept = (kind != Kind::Passed).then(|| {
        (
            out.console.clone(),
            out.l1_console.clone().unwrap_or_default(),
            note,
        )
    });
    (kind, kept, elapsed)
}

/// How a finished run ended, and a note saying why it is not a pass.
fn classify(config: &Config, out: &Outcome, root: Option<&std::path::Path>) -> (Kind, String) {
    if let Some(failure) = out.rig_failure() {
        let kind = match failure {
            moat_tests::RigFailure::L1Panic(_) => Kind::L1Panic,
            moat_tests::RigFailure::L1Lost => Kind::L1Lost,
        };
        return (kind, failure.to_string());
    }
    if out.console.contains("triple-faulted") {
        return (Kind::TripleFault, "moat reported a triple fault".into());
    }
    if out.status == 124 {
        return (Kind::Hang, "the rig timed out".into());
    }
    if out.status != 0 || out.test_rc != Some(0) {
        return (
            Kind::Other,
            format!("moat status {}, script rc {:?}", out.status, out.test_rc),
        );
    }
    let checked = match config.workload {
        Workload::Boot => {
            let want = format!("SOAK-CPUS={}", config.guest_cpus);
            out.test_output
                .contains(&want)
                .then_some(())
                .ok_or(format!("guest did not print {want}"))
        }
        Workload::Tcp { .. } => {
            let c = &out.console;
            let same = |a: &str, b: &str| {
                c.contains(&format!("{a}="))
                    && c.contains(&format!("{b}="))
                    && value(c, a) == value(c, b)
            };
            (same("GUEST-GOT-SHA", "HOST-BLOB-SHA") && same("HOST-GOT-SHA", "GUEST-BLOB-SHA"))
                .then_some(())
                .ok_or("checksums differ or are missing".to_string())
        }
        Workload::Disk => {
            let size_ok = out.test_output.contains("SOAK-SIZE=33554432");
            let on_disk = root.is_some_and(|path| {
                fsck(path);
                debugfs_cat(path, "/big").len() == 32 << 20
            });
            (size_ok && on_disk)
                .then_some(())
                .ok_or("the 32 MiB file is not whole in the image".to_string())
        }
    };
    match checked {
        Ok(()) => (Kind::Passed, String::new()),
        Err(note) => (Kind::Other, note),
    }
}

/// Per configuration: counts per kind and wall times.
#[derive(Default)]
struct Tally {
    counts: BTreeMap<Kind, u32>,
    times: Vec<Duration>,
}

struct Options {
    runs: u32,
    parallel: u32,
    only: Vec<String>,
    list: bool,
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options {
        runs: 10,
        parallel: 2,
        only: Vec::new(),
        list: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> Result<u32, String> {
            let v = args.next().ok_or(format!("{name} needs a value"))?;
            v.parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or(format!("{name} wants a positive whole number, not '{v}'"))
        };
        match arg.as_str() {
            "--runs" => options.runs = number("--runs")?,
            "--parallel" => options.parallel = number("--parallel")?,
            "--only" => {
                let v = args.next().ok_or("--only needs a value")?;
                options.only = v.split(',').map(str::to_string).collect();
            }
            "--list" => options.list = true,
            other => {
                return Err(format!(
                    "unknown argument '{other}' (see the file's header)"
                ))
            }
        }
    }
    Ok(options)
}

fn main() {
    let options = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("rig-soak: {e}");
            std::process::exit(2);
        }
    };
    let configs: Vec<Config> = configs()
        .into_iter()
        .filter(|c| options.only.is_empty() || options.only.iter().any(|o| c.name().contains(o)))
        .collect();
    if options.list || configs.is_empty() {
        for c in &configs {
            println!("{}", c.name());
        }
        if configs.is_empty() {
            eprintln!("rig-soak: --only matched no configuration");
            std::process::exit(2);
        }
        return;
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let keep_dir = repo_root().join(format!("target/rig-soak/{stamp}"));
    std::fs::create_dir_all(&keep_dir).expect("create target/rig-soak");

    // Interleaved: run i of every configuration before run i + 1 of any.
    let jobs: Vec<(usize, u32)> = (0..options.runs)
        .flat_map(|i| (0..configs.len()).map(move |c| (c, i)))
        .collect();
    let total = jobs.len();
    let jobs = Arc::new(Mutex::new(jobs.into_iter()));
    let tallies: Arc<Mutex<Vec<Tally>>> = Arc::new(Mutex::new(
        configs.iter().map(|_| Tally::default()).collect(),
    ));
    let done = Arc::new(Mutex::new(0usize));
    let started = Instant::now();
    eprintln!(
        "rig-soak: {} configurations x {} runs, {} at a time; failures kept in {}",
        configs.len(),
        options.runs,
        options.parallel,
        keep_dir.display()
    );
    std::thread::scope(|scope| {
        for slot in 0..options.parallel {
            let (jobs, tallies, done, configs, keep_dir) = (
                jobs.clone(),
                tallies.clone(),
                done.clone(),
                &configs,
                &keep_dir,
            );
            scope.spawn(move || loop {
                let Some((c, i)) = jobs.lock().unwrap().next() else {
                    return;
                };
                let config = &configs[c];
                let (kind, kept, elapsed) = run_once(config, (slot % 4) as u8);
                let n = {
                    let mut d = done.lock().unwrap();
                    *d += 1;
                    *d
                };
                let mut line = format!(
                    "[{n}/{total} {:.0} s] {} run {}: {} in {:.1} s",
                    started.elapsed().as_secs_f64(),
                    config.name(),
                    i + 1,
                    kind.label(),
                    elapsed.as_secs_f64()
                );
                if let Some((console, l1, note)) = kept {
                    let dir =
                        keep_dir.join(format!("{}-{}", config.name().replace('/', "_"), i + 1));
                    let _ = std::fs::create_dir_all(&dir);
                    let _ = std::fs::write(dir.join("console.txt"), console);
                    let _ = std::fs::write(dir.join("l1-console.txt"), l1);
                    let _ = std::fs::write(dir.join("note.txt"), &note);
                    line.push_str(&format!(
                        ": {} ({})",
                        note.lines().next().unwrap_or(""),
                        dir.display()
                    ));
                }
                eprintln!("{line}");
                let mut t = tallies.lock().unwrap();
                *t[c].counts.entry(kind).or_default() += 1;
                t[c].times.push(elapsed);
            });
        }
    });

    let tallies = tallies.lock().unwrap();
    let mut table = format!("{:<34} {:>5}", "configuration", "runs");
    for kind in Kind::ALL {
        table.push_str(&format!(" {:>12}", kind.label()));
    }
    table.push_str(&format!(" {:>9}\n", "median s"));
    let mut failures = 0;
    for (config, tally) in configs.iter().zip(tallies.iter()) {
        let runs: u32 = tally.counts.values().sum();
        table.push_str(&format!("{:<34} {runs:>5}", config.name()));
        for kind in Kind::ALL {
            let n = tally.counts.get(&kind).copied().unwrap_or(0);
            if kind != Kind::Passed {
                failures += n;
            }
            table.push_str(&format!(" {n:>12}"));
        }
        let mut times = tally.times.clone();
        times.sort();
        let median = times
            .get(times.len() / 2)
            .map_or(0.0, Duration::as_secs_f64);
        table.push_str(&format!(" {median:>9.1}\n"));
    }
    println!("{table}");
    println!(
        "rig-soak: {failures} failures in {total} runs, {:.0} s; consoles of failures in {}",
        started.elapsed().as_secs_f64(),
        keep_dir.display()
    );
    let _ = std::fs::write(keep_dir.join("table.txt"), &table);
    if failures > 0 {
        std::process::exit(1);
    }
}
