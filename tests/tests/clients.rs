//! The API mode against clients moat did not write: the PyPI package
//! firecracker-python (a client written for Firecracker) creating, pausing,
//! resuming and deleting a microVM, and requests generated from
//! Firecracker's OpenAPI spec by schemathesis, before and after the VM
//! starts. Neither needs the guest to reach userspace, so both run moat
//! directly on any /dev/kvm (the nested PVM one of our build machines
//! will do); the Python side comes from `scripts/python-env.sh`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use moat_tests::{api_request as request, idle_kernel, moat_bin, python, repo_root, Scratch};

fn need_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests start moat directly: they need a /dev/kvm (any kind; a nested one will do)"
    );
}

/// Firecracker's API spec (a copy kept in the repository).
fn spec() -> PathBuf {
    repo_root().join("tests/python/firecracker-api.yaml")
}

/// moat in API mode, killed when dropped.
struct Moat {
    child: Child,
    sock: PathBuf,
}

impl Moat {
    fn start(dir: &Path) -> Moat {
        Moat::start_with(dir, &[])
    }

    fn start_with(dir: &Path, extra: &[&str]) -> Moat {
        let sock = dir.join("api.sock");
        let child = Command::new(moat_bin())
            .args(["--api-sock", sock.to_str().unwrap(), "--id", "spec-check"])
            .args(extra)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "no API socket after 10 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        Moat { child, sock }
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Boots the idle kernel (2 vCPUs, 64 MiB) through the API.
    fn start_idle_vm(&self, scratch: &Scratch) {
        let kernel = idle_kernel(&scratch.path("idle.elf"));
        let boot = format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display());
        let sock = &self.sock;
        assert_eq!(request(sock, "PUT", "/boot-source", &boot).0, 204);
        let config = r#"{"vcpu_count": 2, "mem_size_mib": 64}"#;
        assert_eq!(request(sock, "PUT", "/machine-config", config).0, 204);
        let start = r#"{"action_type": "InstanceStart"}"#;
        assert_eq!(request(sock, "PUT", "/actions", start).0, 204);
    }

    /// Sends `signal` to moat.
    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child, which has not been waited for.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }

    /// The state letter of moat's main thread in /proc (`T`: stopped).
    fn proc_state(&self) -> char {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // After the command name in parentheses: " S ...".
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .unwrap_or('?')
    }
}

impl Drop for Moat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a script of tests/python with the venv's Python; returns its
/// output and whether it succeeded.
fn run_python(script: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(python())
        .arg(repo_root().join("tests/python").join(script))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn firecracker_python_creates_pauses_resumes_and_deletes_a_microvm() {
    need_kvm();
    let scratch = Scratch::new("firecracker-python");
    let rootfs = scratch.path("rootfs.ext4");
    std::fs::write(&rootfs, vec![0u8; 1 << 20]).unwrap();
    let kernel = idle_kernel(&scratch.path("idle.elf"));
    let work = scratch.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let (ok, out) = run_python(
        "firecracker_python.py",
        &[
            moat_bin().to_str().unwrap(),
            kernel.to_str().unwrap(),
            rootfs.to_str().unwrap(),
            work.to_str().unwrap(),
        ],
    );
    for step in [
        "create",
        "process",
        "list",
        "state-running",
        "pause",
        "state-paused",
        "resume",
        "state-resumed",
        "vm-config",
        "delete",
        "process-gone",
        "files-gone",
    ] {
        assert!(
            out.contains(&format!("STEP-OK {step}\n")),
            "step {step}:\n{out}"
        );
    }
    assert!(ok, "{out}");
}

#[test]
fn requests_generated_from_the_openapi_spec_get_documented_answers_and_never_a_5xx() {
    need_kvm();
    let spec = spec();
    let spec = spec.to_str().unwrap();
    // Before InstanceStart.
    let scratch = Scratch::new("spec-check");
    let mut moat = Moat::start(&scratch.path(""));
    let sock = moat.sock.clone();
    let (ok, out) = run_python(
        "spec_check.py",
        &[spec, sock.to_str().unwrap(), "before", "8"],
    );
    assert!(ok, "before InstanceStart:\n{out}");
    assert!(out.contains("SPEC-PROBLEMS=0"), "{out}");
    assert!(moat.alive());
    drop(moat);

    // After: a fresh moat with a VM that runs and stays up (its guest
    // idles, and has no power button to obey SendCtrlAltDel with).
    let scratch = Scratch::new("spec-check-after");
    let mut moat = Moat::start(&scratch.path(""));
    let sock = moat.sock.clone();
    let kernel = idle_kernel(&scratch.path("idle.elf"));
    let boot = format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display());
    assert_eq!(request(&sock, "PUT", "/boot-source", &boot).0, 204);
    let (status, body) = request(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    assert_eq!(status, 204, "{body}");
    let (ok, out) = run_python(
        "spec_check.py",
        &[spec, sock.to_str().unwrap(), "after", "8"],
    );
    assert!(ok, "after InstanceStart:\n{out}");
    assert!(out.contains("SPEC-PROBLEMS=0"), "{out}");
    let (status, body) = request(&sock, "GET", "/", "");
    assert_eq!(status, 200);
    assert!(
        body.contains("\"state\":\"Running\"") || body.contains("\"state\":\"Paused\""),
        "{body}"
    );
    assert!(moat.alive());
}

/// `Seccomp:` of every thread of `pid`, by thread name.
fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let mut modes = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .unwrap_or("?")
            .trim()
            .to_string();
        modes.push((name.trim().to_string(), mode));
    }
    modes
}

#[test]
fn every_moat_thread_runs_under_a_seccomp_filter_unless_turned_off() {
    need_kvm();
    for (extra, want) in [(&[][..], "2"), (&["--no-seccomp"][..], "0")] {
        let scratch = Scratch::new("seccomp-threads");
        let moat = Moat::start_with(&scratch.path(""), extra);
        let sock = moat.sock.clone();
        moat.start_idle_vm(&scratch);
        // The API answering after its filter is in is part of the proof.
        assert_eq!(request(&sock, "GET", "/", "").0, 200);
        // Each vCPU installs its filter as its thread starts: give them a
        // moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        let modes = loop {
            let modes = seccomp_modes(moat.child.id());
            let names: Vec<&str> = modes.iter().map(|(n, _)| n.as_str()).collect();
            let settled = ["moat", "api", "vcpu0", "vcpu1"]
                .iter()
                .all(|t| names.contains(t))
                && modes.iter().all(|(n, m)| n.starts_with("kvm") || m == want);
            if settled || Instant::now() > deadline {
                break modes;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let names: Vec<&str> = modes.iter().map(|(n, _)| n.as_str()).collect();
        for thread in ["moat", "api", "vcpu0", "vcpu1"] {
            assert!(names.contains(&thread), "no thread {thread}: {modes:?}");
        }
        for (name, mode) in &modes {
            // KVM's own kernel threads carry the process's name prefix.
            if name.starts_with("kvm") {
                continue;
            }
            assert_eq!(mode, want, "thread {name} with {extra:?}: {modes:?}");
        }
    }
}

#[test]
fn moat_stopped_and_continued_goes_on_running_and_paused() {
    // SIGSTOP and SIGCONT (job control, `gdb -p`, a cgroup freezer) end
    // a timed sleep with restart_syscall(2): the API thread is nearly
    // always in a poll(2) with a timeout, paused vCPUs in a timed wait.
    need_kvm();
    let scratch = Scratch::new("stop-continue");
    let mut moat = Moat::start(&scratch.path(""));
    moat.start_idle_vm(&scratch);
    let sock = moat.sock.clone();
    for state in ["Running", "Paused"] {
        let body = format!(r#"{{"state": "{state}"}}"#);
        if state == "Paused" {
            assert_eq!(request(&sock, "PATCH", "/vm", &body).0, 204);
        }
        for round in 0..3 {
            moat.signal(libc::SIGSTOP);
            let deadline = Instant::now() + Duration::from_secs(5);
            while moat.proc_state() != 'T' {
                assert!(Instant::now() < deadline, "moat did not stop");
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(50));
            moat.signal(libc::SIGCONT);
            std::thread::sleep(Duration::from_millis(200));
            let status = moat.child.try_wait().unwrap();
            assert!(
                status.is_none(),
                "{state}, round {round}: moat ended: {status:?}"
            );
        }
        let (code, info) = request(&sock, "GET", "/", "");
        assert_eq!(code, 200, "{info}");
        assert!(info.contains(&format!(r#""state":"{state}""#)), "{info}");
    }
    let resume = r#"{"state": "Resumed"}"#;
    assert_eq!(request(&sock, "PATCH", "/vm", resume).0, 204);
    assert!(moat.alive());
}
