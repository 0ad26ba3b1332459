//! The guest-test harness: boots real Linux guests under moat and returns
//! what the guest printed.
//!
//! The same test code runs on any host. With hardware KVM, moat runs
//! directly. Without it (no /dev/kvm, or the nested software KVM "PVM" our
//! build machines have, on which Linux cannot reach userspace) moat runs in
//! the test rig: a QEMU TCG virtual machine with KVM inside it
//! (`resources/rig.sh`). `MOAT_TEST_BACKEND=direct|rig` forces either.
//!
//! A test gives a shell script; the harness appends it to the guest
//! initramfs as `/test.sh`, the guest's `/init` runs it between
//! `MOAT-TEST-BEGIN` and `MOAT-TEST-END rc=N` and reboots, and moat exits.

#![deny(missing_docs)]

pub mod cpio;
pub mod elf;
pub mod net;
pub mod symbols;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// moat's default kernel command line (`moat run` without `--cmdline`),
/// for tests that add to it.
pub const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nokbd";

/// Kernel messages a guest prints in the rig that come from the rig, not
/// from moat, each with the reason. QEMU 7.2's TCG does not apply nested
/// SVM's XSETBV intercept, so L1's KVM never sees the guest set XCR0 and
/// keeps CPUID leaf 0xD's size for x87/SSE only; the guest kernel's XSAVE
/// check then warns (measured: KVM's XCR0 for the vCPU stays 0x1 while the
/// guest enabled AVX; Firecracker's guests warn the same in the rig). On
/// hardware KVM intercepts XSETBV and the sizes agree.
pub const RIG_ARTIFACTS: &[&str] = &[
    "XSAVE consistency problem",
    "at arch/x86/kernel/fpu/xstate.c:",
];

/// The lines of a kernel log (the console) that are problems: those
/// containing one of `patterns`, except, through the rig, the
/// [`RIG_ARTIFACTS`]; a warning's whole block (`[ cut here ]` to `end
/// trace`) goes with its first line.
pub fn kernel_problems(log: &str, patterns: &[&str], backend: Backend) -> Vec<String> {
    let is_artifact =
        |l: &str| backend == Backend::Rig && RIG_ARTIFACTS.iter().any(|a| l.contains(a));
    let mut problems = Vec::new();
    let mut block: Vec<&str> = Vec::new();
    let mut in_block = false;
    for line in log.lines() {
        if line.contains("[ cut here ]") {
            in_block = true;
            block.clear();
            continue;
        }
        if in_block {
            block.push(line);
            if line.contains("---[ end trace") {
                in_block = false;
                if !block.iter().any(|l| is_artifact(l)) {
                    problems.extend(
                        block
                            .iter()
                            .filter(|l| patterns.iter().any(|p| l.contains(p)))
                            .map(|l| l.to_string()),
                    );
                }
            }
            continue;
        }
        if patterns.iter().any(|p| line.contains(p)) && !is_artifact(line) {
            problems.push(line.to_string());
        }
    }
    // A block the log cut off is judged line by line.
    problems.extend(
        block
            .iter()
            .filter(|_| in_block)
            .filter(|l| patterns.iter().any(|p| l.contains(p)) && !is_artifact(l))
            .map(|l| l.to_string()),
    );
    problems
}

/// Where moat runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// On this host's /dev/kvm.
    Direct,
    /// Inside the QEMU rig.
    Rig,
}

impl Backend {
    /// The backend for this host, or the one `MOAT_TEST_BACKEND` names.
    pub fn detect() -> Backend {
        match std::env::var("MOAT_TEST_BACKEND").as_deref() {
            Ok("direct") => return Backend::Direct,
            Ok("rig") => return Backend::Rig,
            _ => {}
        }
        let pvm = Path::new("/sys/module/kvm_pvm").exists();
        if Path::new("/dev/kvm").exists() && !pvm {
            Backend::Direct
        } else {
            Backend::Rig
        }
    }
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The moat binary under test: `MOAT_BIN`, else the newest of the builds
/// in `target/`: `scripts/dev.sh build`'s static musl one
/// (`target/<arch>-unknown-linux-musl/dist/moat`), `cargo build
/// --release`'s and the debug one. With none built, the release path
/// (which then fails to spawn).
pub fn moat_bin() -> PathBuf {
    if let Ok(path) = std::env::var("MOAT_BIN") {
        return PathBuf::from(path);
    }
    let target = repo_root().join("target");
    let dist = format!("{}-unknown-linux-musl/dist/moat", std::env::consts::ARCH);
    let release = target.join("release/moat");
    newest(&[
        target.join(dist),
        release.clone(),
        target.join("debug/moat"),
    ])
    .unwrap_or(release)
}

/// Of `paths`, the existing file modified last.
fn newest(paths: &[PathBuf]) -> Option<PathBuf> {
    paths
        .iter()
        .filter_map(|p| Some((std::fs::metadata(p).ok()?.modified().ok()?, p)))
        .max_by_key(|(modified, _)| *modified)
        .map(|(_, p)| p.clone())
}

/// Creates (or empties) `path` for reading and writing, with `contents`;
/// the file position is left at the end.
pub fn file_with(path: &Path, contents: &[u8]) -> std::fs::File {
    let mut file = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    file.write_all(contents)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    file
}

/// A benchmark's disk file at `path`: `mib` MiB of a repeating pattern
/// (real data, so reads are not served from holes), synced.
pub fn bench_disk(path: &Path, mib: u64) -> std::fs::File {
    let mut file = file_with(path, &[]);
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 7) as u8).collect();
    for _ in 0..mib {
        file.write_all(&chunk)
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
    file.sync_all()
        .unwrap_or_else(|e| panic!("sync {}: {e}", path.display()));
    file
}

/// Runs the repository's script `path` with `args` (its stderr shown) and
/// returns its stdout; a script that fails fails the test.
fn run_script(path: &str, args: &[&str]) -> String {
    let script = repo_root().join(path);
    let out = Command::new(&script)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}",
        script.display(),
        out.status
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `resources/build-images.sh ARGS` and reads its KEY=PATH lines.
fn build_images(args: &[&str]) -> HashMap<String, PathBuf> {
    run_script("resources/build-images.sh", args)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), PathBuf::from(v)))
        .collect()
}

/// Paths of the guest images, from `resources/build-images.sh` (built or
/// cached on first use, once per test process).
pub fn images() -> &'static HashMap<String, PathBuf> {
    static IMAGES: OnceLock<HashMap<String, PathBuf>> = OnceLock::new();
    IMAGES.get_or_init(|| build_images(&[]))
}

/// One image path, e.g. `image("VMLINUX")`. `DOCKER_*` keys come from
/// `build-images.sh --docker`, which builds the Docker guest on first use.
pub fn image(key: &str) -> PathBuf {
    static DOCKER: OnceLock<HashMap<String, PathBuf>> = OnceLock::new();
    let images = if key.starts_with("DOCKER_") {
        DOCKER.get_or_init(|| build_images(&["--docker"]))
    } else {
        images()
    };
    images
        .get(key)
        .cloned()
        .unwrap_or_else(|| panic!("build-images.sh did not report {key}"))
}

/// The Python of the API tests' venv (firecracker-python, schemathesis),
/// made by `scripts/python-env.sh` on first use.
pub fn python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| PathBuf::from(run_script("scripts/python-env.sh", &[]).trim()))
        .clone()
}

/// A scratch directory for one test, removed when dropped.
pub struct Scratch(PathBuf);

impl Scratch {
    /// A new empty directory under the target directory.
    pub fn new(name: &str) -> Scratch {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = repo_root()
            .join("target/test-scratch")
            .join(format!("{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        Scratch(dir)
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a guest run produced.
#[derive(Debug)]
pub struct Outcome {
    /// moat's exit status (through the rig: moat's status inside L1).
    pub status: i32,
    /// Everything on the console (guest output and moat's messages), with
    /// carriage returns removed.
    pub console: String,
    /// The test script's exit code, if the guest got that far.
    pub test_rc: Option<i32>,
    /// What the test script printed, between the markers.
    pub test_output: String,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Through the rig: L1's kernel console (the rig's side channel).
    pub l1_console: Option<String>,
    /// Rig failures retried before this outcome (see [`RigFailure`]).
    pub rig_retries: u32,
}

/// Why a run through the rig failed because of the rig itself, not moat
/// or the guest: L1 panicked, or ended without reporting the command's
/// exit status (rig.sh's status 125).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RigFailure {
    /// L1's console has a kernel panic line.
    L1Panic(String),
    /// rig.sh exited 125: L1 never ran the command or never reported.
    L1Lost,
}

impl RigFailure {
    /// Classifies a rig run from rig.sh's exit status and L1's console.
    pub fn of(status: i32, l1_console: Option<&str>) -> Option<RigFailure> {
        let panic = l1_console
            .and_then(|c| c.lines().find(|l| l.contains("Kernel panic")))
            .map(|l| l.trim().to_string());
        match (panic, status) {
            (Some(line), _) => Some(RigFailure::L1Panic(line)),
            (None, RIG_FAILED) => Some(RigFailure::L1Lost),
            _ => None,
        }
    }
}

impl std::fmt::Display for RigFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RigFailure::L1Panic(line) => write!(f, "L1 panicked ({line})"),
            RigFailure::L1Lost => f.write_str("L1 ended without reporting (rig status 125)"),
        }
    }
}

/// rig.sh's exit status when the rig itself failed.
pub const RIG_FAILED: i32 = 125;

impl Outcome {
    /// The last `n` lines of the console, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        tail(&self.console, n)
    }

    /// Asserts moat exited 0 and the script exited 0.
    pub fn assert_success(&self) {
        assert!(
            self.status == 0 && self.test_rc == Some(0),
            "guest run failed: moat status {}, script rc {:?}\n--- console tail ---\n{}",
            self.status,
            self.test_rc,
            self.tail(40)
        );
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A guest run being described.
pub struct Guest {
    kernel: PathBuf,
    initramfs: Option<PathBuf>,
    script: Option<String>,
    moat_args: Vec<String>,
    typed: Vec<(String, Vec<u8>)>,
    timeout: Duration,
    backend: Backend,
    rig_memory_mib: Option<u32>,
    rig_cpus: Option<u32>,
    retry_rig_failure: bool,
    disks: Vec<PathBuf>,
    kill_after: Option<String>,
    host_script: Option<String>,
    host_files: Vec<PathBuf>,
}

impl Guest {
    /// A guest booting `kernel` with the test initramfs.
    pub fn new(kernel: impl Into<PathBuf>) -> Guest {
        Guest {
            kernel: kernel.into(),
            initramfs: Some(image("INITRAMFS")),
            script: None,
            moat_args: Vec::new(),
            typed: Vec::new(),
            timeout: Duration::from_secs(240),
            backend: Backend::detect(),
            rig_memory_mib: None,
            rig_cpus: None,
            retry_rig_failure: true,
            disks: Vec::new(),
            kill_after: None,
            host_script: None,
            host_files: Vec::new(),
        }
    }

    /// The default guest: the ELF vmlinux.
    pub fn vmlinux() -> Guest {
        Guest::new(image("VMLINUX"))
    }

    /// The shell script the guest runs as `/test.sh`.
    pub fn script(mut self, script: &str) -> Guest {
        self.script = Some(script.to_string());
        self
    }

    /// Extra arguments to `moat run`.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Guest {
        self.moat_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Types `input` on moat's stdin once the console shows `marker`.
    pub fn type_after(mut self, marker: &str, input: &[u8]) -> Guest {
        self.typed.push((marker.to_string(), input.to_vec()));
        self
    }

    /// Boots with `initramfs` instead of the test initramfs (a
    /// [`Guest::script`] is appended to it all the same).
    pub fn initramfs(mut self, initramfs: impl Into<PathBuf>) -> Guest {
        self.initramfs = Some(initramfs.into());
        self
    }

    /// Boots without an initramfs.
    pub fn no_initramfs(mut self) -> Guest {
        self.initramfs = None;
        self
    }

    /// Memory for the rig's VM, for guests larger than its default 2 GiB
    /// (ignored when moat runs directly).
    pub fn rig_memory_mib(mut self, mib: u32) -> Guest {
        self.rig_memory_mib = Some(mib);
        self
    }

    /// vCPUs for the rig's VM (default 1; ignored when moat runs directly).
    pub fn rig_cpus(mut self, cpus: u32) -> Guest {
        self.rig_cpus = Some(cpus);
        self
    }

    /// Reports a rig failure as it is instead of retrying it once (for
    /// the rig soak, which counts them).
    pub fn no_rig_retry(mut self) -> Guest {
        self.retry_rig_failure = false;
        self
    }

    /// The backend this guest runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Gives the guest a virtio-blk disk: `--disk path=PATH[,OPTIONS]`.
    /// Through the rig, the image is passed to the rig's VM as a disk, so
    /// the guest's writes reach this file.
    pub fn disk(mut self, path: &Path, options: &str) -> Guest {
        let mut arg = format!("path={}", path.display());
        if !options.is_empty() {
            arg.push(',');
            arg.push_str(options);
        }
        self.moat_args.extend(["--disk".to_string(), arg]);
        self.disks.push(path.to_path_buf());
        self
    }

    /// Kills moat with SIGKILL as soon as the console shows `marker`.
    pub fn kill_after(mut self, marker: &str) -> Guest {
        self.kill_after = Some(marker.to_string());
        self
    }

    /// Runs moat under a shell script that plays the host's part: it gets
    /// the moat command line as `"$@"` and must start it (in the background,
    /// if it has more to do) and `wait` for it, exiting with its status.
    /// Through the rig it runs in the rig's VM; on a host with KVM, on the
    /// host itself (as root).
    pub fn host_script(mut self, script: &str) -> Guest {
        self.host_script = Some(script.to_string());
        self
    }

    /// A file the host script uses (a program, with its libraries): copied
    /// into the rig's VM at the same path; on a host with KVM it is there.
    pub fn host_file(mut self, path: impl Into<PathBuf>) -> Guest {
        self.host_files.push(path.into());
        self
    }

    /// How long the whole run may take.
    pub fn timeout(mut self, timeout: Duration) -> Guest {
        self.timeout = timeout;
        self
    }

    /// Boots the guest and waits for moat to exit. A run that does not end
    /// within the timeout is killed and reported as an error, with the
    /// console tail.
    pub fn run(self) -> Result<Outcome, String> {
        let scratch = Scratch::new("guest");
        let mut files = vec![self.kernel.clone()];
        files.extend(self.host_files.iter().cloned());
        let mut args: Vec<String> = vec!["run".into(), "--kernel".into(), path_str(&self.kernel)];
        if let Some(base) = &self.initramfs {
            let initramfs = match &self.script {
                Some(script) => {
                    let path = scratch.path("initramfs.cpio");
                    initramfs_with_script(base, script, &path)?;
                    path
                }
                None => base.clone(),
            };
            files.push(initramfs.clone());
            args.extend(["--initramfs".into(), path_str(&initramfs)]);
        }
        args.extend(self.moat_args.iter().cloned());
        let (backend, disks, timeout) = (self.backend, &self.disks, self.timeout);
        let command = match (&self.host_script, &self.kill_after, backend) {
            (Some(script), _, _) => {
                host_script_command(backend, script, &[], &args, &files, disks, timeout)
            }
            (None, Some(marker), Backend::Rig) => host_script_command(
                backend,
                KILL_AFTER_SCRIPT,
                std::slice::from_ref(marker),
                &args,
                &files,
                disks,
                timeout,
            ),
            _ => moat_command(backend, &args, &files, disks, timeout),
        };
        let kill = match (&self.kill_after, self.backend) {
            (Some(marker), Backend::Direct) => Some(marker.as_str()),
            _ => None,
        };
        if self.backend == Backend::Direct {
            return run_command(command, &self.typed, kill, self.timeout, None);
        }
        // rig.sh options go before its "--".
        let mut rig_options = Vec::new();
        if let Some(mib) = self.rig_memory_mib {
            rig_options.extend(["--mem".to_string(), mib.to_string()]);
        }
        if let Some(cpus) = self.rig_cpus {
            rig_options.extend(["--cpus".to_string(), cpus.to_string()]);
        }
        let rig = |l1_log: &Path| {
            let mut rig = Command::new(command.get_program());
            rig.args(&rig_options)
                .args(command.get_args())
                .env("RIG_L1_LOG", l1_log);
            rig
        };
        let attempt = |n: u32| {
            let l1_log = scratch.path(&format!("l1-{n}.log"));
            run_command(rig(&l1_log), &self.typed, kill, self.timeout, Some(&l1_log))
        };
        let first = attempt(1);
        let failure = match &first {
            Ok(out) => out.rig_failure().map(|failure| failure.to_string()),
            Err(report) => guest_went_deaf(report).then(|| DEAF_GUEST.to_string()),
        };
        let Some(failure) = failure.filter(|_| self.retry_rig_failure) else {
            return first;
        };
        let kept = match &first {
            Ok(out) => keep_rig_failure(out),
            Err(report) => keep_timeout_report(report),
        };
        report_retry(&format!(
            "rig failure: {failure}; consoles kept in {}; retrying once",
            kept.display()
        ));
        let mut second = attempt(2).map_err(|report| {
            format!(
                "the rig failed ({failure}; consoles in {}), and its retry failed too: {report}",
                kept.display()
            )
        })?;
        second.rig_retries = 1;
        if let Some(again) = second.rig_failure() {
            let kept_again = keep_rig_failure(&second);
            return Err(format!(
                "the rig failed twice: {failure} (consoles in {}), then {again} (consoles in {})\n\
                 --- console tail ---\n{}\n--- L1 console tail ---\n{}",
                kept.display(),
                kept_again.display(),
                second.tail(20),
                tail(second.l1_console.as_deref().unwrap_or(""), 20),
            ));
        }
        report_retry(&format!(
            "rig retry passed the rig (moat status {})",
            second.status
        ));
        Ok(second)
    }
}

impl Outcome {
    /// Whether the rig itself failed this run (never true for a direct run).
    pub fn rig_failure(&self) -> Option<RigFailure> {
        self.l1_console.as_ref()?;
        RigFailure::of(self.status, self.l1_console.as_deref())
    }
}

/// Writes a line to the test process's stderr directly, so it shows in
/// `cargo test` output even for a test that passes (the test harness
/// captures only print macros).
pub fn report_retry(line: &str) {
    let _ = writeln!(std::io::stderr(), "moat-tests: {line}");
}

/// Saves a rig failure's guest and L1 consoles under
/// target/rig-failures/; returns the directory.
pub fn keep_rig_failure(outcome: &Outcome) -> PathBuf {
    let dir = rig_failure_dir();
    let _ = std::fs::write(dir.join("console.txt"), &outcome.console);
    let _ = std::fs::write(
        dir.join("l1-console.txt"),
        outcome.l1_console.as_deref().unwrap_or(""),
    );
    dir
}

/// A new directory under target/rig-failures/ for one failed rig run.
fn rig_failure_dir() -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let dir = repo_root()
        .join("target/rig-failures")
        .join(format!("{stamp}-{}-{n}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// What a retried deaf-guest hang is reported as.
const DEAF_GUEST: &str = "the guest and moat sat idle until the timeout (a lost interrupt in \
                          the rig's nested KVM, docs/testing.md)";

/// Whether a timed-out rig run's report (the error [`run_command`] returns)
/// shows the rig's known way of losing a guest: in both of L1's last two
/// reports moat's event loop waits in epoll and every vCPU thread sits in
/// `kvm_vcpu_block` with the same guest and kernel time. In the rig a
/// nested guest now and then stops receiving interrupts, its own timer's
/// included (docs/testing.md, "A guest deaf to interrupts"); with
/// EVENT_IDX the devices then never signal it again, and nothing moves
/// until the timeout. A guest merely waiting (for a notification moat
/// lost, say) still takes its timer interrupts, and its vCPU's times grow
/// between the reports.
pub fn guest_went_deaf(report: &str) -> bool {
    /// One of L1's reports: whether moat's event loop waited in epoll, and
    /// each vCPU thread's (name, wait channel, guest time, kernel time).
    #[derive(Default)]
    struct Report<'a> {
        event_loop_waits: bool,
        vcpus: Vec<[&'a str; 4]>,
    }
    let mut reports: Vec<Report> = Vec::new();
    for line in report.lines().filter_map(|l| l.strip_prefix("RIG-DIAG ")) {
        if line.starts_with("report ") {
            reports.push(Report::default());
            continue;
        }
        let Some(current) = reports.last_mut() else {
            continue;
        };
        let Some(comm) = line.split_whitespace().nth(1) else {
            continue;
        };
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .unwrap_or_default()
        };
        if comm == "moat" {
            current.event_loop_waits |= field("wchan=") == "do_epoll_wait";
        } else if comm.starts_with("vcpu") {
            current
                .vcpus
                .push([comm, field("wchan="), field("guest="), field("sys=")]);
        }
    }
    let [.., a, b] = reports.as_slice() else {
        return false;
    };
    let idle = |r: &Report| {
        r.event_loop_waits
            && !r.vcpus.is_empty()
            && r.vcpus
                .iter()
                .all(|[_, wchan, ..]| *wchan == "kvm_vcpu_block")
    };
    idle(a) && idle(b) && a.vcpus == b.vcpus
}

/// Saves a timed-out run's report under target/rig-failures/; returns the
/// directory.
fn keep_timeout_report(report: &str) -> PathBuf {
    let dir = rig_failure_dir();
    let _ = std::fs::write(dir.join("timeout-report.txt"), report);
    dir
}

/// A host-side script that SIGKILLs moat once its output shows the
/// marker given as `$1`, then prints that output and exits with moat's
/// status. For the rig, where the harness cannot signal moat itself.
const KILL_AFTER_SCRIPT: &str = r#"log=/tmp/moat-kill.log; marker=$1; shift
"$@" >"$log" 2>&1 </dev/null & pid=$!
while kill -0 "$pid" 2>/dev/null && ! grep -q "$marker" "$log"; do sleep 0.1; done
kill -9 "$pid" 2>/dev/null; wait "$pid"; rc=$?
cat "$log"; exit "$rc""#;

/// Shell functions every host script may use.
///
/// `stop_if_stuck PID SECONDS`: waits up to SECONDS for moat (PID) to end;
/// if it has not, prints where each of its threads waits (`HOST-MOAT-STUCK
/// name wchan state` lines, so the test's output shows where it stopped)
/// and kills it.
pub const HOST_SCRIPT_HELPERS: &str = r#"stop_if_stuck() {
    _i=0; while kill -0 $1 2>/dev/null && [ $_i -lt $(($2 * 10)) ]; do _i=$((_i+1)); sleep 0.1; done
    if kill -0 $1 2>/dev/null; then
        for _t in /proc/$1/task/*; do echo "HOST-MOAT-STUCK $(cat $_t/comm) $(cat $_t/wchan) $(cut -d' ' -f3 $_t/stat)"; done
        kill -9 $1
    fi
}
"#;

/// Writes to `out` the initramfs `base` with `script` added as `/test.sh`
/// (the test guest's /init runs it).
pub fn initramfs_with_script(base: &Path, script: &str, out: &Path) -> Result<(), String> {
    let mut bytes = std::fs::read(base).map_err(|e| format!("read {}: {e}", base.display()))?;
    bytes.extend(cpio::archive(&[cpio::Entry {
        name: "test.sh",
        mode: 0o755,
        data: script.as_bytes(),
    }]));
    std::fs::write(out, bytes).map_err(|e| format!("write {}: {e}", out.display()))
}

/// Runs `sh -c SCRIPT sh SCRIPT_ARGS... MOAT ARGS...` on `backend`: the
/// script plays the host's part (a TAP's address, the far end of a
/// connection) and starts moat itself from `"$@"`. In the rig it runs in
/// the rig's VM, next to moat.
fn host_script_command(
    backend: Backend,
    script: &str,
    script_args: &[String],
    args: &[String],
    files: &[PathBuf],
    disks: &[PathBuf],
    timeout: Duration,
) -> Command {
    let mut cmd = match backend {
        Backend::Direct => Command::new("sh"),
        Backend::Rig => {
            let mut files = files.to_vec();
            files.push(moat_bin());
            // moat_command ends with "-- MOAT"; the shell takes MOAT's place.
            let rig = moat_command(Backend::Rig, &[], &files, disks, timeout);
            let mut rig_args: Vec<std::ffi::OsString> =
                rig.get_args().map(|a| a.to_os_string()).collect();
            rig_args.pop();
            let mut cmd = Command::new(rig.get_program());
            cmd.args(rig_args).args(["/bin/busybox", "sh"]);
            cmd
        }
    };
    cmd.arg("-c")
        .arg(format!("{HOST_SCRIPT_HELPERS}{script}"))
        .arg("sh")
        .args(script_args)
        .arg(moat_bin())
        .args(args);
    cmd
}

/// A copy of the ext4 root filesystem image at `path`, with `script` as
/// its `/test.sh` (written with debugfs: no mount needed).
pub fn rootfs_with_script(path: &Path, script: &str) -> PathBuf {
    std::fs::copy(image("ROOTFS"), path).unwrap_or_else(|e| panic!("copy rootfs: {e}"));
    let script_file = path.with_extension("test.sh");
    std::fs::write(&script_file, script).unwrap();
    debugfs(
        path,
        true,
        &format!("write {} test.sh", script_file.display()),
    );
    path.to_path_buf()
}

/// Puts `contents` at `path` (an absolute path whose directory exists)
/// inside the ext4 image `image`, replacing what was there; no mount needed.
pub fn write_into_ext4(image: &Path, path: &str, contents: &[u8]) {
    let source = image.with_extension("write-into");
    std::fs::write(&source, contents).unwrap_or_else(|e| panic!("write {}: {e}", source.display()));
    // debugfs's `write` refuses to replace a file, and `rm` of a missing
    // one only complains.
    debugfs(image, true, &format!("rm {path}"));
    debugfs(image, true, &format!("write {} {path}", source.display()));
    let written = debugfs_cat(image, path);
    let _ = std::fs::remove_file(&source);
    assert_eq!(written, contents, "{path} in {}", image.display());
}

/// Creates an empty ext4 filesystem image of `mib` MiB at `path`.
pub fn make_ext4(path: &Path, mib: u32) {
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(path)
        .arg(format!("{mib}M"))
        .output()
        .unwrap_or_else(|e| panic!("mkfs.ext4: {e}"));
    assert!(
        out.status.success(),
        "mkfs.ext4 {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs one debugfs request on an ext4 image; returns stdout.
fn debugfs(image: &Path, write: bool, request: &str) -> Vec<u8> {
    let mut cmd = Command::new("debugfs");
    if write {
        cmd.arg("-w");
    }
    let out = cmd
        .arg("-R")
        .arg(request)
        .arg(image)
        .output()
        .unwrap_or_else(|e| panic!("debugfs: {e}"));
    assert!(
        out.status.success(),
        "debugfs {request}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Checks and repairs an ext4 image (replaying its journal), as the next
/// mount would; panics if it is beyond repair.
pub fn fsck(image: &Path) {
    let out = Command::new("e2fsck")
        .arg("-fy")
        .arg(image)
        .output()
        .unwrap_or_else(|e| panic!("e2fsck: {e}"));
    // 0: clean, 1: errors corrected (such as a journal replay).
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "e2fsck {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The contents of `path` inside an ext4 image, read with debugfs.
pub fn debugfs_cat(image: &Path, path: &str) -> Vec<u8> {
    debugfs(image, false, &format!("cat {path}"))
}

fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// How long before the harness's timeout the rig reports on its threads.
const DIAG_BEFORE_TIMEOUT_S: u64 = 45;

/// The command that runs `moat ARGS` on `backend`, with `files` available
/// at the same paths (the rig copies them into its VM).
pub fn moat_command(
    backend: Backend,
    args: &[String],
    files: &[PathBuf],
    disks: &[PathBuf],
    timeout: Duration,
) -> Command {
    match backend {
        Backend::Direct => {
            let mut cmd = Command::new(moat_bin());
            cmd.args(args);
            cmd
        }
        Backend::Rig => {
            let mut cmd = Command::new(repo_root().join("resources/rig.sh"));
            // The rig's own timeout is a backstop behind the harness's.
            cmd.arg("--timeout")
                .arg((timeout.as_secs() + 30).to_string());
            // L1 reports what a command still running shortly before the
            // harness gives up is doing (twice, 10 s apart).
            if let Some(after) = timeout.as_secs().checked_sub(DIAG_BEFORE_TIMEOUT_S) {
                cmd.arg("--diag-after").arg(after.to_string());
            }
            for file in files {
                cmd.arg("--file").arg(file);
            }
            for disk in disks {
                cmd.arg("--disk").arg(disk);
            }
            cmd.arg("--").arg(moat_bin()).args(args);
            cmd
        }
    }
}

/// Runs moat with `args` without booting a guest, for checking how it
/// handles bad input. Any /dev/kvm can answer the ioctls moat makes before
/// the first KVM_RUN, so this runs directly wherever /dev/kvm exists and in
/// the rig elsewhere.
pub fn run_moat(args: &[&str], files: &[PathBuf]) -> Result<Outcome, String> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let timeout = Duration::from_secs(120);
    let backend = match std::env::var("MOAT_TEST_BACKEND").as_deref() {
        Ok("rig") => Backend::Rig,
        _ if Path::new("/dev/kvm").exists() => Backend::Direct,
        _ => Backend::Rig,
    };
    run_command(
        moat_command(backend, &args, files, &[], timeout),
        &[],
        None,
        timeout,
        None,
    )
}

/// Output collected from a child, with a condition variable to wait on.
#[derive(Default)]
struct Collected {
    bytes: Mutex<Vec<u8>>,
    changed: Condvar,
}

fn collect(
    mut source: impl Read + Send + 'static,
    into: Arc<Collected>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = source.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.bytes.lock().unwrap().extend_from_slice(&buf[..n]);
            into.changed.notify_all();
        }
    })
}

fn console_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace('\r', "")
}

/// Runs `command` to the end, typing `typed` after their markers and
/// killing it once `kill_after` shows; `l1_log` is where rig.sh was told
/// to keep L1's console (`RIG_L1_LOG`), read into the outcome.
fn run_command(
    mut command: Command,
    typed: &[(String, Vec<u8>)],
    kill_after: Option<&str>,
    timeout: Duration,
    l1_log: Option<&Path>,
) -> Result<Outcome, String> {
    let start = Instant::now();
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Its own process group, so a timeout can kill QEMU and helpers too.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {command:?}: {e}"))?;
    let output = Arc::new(Collected::default());
    let readers = [
        collect(child.stdout.take().ok_or("no stdout")?, output.clone()),
        collect(child.stderr.take().ok_or("no stderr")?, output.clone()),
    ];
    // Keep stdin open for the whole run: QEMU spins on a closed stdin.
    let mut stdin = child.stdin.take();
    let deadline = start + timeout;
    let mut pending = typed.iter();
    let mut next = pending.next();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() >= deadline {
            let processes = process_group_listing(child.id());
            stop(&mut child);
            let text = console_text(&output.bytes.lock().unwrap());
            let l1 = l1_log
                .map(|path| {
                    let text = console_text(&std::fs::read(path).unwrap_or_default());
                    let diag: Vec<&str> =
                        text.lines().filter(|l| l.starts_with("RIG-DIAG")).collect();
                    let plain: String = text
                        .lines()
                        .filter(|l| !l.starts_with("RIG-DIAG"))
                        .map(|l| format!("{l}\n"))
                        .collect();
                    format!(
                        "\n--- L1 console tail ---\n{}\n--- L1's report on its threads ---\n{}",
                        tail(&plain, 20),
                        diag.join("\n")
                    )
                })
                .unwrap_or_default();
            return Err(format!(
                "guest run timed out after {} s\n--- console tail ---\n{}\n--- processes ---\n{}{l1}",
                timeout.as_secs(),
                tail(&text, 40),
                processes
            ));
        }
        let guard = output.bytes.lock().unwrap();
        if kill_after.is_some_and(|marker| console_text(&guard).contains(marker)) {
            drop(guard);
            kill(&mut child);
            continue;
        }
        if let Some((marker, input)) = next {
            if console_text(&guard).contains(marker.as_str()) {
                drop(guard);
                if let Some(stdin) = stdin.as_mut() {
                    let _ = stdin.write_all(input);
                    let _ = stdin.flush();
                }
                next = pending.next();
                continue;
            }
        }
        let _ = output
            .changed
            .wait_timeout(guard, Duration::from_millis(100))
            .unwrap();
    };
    drop(stdin);
    for reader in readers {
        let _ = reader.join();
    }
    let console = console_text(&output.bytes.lock().unwrap());
    let (test_rc, test_output) = parse_test_result(&console);
    Ok(Outcome {
        status: status.code().unwrap_or(-1),
        console,
        test_rc,
        test_output,
        elapsed: start.elapsed(),
        l1_console: l1_log.map(|path| console_text(&std::fs::read(path).unwrap_or_default())),
        rig_retries: 0,
    })
}

/// What the processes of a hung run were doing, for the failure message.
fn process_group_listing(pgid: u32) -> String {
    let out = match Command::new("ps")
        .args(["-eo", "pgid,pid,stat,wchan:24,etime,args"])
        .output()
    {
        Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
        Err(e) => return format!("(ps failed: {e})"),
    };
    out.lines()
        .filter(|line| line.split_whitespace().next() == Some(&pgid.to_string()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// How long a timed-out run gets to end on SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Ends a run that timed out: SIGTERM to the child's whole process group
/// first, so rig.sh's EXIT trap removes its /tmp/moat-rig.* directory
/// (SIGKILL would leave it), then SIGKILL to whatever is left after
/// [`STOP_GRACE`].
fn stop(child: &mut Child) {
    let Ok(pid) = i32::try_from(child.id()) else {
        return kill(child);
    };
    // SAFETY: kill(2) on our own child's process group; no memory is touched.
    unsafe { libc::kill(-pid, libc::SIGTERM) };
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    // The group outlives the child if a member ignored SIGTERM; its ID is
    // not reused while any member is alive.
    kill(child);
}

/// Kills the child's whole process group (the rig's QEMU included).
fn kill(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on our own child's process group; no memory is touched.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Finds the script's output and exit code between the guest's markers.
pub fn parse_test_result(console: &str) -> (Option<i32>, String) {
    let Some(begin) = console.find("MOAT-TEST-BEGIN\n") else {
        return (None, String::new());
    };
    let body = &console[begin + "MOAT-TEST-BEGIN\n".len()..];
    let Some(end) = body.find("MOAT-TEST-END rc=") else {
        return (None, body.to_string());
    };
    let rc = body[end + "MOAT-TEST-END rc=".len()..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok());
    (rc, body[..end].to_string())
}

/// Writes a tiny ELF kernel that enables interrupts and idles in HLT
/// forever: a guest that stays up on any KVM (the PVM one cannot run a
/// Linux guest for long) and never powers off by itself, so requests that
/// act on a running VM act on one.
pub fn idle_kernel(path: &Path) -> PathBuf {
    // sti; 1: hlt; jmp 1b
    tiny_kernel(path, &[0xfb, 0xf4, 0xeb, 0xfd])
}

/// Writes an ELF kernel whose one segment is `code`, entered at its first
/// byte in 64-bit mode, loaded at 1 MiB.
pub fn tiny_kernel(path: &Path, code: &[u8]) -> PathBuf {
    const LOAD: u64 = 0x10_0000;
    const CODE_AT: u64 = 64 + 56;
    let size = CODE_AT + code.len() as u64;
    let mut elf = Vec::new();
    elf.extend([0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend(2u16.to_le_bytes()); // ET_EXEC
    elf.extend(0x3eu16.to_le_bytes()); // x86-64
    elf.extend(1u32.to_le_bytes());
    elf.extend((LOAD + CODE_AT).to_le_bytes()); // entry
    elf.extend(64u64.to_le_bytes()); // program headers
    elf.extend(0u64.to_le_bytes()); // no section headers
    elf.extend(0u32.to_le_bytes());
    elf.extend(64u16.to_le_bytes());
    elf.extend(56u16.to_le_bytes());
    elf.extend(1u16.to_le_bytes());
    elf.extend([0u8; 6]);
    elf.extend(1u32.to_le_bytes()); // PT_LOAD
    elf.extend(5u32.to_le_bytes()); // R+X
    elf.extend(0u64.to_le_bytes()); // from file offset 0
    elf.extend(LOAD.to_le_bytes());
    elf.extend(LOAD.to_le_bytes());
    elf.extend(size.to_le_bytes());
    elf.extend(size.to_le_bytes());
    elf.extend(0x1000u64.to_le_bytes());
    elf.extend(code);
    std::fs::write(path, elf).unwrap();
    path.to_path_buf()
}

/// One HTTP request to moat's API socket on a new connection: (status,
/// body).
pub fn api_request(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = std::os::unix::net::UnixStream::connect(sock)
        .unwrap_or_else(|e| panic!("connect to {}: {e}", sock.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = reply
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// Host-side helpers: `$moat` is moat's binary, `$kernel` and `$initrd`
/// the harness's kernel and initramfs (with the test script); `start_moat
/// ARGS...` runs moat with its console in `$console`; `api METHOD PATH
/// [BODY]` makes one request and records `API METHOD PATH -> STATUS
/// BODY`; `until_console TEXT` waits for the guest to print TEXT;
/// `finish` waits for moat, prints the console, then the host's report,
/// and exits with moat's status.
pub const API_PRELUDE: &str = r#"
moat=$1; shift
kernel=; initrd=
while [ $# -gt 0 ]; do
    case $1 in
        --kernel) kernel=$2; shift 2 ;;
        --initramfs) initrd=$2; shift 2 ;;
        *) shift ;;
    esac
done
sock=/tmp/moat-api-$$.sock
console=/tmp/moat-console-$$.log
report=/tmp/moat-report-$$.log
: >"$report"
start_moat() {
    # The console goes out as it comes (a run that hangs shows where) and
    # into the file the script watches.
    mkfifo /tmp/moat-fifo-$$
    tee "$console" </tmp/moat-fifo-$$ & tee=$!
    "$moat" "$@" >/tmp/moat-fifo-$$ 2>&1 </dev/null & pid=$!
    case " $* " in *" --api-sock "*) ;; *) return ;; esac
    wait_sock 10
}
# Waits up to $1 seconds for the API socket.
wait_sock() {
    i=0; until [ -S "$sock" ]; do
        i=$((i+1)); [ $i -ge $(($1 * 20)) ] && { echo "HOST: no API socket" >>"$report"; break; }
        sleep 0.05
    done
}
api() {
    if [ -n "$3" ]; then
        code=$(curl -s -o /tmp/api-body-$$ -w '%{http_code}' --max-time 60 --unix-socket "$sock" \
            -X "$1" -H 'Content-Type: application/json' -d "$3" "http://localhost$2")
    else
        code=$(curl -s -o /tmp/api-body-$$ -w '%{http_code}' --max-time 60 --unix-socket "$sock" \
            -X "$1" "http://localhost$2")
    fi
    echo "API $1 $2 -> $code $(cat /tmp/api-body-$$)" >>"$report"
}
until_console() {
    i=0; until grep -q "$1" "$console"; do
        kill -0 $pid 2>/dev/null || return 1
        i=$((i+1)); [ $i -ge 1200 ] && return 1
        sleep 0.1
    done
}
# Waits for moat to end; one still running after $1 seconds (default
# 180) is stuck: where its threads wait goes on the console, and it is
# stopped.
wait_moat() {
    stop_if_stuck $pid ${1:-180}
    wait $pid
}
finish() {
    wait_moat; rc=$?
    wait $tee; cat "$report"; exit $rc
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    /// L1's two reports on the net test that timed out in the clean-clone
    /// run of f44293c (2026-11-30), trimmed to the threads that matter.
    const DEAF_REPORT: &str = "guest run timed out after 240 s
--- L1's report on its threads ---
RIG-DIAG report 1 at uptime 196.36
RIG-DIAG 39/39 busybox state=S user=27 sys=94 guest=0 wchan=do_wait syscall=61 0xffffffff
RIG-DIAG     do_wait+0x271/0x2a9
RIG-DIAG 41/41 moat state=S user=71 sys=391 guest=0 wchan=do_epoll_wait syscall=281 0x3
RIG-DIAG     do_epoll_wait+0x21f/0x52c
RIG-DIAG 41/51 console-out state=S user=0 sys=25 guest=0 wchan=futex_wait_queue syscall=202
RIG-DIAG 41/52 vcpu0 state=S user=1084 sys=214 guest=1124 wchan=kvm_vcpu_block syscall=16
RIG-DIAG     kvm_vcpu_block+0x46/0x6e
RIG-DIAG 71/71 wget state=S user=23 sys=232 guest=0 wchan=do_sys_poll syscall=7
RIG-DIAG report 2 at uptime 206.64
RIG-DIAG 39/39 busybox state=S user=27 sys=101 guest=0 wchan=do_wait syscall=61 0xffffffff
RIG-DIAG 41/41 moat state=S user=71 sys=392 guest=0 wchan=do_epoll_wait syscall=281 0x3
RIG-DIAG 41/51 console-out state=S user=0 sys=25 guest=0 wchan=futex_wait_queue syscall=202
RIG-DIAG 41/52 vcpu0 state=S user=1085 sys=214 guest=1124 wchan=kvm_vcpu_block syscall=16
RIG-DIAG     kvm_vcpu_block+0x46/0x6e
RIG-DIAG 71/71 wget state=S user=23 sys=233 guest=0 wchan=do_sys_poll syscall=7
";

    #[test]
    fn a_guest_and_moat_idle_in_both_reports_is_the_rigs_deaf_guest() {
        assert!(guest_went_deaf(DEAF_REPORT));
        // A second vCPU blocked the same way still is.
        let two = DEAF_REPORT.replace(
            "RIG-DIAG 71/71 wget",
            "RIG-DIAG 41/53 vcpu1 state=S user=5 sys=1 guest=7 wchan=kvm_vcpu_block syscall=16\n\
             RIG-DIAG 71/71 wget",
        );
        assert!(guest_went_deaf(&two));
    }

    #[test]
    fn a_guest_that_ran_or_a_busy_moat_is_not_retried() {
        // The guest ran between the reports.
        let ran = DEAF_REPORT.replacen("guest=1124", "guest=1100", 1);
        assert!(!guest_went_deaf(&ran));
        // A guest idle in `sleep` (measured in the rig): its timer keeps
        // waking it, and KVM handles those exits in the vCPU thread.
        let sleeping = DEAF_REPORT
            .replacen(
                "user=1084 sys=214 guest=1124",
                "user=249 sys=113 guest=221",
                1,
            )
            .replacen(
                "user=1085 sys=214 guest=1124",
                "user=262 sys=119 guest=224",
                1,
            );
        assert!(!guest_went_deaf(&sleeping));
        let kernel_only = DEAF_REPORT.replacen("sys=214 guest=1124", "sys=208 guest=1124", 1);
        assert!(!guest_went_deaf(&kernel_only));
        // A vCPU in KVM_RUN's guest mode (or anywhere but blocked in HLT).
        let running = DEAF_REPORT.replace("guest=1124 wchan=kvm_vcpu_block", "guest=1124 wchan=0");
        assert!(!guest_went_deaf(&running));
        // moat's event loop stuck elsewhere, say on a lock.
        let stuck = DEAF_REPORT.replace(
            "sys=392 guest=0 wchan=do_epoll_wait",
            "sys=392 guest=0 wchan=futex_wait_queue",
        );
        assert!(!guest_went_deaf(&stuck));
        // One report, or none (L1 itself stalled), or no vCPU thread.
        let one = &DEAF_REPORT[..DEAF_REPORT.find("RIG-DIAG report 2").unwrap()];
        assert!(!guest_went_deaf(one));
        assert!(!guest_went_deaf("guest run timed out after 240 s"));
        let no_vcpu: String = DEAF_REPORT
            .lines()
            .filter(|l| !l.contains("vcpu0"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(!guest_went_deaf(&no_vcpu));
    }

    #[test]
    fn a_timed_out_run_lets_its_script_clean_up() {
        // rig.sh removes its /tmp/moat-rig.* directory in an EXIT trap; a
        // timeout must end the run so that trap still runs.
        let dir = std::env::temp_dir().join(format!("moat-stop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let marker = dir.join("cleaned");
        let mut command = Command::new("bash");
        command.args([
            "-c",
            "trap 'touch \"$0\"' EXIT; trap 'exit 143' TERM; sleep 100",
            marker.to_str().unwrap(),
        ]);
        let start = Instant::now();
        let err = run_command(command, &[], None, Duration::from_secs(1), None).unwrap_err();
        assert!(err.contains("timed out"), "{err}");
        assert!(marker.exists(), "the script's EXIT trap did not run");
        assert!(start.elapsed() < STOP_GRACE, "{:?}", start.elapsed());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_newest_existing_build_is_the_one_under_test() {
        let dir = std::env::temp_dir().join(format!("moat-newest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let [old, new, missing] = ["old", "new", "missing"].map(|n| dir.join(n));
        let base = std::time::SystemTime::now();
        for (path, age) in [(&new, 10), (&old, 100)] {
            let file = std::fs::File::create(path).unwrap();
            file.set_modified(base - Duration::from_secs(age)).unwrap();
        }
        let all = [old.clone(), missing.clone(), new.clone()];
        assert_eq!(newest(&all), Some(new));
        assert_eq!(newest(&all[..2]), Some(old));
        assert_eq!(newest(&[missing]), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn parses_markers_and_rc() {
        let console =
            "boot\nMOAT-GUEST-INIT\nMOAT-TEST-BEGIN\nhello\nworld\nMOAT-TEST-END rc=3\nreboot\n";
        let (rc, out) = parse_test_result(console);
        assert_eq!(rc, Some(3));
        assert_eq!(out, "hello\nworld\n");
    }

    #[test]
    fn a_rig_artifact_warning_is_dropped_with_its_block_and_nothing_else() {
        let log = "[ 1.0] ok\n\
            [ 2.1] ------------[ cut here ]------------\n\
            [ 2.1] XSAVE consistency problem: size 832 != kernel_size 576\n\
            [ 2.1] WARNING: CPU: 0 PID: 0 at arch/x86/kernel/fpu/xstate.c:606 0x1\n\
            [ 2.1] Call Trace:\n\
            [ 2.1] ---[ end trace 0000000000000000 ]---\n\
            [ 3.0] ------------[ cut here ]------------\n\
            [ 3.0] WARNING: CPU: 1 PID: 7 at drivers/foo.c:1 0x2\n\
            [ 3.0] Call Trace:\n\
            [ 3.0] ---[ end trace 0000000000000000 ]---\n\
            [ 4.0] virtio_rng: probe of virtio0 failed with error -22\n";
        let patterns = ["WARNING", "Call Trace", "failed with error"];
        let rig = kernel_problems(log, &patterns, Backend::Rig);
        assert_eq!(rig.len(), 3, "{rig:#?}");
        assert!(rig[0].contains("drivers/foo.c"));
        assert!(rig[2].contains("virtio_rng"));
        let direct = kernel_problems(log, &patterns, Backend::Direct);
        assert_eq!(direct.len(), 5, "{direct:#?}");
    }

    #[test]
    fn missing_end_marker_means_no_rc() {
        assert_eq!(parse_test_result("MOAT-TEST-BEGIN\npartial").0, None);
        assert_eq!(parse_test_result("nothing").0, None);
    }
}
