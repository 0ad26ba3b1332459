//! Bad input: each mistake gets a one-line error naming the problem and
//! exit status 2, never a panic.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use moat_tests::{image, run_moat, Outcome, Scratch};

/// Runs moat and checks it failed with status 2 and one line containing
/// `expected`.
fn assert_rejected(args: &[&str], files: &[PathBuf], expected: &str) -> Outcome {
    let out = run_moat(args, files).unwrap();
    let lines: Vec<&str> = out
        .console
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(out.status, 2, "args {args:?}: {}", out.console);
    assert_eq!(lines.len(), 1, "one line expected: {}", out.console);
    assert!(lines[0].starts_with("moat: "), "{}", lines[0]);
    assert!(
        lines[0].contains(expected),
        "expected {expected:?} in {:?}",
        lines[0]
    );
    assert!(!out.console.contains("panicked"));
    out
}

fn kernel() -> String {
    image("VMLINUX").to_string_lossy().into_owned()
}

#[test]
fn missing_kernel_is_rejected() {
    assert_rejected(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        &[],
        "--kernel: cannot open /nonexistent/vmlinux: No such file or directory",
    );
}

#[test]
fn kernel_that_is_a_directory_is_rejected() {
    assert_rejected(
        &["run", "--kernel", "/tmp"],
        &[],
        "--kernel: cannot open /tmp: it is a directory",
    );
}

/// A scratch directory an unprivileged user can enter, holding a world-
/// readable copy of the guest kernel.
fn unprivileged_scratch(name: &str) -> (Scratch, PathBuf) {
    let scratch = Scratch::new(name);
    std::fs::set_permissions(scratch.path(""), std::fs::Permissions::from_mode(0o755)).unwrap();
    let kernel = scratch.path("vmlinux");
    std::fs::copy(image("VMLINUX"), &kernel).unwrap();
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644)).unwrap();
    (scratch, kernel)
}

/// Runs moat as user nobody (root can open anything, so permission errors
/// need an unprivileged user); checks it failed with status 2 and one line
/// containing each of `expected`.
fn assert_rejected_unprivileged(args: &[&std::ffi::OsStr], expected: &[&str]) {
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(moat_tests::moat_bin())
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    for e in expected {
        assert!(stderr.contains(e), "expected {e:?} in {stderr}");
    }
}

#[test]
fn unreadable_kernel_is_rejected() {
    let (_scratch, kernel) = unprivileged_scratch("unreadable");
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o000)).unwrap();
    assert_rejected_unprivileged(
        &["run".as_ref(), "--kernel".as_ref(), kernel.as_os_str()],
        &["--kernel: cannot open", "Permission denied"],
    );
}

#[test]
fn kernel_that_is_neither_elf_nor_bzimage_is_rejected() {
    let scratch = Scratch::new("notkernel");
    let path = scratch.path("kernel");
    std::fs::write(&path, b"#!/bin/sh\necho I am not a kernel\n").unwrap();
    assert_rejected(
        &["run", "--kernel", &path.to_string_lossy()],
        std::slice::from_ref(&path),
        "neither an ELF vmlinux nor a bzImage",
    );
}

#[test]
fn initramfs_too_large_for_guest_memory_is_rejected() {
    let scratch = Scratch::new("bigcpio");
    let path = scratch.path("big.cpio");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(60 << 20)
        .unwrap();
    let k = kernel();
    assert_rejected(
        &[
            "run",
            "--kernel",
            &k,
            "--initramfs",
            &path.to_string_lossy(),
            "--memory",
            "size=64M",
        ],
        &[image("VMLINUX"), path.clone()],
        "the initramfs (62914560 bytes) does not fit in guest memory",
    );
}

#[test]
fn missing_initramfs_is_rejected() {
    let k = kernel();
    assert_rejected(
        &["run", "--kernel", &k, "--initramfs", "/nonexistent.cpio"],
        &[],
        "--initramfs: cannot open /nonexistent.cpio",
    );
}

#[test]
fn zero_memory_is_rejected() {
    let k = kernel();
    assert_rejected(
        &["run", "--kernel", &k, "--memory", "size=0"],
        &[],
        "--memory: size must be greater than 0",
    );
}

#[test]
fn more_memory_than_the_host_has_is_rejected() {
    let k = kernel();
    assert_rejected(
        &["run", "--kernel", &k, "--memory", "size=64T"],
        &[],
        "--memory: 64 TiB is more than this host's",
    );
}

#[test]
fn zero_cpus_are_rejected() {
    let k = kernel();
    assert_rejected(
        &["run", "--kernel", &k, "--cpus", "boot=0"],
        &[],
        "--cpus: boot must be at least 1",
    );
}

#[test]
fn too_many_cpus_are_rejected() {
    let k = kernel();
    assert_rejected(
        &["run", "--kernel", &k, "--cpus", "boot=4096"],
        &[],
        "--cpus: boot=4096 is above the maximum of",
    );
}

#[test]
fn missing_kvm_device_is_rejected() {
    let k = kernel();
    assert_rejected(
        &["run", "--kernel", &k, "--kvm", "/nonexistent/kvm"],
        &[],
        "cannot open /nonexistent/kvm: No such file or directory",
    );
}

#[test]
fn kvm_device_without_permission_is_rejected() {
    let (scratch, kernel) = unprivileged_scratch("kvmperm");
    let fake = scratch.path("kvm");
    std::fs::write(&fake, b"").unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_rejected_unprivileged(
        &[
            "run".as_ref(),
            "--kernel".as_ref(),
            kernel.as_os_str(),
            "--kvm".as_ref(),
            fake.as_os_str(),
        ],
        &["Permission denied", "kvm group"],
    );
}

#[test]
fn a_file_that_is_not_kvm_is_rejected() {
    let k = kernel();
    assert_rejected(
        &["run", "--kernel", &k, "--kvm", "/dev/null"],
        &[],
        "/dev/null is not a usable KVM device",
    );
}

#[test]
fn unknown_flag_is_rejected() {
    assert_rejected(
        &["run", "--kernel", "/x", "--frobnicate"],
        &[],
        "unexpected argument '--frobnicate'",
    );
}

#[test]
fn malformed_key_value_is_rejected() {
    assert_rejected(
        &["run", "--kernel", "/x", "--cpus", "2"],
        &[],
        "--cpus: expected key=value, got '2'",
    );
    assert_rejected(
        &["run", "--kernel", "/x", "--memory", "size=lots"],
        &[],
        "--memory: 'lots' is not a size",
    );
    assert_rejected(
        &["run", "--kernel", "/x", "--memory", "bytes=1G"],
        &[],
        "--memory: unknown key 'bytes'",
    );
}

#[test]
fn missing_kernel_option_is_rejected() {
    assert_rejected(&["run"], &[], "--kernel <PATH>");
}

#[test]
fn missing_disk_is_rejected() {
    let k = kernel();
    assert_rejected(
        &["run", "--kernel", &k, "--disk", "path=/nonexistent.img"],
        &[],
        "--disk: cannot open /nonexistent.img: No such file or directory",
    );
}

#[test]
fn disk_that_is_a_directory_is_rejected() {
    let k = kernel();
    assert_rejected(
        &["run", "--kernel", &k, "--disk", "path=/tmp"],
        &[],
        "--disk: cannot open /tmp: it is a directory",
    );
}

#[test]
fn malformed_disk_option_is_rejected() {
    let k = kernel();
    assert_rejected(
        &["run", "--kernel", &k, "--disk", "path=/x,readonly=maybe"],
        &[],
        "--disk: readonly=maybe: expected on or off",
    );
    assert_rejected(
        &["run", "--kernel", &k, "--disk", "readonly=on"],
        &[],
        "--disk: path=FILE is required",
    );
    assert_rejected(
        &["run", "--kernel", &k, "--disk", "path=/x,io_engine=uring"],
        &[],
        "--disk: io_engine=uring: expected sync or async",
    );
}

#[test]
fn an_unknown_transport_is_rejected() {
    let k = kernel();
    assert_rejected(
        &["run", "--kernel", &k, "--transport", "virtio-ccw"],
        &[],
        "invalid value 'virtio-ccw' for '--transport <TRANSPORT>' [possible values: mmio, pci]",
    );
}

#[test]
fn malformed_net_option_is_rejected() {
    let k = kernel();
    assert_rejected(
        &["run", "--kernel", &k, "--net", "tap=tap0,mac=02:00"],
        &[],
        "--net: mac=02:00 is not a MAC address",
    );
    assert_rejected(
        &["run", "--kernel", &k, "--net", "mac=02:00:00:00:00:01"],
        &[],
        "--net: tap=NAME or fd=N is required",
    );
}

#[test]
fn a_net_fd_that_is_not_a_tap_is_rejected() {
    let k = kernel();
    assert_rejected(
        &["run", "--kernel", &k, "--net", "fd=987"],
        &[],
        "--net: fd 987 is not a usable TAP: it is not an open file descriptor",
    );
}

#[test]
fn a_tap_without_permission_is_rejected() {
    // An unprivileged user may not create TAPs.
    let (_scratch, kernel) = unprivileged_scratch("tapperm");
    assert_rejected_unprivileged(
        &[
            "run".as_ref(),
            "--kernel".as_ref(),
            kernel.as_os_str(),
            "--net".as_ref(),
            "tap=moat-noperm0".as_ref(),
        ],
        &["moat: --net: cannot open TAP moat-noperm0: "],
    );
}

#[test]
fn a_vsock_cid_below_3_is_rejected() {
    assert_rejected(
        &[
            "run",
            "--kernel",
            &kernel(),
            "--vsock",
            "cid=2,socket=/tmp/v.sock",
        ],
        &[],
        "--vsock: cid=2: a guest CID is 3 to",
    );
}

#[test]
fn a_vsock_socket_path_that_is_a_file_is_rejected_and_left_alone() {
    let scratch = Scratch::new("vsock-file");
    let path = scratch.path("not-a-socket");
    std::fs::write(&path, b"keep me").unwrap();
    let vsock = format!("cid=3,socket={}", path.display());
    assert_rejected(
        &["run", "--kernel", &kernel(), "--vsock", &vsock],
        std::slice::from_ref(&path),
        "exists and is not a socket moat may replace",
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
}

#[test]
fn a_forward_port_that_is_not_a_number_is_rejected() {
    assert_rejected(
        &[
            "run",
            "--kernel",
            &kernel(),
            "--vsock",
            "cid=3,socket=/tmp/v.sock",
            "--forward",
            "unix:/tmp/f.sock=vsock:http",
        ],
        &[],
        "--forward: vsock:http: the port is not a number",
    );
}

#[test]
fn a_forward_without_vsock_is_rejected() {
    assert_rejected(
        &[
            "run",
            "--kernel",
            &kernel(),
            "--forward",
            "unix:/tmp/f.sock=vsock:80",
        ],
        &[],
        "--forward: needs a vsock device",
    );
}

#[test]
fn a_bad_rng_rate_is_rejected() {
    assert_rejected(
        &["run", "--kernel", &kernel(), "--rng", "rate=0"],
        &[],
        "--rng: rate=0: expected a number of bytes per second above 0",
    );
}

#[test]
fn a_bad_shutdown_timeout_is_rejected() {
    assert_rejected(
        &["run", "--kernel", &kernel(), "--shutdown-timeout", "soon"],
        &[],
        "--shutdown-timeout: 'soon' is not a number of seconds",
    );
}

#[test]
fn api_mode_flags_and_config_files_are_checked() {
    let scratch = Scratch::new("bad-api-input");
    let write = |name: &str, text: &str| {
        let path = scratch.path(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let k = kernel();
    let cases: Vec<(PathBuf, &str)> = vec![
        (write("garbage.json", "{ not json"), "key must be a string"),
        (
            write("unknown.json", r#"{"frobnicate": 1}"#),
            "unknown field `frobnicate`",
        ),
        (
            write(
                "balloon.json",
                r#"{"balloon": {"amount_mib": 1, "deflate_on_oom": false}}"#,
            ),
            "moat does not support a balloon device yet",
        ),
        (
            write(
                "cpus.json",
                r#"{"machine-config": {"vcpu_count": 99, "mem_size_mib": 128}}"#,
            ),
            "vcpu_count 99 is not 1 to 32",
        ),
        (
            write(
                "nokernel.json",
                r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 128}}"#,
            ),
            "without a boot source",
        ),
        (
            write(
                "drive.json",
                &format!(
                    r#"{{"boot-source": {{"kernel_image_path": "{k}"}},
                        "drives": [{{"drive_id": "a", "is_root_device": false, "path_on_host": "/nonexistent.img"}}]}}"#
                ),
            ),
            "drive a: path_on_host /nonexistent.img: No such file",
        ),
    ];
    for (file, expected) in &cases {
        let path = file.to_str().unwrap();
        assert_rejected(
            &["--config-file", path, "--no-api"],
            std::slice::from_ref(file),
            expected,
        );
    }
    assert_rejected(
        &["--config-file", "/nonexistent.json", "--no-api"],
        &[],
        "--config-file: cannot read /nonexistent.json",
    );
    assert_rejected(
        &["--api-sock", "/tmp/x.sock", "--id", "a/b"],
        &[],
        "--id: 'a/b'",
    );
    assert_rejected(
        &["--api-sock", "/tmp/x.sock", "--level", "loud"],
        &[],
        "--level: 'loud'",
    );
    assert_rejected(&[], &[], "give --api-sock PATH");
    assert_rejected(
        &["--api-sock", "/nonexistent-dir/api.sock"],
        &[],
        "--api-sock: cannot listen on /nonexistent-dir/api.sock",
    );
}

#[test]
fn trace_and_log_options_that_cannot_work_are_rejected() {
    let k = kernel();
    let files = [image("VMLINUX")];
    assert_rejected(
        &[
            "run",
            "--kernel",
            &k,
            "--trace-exits=/nonexistent/dir/t.json",
        ],
        &files,
        "--trace-exits: cannot open /nonexistent/dir/t.json",
    );
    assert_rejected(
        &["run", "--kernel", &k, "--trace-exits=live"],
        &files,
        "--trace-exits: live needs a FILE",
    );
    assert_rejected(
        &["run", "--kernel", &k, "--level", "loud"],
        &files,
        "--level: 'loud' is not Error, Warning, Info, Debug, Trace or Off",
    );
}
